"""One-off conversion of a LIBERO source into ArrayRecord shards plus normalization statistics.

  python -m pipeline.data.prepare --src=DIR --dst=DIR [--format=auto] [--action_horizon=50]
      [--num_workers=N] [--skip_bad=false] [--episodes_per_shard=32] [--verify_images=header]
      [--overwrite=false]

Output directory:
  frames-XXXXX-of-YYYYY.array_record   one record per frame (`pipeline.data.records` msgpack):
      image, wrist_image (encoded bytes as in the source), state f32[S], actions f32[H, A] (the
      frame's action chunk: actions t..t+H-1; past the episode end the last action repeats and
      actions_is_pad bool[H] is True, as openpi builds chunks), prompt, episode_index,
      frame_index, task_index. Records run in episode order; shards hold contiguous episodes.
  norm_stats.json   openpi format {"norm_stats": {"state": {mean, std, q01, q99}, "actions": ...}}.
      Exact (numpy mean, population std, linearly interpolated quantiles) over every frame's
      state and every frame's own action. openpi instead pools all H actions of every chunk,
      which counts each action up to H times and over-weights the last action of an episode
      (the padding); the per-frame version is the same data without that weighting.
  manifest.json     what was converted and how; `complete: true` is written last, after every
      shard and the stats, and `open_prepared` refuses anything else:
        version (of this layout, 1), format ('lerobot_v2' | 'lerobot_v3' | 'rlds'),
        source_version (e.g. 'v2.1'), source (absolute path), action_horizon, created,
        record_codec, num_episodes, num_records (= num_frames), num_tasks, num_skipped,
        tasks [{task_index, task}] (the source's task table),
        features {name: {dtype, shape[, encoding]}} of a record,
        norm_stats ('norm_stats.json'), norm_stats_actions (how action stats were taken),
        shards [{path, num_records, episodes [episode_index]}] (global record order = shard order),
        episodes [{episode_index, task_index, task, length, shard, start, end}] (global record
          range [start, end) of the episode's frames),
        skipped [{episode_index, path, field, reason}], complete.

Atomicity: everything is written into a sibling `.<dst name>.tmp-<host>-<pid>` directory that is
renamed to `dst` only once complete, so `dst` either does not exist or is a complete dataset. A
killed run leaves only the temporary directory, whose manifest says `complete: false`; the next
run on the same host removes it if its process is gone.

Bad input: a corrupt image (checked without decoding pixels by default: signature, end marker and
header; `--verify_images=full` decodes every image), a missing column or key, a NaN state or
action, an episode with 0 frames -> an error naming the file, episode and field; with
`--skip_bad=true` the episode is skipped instead, logged, and listed in the manifest's `skipped`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data import records
from pipeline.data import sources

MANIFEST = "manifest.json"
NORM_STATS = "norm_stats.json"
MANIFEST_VERSION = 1
# group_size:1 keeps every record its own chunk, so random access reads one record only; no
# compression since the bulk of a record is already-compressed PNG/JPEG bytes.
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_PATTERN = "frames-{index:05d}-of-{count:05d}.array_record"


class PrepareError(RuntimeError):
  """The conversion failed; the message names the file, episode and field where known."""


class NotPreparedError(RuntimeError):
  """A directory that is not a complete prepared dataset."""


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
# Statistics.


def compute_norm_stats(x: np.ndarray) -> dict[str, list[float]]:
  """mean, std (population), q01, q99 per dimension of x [N, D], computed in float64."""
  x = np.asarray(x, np.float64)
  return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
          "q01": np.quantile(x, 0.01, axis=0).tolist(),
          "q99": np.quantile(x, 0.99, axis=0).tolist()}


# ----------------------------------------------------------------------------------------------
# Directory handling.


def _write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + ".partial")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _tmp_prefix(dst: Path) -> str:
  # The host name keeps runs on different machines sharing a file system apart.
  return f".{dst.name}.tmp-{socket.gethostname()}-"


def _remove_stale_tmp_dirs(dst: Path) -> None:
  """Deletes temporary dirs of earlier runs for `dst` whose process no longer exists."""
  if not dst.parent.is_dir():
    return
  prefix = _tmp_prefix(dst)
  for entry in dst.parent.iterdir():
    if entry.name.startswith(prefix) and entry.is_dir():
      try:
        pid = int(entry.name[len(prefix):])
      except ValueError:
        continue
      if pid != os.getpid() and not _pid_alive(pid):
        logging.info("removing %s left by an interrupted run", entry)
        shutil.rmtree(entry, ignore_errors=True)


def is_complete(path: str | os.PathLike) -> bool:
  """True if `path` holds a manifest that says the dataset is complete."""
  try:
    with open(Path(path) / MANIFEST, encoding="utf-8") as f:
      return json.load(f).get("complete") is True
  except (OSError, ValueError, AttributeError):
    return False


class PreparedDataset:
  """A complete prepared dataset: manifest, shard paths, norm stats, random access to frames."""

  def __init__(self, root: Path, manifest: dict, norm_stats: dict):
    self.root = root
    self.manifest = manifest
    self.norm_stats = norm_stats
    self.shard_paths = [str(root / s["path"]) for s in manifest["shards"]]
    self.num_records = int(manifest["num_records"])
    self.action_horizon = int(manifest["action_horizon"])
    self._readers = {}
    self._starts = np.cumsum([0] + [s["num_records"] for s in manifest["shards"]])

  def __len__(self) -> int:
    return self.num_records

  def read_record(self, index: int) -> bytes:
    """The raw record at global `index` (records of all shards, in shard order)."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} out of range [0, {self.num_records})")
    shard = int(np.searchsorted(self._starts, index, side="right") - 1)
    if shard not in self._readers:
      self._readers[shard] = array_record_module.ArrayRecordReader(
          self.shard_paths[shard], "readahead_buffer_size:0")
    return self._readers[shard].read([index - int(self._starts[shard])])[0]

  def frame(self, index: int) -> dict[str, Any]:
    """The decoded frame at global `index`."""
    return records.decode_frame(self.read_record(index))

  def __getstate__(self):
    # Open readers stay behind when the object is sent to a worker process.
    state = dict(self.__dict__)
    state["_readers"] = {}
    return state

  def close(self) -> None:
    for reader in self._readers.values():
      reader.close()
    self._readers.clear()


