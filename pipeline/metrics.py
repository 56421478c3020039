"""Metric writers, metric aggregation between log steps, and periodic actions (clu)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers, periodic_actions


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

