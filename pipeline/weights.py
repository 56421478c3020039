"""Where a Pi0's weights and norm stats come from, and loading them into the model's shardings.

Weights are named (config.init.weights, init.energy_weights, pipeline.export, evaluation, the
policy server) by one of
  an openpi params dir   <dir>/_METADATA: an openpi checkpoint's params/ (local or gs://), or
                         pipeline.export's D/params; or the dir above it (<dir>/params/_METADATA).
                         Norm stats: <dir>/../assets/<asset_id>/norm_stats.json, as openpi lays
                         them out.
  one of our steps       <workdir>/checkpoints/<step> (or its state/ item). Params from the train
                         state, its EMA where kept and asked for (EMA covers the trainable params
                         of that run; the rest are its params); norm stats and config: the step's
                         own items.
  one of our workdirs    <workdir>/checkpoints/<step>...: its latest complete step.
The data must be normalized as the weights were trained: `norm_stats_path` picks that file, and
`check_recipe` refuses a run whose delta / normalization differ from those of our checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import orbax.checkpoint as ocp

from pipeline.data import normalization
from pipeline.data.prepared import NORM_STATS

OPENPI = "openpi"
OURS = "ours"
DEFAULT_ASSET_ID = "physical-intelligence/libero"
# The file Orbax's JsonCheckpointHandler writes inside a JSON item of a step.
JSON_ITEM_FILE = "metadata"
# The data fields that fix the space the model's actions and states live in.
RECIPE_FIELDS = ("delta_action_dims", "normalization")


@dataclasses.dataclass(frozen=True)
class WeightsSource:
  """One resolved weights location (see the module docstring)."""
  kind: str  # OPENPI | OURS
  path: str  # OPENPI: the params dir; OURS: the step dir
  given: str  # the path as named by the user
  step: int | None = None  # OURS: the checkpoint step
  norm_stats_path: str | None = None  # the stats these weights were trained with; None: none found
  norm_stats_looked_for: str = ""
  config: dict | None = None  # OURS: the config of the run that saved the step

  @property
  def arrays_dir(self) -> str:
    """The Orbax PyTree checkpoint holding the arrays."""
    return os.path.join(self.path, "state") if self.kind == OURS else self.path

  def describe(self) -> str:
    if self.kind == OURS:
      return f"our checkpoint step {self.step} ({self.path})"
    return f"openpi-layout params {self.path}"


def _is_step(path: epath.Path) -> bool:
  return (path / "state" / "_METADATA").exists()


def _read_json_item(step_dir: epath.Path, name: str) -> dict | None:
  path = step_dir / name / JSON_ITEM_FILE
  return json.loads(path.read_text()) if path.exists() else None


def latest_step(workdir: str) -> int | None:
  """The latest complete checkpoint step of one of our workdirs (None: no checkpoint)."""
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    return None
  steps = [s for s in ocp.path.step.checkpoint_steps(ckpt_dir) if _is_step(ckpt_dir / str(s))]
  return max(steps) if steps else None


def _ours(step_dir: epath.Path, given: str) -> WeightsSource:
  stats = step_dir / "norm_stats" / JSON_ITEM_FILE
  return WeightsSource(
      kind=OURS, path=str(step_dir), given=given, step=int(step_dir.name),
      norm_stats_path=str(stats) if stats.exists() else None, norm_stats_looked_for=str(stats),
      config=_read_json_item(step_dir, "config"))


def resolve(path: str, *, asset_id: str = DEFAULT_ASSET_ID,
            field: str = "config.init.weights") -> WeightsSource:
  """What `path` names: an openpi params dir, one of our steps, or one of our workdirs.

  Raises:
    FileNotFoundError: naming the path and what was looked for.
  """
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"{field}={path!r} does not exist")
  if root.name == "state" and _is_step(root.parent):
    root = root.parent
  if _is_step(root):
    return _ours(root, path)
  if (root / "checkpoints").is_dir():
    step = latest_step(str(root))
    if step is None:
      raise FileNotFoundError(f"{field}={path!r} is a workdir without a complete checkpoint step "
                              f"in {root / 'checkpoints'} (looked for <step>/state/_METADATA)")
    return _ours(root / "checkpoints" / str(step), path)
  for params in (root, root / "params"):
    if (params / "_METADATA").exists():
      stats = params.parent / "assets" / asset_id / NORM_STATS
      return WeightsSource(kind=OPENPI, path=str(params), given=path,
                           norm_stats_path=str(stats) if stats.exists() else None,
                           norm_stats_looked_for=str(stats))
  raise FileNotFoundError(
      f"{field}={path!r} is not a weights location; looked for an openpi params dir "
      f"({root}/_METADATA or {root}/params/_METADATA), one of our checkpoint steps "
      f"({root}/state/_METADATA) and one of our workdirs ({root}/checkpoints/<step>)")


def check_recipe(source: WeightsSource, config) -> None:
  """Raises when our checkpoint was trained on another action/state space than config's."""
  saved = ((source.config or {}).get("data") or {})
  wrong = [f"config.data.{k}={saved[k]!r} (this run: {config.data[k]!r})"
           for k in RECIPE_FIELDS if k in saved and saved[k] != config.data[k]]
  if wrong:
    raise ValueError(f"{source.describe()} was trained with {', '.join(wrong)}; its actions live "
                     "in that space. Rerun with the same values (--config.data.<field>=...).")


