"""Mesh construction, partition rules, batch sharding, opt-state/EMA following their params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pipeline import optim
from pipeline import sharding


def sds(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_make_mesh_axes_and_sizes():
  assert jax.device_count() == 8
  m = sharding.make_mesh(4)
  assert m.axis_names == ("data", "fsdp") and dict(m.shape) == {"data": 2, "fsdp": 4}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  assert dict(sharding.make_mesh(-1).shape) == {"data": 1, "fsdp": 8}
  assert dict(sharding.make_mesh(1).shape) == {"data": 8, "fsdp": 1}
  assert dict(sharding.make_mesh(1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}


@pytest.mark.parametrize("fsdp", [3, 0, 16])
def test_make_mesh_rejects_non_divisor(fsdp):
  with pytest.raises(ValueError, match=f"config.mesh.fsdp={fsdp}.*device count 8"):
    sharding.make_mesh(fsdp)


def test_batch_size_check():
  m = sharding.make_mesh(4)
  sharding.check_batch_size(16, m)
  with pytest.raises(ValueError, match=r"batch_size=12 .* data-parallel size 8"):
    sharding.check_batch_size(12, m)


def test_fsdp_tactic():
  m = sharding.make_mesh(4)
  params = {
      "big": sds(6, 64, 12),  # largest divisible dim is 64 -> dim 1
      "tall": sds(10, 8),  # 10 not divisible by 4, 8 is -> dim 1
      "odd": sds(5, 7),  # nothing divisible -> replicated
      "vec": sds(1024),  # ndim < 2 -> replicated
      "small": sds(4, 4),
  }
  specs = sharding.param_specs(params, m, [(".*", "fsdp")], min_size_mib=0)
  assert specs["big"] == P(None, "fsdp", None)
  assert specs["tall"] == P(None, "fsdp")
  assert specs["odd"] == P() and specs["vec"] == P()
  assert specs["small"] == P("fsdp", None)
  # Threshold: arrays below min_size stay replicated (4*4*4 bytes < 1 KiB).
  specs = sharding.param_specs(params, m, [(".*", "fsdp")], min_size_mib=1 / 1024)
  assert specs["small"] == P() and specs["big"] == P(None, "fsdp", None)
  # One fsdp device: everything replicated.
  m1 = sharding.make_mesh(1)
  assert all(s == P() for s in jax.tree.leaves(
      sharding.param_specs(params, m1, [(".*", "fsdp")], 0), is_leaf=lambda x: isinstance(x, P)))


def test_rules_first_match_wins_fullmatch():
  m = sharding.make_mesh(4)
  params = {"img": {"kernel": sds(8, 16)}, "llm": {"kernel": sds(8, 16), "w": sds(8, 16)}}
  rules = [("img/.*", "replicate"), ("llm/kernel", (None, ("data", "fsdp"))), ("llm/.*", "fsdp"),
           (".*", (("fsdp",), None))]
  specs = sharding.param_specs(params, m, rules, 0)
  assert specs["img"]["kernel"] == P()
  assert specs["llm"]["kernel"] == P(None, ("data", "fsdp"))
  assert specs["llm"]["w"] == P(None, "fsdp")
  # fullmatch: 'llm' alone does not match 'llm/w'.
  with pytest.raises(ValueError, match="no sharding rule matches param llm/w"):
    sharding.param_specs(params, m, [("llm", "fsdp"), ("img/.*", "fsdp"),
                                     ("llm/kernel", "fsdp")], 0)


def test_explicit_rule_errors_name_param():
  m = sharding.make_mesh(4)
  with pytest.raises(ValueError, match=r"llm/w: dim 0 of size 6 is not divisible by mesh size 4"):
    sharding.param_specs({"llm": {"w": sds(6, 8)}}, m, [(".*", ("fsdp", None))], 0)
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.param_specs({"w": sds(8, 8)}, m, [(".*", ("model",))], 0)
  with pytest.raises(ValueError, match="unknown sharding tactic 'shard_all' for param w"):
    sharding.param_specs({"w": sds(8, 8)}, m, [(".*", "shard_all")], 0)


def test_opt_state_and_ema_follow_params():
  m = sharding.make_mesh(4)
  params = {"backbone": {"w": sds(16, 8)}, "energy": {"w": sds(8, 32), "b": sds(32)}}
  specs = sharding.param_specs(params, m, [(".*", "fsdp")], 0)
  mask = optim.trainable_mask(params, ["energy/.*"])
  tx = optim.make_optimizer(_optim_cfg(), optim.labels(mask))
  opt = jax.eval_shape(tx.init, params)
  opt_specs = sharding.follow_params(opt, params, specs)
  adam = opt_specs.inner_states["trainable"].inner_state[1][0]
  assert adam.mu["energy"]["w"] == P(None, "fsdp") and adam.nu["energy"]["w"] == P(None, "fsdp")
  assert adam.count == P()
  # MaskedNode for the frozen param: no leaf at all.
  assert len(jax.tree.leaves(adam.mu, is_leaf=lambda x: isinstance(x, P))) == 2
  ema = optim.split(params, mask)[0]
  ema_specs = sharding.follow_params(ema, params, specs)
  assert ema_specs["energy"]["w"] == P(None, "fsdp") and ema_specs["energy"]["b"] == P()


def _optim_cfg():
  from configs import energy_only
  return energy_only.get_config("smoke").optim


def test_batch_sharding_splits_dim0_over_all_devices():
  m = sharding.make_mesh(4)
  x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), sharding.batch_sharding(m))
  assert x.sharding.spec == P(("data", "fsdp"))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
