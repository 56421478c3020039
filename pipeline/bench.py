"""Benchmarks that print ratios measured side by side in one run.

  python -m pipeline.bench energy [--size=full|mid|tiny] [--json]
  python -m pipeline.bench loader [--dataset_dir=DIR] [--json]
  python -m pipeline.bench checkpoint [--size=mid] [--json]
  python -m pipeline.bench step [--size=mid] [--peak_tflops=X] [--json]

energy      FLOPs (counted from the jaxpr, see count_flops) and peak temporary memory of compiled
            train steps (abstract shapes only, nothing is allocated): (a) no energy head, (b) joint
            mode, (c) joint mode with a naive head that repeats the context B times, (d)
            energy-only; the head alone, pairwise vs naive; and wall-clock steps of (a), (b), (c)
            at --time_size.
loader      samples/s of the full Grain train chain vs decode-only, per worker count.
checkpoint  how long the loop is blocked by an async save vs a synchronous save of one state.
step        steps/s, tokens/s and MFU of the joint and energy-only steps on the present device.

A train step here is the one of pipeline.train (value_and_grad of compute_train_loss over the
trainable params, clipped AdamW, EMA), jitted with the trainer's shardings on a one-device mesh.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.extend.core  # `import jax` alone does not load jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np

COMMANDS = ("energy", "loader", "checkpoint", "step")
SIZES = ("full", "mid", "tiny")
MODES = ("no_head", "joint", "naive", "energy_only")

_SIZE = flags.DEFINE_enum("size", None, SIZES,
                          "Model size (default: full for energy, mid for checkpoint and step).")
_TIME_SIZE = flags.DEFINE_enum("time_size", "mid", SIZES,
                               "energy: model size of the wall-clock comparison.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: 32 full, 8 mid, 4 tiny).")
_TIME_BATCH = flags.DEFINE_integer("time_batch", None, "energy: batch of the timed steps.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_SAVES = flags.DEFINE_integer("saves", 5, "checkpoint: number of saves (median reported).")
_EXTRA_MIB = flags.DEFINE_list("extra_mib", ["0", "256", "1024"],
                               "checkpoint: one row per value, adding a float32 array of that "
                               "many MiB to the state.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "step: peak device TFLOP/s for the MFU (default: known TPU/GPU "
                                  "kinds; n/a on CPU).")
_DATASET_DIR = flags.DEFINE_string("dataset_dir", "",
                                   "loader: prepared dataset (default: a synthetic one in a temp "
                                   "dir).")
_EPISODES = flags.DEFINE_integer("episodes", 8, "loader: synthetic episodes to write.")
_SOURCE_IMAGE_SIZE = flags.DEFINE_integer("source_image_size", 256,
                                          "loader: synthetic image size (LIBERO: 256).")
_BATCHES = flags.DEFINE_integer("batches", 20, "loader: timed batches per pipeline.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "loader: worker counts.")
_TOKENIZER = flags.DEFINE_string("tokenizer_path", "",
                                 "loader: tokenizer (default: the synthetic one for the synthetic "
                                 "dataset, else config.data.tokenizer_path).")

# bf16 peak dense TFLOP/s per chip, for MFU when --peak_tflops is not given.
_PEAK_TFLOPS_BY_KIND = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


# ---------------------------------------------------------------------------------------------
# Configs


def model_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Sets config.model to a benchmark size; returns the config.

  full: Pi0 (gemma_2b + gemma_300m, SigLIP So400m/14 at 224 px), bf16, remat, head 512x8x4.
  mid:  the 'dummy' Gemma widths (64, 4 layers), tiny SigLIP at 64 px (3 x 64 image tokens),
        horizon 50, head 128 wide; f32 (CPU).
  tiny: the smoke model (seconds on CPU).
  """
  from configs import common  # pylint: disable=g-import-not-at-top

  if size not in SIZES:
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")
  m = config.model
  if size == "full":
    return config
  if size == "mid":
    m.paligemma_variant = "dummy"
    m.action_expert_variant = "dummy"
    m.vision_variant = "tiny"
    m.image_size = 64
    m.vocab_size = 1024
    m.dtype = "float32"
    m.remat = False
    m.energy_hidden = 128
    m.energy_heads = 4
    m.energy_layers = 2
    return config
  common.tiny_model(m)
  return config


def default_batch(size: str) -> int:
  return {"full": 32, "mid": 8, "tiny": 4}[size]


def mode_config(size: str, mode: str, batch: int) -> ml_collections.ConfigDict:
  """The base training config at `size` in training `mode` (one of MODES)."""
  from configs import common  # pylint: disable=g-import-not-at-top

  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  c = common.get_base_config()
  model_size(c, size)
  c.batch_size = batch
  c.init.weights = ""
  c.mesh.fsdp = 1
  c.sharding.min_size_mib = 0.0
  m = c.model
  m.energy_head = mode != "no_head"
  m.use_energy_loss = mode in ("joint", "naive")
  m.train_only_energy_model = mode == "energy_only"
  if mode == "energy_only":
    c.optim.trainable = ("energy/.*",)
  return c


