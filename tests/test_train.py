"""End to end: smoke training, energy-only freezing, resume, FSDP on 8 devices, NaN guard."""
import functools
import glob
import json
import os
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs import energy_only
from configs import pi0_libero
from pipeline import checkpoint
from pipeline import optim
from pipeline import sharding
from pipeline import train
from pipeline import trainer as trainer_lib
from pipeline import weights
from pipeline.data import loader

STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Reruns of the same config in this module reuse compiled steps (persistent XLA cache)."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


def smoke_config(**overrides):
  c = energy_only.get_config("smoke")
  c.num_train_steps = STEPS
  c.log_every = 10
  c.eval_every = 30
  c.save_every = 20
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def one_device_mesh():
  return sharding.make_mesh(1, devices=jax.devices()[:1])


def read_scalars(workdir):
  """{tag: [(step, value), ...]} from every TensorBoard event file in workdir."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
  return out


def flat(tree):
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  config = smoke_config()
  t0 = time.time()
  state = train.run(config, workdir, one_device_mesh())
  return dict(workdir=workdir, config=config, state=state, seconds=time.time() - t0)


def test_smoke_trains_energy(smoke):
  print(f"shortened smoke run: {smoke['seconds']:.1f} s")  # no timing assertion (shared CI)
  s = read_scalars(smoke["workdir"])
  for tag in ("train/energy_loss", "train/E_pos", "train/E_neg", "train/energy_accuracy",
              "train/grad_norm", "train/lr", "eval/flow_loss", "eval/energy_loss", "eval/E_pos",
              "eval/E_neg", "eval/retrieval_accuracy", "steps_per_sec"):
    assert tag in s, (tag, sorted(s))
  loss = [v for _, v in s["train/energy_loss"]]
  assert [st for st, _ in s["train/energy_loss"]] == list(range(10, STEPS + 1, 10))
  assert loss[-1] < loss[0] - 0.2, loss
  assert s["train/E_pos"][-1][1] < s["train/E_neg"][-1][1]
  assert [st for st, _ in s["eval/energy_loss"]] == [30, 60]
  assert "train/flow_loss" not in s  # energy-only: no flow loss in the step ...
  assert np.isfinite(s["eval/flow_loss"][-1][1])  # ... but measured in evaluation


def test_energy_only_freezes_everything_else(smoke):
  config = smoke["config"]
  trainer = trainer_lib.Trainer(loader.resolve_paths(config, smoke["workdir"]), one_device_mesh())
  init = flat(trainer.init_params(jax.random.key(config.seed)))
  final = flat(smoke["state"].params)
  energy = [k for k in init if k.startswith("energy/")]
  assert energy and len(energy) < len(init)
  for k in init:
    if k.startswith("energy/"):
      continue
    np.testing.assert_array_equal(final[k], init[k], err_msg=k)  # bit-identical
  assert any(not np.array_equal(final[k], init[k]) for k in energy)

  # Optimizer state: Adam mu and nu for energy params only (plus scalar counters).
  opt_arrays = [x for x in jax.tree.leaves(smoke["state"].opt_state) if np.ndim(x) > 0]
  energy_shapes = sorted(init[k].shape for k in energy)
  assert sorted(x.shape for x in opt_arrays) == sorted(energy_shapes * 2)
  assert sorted(x.shape for x in jax.tree.leaves(smoke["state"].ema)) == energy_shapes

  # The step differentiates the energy subtree only.
  tr, fr = optim.split(trainer.parts.abstract_params, trainer.mask)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), next(iter(
      loader.make_dataset(loader.resolve_paths(config, smoke["workdir"]), split="eval"))))
  (_, _), grads = jax.eval_shape(functools.partial(trainer_lib.loss_and_grads, trainer.parts),
                                 tr, fr, jax.random.key(0), batch)
  assert set(flat(jax.tree.map(lambda x: np.zeros(()), grads))) == set(energy)


def test_rerun_resumes_from_latest_checkpoint(smoke, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = smoke_config()
  real = loader.to_global_batch
  calls = {"n": 0}

  class Crash(Exception):
    pass

  def crashing(batch, batch_sharding):
    calls["n"] += 1
    if calls["n"] > 45:  # dies during step 46; the last checkpoint is step 40
      raise Crash()
    return real(batch, batch_sharding)

  monkeypatch.setattr(loader, "to_global_batch", crashing)
  with pytest.raises(Crash):
    train.run(config, workdir, one_device_mesh())
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=20)
  assert ck.all_steps() == [20, 40]
  monkeypatch.setattr(loader, "to_global_batch", real)

  state = train.run(config, workdir, one_device_mesh())  # the same command again
  assert int(state.step) == STEPS
  s = read_scalars(workdir)
  steps = [st for st, _ in s["train/energy_loss"]]
  assert steps == [10, 20, 30, 40, 50, 60], steps  # 41.. ran once; nothing started over
  # Exact continuation: same data order, RNG and optimizer state as the uninterrupted run.
  ref, got = flat(smoke["state"].params), flat(state.params)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  ref_s = read_scalars(smoke["workdir"])
  np.testing.assert_allclose(s["train/energy_loss"][-1][1], ref_s["train/energy_loss"][-1][1],
                             rtol=1e-6)

  # Once finished, rerunning trains nothing more.
  again = train.run(config, workdir, one_device_mesh())
  assert int(again.step) == STEPS
  assert [st for st, _ in read_scalars(workdir)["train/energy_loss"]] == steps


def test_fsdp_2x4_matches_one_device(smoke):
  """data=2 x fsdp=4 on 8 CPU devices: params really sharded, same loss and update as 1 device."""
  config = pi0_libero.get_config("smoke")
  config.optim.ema_decay = 0.0
  config.data.dataset_dir = os.path.join(smoke["workdir"], "data")
  config.sharding.min_size_mib = 0.0
  batch_np = next(iter(loader.make_dataset(config, split="train")))
  results = {}
  for name, mesh in (("one", one_device_mesh()), ("fsdp", sharding.make_mesh(4))):
    trainer = trainer_lib.Trainer(config, mesh)
    state = trainer.new_state()
    if name == "fsdp":
      assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
      emb = state.params["PaliGemma"]["llm"]["embedder"]["input_embedding"]
      assert "fsdp" in emb.sharding.spec
      assert emb.addressable_shards[0].data.size == emb.size // 4
      sharded = [x for x in jax.tree.leaves(state.params) if "fsdp" in x.sharding.spec]
      assert len(sharded) > len(jax.tree.leaves(state.params)) // 2
    batch = loader.to_global_batch(batch_np, sharding.batch_sharding(mesh))
    new_state, metrics = trainer.train_step(state, batch)
    results[name] = (jax.device_get(metrics), flat(new_state.params))
  (m1, p1), (m8, p8) = results["one"], results["fsdp"]
  # Same math, different reduction order across shards: float32 tolerances.
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  # Adam's first step is ~lr * sign(g) per element, so a gradient that is ~0 up to rounding
  # may step either way: params agree to 2 * lr of step 1 (and far better almost everywhere).
  lr1 = float(m1["lr"])
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], rtol=0, atol=2 * lr1 + 1e-6, err_msg=k)
  diffs = np.concatenate([np.abs(p8[k] - p1[k]).ravel() for k in p1])
  assert np.mean(diffs < 1e-6) > 0.99


def test_non_finite_steps_stop_the_run(smoke, tmp_path, monkeypatch):
  config = smoke_config(num_train_steps=12, save_every=4, eval_every=100, max_bad_steps=3)
  config.data.dataset_dir = os.path.join(smoke["workdir"], "data")
  config.data.synthetic = False
  config.data.source_dir = ""
  real = loader.to_global_batch
  calls = {"n": 0}

  def poisoned(batch, batch_sharding):
    calls["n"] += 1
    if calls["n"] >= 6:
      batch = dict(batch, actions=np.full_like(batch["actions"], np.nan))
    return real(batch, batch_sharding)

  monkeypatch.setattr(loader, "to_global_batch", poisoned)
  with pytest.raises(FloatingPointError, match=r"config.max_bad_steps=3"):
    train.run(config, str(tmp_path), one_device_mesh())
  ck = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=4)
  assert ck.latest_step() == 4  # nothing saved once bad steps started
  trainer = trainer_lib.Trainer(config, one_device_mesh())
  state, _ = ck.restore(4, trainer.abstract_state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_init_weights_merged_into_fresh_tree(smoke, tmp_path):
  """openpi-layout weights without the energy head: loaded params + freshly initialized head."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = loader.resolve_paths(smoke["config"], smoke["workdir"])
  trainer = trainer_lib.Trainer(config, one_device_mesh())
  fresh = flat(trainer.init_params(jax.random.key(config.seed)))
  rng = np.random.default_rng(0)
  weights = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in fresh.items()
             if not k.startswith("energy/")}
  stored = traverse_util.unflatten_dict(
      {("params",) + tuple(k.split("/")) + ("value",): v for k, v in weights.items()})
  ocp.PyTreeCheckpointer().save(str(tmp_path / "params"), stored)
  config.init.weights = str(tmp_path / "params")
  state = trainer_lib.Trainer(config, one_device_mesh()).new_state()
  got = flat(state.params)
  for k in fresh:
    np.testing.assert_array_equal(got[k], fresh[k] if k.startswith("energy/") else weights[k],
                                  err_msg=k)

  # A mis-shaped parameter is an error naming it.
  k0 = next(k for k in weights if weights[k].ndim == 2)
  weights[k0] = np.zeros((3, 5), np.float32)
  stored = traverse_util.unflatten_dict(
      {("params",) + tuple(k.split("/")) + ("value",): v for k, v in weights.items()})
  ocp.PyTreeCheckpointer().save(str(tmp_path / "bad"), stored)
  config.init.weights = str(tmp_path / "bad")
  with pytest.raises(ValueError, match=f"shape mismatch for param {k0}"):
    trainer_lib.Trainer(config, one_device_mesh()).new_state()


