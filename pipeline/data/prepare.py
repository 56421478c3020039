"""One-off conversion of a LIBERO source into ArrayRecord shards plus normalization statistics.

  python -m pipeline.data.prepare --src=DIR --dst=DIR [--format=auto] [--action_horizon=50]
      [--num_workers=N] [--skip_bad=false] [--episodes_per_shard=32] [--verify_images=header]
      [--overwrite=false] [--split=NAME] [--delta_action_dims=6]

Output directory: see `pipeline.data.prepared`, which also reads it.

Atomicity (`pipeline.fileio.atomic_directory`): everything is written into a sibling
`.<dst name>.tmp-<host>-<pid>` directory that is renamed to `dst` only once complete, so `dst`
either does not exist or is a complete dataset. A killed run leaves only the temporary directory,
whose manifest says `complete: false`; the next run on the same host removes it if its process is
gone.

Bad input: a corrupt image (checked without decoding pixels by default: signature, end marker and
header; `--verify_images=full` decodes every image), a missing column or key, a NaN state or
action, an episode with 0 frames -> an error naming the file, episode and field; with
`--skip_bad=true` the episode is skipped instead, logged, and listed in the manifest's `skipped`.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import logging
import math
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import numpy as np

from pipeline import fileio
from pipeline.data import normalization
from pipeline.data import records
from pipeline.data import sources
from pipeline.data.prepared import (MANIFEST, MANIFEST_VERSION, NORM_STATS, SHARD_PATTERN,
                                    is_complete, open_prepared)

# group_size:1 keeps every record its own chunk, so random access reads one record only; no
# compression since the bulk of a record is already-compressed PNG/JPEG bytes.
WRITER_OPTIONS = "group_size:1,uncompressed"


class PrepareError(RuntimeError):
  """The conversion failed; the message names the file, episode and field where known."""


# ----------------------------------------------------------------------------------------------
# Per-frame records.


def action_chunks(actions: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunks [T, H, A] and pad masks [T, H]: frame t gets actions t..t+H-1, clamped to T-1."""
  n = len(actions)
  steps = np.arange(n)[:, None] + np.arange(horizon)[None, :]
  return actions[np.minimum(steps, n - 1)], steps >= n


def episode_records(ep: sources.Episode, horizon: int):
  """Yields the encoded records of one episode's frames."""
  chunks, pads = action_chunks(ep.actions, horizon)
  for t in range(len(ep)):
    yield records.encode_frame({
        "image": bytes(ep.image[t]),
        "wrist_image": bytes(ep.wrist_image[t]),
        "state": ep.state[t],
        "actions": chunks[t],
        "actions_is_pad": pads[t],
        "prompt": ep.prompt[t],
        "episode_index": int(ep.episode_index),
        "frame_index": t,
        "task_index": int(ep.task_index[t]),
    })


