"""The prepared dataset on disk (what `pipeline.data.prepare` writes), and reading it.

Output directory:
  frames-XXXXX-of-YYYYY.array_record   one record per frame (`pipeline.data.records` msgpack):
      image, wrist_image (encoded bytes as in the source), state f32[S], actions f32[H, A] (the
      frame's action chunk: actions t..t+H-1; past the episode end the last action repeats and
      actions_is_pad bool[H] is True, as openpi builds chunks), prompt, episode_index,
      frame_index, task_index. Records run in episode order; shards hold contiguous episodes.
  norm_stats.json   openpi format {"norm_stats": {"state": {mean, std, q01, q99}, "actions": ...}}.
      Taken as openpi's compute_norm_stats takes them: state over every frame; actions over every
      frame's whole chunk (H actions, padding included), after the delta transform when
      `delta_action_dims` n > 0 (actions[:, :n] - state[:n]), so that they standardize exactly
      what the model sees. Exact values (float64 mean, population std, interpolated quantiles)
      where openpi's quantiles come from 5000-bin histograms.
  manifest.json     what was converted and how; `complete: true` is written last, after every
      shard and the stats, and `open_prepared` refuses anything else:
        version (of this layout, 1), format ('lerobot_v2' | 'lerobot_v3' | 'rlds'),
        source_version (e.g. 'v2.1'), source (absolute path), split (the TFDS split read, null
        for LeRobot), action_horizon, delta_action_dims (of the action stats), created,
        record_codec, num_episodes, num_records (= num_frames), num_tasks, num_skipped,
        tasks [{task_index, task}] (the source's task table),
        features {name: {dtype, shape[, encoding]}} of a record,
        norm_stats ('norm_stats.json'), norm_stats_actions (how action stats were taken),
        shards [{path, num_records, episodes [episode_index]}] (global record order = shard order),
        episodes [{episode_index, task_index, task, length, shard, start, end}] (global record
          range [start, end) of the episode's frames),
        skipped [{episode_index, path, field, reason}], complete.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import records
from pipeline.data import transforms

MANIFEST = "manifest.json"
NORM_STATS = "norm_stats.json"
MANIFEST_VERSION = 1
SHARD_PATTERN = "frames-{index:05d}-of-{count:05d}.array_record"


class NotPreparedError(RuntimeError):
  """A directory that is not a complete prepared dataset."""


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
# What the loader reads


class DatasetInfo:
  """What the loader needs from a prepared dataset.

  Attributes:
    directory: the dataset dir.
    manifest: its manifest.json.
    shard_paths: shard paths, in global record order.
    shard_starts: first global record index of each shard.
    num_records: total records.
    episodes: int64 [E, 3] rows (episode_index, first record, end record (exclusive)), by record.
    action_horizon: chunk length stored per record.
  """

  def __init__(self, directory: str):
    self.directory = str(directory)
    try:
      prepared = open_prepared(directory)
    except NotPreparedError as e:
      raise NotPreparedError(f"config.data.dataset_dir={self.directory!r}: {e}") from e
    self.manifest = manifest = prepared.manifest
    self.shard_paths = list(prepared.shard_paths)
    counts = [int(s["num_records"]) for s in manifest["shards"]]
    self.shard_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self.num_records = int(sum(counts))
    self.action_horizon = int(manifest["action_horizon"])
    path = os.path.join(self.directory, MANIFEST)
    try:
      rows = np.asarray([(e["episode_index"], e["start"], e["end"]) for e in manifest["episodes"]],
                        np.int64).reshape(-1, 3)
    except (KeyError, TypeError) as e:
      raise ValueError(f"{path}: 'episodes' entries need episode_index/start/end: {e}") from e
    self.episodes = rows[np.argsort(rows[:, 1], kind="stable")]
    covered = int((self.episodes[:, 2] - self.episodes[:, 1]).sum())
    if len(rows) == 0 or covered != self.num_records:
      raise ValueError(f"{path}: episodes cover {covered} records, shards hold {self.num_records}")

  def stored_image_shapes(self) -> dict[str, tuple[int, int]]:
    """(height, width) of each camera in the first record, read from the image headers."""
    import grain  # pylint: disable=g-import-not-at-top  # the read side alone needs no Grain
    frame = records.decode_frame(grain.sources.ArrayRecordDataSource(self.shard_paths[:1])[0])
    return {key: transforms.image_shape(frame[field], field=field)
            for key, field in transforms.CAMERA_FIELDS.items() if field is not None}

  def record_indices(self, episode_rows: np.ndarray) -> np.ndarray:
    """Global record indices of the given episode rows, in record order."""
    if len(episode_rows) == 0:
      return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s, e, dtype=np.int64) for _, s, e in episode_rows])


class RecordLocator:
  """Maps a global record index to its shard and episode, for error messages (picklable)."""

  def __init__(self, info: DatasetInfo):
    self.names = [os.path.basename(p) for p in info.shard_paths]
    self.shard_starts = info.shard_starts.tolist()
    self.ep_starts = info.episodes[:, 1].tolist()
    self.ep_ends = info.episodes[:, 2].tolist()
    self.ep_index = info.episodes[:, 0].tolist()

  def __call__(self, record_index: int) -> str:
    shard = bisect.bisect_right(self.shard_starts, record_index) - 1
    where = (f"record {record_index} (shard {self.names[shard]}, "
             f"entry {record_index - self.shard_starts[shard]}")
    e = bisect.bisect_right(self.ep_starts, record_index) - 1
    if 0 <= e and record_index < self.ep_ends[e]:
      where += f", episode {self.ep_index[e]} step {record_index - self.ep_starts[e]}"
    return where + ")"


def split_episodes(info: DatasetInfo, eval_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """Deterministic train/eval partition of the episodes (rows of info.episodes).

  round(eval_fraction * E) episodes (at least one when eval_fraction > 0, never all) are held out,
  chosen by a permutation from `seed`.
  """
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"config.data.eval_fraction must be in [0, 1), got {eval_fraction}")
  num = len(info.episodes)
  num_eval = 0
  if eval_fraction > 0:
    num_eval = min(max(1, round(eval_fraction * num)), num - 1)
  chosen = np.zeros(num, bool)
  chosen[np.random.default_rng(seed).permutation(num)[:num_eval]] = True
  return {"train": info.episodes[~chosen], "eval": info.episodes[chosen]}
