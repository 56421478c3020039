"""Reader for openpi's on-disk params checkpoints (Orbax PyTree / OCDBT).

openpi saves `{"params": <nnx pure state>}` with a PyTreeCheckpointHandler;
each leaf of an nnx state serialises with a trailing `value` key, so arrays
sit at `params/<path>/value`. This module restores such a tree straight into
the requested shardings and dtype (no host copy of the whole model) and
returns a plain nested dict keyed like `nnx.state(model).to_pure_dict()`.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_SEP = '/'


def _resolve_dir(path) -> epath.Path:
  """Accepts the params item dir or a step dir that contains `params/`."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'openpi checkpoint not found: {path}')
  if not (path / '_METADATA').exists() and (path / 'params' /
                                            '_METADATA').exists():
    path = path / 'params'
  if not (path / '_METADATA').exists():
    raise FileNotFoundError(
        f'{path} is not an Orbax PyTree checkpoint (no _METADATA); pass the '
        "checkpoint's params directory (e.g. <ckpt>/<step>/params).")
  return path


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
  else:
    out[prefix] = tree
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for keys, value in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def _read_metadata(path: epath.Path) -> dict:
  """Nested dict of ArrayMetadata as stored (including `params`/`value`)."""
  # The handler reads the item alone (the Checkpointer also looks for step metadata, and warns
  # inside our steps' items).
  md = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
  # orbax >= 0.12 wraps the tree in StepMetadata / TreeMetadata.
  md = getattr(md, 'item_metadata', md)
  md = getattr(md, 'tree', md)
  if not isinstance(md, Mapping):
    raise ValueError(f'Unexpected checkpoint metadata in {path}: '
                     f'{type(md).__name__}')
  return dict(md)


def _stored_layout(path: epath.Path, prefix: Optional[str] = None):
  """Maps pure param path -> (stored key tuple, shape, dtype).

  prefix: read only the subtree under this top-level key (e.g. 'params' or 'ema' of one of our
  train states); None: the whole tree, minus openpi's top-level "params" key.
  """
  tree = _read_metadata(path)
  flat = {k: v for k, v in _flatten(tree).items()
          if v is not None and (prefix is None or k[0] == prefix)}
  if not flat:
    raise ValueError(f'checkpoint {path} holds no arrays'
                     + (f' under {prefix!r}.' if prefix else '.'))
  # openpi nests everything under a top-level "params" key.
  drop_first = prefix is not None or all(k[0] == 'params' for k in flat)
  drop_value = all(k[-1] == 'value' for k in flat)
  layout = {}
  for stored, meta in flat.items():
    key = stored[1 if drop_first else 0:]
    if drop_value:
      key = key[:-1]
    layout[_SEP.join(map(str, key))] = (stored, tuple(meta.shape),
                                        np.dtype(meta.dtype))
  return layout


def stored_layout(path, prefix: Optional[str] = None):
  """Public `_stored_layout` of a checkpoint dir: pure path -> (stored key, shape, dtype)."""
  return _stored_layout(_resolve_dir(path), prefix)


def checkpoint_param_shapes(path) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
  """'/'-joined parameter path -> (shape, stored dtype), reading metadata."""
  layout = _stored_layout(_resolve_dir(path))
  return {k: (shape, dtype) for k, (_, shape, dtype) in layout.items()}