# ---------------------------------------------------------------------------------------------
# The naive energy head (reference for the cost comparison only)


def naive_pairwise(energy_model, context, context_mask, actions, *, rngs=None):
  """[i, j] = E(context_i, actions_j) by materializing all B*B pairs and calling the head."""
  b_ctx, b_act = context.shape[0], actions.shape[0]
  ctx = jnp.repeat(context, b_act, axis=0)  # pair p = i * b_act + j
  mask = jnp.repeat(context_mask, b_act, axis=0)
  act = jnp.tile(actions, (b_ctx, 1, 1))
  return energy_model(ctx, mask, act, rngs=rngs).reshape(b_ctx, b_act)


@functools.lru_cache(maxsize=None)
def _naive_energy_class():
  from pipeline.models import energy as energy_lib  # pylint: disable=g-import-not-at-top

  class NaiveEnergyModel(energy_lib.EnergyModel):
    """Same parameters as EnergyModel; `pairwise` repeats the context B times."""

    def pairwise(self, context, context_mask, actions, *, rngs=None):
      return naive_pairwise(self, context, context_mask, actions, rngs=rngs)

  return NaiveEnergyModel


def build_naive_model(model_config, rngs):
  """Pi0 whose energy head computes pairwise energies naively (same parameter tree)."""
  from pipeline.models import pi0  # pylint: disable=g-import-not-at-top

  model = pi0.build_model(model_config, rngs)
  cfg = model.config
  model.energy = _naive_energy_class()(
      model.prefix_width, cfg.energy_act_dim, hidden=cfg.energy_hidden, heads=cfg.energy_heads,
      num_layers=cfg.energy_layers, horizon=cfg.action_horizon, dropout=cfg.energy_dropout,
      dtype=model.dtype, rngs=rngs)
  return model


# ---------------------------------------------------------------------------------------------
# Shapes, compiled costs


def one_device_mesh():
  from pipeline import sharding  # pylint: disable=g-import-not-at-top

  return sharding.make_mesh(1, devices=jax.devices()[:1])


def prefix_len(model_config) -> int:
  from pipeline.models import pi0  # pylint: disable=g-import-not-at-top
  from pipeline.models import siglip  # pylint: disable=g-import-not-at-top

  patch = siglip.get_config(model_config.vision_variant).patch_size
  return len(pi0.IMAGE_KEYS) * (model_config.image_size // patch)**2 + model_config.max_token_len


def abstract_batch(model_config, batch: int, sharding=None) -> dict:
  """jax.ShapeDtypeStruct tree of one batch in the loader's format."""
  m = model_config
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  from pipeline.models import pi0  # pylint: disable=g-import-not-at-top

  return {
      "image": {k: sds((batch, m.image_size, m.image_size, 3), jnp.float32)
                for k in pi0.IMAGE_KEYS},
      "image_mask": {k: sds((batch,), jnp.bool_) for k in pi0.IMAGE_KEYS},
      "state": sds((batch, m.action_dim), jnp.float32),
      "tokenized_prompt": sds((batch, m.max_token_len), jnp.int32),
      "tokenized_prompt_mask": sds((batch, m.max_token_len), jnp.bool_),
      "actions": sds((batch, m.action_horizon, m.action_dim), jnp.float32),
      "actions_is_pad": sds((batch, m.action_horizon), jnp.bool_),
  }


def random_batch(model_config, batch: int, seed: int = 0) -> dict:
  """A concrete batch of the right shapes (values in the normalized ranges)."""
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_batch(model_config, batch))
  for k in out["image"]:
    out["image"][k] = rng.uniform(-1, 1, out["image"][k].shape).astype(np.float32)
    out["image_mask"][k][:] = k != "right_wrist_0_rgb"
  out["state"] = rng.normal(size=out["state"].shape).astype(np.float32)
  n = model_config.max_token_len // 2
  out["tokenized_prompt"][:, :n] = rng.integers(1, model_config.vocab_size, (batch, n))
  out["tokenized_prompt_mask"][:, :n] = True
  out["actions"] = rng.normal(size=out["actions"].shape).astype(np.float32)
  return out