def test_second_stage_starts_from_the_first(smoke, tmp_path):
  """init.weights = stage 1's workdir or one of its steps: its EMA params and its norm stats."""
  stage1 = smoke["workdir"]
  step_dir = os.path.join(stage1, "checkpoints", str(STEPS))
  want = dict(flat(smoke["state"].params), **flat(smoke["state"].ema))  # EMA: the energy head
  assert any(not np.array_equal(flat(smoke["state"].params)[k], v)
             for k, v in flat(smoke["state"].ema).items())
  config = smoke_config(num_train_steps=2, eval_every=0, save_every=2, seed=7)
  config.data.dataset_dir = os.path.join(stage1, "data")
  config.data.synthetic = False
  config.data.source_dir = ""
  for given in (step_dir, stage1):
    config.init.weights = given
    state = trainer_lib.Trainer(config, one_device_mesh()).new_state()
    got = flat(state.params)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  assert weights.norm_stats_path(config) == os.path.join(step_dir, "norm_stats", "metadata")
  state = train.run(config, str(tmp_path), one_device_mesh())
  got = flat(state.params)
  for k in want:
    if not k.startswith("energy/"):  # frozen in stage 2
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  ck = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=2)
  saved = ck.restore_json(2, "norm_stats")
  ck.close()
  with open(os.path.join(step_dir, "norm_stats", "metadata")) as f:
    assert saved == json.load(f)  # stage 2 trained with (and saved) stage 1's stats


