"""Multi-process training, preemption (SIGTERM), a kill during a save (SIGKILL), topology checks.

Real `python -m pipeline.main` processes on localhost (JAX coordinator + gloo collectives), each
with its own host CPU devices, sharing one prepared synthetic dataset and one persistent XLA
compilation cache, so that the reruns skip compilation. Steps are compared through the
metrics.jsonl that process 0 writes and through the final checkpoints.
"""
import glob
import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import energy_only
from pipeline import checkpoint
from pipeline import launch_local
from pipeline import sharding
from pipeline import metrics
from pipeline import trainer as trainer_lib
from pipeline.data import loader
from pipeline.data import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
SAVE_EVERY = 4
TIMEOUT = 150  # seconds per launch; a hung collective fails the test instead of the suite


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A prepared synthetic dataset and a compilation cache, shared by every run below."""
  root = tmp_path_factory.mktemp("multihost")
  config = energy_only.get_config("smoke")
  config.data.synthetic_episodes = 16
  prepare.ensure_from_config(loader.resolve_paths(config, str(root)))
  cache = root / "xla_cache"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return dict(root=root, data=str(root / "data"), env=env)


def main_args(shared, workdir, *extra):
  return ["--config=configs/energy_only.py:smoke", f"--workdir={workdir}",
          f"--config.num_train_steps={STEPS}", "--config.log_every=1", "--config.eval_every=0",
          f"--config.save_every={SAVE_EVERY}", "--config.mesh.fsdp=1",
          f"--config.data.dataset_dir={shared['data']}", "--config.data.synthetic=False",
          "--config.data.source_dir=", *extra]


def launch(shared, workdir, num_processes, *, env=None, extra=(), module="pipeline.main"):
  devices = 8 // num_processes  # the same 8 devices (data=8 mesh) in every layout
  return launch_local.spawn(
      main_args(shared, workdir, *extra), num_processes=num_processes, cpu_devices=devices,
      env=dict(shared["env"], **(env or {})), log_dir=os.path.join(workdir, "logs"), cwd=REPO,
      module=module)


def logs(workdir):
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "logs", "process_*.log"))):
    with open(path) as f:
      out.append(f.read())
  return out


def run_to_end(shared, workdir, num_processes, **kwargs):
  codes = launch_local.wait(launch(shared, workdir, num_processes, **kwargs), TIMEOUT)
  assert codes == [0] * num_processes, (codes, [l[-3000:] for l in logs(workdir)])
  return codes


def train_metrics(workdir):
  """{step: {name: value}} of the train/ scalars in metrics.jsonl (each step must appear once)."""
  out = {}
  with open(os.path.join(workdir, metrics.METRICS_JSONL)) as f:
    for line in f:
      row = json.loads(line)
      scalars = {k: v for k, v in row.items() if k.startswith("train/")}
      if scalars:
        assert row["step"] not in out, f"step {row['step']} logged twice"
        out[row["step"]] = scalars
  return out


def final_params(workdir, step=STEPS):
  """Params of a checkpoint, restored in this process (any saving topology)."""
  config = energy_only.get_config("smoke")
  trainer = trainer_lib.Trainer(config, sharding.make_mesh(1))
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=SAVE_EVERY)
  try:
    state, _ = ck.restore(step, trainer.abstract_state)
  finally:
    ck.close()
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(state.params)).items()}


def assert_params_equal(got, ref):
  assert got.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.fixture(scope="module")
def one_process(shared):
  workdir = str(shared["root"] / "one_process")
  run_to_end(shared, workdir, 1)
  return workdir


@pytest.fixture(scope="module")
def two_processes(shared):
  workdir = str(shared["root"] / "two_processes")
  run_to_end(shared, workdir, 2)
  return workdir


def test_two_processes_match_one_process(one_process, two_processes):
  """2 processes x 4 devices == 1 process x 8 devices (same global batch 16, seed, data=8 mesh).

  Tolerance: cross-process (gloo) reductions add in another order than in-process ones, so values
  agree to float32 rounding (rtol 1e-6 on loss / grad norm). The energy's overall offset (output
  and final-norm biases) gets a gradient that is zero up to rounding (InfoNCE ignores a shift of
  all energies), which Adam scales to ~lr per step: E_pos and E_neg may shift together by up to
  the summed learning rate, their gap may not.
  """
  one, two = train_metrics(one_process), train_metrics(two_processes)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  lr_sum = sum(m["train/lr"] for m in one.values())
  for step in one:
    a, b = one[step], two[step]
    for name in ("train/loss", "train/grad_norm", "train/param_norm"):
      np.testing.assert_allclose(b[name], a[name], rtol=1e-6, err_msg=f"{name} at step {step}")
    assert b["train/energy_accuracy"] == a["train/energy_accuracy"], step
    np.testing.assert_allclose(b["train/E_pos"] - b["train/E_neg"],
                               a["train/E_pos"] - a["train/E_neg"], atol=1e-5, err_msg=str(step))
    np.testing.assert_allclose(b["train/E_pos"], a["train/E_pos"], atol=lr_sum)
  assert one[STEPS]["train/loss"] < one[1]["train/loss"]  # it trained
  ref, got = final_params(one_process), final_params(two_processes)
  close = []
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=lr_sum, err_msg=k)
    close.append(np.abs(got[k] - ref[k]).ravel() <= 1e-6)
  assert np.mean(np.concatenate(close)) > 0.99


def _wait_for_step(workdir, step, procs, timeout=TIMEOUT):
  path = os.path.join(workdir, metrics.METRICS_JSONL)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"a process ended early: {[l[-3000:] for l in logs(workdir)]}")
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(l).get("step", 0) >= step for l in f if l.endswith("\n")):
          return
    time.sleep(0.05)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def preempt_and_resume(shared, workdir, num_processes, reference):
  """SIGTERM to the last process once step 2 is logged: every process saves at one step and
  exits 0; the same command then finishes the run exactly as `reference` (never interrupted)."""
  procs = launch(shared, workdir, num_processes)
  _wait_for_step(workdir, 2, procs)
  procs[-1].send_signal(signal.SIGTERM)  # a preemption notice to one process only
  codes = launch_local.wait(procs, TIMEOUT)
  texts = logs(workdir)
  assert codes == [0] * num_processes, (codes, [t[-3000:] for t in texts])
  stopped = []
  for text in texts:
    lines = [l for l in text.splitlines() if "preemption notice (SIGTERM): checkpoint saved" in l]
    assert len(lines) == 1, text[-3000:]
    stopped.append(int(lines[0].split("saved at step ")[1].split()[0]))
  assert len(set(stopped)) == 1, stopped  # all processes stopped at the agreed step
  step = stopped[0]
  assert 2 <= step < STEPS, step
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=SAVE_EVERY)
  assert ck.latest_step() == step
  ck.close()
  assert max(train_metrics(workdir)) == step

  run_to_end(shared, workdir, num_processes)  # the same command again
  assert f"resuming from checkpoint step {step} " in logs(workdir)[0]
  # Same programs, data and RNG: bitwise equal to the run that was never interrupted.
  assert train_metrics(workdir) == train_metrics(reference)
  assert_params_equal(final_params(workdir), final_params(reference))


def test_sigterm_to_one_of_two_processes_saves_and_resumes_exactly(shared, two_processes):
  preempt_and_resume(shared, str(shared["root"] / "sigterm2"), 2, two_processes)


def test_sigterm_single_process_saves_and_resumes_exactly(shared, one_process):
  # No distributed client here: train.run's own SIGTERM handler raises the notice.
  preempt_and_resume(shared, str(shared["root"] / "sigterm1"), 1, one_process)


def test_sigkill_during_async_save_resumes_from_last_complete(shared, one_process):
  workdir = str(shared["root"] / "sigkill")
  kill_step = 2 * SAVE_EVERY
  procs = launch(shared, workdir, 1, env={"KILL_DURING_SAVE_STEP": str(kill_step)},
                 module="tests.kill_during_save")
  codes = launch_local.wait(procs, TIMEOUT)
  assert codes == [-signal.SIGKILL], (codes, logs(workdir)[0][-3000:])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # The interrupted save left only its temporary directory, which no reader takes for a step.
  assert glob.glob(os.path.join(ckpt_dir, f"{kill_step}.orbax-checkpoint-tmp*"))
  assert not os.path.exists(os.path.join(ckpt_dir, str(kill_step)))
  ck = checkpoint.Checkpointer(ckpt_dir, save_every=SAVE_EVERY)
  assert ck.latest_step() == SAVE_EVERY
  ck.close()

  run_to_end(shared, workdir, 1)
  assert f"resuming from checkpoint step {SAVE_EVERY}" in logs(workdir)[0]
  assert not glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))
  # Steps after the last complete checkpoint ran again; each is logged once, as uninterrupted.
  assert train_metrics(workdir) == train_metrics(one_process)
  assert_params_equal(final_params(workdir), final_params(one_process))


# ---------------------------------------------------------------------------------------------
# Topology checks (in this process)


def test_bad_mesh_and_batch_are_clear_errors():
  with pytest.raises(ValueError, match=r"config.mesh.fsdp=3 must be -1 or a positive divisor "
                     r"of the device count 8"):
    sharding.make_mesh(3)
  with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible by the "
                     r"data-parallel size 8 \(mesh data=2 x fsdp=4\)"):
    sharding.check_batch_size(12, sharding.make_mesh(4))


def test_main_exits_nonzero_with_message(shared, tmp_path):
  procs = launch(shared, str(tmp_path), 1, extra=["--config.mesh.fsdp=3"])
  assert launch_local.wait(procs, TIMEOUT) == [1]
  last = logs(str(tmp_path))[0].strip().splitlines()[-1]
  assert last.startswith("FATAL: ValueError: config.mesh.fsdp=3 must be -1 or a positive "
                         "divisor of the device count 8"), last


def _restore(workdir, config, mesh):
  trainer = trainer_lib.Trainer(config, mesh)
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=SAVE_EVERY)
  it = iter(loader.make_dataset(config, split="train"))
  try:
    state, it, saved = checkpoint.restore(ck, ck.latest_step(), trainer.abstract_state, it,
                                          checkpoint.topology(config, mesh))
    return state, it, metrics.steps_from_json(saved)
  finally:
    ck.close()


def test_restore_into_other_process_count_and_mesh(shared, two_processes):
  """A 2-process checkpoint resumes in 1 process on a data=2 x fsdp=4 mesh: same state, and the
  data stream goes on with the same global examples."""
  config = energy_only.get_config("smoke")
  config.data.dataset_dir = shared["data"]
  mesh = sharding.make_mesh(4)
  state, it, unlogged = _restore(two_processes, config, mesh)
  try:
    assert int(state.step) == STEPS and unlogged == []
    emb = state.params["energy"]["head"]["input_proj"]["kernel"]
    assert emb.sharding.mesh.shape == mesh.shape
    got = {"/".join(map(str, k)): np.asarray(v) for k, v in
           traverse_util.flatten_dict(jax.device_get(state.params)).items()}
    assert_params_equal(got, final_params(two_processes))
    # Next global batch in 1 process == the two processes' next batches together.
    batch = next(it)
  finally:
    it.close()
  ck = checkpoint.Checkpointer(os.path.join(two_processes, "checkpoints"), save_every=SAVE_EVERY)
  saved = ck.saved_data_iter_states(STEPS)
  ck.close()
  parts = []
  for i in range(2):
    it2 = iter(loader.make_dataset(config, split="train", process_index=i, process_count=2))
    it2.set_state(saved[f"process_{i}-of-2.json"])
    parts.append(next(it2)["actions"])
    it2.close()

  def rows(a):
    return sorted(map(bytes, np.asarray(a).reshape(len(a), -1)))

  assert rows(batch["actions"]) == rows(np.concatenate(parts))


def test_restore_refuses_a_changed_data_layout(shared, two_processes):
  config = energy_only.get_config("smoke")
  config.data.dataset_dir = shared["data"]
  config.batch_size = 8
  with pytest.raises(ValueError, match=r"saved by a run with 2 process\(es\).*config.batch_size="
                     r"16.*this run has 1 process\(es\).*config.batch_size=8.*cannot be carried "
                     r"over when batch_size changes"):
    _restore(two_processes, config, sharding.make_mesh(1))


def test_unlogged_metrics_survive_a_checkpoint_bitwise():
  """Steps since the last log line go into the checkpoint; the resumed means are the same bits."""
  rng = np.random.default_rng(0)
  steps = [{"loss": jax.numpy.asarray(rng.normal(), jax.numpy.float32),
            "bad_step": jax.numpy.zeros((), jax.numpy.float32)} for _ in range(3)]
  saved = json.loads(json.dumps(metrics.steps_to_json(steps)))
  ref, got = metrics.MeanAccumulator(), metrics.MeanAccumulator()
  for m in steps:
    ref.add(m)
  for m in metrics.steps_from_json(saved):
    got.add(m)
  ref.add({"loss": np.float32(0.5), "bad_step": np.float32(0)})
  got.add({"loss": np.float32(0.5), "bad_step": np.float32(0)})
  assert got.summary() == ref.summary()
  assert metrics.steps_from_json(None) == []