def open_prepared(path: str | os.PathLike) -> PreparedDataset:
  """Opens a prepared dataset; raises NotPreparedError unless it is complete and intact."""
  root = Path(path)
  manifest_path = root / MANIFEST
  if not root.is_dir():
    raise NotPreparedError(f"{root}: no such directory; run "
                           f"`python -m pipeline.data.prepare --src=... --dst={root}` first")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise NotPreparedError(f"{root}: no {MANIFEST}; not a prepared dataset (or its preparation "
                           "was interrupted) - run pipeline.data.prepare again") from None
  except (OSError, ValueError) as e:
    raise NotPreparedError(f"{manifest_path}: unreadable manifest: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("complete") is not True:
    raise NotPreparedError(f"{manifest_path}: dataset is incomplete (complete != true): its "
                           "preparation did not finish; delete it and run pipeline.data.prepare "
                           "again")
  if manifest.get("version") != MANIFEST_VERSION:
    raise NotPreparedError(f"{manifest_path}: manifest version {manifest.get('version')}, "
                           f"this code reads version {MANIFEST_VERSION}")
  for shard in manifest["shards"]:
    shard_path = root / shard["path"]
    if not shard_path.is_file():
      raise NotPreparedError(f"{root}: shard {shard['path']} listed in the manifest is missing")
  try:
    with open(root / NORM_STATS, encoding="utf-8") as f:
      norm_stats = json.load(f)["norm_stats"]
  except (OSError, ValueError, KeyError) as e:
    raise NotPreparedError(f"{root / NORM_STATS}: missing or unreadable: {e}") from e
  return PreparedDataset(root, manifest, norm_stats)


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
            overwrite: bool = False) -> Path:
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
    source = sources.open_source(src, format)
    refs = source.episode_refs()
    tasks = source.tasks()
  except sources.SourceError as e:
    raise PrepareError(str(e)) from e
  if not refs:
    raise PrepareError(f"{src}: the source has no episodes")
  logging.info("preparing %d episodes of %s (%s %s) into %s", len(refs), src, source.format,
               source.version, dst)

  _remove_stale_tmp_dirs(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f"{_tmp_prefix(dst)}{os.getpid()}"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    base = {"version": MANIFEST_VERSION, "format": source.format,
            "source_version": source.version, "source": str(src),
            "action_horizon": action_horizon}
    _write_json_atomic(tmp / MANIFEST, dict(base, complete=False))
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
    _write_json_atomic(tmp / NORM_STATS, norm_stats)
    _write_json_atomic(tmp / MANIFEST, manifest)  # complete: true, written last
    try:
      os.rename(tmp, dst)
    except OSError:
      # Another process finished the same dataset first; keep theirs if it is complete.
      if is_complete(dst):
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
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
  state = np.concatenate([x for r in results for x in r["state"]])
  actions = np.concatenate([x for r in results for x in r["actions"]])
  norm_stats = {"norm_stats": {"state": compute_norm_stats(state),
                               "actions": compute_norm_stats(actions)}}
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
      "features": _feature_spec(source, horizon, state.shape[1], actions.shape[1], encodings),
      "norm_stats": NORM_STATS,
      "norm_stats_actions": "per-frame actions (not pooled over chunks)",
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


def _bool(text: str) -> bool:
  value = text.strip().lower()
  if value in ("1", "true", "yes", "y", "t"):
    return True
  if value in ("0", "false", "no", "n", "f"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="Convert a LIBERO source (LeRobot v2.x/v3.0 parquet or RLDS TFRecords) into "
      "ArrayRecord shards with action chunks and norm stats.")
  parser.add_argument("--src", required=True, help="source dataset directory")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument("--format", default="auto",
                      help="auto | lerobot_v2 (v2.0/v2.1) | lerobot_v3 | rlds")
  parser.add_argument("--action_horizon", type=int, default=50)
  parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
  parser.add_argument("--skip_bad", type=_bool, default=False, nargs="?", const=True)
  parser.add_argument("--episodes_per_shard", type=int, default=32)
  parser.add_argument("--verify_images", default="header", choices=("header", "full"))
  parser.add_argument("--overwrite", type=_bool, default=False, nargs="?", const=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  try:
    dst = prepare(args.src, args.dst, format=args.format, action_horizon=args.action_horizon,
                  num_workers=args.num_workers, skip_bad=args.skip_bad,
                  episodes_per_shard=args.episodes_per_shard,
                  verify_images=args.verify_images, overwrite=args.overwrite)
  except (PrepareError, sources.SourceError) as e:
    raise SystemExit(f"prepare failed: {e}") from None
  ds = open_prepared(dst)
  m = ds.manifest
  print(f"{dst}: {m['num_records']} frames, {m['num_episodes']} episodes, "
        f"{len(m['shards'])} shards, {m['num_skipped']} skipped")


if __name__ == "__main__":
  main()
