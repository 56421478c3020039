"""Device preprocessing: augmentation checked against PIL, numpy formulas and synthetic images."""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from PIL import Image
import pytest

import ml_collections

from pipeline.models import preprocess as augment

H = W = 24


def _smooth(h=H, w=W, seed=0):
  """A low-frequency uint8 image: bilinear resampling differs from PIL only by rounding."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  phase = np.random.default_rng(seed).uniform(0, 6, size=3)
  img = [0.5 + 0.45 * np.sin(2.5 * xx + 1.7 * yy + p) for p in phase]
  return (np.stack(img, -1) * 255).round().astype(np.uint8)


def _params(**kw):
  p = dict(top=0.0, left=0.0, crop_h=float(H), crop_w=float(W), angle=0.0, brightness=1.0,
           contrast=1.0, saturation=1.0)
  p.update(kw)
  return {k: jnp.float32(v) for k, v in p.items()}


def _apply(img_u8, **kw):
  return np.asarray(augment.apply_params(jnp.asarray(img_u8, jnp.float32) / 255, _params(**kw)))


def _luma(x):
  return x @ np.array([0.299, 0.587, 0.114])


def test_identity_params_are_identity():
  img = _smooth()
  np.testing.assert_allclose(_apply(img), img / 255, atol=1e-6)


def test_crop_and_scale_match_pil():
  img = _smooth(seed=1)
  ch, cw = augment.crop_size(H, W)
  top, left = 1, 0
  out = _apply(img, top=top, left=left, crop_h=ch, crop_w=cw)
  ref = np.asarray(Image.fromarray(img[top:top + ch, left:left + cw]).resize((W, H),
                                                                           Image.BILINEAR))
  # PIL rounds to uint8 and clamps at the crop border, where we read the pixel beyond it.
  np.testing.assert_allclose(out * 255, ref, atol=2.0)
  assert np.abs(out * 255 - img).max() > 5  # it is not the identity


def test_rotation_direction_and_amount():
  # A bright pixel 6 px right of the center of an odd-sized image: a 90 degree counterclockwise
  # turn puts it 6 px above the center, exactly (all sample points are integers).
  img = np.zeros((H + 1, W + 1, 3), np.uint8)
  c = H // 2
  img[c, c + 6] = 255
  p = _params(crop_h=H + 1, crop_w=W + 1, angle=90.0)
  out = np.asarray(augment.apply_params(jnp.asarray(img, jnp.float32) / 255, p))
  assert np.unravel_index(out[..., 0].argmax(), out.shape[:2]) == (c - 6, c)
  np.testing.assert_allclose(out[c - 6, c], 1.0, atol=1e-5)
  np.testing.assert_allclose(out.sum(), 3.0, atol=1e-4)
  # A small angle agrees with PIL's counterclockwise rotate about the center, away from corners.
  img = _smooth(seed=2)
  out = _apply(img, angle=4.0)
  ref = np.asarray(Image.fromarray(img).rotate(4.0, resample=Image.BILINEAR))
  inner = (slice(3, H - 3), slice(3, W - 3))
  np.testing.assert_allclose(out[inner] * 255, ref[inner], atol=2.0)
  assert np.abs(_apply(img, angle=-4.0)[inner] * 255 - ref[inner]).max() > 5  # sign matters


def test_color_jitter_matches_numpy():
  img = np.random.default_rng(3).integers(0, 256, (6, 5, 3)).astype(np.float64) / 255
  for b, c, s in ((1.3, 0.6, 1.5), (0.7, 1.4, 0.5), (1.1, 1.0, 1.2)):
    x = np.clip(img * b, 0, 1)
    x = np.clip(_luma(x).mean() + c * (x - _luma(x).mean()), 0, 1)
    x = np.clip(_luma(x)[..., None] + s * (x - _luma(x)[..., None]), 0, 1)
    out = augment.color_jitter(jnp.asarray(img, jnp.float32), b, c, s)
    np.testing.assert_allclose(np.asarray(out), x, atol=1e-5)


def test_sampled_parameters_in_range():
  keys = jax.random.split(jax.random.key(0), 500)
  p = jax.vmap(lambda k: augment.sample_params(k, 224, 224, wrist=False))(keys)
  ch, _ = augment.crop_size(224, 224)
  assert ch == 212
  assert p["top"].min() == 0 and p["top"].max() == 224 - ch  # integer offsets, both ends hit
  assert -5 <= p["angle"].min() < -4.5 and 4.5 < p["angle"].max() <= 5
  for name, width in (("brightness", 0.3), ("contrast", 0.4), ("saturation", 0.5)):
    v = p[name]
    assert 1 - width <= v.min() < 1 - 0.9 * width and 1 + 0.9 * width < v.max() <= 1 + width
  wrist = augment.sample_params(keys[0], 224, 224, wrist=True)
  assert "angle" not in wrist and "top" not in wrist


def _is_function_of_color(src, out):
  """True when equal input colors always map to equal output colors (no geometric change)."""
  _, inverse = np.unique(src.reshape(-1, 3), axis=0, return_inverse=True)
  flat = out.reshape(-1, 3)
  return all(np.ptp(flat[inverse.ravel() == c], axis=0).max() < 1e-5 for c in np.unique(inverse))


def _batch(b=4):
  rng = np.random.default_rng(4)
  # Few colors, each on many pixels, and sharp edges: a geometric change maps one input color
  # to several output colors.
  yy, xx = np.mgrid[0:H, 0:W]
  base = np.stack([np.where(xx < W // 2, 230, 20), (yy // 6) * 60, np.full_like(xx, 100)],
                  -1).astype(np.uint8)
  images = {"base_0_rgb": np.stack([base] * b),
            "left_wrist_0_rgb": rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8),
            "right_wrist_0_rgb": np.zeros((b, H, W, 3), np.uint8)}
  masks = {"base_0_rgb": np.array([True] * (b - 1) + [False]), "left_wrist_0_rgb": np.ones(b, bool),
           "right_wrist_0_rgb": np.zeros(b, bool)}
  return images, masks


@pytest.fixture(scope="module")
def augmented():
  images, masks = _batch()
  fn = jax.jit(lambda r, i, m: augment.augment_batch(r, i, train=True, masks=m))
  return images, masks, fn, fn(jax.random.key(7), images, masks)


def test_batch_output_format_and_masks(augmented):
  images, masks, _, out = augmented
  for key, img in out.items():
    assert img.shape == images[key].shape and img.dtype == jnp.float32
    assert -1 <= img.min() and img.max() <= 1
  # Masked examples are the model's own scaling of the input; the absent camera stays black.
  signed = lambda x: np.asarray(x, np.float32) / 255.0 * 2.0 - 1.0
  np.testing.assert_allclose(np.asarray(out["base_0_rgb"][-1]), signed(images["base_0_rgb"][-1]),
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["right_wrist_0_rgb"]), -1.0)
  assert not np.allclose(np.asarray(out["base_0_rgb"][0]), signed(images["base_0_rgb"][0]),
                         atol=1e-2)


def test_wrist_colors_only_base_geometry(augmented):
  images, _, _, out = augmented
  for i in range(3):
    assert _is_function_of_color(images["left_wrist_0_rgb"][i],
                                 np.asarray(out["left_wrist_0_rgb"][i]))
    assert not _is_function_of_color(images["base_0_rgb"][i], np.asarray(out["base_0_rgb"][i]))
  # Identical inputs at different positions draw different augmentations.
  assert not np.allclose(np.asarray(out["base_0_rgb"][0]), np.asarray(out["base_0_rgb"][1]))


def test_deterministic_per_key_and_sharding_independent(augmented):
  images, masks, fn, out = augmented
  again = fn(jax.random.key(7), images, masks)
  other = fn(jax.random.key(8), images, masks)
  for key in ("base_0_rgb", "left_wrist_0_rgb"):
    np.testing.assert_array_equal(np.asarray(again[key]), np.asarray(out[key]))
    assert not np.allclose(np.asarray(other[key][:3]), np.asarray(out[key][:3]), atol=1e-2)
  # The same global batch sharded over 4 devices gives the same per-example results.
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put((images, masks), NamedSharding(mesh, PartitionSpec("data")))
  got = fn(jax.random.key(7), *sharded)
  for key in out:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(out[key]), atol=1e-6)


def test_float_input_and_eval_identity():
  images, masks = _batch(2)
  signed = {k: v.astype(np.float32) / 255 * 2 - 1 for k, v in images.items()}
  rng = jax.random.key(1)
  from_u8 = augment.augment_batch(rng, images, train=True, masks=masks)
  from_f32 = augment.augment_batch(rng, signed, train=True, masks=masks)
  for key in images:
    np.testing.assert_allclose(np.asarray(from_f32[key]), np.asarray(from_u8[key]), atol=1e-5)
  assert augment.augment_batch(rng, images, train=False)["base_0_rgb"] is images["base_0_rgb"]
  batch = {"image": images, "image_mask": masks, "state": np.zeros((2, 4), np.float32),
           "tokenized_prompt": np.ones((2, 3), np.int32),
           "tokenized_prompt_mask": np.ones((2, 3), bool)}
  config = ml_collections.ConfigDict(dict(image_size=H, action_dim=4, max_token_len=3,
                                          vocab_size=8))
  obs = augment.preprocess_observation(batch, config, augment_rng=rng)
  for key in images:  # scaled to [-1, 1] first, as the model fits images before augmenting
    np.testing.assert_allclose(np.asarray(obs["image"][key]), np.asarray(from_u8[key]),
                               atol=1e-6)
  np.testing.assert_array_equal(np.asarray(obs["state"]), batch["state"])
  plain = augment.preprocess_observation(batch, config)
  for key in images:
    np.testing.assert_allclose(np.asarray(plain["image"][key]), signed[key], atol=1e-6)
