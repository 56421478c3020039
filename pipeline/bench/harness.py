"""What the benchmarks share: model sizes, training modes, compiled train steps, timing.

A train step here is the trainer's (value_and_grad of compute_train_loss over the trainable
params, clipped AdamW, EMA), jitted with its shardings on a mesh of the first `devices` devices
(all on the fsdp axis, one by default) and compiled on the
batch the loader produces for LIBERO (pipeline.batch.spec: uint8 cameras at the stored 256 px,
the right wrist camera as a mask only).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import common
from pipeline import batch as batch_lib
from pipeline import sharding
from pipeline import trainer as trainer_lib
from pipeline.bench import flops as flops_lib
from pipeline.bench import naive_head
from pipeline.models import pi0
from pipeline.models import siglip

SIZES = ("full", "mid", "tiny")
# Benchmark modes: the model's energy modes, plus joint training with the naive head.
MODES = {"no_head": "off", "joint": "joint", "naive": "joint", "energy_only": "energy_only"}

# bf16 peak dense TFLOP/s per chip, for MFU when no peak is given.
PEAK_TFLOPS_BY_KIND = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def model_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Sets config.model to a benchmark size; returns the config.

  full: Pi0 (gemma_2b + gemma_300m, SigLIP So400m/14 at 224 px), bf16, remat, head 512x8x4.
  mid:  the 'dummy' Gemma widths (64, 4 layers), tiny SigLIP at 64 px (3 x 64 image tokens),
        horizon 50, head 128 wide; f32 (CPU).
  tiny: the smoke model (seconds on CPU).
  """
  if size not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")
  m = config.model
  if size == "mid":
    m.update(paligemma_variant="dummy", action_expert_variant="dummy", vision_variant="tiny",
             image_size=64, vocab_size=1024, dtype="float32", remat=False, energy_hidden=128,
             energy_heads=4, energy_layers=2)
  elif size == "tiny":
    common.tiny_model(m)
  return config


def default_batch(size: str) -> int:
  return {"full": 32, "mid": 8, "tiny": 4}[size]


def mode_config(size: str, mode: str, batch: int, devices: int = 1) -> ml_collections.ConfigDict:
  """The base training config at `size` in benchmark `mode` (one of MODES) on `devices`."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
  c = common.get_base_config()
  model_size(c, size)
  c.batch_size = batch
  c.init.weights = ""
  c.mesh.fsdp = devices  # the default FSDP rules
  c.model.energy_mode = MODES[mode]
  return c


def prefix_len(model_config) -> int:
  patch = siglip.get_config(model_config.vision_variant).patch_size
  return len(batch_lib.CAMERAS) * (model_config.image_size // patch)**2 + model_config.max_token_len


def mesh_of(devices: int = 1):
  """Mesh (data 1, fsdp `devices`) over the first `devices` devices."""
  if devices > jax.device_count():
    raise ValueError(f"{devices} devices asked, {jax.device_count()} present (bench: --devices)")
  return sharding.make_mesh(devices, devices=jax.devices()[:devices])


def make_trainer(size: str, mode: str, batch: int, devices: int = 1) -> trainer_lib.Trainer:
  build_fn = naive_head.build_model if mode == "naive" else pi0.build_model
  return trainer_lib.Trainer(mode_config(size, mode, batch, devices), mesh_of(devices), build_fn)


def step_batch_spec(trainer: trainer_lib.Trainer) -> dict[str, Any]:
  """The loader's LIBERO batch for this trainer, sharded as the step takes it."""
  return batch_lib.spec(trainer.config.model, trainer.config.batch_size,
                        sharding=trainer.batch_sharding)


# (size, mode, batch, devices) -> (trainer, compiled step, compile seconds, counted FLOPs): one
# compile per step shape and process, shared by the commands (energy and step compile the same
# steps).
_COMPILED: dict[tuple[str, str, int, int], tuple[Any, Any, float, dict[str, float]]] = {}


def compiled_step(size: str, mode: str, batch: int,
                  devices: int = 1) -> tuple[Any, Any, float, dict[str, float]]:
  """(trainer, compiled train step, compile seconds, counted FLOPs), from abstract shapes."""
  key = (size, mode, batch, devices)
  if key not in _COMPILED:
    trainer = make_trainer(size, mode, batch, devices)
    spec = step_batch_spec(trainer)
    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, spec).compile()
    seconds = time.perf_counter() - t0
    counted = flops_lib.count_flops(trainer.train_step, trainer.abstract_state, spec)
    _COMPILED[key] = (trainer, compiled, seconds, counted)
  return _COMPILED[key]


# ---------------------------------------------------------------------------------------------
# Timing


def block(tree):
  return jax.block_until_ready(tree)


def synthetic_state(trainer: trainer_lib.Trainer, seed: int = 0):
  """A train state of the trainer's shapes and shardings: random params, zero optimizer/EMA.

  Built on the host instead of by the model's init function, which would cost one more
  compile of the whole model; step cost and checkpoint size do not depend on the values.
  """
  rng = np.random.default_rng(seed)
  abstract = trainer.abstract_state
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype), abstract.params)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  return jax.device_put(zeros.replace(params=params), trainer.state_shardings)


def time_train_steps(runs: dict[str, tuple[Any, Any]], steps: int,
                     seed: int = 0) -> dict[str, dict[str, float]]:
  """Times the train steps of several trainers, interleaved, after one warm-up step each.

  runs: {name: (trainer, compiled step)}. One step of each run per round, so that a change of
  machine load hits every run alike; the median is reported.
  """
  live, out = {}, {}
  for name, (trainer, step_fn) in runs.items():
    m = trainer.config.model
    state = synthetic_state(trainer, seed)
    batch = batch_lib.random_batch(step_batch_spec(trainer), vocab_size=m.vocab_size,
                                   act_dim=m.energy_act_dim, seed=seed)
    batch = jax.device_put(batch, trainer.batch_sharding)
    t0 = time.perf_counter()
    state, metrics = block(step_fn(state, batch))
    live[name] = [step_fn, state, batch, metrics, []]
    out[name] = {"first_step_s": time.perf_counter() - t0}
  for _ in range(steps):
    for run in live.values():
      step_fn, state, batch = run[:3]
      t0 = time.perf_counter()
      state, metrics = block(step_fn(state, batch))
      run[4].append(time.perf_counter() - t0)
      run[1], run[3] = state, metrics
  for name, (_, _, _, metrics, times) in live.items():
    out[name].update(step_s=statistics.median(times), step_s_min=min(times),
                     loss=float(metrics["loss"]))
  return out


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of fn() (its result blocked on) over `repeats` calls after one warm-up."""
  block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Reporting


def ratio(a: float, b: float) -> float:
  return a / b if b else float("nan")


def device_kind() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} x{jax.device_count()} ({os.cpu_count()} host cpus)"


def peak_tflops(given: float | None) -> float | None:
  if given:
    return float(given)
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_TFLOPS_BY_KIND.items():
    if kind.startswith(name):
      return value
  return None


def targets_line(result: dict[str, Any]) -> str:
  return "targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}"
                                 for k, v in result.get("targets", {}).items())
