"""Readers for the forms in which LIBERO demonstrations exist on disk, behind one interface.

Supported (see `FORMATS`):
  * `lerobot_v2`: LeRobot codebase v2.0 / v2.1 parquet (`lerobot.LeRobotV2Source`).
  * `lerobot_v3`: LeRobot codebase v3.0 parquet, images only (`lerobot.LeRobotV3Source`).
  * `rlds`: TFDS/RLDS TFRecord or ArrayRecord shards of one split, e.g.
    openvla/modified_libero_rlds (`rlds.RldsSource`).

`open_source(root)` detects the format and returns a `Source`; every reader yields the same
`Episode` (see `base`), which `validate_episode` checks.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.data.sources.base import (BadEpisodeError, Episode, EpisodeRef, Source,
                                        SourceError, check_image, image_encoding, read_json,
                                        validate_episode)
from pipeline.data.sources.lerobot import LeRobotV2Source, LeRobotV3Source
from pipeline.data.sources import rlds
from pipeline.data.sources.rlds import RldsSource

__all__ = ["FORMATS", "FORMAT_ALIASES", "BadEpisodeError", "Episode", "EpisodeRef",
           "LeRobotV2Source", "LeRobotV3Source", "RldsSource", "Source", "SourceError",
           "check_image", "detect_format", "image_encoding", "open_source", "validate_episode"]

FORMATS = ("lerobot_v2", "lerobot_v3", "rlds")
# Accepted spellings of --format, mapped to the reader that handles them.
FORMAT_ALIASES = {
    "lerobot_v2": "lerobot_v2", "lerobot_v20": "lerobot_v2", "lerobot_v21": "lerobot_v2",
    "lerobot_v2.0": "lerobot_v2", "lerobot_v2.1": "lerobot_v2",
    "lerobot_v3": "lerobot_v3", "lerobot_v30": "lerobot_v3", "lerobot_v3.0": "lerobot_v3",
    "rlds": "rlds", "tfrecord": "rlds",
}
_READERS = {"lerobot_v2": LeRobotV2Source, "lerobot_v3": LeRobotV3Source, "rlds": RldsSource}


def detect_format(root: str | os.PathLike) -> str:
  """Returns one of FORMATS for the dataset at `root`; raises SourceError naming what was seen."""
  root = Path(root)
  if not root.is_dir():
    raise SourceError(f"source directory {root} does not exist")
  info_path = root / "meta" / "info.json"
  if info_path.is_file():
    info = read_json(info_path)
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
  if rlds.dataset_dirs(root):
    return "rlds"
  if (root / "manifest.json").is_file():
    raise SourceError(f"{root} is already a prepared ArrayRecord dataset (has manifest.json); "
                      "point the loader at it instead of preparing it again")
  entries = sorted(p.name for p in root.iterdir())[:10]
  raise SourceError(
      f"cannot detect the format of {root}: expected meta/info.json (LeRobot v2.x/v3.0) or "
      f"dataset_info.json with *.tfrecord* or *.array_record* shards (RLDS) in it or up to two "
      f"levels below; found {entries}")


def open_source(root: str | os.PathLike, format: str = "auto",
                split: str | None = None) -> Source:
  """Opens the dataset at `root` with the reader for `format` ('auto' detects it).

  `split` names the TFDS split of an RLDS dataset to read (None: its default, see `rlds`);
  LeRobot datasets have no splits and refuse any other value than None.
  """
  if format == "auto":
    name = detect_format(root)
  else:
    if format not in FORMAT_ALIASES:
      raise SourceError(f"unknown format {format!r}; expected 'auto' or one of "
                        f"{sorted(FORMAT_ALIASES)}")
    name = FORMAT_ALIASES[format]
  return _READERS[name](root, split)

