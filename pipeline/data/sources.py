"""Readers for the forms in which LIBERO demonstrations exist on disk.

Every reader turns its format into the same `Episode` (encoded image bytes, float32 state and
actions, per-frame task index and prompt), so that `prepare` never looks at a column name.

Supported (see `FORMATS`):
  * `lerobot_v2`: LeRobot codebase v2.0 / v2.1, one parquet file per episode, `meta/info.json`,
    `meta/tasks.jsonl`, `meta/episodes.jsonl`; images as `struct<bytes, path>` PNG columns.
  * `lerobot_v3`: LeRobot codebase v3.0, many episodes per parquet file, `meta/tasks.parquet`,
    `meta/episodes/...parquet` with each episode's global row range. Only image (PNG-in-parquet)
    features are readable; mp4-backed ("video") features are refused with an explanation.
  * `rlds`: TFDS/RLDS TFRecord shards (e.g. openvla/modified_libero_rlds), one `tf.train.Example`
    per episode with `steps/...` keys and JPEG images. Parsed here without TensorFlow: the
    TFRecord framing and the three Example list types are simple enough, and importing TF in
    every worker process would cost seconds and memory.

A reader is a small picklable object: `episode_refs()` lists episodes cheaply (from metadata), and
`read_episode(ref)` loads one, so worker processes can each read their own share.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

FORMATS = ("lerobot_v2", "lerobot_v3", "rlds")
# Accepted spellings of --format, mapped to the reader that handles them.
FORMAT_ALIASES = {
    "lerobot_v2": "lerobot_v2", "lerobot_v20": "lerobot_v2", "lerobot_v21": "lerobot_v2",
    "lerobot_v2.0": "lerobot_v2", "lerobot_v2.1": "lerobot_v2",
    "lerobot_v3": "lerobot_v3", "lerobot_v30": "lerobot_v3", "lerobot_v3.0": "lerobot_v3",
    "rlds": "rlds", "tfrecord": "rlds",
}

# Column names each role may have, in order of preference (v2 names first, then v3 names).
IMAGE_KEYS = ("image", "observation.images.image", "observation/image")
WRIST_KEYS = ("wrist_image", "observation.images.wrist_image", "observation.images.image2",
              "observation/wrist_image")
STATE_KEYS = ("state", "observation.state", "observation/state")
ACTION_KEYS = ("actions", "action")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


class SourceError(ValueError):
  """The source as a whole cannot be read (unknown format, missing metadata)."""


class BadEpisodeError(SourceError):
  """One episode is unusable; `prepare --skip_bad` may skip it."""

  def __init__(self, message: str, *, episode_index: int | None = None, path: str = "",
               field: str = ""):
    super().__init__(message)
    self.episode_index = episode_index
    self.path = path
    self.field = field

  def __reduce__(self):
    # Keeps the keyword fields when the error crosses a process boundary.
    return (_rebuild_bad_episode, (str(self), self.episode_index, self.path, self.field))


def _rebuild_bad_episode(message, episode_index, path, field):
  return BadEpisodeError(message, episode_index=episode_index, path=path, field=field)


@dataclasses.dataclass
class Episode:
  """One demonstration in the common representation.

  Attributes:
    episode_index: index of the episode in the source.
    image: T encoded agent-view images (PNG or JPEG bytes).
    wrist_image: T encoded wrist-camera images.
    state: f32[T, state_dim].
    actions: f32[T, action_dim].
    task_index: i64[T], index into the source's task table.
    prompt: T task strings.
    path: the file the episode came from (for error messages).
  """
  episode_index: int
  image: list
  wrist_image: list
  state: np.ndarray
  actions: np.ndarray
  task_index: np.ndarray
  prompt: list
  path: str

  def __len__(self) -> int:
    return len(self.state)


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
  """Where to find one episode; cheap to pickle. `location` is reader-specific."""
  episode_index: int
  path: str
  length: int | None = None
  location: tuple = ()


class Source:
  """Base class of the readers."""
  format: str = ""
  version: str = ""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)

  def tasks(self) -> dict[int, str]:
    raise NotImplementedError

  def episode_refs(self) -> list[EpisodeRef]:
    raise NotImplementedError

  def read_episode(self, ref: EpisodeRef) -> Episode:
    raise NotImplementedError

  def feature_shapes(self) -> dict[str, list[int]]:
    """Declared shapes by role ('image', 'wrist_image', 'state', 'actions'), where known."""
    return {}

  def __iter__(self) -> Iterator[Episode]:
    for ref in self.episode_refs():
      yield self.read_episode(ref)


# ----------------------------------------------------------------------------------------------
# Format detection.


def detect_format(root: str | os.PathLike) -> str:
  """Returns one of FORMATS for the dataset at `root`; raises SourceError naming what was seen."""
  root = Path(root)
  if not root.is_dir():
    raise SourceError(f"source directory {root} does not exist")
  info_path = root / "meta" / "info.json"
  if info_path.is_file():
    info = _read_json(info_path)
    version = str(info.get("codebase_version", ""))
    if version.startswith("v2"):
      return "lerobot_v2"
    if version.startswith("v3"):
      return "lerobot_v3"
    # Some copies lack the version; the data path template still tells the layouts apart.
    data_path = str(info.get("data_path", ""))
    if "episode_index" in data_path:
      return "lerobot_v2"
    if "file_index" in data_path:
      return "lerobot_v3"
    raise SourceError(f"{info_path}: unknown LeRobot codebase_version {version!r} "
                      f"(supported: v2.0, v2.1, v3.0)")
  if _rlds_dataset_dirs(root):
    return "rlds"
  if (root / "manifest.json").is_file():
    raise SourceError(f"{root} is already a prepared ArrayRecord dataset (has manifest.json); "
                      "point the loader at it instead of preparing it again")
  entries = sorted(p.name for p in root.iterdir())[:10]
  raise SourceError(
      f"cannot detect the format of {root}: expected meta/info.json (LeRobot v2.x/v3.0) or "
      f"dataset_info.json with *.tfrecord* shards (RLDS) in it or up to two levels below; "
      f"found {entries}")


def open_source(root: str | os.PathLike, format: str = "auto") -> Source:
  """Opens the dataset at `root` with the reader for `format` ('auto' detects it)."""
  if format == "auto":
    name = detect_format(root)
  else:
    if format not in FORMAT_ALIASES:
      raise SourceError(f"unknown format {format!r}; expected 'auto' or one of "
                        f"{sorted(FORMAT_ALIASES)}")
    name = FORMAT_ALIASES[format]
  cls = {"lerobot_v2": LeRobotV2Source, "lerobot_v3": LeRobotV3Source, "rlds": RldsSource}[name]
  return cls(root)


# ----------------------------------------------------------------------------------------------
# Validation shared by all readers.


def image_encoding(data: bytes) -> str:
  """'png', 'jpeg' or '' from the leading signature."""
  if data.startswith(PNG_SIGNATURE):
    return "png"
  if data.startswith(JPEG_SIGNATURE):
    return "jpeg"
  return ""


def check_image(data: Any, *, shape: Sequence[int] | None = None, full: bool = False) -> str:
  """Returns '' if `data` looks like a usable RGB image, else what is wrong.

  The default check is cheap (no pixel decoding): PNG/JPEG signature, the end marker (catches
  truncated files), and the header's size and mode via PIL, which parses only the header. With
  `full=True` the pixels are decoded too (about 1 ms per 256x256 PNG).
  """
  if not isinstance(data, (bytes, bytearray)) or not data:
    return "empty or missing image bytes"
  data = bytes(data)
  kind = image_encoding(data)
  if kind == "png":
    # Every PNG ends with a zero-length IEND chunk: length(4) 'IEND' crc(4).
    if data[-8:-4] != b"IEND":
      return "truncated PNG (no IEND chunk at the end)"
  elif kind == "jpeg":
    # EOI marker; encoders may pad a few bytes after it.
    if b"\xff\xd9" not in data[-32:]:
      return "truncated JPEG (no end-of-image marker)"
  else:
    return f"not a PNG or JPEG (starts with {data[:8]!r})"
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if img.mode != "RGB":
        return f"image mode {img.mode}, expected RGB"
      if full:
        img.load()
  except Exception as e:  # PIL raises many types for broken files
    return f"undecodable {kind.upper()}: {e}"
  if shape is not None and len(shape) >= 2 and (height, width) != (shape[0], shape[1]):
    return f"image is {height}x{width}, the source declares {shape[0]}x{shape[1]}"
  return ""


def validate_episode(ep: Episode, *, shapes: dict[str, Sequence[int]] | None = None,
                     full_image_check: bool = False) -> None:
  """Raises BadEpisodeError naming the episode, file and field if `ep` cannot be used."""
  shapes = shapes or {}

  def bad(field, message):
    raise BadEpisodeError(f"{ep.path}: episode {ep.episode_index}, field {field!r}: {message}",
                          episode_index=ep.episode_index, path=ep.path, field=field)

  n = len(ep.state)
  if n == 0:
    bad("length", "episode has 0 frames (needs at least 1)")
  for field in ("image", "wrist_image", "actions", "task_index", "prompt"):
    if len(getattr(ep, field)) != n:
      bad(field, f"{len(getattr(ep, field))} entries but {n} states")
  for field in ("state", "actions"):
    arr = getattr(ep, field)
    if arr.ndim != 2:
      bad(field, f"expected a [T, D] array, got shape {arr.shape}")
    want = shapes.get(field)
    if want is not None and arr.shape[1] != int(np.prod(want)):
      bad(field, f"dimension {arr.shape[1]}, the source declares {list(want)}")
    finite = np.isfinite(arr)
    if not finite.all():
      frame, dim = np.argwhere(~finite)[0]
      bad(field, f"non-finite value {arr[frame, dim]} at frame {frame}, dim {dim}")
  for field in ("image", "wrist_image"):
    for t, data in enumerate(getattr(ep, field)):
      err = check_image(data, shape=shapes.get(field), full=full_image_check)
      if err:
        bad(field, f"frame {t}: {err}")
  for t, prompt in enumerate(ep.prompt):
    if not isinstance(prompt, str) or not prompt:
      bad("prompt", f"frame {t}: missing task string (task_index {ep.task_index[t]})")


# ----------------------------------------------------------------------------------------------
# LeRobot (parquet).


def _read_json(path: Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SourceError(f"{path}: cannot read JSON: {e}") from e


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


def _pick_key(features: dict, candidates: Sequence[str], role: str, where: str) -> str:
  for key in candidates:
    if key in features:
      return key
  raise SourceError(f"{where}: no {role} feature; looked for {list(candidates)}, "
                    f"features are {sorted(features)}")


class _LeRobotBase(Source):
  """What v2 and v3 share: info.json, feature-to-role mapping, per-table decoding."""

  def __init__(self, root):
    super().__init__(root)
    self._info_path = self.root / "meta" / "info.json"
    if not self._info_path.is_file():
      raise SourceError(f"{self.root}: missing meta/info.json (not a LeRobot dataset?)")
    self.info = _read_json(self._info_path)
    self.version = str(self.info.get("codebase_version", ""))
    features = self.info.get("features")
    if not isinstance(features, dict):
      raise SourceError(f"{self._info_path}: no 'features' mapping")
    where = str(self._info_path)
    # Role -> column name, e.g. {'image': 'observation.images.image', ...}.
    self.keys = {
        "image": _pick_key(features, IMAGE_KEYS, "agent-view image", where),
        "wrist_image": _pick_key(features, WRIST_KEYS, "wrist image", where),
        "state": _pick_key(features, STATE_KEYS, "state", where),
        "actions": _pick_key(features, ACTION_KEYS, "action", where),
    }
    for role in ("image", "wrist_image"):
      key = self.keys[role]
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
            for role, key in self.keys.items()}

  def _columns(self) -> list[str]:
    return [self.keys["image"], self.keys["wrist_image"], self.keys["state"],
            self.keys["actions"], "task_index", "frame_index", "episode_index"]

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
    images = {role: self._image_column(table, self.keys[role], bad)
              for role in ("image", "wrist_image")}
    state = self._float_matrix(table, self.keys["state"], bad)
    actions = self._float_matrix(table, self.keys["actions"], bad)
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

  def __init__(self, root):
    super().__init__(root)
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

  def __init__(self, root):
    super().__init__(root)
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


# ----------------------------------------------------------------------------------------------
# RLDS TFRecords, read without TensorFlow.

_RLDS_KEYS = {
    "image": "steps/observation/image",
    "wrist_image": "steps/observation/wrist_image",
    "state": "steps/observation/state",
    "actions": "steps/action",
    "prompt": "steps/language_instruction",
}


def _rlds_dataset_dirs(root: Path) -> list[Path]:
  """Dirs at or up to two levels below `root` holding dataset_info.json and tfrecord shards."""
  found = []
  for pattern in ("", "*", "*/*"):
    for d in sorted(root.glob(pattern)) if pattern else [root]:
      if (d / "dataset_info.json").is_file() and glob.glob(str(d / "*.tfrecord*")):
        found.append(d)
  return found


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
  """Yields (field number, wire type, value) of a protobuf message; value is a memoryview for
  length-delimited fields, an int for varints, raw bytes for fixed32/64."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      if pos + n > end:
        raise ValueError("truncated length-delimited field")
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 5:
      value, pos = bytes(buf[pos:pos + 4]), pos + 4
    elif wire == 1:
      value, pos = bytes(buf[pos:pos + 8]), pos + 8
    else:
      raise ValueError(f"unsupported wire type {wire}")
    yield number, wire, value