def _default_sharding():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('x',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def restore_openpi_params(path, *, target: Optional[Mapping] = None,
                          dtype=None, missing_ok: Optional[str] = None,
                          allow_extra: bool = False) -> dict:
  """Restores openpi params into the shardings/dtypes of `target`.

  Args:
    path: params directory (`<ckpt>/<step>/params`) or the step directory,
      local or `gs://`.
    target: nested pure dict (like `nnx.state(model).to_pure_dict()`) of
      jax.ShapeDtypeStruct / arrays; each leaf's `.sharding` (if any) is the
      placement of the restored array. None restores every stored array,
      replicated over all devices.
    dtype: cast to this dtype while restoring; default: the target leaf's
      dtype (or the stored dtype without a target).
    missing_ok: regex; target parameters whose path matches it may be absent
      from the checkpoint (e.g. '^energy/'). They are left out of the result.
    allow_extra: ignore checkpoint parameters absent from target instead of
      raising.

  Returns:
    Nested dict of jax.Array with the restored parameters (pure-dict paths).

  Raises:
    FileNotFoundError: no checkpoint at path.
    ValueError: naming every missing, unexpected or mis-shaped parameter.
  """
  ckpt_dir = _resolve_dir(path)
  layout = _stored_layout(ckpt_dir)

  if target is None:
    wanted = {k: None for k in layout}
    out_keys = {k: tuple(k.split(_SEP)) for k in layout}
  else:
    flat_target = _flatten(target)
    # Keep the target's own key objects (e.g. int list indices) in the output.
    out_keys = {_SEP.join(map(str, k)): k for k in flat_target}
    wanted = {_SEP.join(map(str, k)): v for k, v in flat_target.items()}
    missing = sorted(k for k in wanted if k not in layout and not (
        missing_ok and re.search(missing_ok, k)))
    extra = sorted(k for k in layout if k not in wanted)
    mismatched = [
        f'{k}: checkpoint {layout[k][1]} vs model {tuple(wanted[k].shape)}'
        for k in sorted(wanted) if k in layout and
        tuple(layout[k][1]) != tuple(wanted[k].shape)]
    problems = []
    if missing:
      problems.append('missing from the checkpoint: ' + ', '.join(missing))
    if extra and not allow_extra:
      problems.append('in the checkpoint but not in the model: ' +
                      ', '.join(extra))
    if mismatched:
      problems.append('shape mismatch: ' + '; '.join(mismatched))
    if problems:
      raise ValueError(f'openpi checkpoint {ckpt_dir} does not match the '
                       'model parameters:\n  ' + '\n  '.join(problems))
    wanted = {k: v for k, v in wanted.items() if k in layout}

  return restore_layout(ckpt_dir, layout, wanted, out_keys, dtype=dtype)


def restore_layout(path, layout: Mapping[str, Tuple], wanted: Mapping[str, Any],
                   out_keys: Optional[Mapping[str, Tuple]] = None, *, dtype=None,
                   restore_type=jax.Array) -> dict:
  """Reads the `wanted` params (pure path -> target leaf or None) of a checkpoint.

  layout: `stored_layout` of the checkpoint, possibly merged from several subtrees (the stored
  key each pure path reads from). Each array is cast to `dtype`, else to its target leaf's
  dtype, else kept as stored, and placed in the target leaf's `.sharding` (replicated without
  one); restore_type=np.ndarray reads host arrays instead. Returns a nested dict keyed by
  `out_keys[path]` (default: the path split at '/').
  """
  ckpt_dir = _resolve_dir(path)
  default_sharding = None
  item, restore_args = {}, {}
  for key, leaf in wanted.items():
    stored, shape, stored_dtype = layout[key]
    sharding = getattr(leaf, 'sharding', None)
    if sharding is None and restore_type is jax.Array:
      if default_sharding is None:
        default_sharding = _default_sharding()
      sharding = default_sharding
    leaf_dtype = dtype or (leaf.dtype if leaf is not None else stored_dtype)
    item[stored] = jax.ShapeDtypeStruct(shape, stored_dtype)
    if restore_type is jax.Array:
      restore_args[stored] = ocp.ArrayRestoreArgs(
          restore_type=jax.Array, sharding=sharding, dtype=leaf_dtype,
          global_shape=shape)
    else:
      restore_args[stored] = ocp.RestoreArgs(restore_type=np.ndarray,
                                             dtype=leaf_dtype)
  # Partial: the item names what to read; anything else stored stays on disk.
  restored = ocp.PyTreeCheckpointer().restore(
      ckpt_dir,
      args=ocp.args.PyTreeRestore(item=_unflatten(item),
                                  restore_args=_unflatten(restore_args),
                                  partial_restore=True))
  flat = _flatten(restored)
  out = {}
  for key in wanted:
    value = flat[layout[key][0]]
    out[out_keys[key] if out_keys else tuple(key.split(_SEP))] = value
  return _unflatten(out)
