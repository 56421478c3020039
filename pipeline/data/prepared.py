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

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import records

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