def test_preemption_saves_and_returns(smoke, tmp_path, monkeypatch):
  """A preemption notice at step 25: checkpoint there, clean return, the rerun resumes at 26."""
  config = smoke_config()
  monkeypatch.setattr(checkpoint.Checkpointer, "reached_preemption", lambda self, step: step == 25)
  state = train.run(config, str(tmp_path), one_device_mesh())
  assert int(state.step) == 25
  ck = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"), save_every=20)
  assert ck.all_steps() == [20, 25]
  monkeypatch.setattr(checkpoint.Checkpointer, "reached_preemption", lambda self, step: False)
  state = train.run(config, str(tmp_path), one_device_mesh())
  ref, got = flat(smoke["state"].params), flat(state.params)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_profile_trace_written(smoke, tmp_path):
  config = smoke_config(num_train_steps=8, eval_every=100, save_every=100)
  config.data.dataset_dir = os.path.join(smoke["workdir"], "data")
  config.data.synthetic = False
  config.data.source_dir = ""
  config.profile.enabled = True
  config.profile.first_step = 3
  config.profile.num_steps = 2
  train.run(config, str(tmp_path), one_device_mesh())
  assert glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))


def test_real_energy_only_config_plans_fsdp_abstractly():
  """Full-size Pi0 (abstract only): FSDP over 8 devices, optimizer state for the head only."""
  config = energy_only.get_config()
  trainer = trainer_lib.Trainer(config, sharding.make_mesh(config.mesh.fsdp))
  shapes = {"/".join(map(str, k)): x for k, x in
            traverse_util.flatten_dict(trainer.abstract_state.params).items()}
  assert len(shapes) > 50
  emb = shapes["PaliGemma/llm/embedder/input_embedding"]
  assert emb.shape == (257152, 2048) and "fsdp" in emb.sharding.spec
  for name, x in shapes.items():
    nbytes = np.prod(x.shape) * x.dtype.itemsize
    if nbytes >= 4 * 2**20 and any(d % 8 == 0 for d in x.shape):
      assert "fsdp" in x.sharding.spec, name
    if nbytes < 4 * 2**20:
      assert x.sharding.spec == P(), name
  opt = [x for x in jax.tree.leaves(trainer.abstract_state.opt_state) if x.ndim > 0]
  energy = [x for k, x in shapes.items() if k.startswith("energy/")]
  assert sum(x.size for x in opt) == 2 * sum(x.size for x in energy)
  assert sum(x.size for x in energy) < 0.01 * sum(x.size for x in shapes.values())
