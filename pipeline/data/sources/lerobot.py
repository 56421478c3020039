"""LeRobot parquet datasets: codebase v2.0 / v2.1 and v3.0.

  * v2.x: one parquet file per episode, `meta/info.json`, `meta/tasks.jsonl`,
    `meta/episodes.jsonl`; images as `struct<bytes, path>` PNG columns.
  * v3.0: many episodes per parquet file, `meta/tasks.parquet`, `meta/episodes/...parquet` with
    each episode's global row range. Only image (PNG-in-parquet) features are readable;
    mp4-backed ("video") features are refused with an explanation.

LeRobot datasets have no TFDS-style splits (`info.json`'s `splits` only names episode ranges of
the one set, in practice `train` = all), so a reader reads every episode and refuses a `split`.
"""
from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.sources.base import (BadEpisodeError, Episode, EpisodeRef, Source,
                                        SourceError, read_json)

# Column names each role may have, in order of preference (v2 names first, then v3 names).
IMAGE_COLUMNS = ("image", "observation.images.image", "observation/image")
WRIST_COLUMNS = ("wrist_image", "observation.images.wrist_image", "observation.images.image2",
              "observation/wrist_image")
STATE_COLUMNS = ("state", "observation.state", "observation/state")
ACTION_COLUMNS = ("actions", "action")


def _read_jsonl(path: Path) -> list[dict]:
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{lineno}: invalid JSON line: {e}") from e
  except OSError as e:
    raise SourceError(f"{path}: cannot read: {e}") from e
  return rows


def _pick_column(features: dict, candidates: Sequence[str], role: str, where: str) -> str:
  for key in candidates:
    if key in features:
      return key
  raise SourceError(f"{where}: no {role} feature; looked for {list(candidates)}, "
                    f"features are {sorted(features)}")


