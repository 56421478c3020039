"""Mesh construction, FSDP partition rules and batch sharding.

Mesh axes are ('data', 'fsdp') with AxisType.Auto (GSPMD propagation; explicit axes reject the
FSDP-kernel x data-batch products). The global batch is split over both axes on dim 0.

Parameters get shardings from ordered rules `(regex, tactic)` matched with re.fullmatch on the
'/'-joined parameter path, first match wins. Tactics:
  'fsdp'       shard the largest dim divisible by the fsdp size; replicate small (< min_size) or
               ndim < 2 arrays, and arrays with no divisible dim.
  'replicate'  replicate.
  tuple        an explicit PartitionSpec, e.g. (None, 'fsdp').
Optimizer state and EMA leaves take the sharding of the parameter they mirror (same path suffix and
shape); anything else (counters, step, rng) is replicated.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
FSDP = "fsdp"


def make_mesh(fsdp: int = -1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh (data, fsdp): fsdp = size or -1 for all devices, data = the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = n if fsdp == -1 else int(fsdp)
  if fsdp < 1 or n % fsdp:
    raise ValueError(
        f"config.mesh.fsdp={fsdp} must be -1 or a positive divisor of the device count {n}")
  shape = (n // fsdp, fsdp)
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    return jax.make_mesh(shape, DATA_AXES, axis_types=(AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(shape), DATA_AXES,
              axis_types=(AxisType.Auto,) * 2)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(
        f"config.batch_size={global_batch} is not divisible by the data-parallel size {dp} "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  return "/".join(key_str(k) for k in path)


def _fsdp_spec(name: str, shape: tuple[int, ...], itemsize: int, fsdp_size: int,
               min_size_bytes: float) -> P:
  if fsdp_size == 1 or len(shape) < 2 or np.prod(shape) * itemsize < min_size_bytes:
    return P()
  # Largest dim first; among equal sizes the earlier dim.
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP
      return P(*spec)
  logging.warning("sharding: no dim of %s %s divisible by fsdp=%d; replicated",
                  name, shape, fsdp_size)
  return P()


def _explicit_spec(name: str, shape: tuple[int, ...], tactic: Sequence[Any], mesh: Mesh) -> P:
  if len(tactic) > len(shape):
    raise ValueError(f"sharding rule {tuple(tactic)} has more dims than param {name} {shape}")
  for dim, axes in enumerate(tactic):
    if axes is None:
      continue
    axes_t = axes if isinstance(axes, (tuple, list)) else (axes,)
    for a in axes_t:
      if a not in mesh.shape:
        raise ValueError(f"sharding rule for {name} names unknown mesh axis {a!r}")
    size = int(np.prod([mesh.shape[a] for a in axes_t]))
    if shape[dim] % size:
      raise ValueError(
          f"sharding rule {tuple(tactic)} for {name}: dim {dim} of size {shape[dim]} is not "
          f"divisible by mesh size {size}")
  return P(*[tuple(a) if isinstance(a, list) else a for a in tactic])


def param_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                min_size_mib: float = 4.0) -> Any:
  """PartitionSpec per leaf of a (pure-dict) param tree, from ordered rules."""
  compiled = [(re.compile(r), t) for r, t in rules]
  fsdp_size = mesh.shape[FSDP]
  min_bytes = min_size_mib * 2**20

  def spec(path, x):
    name = path_str(path)
    shape = tuple(x.shape)
    for regex, tactic in compiled:
      if regex.fullmatch(name):
        break
    else:
      raise ValueError(f"no sharding rule matches param {name}; add a catch-all ('.*', 'fsdp')")
    if tactic == "fsdp":
      return _fsdp_spec(name, shape, np.dtype(x.dtype).itemsize, fsdp_size, min_bytes)
    if tactic == "replicate":
      return P()
    if isinstance(tactic, (tuple, list)):
      return _explicit_spec(name, shape, tactic, mesh)
    raise ValueError(f"unknown sharding tactic {tactic!r} for param {name}")

  return jax.tree_util.tree_map_with_path(spec, params)


def follow_params(tree: Any, params: Any, specs: Any) -> Any:
  """Specs for a tree whose leaves mirror params (opt state, EMA): matched by path suffix+shape."""
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(specs, is_leaf=lambda v: isinstance(v, P))):
    by_path[tuple(key_str(k) for k in path)] = (tuple(x.shape), s)

  def spec(path, x):
    keys = tuple(key_str(k) for k in path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == tuple(np.shape(x)):
        return hit[1]
    return P()

  return jax.tree_util.tree_map_with_path(spec, tree)


def to_named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda v: isinstance(v, P))


def describe(params: Any, specs: Any) -> str:
  """One line per param: path, shape, spec (for the startup log)."""
  lines = []
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree_util.tree_leaves(specs, is_leaf=lambda v: isinstance(v, P))):
    lines.append(f"  {path_str(path)} {tuple(x.shape)} {s}")
  return "\n".join(lines)
