"""Checkpoints: Orbax CheckpointManager in workdir/checkpoints, and initial-weight loading.

One checkpoint step holds the composite
  state      train state (StandardSave; restored into target shardings from an abstract tree),
  data_iter  the Grain iterator position, one JSON per process,
  config     the run's config as JSON, and norm_stats (the dataset's normalization) as JSON,
  topology   process count, mesh, batch and worker counts of the run that saved it (JSON),
  unlogged_metrics  per-step train metrics not yet logged at that step (JSON), so that a
             resumed run logs the same means as an uninterrupted one.
Initial weights (openpi params, our steps or workdirs) are pipeline.weights' concern.
Saves are async; `wait_until_finished` must run before the process exits. Orbax writes a step into
`<step>.orbax-checkpoint-tmp*` and renames it when complete, so a process killed mid-save leaves
no step that looks complete (and the tmp dir is removed by the next run).

Preemption: in multi-process runs JAX's preemption service catches SIGTERM and
`reached_preemption` turns true at a step all processes agree on. A single process has no
distributed client, so `sigterm_as_preemption` installs a SIGTERM handler that raises the same
notice there.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_SIGTERM = threading.Event()


@contextlib.contextmanager
def sigterm_as_preemption():
  """Within: SIGTERM to a single-process run makes `reached_preemption` true at the next step.

  Multi-process runs keep JAX's own SIGTERM handler (a Python handler would replace it, and a flag
  seen by one process only would let the processes disagree on the step).
  """
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  _SIGTERM.clear()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


class Checkpointer:
  """CheckpointManager with our composite items and save/keep policy."""

  def __init__(self, directory: str, *, save_every: int, max_to_keep: int | None = 1,
               keep_period: int | None = None, async_save: bool = True):
    policy = checkpoint_managers.AnySavePolicy([
        checkpoint_managers.FixedIntervalPolicy(save_every),
        # Saves at the step all hosts agreed on after a preemption notice (SIGTERM).
        checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, keep_period=keep_period or None,
        enable_async_checkpointing=async_save, create=True, save_decision_policy=policy,
        # A crash mid-save leaves a tmp dir behind; the rerun must not trip over it.
        cleanup_tmp_directories=True)
    self.directory = directory
    self.mngr = ocp.CheckpointManager(directory, options=options)

  @classmethod
  def from_config(cls, workdir: str, config) -> "Checkpointer":
    return cls(os.path.join(workdir, "checkpoints"), save_every=config.save_every,
               max_to_keep=config.checkpoint.max_to_keep,
               keep_period=config.checkpoint.keep_period,
               async_save=config.checkpoint.async_save)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return self.mngr.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True at the step where all processes stop after a preemption notice; call every step."""
    if self.mngr.reached_preemption(step):
      return True
    return jax.process_count() == 1 and _SIGTERM.is_set()

  def save(self, step: int, state: Any, data_iter: Any = None, *, config: dict | None = None,
           norm_stats: dict | None = None, topology: dict | None = None,
           metrics: dict | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    for name, value in (("config", config), ("norm_stats", norm_stats), ("topology", topology),
                        ("unlogged_metrics", metrics)):
      if value is not None:
        items[name] = ocp.args.JsonSave(value)
    saved = self.mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s (async)", step, self.directory)
    return saved

  def step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def restore_json(self, step: int, name: str) -> Any:
    """A JSON item of a step, or None when that checkpoint has no such item."""
    if not (self.step_path(step) / name).exists():
      return None
    return self.mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

  def saved_data_iter_states(self, step: int) -> dict[str, Any]:
    """{file name: state} of every process's Grain iterator state in a step."""
    directory = self.step_path(step) / "data_iter"
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("process_*.json"))}

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, Any]:
    """State arrays come back in the shardings carried by `abstract_state`'s leaves."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.mngr.restore(step, args=ocp.args.Composite(**items))
    return out["state"], (out["data_iter"] if data_iter is not None else None)

  def wait_until_finished(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.close()


# ---------------------------------------------------------------------------------------------
# Topology recorded in each checkpoint and compared on restore.

# A change of these makes the saved data-iterator position meaningless for the new run: it counts
# per-process batches (batch size), per-worker positions (workers) or filtered records (skipping).
DATA_LAYOUT_KEYS = ("batch_size", "data_workers", "skip_bad_records")


def topology(config, mesh) -> dict[str, Any]:
  """What a checkpoint records about the run that saved it."""
  return {"process_count": jax.process_count(), "device_count": int(mesh.devices.size),
          "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
          "batch_size": int(config.batch_size),
          "per_process_batch": int(config.batch_size) // jax.process_count(),
          "data_workers": int(config.data.get("num_workers", 0)),
          "skip_bad_records": bool(config.data.get("skip_bad_records", False))}


def describe_topology(t: dict[str, Any]) -> str:
  return (f"{t['process_count']} process(es), {t['device_count']} devices, mesh {t['mesh']}, "
          f"config.batch_size={t['batch_size']}, config.data.num_workers={t['data_workers']}, "
          f"config.data.skip_bad_records={t['skip_bad_records']}")


def check_data_layout(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
  """Raises when the saved data-iterator position cannot continue the stream in this run."""
  changed = [k for k in DATA_LAYOUT_KEYS if saved.get(k) != current[k]]
  if changed:
    raise ValueError(
        f"checkpoint {where} was saved by a run with {describe_topology(saved)}; this run has "
        f"{describe_topology(current)}. The model state would restore into the new mesh, but the "
        f"data-iterator position cannot be carried over when {', '.join(changed)} changes. "
        "Rerun with the saved values, or train in a new workdir.")


def restore(ckpt: Checkpointer, step: int, abstract_state: Any, train_iter: Any,
            topology: dict[str, Any]) -> tuple[Any, Any, Any]:
  """(state, train iterator, saved unlogged metrics JSON) of a checkpoint step.

  The state always restores into the shardings of `abstract_state`'s leaves (this run's mesh).
  The data iterator continues where it stopped when the data layout is unchanged; after a change
  of process count each process takes the shared position (every saved process consumed the same
  number of batches, and the global order is split by stride, so the same global examples come
  next); any other change of the data layout is an error.
  """
  where = str(ckpt.step_path(step))
  saved = ckpt.restore_json(step, "topology")
  metrics = ckpt.restore_json(step, "unlogged_metrics")
  if saved is None or saved["process_count"] == topology["process_count"]:
    if saved is not None:
      check_data_layout(saved, topology, where)
      if saved["mesh"] != topology["mesh"]:
        logging.info("checkpoint: resharding state saved on mesh %s into mesh %s", saved["mesh"],
                     topology["mesh"])
    state, train_iter = ckpt.restore(step, abstract_state, train_iter)
    return state, train_iter, metrics
  check_data_layout(saved, topology, where)
  states = list(ckpt.saved_data_iter_states(step).values())
  if len(states) != saved["process_count"] or any(s != states[0] for s in states):
    raise ValueError(
        f"checkpoint {where} was saved by {saved['process_count']} processes whose data-iterator "
        f"states differ ({len(states)} found), so they cannot be re-sharded over "
        f"{topology['process_count']} processes; rerun with {saved['process_count']} processes")
  state, _ = ckpt.restore(step, abstract_state)
  train_iter.set_state(states[0])
  logging.warning("checkpoint: saved by %d processes, restored into %d (mesh %s -> %s); the data "
                  "stream continues at the same global position", saved["process_count"],
                  topology["process_count"], saved["mesh"], topology["mesh"])
  return state, train_iter, metrics


# ---------------------------------------------------------------------------------------------
# JSON items


def config_to_json(config) -> dict:
  """The config as a JSON-serializable dict (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def read_json(path: str) -> dict | None:
  if not path or not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


