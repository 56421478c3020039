"""Device-side preprocessing of an observation batch, once, on entry to the model.

`preprocess_observation` checks a batch against the batch contract (pipeline.batch), scales
images to [-1, 1], fits them to the model size with padding (the loader may ship them at their
stored size), makes absent cameras black and masked out, and in training augments them as
openpi's pi0 does:
  non-wrist cameras: random crop of 95% of height/width at an integer offset, resized back to the
  full size (bilinear), rotated by U(-5, 5) degrees counterclockwise about the image center; the
  three steps are one affine map, so each output pixel is a single bilinear sample of the input
  (jax.scipy.ndimage.map_coordinates, edges clamped to the crop window like PIL's resize) and
  corners the rotation uncovers are black;
  all cameras: color jitter on [0, 1] values, clipped after each step: brightness x U(0.7, 1.3),
  contrast U(0.6, 1.4) around the mean luma, saturation U(0.5, 1.5) around the per-pixel luma
  (ITU-R 601 weights).
Examples whose image mask is False (absent cameras) are not augmented.

Randomness: example i of the global batch uses fold_in(fold_in(rng, i), camera id), so its
augmentation depends on the step key and its position only, not on how the batch is sharded over
devices or processes.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pipeline import batch as batch_lib

CROP_FRACTION = 0.95
MAX_ROTATION_DEG = 5.0
BRIGHTNESS, CONTRAST, SATURATION = 0.3, 0.4, 0.5
LUMA = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------
# Scale and fit


def scale_image(image: jax.Array) -> jax.Array:
  """The model's input range: uint8 -> x / 255 * 2 - 1; float (already in [-1, 1]) -> f32."""
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  return image.astype(jnp.float32)


def resize_with_pad(images: jax.Array, height: int, width: int) -> jax.Array:
  """Fits [B, h, w, C] images into [B, height, width, C]; float32 in [-1, 1].

  Keeps the aspect ratio: scaled size floor(side / ratio) with ratio = max(w / width,
  h / height), bilinear with PIL's antialiasing when shrinking, centered on black; the geometry
  of the host's `pipeline.data.transforms.resize_with_pad`, so a loader may ship images at their
  stored size and leave the resize to the accelerator.
  """
  images = scale_image(images)
  b, h, w, c = images.shape
  if (h, w) == (height, width):
    return images
  ratio = max(w / width, h / height)
  new_h, new_w = int(h / ratio), int(w / ratio)
  resized = jax.image.resize(images, (b, new_h, new_w, c), method="linear", antialias=True)
  top, left = (height - new_h) // 2, (width - new_w) // 2
  pad = ((0, 0), (top, height - new_h - top), (left, width - new_w - left), (0, 0))
  return jnp.pad(resized, pad, constant_values=-1.0)


def fit_images(images: Mapping[str, Any], size: int) -> dict[str, jax.Array]:
  """`resize_with_pad` of every camera of a batch to size x size."""
  return {key: resize_with_pad(jnp.asarray(image), size, size) for key, image in images.items()}


# ----------------------------------------------------------------------------------------------
# Augmentation


def is_wrist(key: str) -> bool:
  """Wrist cameras move with the gripper; openpi changes only their colors."""
  return "wrist" in key


def to_unit(image: jax.Array) -> jax.Array:
  """uint8 (0..255) or float in [-1, 1] -> float32 in [0, 1]."""
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) / 255.0
  return (image.astype(jnp.float32) + 1.0) / 2.0


def crop_size(height: int, width: int) -> tuple[int, int]:
  return int(height * CROP_FRACTION), int(width * CROP_FRACTION)


def sample_params(key: jax.Array, height: int, width: int, *, wrist: bool) -> dict[str, Any]:
  """Random parameters of one image; wrist cameras get the identity geometry."""
  k_top, k_left, k_angle, k_b, k_c, k_s = jax.random.split(key, 6)
  params = {
      "brightness": jax.random.uniform(k_b, (), minval=1 - BRIGHTNESS, maxval=1 + BRIGHTNESS),
      "contrast": jax.random.uniform(k_c, (), minval=1 - CONTRAST, maxval=1 + CONTRAST),
      "saturation": jax.random.uniform(k_s, (), minval=1 - SATURATION, maxval=1 + SATURATION),
  }
  if not wrist:
    ch, cw = crop_size(height, width)
    params.update(
        top=jax.random.randint(k_top, (), 0, height - ch + 1).astype(jnp.float32),
        left=jax.random.randint(k_left, (), 0, width - cw + 1).astype(jnp.float32),
        crop_h=jnp.float32(ch), crop_w=jnp.float32(cw),
        angle=jax.random.uniform(k_angle, (), minval=-MAX_ROTATION_DEG, maxval=MAX_ROTATION_DEG))
  return params


