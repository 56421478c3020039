"""Norm stats: reading, (un)normalizing, delta <-> absolute actions, computing, sanity checks.

openpi's pi0_libero recipe: actions[:, :n] -= state[:n] (n = 6, the gripper stays absolute), then
z-score with stats computed the same way (after the delta, over every frame's whole action chunk).
Actions leave the model normalized, as deltas, padded to the model's action_dim;
`absolute_actions` undoes all three.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

NORMALIZATIONS = ("zscore", "quantile")
NORM_EPS = 1e-6

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Reading


def read_text(path: str) -> str:
  if "://" not in path:
    with open(path) as f:
      return f.read()
  from etils import epath  # Only remote paths need it.
  return epath.Path(path).read_text()


def resolve_norm_stats_path(path: str) -> str:
  """A norm stats file, or a directory holding exactly one norm_stats.json (e.g. assets/)."""
  from etils import epath
  root = epath.Path(path)
  if path.endswith(".json") or root.is_file():
    return path
  if not root.exists():
    raise FileNotFoundError(f"norm stats path {path!r} does not exist")
  direct = root / "norm_stats.json"
  if direct.exists():
    return str(direct)
  # Bounded depth instead of "**": openpi keeps <step>/assets/<org>/<name>/norm_stats.json, and
  # recursive globs on GCS are slow.
  found = sorted({str(p) for depth in range(1, 5)
                  for p in root.glob("/".join(["*"] * depth) + "/norm_stats.json")})
  if len(found) != 1:
    raise FileNotFoundError(f"expected one norm_stats.json under {path!r}, found {found or 'none'}")
  return found[0]


def read_norm_stats_json(path: str) -> dict:
  """The raw openpi-format JSON ({"norm_stats": {...}}) of a norm stats file or directory."""
  path = resolve_norm_stats_path(path)
  try:
    raw = json.loads(read_text(path))
  except Exception as e:
    raise ValueError(f"cannot read norm stats {path!r}: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"norm stats {path!r}: expected a JSON object")
  return raw if "norm_stats" in raw else {"norm_stats": raw}


def load_norm_stats(path: str) -> dict[str, dict[str, np.ndarray | None]]:
  """Reads openpi-format norm stats: {"norm_stats": {key: {mean, std, q01, q99}}}."""
  stats = read_norm_stats_json(path)["norm_stats"]
  if not isinstance(stats, dict):
    raise ValueError(f"norm stats {path!r}: expected a map under 'norm_stats'")
  out = {}
  for key, entry in stats.items():
    if not isinstance(entry, dict) or entry.get("mean") is None or entry.get("std") is None:
      raise ValueError(f"norm stats {path!r}: entry {key!r} needs 'mean' and 'std'")
    out[key] = {name: None if entry.get(name) is None else np.asarray(entry[name], np.float32)
                for name in ("mean", "std", "q01", "q99")}
  return out


# ----------------------------------------------------------------------------------------------
# (Un)normalizing


def _check_mode(mode: str) -> None:
  if mode not in NORMALIZATIONS:
    raise ValueError(f"config.data.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def _quantiles(stats, key: str, d: int):
  q01, q99 = stats["q01"], stats["q99"]
  if q01 is None or q99 is None:
    raise ValueError(f"norm stats {key!r} lack q01/q99, needed by "
                     "config.data.normalization='quantile'")
  if q01.shape[-1] < d:
    raise ValueError(f"norm stats {key!r} have {q01.shape[-1]} dims, data has {d}")
  return q01[..., :d], q99[..., :d]


def normalize(x: np.ndarray, stats: dict[str, np.ndarray | None], mode: str, *,
              key: str = "") -> np.ndarray:
  """Normalizes the last axis of x with the first x.shape[-1] entries of the stats."""
  _check_mode(mode)
  d = x.shape[-1]
  if mode == "zscore":
    mean, std = stats["mean"], stats["std"]
    if mean.shape[-1] < d:
      raise ValueError(f"norm stats {key!r} have {mean.shape[-1]} dims, data has {d}")
    return ((x - mean[..., :d]) / (std[..., :d] + NORM_EPS)).astype(np.float32)
  q01, q99 = _quantiles(stats, key, d)
  return ((x - q01) / (q99 - q01 + NORM_EPS) * 2 - 1).astype(np.float32)


def unnormalize(x: np.ndarray, stats: dict[str, np.ndarray | None], mode: str, *,
                key: str = "") -> np.ndarray:
  """Inverse of normalize on the first len(stats) dims of the last axis; extra dims pass through."""
  _check_mode(mode)
  x = np.asarray(x, np.float32)
  d = min(x.shape[-1], stats["mean"].shape[-1])
  out = x.copy()
  if mode == "zscore":
    out[..., :d] = x[..., :d] * (stats["std"][:d] + NORM_EPS) + stats["mean"][:d]
  else:
    q01, q99 = _quantiles(stats, key, d)
    out[..., :d] = (x[..., :d] + 1) / 2 * (q99 - q01 + NORM_EPS) + q01
  return out


def absolute_actions(actions: np.ndarray, state: np.ndarray, norm_stats: dict, *,
                     normalization: str = "zscore", delta_action_dims: int = 0,
                     act_dim: int | None = None) -> np.ndarray:
  """Model actions -> the robot's: unnormalized, absolute again, cut to the real action dims.

  Args:
    actions: [..., H, D] as the model samples them (normalized, delta, zero-padded to D).
    state: [..., S] the RAW (unnormalized) state the actions were sampled for.
    norm_stats: load_norm_stats output (uses "actions").
    normalization, delta_action_dims: the run's config.data fields.
    act_dim: dims kept (openpi's LiberoOutputs keeps 7); default: the action stats' dims.
  Returns:
    float32 [..., H, act_dim].
  """
  stats = norm_stats["actions"]
  act_dim = int(stats["mean"].shape[-1] if act_dim is None else act_dim)
  actions = np.asarray(actions, np.float32)
  if act_dim > min(actions.shape[-1], stats["mean"].shape[-1]):
    raise ValueError(f"act_dim={act_dim} exceeds the action dims ({actions.shape[-1]}) or the "
                     f"action norm stats ({stats['mean'].shape[-1]})")
  out = unnormalize(actions, stats, normalization, key="actions")[..., :act_dim]
  n = int(delta_action_dims)
  if n:
    state = np.asarray(state, np.float32)
    if n > min(state.shape[-1], act_dim):
      raise ValueError(f"delta_action_dims={n} exceeds the state ({state.shape[-1]}) or action "
                       f"({act_dim}) dims")
    out[..., :n] += state[..., None, :n]
  return out


# ----------------------------------------------------------------------------------------------
# Computing (prepare)


def _stats(x: np.ndarray) -> dict[str, Any]:
  """mean, std (population), q01, q99 over axis 0, in float64 (quantiles exact, interpolated)."""
  x = np.asarray(x, np.float64)
  q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
  return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "q01": q01.tolist(),
          "q99": q99.tolist()}


def chunk_norm_stats(states: list[np.ndarray], actions: list[np.ndarray], horizon: int,
                     delta_action_dims: int = 0) -> dict:
  """openpi-format stats of per-episode states [T, S] and actions [T, A].

  State: one row per frame. Actions: as openpi's compute_norm_stats sees them, every frame's whole
  chunk (actions t..t+H-1, the last one repeated past the episode end), with the first
  `delta_action_dims` dims relative to that frame's state. Computed one action dim at a time, so
  memory holds one column of all chunks (T x H values), not all of them.
  """
  n = int(delta_action_dims)
  dims = actions[0].shape[1]
  if n > min(dims, states[0].shape[1]):
    raise ValueError(f"delta_action_dims={n} exceeds the state ({states[0].shape[1]}) or action "
                     f"({dims}) dims")
  steps = [np.minimum(np.arange(len(a))[:, None] + np.arange(horizon)[None, :], len(a) - 1)
           for a in actions]
  columns = []
  for d in range(dims):
    parts = []
    for s, a, idx in zip(states, actions, steps):
      col = a[idx, d].astype(np.float64)  # [T, H]
      if d < n:
        col = col - s[:, d:d + 1]
      parts.append(col.ravel())
    columns.append(_stats(np.concatenate(parts)[:, None]))
  action_stats = {k: [c[k][0] for c in columns] for k in ("mean", "std", "q01", "q99")}
  return {"norm_stats": {"state": _stats(np.concatenate(states)), "actions": action_stats}}


# ----------------------------------------------------------------------------------------------
# Checking a run's first batches


class StandardizationCheck:
  """Warns when a run's first normalized batches are far from standardized.

  Wrong or mismatched norm stats (e.g. stats of raw actions used with delta actions) show up as
  per-dimension means or spreads far from those of normalized data. Dimensions that are constant in
  the sample (and centred) carry nothing to check.
  """

  # Per normalization: (max |mean|, (min std, max std)) of a dimension over the sample.
  BOUNDS = {"zscore": (0.5, (0.5, 2.0)), "quantile": (0.5, (0.1, 1.0))}

  def __init__(self, norm_stats: dict, path: str, normalization: str, num_batches: int = 4):
    _check_mode(normalization)
    self.path = path
    self.normalization = normalization
    self.dims = {k: int(norm_stats[k]["mean"].shape[-1]) for k in ("state", "actions")}
    self.num_batches = num_batches
    self._seen: dict[str, list[np.ndarray]] = {"state": [], "actions": []}

  def add(self, batch: dict[str, Any]) -> bool:
    """Takes one host batch; returns True once the sample is complete (and checked)."""
    for key, x in self._seen.items():
      x.append(np.asarray(batch[key], np.float32).reshape(-1, np.shape(batch[key])[-1]))
    if len(self._seen["state"]) < self.num_batches:
      return False
    self.check()
    return True

  def problems(self) -> list[str]:
    max_mean, (lo, hi) = self.BOUNDS[self.normalization]
    out = []
    for key, parts in self._seen.items():
      if not parts:
        continue
      x = np.concatenate(parts)[:, :self.dims[key]].astype(np.float64)
      mean, std = x.mean(0), x.std(0)
      for d in range(x.shape[1]):
        if std[d] < 1e-6 and abs(mean[d]) <= max_mean:
          continue  # constant in the sample
        if abs(mean[d]) > max_mean or not lo <= std[d] <= hi:
          out.append(f"{key} dim {d}: mean {mean[d]:+.3f}, std {std[d]:.3f}")
    return out

  def check(self) -> list[str]:
    found = self.problems()
    if found:
      max_mean, (lo, hi) = self.BOUNDS[self.normalization]
      _log.warning(
          "normalized data far from standardized with the norm stats %s (%s normalization; "
          "expected |mean| <= %g and std in [%g, %g] per dimension over the first %d batches):\n"
          "  %s\nThe stats may not match this data or its action recipe "
          "(config.data.delta_action_dims, config.data.norm_stats_path).", self.path,
          self.normalization, max_mean, lo, hi, len(self._seen["state"]), "\n  ".join(found))
    return found

