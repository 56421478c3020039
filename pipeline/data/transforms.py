"""Per-frame transforms: a prepared record (bytes) -> one example of the model's batch format.

Order follows openpi's pi0 LIBERO chain up to the device: decode images -> resize-with-pad to the
shipped size (the model's, or the stored one when the model resizes on the device), kept as uint8
(the model scales to [-1, 1] inside the jit); normalize state/actions
with the norm stats, then zero-pad them to the model's action_dim (so padded dims are exactly 0);
tokenize the prompt. Training augmentation is not done here: it runs on the device inside the
model's preprocessing (pipeline.models.preprocess), as in openpi, where it is cheap.
"""
from __future__ import annotations

import io
import json
import logging
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipeline import batch as batch_lib
from pipeline.data import records
from pipeline.data import tokenizer as tokenizer_lib

# Batch camera (pipeline.batch.CAMERAS) <- record field; cameras absent from LIBERO have no image, only mask False
# (the model makes them black on the device).
CAMERA_FIELDS = {"base_0_rgb": "image", "left_wrist_0_rgb": "wrist_image",
                 "right_wrist_0_rgb": None}
NORMALIZATIONS = ("zscore", "quantile")
NORM_EPS = 1e-6

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, *, field: str = "image") -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, 3] RGB; raises RecordError naming the field."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # PIL raises several unrelated types for bad data
    raise records.RecordError(
        f"field {field!r}: cannot decode image ({len(data)} bytes): {e}") from e


def image_shape(data: bytes, *, field: str = "image") -> tuple[int, int]:
  """(height, width) of PNG/JPEG bytes from the header alone; RecordError naming the field."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
  except Exception as e:  # PIL raises several unrelated types for bad data
    raise records.RecordError(f"field {field!r}: cannot read the image header: {e}") from e
  return height, width


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes uint8 [H, W, C] keeping the aspect ratio (PIL bilinear), zero-pads centered.

  The scaled size is floor(side / ratio) with ratio = max(W / width, H / height); the image is
  placed at offset floor((target - scaled) / 2) on each axis.
  """
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  ratio = max(w / width, h / height)
  new_h, new_w = int(h / ratio), int(w / ratio)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR))
  out = np.zeros((height, width) + image.shape[2:], dtype=image.dtype)
  top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
  out[top:top + new_h, left:left + new_w] = resized
  return out


# ----------------------------------------------------------------------------------------------
# Norm stats


def _open_text(path: str) -> str:
  if "://" not in path:
    with open(path) as f:
      return f.read()
  from etils import epath  # Only remote paths need it.
  return epath.Path(path).read_text()


def resolve_norm_stats_path(path: str) -> str:
  """A norm_stats.json file, or a directory holding exactly one (e.g. a checkpoint's assets/)."""
  if path.endswith(".json"):
    return path
  from etils import epath
  root = epath.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"norm stats path {path!r} does not exist")
  direct = root / "norm_stats.json"
  if direct.exists():
    return str(direct)
  # Bounded depth instead of "**": openpi keeps <step>/assets/<org>/<name>/norm_stats.json, and
  # recursive globs on GCS are slow.
  found = sorted({str(p) for depth in range(1, 5)
                  for p in root.glob("/".join(["*"] * depth) + "/norm_stats.json")})
  if len(found) != 1:
    raise FileNotFoundError(f"expected one norm_stats.json under {path!r}, found {found or 'none'}")
  return found[0]


def load_norm_stats(path: str) -> dict[str, dict[str, np.ndarray | None]]:
  """Reads openpi-format norm stats: {"norm_stats": {key: {mean, std, q01, q99}}}."""
  path = resolve_norm_stats_path(path)
  try:
    raw = json.loads(_open_text(path))
  except Exception as e:
    raise ValueError(f"cannot read norm stats {path!r}: {e}") from e
  stats = raw.get("norm_stats", raw) if isinstance(raw, dict) else None
  if not isinstance(stats, dict):
    raise ValueError(f"norm stats {path!r}: expected a map under 'norm_stats'")
  out = {}
  for key, entry in stats.items():
    if not isinstance(entry, dict) or entry.get("mean") is None or entry.get("std") is None:
      raise ValueError(f"norm stats {path!r}: entry {key!r} needs 'mean' and 'std'")
    out[key] = {name: None if entry.get(name) is None else np.asarray(entry[name], np.float32)
                for name in ("mean", "std", "q01", "q99")}
  return out