def source_coords(height: int, width: int, *, top, left, crop_h, crop_w,
                  angle) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Input (row, col) coordinates sampled by each output pixel, and where the output is covered.

  Output pixel -> undo the rotation (about the center, (H - 1) / 2, (W - 1) / 2 in pixel
  indices) -> undo the resize of the crop to H x W (pixel centers at i + 0.5, as PIL and
  jax.image.resize) -> add the crop offset, clamped to the crop window.
  Returns [H, W] rows, cols and a bool mask, False where the rotation leaves the image.
  """
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  cy, cx = (height - 1) / 2, (width - 1) / 2
  dy, dx = rows - cy, cols - cx
  theta = jnp.asarray(angle, jnp.float32) * (math.pi / 180)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  # Rows grow downwards, so a counterclockwise turn maps a source offset (dx, dy) to
  # (dx cos + dy sin, -dx sin + dy cos); this is its inverse.
  ux = cx + dx * cos - dy * sin
  uy = cy + dx * sin + dy * cos
  inside = (uy >= -0.5) & (uy < height - 0.5) & (ux >= -0.5) & (ux < width - 0.5)
  src_y = top + jnp.clip((uy + 0.5) * (crop_h / height) - 0.5, 0, crop_h - 1)
  src_x = left + jnp.clip((ux + 0.5) * (crop_w / width) - 0.5, 0, crop_w - 1)
  return src_y, src_x, inside


def warp(image: jax.Array, src_y: jax.Array, src_x: jax.Array, inside: jax.Array) -> jax.Array:
  """Bilinear samples of a float [H, W, C] image at in-range coordinates; 0 where not inside."""
  def channel(c):
    return jax.scipy.ndimage.map_coordinates(c, [src_y, src_x], order=1, mode="nearest")
  return jnp.where(inside[..., None], jax.vmap(channel, in_axes=-1, out_axes=-1)(image), 0.0)


def luma(image: jax.Array) -> jax.Array:
  return image @ jnp.asarray(LUMA, image.dtype)


def color_jitter(image: jax.Array, brightness, contrast, saturation) -> jax.Array:
  """Brightness, contrast, saturation of a [H, W, 3] image in [0, 1], clipped after each."""
  x = jnp.clip(image * brightness, 0.0, 1.0)
  x = jnp.clip(contrast * x + (1 - contrast) * jnp.mean(luma(x)), 0.0, 1.0)
  return jnp.clip(saturation * x + (1 - saturation) * luma(x)[..., None], 0.0, 1.0)


def apply_params(image: jax.Array, params: Mapping[str, Any]) -> jax.Array:
  """Augments one [H, W, 3] image in [0, 1]; geometry only when params hold it."""
  if "angle" in params:
    h, w = image.shape[:2]
    src_y, src_x, inside = source_coords(h, w, top=params["top"], left=params["left"],
                                 crop_h=params["crop_h"], crop_w=params["crop_w"],
                                 angle=params["angle"])
    image = warp(image, src_y, src_x, inside)
  return color_jitter(image, params["brightness"], params["contrast"], params["saturation"])


def camera_id(key: str) -> int:
  """Stable per-camera salt (crc32 of the name): cameras of one example draw different values."""
  return zlib.crc32(key.encode()) & 0x7FFFFFFF


def augment_batch(rng: jax.Array, images: Mapping[str, jax.Array], *, train: bool,
                  masks: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Augments a batch of images {camera: [B, H, W, 3]} (uint8, or float in [-1, 1]).

  Args:
    rng: the step's key; example i of camera k uses fold_in(fold_in(rng, i), camera_id(k)).
    images: the batch's images; B is the global batch (inside jit, a sharded array).
    train: False returns the images unchanged (evaluation never augments).
    masks: optional {camera: bool[B]}; examples with False are returned unchanged (scaled to
      [-1, 1] like the model does when they are uint8).

  Returns:
    {camera: float32 [B, H, W, 3] in [-1, 1]} when train, else `images` itself.
  """
  if not train:
    return dict(images)
  out = {}
  for key, image in images.items():
    image = jnp.asarray(image)
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"image {key!r} has shape {image.shape}, expected [B, H, W, 3]")
    b, h, w = image.shape[:3]
    salt = camera_id(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), salt))(
        jnp.arange(b, dtype=jnp.uint32))
    wrist = is_wrist(key)

    def one(k, img, wrist=wrist, h=h, w=w):
      return apply_params(to_unit(img), sample_params(k, h, w, wrist=wrist))

    augmented = jax.vmap(one)(keys, image) * 2.0 - 1.0
    if masks is not None and key in masks:
      keep = jnp.asarray(masks[key]).astype(bool)[:, None, None, None]
      augmented = jnp.where(keep, augmented, scale_image(image))
    out[key] = augmented
  return out