class _LeRobotBase(Source):
  """What v2 and v3 share: info.json, feature-to-role mapping, per-table decoding."""

  def __init__(self, root, split: str | None = None):
    super().__init__(root)
    if split is not None:
      raise SourceError(f"{self.root}: a LeRobot dataset has no splits to choose from; "
                        f"split {split!r} (--split) applies to RLDS sources only")
    self._info_path = self.root / "meta" / "info.json"
    if not self._info_path.is_file():
      raise SourceError(f"{self.root}: missing meta/info.json (not a LeRobot dataset?)")
    self.info = read_json(self._info_path)
    self.version = str(self.info.get("codebase_version", ""))
    features = self.info.get("features")
    if not isinstance(features, dict):
      raise SourceError(f"{self._info_path}: no 'features' mapping")
    where = str(self._info_path)
    # Role -> column name, e.g. {'image': 'observation.images.image', ...}.
    self.role_columns = {
        "image": _pick_column(features, IMAGE_COLUMNS, "agent-view image", where),
        "wrist_image": _pick_column(features, WRIST_COLUMNS, "wrist image", where),
        "state": _pick_column(features, STATE_COLUMNS, "state", where),
        "actions": _pick_column(features, ACTION_COLUMNS, "action", where),
    }
    for role in ("image", "wrist_image"):
      key = self.role_columns[role]
      dtype = features[key].get("dtype")
      if dtype == "video":
        raise SourceError(
            f"{where}: feature {key!r} is stored as mp4 video (dtype 'video'); decoding it needs "
            "a video decoder (PyAV/torchcodec with AV1 support), which this package does not "
            "use. Use an image variant of the dataset (PNG in parquet, e.g. "
            "HuggingFaceVLA/libero or lerobot/libero_*_image) or the RLDS TFRecords.")
      if dtype != "image":
        raise SourceError(f"{where}: feature {key!r} has dtype {dtype!r}, expected 'image'")
    self._features = features

  def feature_shapes(self):
    return {role: list(self._features[key].get("shape") or [])
            for role, key in self.role_columns.items()}

  def _columns(self) -> list[str]:
    return [*self.role_columns.values(), "task_index", "frame_index", "episode_index"]

  def _episode_from_table(self, table, episode_index: int, path: str, tasks: dict) -> Episode:
    """Converts the rows of one episode (a pyarrow Table) into an Episode."""

    def bad(field, message):
      raise BadEpisodeError(f"{path}: episode {episode_index}, column {field!r}: {message}",
                            episode_index=episode_index, path=path, field=field)

    missing = [c for c in self._columns() if c not in table.column_names]
    if missing:
      bad(missing[0], f"missing column(s) {missing}; the file has {table.column_names}")
    ep_col = np.asarray(table.column("episode_index").to_numpy(zero_copy_only=False))
    if len(ep_col) and (ep_col != episode_index).any():
      bad("episode_index", f"rows of episodes {sorted(set(ep_col.tolist()))[:5]} found")
    frame_index = np.asarray(table.column("frame_index").to_numpy(zero_copy_only=False))
    order = np.argsort(frame_index, kind="stable")
    if (frame_index[order] != np.arange(len(order))).any():
      bad("frame_index", "frame indices are not 0..T-1")
    if (order != np.arange(len(order))).any():
      table = table.take(order)
    images = {role: self._image_column(table, self.role_columns[role], bad)
              for role in ("image", "wrist_image")}
    state = self._float_matrix(table, self.role_columns["state"], bad)
    actions = self._float_matrix(table, self.role_columns["actions"], bad)
    task_index = np.asarray(table.column("task_index").to_numpy(zero_copy_only=False),
                            dtype=np.int64)
    prompt = []
    for t in task_index.tolist():
      if t not in tasks:
        bad("task_index", f"task_index {t} is not in the task table ({len(tasks)} tasks)")
      prompt.append(tasks[t])
    return Episode(episode_index=episode_index, image=images["image"],
                   wrist_image=images["wrist_image"], state=state, actions=actions,
                   task_index=task_index, prompt=prompt, path=path)

  def tasks(self):
    return dict(self._tasks)  # set by each version's __init__

  @staticmethod
  def _file_error(ref, what: str) -> BadEpisodeError:
    return BadEpisodeError(f"{ref.path}: episode {ref.episode_index}: {what}",
                           episode_index=ref.episode_index, path=ref.path, field="file")

  def _require_file(self, ref) -> None:
    if not os.path.isfile(ref.path):
      raise self._file_error(ref, "parquet file is missing")

  @staticmethod
  def _image_column(table, key, bad) -> list:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    col = table.column(key).combine_chunks()
    if pa.types.is_struct(col.type):
      if col.type.get_field_index("bytes") < 0:
        bad(key, f"image struct has no 'bytes' field (type {col.type})")
      col = col.field("bytes")
    elif not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
      bad(key, f"unsupported image column type {col.type}")
    return col.to_pylist()

  @staticmethod
  def _float_matrix(table, key, bad) -> np.ndarray:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    col = table.column(key).combine_chunks()
    n = len(col)
    if n == 0:
      return np.zeros((0, 0), np.float32)
    if pa.types.is_fixed_size_list(col.type):
      if col.null_count:
        bad(key, "null rows")
      flat = col.flatten().to_numpy(zero_copy_only=False)
      return np.asarray(flat, np.float32).reshape(n, col.type.list_size)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
      rows = col.to_pylist()
      if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        bad(key, "rows are null or of different lengths")
      return np.asarray(rows, np.float32)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
      return np.asarray(col.to_numpy(zero_copy_only=False), np.float32).reshape(n, 1)
    bad(key, f"unsupported column type {col.type}")