# ---------------------------------------------------------------------------------------------
# Norm stats of a run


def norm_stats_path(config, workdir: str | None = None) -> str:
  """The norm stats file a run normalizes with (config.data.norm_stats_path, see configs/common).

  '' resolves to: the latest checkpoint of `workdir` (what this run trained with, when resuming
  or evaluating), else init.weights' stats, else the dataset's.

  Raises:
    FileNotFoundError: init.weights has no norm stats; names where they were looked for.
    ValueError: the run in `workdir` was trained with another action recipe (check_recipe).
  """
  d = config.data
  if d.norm_stats_path == "dataset":
    return os.path.join(d.dataset_dir, NORM_STATS)
  if d.norm_stats_path:
    return d.norm_stats_path
  step = latest_step(workdir) if workdir else None
  if step is not None:
    own = _ours(epath.Path(workdir) / "checkpoints" / str(step), workdir)
    check_recipe(own, config)  # resuming / evaluating with the recipe the run trained with
    if own.norm_stats_path:
      return own.norm_stats_path
  if config.init.weights:
    source = resolve(config.init.weights, asset_id=d.asset_id)
    if source.norm_stats_path is None:
      raise FileNotFoundError(
          f"config.init.weights={config.init.weights!r} comes without norm stats (looked for "
          f"{source.norm_stats_looked_for}); the data must be normalized as those weights were "
          "trained: set config.data.norm_stats_path to their norm_stats.json, or to 'dataset' "
          "for the dataset's")
    return source.norm_stats_path
  return os.path.join(d.dataset_dir, NORM_STATS)


def with_norm_stats(config, workdir: str | None = None):
  """Copy of config with data.norm_stats_path set to the file `norm_stats_path` picks."""
  path = norm_stats_path(config, workdir)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data.norm_stats_path = path
  logging.info("norm stats: %s", path)
  return config


# ---------------------------------------------------------------------------------------------
# Loading


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(k) for k in keys): v
          for keys, v in traverse_util.flatten_dict(tree).items()}


def check_weights(ckpt_shapes: dict[str, tuple[int, ...]], target: Any, missing_ok: str,
                  source: str = "checkpoint") -> list[str]:
  """Raises naming every missing / extra / mis-shaped param; returns the allowed-missing ones.

  Params matching `missing_ok` may be absent from the weights (they keep their init) and may be
  extra (an energy head stored with weights loaded into a model without one: dropped).
  """
  want = {k: tuple(v.shape) for k, v in _flat(target).items()}
  missing_ok_re = re.compile(missing_ok) if missing_ok else None
  optional = lambda k: missing_ok_re is not None and missing_ok_re.fullmatch(k)
  missing = sorted(set(want) - set(ckpt_shapes))
  allowed = [k for k in missing if optional(k)]
  problems = [f"missing param {k} {want[k]}" for k in missing if k not in allowed]
  problems += [f"unexpected param {k} {ckpt_shapes[k]}"
               for k in sorted(set(ckpt_shapes) - set(want)) if not optional(k)]
  problems += [f"shape mismatch for param {k}: {source} {ckpt_shapes[k]} vs model {want[k]}"
               for k in sorted(set(want) & set(ckpt_shapes)) if ckpt_shapes[k] != want[k]]
  if problems:
    raise ValueError(f"cannot load weights from {source}:\n  " + "\n  ".join(problems))
  return allowed