def _sub_jaxprs(value):
  """The jaxprs inside one eqn param value (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _while_trip_count(eqn) -> int | None:
  """Trip count of a fori_loop-shaped while with literal bounds, else None.

  fori_loop with traced bounds lowers to a while with carry (i, upper, ...) and cond i < upper.
  """
  cond = eqn.params["cond_jaxpr"].jaxpr
  nconst = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
  carry = eqn.invars[nconst:]
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt" or len(carry) < 2:
    return None
  cond_carry = cond.invars[eqn.params["cond_nconsts"]:]
  if list(cond.eqns[0].invars) != list(cond_carry[:2]):
    return None
  lo, hi = carry[:2]
  if not all(isinstance(v, jax.extend.core.Literal) for v in (lo, hi)):
    return None
  return max(0, int(hi.val) - int(lo.val))


def _jaxpr_flops(jaxpr, stats: dict[str, int]) -> float:
  """Matmul / conv FLOPs of a jaxpr; counts unknown-trip-count whiles in stats."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      batch = math.prod([lhs[d] for d in lb])
      contract = math.prod([lhs[d] for d in lc])
      lhs_free = math.prod([n for d, n in enumerate(lhs) if d not in (*lc, *lb)])
      rhs_free = math.prod([n for d, n in enumerate(rhs) if d not in (*rc, *rb)])
      total += 2.0 * batch * lhs_free * rhs_free * contract
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
      # The kernel's in-feature dim is already in_features / feature_group_count.
      per_out = rhs[rhs_spec[1]] * math.prod([rhs[d] for d in rhs_spec[2:]])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr, stats)
    elif name == "while":
      trips = _while_trip_count(eqn)
      if trips is None:
        stats["uncounted_while"] += 1
        trips = 1
      body = _jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, stats)
      cond = _jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr, stats)
      total += trips * (body + cond) + cond
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr, stats) for b in eqn.params["branches"])
    else:
      # pjit, closed_call, remat, custom_jvp/vjp calls, shard_map, ...: their sub-jaxprs once.
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _jaxpr_flops(sub, stats)
  return total


def count_flops(fn: Callable[..., Any], *args) -> dict[str, float]:
  """Matmul and conv FLOPs of fn(*args) from its jaxpr, loops counted once per iteration.

  XLA's cost_analysis counts a loop body (scan, while, lax.map) once, which undercounts scanned
  layer stacks. args may be jax.ShapeDtypeStructs. Returns {"flops", "uncounted_while"}: the
  number of while loops with an unknown trip count, whose body is counted once.
  """
  stats = {"uncounted_while": 0}
  flops = _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, stats)
  return {"flops": float(flops), "uncounted_while": stats["uncounted_while"]}


def compiled_cost(compiled, counted: dict[str, float]) -> dict[str, float]:
  """FLOPs (counted from the jaxpr), XLA's FLOPs and peak temporary memory of an executable."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0]
  cost = cost or {}
  mem = compiled.memory_analysis()
  return {
      "flops": float(counted["flops"]),
      "uncounted_while": int(counted["uncounted_while"]),
      "xla_flops_loop_bodies_once": float(cost.get("flops", float("nan"))),
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "temp_bytes": float(getattr(mem, "temp_size_in_bytes", float("nan"))),
      "argument_bytes": float(getattr(mem, "argument_size_in_bytes", float("nan"))),
  }


def make_trainer(size: str, mode: str, batch: int):
  from pipeline import train  # pylint: disable=g-import-not-at-top

  config = mode_config(size, mode, batch)
  build_fn = build_naive_model if mode == "naive" else train.build_model
  trainer = train.Trainer(config, one_device_mesh(), build_fn)
  if not jax.tree.leaves(trainer.parts.rest_template):
    # Pi0 keeps no non-param state; binding then needs no concrete init (abstract compiles).
    trainer.parts.rest = trainer.parts.rest_template
  return trainer


def compile_train_step(trainer) -> tuple[Any, float, dict[str, float]]:
  """The trainer's jitted step compiled from abstract state and batch.

  Returns (compiled, seconds, count_flops of the step).
  """
  t0 = time.perf_counter()
  batch = abstract_batch(trainer.config.model, trainer.config.batch_size, trainer.batch_sharding)
  compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
  seconds = time.perf_counter() - t0
  return compiled, seconds, count_flops(trainer.train_step, trainer.abstract_state, batch)


# (size, mode, batch) -> (trainer, compiled step, ...): one compile per step shape and process,
# shared by the commands (the energy and step benches compile the same joint / energy-only steps).
_COMPILED: dict[tuple[str, str, int], tuple[Any, Any, float, dict[str, float]]] = {}


def compiled_step(size: str, mode: str, batch: int) -> tuple[Any, Any, float, dict[str, float]]:
  """(trainer, compiled train step, compile seconds, counted FLOPs), once per process."""
  key = (size, mode, batch)
  if key not in _COMPILED:
    trainer = make_trainer(size, mode, batch)
    _COMPILED[key] = (trainer, *compile_train_step(trainer))
  return _COMPILED[key]


def step_costs(size: str, batch: int, modes: Sequence[str] = MODES,
               log: Callable[[str], None] = print) -> tuple[dict[str, dict], dict[str, Any]]:
  """Compiled cost of each mode's train step; also returns {mode: (trainer, compiled)}."""
  out, compiled_steps = {}, {}
  for mode in modes:
    trainer, compiled, seconds, counted = compiled_step(size, mode, batch)
    out[mode] = compiled_cost(compiled, counted)
    out[mode]["compile_s"] = seconds
    compiled_steps[mode] = (trainer, compiled)
    log(f"  compiled {mode} train step at size={size} batch={batch}: "
        f"{out[mode]['flops']:.4g} FLOPs, {out[mode]['temp_bytes'] / 2**20:.1f} MiB temp "
        f"({seconds:.0f} s)")
  return out, compiled_steps