class LeRobotV2Source(_LeRobotBase):
  """LeRobot codebase v2.0 / v2.1: data/chunk-XXX/episode_XXXXXX.parquet."""
  format = "lerobot_v2"

  def __init__(self, root, split: str | None = None):
    super().__init__(root, split)
    tasks_path = self.root / "meta" / "tasks.jsonl"
    if not tasks_path.is_file():
      raise SourceError(f"{self.root}: missing meta/tasks.jsonl")
    self._tasks = {}
    for row in _read_jsonl(tasks_path):
      if "task_index" not in row or "task" not in row:
        raise SourceError(f"{tasks_path}: line without 'task_index'/'task': {row}")
      self._tasks[int(row["task_index"])] = str(row["task"])
    self._data_path = str(self.info.get("data_path") or
                          "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
    self._chunks_size = int(self.info.get("chunks_size") or 1000)

  def episode_refs(self):
    episodes_path = self.root / "meta" / "episodes.jsonl"
    if episodes_path.is_file():
      rows = _read_jsonl(episodes_path)
      entries = []
      for row in rows:
        if "episode_index" not in row:
          raise SourceError(f"{episodes_path}: line without 'episode_index': {row}")
        entries.append((int(row["episode_index"]), row.get("length")))
    else:
      # No episode list: take whatever episode files exist.
      entries = []
      for path in sorted(self.root.glob("data/*/episode_*.parquet")):
        m = re.search(r"episode_(\d+)\.parquet$", path.name)
        entries.append((int(m.group(1)), None))
      if not entries:
        raise SourceError(f"{self.root}: no meta/episodes.jsonl and no data/*/episode_*.parquet")
    refs = []
    for index, length in sorted(entries):
      rel = self._data_path.format(episode_chunk=index // self._chunks_size,
                                   episode_index=index)
      refs.append(EpisodeRef(episode_index=index, path=str(self.root / rel),
                             length=None if length is None else int(length)))
    return refs

  def read_episode(self, ref):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self._require_file(ref)
    try:
      pf = pq.ParquetFile(ref.path)
      present = set(pf.schema_arrow.names)
      table = pf.read(columns=[c for c in self._columns() if c in present])
    except Exception as e:  # pyarrow raises several types for damaged files
      raise self._file_error(ref, f"unreadable parquet: {e}") from e
    return self._episode_from_table(table, ref.episode_index, ref.path, self._tasks)


class LeRobotV3Source(_LeRobotBase):
  """LeRobot codebase v3.0: data/chunk-XXX/file-XXX.parquet holding many episodes each."""
  format = "lerobot_v3"

  def __init__(self, root, split: str | None = None):
    super().__init__(root, split)
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    tasks_path = self.root / "meta" / "tasks.parquet"
    if not tasks_path.is_file():
      raise SourceError(f"{self.root}: missing meta/tasks.parquet")
    table = pq.read_table(tasks_path)
    if "task_index" not in table.column_names:
      raise SourceError(f"{tasks_path}: no 'task_index' column ({table.column_names})")
    # Task strings are the pandas index ('__index_level_0__') or a 'task' column.
    text_cols = [c for c in ("task", "__index_level_0__") if c in table.column_names]
    text_cols += [f.name for f in table.schema if f.name not in text_cols and
                  (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    if not text_cols:
      raise SourceError(f"{tasks_path}: no task string column ({table.column_names})")
    self._tasks = dict(zip((int(i) for i in table.column("task_index").to_pylist()),
                           table.column(text_cols[0]).to_pylist()))
    self._data_path = str(self.info.get("data_path") or
                          "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet")

  def episode_refs(self):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    files = sorted(glob.glob(str(self.root / "meta" / "episodes" / "*" / "*.parquet")))
    if not files:
      raise SourceError(f"{self.root}: no meta/episodes/chunk-*/file-*.parquet")
    cols = ["episode_index", "length", "data/chunk_index", "data/file_index",
            "dataset_from_index", "dataset_to_index"]
    tables = []
    for path in files:
      pf = pq.ParquetFile(path)
      missing = [c for c in cols if c not in pf.schema_arrow.names]
      if missing:
        raise SourceError(f"{path}: missing column(s) {missing}")
      tables.append(pf.read(columns=cols))
    rows = pa.concat_tables(tables).to_pylist()
    # Row offsets inside a data file: episodes are stored contiguously, in order of their global
    # row range, so a file's first global row is the smallest `dataset_from_index` it holds.
    file_start = {}
    for r in rows:
      key = (r["data/chunk_index"], r["data/file_index"])
      file_start[key] = min(file_start.get(key, r["dataset_from_index"]),
                            r["dataset_from_index"])
    refs = []
    for r in sorted(rows, key=lambda r: r["episode_index"]):
      key = (r["data/chunk_index"], r["data/file_index"])
      path = self.root / self._data_path.format(chunk_index=key[0], file_index=key[1])
      start = r["dataset_from_index"] - file_start[key]
      stop = r["dataset_to_index"] - file_start[key]
      refs.append(EpisodeRef(episode_index=int(r["episode_index"]), path=str(path),
                             length=int(r["length"]), location=(int(start), int(stop))))
    return refs

  def read_episode(self, ref):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    start, stop = ref.location
    self._require_file(ref)
    try:
      pf = pq.ParquetFile(ref.path)
      present = set(pf.schema_arrow.names)
      columns = [c for c in self._columns() if c in present]
      # Read only the row groups that overlap [start, stop).
      groups, offset, first = [], 0, None
      for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
          groups.append(g)
          first = offset if first is None else first
        offset += n
      if stop > offset:
        raise BadEpisodeError(
            f"{ref.path}: episode {ref.episode_index}: rows {start}..{stop} requested but the "
            f"file has {offset} rows", episode_index=ref.episode_index, path=ref.path,
            field="dataset_to_index")
      if groups:
        table = pf.read_row_groups(groups, columns=columns)
        table = table.slice(start - first, stop - start)
      else:
        table = pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table()
    except BadEpisodeError:
      raise
    except Exception as e:  # pyarrow raises several types for damaged files
      raise self._file_error(ref, f"unreadable parquet: {e}") from e
    return self._episode_from_table(table, ref.episode_index, ref.path, self._tasks)