def _write_shard(source: sources.Source, refs: Sequence[sources.EpisodeRef], path: str,
                 horizon: int, skip_bad: bool, full_image_check: bool) -> dict[str, Any]:
  """Writes the episodes of `refs` into one ArrayRecord shard (runs in a worker process).

  Returns per-episode entries, skipped episodes, the frames' states and actions (for the
  statistics) and image encodings seen; one episode is held in memory at a time.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  shapes = source.feature_shapes()
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  episodes, skipped, states, actions, encodings = [], [], [], [], set()
  count = 0
  try:
    for ref in refs:
      try:
        ep = source.read_episode(ref)
        sources.validate_episode(ep, shapes=shapes, full_image_check=full_image_check)
      except sources.BadEpisodeError as e:
        if not skip_bad:
          raise
        skipped.append({"episode_index": ref.episode_index, "path": e.path or ref.path,
                        "field": e.field, "reason": str(e)})
        continue
      for rec in episode_records(ep, horizon):
        writer.write(rec)
      episodes.append({"episode_index": int(ep.episode_index),
                       "task_index": int(ep.task_index[0]), "task": ep.prompt[0],
                       "length": len(ep), "offset": count, "path": ep.path,
                       "dims": [ep.state.shape[1], ep.actions.shape[1]]})
      count += len(ep)
      states.append(ep.state)
      actions.append(ep.actions)
      encodings.add(sources.image_encoding(bytes(ep.image[0])))
  finally:
    writer.close()
  return {"episodes": episodes, "skipped": skipped, "num_records": count,
          "state": states, "actions": actions,
          "encodings": sorted(encodings)}


# ----------------------------------------------------------------------------------------------
# The conversion.


def _groups(refs: list, num_groups: int) -> list[list]:
  """Splits refs into at most `num_groups` contiguous groups of about equal frame counts."""
  weights = np.array([r.length or 1 for r in refs], np.float64)
  before = np.cumsum(weights) - weights
  group_of = np.minimum((before / weights.sum() * num_groups).astype(int), num_groups - 1)
  return [[r for r, g in zip(refs, group_of) if g == i] for i in range(num_groups)
          if (group_of == i).any()]


def _feature_spec(source: sources.Source, horizon: int, state_dim: int, action_dim: int,
                  encodings: list[str]) -> dict:
  shapes = source.feature_shapes()
  image = {"dtype": "bytes", "encoding": "/".join(encodings) or "unknown",
           "shape": shapes.get("image") or None}
  wrist = dict(image, shape=shapes.get("wrist_image") or None)
  return {
      "image": image, "wrist_image": wrist,
      "state": {"dtype": "float32", "shape": [state_dim]},
      "actions": {"dtype": "float32", "shape": [horizon, action_dim]},
      "actions_is_pad": {"dtype": "bool", "shape": [horizon]},
      "prompt": {"dtype": "string"},
      "episode_index": {"dtype": "int64"}, "frame_index": {"dtype": "int64"},
      "task_index": {"dtype": "int64"},
  }


def prepare(src: str | os.PathLike, dst: str | os.PathLike, *, format: str = "auto",
            action_horizon: int = 50, num_workers: int = 1, skip_bad: bool = False,
            episodes_per_shard: int = 32, verify_images: str = "header",
            overwrite: bool = False, split: str | None = None,
            delta_action_dims: int = 0) -> Path:
  """Converts the source at `src` into a prepared ArrayRecord dataset at `dst`.

  Args:
    src: source dataset directory.
    dst: output directory; must not exist (or be empty) unless `overwrite`.
    format: 'auto' or a name accepted by `sources.open_source`.
    action_horizon: steps per precomputed action chunk.
    num_workers: processes converting episode groups in parallel (1: in this process).
    skip_bad: skip unusable episodes (listed in the manifest) instead of failing.
    episodes_per_shard: target episodes per shard; at least `num_workers` shards are written.
    verify_images: 'header' (signature, end marker, header) or 'full' (decode every image).
    overwrite: replace an existing `dst`.
    split: the TFDS split of an RLDS source (None: 'train', or the only split; see
      `sources.rlds`); LeRobot sources have none and refuse any other value than None.
    delta_action_dims: the action stats are of actions[:, :n] - state[:n] (openpi's pi0_libero:
      6); must equal the config.data.delta_action_dims of the runs that use these stats.

  Returns:
    Path of the complete dataset.
  """
  src, dst = Path(src).resolve(), Path(dst).resolve()
  if action_horizon < 1:
    raise PrepareError(f"action_horizon must be >= 1, got {action_horizon}")
  if verify_images not in ("header", "full"):
    raise PrepareError(f"verify_images must be 'header' or 'full', got {verify_images!r}")
  if dst.exists():
    if overwrite:
      shutil.rmtree(dst)
    elif dst.is_dir() and not any(dst.iterdir()):
      dst.rmdir()
    elif is_complete(dst):
      raise PrepareError(f"{dst} already holds a complete prepared dataset; pass "
                         "--overwrite=true to rebuild it")
    else:
      raise PrepareError(f"{dst} exists and is not a complete prepared dataset; remove it or "
                         "pass --overwrite=true")
  try:
    source = sources.open_source(src, format, split)
    refs = source.episode_refs()
    tasks = source.tasks()
  except sources.SourceError as e:
    raise PrepareError(str(e)) from e
  if not refs:
    raise PrepareError(f"{src}: the source has no episodes")
  logging.info("preparing %d episodes of %s (%s %s%s) into %s", len(refs), src, source.format,
               source.version, f", split {source.split!r}" if source.split else "", dst)

  base = {"version": MANIFEST_VERSION, "format": source.format,
          "source_version": source.version, "source": str(src), "split": source.split,
          "action_horizon": action_horizon, "delta_action_dims": int(delta_action_dims)}
  # Another run that finished the same dataset meanwhile wins if its dataset is complete.
  with fileio.atomic_directory(dst, is_complete=is_complete) as tmp:
    fileio.atomic_write_json(tmp / MANIFEST, dict(base, complete=False))
    num_shards = max(min(num_workers, len(refs)), math.ceil(len(refs) / episodes_per_shard))
    groups = _groups(refs, num_shards)
    names = [SHARD_PATTERN.format(index=i, count=len(groups)) for i in range(len(groups))]
    args = [(source, g, str(tmp / n), action_horizon, skip_bad, verify_images == "full")
            for g, n in zip(groups, names)]
    results = _run(args, num_workers)
    for res in results:
      for skip in res["skipped"]:
        logging.warning("skipping episode %d: %s", skip["episode_index"], skip["reason"])
    manifest, norm_stats = _manifest(base, source, tasks, names, results, action_horizon)
    fileio.atomic_write_json(tmp / NORM_STATS, norm_stats)
    fileio.atomic_write_json(tmp / MANIFEST, manifest)  # complete: true, written last
  logging.info("prepared %d frames of %d episodes (%d skipped) in %s", manifest["num_records"],
               manifest["num_episodes"], manifest["num_skipped"], dst)
  return dst


def _run(args: list[tuple], num_workers: int) -> list[dict]:
  """Runs `_write_shard` over `args`, in this process or a pool; any error aborts all."""
  try:
    if num_workers <= 1 or len(args) == 1:
      return [_write_shard(*a) for a in args]
    # spawn: the caller (e.g. training) may hold threads that make fork unsafe.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(args)),
                                                mp_context=ctx) as pool:
      futures = [pool.submit(_write_shard, *a) for a in args]
      try:
        return [f.result() for f in futures]
      finally:
        for f in futures:
          f.cancel()
  except sources.SourceError as e:
    raise PrepareError(str(e)) from e


def _manifest(base: dict, source: sources.Source, tasks: dict, names: list[str],
              results: list[dict], horizon: int) -> tuple[dict, dict]:
  shards, episodes, skipped = [], [], []
  start = 0
  for name, res in zip(names, results):
    shards.append({"path": name, "num_records": res["num_records"],
                   "episodes": [e["episode_index"] for e in res["episodes"]]})
    for e in res["episodes"]:
      episodes.append({"episode_index": e["episode_index"], "task_index": e["task_index"],
                       "task": e["task"], "length": e["length"], "shard": name,
                       "start": start + e["offset"], "end": start + e["offset"] + e["length"]})
    skipped += res["skipped"]
    start += res["num_records"]
  if not episodes:
    raise PrepareError(f"{base['source']}: every episode was skipped as bad "
                       f"({len(skipped)}); first: {skipped[0]['reason'] if skipped else '-'}")
  # Formats without a declared shape (RLDS) are only checked here, across all episodes.
  first = next(e["dims"] for r in results for e in r["episodes"])
  for r in results:
    for e in r["episodes"]:
      if e["dims"] != first:
        raise PrepareError(
            f"{e['path']}: episode {e['episode_index']} has state/action dims {e['dims']}, "
            f"episode {episodes[0]['episode_index']} has {first}")
  try:
    norm_stats = normalization.chunk_norm_stats(
        [x for r in results for x in r["state"]], [x for r in results for x in r["actions"]],
        horizon, base["delta_action_dims"])
  except ValueError as e:
    raise PrepareError(f"{base['source']}: {e}") from e
  encodings = sorted({e for r in results for e in r["encodings"]})
  manifest = dict(base)
  manifest.update({
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "record_codec": "pipeline.data.records (msgpack)",
      "num_episodes": len(episodes),
      "num_records": start,
      "num_frames": start,
      "num_tasks": len(tasks),
      "num_skipped": len(skipped),
      "tasks": [{"task_index": i, "task": tasks.get(i, "")} for i in sorted(tasks)],
      "features": _feature_spec(source, horizon, *first, encodings),
      "norm_stats": NORM_STATS,
      "norm_stats_actions": (f"every frame's action chunk ({horizon} steps, as openpi), dims "
                             f"[0, {base['delta_action_dims']}) minus the frame's state"),
      "shards": shards,
      "episodes": episodes,
      "skipped": skipped,
      "complete": True,
  })
  return manifest, norm_stats


def ensure_prepared(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> Path:
  """Prepares `src` into `dst` unless `dst` already holds a complete dataset; returns dst.

  A `dst` with an incomplete manifest of ours is rebuilt; any other non-empty `dst` is an error.
  """
  dst = Path(dst)
  if is_complete(dst):
    return dst
  if (dst / MANIFEST).is_file():
    kwargs["overwrite"] = True
  try:
    return prepare(src, dst, **kwargs)
  except PrepareError:
    if is_complete(dst):  # another process on a shared file system finished first
      return dst
    raise


def ensure_from_config(config) -> None:
  """Makes `config.data.dataset_dir` a prepared dataset before training reads it.

  When `config.data.synthetic` and `config.data.source_dir` is missing or empty, writes the
  synthetic LeRobot source there first; then prepares `source_dir` into `dataset_dir` unless that
  holds a manifest already. Process 0 does the work; with several processes all wait for it.
  """
  import jax  # pylint: disable=g-import-not-at-top

  d = config.data
  if os.path.exists(os.path.join(d.dataset_dir, MANIFEST)):
    return
  if jax.process_index() == 0:
    if d.synthetic and not (os.path.isdir(d.source_dir) and os.listdir(d.source_dir)):
      from pipeline.data import synthetic  # pylint: disable=g-import-not-at-top

      logging.info("data: writing synthetic source (%d episodes) to %s", d.synthetic_episodes,
                   d.source_dir)
      synthetic.ensure_dataset(d.source_dir, "lerobot_v21", d.synthetic_episodes,
                               image_size=d.synthetic_image_size, seed=config.seed)
    if d.source_dir:
      logging.info("data: preparing %s -> %s", d.source_dir, d.dataset_dir)
      ensure_prepared(d.source_dir, d.dataset_dir, format=d.source_format,
                      action_horizon=config.model.action_horizon,
                      delta_action_dims=d.delta_action_dims)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("prepare_data")


def _define_flags():
  flags.DEFINE_string("src", None, "Source dataset directory.")
  flags.DEFINE_string("dst", None, "Output directory (must not exist, or be empty).")
  flags.DEFINE_string("format", "auto", "auto | lerobot_v2 (v2.0/v2.1) | lerobot_v3 | rlds.")
  flags.DEFINE_integer("action_horizon", 50, "Steps per precomputed action chunk.")
  flags.DEFINE_integer("num_workers", min(4, os.cpu_count() or 1), "Converting processes.")
  flags.DEFINE_bool("skip_bad", False, "Skip unusable episodes (listed in the manifest).")
  flags.DEFINE_integer("episodes_per_shard", 32, "Target episodes per ArrayRecord shard.")
  flags.DEFINE_enum("verify_images", "header", ["header", "full"],
                    "Check image headers only, or decode every image.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dst.")
  flags.DEFINE_string("split", None, "RLDS: the TFDS split to read (default: 'train', or the "
                      "dataset's only split). LeRobot sources have no splits.")
  flags.DEFINE_integer("delta_action_dims", 6, "Action stats of actions[:, :n] - state[:n] "
                       "(openpi pi0_libero: 6; 0: raw actions); must match the runs' "
                       "config.data.delta_action_dims.")
  flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    dst = prepare(f.src, f.dst, format=f.format, action_horizon=f.action_horizon,
                  num_workers=f.num_workers, skip_bad=f.skip_bad,
                  episodes_per_shard=f.episodes_per_shard, verify_images=f.verify_images,
                  overwrite=f.overwrite, split=f.split, delta_action_dims=f.delta_action_dims)
  except (PrepareError, sources.SourceError) as e:
    raise SystemExit(f"prepare failed: {e}") from None
  m = open_prepared(dst).manifest
  print(f"{dst}: {m['num_records']} frames, {m['num_episodes']} episodes, "
        f"{len(m['shards'])} shards, {m['num_skipped']} skipped")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