def _decode_feature(buf: memoryview) -> tuple[str, Any]:
  """tf.train.Feature -> ('bytes', [bytes]) | ('float', f32 array) | ('int64', i64 array)."""
  for number, _, value in _fields(buf):
    if number == 1:  # BytesList
      return "bytes", [bytes(v) for n, _, v in _fields(value) if n == 1]
    if number == 2:  # FloatList: packed (wire 2) or one fixed32 per value (wire 5)
      parts = []
      for n, wire, v in _fields(value):
        if n == 1:
          parts.append(np.frombuffer(v if wire == 5 else bytes(v), dtype="<f4"))
      return "float", np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if number == 3:  # Int64List: packed varints or one varint per value
      out = []
      for n, wire, v in _fields(value):
        if n != 1:
          continue
        if wire == 0:
          out.append(v)
        else:
          pos = 0
          while pos < len(v):
            x, pos = _read_varint(v, pos)
            out.append(x)
      arr = np.array(out, dtype=np.uint64).astype(np.int64)  # two's complement
      return "int64", arr
  return "empty", []


def parse_example(data: bytes, keys: Sequence[str] | None = None) -> dict[str, tuple[str, Any]]:
  """Parses a serialized tf.train.Example into {key: (kind, values)}; only `keys` if given."""
  wanted = None if keys is None else set(keys)
  out = {}
  for number, _, features in _fields(memoryview(data)):
    if number != 1:
      continue
    for n, _, entry in _fields(features):
      if n != 1:
        continue
      key, feature = None, None
      for m, _, v in _fields(entry):
        if m == 1:
          key = bytes(v).decode("utf-8")
        elif m == 2:
          feature = v
      if key is None or (wanted is not None and key not in wanted):
        continue
      out[key] = _decode_feature(feature) if feature is not None else ("empty", [])
  return out


