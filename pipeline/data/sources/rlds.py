"""RLDS / TFDS datasets (e.g. openvla/modified_libero_rlds): one tf.train.Example per episode.

A TFDS dataset version dir holds `dataset_info.json` and, per split, the shards its `splits`
entry lists: `<name>-<split>.<fileFormat>-XXXXX-of-YYYYY` (the entry's `filepathTemplate`), with
`shardLengths` episodes each. Shards are TFRecord or ArrayRecord files of serialized Examples with
`steps/...` keys and JPEG images, parsed here without TensorFlow (`pipeline.data.tfrecord`).

Only one split is read, so that held-out episodes never end up in the training data:
  * `split=NAME` reads split NAME (an error listing the splits if a dataset lacks it);
  * by default `train`; a dataset with one split of another name (e.g. only `val`) is read with a
    warning naming it; several splits and none of them `train` is an error asking for a choice.
Every shard's record count must equal its `shardLengths` entry.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.data import tfrecord
from pipeline.data.sources.base import (BadEpisodeError, Episode, EpisodeRef, Source,
                                        SourceError, read_json)

# Role -> Example key.
FEATURE_KEYS = {
    "image": "steps/observation/image",
    "wrist_image": "steps/observation/wrist_image",
    "state": "steps/observation/state",
    "actions": "steps/action",
    "prompt": "steps/language_instruction",
}
FILE_FORMATS = ("tfrecord", "array_record")
DEFAULT_SPLIT = "train"
# TFDS's default shard file name; a split entry's `filepathTemplate` overrides it.
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def dataset_dirs(root: Path) -> list[Path]:
  """Dirs at or up to two levels below `root` holding dataset_info.json and record shards."""
  found = []
  for pattern in ("", "*", "*/*"):
    for d in sorted(root.glob(pattern)) if pattern else [root]:
      if (d / "dataset_info.json").is_file() and any(
          glob.glob(str(d / f"*.{file_format}*")) for file_format in FILE_FORMATS):
        found.append(d)
  return found


@dataclasses.dataclass(frozen=True)
class _Shard:
  path: str
  file_format: str  # one of FILE_FORMATS
  num_episodes: int  # as dataset_info.json's shardLengths says


def _choose_split(info_path: Path, names: list[str], split: str | None) -> str:
  if split is not None:
    if split not in names:
      raise SourceError(f"{info_path}: no split {split!r}; the dataset's splits are {names}")
    return split
  if DEFAULT_SPLIT in names:
    return DEFAULT_SPLIT
  if len(names) == 1:
    logging.warning("%s has no %r split; reading its only split %r", info_path, DEFAULT_SPLIT,
                    names[0])
    return names[0]
  raise SourceError(f"{info_path}: no {DEFAULT_SPLIT!r} split, and several others {names}; pass "
                    "--split=NAME to choose the one to read")


def _split_shards(directory: Path, split: str | None) -> tuple[str, list[_Shard]]:
  """The split to read in one dataset dir and its shards, as its dataset_info.json lists them."""
  info_path = directory / "dataset_info.json"
  info = read_json(info_path)
  entries = {s.get("name"): s for s in info.get("splits") or () if isinstance(s, dict)}
  if not entries:
    raise SourceError(f"{info_path}: no 'splits' list; cannot tell which shards hold which split")
  split = _choose_split(info_path, sorted(entries), split)
  file_format = str(info.get("fileFormat") or "tfrecord")
  if file_format not in FILE_FORMATS:
    raise SourceError(f"{info_path}: fileFormat {file_format!r} is not readable here "
                      f"(supported: {list(FILE_FORMATS)})")
  lengths = entries[split].get("shardLengths")
  if not lengths:
    raise SourceError(f"{info_path}: split {split!r} has no shardLengths")
  template = entries[split].get("filepathTemplate") or _TEMPLATE
  count = len(lengths)
  digits = max(5, len(str(count)))
  shards = []
  for index, length in enumerate(lengths):
    try:
      name = template.format(DATASET=info.get("name", ""), SPLIT=split, FILEFORMAT=file_format,
                             SHARD_INDEX=f"{index:0{digits}d}", NUM_SHARDS=f"{count:0{digits}d}",
                             SHARD_X_OF_Y=f"{index:0{digits}d}-of-{count:0{digits}d}")
    except (KeyError, IndexError, ValueError) as e:
      raise SourceError(f"{info_path}: unusable filepathTemplate {template!r}: {e}") from e
    path = directory / name
    if not path.is_file():
      raise SourceError(f"{path}: shard {index} of split {split!r} listed in {info_path.name} "
                        "is missing")
    shards.append(_Shard(str(path), file_format, int(length)))
  return split, shards


def _open_array_record(path: str, options: str = ""):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  try:
    return array_record_module.ArrayRecordReader(path, options)
  except Exception as e:  # the reader raises plain RuntimeError/ValueError for bad files
    raise SourceError(f"{path}: unreadable ArrayRecord file: {e}") from e


def _shard_records(shard: _Shard) -> Iterator[tuple[tuple, bytes]]:
  """Yields (location, serialized Example) of each record of a shard, once its record count has
  been checked against shardLengths. A location is (offset, length) in a TFRecord file and
  (index,) in an ArrayRecord file."""

  def check_count(count):
    if count != shard.num_episodes:
      raise SourceError(f"{shard.path}: {count} records, but dataset_info.json's shardLengths "
                        f"says {shard.num_episodes}")

  if shard.file_format == "tfrecord":
    try:
      offsets = tfrecord.record_offsets(shard.path)
    except tfrecord.DecodeError as e:
      raise SourceError(str(e)) from e
    check_count(len(offsets))
    with open(shard.path, "rb") as f:
      for offset, length in offsets:
        f.seek(offset)
        yield (offset, length), f.read(length)
    return
  reader = _open_array_record(shard.path)
  try:
    check_count(reader.num_records())
    for index in range(shard.num_episodes):
      yield (index,), reader.read([index])[0]
  finally:
    reader.close()


def _read_record(path: str, location: tuple) -> bytes:
  """One record, at a location `_shard_records` gave."""
  if len(location) == 1:  # ArrayRecord index
    reader = _open_array_record(path, "readahead_buffer_size:0")
    try:
      return reader.read([location[0]])[0]
    finally:
      reader.close()
  offset, length = location
  with open(path, "rb") as f:
    f.seek(offset)
    return f.read(length)


def _describe(location: tuple) -> str:
  return f"record {location[0]}" if len(location) == 1 else f"record at byte {location[0]}"


class RldsSource(Source):
  """RLDS/TFDS shards of one split, one episode per tf.train.Example.

  `root` is one dataset version dir (with dataset_info.json) or a dir above several (e.g. the whole
  modified_libero_rlds download), all read with the same split; episodes are numbered over the
  dataset dirs in sorted order, then shards in order, then records in order. Task indices follow
  the order in which instructions first appear, which is how a LeRobot conversion of the same
  data numbers them.
  """
  format = "rlds"

  def __init__(self, root, split: str | None = None):
    super().__init__(root)
    dirs = dataset_dirs(self.root)
    if not dirs:
      raise SourceError(f"{self.root}: no dataset_info.json with *.tfrecord* or *.array_record* "
                        "shards at or below")
    self.version = str(read_json(dirs[0] / "dataset_info.json").get("version", ""))
    chosen, self._shards = {}, []
    for d in dirs:
      chosen[str(d)], shards = _split_shards(d, split)
      self._shards += shards
    if len(set(chosen.values())) > 1:
      raise SourceError(f"{self.root}: its datasets default to different splits {chosen}; pass "
                        "--split=NAME to choose the one to read")
    self.split = next(iter(chosen.values()))
    self._refs = None
    self._tasks = None

  def _scan(self):
    """One pass over the shards: record locations and each episode's instruction."""
    refs, tasks = [], {}
    for shard in self._shards:
      for location, data in _shard_records(shard):
        try:
          feats = tfrecord.parse_example(data, [FEATURE_KEYS["prompt"]])
        except ValueError as e:
          raise SourceError(f"{shard.path}: {_describe(location)} is not a tf.train.Example: "
                            f"{e}") from e
        prompts = feats.get(FEATURE_KEYS["prompt"], ("empty", []))[1]
        for p in dict.fromkeys(prompts):
          tasks.setdefault(p.decode("utf-8", "replace"), len(tasks))
        refs.append(EpisodeRef(episode_index=len(refs), path=shard.path, length=len(prompts),
                               location=location))
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

    def bad(field, message):
      raise BadEpisodeError(f"{ref.path}: episode {ref.episode_index} ({_describe(ref.location)}), "
                            f"key {field!r}: {message}", episode_index=ref.episode_index,
                            path=ref.path, field=field)

    data = _read_record(ref.path, ref.location)
    if len(ref.location) == 2 and len(data) != ref.location[1]:
      bad("record", "file is shorter than its index says")
    try:
      feats = tfrecord.parse_example(data, list(FEATURE_KEYS.values()))
    except ValueError as e:
      bad("record", f"not a tf.train.Example: {e}")
    values = {}
    for role, key in FEATURE_KEYS.items():
      if key not in feats:
        bad(key, f"missing; the example has {sorted(tfrecord.parse_example(data))}")
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
