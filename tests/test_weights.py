"""init.weights forms (openpi params dir, our step, our workdir), EMA switch, norm stats, errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import energy_only
from pipeline import checkpoint
from pipeline import optim
from pipeline import trainer as trainer_lib
from pipeline import weights
from tests import train_fakes

STATS = {"norm_stats": {"state": {"mean": [1.0, 2.0], "std": [3.0, 4.0], "q01": None,
                                  "q99": None},
                        "actions": {"mean": [0.5], "std": [2.0], "q01": [-1.0], "q99": [1.0]}}}


def _flat(tree):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _config(**init):
  c = energy_only.get_config("smoke")
  c.init.update(init)
  return c


@pytest.fixture(scope="module")
def parts():
  return trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)


@pytest.fixture(scope="module")
def run(tmp_path_factory, parts):
  """One of our workdirs: steps 10 and 20 of a TinyNet run whose EMA differs from its params."""
  workdir = tmp_path_factory.mktemp("run")
  config = _config()
  mask = trainer_lib.trainable_mask(config, parts.abstract_params)
  tx = optim.make_optimizer(config.optim, optim.labels(mask))
  init = trainer_lib.make_init_state_fn(tx, mask, 0.9, seed=0)
  ck = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=10, max_to_keep=3)
  states = {}
  for step in (10, 20):
    state = init(parts.init(jax.random.key(step)))
    state = state.replace(ema=jax.tree.map(lambda x: x + 100.0, state.ema))  # EMA: energy only
    ck.save(step, state, config=checkpoint.config_to_json(config), norm_stats=STATS)
    states[step] = state
  ck.wait_until_finished()
  ck.close()
  return workdir, states


def _openpi_dir(root, params, stats=True):
  """openpi's layout: <root>/params ({'params': {...: {'value': x}}}) + assets/<asset_id>/."""
  ocp.PyTreeCheckpointer().save(str(root / "params"), {"params": jax.tree.map(
      lambda x: {"value": np.asarray(x)}, params)})
  if stats:
    path = root / "assets" / weights.DEFAULT_ASSET_ID / "norm_stats.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(STATS))
  return root


def test_openpi_dir_and_its_parent(tmp_path, parts):
  params = parts.init(jax.random.key(1))
  root = _openpi_dir(tmp_path / "ckpt", {k: v for k, v in params.items() if k != "energy"})
  for given in (root / "params", root):
    source = weights.resolve(str(given))
    assert source.kind == weights.OPENPI and source.path == str(root / "params")
    assert source.norm_stats_path == str(root / "assets/physical-intelligence/libero/"
                                         "norm_stats.json")
  loaded, fresh, used_ema = weights.load(str(root), parts.abstract_params)
  assert fresh == ["energy/out/bias", "energy/out/kernel"] and not used_ema
  want = _flat(params)
  for k, v in _flat(loaded).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_our_step_state_item_and_workdir(run):
  workdir, _ = run
  for given, step in ((workdir, 20), (workdir / "checkpoints" / "10", 10),
                      (workdir / "checkpoints" / "10" / "state", 10)):
    source = weights.resolve(str(given))
    assert (source.kind, source.step) == (weights.OURS, step), given
    assert source.path == str(workdir / "checkpoints" / str(step))
    assert source.config["data"]["delta_action_dims"] == 6
    assert json.loads(open(source.norm_stats_path).read()) == STATS


@pytest.mark.parametrize("use_ema", [True, False])
def test_ema_switch(run, parts, use_ema):
  workdir, states = run
  loaded, fresh, used_ema = weights.load(str(workdir), parts.abstract_params, use_ema=use_ema)
  assert fresh == [] and used_ema == use_ema
  got, params = _flat(loaded), _flat(states[20].params)
  ema = {f"energy/{k}": v for k, v in _flat(states[20].ema["energy"]).items()}
  for k in params:
    want = ema[k] if use_ema and k in ema else params[k]
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  assert any(not np.array_equal(ema[k], params[k]) for k in ema)


def test_not_weights_names_path_and_what_was_looked_for(tmp_path):
  (tmp_path / "other").mkdir()
  with pytest.raises(FileNotFoundError) as e:
    weights.resolve(str(tmp_path / "other"))
  msg = str(e.value)
  assert f"config.init.weights={str(tmp_path / 'other')!r}" in msg
  for looked in ("other/_METADATA", "other/params/_METADATA", "other/state/_METADATA",
                 "other/checkpoints/<step>"):
    assert looked in msg
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.resolve(str(tmp_path / "nope"), field="config.init.energy_weights")
  (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="workdir without a complete checkpoint step"):
    weights.resolve(str(tmp_path / "empty_run"))


