"""What every source reader shares: the common episode, the reader interface, errors, checks.

Every reader turns its format into the same `Episode` (encoded image bytes, float32 state and
actions, per-frame task index and prompt), so that `prepare` never looks at a column name. A
reader is a small picklable object: `episode_refs()` lists episodes cheaply (from metadata), and
`read_episode(ref)` loads one, so worker processes can each read their own share.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

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
  """Base class of the readers.

  Attributes:
    format: one of FORMATS.
    version: the format's version as the dataset states it (e.g. 'v2.1', '1.0.0').
    split: the split read (RLDS/TFDS); None for formats without splits.
  """
  format: str = ""
  version: str = ""
  split: str | None = None

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


def read_json(path: Path) -> Any:
  """The JSON document at `path`; a SourceError naming the file if it cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SourceError(f"{path}: cannot read JSON: {e}") from e

