"""Our checkpoints -> openpi's checkpoint layout, or the energy head alone.

  python -m pipeline.export --workdir=W [--step=N] [--ema=True] --dst=D [--only=energy]
      [--include_energy=True] [--asset_id=ID] [--overwrite=False]

Writes
  D/params   an Orbax PyTree checkpoint of {"params": {<param path>: {"value": array}}}: what
             openpi saves and its `restore_params` reads (it strips the trailing "value"), with
             the tree of a Pi0 that `Pi0Config.load` takes. The energy head rides along under its
             own key `energy` (openpi's loader drops it as extra; --include_energy=False leaves it
             out). --only=energy: the energy head alone, which config.init.energy_weights=D loads
             over any Pi0 weights.
  D/assets/<asset_id>/norm_stats.json   the norm stats the run trained with, in openpi's format
             (openpi applies them, with its delta / absolute actions, around the model).
Params are the step's EMA where the run kept one and --ema (EMA covers what that run trained; the
rest are its params), else its params, as stored (float32). D, or D/params, loads back through
config.init.weights.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np
import orbax.checkpoint as ocp

from pipeline import weights as weights_lib
from pipeline.data import normalization

ONLY = ("energy",)
NORM_STAT_FIELDS = ("mean", "std", "q01", "q99")


def export_tree(params: dict, *, only: str | None = None, include_energy: bool = True) -> dict:
  """Pure-dict params -> openpi's saved tree {"params": {...: {"value": leaf}}} (keys as str).

  Works on arrays and on jax.ShapeDtypeStruct alike (the tree of an abstract model).
  """
  if only not in (None, "", *ONLY):
    raise ValueError(f"only must be one of {ONLY} or empty, got {only!r}")
  if only == "energy":
    if "energy" not in params:
      raise ValueError("the params hold no energy head (energy/...) to export")
    params = {"energy": params["energy"]}
  elif not include_energy:
    params = {k: v for k, v in params.items() if k != "energy"}

  def wrap(node):
    if isinstance(node, dict):
      return {str(k): wrap(v) for k, v in node.items()}
    return {"value": node}

  return {"params": wrap(params)}


def read_params(source: weights_lib.WeightsSource, use_ema: bool) -> tuple[dict, bool]:
  """(host numpy pure-dict params of one of our steps, whether EMA params were taken)."""
  from pipeline.models import openpi_checkpoint  # pylint: disable=g-import-not-at-top
  layout, used_ema = weights_lib.param_layout(source, use_ema)
  params = openpi_checkpoint.restore_layout(source.arrays_dir, layout, {k: None for k in layout},
                                            restore_type=np.ndarray)
  return params, used_ema


def openpi_norm_stats(raw: dict) -> dict:
  """openpi's NormStats JSON: {"norm_stats": {key: {mean, std, q01, q99}}} (q01/q99 may be null)."""
  stats = raw.get("norm_stats", raw)
  return {"norm_stats": {key: {f: entry.get(f) for f in NORM_STAT_FIELDS}
                         for key, entry in stats.items()}}


def export(workdir: str, dst: str, *, step: int | None = None, use_ema: bool = True,
           only: str | None = None, include_energy: bool = True, asset_id: str | None = None,
           overwrite: bool = False) -> dict[str, Any]:
  """Exports a step of one of our runs (the latest unless `step`); returns what was written."""
  path = os.path.join(workdir, "checkpoints", str(step)) if step is not None else workdir
  source = weights_lib.resolve(path, field="--step" if step is not None else "--workdir")
  if source.kind != weights_lib.OURS:
    raise ValueError(f"{path} is an openpi params dir, not one of our runs; nothing to export")
  run_data = (source.config or {}).get("data") or {}
  asset_id = asset_id or run_data.get("asset_id") or weights_lib.DEFAULT_ASSET_ID
  params_dir = epath.Path(dst) / "params"
  stats_file = epath.Path(dst) / "assets" / asset_id / "norm_stats.json"
  if params_dir.exists() and not overwrite:
    raise FileExistsError(f"{params_dir} exists; pass --overwrite=true to replace it")

  params, used_ema = read_params(source, use_ema)
  tree = export_tree(params, only=only, include_energy=include_energy)
  if params_dir.exists():
    params_dir.rmtree()
  params_dir.parent.mkdir(parents=True, exist_ok=True)
  ocp.PyTreeCheckpointer().save(params_dir, tree)
  written = {"params": str(params_dir), "step": source.step, "ema": used_ema,
             "num_arrays": _count_leaves(tree), "norm_stats": None}
  if source.norm_stats_path:
    stats = openpi_norm_stats(normalization.read_norm_stats_json(source.norm_stats_path))
    stats_file.parent.mkdir(parents=True, exist_ok=True)
    stats_file.write_text(json.dumps(stats, indent=2))
    written["norm_stats"] = str(stats_file)
  else:
    logging.warning("%s holds no norm stats; %s not written", source.describe(), stats_file)
  logging.info("exported %s%s to %s", source.describe(), " (EMA)" if used_ema else "", dst)
  return written


def _count_leaves(tree: dict) -> int:
  return sum(_count_leaves(v) if isinstance(v, dict) else 1 for v in tree.values())


def _define_flags():
  flags.DEFINE_string("workdir", None, "The run's workdir (or one of its checkpoint steps).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_bool("ema", True, "Export the EMA params where the run kept them.")
  flags.DEFINE_string("dst", None, "Output dir: D/params and D/assets/<asset_id>/.")
  flags.DEFINE_enum("only", None, list(ONLY), "energy: write the energy head alone.")
  flags.DEFINE_bool("include_energy", True, "Full export: keep the energy head (key 'energy').")
  flags.DEFINE_string("asset_id", None, "assets/<asset_id>/ (default: the run's "
                      "config.data.asset_id).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing D/params.")
  flags.mark_flags_as_required(["workdir", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  try:
    written = export(f.workdir, f.dst, step=f.step, use_ema=f.ema, only=f.only,
                     include_energy=f.include_energy, asset_id=f.asset_id, overwrite=f.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    raise SystemExit(f"export failed: {e}") from None
  print(json.dumps(written, indent=2))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
