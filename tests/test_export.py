"""pipeline.export: openpi's layout, read back the way openpi reads it, and by init.weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax import traverse_util

from configs import common
from configs import pi0_libero
from pipeline import checkpoint
from pipeline import export
from pipeline import trainer as trainer_lib
from pipeline import weights
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "models" / "reference" / "openpi_params_pi0.json"
STATS = {"norm_stats": {
    "state": {"mean": [0.1] * 8, "std": [1.5] * 8, "q01": [-2.0] * 8, "q99": [2.0] * 8},
    "actions": {"mean": [0.2] * 7, "std": [0.5] * 7, "q01": [-1.0] * 7, "q99": [1.0] * 7}}}


def _flat(tree):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Step 7 of a tiny-Pi0 run (the smoke model, monitor mode: EMA over every param)."""
  workdir = tmp_path_factory.mktemp("run")
  config = pi0_libero.get_config("smoke")
  parts = trainer_lib.ModelParts(config.model)
  params = jax.jit(parts.init)(jax.random.key(0))
  ema = jax.tree.map(lambda x: x + 1.0, params)
  state = trainer_lib.TrainState(step=jnp.int32(7), params=params, opt_state=jnp.zeros(()),
                                 ema=ema, rng=jax.random.key_data(jax.random.key(0)),
                                 bad_steps=jnp.int32(0))
  ck = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=1)
  ck.save(7, state, config=checkpoint.config_to_json(config), norm_stats=STATS)
  ck.wait_until_finished()
  ck.close()
  return dict(workdir=workdir, config=config, parts=parts, params=_flat(params), ema=_flat(ema))