def head_costs(size: str, batch: int) -> dict[str, dict]:
  """The energy head alone on the prefix output [B, S, W]: pairwise vs naive.

  'fwd' = the [B, B] energies; 'train' = value_and_grad of InfoNCE w.r.t. head params and the
  context (as in joint training).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pipeline.models import energy as energy_lib  # pylint: disable=g-import-not-at-top
  from pipeline.models import gemma  # pylint: disable=g-import-not-at-top

  m = mode_config(size, "joint", batch).model
  width = gemma.get_config(m.paligemma_variant).width
  seq = prefix_len(m)
  dtype = jnp.dtype(m.dtype)

  def make(naive):
    cls = _naive_energy_class() if naive else energy_lib.EnergyModel
    return cls(width, m.energy_act_dim, hidden=m.energy_hidden, heads=m.energy_heads,
               num_layers=m.energy_layers, horizon=m.action_horizon, dtype=dtype,
               rngs=nnx.Rngs(0))

  context = jax.ShapeDtypeStruct((batch, seq, width), dtype)
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
  actions = jax.ShapeDtypeStruct((batch, m.action_horizon, m.action_dim), jnp.float32)
  out = {"context_shape": [batch, seq, width]}
  for naive in (False, True):
    abstract = nnx.eval_shape(lambda n=naive: make(n))
    graphdef, state = nnx.split(abstract)

    def energies(state, context, mask, actions):
      model = nnx.merge(graphdef, state)
      return model.pairwise(context, mask, actions[..., :m.energy_act_dim])

    def loss(state, context, mask, actions):
      return energy_lib.infonce(energies(state, context, mask, actions), m.energy_tau)[0]

    train_fn = jax.value_and_grad(loss, argnums=(0, 1))
    name = "naive" if naive else "pairwise"
    args = (state, context, mask, actions)
    out[name] = {
        kind: compiled_cost(jax.jit(fn).lower(*args).compile(), count_flops(fn, *args))
        for kind, fn in (("fwd", energies), ("train", train_fn))
    }
  return out


# ---------------------------------------------------------------------------------------------
# Timing


def _block(tree):
  return jax.block_until_ready(tree)


def synthetic_state(trainer, seed: int = 0):
  """A train state of the trainer's shapes and shardings: random params, zero optimizer/EMA.

  Built on the host instead of by the model's init function, which would cost one more
  compile of the whole model; step cost and checkpoint size do not depend on the values.
  """
  rng = np.random.default_rng(seed)
  abstract = trainer.abstract_state
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype), abstract.params)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  state = zeros.replace(params=params)
  return jax.device_put(state, trainer.state_shardings)


def _init_for_timing(trainer, seed: int = 0):
  config = trainer.config
  if trainer.parts.rest is None:
    trainer.init_rest(jax.random.key(config.seed))
  state = synthetic_state(trainer, seed)
  batch = jax.device_put(random_batch(config.model, config.batch_size, seed),
                         trainer.batch_sharding)
  return state, batch


def time_train_steps(runs: dict[str, tuple[Any, Any]], steps: int,
                     seed: int = 0) -> dict[str, dict[str, float]]:
  """Times the train steps of several trainers, interleaved, after one warm-up step each.

  runs: {name: (trainer, compiled step or None for trainer.train_step)}. One step of each run
  per round, so that a change of machine load hits every run alike; the median is reported.
  """
  live, out = {}, {}
  for name, (trainer, step_fn) in runs.items():
    state, batch = _init_for_timing(trainer, seed)
    step_fn = step_fn or trainer.train_step
    t0 = time.perf_counter()
    state, metrics = _block(step_fn(state, batch))
    live[name] = [step_fn, state, batch, metrics, []]
    out[name] = {"first_step_s": time.perf_counter() - t0}
  for _ in range(steps):
    for name, run_ in live.items():
      step_fn, state, batch = run_[:3]
      t0 = time.perf_counter()
      state, metrics = _block(step_fn(state, batch))
      run_[4].append(time.perf_counter() - t0)
      run_[1], run_[3] = state, metrics
  for name, (_, _, _, metrics, times) in live.items():
    out[name].update(step_s=statistics.median(times), step_s_min=min(times),
                     loss=float(metrics["loss"]))
  return out


# ---------------------------------------------------------------------------------------------
# Commands


def _ratio(a: float, b: float) -> float:
  return a / b if b else float("nan")


def bench_energy(size: str = "full", batch: int | None = None, time_size: str | None = "mid",
                 time_batch: int | None = None, steps: int = 3,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiled FLOPs / temp memory of the four steps and of the head alone; timed steps."""
  batch = batch or default_batch(size)
  result: dict[str, Any] = {"command": "energy", "device": device_kind(), "size": size,
                            "batch": batch}
  costs, _ = step_costs(size, batch, log=log)
  a, b, c, d = (costs[k]["flops"] for k in MODES)
  result["steps"] = costs
  result["overhead"] = _ratio(b - a, a)
  result["naive_overhead"] = _ratio(c - a, a)
  result["energy_only_over_joint"] = _ratio(d, b)
  result["joint_temp_over_no_head_temp"] = _ratio(costs["joint"]["temp_bytes"],
                                                  costs["no_head"]["temp_bytes"])
  result["naive_temp_over_joint_temp"] = _ratio(costs["naive"]["temp_bytes"],
                                                costs["joint"]["temp_bytes"])
  head = head_costs(size, batch)
  result["head"] = head
  for kind in ("fwd", "train"):
    result[f"head_naive_over_pairwise_temp_{kind}"] = _ratio(
        head["naive"][kind]["temp_bytes"], head["pairwise"][kind]["temp_bytes"])
    result[f"head_naive_over_pairwise_flops_{kind}"] = _ratio(
        head["naive"][kind]["flops"], head["pairwise"][kind]["flops"])
  # The head's own training cost as a share of the step without it: explains `overhead`.
  result["head_train_flops_over_no_head_step"] = _ratio(head["pairwise"]["train"]["flops"], a)
  result["targets"] = {
      "overhead_le_1pct": result["overhead"] <= 0.01,
      "energy_only_le_0.4x_joint": result["energy_only_over_joint"] <= 0.4,
      "head_temp_ge_10x_below_naive": result["head_naive_over_pairwise_temp_train"] >= 10,
  }
  if time_size:
    time_batch = time_batch or default_batch(time_size)
    runs = {mode: compiled_step(time_size, mode, time_batch)[:2]
            for mode in ("no_head", "joint", "naive")}
    timed = time_train_steps(runs, steps)
    for mode, t in timed.items():
      log(f"  timed {mode} at size={time_size} batch={time_batch}: "
          f"{t['step_s'] * 1e3:.1f} ms/step")
    result["timed"] = {"size": time_size, "batch": time_batch, "steps": steps, **timed}
    t = {k: timed[k]["step_s"] for k in timed}
    result["timed_overhead"] = _ratio(t["joint"] - t["no_head"], t["no_head"])
    result["timed_naive_overhead"] = _ratio(t["naive"] - t["no_head"], t["no_head"])
  return result


