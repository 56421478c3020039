"""Schedules, the optimizer, the trainable/frozen label tree and EMA.

Which parameters train comes from config.optim: a parameter ('/'-joined pure-dict path,
re.fullmatch) is trainable iff it matches a regex in `trainable` and none in `frozen`. E.g.
energy_only sets trainable=('energy/.*',); freezing the vision tower alone would be
frozen=('PaliGemma/img/.*',).

The optimizer is an optax.multi_transform over the full param tree with `set_to_zero` for the
'frozen' label, so frozen params hold no optimizer state. The train step differentiates only the
trainable subtree (`split`), so no frozen gradient is ever computed; frozen leaves are fed to the
optimizer as zeros whose (discarded) updates XLA removes.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

TRAINABLE = "trainable"
FROZEN = "frozen"


def _path(keys: tuple[Any, ...]) -> str:
  return "/".join(str(k) for k in keys)


def trainable_mask(params: dict, trainable: Sequence[str], frozen: Sequence[str] = ()) -> dict:
  """Bool tree: True where the parameter trains."""
  trainable_re = [re.compile(r) for r in trainable]
  frozen_re = [re.compile(r) for r in frozen]
  flat = traverse_util.flatten_dict(params)
  mask = {}
  for keys in flat:
    name = _path(keys)
    mask[keys] = (any(r.fullmatch(name) for r in trainable_re)
                  and not any(r.fullmatch(name) for r in frozen_re))
  if flat and not any(mask.values()):
    raise ValueError(f"optim.trainable={tuple(trainable)} / optim.frozen={tuple(frozen)} leave "
                     "no trainable parameter")
  return traverse_util.unflatten_dict(mask)


def labels(mask: dict) -> dict:
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def split(params: dict, mask: dict) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding disjoint leaves of params."""
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  if set(flat) != set(flat_mask):
    raise ValueError("param tree and trainable mask differ: "
                     f"{sorted(_path(k) for k in set(flat) ^ set(flat_mask))[:5]}")
  tr = {k: v for k, v in flat.items() if flat_mask[k]}
  fr = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(tr), traverse_util.unflatten_dict(fr)


def merge(a: dict, b: dict) -> dict:
  """Union of two nested dicts with disjoint leaves."""
  flat = traverse_util.flatten_dict(a)
  for k, v in traverse_util.flatten_dict(b).items():
    if k in flat:
      raise ValueError(f"merge: leaf {_path(k)} present in both trees")
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def make_schedule(cfg) -> optax.Schedule:
  if cfg.schedule == "warmup_cosine":
    # openpi CosineDecaySchedule: starts at peak/(warmup+1), decay_steps includes warmup.
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.peak_lr / (cfg.warmup_steps + 1), peak_value=cfg.peak_lr,
        warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps, end_value=cfg.end_lr)
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.peak_lr)
  raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected 'warmup_cosine' or "
                   "'constant'")


def make_optimizer(cfg, label_tree: dict,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm + AdamW on 'trainable', set_to_zero (no state) on 'frozen'."""
  schedule = schedule or make_schedule(cfg)
  trainable_tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.multi_transform(
      {TRAINABLE: trainable_tx, FROZEN: optax.set_to_zero()}, label_tree)


def applied_updates(opt_state: Any) -> jax.Array:
  """Updates the optimizer has applied: the step its learning-rate schedule is at.

  A skipped (non-finite) step keeps the optimizer state, so this lags the number of batches
  consumed by the number of skipped steps.
  """
  return optax.tree_utils.tree_get(
      opt_state, "count",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState")


def ema_update(ema: Any, new: Any, decay: float) -> Any:
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, new)


def zeros_like_tree(tree: Any) -> Any:
  return jax.tree.map(jnp.zeros_like, tree)


def num_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def state_bytes(tree: Any) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