def normalize(x: np.ndarray, stats: dict[str, np.ndarray | None], mode: str, *,
              key: str = "") -> np.ndarray:
  """Normalizes the last axis of x with the first x.shape[-1] entries of the stats."""
  d = x.shape[-1]
  if mode == "zscore":
    mean, std = stats["mean"], stats["std"]
    if mean.shape[-1] < d:
      raise ValueError(f"norm stats {key!r} have {mean.shape[-1]} dims, data has {d}")
    return ((x - mean[..., :d]) / (std[..., :d] + NORM_EPS)).astype(np.float32)
  if mode == "quantile":
    q01, q99 = stats["q01"], stats["q99"]
    if q01 is None or q99 is None:
      raise ValueError(f"norm stats {key!r} lack q01/q99, needed by "
                       "config.data.normalization='quantile'")
    if q01.shape[-1] < d:
      raise ValueError(f"norm stats {key!r} have {q01.shape[-1]} dims, data has {d}")
    q01, q99 = q01[..., :d], q99[..., :d]
    return ((x - q01) / (q99 - q01 + NORM_EPS) * 2 - 1).astype(np.float32)
  raise ValueError(f"config.data.normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def pad_to_dim(x: np.ndarray, dim: int, *, key: str = "") -> np.ndarray:
  """Zero-pads the last axis to `dim`."""
  d = x.shape[-1]
  if d > dim:
    raise ValueError(f"{key or 'array'} has {d} dims, more than model.action_dim={dim}")
  if d == dim:
    return x
  pad = [(0, 0)] * (x.ndim - 1) + [(0, dim - d)]
  return np.pad(x, pad)


# ----------------------------------------------------------------------------------------------
# Frame -> example


class FrameTransform:
  """Callable turning one encoded record into one example of the batch format.

  Attributes are plain values so instances pickle into loader worker processes.

  Args:
    norm_stats: output of load_norm_stats; must hold "state" and "actions".
    tokenizer_path: sentencepiece model (local path or URL).
    image_size: side of the square model images.
    image_shapes: {camera key: (height, width)} to ship that camera at instead of the model
      size (frames of another size are resized to it); the model then resizes on the device.
    action_dim: model action/state dim after zero-padding.
    action_horizon: number of action steps kept (the first ones of the record's chunk).
    max_token_len: prompt length after padding/truncation.
    normalization: 'zscore' or 'quantile'.
    describe: maps a record index to a human description (shard, episode) for error messages.
    delta_action_dims: if > 0, the first that many action dims become relative to the current
      state (actions[:, :n] -= state[:n]) before normalization, as openpi's pi0_libero
      (extra_delta_transform, n=6); its norm stats must have been computed the same way.
  """

  def __init__(self, *, norm_stats: dict, tokenizer_path: str, image_size: int, action_dim: int,
               action_horizon: int, max_token_len: int,
               image_shapes: dict[str, tuple[int, int]] | None = None,
               normalization: str = "zscore",
               describe: Callable[[int], str] | None = None, delta_action_dims: int = 0):
    if normalization not in NORMALIZATIONS:
      raise ValueError(f"config.data.normalization must be one of {NORMALIZATIONS}, "
                       f"got {normalization!r}")
    for key in ("state", "actions"):
      if key not in norm_stats:
        raise ValueError(f"norm stats lack {key!r} (have {sorted(norm_stats)})")
    self.norm_stats = norm_stats
    self.tokenizer = tokenizer_lib.PromptTokenizer(tokenizer_path, max_token_len)
    self.image_size = int(image_size)
    self.image_shapes = {key: (int(h), int(w)) for key, (h, w) in (image_shapes or {}).items()}
    self.action_dim = int(action_dim)
    self.action_horizon = int(action_horizon)
    self.normalization = normalization
    self.describe = describe
    self.delta_action_dims = int(delta_action_dims)

  def _where(self, record_index: int) -> str:
    if self.describe is not None:
      return self.describe(record_index)
    return f"record {record_index}"

  def __call__(self, record_index: int, data: bytes) -> dict[str, Any]:
    """Transforms one record.

    Raises:
      records.RecordError: naming the record index (and shard/episode when known) and the field.
    """
    try:
      frame = records.decode_frame(data)
      return self.transform_frame(frame)
    except records.RecordError as e:
      raise records.RecordError(f"{self._where(record_index)}: {e}") from e

  def transform_frame(self, frame: dict[str, Any]) -> dict[str, Any]:
    """Transforms an already decoded frame dict (see records.FIELDS)."""
    ep = f"episode {frame.get('episode_index')} frame {frame.get('frame_index')}"
    images, masks = {}, {}
    size = self.image_size
    for key in batch_lib.CAMERAS:
      field = CAMERA_FIELDS[key]
      if field is None:
        # Absent: only its mask travels; the model makes the black image on the device.
        masks[key] = np.bool_(False)
        continue
      try:
        img = decode_image(frame[field], field=field)
      except records.RecordError as e:
        raise records.RecordError(f"{ep}: {e}") from e
      # uint8; the model scales it (and resizes it when shipped at the stored size).
      images[key] = resize_with_pad(img, *self.image_shapes.get(key, (size, size)))
      masks[key] = np.bool_(True)

    state = self._array(frame, "state", ep, ndim=1)
    actions = self._array(frame, "actions", ep, ndim=2)
    is_pad = self._array(frame, "actions_is_pad", ep, ndim=1).astype(np.bool_)
    if actions.shape[0] < self.action_horizon or is_pad.shape[0] != actions.shape[0]:
      raise records.RecordError(
          f"{ep}: field 'actions' has {actions.shape[0]} steps (actions_is_pad {is_pad.shape[0]}), "
          f"model.action_horizon={self.action_horizon} needs at least that many")
    actions, is_pad = actions[:self.action_horizon], is_pad[:self.action_horizon]
    n = self.delta_action_dims
    if n:
      if n > min(state.shape[0], actions.shape[1]):
        raise records.RecordError(f"{ep}: config.data.delta_action_dims={n} exceeds the state "
                                  f"({state.shape[0]}) or action ({actions.shape[1]}) dims")
      actions = actions.copy()
      actions[:, :n] -= state[:n]
    try:
      state = normalize(state, self.norm_stats["state"], self.normalization, key="state")
      actions = normalize(actions, self.norm_stats["actions"], self.normalization, key="actions")
      state = pad_to_dim(state, self.action_dim, key="field 'state'")
      actions = pad_to_dim(actions, self.action_dim, key="field 'actions'")
    except ValueError as e:
      raise records.RecordError(f"{ep}: {e}") from e

    prompt = frame["prompt"]
    if isinstance(prompt, bytes):
      prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
      raise records.RecordError(f"{ep}: field 'prompt' is a {type(prompt).__name__}, expected str")
    tokens, token_mask = self.tokenizer(prompt)
    return {
        "image": images,
        "image_mask": masks,
        "state": state,
        "tokenized_prompt": tokens,
        "tokenized_prompt_mask": token_mask,
        "actions": actions,
        "actions_is_pad": is_pad,
    }

  @staticmethod
  def _array(frame: dict, field: str, where: str, *, ndim: int) -> np.ndarray:
    x = np.asarray(frame[field])
    if x.ndim != ndim or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise records.RecordError(f"{where}: field {field!r} has shape {x.shape} dtype {x.dtype}, "
                                f"expected a {ndim}-d numeric array")
    if x.dtype != np.bool_ and not np.all(np.isfinite(x)):
      raise records.RecordError(f"{where}: field {field!r} holds non-finite values")
    return x.astype(np.float32) if x.dtype != np.bool_ else x


def decode_images_only(data: bytes) -> dict[str, np.ndarray]:
  """Record -> its decoded camera images; the baseline of the loader benchmark."""
  frame = records.decode_frame(data)
  return {key: decode_image(frame[field], field=field)
          for key, field in CAMERA_FIELDS.items() if field is not None}
