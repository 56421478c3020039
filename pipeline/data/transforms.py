"""Per-frame transforms: a prepared record (bytes) -> one example of the model's batch format.

Order follows openpi's pi0 LIBERO chain up to the device: decode images -> resize-with-pad to the
shipped size (the model's, or the stored one when the model resizes on the device), kept as uint8
(the model scales to [-1, 1] inside the jit); normalize state/actions
with the norm stats, then zero-pad them to the model's action_dim (so padded dims are exactly 0);
tokenize the prompt. Training augmentation is not done here: it runs on the device inside the
model's preprocessing (pipeline.models.preprocess), as in openpi, where it is cheap.

`FrameTransform.observation` is the part without actions: training frames and live observations
(the policy server) go through the same code. Actions: `model_actions` (delta, normalize, pad)
and its inverse `absolute_actions` (normalization.py) for what the model samples.
"""
from __future__ import annotations

import io
import logging
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from pipeline import batch as batch_lib
from pipeline.data import records
from pipeline.data import tokenizer as tokenizer_lib
# Norm stats live in normalization.py; these names are part of this module's interface too.
from pipeline.data.normalization import (NORM_EPS, NORMALIZATIONS, absolute_actions,  # noqa: F401
                                         load_norm_stats, normalize, resolve_norm_stats_path,
                                         unnormalize)

# Batch camera (pipeline.batch.CAMERAS) <- record field; cameras absent from LIBERO have no image, only mask False
# (the model makes them black on the device).
CAMERA_FIELDS = {"base_0_rgb": "image", "left_wrist_0_rgb": "wrist_image",
                 "right_wrist_0_rgb": None}
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
# Padding


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
    """Transforms an already decoded frame dict (see records.FIELDS): observation + actions."""
    ep = f"episode {frame.get('episode_index')} frame {frame.get('frame_index')}"
    try:
      images = {field: decode_image(frame[field], field=field)
                for field in CAMERA_FIELDS.values() if field is not None}
      example = self.observation(images, frame["state"], frame["prompt"])
      actions = self._array(frame, "actions", ndim=2)
      is_pad = self._array(frame, "actions_is_pad", ndim=1).astype(np.bool_)
      if actions.shape[0] < self.action_horizon or is_pad.shape[0] != actions.shape[0]:
        raise records.RecordError(
            f"field 'actions' has {actions.shape[0]} steps (actions_is_pad {is_pad.shape[0]}), "
            f"model.action_horizon={self.action_horizon} needs at least that many")
      example["actions"] = self.model_actions(actions[:self.action_horizon],
                                              self._array(frame, "state", ndim=1))
      example["actions_is_pad"] = is_pad[:self.action_horizon]
    except records.RecordError as e:
      raise records.RecordError(f"{ep}: {e}") from e
    return example

  def observation(self, images: Mapping[str, np.ndarray], state: Any,
                  prompt: str | bytes) -> dict[str, Any]:
    """A raw observation -> the model's example without actions.

    The one path from robot data to model input, shared by training frames and live
    observations (the policy server).

    Args:
      images: decoded uint8 [H, W, 3] per record field ('image', 'wrist_image').
      state: the raw state vector, as the robot reports it.
      prompt: the task instruction.
    Raises:
      records.RecordError: naming the field that is missing or malformed.
    """
    out_images, masks = {}, {}
    for key in batch_lib.CAMERAS:
      field = CAMERA_FIELDS[key]
      if field is None:
        # Absent: only its mask travels; the model makes the black image on the device.
        masks[key] = np.bool_(False)
        continue
      if field not in images:
        raise records.RecordError(f"field {field!r} missing (have {sorted(images)})")
      img = np.asarray(images[field])
      if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise records.RecordError(f"field {field!r} has shape {img.shape} dtype {img.dtype}, "
                                  "expected uint8 [H, W, 3]")
      # uint8; the model scales it (and resizes it when shipped at the stored size).
      out_images[key] = resize_with_pad(img, *self.image_shapes.get(key, (self.image_size,) * 2))
      masks[key] = np.bool_(True)
    state = self._array({"state": state}, "state", ndim=1)
    try:
      state = normalize(state, self.norm_stats["state"], self.normalization, key="state")
      state = pad_to_dim(state, self.action_dim, key="field 'state'")
    except ValueError as e:
      raise records.RecordError(str(e)) from e
    if isinstance(prompt, bytes):
      prompt = prompt.decode("utf-8")
    if not isinstance(prompt, str):
      raise records.RecordError(f"field 'prompt' is a {type(prompt).__name__}, expected str")
    tokens, token_mask = self.tokenizer(prompt)
    return {"image": out_images, "image_mask": masks, "state": state,
            "tokenized_prompt": tokens, "tokenized_prompt_mask": token_mask}

  def model_actions(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Raw actions [H, A] of a raw state -> the model's: delta dims, normalized, padded."""
    n = self.delta_action_dims
    if n:
      if n > min(state.shape[0], actions.shape[1]):
        raise records.RecordError(f"config.data.delta_action_dims={n} exceeds the state "
                                  f"({state.shape[0]}) or action ({actions.shape[1]}) dims")
      actions = actions.copy()
      actions[:, :n] -= state[:n]
    try:
      actions = normalize(actions, self.norm_stats["actions"], self.normalization, key="actions")
      return pad_to_dim(actions, self.action_dim, key="field 'actions'")
    except ValueError as e:
      raise records.RecordError(str(e)) from e

  def absolute_actions(self, actions: np.ndarray, state: np.ndarray,
                       act_dim: int | None = None) -> np.ndarray:
    """Inverse of model_actions for sampled actions [..., H, D] of raw states [..., S]."""
    return absolute_actions(actions, state, self.norm_stats, normalization=self.normalization,
                            delta_action_dims=self.delta_action_dims, act_dim=act_dim)

  @staticmethod
  def _array(frame: dict, field: str, *, ndim: int) -> np.ndarray:
    x = np.asarray(frame[field])
    if x.ndim != ndim or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise records.RecordError(f"field {field!r} has shape {x.shape} dtype {x.dtype}, "
                                f"expected a {ndim}-d numeric array")
    if x.dtype != np.bool_ and not np.all(np.isfinite(x)):
      raise records.RecordError(f"field {field!r} holds non-finite values")
    return x.astype(np.float32) if x.dtype != np.bool_ else x


def decode_images_only(data: bytes) -> dict[str, np.ndarray]:
  """Record -> its decoded camera images; the baseline of the loader benchmark."""
  frame = records.decode_frame(data)
  return {key: decode_image(frame[field], field=field)
          for key, field in CAMERA_FIELDS.items() if field is not None}