def bench_loader(dataset_dir: str = "", *, size: str = "full", batch: int = 32,
                 num_batches: int = 20, workers: Sequence[int] = (0, 1, 2),
                 episodes: int = 8, source_image_size: int = 256,
                 num_threads: int = 2, prefetch: int = 2, tokenizer_path: str = "",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Full train chain vs decode-only samples/s per worker count (pipeline.data.loader)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from pipeline.data import loader  # pylint: disable=g-import-not-at-top
  from pipeline.data import prepare  # pylint: disable=g-import-not-at-top
  from pipeline.data import synthetic  # pylint: disable=g-import-not-at-top
  from pipeline.data import tokenizer  # pylint: disable=g-import-not-at-top

  tmp = None
  c = common.get_base_config()
  model_size(c, size)
  c.batch_size = batch
  d = c.data
  d.num_threads = num_threads
  d.prefetch = prefetch
  if tokenizer_path:
    d.tokenizer_path = tokenizer_path
  try:
    if not dataset_dir:
      tmp = tempfile.mkdtemp(prefix="bench_loader_")
      src = synthetic.write_lerobot_dataset(os.path.join(tmp, "source"), episodes,
                                            image_size=source_image_size, seed=0)
      dataset_dir = str(prepare.prepare(src, os.path.join(tmp, "prepared"),
                                        action_horizon=c.model.action_horizon))
      d.tokenizer_path = tokenizer_path or tokenizer.SYNTHETIC_TOKENIZER
      c.model.vocab_size = max(c.model.vocab_size, tokenizer.SYNTHETIC_VOCAB_SIZE)
    d.dataset_dir = str(dataset_dir)
    rows = loader.bench_loader(c, num_batches=num_batches, workers=tuple(workers))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  for row in rows:
    row["full_over_decode"] = _ratio(row["full_samples_per_s"], row["decode_samples_per_s"])
    row["host_resize_over_decode"] = _ratio(row["full_host_resize_samples_per_s"],
                                            row["decode_samples_per_s"])
  result = {"command": "loader", "device": device_kind(), "host_cpus": os.cpu_count(),
            "dataset_dir": "synthetic (temp)" if tmp else str(dataset_dir),
            "image_size": c.model.image_size, "source_image_size": source_image_size,
            "batch": batch, "num_batches": num_batches,
            "num_threads": num_threads, "rows": rows,
            "device_resize_ms_per_batch": 1e3 * time_device_resize(
                batch, source_image_size, c.model.image_size)}
  result["targets"] = {"full_ge_0.7x_decode": all(r["full_over_decode"] >= 0.7 for r in rows)}
  return result


def time_device_resize(batch: int, source_size: int, size: int, repeats: int = 5) -> float:
  """Seconds (median) the device takes to fit one batch of two uint8 cameras to the model size."""
  from pipeline.data import transforms  # pylint: disable=g-import-not-at-top
  from pipeline.models import pi0  # pylint: disable=g-import-not-at-top

  images = {k: jnp.zeros((batch, source_size, source_size, 3), jnp.uint8)
            for k, field in transforms.CAMERA_FIELDS.items() if field is not None}
  fit = jax.jit(functools.partial(pi0.fit_images, size=size))
  _block(fit(images))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fit(images))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_checkpoint(size: str = "mid", batch: int | None = None, saves: int = 5,
                     extra_mib: Sequence[float] = (0.0, 256.0, 1024.0),
                     log: Callable[[str], None] = print) -> dict[str, Any]:
  """Time the loop is blocked by `Checkpointer.save` with async saving on vs off (same state).

  Between async saves the pending write is awaited outside the clock, as the loop does useful
  work while it runs (saves are save_every steps apart). One row per `extra_mib` value: the
  train state at `size` plus one float32 array of that many MiB. The async save's blocking
  part has a fixed cost per array (Orbax bookkeeping, device-to-host copies), so the ratio
  falls with the bytes per array; the full Pi0 train state's size is printed for that reason.
  """
  from pipeline import optim  # pylint: disable=g-import-not-at-top

  batch = batch or default_batch(size)
  trainer = make_trainer(size, "joint", batch)
  train_state = _block(synthetic_state(trainer))
  full_state = make_trainer("full", "joint", default_batch("full")).abstract_state
  result: dict[str, Any] = {
      "command": "checkpoint", "device": device_kind(), "size": size, "saves": saves,
      "full_state_mib": optim.state_bytes(full_state) / 2**20,
      "full_state_arrays": len(jax.tree.leaves(full_state)), "rows": []}
  log(f"full Pi0 joint train state: {result['full_state_mib'] / 1024:.1f} GiB in "
      f"{result['full_state_arrays']} arrays")
  for extra in extra_mib:
    state = train_state
    if extra > 0:
      # Random values: Orbax compresses, so a constant array would cost almost nothing to write.
      array = jax.random.normal(jax.random.key(1), (int(extra * 2**20) // 4,), jnp.float32)
      state = {"train_state": train_state, "extra": _block(array)}
    row = {"extra_mib": extra, "state_mib": optim.state_bytes(state) / 2**20,
           "num_arrays": len(jax.tree.leaves(state))}
    log(f"state {row['state_mib']:.1f} MiB in {row['num_arrays']} arrays:")
    row.update(time_saves(state, saves, log))
    row["async_over_sync_blocked"] = _ratio(row["async"]["blocked_s"], row["sync"]["blocked_s"])
    result["rows"].append(row)
    del state
  largest = max(result["rows"], key=lambda r: r["state_mib"])
  result["async_over_sync_blocked"] = largest["async_over_sync_blocked"]
  result["targets"] = {"async_blocks_le_0.1x_sync_at_largest_state":
                       result["async_over_sync_blocked"] <= 0.1}
  return result


def time_saves(state: Any, saves: int, log: Callable[[str], None]) -> dict[str, Any]:
  """Median seconds the caller is blocked by, and the total of, async and sync saves of state."""
  from pipeline import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  out = {}
  tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
  try:
    for async_save in (True, False):
      name = "async" if async_save else "sync"
      ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp, name), save_every=1, max_to_keep=2,
                                         async_save=async_save)
      blocked, total = [], []
      try:
        for step in range(1, saves + 1):
          t0 = time.perf_counter()
          ckpt.save(step, state, force=True)
          blocked.append(time.perf_counter() - t0)
          ckpt.wait_until_finished()
          total.append(time.perf_counter() - t0)
      finally:
        ckpt.close()
      out[name] = {"blocked_s": statistics.median(blocked), "total_s": statistics.median(total),
                   "blocked_all_s": blocked}
      log(f"  {name} save: loop blocked {out[name]['blocked_s'] * 1e3:.1f} ms "
          f"(save done after {out[name]['total_s'] * 1e3:.1f} ms)")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def device_kind() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind} x{jax.device_count()} ({os.cpu_count()} host cpus)"


