"""The batch contract: what the loader ships to the device, per example of a global batch.

  image/<camera>          uint8 [B, h, w, 3] at the camera's stored size (the model fits it to
                          model.image_size with padding); only cameras the dataset has
  image_mask/<camera>     bool [B] for every camera of CAMERAS; a camera with a mask and no image
                          is absent (the model makes it black and masks it out)
  state                   float32 [B, action_dim], normalized, zero-padded
  tokenized_prompt        int32 [B, max_token_len]
  tokenized_prompt_mask   bool [B, max_token_len]
  actions                 float32 [B, action_horizon, action_dim], normalized, zero-padded
  actions_is_pad          bool [B, action_horizon], True past the episode's end

The loader produces it (pipeline.data), the model checks it once on entry
(pipeline.models.preprocess), and the benchmarks and tests build abstract and random batches from
`spec`, so that every compiled step sees the input training sees.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

# LIBERO's cameras as the loader ships them: agent view and wrist at the stored 256 x 256, no
# right wrist camera.
LIBERO_IMAGE_SHAPES = {"base_0_rgb": (256, 256), "left_wrist_0_rgb": (256, 256)}


def spec(model_config: Any, batch_size: int,
         image_shapes: Mapping[str, tuple[int, int]] | None = None,
         sharding: Any = None) -> dict[str, Any]:
  """jax.ShapeDtypeStruct tree of one batch.

  Args:
    model_config: config.model (action_dim, action_horizon, max_token_len, image_size).
    batch_size: leading dim (global batch inside a jitted step).
    image_shapes: {camera: (h, w)} of the cameras that ship an image; default: LIBERO's.
    sharding: put on every leaf (the batch sharding of a mesh), or None.
  """
  m = model_config
  image_shapes = LIBERO_IMAGE_SHAPES if image_shapes is None else image_shapes
  unknown = sorted(set(image_shapes) - set(CAMERAS))
  if unknown:
    raise ValueError(f"unknown cameras {unknown}; expected some of {list(CAMERAS)}")

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct((batch_size, *shape), np.dtype(dtype), sharding=sharding)

  return {
      "image": {k: sds((*image_shapes[k], 3), np.uint8) for k in CAMERAS if k in image_shapes},
      "image_mask": {k: sds((), np.bool_) for k in CAMERAS},
      "state": sds((m.action_dim,), np.float32),
      "tokenized_prompt": sds((m.max_token_len,), np.int32),
      "tokenized_prompt_mask": sds((m.max_token_len,), np.bool_),
      "actions": sds((m.action_horizon, m.action_dim), np.float32),
      "actions_is_pad": sds((m.action_horizon,), np.bool_),
  }


def random_batch(batch_spec: Mapping[str, Any], *, vocab_size: int, act_dim: int = 7,
                 seed: int = 0) -> dict[str, Any]:
  """Numpy batch of `batch_spec`'s shapes with values as the loader ships them.

  Random uint8 images, masks True exactly for the shipped cameras, normal state and actions on
  their first `act_dim` dims (the rest zero padding), half-length prompts.
  """
  rng = np.random.default_rng(seed)
  out = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(batch_spec))
  for k, image in out["image"].items():
    out["image"][k] = rng.integers(0, 256, image.shape, dtype=np.uint8)
  for k, mask in out["image_mask"].items():
    mask[:] = k in out["image"]
  out["state"][:, :act_dim] = rng.normal(size=out["state"][:, :act_dim].shape)
  out["actions"][..., :act_dim] = rng.normal(size=out["actions"][..., :act_dim].shape)
  tokens, token_mask = out["tokenized_prompt"], out["tokenized_prompt_mask"]
  n = max(1, tokens.shape[1] // 2)
  tokens[:, :n] = rng.integers(1, vocab_size, (tokens.shape[0], n))
  token_mask[:, :n] = True
  return out