def param_layout(source: WeightsSource, use_ema: bool = True) -> tuple[dict, bool]:
  """pure path -> (stored key, shape, dtype) of the params to read; whether EMA was taken."""
  from pipeline.models import openpi_checkpoint  # pylint: disable=g-import-not-at-top
  if source.kind == OPENPI:
    return openpi_checkpoint.stored_layout(source.path), False
  state = source.arrays_dir
  layout = openpi_checkpoint.stored_layout(state, "params")
  ema = {}
  if use_ema:
    try:
      ema = openpi_checkpoint.stored_layout(state, "ema")
    except ValueError:  # EMA off in that run
      pass
  layout.update(ema)  # EMA of the trainable params replaces them; the frozen ones stay
  return layout, bool(ema)


def load(source: WeightsSource | str, target: Any, *, missing_ok: str = r"energy/.*",
         use_ema: bool = True, select: str | None = None) -> tuple[dict, list[str], bool]:
  """Reads weights straight into the shardings and dtypes of `target`.

  Args:
    source: a WeightsSource, or a path `resolve` accepts.
    target: the model's pure-dict tree of jax.ShapeDtypeStruct (carrying `.sharding`).
    missing_ok: regex of params that may be absent (keep their init) or extra (dropped).
    use_ema: from our checkpoints, take the EMA params where the state has them.
    select: regex; only the stored params it matches are considered (e.g. 'energy/.*').
  Returns:
    (the loaded sub-tree of target, the allowed-missing paths, whether EMA params were taken).
  """
  from pipeline.models import openpi_checkpoint  # pylint: disable=g-import-not-at-top
  if isinstance(source, str):
    source = resolve(source)
  layout, used_ema = param_layout(source, use_ema)
  if select:
    layout = {k: v for k, v in layout.items() if re.fullmatch(select, k)}
  shapes = {k: shape for k, (_, shape, _) in layout.items()}
  # Checked from metadata first, so that nothing is read when the trees disagree.
  allowed = check_weights(shapes, target, missing_ok, source=source.describe())
  flat_target = traverse_util.flatten_dict(target)
  out_keys = {"/".join(map(str, k)): k for k in flat_target}
  wanted = {p: flat_target[k] for p, k in out_keys.items() if p in layout}
  out = openpi_checkpoint.restore_layout(source.arrays_dir, layout, wanted, out_keys)
  logging.info("weights: loaded %d params from %s%s; kept init for %d (%s)", len(wanted),
               source.describe(), " (EMA)" if used_ema else "", len(allowed),
               ", ".join(allowed[:8]) + ("..." if len(allowed) > 8 else ""))
  return out, allowed, used_ema


def load_init_params(config, target: Any) -> tuple[dict, list[str]]:
  """config.init.weights, then config.init.energy_weights over it, into `target`'s shardings.

  Returns (the loaded sub-tree, the paths of target that keep their fresh init).
  """
  init, asset_id = config.init, config.data.asset_id
  loaded, fresh = {}, sorted(_flat(target))
  if init.weights:
    source = resolve(init.weights, asset_id=asset_id)
    check_recipe(source, config)
    loaded, fresh, _ = load(source, target, missing_ok=init.missing_ok, use_ema=init.use_ema)
  if init.energy_weights:
    if "energy" not in target:
      raise ValueError(f"config.init.energy_weights={init.energy_weights!r} is set, but the model "
                       f"has no energy head (config.model.energy_mode={config.model.energy_mode!r})")
    source = resolve(init.energy_weights, asset_id=asset_id, field="config.init.energy_weights")
    check_recipe(source, config)
    _warn_other_stats(source, config)
    head, _, _ = load(source, {"energy": target["energy"]}, missing_ok="", use_ema=init.use_ema,
                      select=r"energy/.*")
    loaded = dict({k: v for k, v in loaded.items() if k != "energy"}, energy=head["energy"])
    fresh = [k for k in fresh if not k.startswith("energy/")]
  return loaded, fresh


def _warn_other_stats(source: WeightsSource, config) -> None:
  """An energy head scores normalized actions: other norm stats than the run's change its input."""
  mine = config.data.norm_stats_path
  if not source.norm_stats_path or not mine or mine == "dataset":
    return
  try:
    same = (normalization.read_norm_stats_json(source.norm_stats_path) ==
            normalization.read_norm_stats_json(mine))
  except (OSError, ValueError):
    return
  if not same:
    logging.warning("the energy head of %s was trained with the norm stats %s, this run uses %s; "
                    "its energies are of differently normalized actions", source.describe(),
                    source.norm_stats_path, mine)