def peak_tflops(given: float | None) -> float | None:
  if given:
    return float(given)
  kind = jax.devices()[0].device_kind
  for name, value in _PEAK_TFLOPS_BY_KIND.items():
    if kind.startswith(name):
      return value
  return None


def bench_step(size: str = "mid", batch: int | None = None, steps: int = 3,
               peak: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """steps/s, tokens/s, MFU of the joint and energy-only steps on the present device."""
  batch = batch or default_batch(size)
  peak = peak_tflops(peak)
  result: dict[str, Any] = {"command": "step", "device": device_kind(), "size": size,
                            "batch": batch, "peak_tflops": peak}
  for mode in ("joint", "energy_only"):
    trainer, compiled, _, counted = compiled_step(size, mode, batch)
    flops = counted["flops"]
    timed = time_train_steps({mode: (trainer, compiled)}, steps)[mode]
    m = trainer.config.model
    # Tokens through the LLM per example: prefix, plus the suffix (state + actions) when the
    # action expert runs.
    tokens = prefix_len(m) + (0 if mode == "energy_only" else 1 + m.action_horizon)
    row = {"flops": flops, "step_s": timed["step_s"], "steps_per_s": 1.0 / timed["step_s"],
           "tokens_per_s": batch * tokens / timed["step_s"],
           "achieved_tflops": flops / timed["step_s"] / 1e12}
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    result[mode] = row
    mfu = f"{row['mfu']:.1%}" if peak else "n/a"
    log(f"  {mode}: {row['steps_per_s']:.2f} steps/s, {row['tokens_per_s']:.0f} tokens/s, "
        f"{row['achieved_tflops'] * 1e3:.2f} GFLOP/s, MFU {mfu}")
  return result


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def format_table(result: dict[str, Any]) -> str:
  """Human-readable summary of a result dict."""
  cmd = result["command"]
  lines = [f"== bench {cmd} on {result['device']}"]
  if cmd == "energy":
    lines.append(f"train step at size={result['size']} batch={result['batch']} (GFLOPs: "
                 "matmul/conv FLOPs counted from the jaxpr, loops x iterations; temp: compiled "
                 "memory_analysis):")
    lines.append(f"  {'mode':<12} {'GFLOPs':>12} {'temp MiB':>10}   XLA cost_analysis GFLOPs "
                 "(loop bodies counted once)")
    for mode in MODES:
      s = result["steps"][mode]
      lines.append(f"  {mode:<12} {s['flops'] / 1e9:>12.2f} {s['temp_bytes'] / 2**20:>10.1f}   "
                   f"{s['xla_flops_loop_bodies_once'] / 1e9:.2f}")
    lines.append(f"  overhead (b-a)/a            {result['overhead']:.3%}")
    lines.append(f"  naive overhead (c-a)/a      {result['naive_overhead']:.3%}")
    lines.append(f"  energy-only / joint  d/b    {result['energy_only_over_joint']:.3f}")
    h = result["head"]
    lines.append(f"head alone on prefix output {h['context_shape']}:")
    for kind in ("fwd", "train"):
      p, n = h["pairwise"][kind], h["naive"][kind]
      lines.append(f"  {kind:<5} pairwise {p['flops'] / 1e9:.2f} GFLOPs "
                   f"{p['temp_bytes'] / 2**20:.1f} MiB temp | naive {n['flops'] / 1e9:.2f} GFLOPs "
                   f"{n['temp_bytes'] / 2**20:.1f} MiB temp | naive/pairwise temp "
                   f"{result[f'head_naive_over_pairwise_temp_{kind}']:.1f}x")
    lines.append(f"  head train FLOPs / no-head step FLOPs "
                 f"{result['head_train_flops_over_no_head_step']:.3%}")
    uncounted = sum(s["uncounted_while"] for s in result["steps"].values())
    if uncounted:
      lines.append(f"  WARNING: {uncounted} while loops of unknown trip count counted once")
    if "timed" in result:
      t = result["timed"]
      lines.append(f"wall clock at size={t['size']} batch={t['batch']} (median of {t['steps']}):")
      for mode in ("no_head", "joint", "naive"):
        lines.append(f"  {mode:<12} {t[mode]['step_s'] * 1e3:.1f} ms/step")
      lines.append(f"  overhead {result['timed_overhead']:.2%}, naive overhead "
                   f"{result['timed_naive_overhead']:.2%}")
  elif cmd == "loader":
    lines.append(f"batch {result['batch']}, image {result['image_size']} px (source "
                 f"{result['source_image_size']} px); resize and augmentation run on the device")
    for r in result["rows"]:
      lines.append(f"  workers={r['workers']}: full {r['full_samples_per_s']:.1f} samples/s, "
                   f"decode-only {r['decode_samples_per_s']:.1f} samples/s, ratio "
                   f"{r['full_over_decode']:.2f} (resizing on the host: "
                   f"{r['full_host_resize_samples_per_s']:.1f} samples/s, ratio "
                   f"{r['host_resize_over_decode']:.2f})")
    lines.append(f"  device resize of a batch's two cameras: "
                 f"{result['device_resize_ms_per_batch']:.1f} ms on {result['device']}")
  elif cmd == "checkpoint":
    lines.append(f"median of {result['saves']} saves; the full Pi0 joint train state is "
                 f"{result['full_state_mib'] / 1024:.1f} GiB in {result['full_state_arrays']} "
                 f"arrays")
    for r in result["rows"]:
      lines.append(f"  state {r['state_mib']:8.1f} MiB in {r['num_arrays']} arrays: loop blocked "
                   f"async {r['async']['blocked_s'] * 1e3:.1f} ms, sync "
                   f"{r['sync']['blocked_s'] * 1e3:.1f} ms (async save done after "
                   f"{r['async']['total_s'] * 1e3:.1f} ms), async / sync "
                   f"{r['async_over_sync_blocked']:.3f}")
  elif cmd == "step":
    lines.append(f"size={result['size']} batch={result['batch']} peak TFLOP/s="
                 f"{_fmt(result['peak_tflops']) if result['peak_tflops'] else 'n/a'}")
    for mode in ("joint", "energy_only"):
      r = result[mode]
      mfu = f"{r['mfu']:.2%}" if r["mfu"] is not None else "n/a"
      lines.append(f"  {mode:<12} {r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:.0f} "
                   f"tokens/s, {r['flops'] / 1e9:.2f} GFLOPs/step, MFU {mfu}")
  if "targets" in result:
    lines.append("targets: " + ", ".join(f"{k}={'met' if v else 'MISSED'}"
                                         for k, v in result["targets"].items()))
  return "\n".join(lines)


def run(command: str, **kwargs) -> dict[str, Any]:
  """Runs one benchmark command in-process; returns its JSON-serializable result."""
  fns = {"energy": bench_energy, "loader": bench_loader, "checkpoint": bench_checkpoint,
         "step": bench_step}
  if command not in fns:
    raise ValueError(f"unknown bench command {command!r}; expected one of {COMMANDS}")
  result = fns[command](**kwargs)
  json.dumps(result)  # fails here, not in the caller, if something is not serializable
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m pipeline.bench {{{'|'.join(COMMANDS)}}} [--json]")
  command = argv[1]
  logging.set_verbosity(logging.WARNING)  # the trainer logs every param's sharding at INFO
  log = (lambda s: print(s, file=sys.stderr)) if _JSON.value else print
  if command == "energy":
    kwargs = dict(size=_SIZE.value or "full", batch=_BATCH.value, time_size=_TIME_SIZE.value,
                  time_batch=_TIME_BATCH.value, steps=_STEPS.value, log=log)
  elif command == "loader":
    size = _SIZE.value or "full"
    kwargs = dict(dataset_dir=_DATASET_DIR.value, size=size,
                  batch=_BATCH.value or default_batch(size), num_batches=_BATCHES.value,
                  workers=[int(w) for w in _WORKERS.value], episodes=_EPISODES.value,
                  source_image_size=_SOURCE_IMAGE_SIZE.value,
                  tokenizer_path=_TOKENIZER.value, log=log)
  elif command == "checkpoint":
    kwargs = dict(size=_SIZE.value or "mid", batch=_BATCH.value, saves=_SAVES.value,
                  extra_mib=[float(x) for x in _EXTRA_MIB.value], log=log)
  else:
    kwargs = dict(size=_SIZE.value or "mid", batch=_BATCH.value, steps=_STEPS.value,
                  peak=_PEAK_TFLOPS.value, log=log)
  if _JSON.value:
    # Library code prints progress (e.g. loader.bench_loader); keep stdout one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
      result = run(command, **kwargs)
  else:
    result = run(command, **kwargs)
  if _JSON.value:
    print(json.dumps(result))
  else:
    print(format_table(result))


if __name__ == "__main__":
  app.run(main)