# ----------------------------------------------------------------------------------------------
# The observation


def _require(obs: Mapping[str, Any], key: str) -> Any:
  if key not in obs:
    raise KeyError(f"observation is missing '{key}' (has {sorted(obs)}).")
  return obs[key]


def _check_shape(name: str, x: Any, shape: tuple, hint: str) -> None:
  if tuple(x.shape) != shape:
    raise ValueError(f"observation['{name}'] has shape {tuple(x.shape)}, expected {hint}.")


def preprocess_observation(obs: Mapping[str, Any], config: Any, *,
                           augment_rng: jax.Array | None = None) -> dict[str, Any]:
  """A batch of the batch contract -> the model's inputs; raises naming a bad key.

  Args:
    obs: image, image_mask, state, tokenized_prompt, tokenized_prompt_mask (pipeline.batch);
      other keys (actions) are ignored.
    config: the model config (image_size, action_dim, max_token_len, vocab_size).
    augment_rng: augment the shipped cameras (training) with this key; None: no augmentation.

  Returns:
    image {camera: float32 [B, S, S, 3] in [-1, 1]} and image_mask {camera: bool [B]} for every
    camera of CAMERAS, state float32, tokenized_prompt int32 and its bool mask, truncated to
    max_token_len with a warning (openpi behaviour).
  """
  if not isinstance(obs, Mapping):
    raise TypeError(f"observation must be a dict, got {type(obs).__name__}.")
  state = jnp.asarray(_require(obs, "state"))
  images_in = _require(obs, "image")
  tokens = jnp.asarray(_require(obs, "tokenized_prompt"))
  token_mask = jnp.asarray(_require(obs, "tokenized_prompt_mask")).astype(bool)
  if state.ndim != 2 or state.shape[-1] != config.action_dim:
    raise ValueError(f"observation['state'] has shape {state.shape}, expected "
                     f"[B, action_dim={config.action_dim}].")
  b, size = state.shape[0], config.image_size
  given_masks = obs.get("image_mask") or {}
  images, masks = {}, {}
  for key in batch_lib.CAMERAS:
    if key not in images_in:
      if key not in given_masks:
        raise KeyError(f"observation['image'] is missing '{key}' (has {sorted(images_in)}; "
                       f"expected {list(batch_lib.CAMERAS)}; an image_mask entry without an "
                       "image marks an absent camera).")
      # An absent camera: black and masked out, made here so the loader never ships it.
      images[key] = jnp.full((b, size, size, 3), -1.0, jnp.float32)
      masks[key] = jnp.zeros((b,), bool)
      continue
    image = jnp.asarray(images_in[key])
    if image.ndim != 4 or image.shape[0] != b or image.shape[-1] != 3:
      raise ValueError(f"observation['image']['{key}'] has shape {image.shape}, expected "
                       f"[{b}, H, W, 3] (resized to model.image_size={size}).")
    images[key] = resize_with_pad(image, size, size)
    mask = jnp.ones((b,), bool)
    if key in given_masks:
      mask = jnp.asarray(given_masks[key]).astype(bool)
      _check_shape(f"image_mask']['{key}", mask, (b,), f"({b},)")
    masks[key] = mask
  if augment_rng is not None:
    shipped = {k: images[k] for k in images_in}
    images.update(augment_batch(augment_rng, shipped, train=True, masks=masks))

  if tokens.ndim != 2 or tokens.shape[0] != b:
    raise ValueError(f"observation['tokenized_prompt'] has shape {tokens.shape}, expected "
                     f"[{b}, max_token_len].")
  _check_shape("tokenized_prompt_mask", token_mask, tuple(tokens.shape), str(tokens.shape))
  raw = obs["tokenized_prompt"]
  if isinstance(raw, np.ndarray) and raw.size and (raw.min() < 0 or
                                                   raw.max() >= config.vocab_size):
    # Out-of-range ids would silently gather garbage (NaN) embeddings.
    raise ValueError(f"observation['tokenized_prompt'] has ids in [{raw.min()}, {raw.max()}], "
                     f"outside the vocabulary [0, config.model.vocab_size={config.vocab_size}).")
  if tokens.shape[1] > config.max_token_len:
    logging.warning("tokenized_prompt has %d tokens > max_token_len=%d; truncating.",
                    tokens.shape[1], config.max_token_len)
    tokens = tokens[:, :config.max_token_len]
    token_mask = token_mask[:, :config.max_token_len]
  return {"image": images, "image_mask": masks, "state": state.astype(jnp.float32),
          "tokenized_prompt": tokens.astype(jnp.int32), "tokenized_prompt_mask": token_mask}