def openpi_restore_params(path):
  """openpi's restore_params(restore_type=np.ndarray), written from its source, not ours."""
  ckptr = ocp.PyTreeCheckpointer()
  metadata = ckptr.metadata(path)
  # orbax >= 0.12 wraps the tree (openpi pins 0.11, whose metadata is the tree itself).
  metadata = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
  item = {"params": metadata["params"]}
  params = ckptr.restore(path, ocp.args.PyTreeRestore(
      item=item, restore_args=jax.tree.map(
          lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)))["params"]
  flat = traverse_util.flatten_dict(params)
  if all(kp[-1] == "value" for kp in flat):
    flat = {kp[:-1]: v for kp, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


def openpi_load(model_config, params):
  """openpi's BaseModelConfig.load: intersect with the model's tree, check it, replace."""
  model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  expected = state.to_pure_dict()
  params = ocp.transform_utils.intersect_trees(expected, params)
  got_shapes = {k: np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
  want_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
  assert got_shapes == want_shapes
  state.replace_by_pure_dict(params)
  return nnx.merge(graphdef, state)


def test_full_export_loads_the_openpi_way(run, tmp_path):
  dst = tmp_path / "export"
  written = export.export(str(run["workdir"]), str(dst))
  assert written["ema"] and written["step"] == 7
  loaded = openpi_restore_params(str(dst / "params"))
  # The Pi0 openpi knows (no energy head); the head rides along under its own key.
  openpi_model = dict(run["config"].model.to_dict(), energy_mode="off")
  model = openpi_load(openpi_model, loaded)
  got = _flat(nnx.state(model, nnx.Param).to_pure_dict())
  assert got and not any(k.startswith("energy/") for k in got)
  for k, v in got.items():
    np.testing.assert_array_equal(v, run["ema"][k], err_msg=k)  # EMA params
  energy = {f"energy/{k}": v for k, v in _flat(loaded["energy"]).items()}
  assert set(energy) == {k for k in run["ema"] if k.startswith("energy/")}
  for k, v in energy.items():
    np.testing.assert_array_equal(v, run["ema"][k], err_msg=k)

  # openpi's assets layout and NormStats JSON.
  stats_file = dst / "assets" / "physical-intelligence" / "libero" / "norm_stats.json"
  assert written["norm_stats"] == str(stats_file)
  text = stats_file.read_text()
  assert text.startswith('{\n  "norm_stats": {')
  assert json.loads(text) == STATS

  # Back in through init.weights (D or D/params): the same params, and the run's norm stats.
  for given in (dst, dst / "params"):
    config = pi0_libero.get_config("smoke")
    config.init.weights = str(given)
    loaded, fresh = weights.load_init_params(config, run["parts"].abstract_params)
    assert fresh == []
    for k, v in _flat(loaded).items():
      np.testing.assert_array_equal(v, run["ema"][k], err_msg=k)
    assert weights.norm_stats_path(config) == str(stats_file)

  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(str(run["workdir"]), str(dst))
  params_only = export.export(str(run["workdir"]), str(dst), use_ema=False, overwrite=True)
  assert not params_only["ema"]
  raw = _flat(openpi_restore_params(str(dst / "params")))
  for k, v in raw.items():
    np.testing.assert_array_equal(v, run["params"][k], err_msg=k)


def test_energy_only_export_over_other_pi0_weights(run, tmp_path):
  pi0 = export.export(str(run["workdir"]), str(tmp_path / "pi0"), use_ema=False,
                      include_energy=False)
  head = export.export(str(run["workdir"]), str(tmp_path / "head"), only="energy")
  stored = _flat(openpi_restore_params(head["params"]))
  assert stored and all(k.startswith("energy/") for k in stored)
  assert not any(k.startswith("energy/") for k in _flat(openpi_restore_params(pi0["params"])))

  config = pi0_libero.get_config("smoke")
  config.init.weights = str(tmp_path / "pi0")
  _, fresh = weights.load_init_params(config, run["parts"].abstract_params)
  assert fresh and all(k.startswith("energy/") for k in fresh)  # no head in those weights
  config.init.energy_weights = str(tmp_path / "head")
  loaded, fresh = weights.load_init_params(config, run["parts"].abstract_params)
  assert fresh == []
  for k, v in _flat(loaded).items():
    want = run["ema"][k] if k.startswith("energy/") else run["params"][k]
    np.testing.assert_array_equal(v, want, err_msg=k)

  config.model.energy_mode = "off"
  no_head = trainer_lib.ModelParts(config.model).abstract_params
  with pytest.raises(ValueError, match="energy_weights=.* model has no energy head"):
    weights.load_init_params(config, no_head)


def test_full_size_export_tree_is_openpis():
  """The full Pi0's export tree (abstract: nothing allocated) == openpi's measured listing."""
  model = nnx.eval_shape(lambda: build_model(
      dict(common.model_config().to_dict(), energy_mode="monitor"), nnx.Rngs(0)))
  tree = export.export_tree(nnx.state(model, nnx.Param).to_pure_dict())
  flat = traverse_util.flatten_dict(tree)
  assert all(k[0] == "params" and k[-1] == "value" for k in flat)
  got = {"/".join(k[1:-1]): tuple(v.shape) for k, v in flat.items()}
  energy = {k for k in got if k.startswith("energy/")}
  assert energy
  want = {p["path"]: tuple(p["shape"]) for p in json.loads(REFERENCE.read_text())["params"]}
  assert {k: v for k, v in got.items() if k not in energy} == want
  only = traverse_util.flatten_dict(export.export_tree(
      nnx.state(model, nnx.Param).to_pure_dict(), only="energy"))
  assert {"/".join(k[1:-1]) for k in only} == energy


def test_cli_and_errors(run, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "pipeline.export", f"--workdir={run['workdir']}", "--step=7",
       f"--dst={tmp_path / 'cli'}", "--only=energy"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  written = json.loads(out.stdout)
  assert written["ema"] and os.path.isdir(written["params"])
  out = subprocess.run(
      [sys.executable, "-m", "pipeline.export", f"--workdir={run['workdir']}", "--step=8",
       f"--dst={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 1
  assert f"export failed: --step={str(run['workdir'] / 'checkpoints' / '8')!r} does not exist" in (
      out.stderr)