_CRC_TABLE = None


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C (Castagnoli), pure Python; used on the 8-byte TFRecord length headers and by the
  synthetic writer (payload CRCs of large files are not checked on read: too slow in Python)."""
  global _CRC_TABLE
  if _CRC_TABLE is None:
    table = []
    for i in range(256):
      c = i
      for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
      table.append(c)
    _CRC_TABLE = table
  table = _CRC_TABLE
  crc ^= 0xFFFFFFFF
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_offsets(path: str) -> list[tuple[int, int]]:
  """(payload offset, payload length) of every record in a TFRecord file, reading only headers."""
  out = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      header = f.read(12)
      if len(header) < 12:
        raise SourceError(f"{path}: truncated TFRecord header at byte {pos}")
      (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      if masked_crc32c(header[:8]) != crc:
        raise SourceError(f"{path}: corrupt TFRecord length header at byte {pos}")
      if pos + 12 + length + 4 > size:
        raise SourceError(f"{path}: truncated TFRecord at byte {pos} (record of {length} bytes "
                          f"runs past the end of the {size}-byte file)")
      out.append((pos + 12, length))
      pos += 12 + length + 4
      f.seek(pos)
  return out


class RldsSource(Source):
  """RLDS/TFDS TFRecord shards, one episode per tf.train.Example.

  `root` is one dataset version dir (with dataset_info.json) or a dir above several (e.g. the whole
  modified_libero_rlds download); episodes are numbered over the dataset dirs in sorted order,
  then shards in order, then records in order. Task indices follow the order in which
  instructions first appear, which is how a LeRobot conversion of the same data numbers them.
  """
  format = "rlds"

  def __init__(self, root):
    super().__init__(root)
    dirs = _rlds_dataset_dirs(self.root)
    if not dirs:
      raise SourceError(f"{self.root}: no dataset_info.json with *.tfrecord* shards at or below")
    self.version = str(_read_json(dirs[0] / "dataset_info.json").get("version", ""))
    self._files = []
    for d in dirs:
      self._files += sorted(p for p in glob.glob(str(d / "*.tfrecord*")))
    self._refs = None
    self._tasks = None

  def _scan(self):
    """One pass over the shards: record offsets and each episode's instruction."""
    refs, tasks = [], {}
    for path in self._files:
      with open(path, "rb") as f:
        for offset, length in tfrecord_offsets(path):
          f.seek(offset)
          data = f.read(length)
          index = len(refs)
          try:
            feats = parse_example(data, [_RLDS_KEYS["prompt"]])
          except ValueError as e:
            raise SourceError(f"{path}: record at byte {offset} is not a tf.train.Example: "
                              f"{e}") from e
          prompts = feats.get(_RLDS_KEYS["prompt"], ("empty", []))[1]
          for p in dict.fromkeys(prompts):
            tasks.setdefault(p.decode("utf-8", "replace"), len(tasks))
          refs.append(EpisodeRef(episode_index=index, path=path, length=len(prompts),
                                 location=(offset, length)))
    self._refs = refs
    self._tasks = {i: t for t, i in tasks.items()}

  def tasks(self):
    if self._tasks is None:
      self._scan()
    return dict(self._tasks)

  def episode_refs(self):
    if self._refs is None:
      self._scan()
    return list(self._refs)

  def read_episode(self, ref):
    if self._tasks is None:
      self._scan()
    offset, length = ref.location

    def bad(field, message):
      raise BadEpisodeError(f"{ref.path}: episode {ref.episode_index} (record at byte {offset}), "
                            f"key {field!r}: {message}", episode_index=ref.episode_index,
                            path=ref.path, field=field)

    with open(ref.path, "rb") as f:
      f.seek(offset)
      data = f.read(length)
    if len(data) != length:
      bad("record", "file is shorter than its index says")
    try:
      feats = parse_example(data, list(_RLDS_KEYS.values()))
    except ValueError as e:
      bad("record", f"not a tf.train.Example: {e}")
    values = {}
    for role, key in _RLDS_KEYS.items():
      if key not in feats:
        bad(key, f"missing; the example has {sorted(parse_example(data))}")
      values[role] = feats[key][1]
    n = len(values["prompt"])
    state = np.asarray(values["state"], np.float32)
    actions = np.asarray(values["actions"], np.float32)
    if n and (state.size % n or actions.size % n):
      bad("steps", f"{n} steps but {state.size} state / {actions.size} action values")
    state = state.reshape(n, -1) if n else np.zeros((0, 8), np.float32)
    actions = actions.reshape(n, -1) if n else np.zeros((0, 7), np.float32)
    prompt = [p.decode("utf-8", "replace") for p in values["prompt"]]
    inverse = {t: i for i, t in self._tasks.items()}
    task_index = np.array([inverse.get(p, -1) for p in prompt], np.int64)
    return Episode(episode_index=ref.episode_index, image=list(values["image"]),
                   wrist_image=list(values["wrist_image"]), state=state, actions=actions,
                   task_index=task_index, prompt=prompt, path=ref.path)
