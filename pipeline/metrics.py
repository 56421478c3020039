"""Metric writers (TensorBoard, log, metrics.jsonl), aggregation between log steps, periodic
actions (clu)."""
from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions

from pipeline import fileio

METRICS_JSONL = "metrics.jsonl"


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events under workdir + log lines; other processes only log."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


class MeanAccumulator:
  """Collects per-step metric dicts of device scalars; fetches them only when logging.

  Keeping the values on device until `summary()` avoids a host sync every step.
  """

  def __init__(self):
    self._steps: list[Mapping[str, Any]] = []

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._steps.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def summary(self, prefix: str = "") -> dict[str, float]:
    if not self._steps:
      return {}
    fetched = jax.device_get(self._steps)
    self._steps = []
    keys = sorted({k for m in fetched for k in m})
    return {prefix + k: float(np.mean([np.asarray(m[k]) for m in fetched if k in m]))
            for k in keys}


def make_periodic_actions(config, workdir: str, writer: metric_writers.MetricWriter,
                          num_train_steps: int) -> list[periodic_actions.PeriodicAction]:
  """Progress report (steps/s, ETA) and the optional profiler trace (config.profile)."""
  hooks: list[periodic_actions.PeriodicAction] = [
      periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                      every_steps=config.log_every, every_secs=None)
  ]
  if config.profile.enabled and jax.process_index() == 0:
    # profile_duration_ms=None: stop after num_profile_steps (a timed stop can never end in a
    # fast loop).
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=config.profile.num_steps, profile_duration_ms=None,
        first_profile=config.profile.first_step, every_secs=config.profile.every_secs))
  return hooks



class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as one JSON line per write ({"step": s, name: value, ...}) in workdir/metrics.jsonl.

  A machine-readable log next to the TensorBoard events; lines are flushed as written, so a killed
  run leaves whole lines (a torn last line is dropped by `truncate`).
  """

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")

  @staticmethod
  def truncate(path: str, last_step: int) -> None:
    """Drops lines after `last_step`: a resumed run rewrites them, each step stays logged once."""
    if not os.path.exists(path):
      return
    keep = []
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if row.get("step", 0) <= last_step:
          keep.append(line if line.endswith("\n") else line + "\n")
    fileio.atomic_write_text(path, "".join(keep))

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  # Only scalars go to the JSONL log.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_train_writer(workdir: str, start_step: int) -> metric_writers.MetricWriter:
  """clu default writer (TensorBoard on process 0, log lines) + metrics.jsonl on process 0.

  The JSONL log is local-disk only (it is appended to, which object stores such as gs:// lack).
  """
  writer = create_writer(workdir)
  if jax.process_index() != 0 or "://" in workdir:
    return writer
  path = os.path.join(workdir, METRICS_JSONL)
  JsonlWriter.truncate(path, start_step)
  return metric_writers.MultiWriter([writer, JsonlWriter(path)])


def steps_to_json(steps: list[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-step metrics with their dtypes, so restored means are bitwise those of an unbroken run."""
  fetched = jax.device_get(steps)
  return {"steps": [{k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in m.items()}
                    for m in fetched]}


def steps_from_json(saved: Mapping[str, Any] | None) -> list[dict[str, np.ndarray]]:
  if not saved:
    return []
  return [{k: np.asarray(v, dtype=dt) for k, (v, dt) in m.items()} for m in saved["steps"]]
