"""Checkpoint manager (state + data iterator + JSON items, keep policy) and openpi weights."""
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs import energy_only
from pipeline import checkpoint
from pipeline import optim
from pipeline import sharding
from pipeline import trainer as trainer_lib
from pipeline import weights
from tests import train_fakes


def _state_and_shardings(mesh, seed=0):
  c = energy_only.get_config("smoke")
  parts = trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)
  params = parts.init(jax.random.key(seed))
  mask = trainer_lib.trainable_mask(c, params)
  tx = optim.make_optimizer(c.optim, optim.labels(mask))
  init = trainer_lib.make_init_state_fn(tx, mask, 0.9, seed=seed)
  abstract = jax.eval_shape(init, params)
  specs = sharding.param_specs(params, mesh, [(".*", "fsdp")], 0)
  shardings = sharding.to_named(mesh, trainer_lib.state_specs(abstract, specs))
  state = jax.jit(init, out_shardings=shardings)(params)
  return state, trainer_lib.with_shardings(abstract, shardings)


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def test_save_restore_state_iterator_and_items(tmp_path):
  mesh = sharding.make_mesh(4)
  state, abstract = _state_and_shardings(mesh)
  kernel = state.params["backbone"]["layers"][0]["kernel"]
  assert kernel.sharding.spec == P("fsdp", None)
  it = _iterator()
  for _ in range(5):
    next(it)
  ck = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=10, max_to_keep=2)
  assert ck.latest_step() is None
  assert ck.save(10, state, it, config={"seed": 1}, norm_stats={"norm_stats": {}})
  expected_next = next(it)
  ck.wait_until_finished()
  assert os.path.isdir(tmp_path / "ckpt" / "10" / "config")
  assert os.path.isdir(tmp_path / "ckpt" / "10" / "norm_stats")

  # Restore into a different mesh (data=8): values equal, shardings are the target ones.
  mesh2 = sharding.make_mesh(1)
  _, abstract2 = _state_and_shardings(mesh2)
  ck2 = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=10)
  restored, it2 = ck2.restore(ck2.latest_step(), abstract2, _iterator())
  assert next(it2) == expected_next
  for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(abstract2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == t.sharding
  # Opt state mirrors the params' sharding on the original mesh.
  restored1, _ = ck2.restore(10, abstract, None)
  adam = restored1.opt_state.inner_states["trainable"].inner_state[1][0]
  assert adam.mu["energy"]["out"]["kernel"].sharding.spec == (
      restored1.params["energy"]["out"]["kernel"].sharding.spec)
  ck.close()
  ck2.close()


def test_keep_policy_and_save_interval(tmp_path):
  state, _ = _state_and_shardings(sharding.make_mesh(1, devices=jax.devices()[:1]))
  ck = checkpoint.Checkpointer(str(tmp_path), save_every=2, max_to_keep=2, keep_period=4)
  it = _iterator()
  saved = [s for s in range(1, 11) if ck.should_save(s) and ck.save(s, state, it)]
  ck.wait_until_finished()
  assert saved == [2, 4, 6, 8, 10]
  assert ck.all_steps() == [4, 8, 10]  # last two + every multiple of keep_period
  ck.close()


def _write_openpi(path, params):
  flat = traverse_util.flatten_dict(params)
  tree = traverse_util.unflatten_dict({("params",) + tuple(map(str, k)) + ("value",): np.asarray(v)
                                       for k, v in flat.items()})
  ocp.PyTreeCheckpointer().save(str(path), tree)


def _target(mesh=None):
  parts = trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)
  return parts.abstract_params


def test_check_weights_names_bad_params():
  target = _target()
  good = {"/".join(map(str, k)): tuple(v.shape)
          for k, v in traverse_util.flatten_dict(target).items()}
  no_energy = {k: v for k, v in good.items() if not k.startswith("energy/")}
  assert weights.check_weights(no_energy, target, "energy/.*") == [
      "energy/out/bias", "energy/out/kernel"]
  assert weights.check_weights(good, target, "energy/.*") == []
  missing = {k: v for k, v in good.items() if k != "backbone/embed/kernel"}
  with pytest.raises(ValueError, match=r"missing param backbone/embed/kernel \(8, 64\)"):
    weights.check_weights(missing, target, "energy/.*")
  with pytest.raises(ValueError, match="unexpected param backbone/extra"):
    weights.check_weights({**good, "backbone/extra": (3,)}, target, "energy/.*")
  bad = dict(good, **{"backbone/layers/1/kernel": (64, 65)})
  with pytest.raises(ValueError, match=r"shape mismatch for param backbone/layers/1/kernel: "
                     r"ckpt \(64, 65\) vs model \(64, 64\)"):
    weights.check_weights(bad, target, "energy/.*", source="ckpt")
  with pytest.raises(ValueError, match="missing param energy/out/kernel"):
    weights.check_weights(no_energy, target, "")


@pytest.fixture
def openpi_checkpoint_module():
  return pytest.importorskip("pipeline.models.openpi_checkpoint")


def test_load_weights_into_shardings(tmp_path, openpi_checkpoint_module):
  del openpi_checkpoint_module
  mesh = sharding.make_mesh(4)
  parts = trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)
  params = parts.init(jax.random.key(3))
  source = {k: v for k, v in params.items() if k != "energy"}  # openpi weights: no energy head
  _write_openpi(tmp_path / "params", source)
  specs = sharding.param_specs(parts.abstract_params, mesh, [(".*", "fsdp")], 0)
  target = trainer_lib.with_shardings(parts.abstract_params, sharding.to_named(mesh, specs))
  loaded, missing, used_ema = weights.load(str(tmp_path / "params"), target,
                                           missing_ok="energy/.*")
  assert not used_ema
  assert missing == ["energy/out/bias", "energy/out/kernel"] and "energy" not in loaded
  k = loaded["backbone"]["layers"][1]["kernel"]
  assert k.sharding.spec == P("fsdp", None)
  np.testing.assert_array_equal(np.asarray(k),
                                np.asarray(params["backbone"]["layers"][1]["kernel"]))

  bad = jax.tree.map(np.asarray, source)
  bad["backbone"]["layers"][1]["kernel"] = np.zeros((64, 32), np.float32)
  _write_openpi(tmp_path / "bad", bad)
  with pytest.raises(ValueError, match="shape mismatch for param backbone/layers/1/kernel"):
    weights.load(str(tmp_path / "bad"), target, missing_ok="energy/.*")