def test_mis_shaped_and_extra_params(run, tmp_path):
  workdir, _ = run
  other = trainer_lib.ModelParts(train_fakes.model_config(width=32), train_fakes.build_tiny)
  with pytest.raises(ValueError, match=r"our checkpoint step 20 .*\n.*shape mismatch for param "
                     r"backbone/embed/kernel: .* \(8, 64\) vs model \(8, 32\)"):
    weights.load(str(workdir), other.abstract_params)
  # An energy head stored with weights loaded into a model without one: dropped, not an error.
  no_head = {k: v for k, v in other.abstract_params.items() if k != "energy"}
  good = {k: tuple(v.shape) for k, v in _flat(jax.tree.map(np.zeros_like, other.init(
      jax.random.key(0)))).items()}
  assert weights.check_weights(good, no_head, "energy/.*") == []
  with pytest.raises(ValueError, match="unexpected param energy/out/bias"):
    weights.check_weights(good, no_head, "")


def test_recipe_of_our_checkpoint_must_match(run, parts):
  workdir, _ = run
  config = _config(weights=str(workdir))
  config.data.delta_action_dims = 0
  with pytest.raises(ValueError, match=r"trained with config.data.delta_action_dims=6 \(this "
                     r"run: 0\)"):
    weights.load_init_params(config, parts.abstract_params)


def test_norm_stats_path_order(run, tmp_path, parts):
  workdir, _ = run
  c = _config(weights=str(workdir))
  c.data.dataset_dir = "/data/x"
  own = tmp_path / "own"
  assert weights.norm_stats_path(c) == str(workdir / "checkpoints/20/norm_stats/metadata")
  # A run's own checkpoint comes first (resuming, evaluating).
  assert weights.norm_stats_path(c, str(workdir)) == weights.norm_stats_path(c)
  assert weights.norm_stats_path(c, str(own)) == weights.norm_stats_path(c)
  c.data.delta_action_dims = 0  # resuming / evaluating that run with another recipe
  with pytest.raises(ValueError, match="delta_action_dims=6 .this run: 0."):
    weights.norm_stats_path(c, str(workdir))
  c.data.delta_action_dims = 6
  c.data.norm_stats_path = "dataset"
  assert weights.norm_stats_path(c) == "/data/x/norm_stats.json"
  c.data.norm_stats_path = "/s/norm_stats.json"
  assert weights.with_norm_stats(c).data.norm_stats_path == "/s/norm_stats.json"
  c = _config()
  c.data.dataset_dir = "/data/x"
  assert weights.norm_stats_path(c) == "/data/x/norm_stats.json"
  root = _openpi_dir(tmp_path / "bare", parts.init(jax.random.key(2)), stats=False)
  c = _config(weights=str(root / "params"))
  with pytest.raises(FileNotFoundError, match=r"comes without norm stats \(looked for "
                     rf"{root}/assets/physical-intelligence/libero/norm_stats.json\)"):
    weights.norm_stats_path(c)


def test_energy_weights_over_other_weights(run, tmp_path, parts):
  workdir, states = run
  base = parts.init(jax.random.key(5))
  root = _openpi_dir(tmp_path / "pi0", {k: v for k, v in base.items() if k != "energy"})
  config = _config(weights=str(root), energy_weights=str(workdir / "checkpoints" / "10"))
  loaded, fresh = weights.load_init_params(config, parts.abstract_params)
  assert fresh == []
  got = _flat(loaded)
  for k, v in _flat(base).items():
    want = (_flat(states[10].ema)[k] if k.startswith("energy/") else v)  # the EMA head
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  # Alone: everything else keeps its fresh init.
  _, fresh = weights.load_init_params(_config(weights="", energy_weights=str(workdir)),
                                      parts.abstract_params)
  assert fresh == sorted(k for k in _flat(base) if not k.startswith("energy/"))


def test_trainer_new_state_from_our_workdir(run):
  workdir, states = run
  config = _config(weights=str(workdir))
  config.model = train_fakes.model_config()
  config.seed = 123  # a fresh init would differ everywhere
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  state = trainer_lib.Trainer(config, mesh, train_fakes.build_tiny).new_state()
  got = _flat(state.params)
  want = dict(_flat(states[20].params), **{f"energy/{k}": v for k, v in
                                            _flat(states[20].ema["energy"]).items()})
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert float(jnp.sum(state.step)) == 0  # a new run, not a resume
