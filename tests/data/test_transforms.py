"""Per-frame transforms checked against hand computations and numpy formulas."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import batch as batch_lib
from pipeline.data import records
from pipeline.data import tokenizer
from pipeline.data import transforms

SIZE, ACTION_DIM, HORIZON, MAX_LEN = 32, 32, 4, 24


def _png(img: np.ndarray, fmt: str = "PNG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format=fmt)
  return buf.getvalue()


def _stats(rng, dim):
  return {"mean": rng.normal(size=dim).astype(np.float32),
          "std": rng.uniform(0.5, 2, size=dim).astype(np.float32),
          "q01": rng.uniform(-3, -1, size=dim).astype(np.float32),
          "q99": rng.uniform(1, 3, size=dim).astype(np.float32)}


@pytest.fixture(scope="module")
def norm_stats():
  rng = np.random.default_rng(0)
  return {"state": _stats(rng, 8), "actions": _stats(rng, 7)}


def _frame(seed=0, h=40, w=48):
  rng = np.random.default_rng(seed)
  # Smooth gradients plus a sharp vertical edge: geometric changes are visible, colors vary.
  yy, xx = np.mgrid[0:h, 0:w]
  edge = xx < w // 2
  base = np.stack([xx * 255 // w, yy * 255 // h, np.where(edge, 230, 20)], -1).astype(np.uint8)
  wrist = np.stack([np.where(edge, 200, 40), yy * 255 // h, xx * 255 // w], -1).astype(np.uint8)
  return {
      "image": _png(base), "wrist_image": _png(wrist, "JPEG"),
      "state": rng.normal(size=8).astype(np.float32),
      "actions": rng.normal(size=(6, 7)).astype(np.float32),
      "actions_is_pad": np.array([0, 0, 0, 1, 1, 1], bool),
      "prompt": "put the bowl on the plate", "episode_index": 3, "frame_index": 5, "task_index": 1,
  }


def _transform(norm_stats, **kw):
  args = dict(norm_stats=norm_stats, tokenizer_path=tokenizer.SYNTHETIC_TOKENIZER, image_size=SIZE,
              action_dim=ACTION_DIM, action_horizon=HORIZON, max_token_len=MAX_LEN)
  args.update(kw)
  return transforms.FrameTransform(**args)


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("h,w,new_h,new_w,top,left", [
    # ratio = max(60/32, 40/32) = 1.875 -> 21 x 32, 11 pad rows split 5 above / 6 below.
    (40, 60, 21, 32, 5, 0),
    # ratio = 50/32 = 1.5625 -> 32 x int(19.2) = 19, 13 pad cols split 6 left / 7 right.
    (50, 30, 32, 19, 0, 6),
    # Upscaling: ratio = 0.5 -> 32 x 32, no padding.
    (16, 16, 32, 32, 0, 0),
])
def test_resize_with_pad_geometry(h, w, new_h, new_w, top, left):
  img = np.full((h, w, 3), 200, np.uint8)
  out = transforms.resize_with_pad(img, 32, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  content = np.zeros((32, 32), bool)
  content[top:top + new_h, left:left + new_w] = True
  np.testing.assert_array_equal(out[content], 200)
  np.testing.assert_array_equal(out[~content], 0)


def test_resize_with_pad_uses_bilinear_on_content():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
  out = transforms.resize_with_pad(img, 32, 32)
  expected = np.asarray(Image.fromarray(img).resize((32, 21), Image.BILINEAR))
  np.testing.assert_array_equal(out[5:26], expected)


def test_resize_same_size_is_identity():
  img = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
  assert transforms.resize_with_pad(img, 32, 32) is img


def test_decode_png_and_jpeg_roundtrip():
  img = np.random.default_rng(3).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.decode_image(_png(img)), img)
  jpeg = transforms.decode_image(_png(img, "JPEG"))
  assert jpeg.shape == (8, 9, 3) and jpeg.dtype == np.uint8


# ---------------------------------------------------------------------------- normalization


def test_zscore_and_quantile_match_numpy(norm_stats):
  x = np.random.default_rng(4).normal(size=(5, 7)).astype(np.float32)
  s = norm_stats["actions"]
  np.testing.assert_allclose(transforms.normalize(x, s, "zscore"),
                             (x - s["mean"]) / (s["std"] + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(transforms.normalize(x, s, "quantile"),
                             (x - s["q01"]) / (s["q99"] - s["q01"] + 1e-6) * 2 - 1,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    transforms.normalize(x, s, "minmax")


def test_quantile_without_quantiles_names_key(norm_stats):
  s = dict(norm_stats["state"], q01=None, q99=None)
  with pytest.raises(ValueError, match="'state'.*q01"):
    transforms.normalize(np.zeros(8, np.float32), s, "quantile", key="state")


def test_load_norm_stats_file_and_checkpoint_assets_dir(tmp_path, norm_stats):
  payload = {"norm_stats": {k: {n: v.tolist() for n, v in d.items()}
                            for k, d in norm_stats.items()}}
  nested = tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero"
  nested.mkdir(parents=True)
  (nested / "norm_stats.json").write_text(json.dumps(payload))
  for path in (str(nested / "norm_stats.json"), str(tmp_path / "ckpt")):
    loaded = transforms.load_norm_stats(path)
    np.testing.assert_allclose(loaded["state"]["std"], norm_stats["state"]["std"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="norm_stats.json"):
    transforms.load_norm_stats(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    transforms.load_norm_stats(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- full frame


def test_frame_to_batch_format(norm_stats):
  frame = _frame()
  ex = _transform(norm_stats)(7, records.encode_frame(frame))
  # The absent right wrist camera ships only its mask (False); the model makes it black.
  assert set(ex["image_mask"]) == set(batch_lib.CAMERAS)
  assert set(ex["image"]) == {"base_0_rgb", "left_wrist_0_rgb"}
  for key in ex["image"]:
    # uint8 at the model size: the model scales to [-1, 1]; augmentation runs on the device.
    assert ex["image"][key].shape == (SIZE, SIZE, 3) and ex["image"][key].dtype == np.uint8
  assert [bool(ex["image_mask"][k]) for k in batch_lib.CAMERAS] == [True, True, False]
  # base <- image, left wrist <- wrist_image: resize_with_pad of the decoded images, exactly.
  for key, field in (("base_0_rgb", "image"), ("left_wrist_0_rgb", "wrist_image")):
    src = np.asarray(Image.open(io.BytesIO(frame[field])).convert("RGB"))
    np.testing.assert_array_equal(ex["image"][key], transforms.resize_with_pad(src, SIZE, SIZE))

  s, a = norm_stats["state"], norm_stats["actions"]
  assert ex["state"].shape == (ACTION_DIM,) and ex["state"].dtype == np.float32
  np.testing.assert_allclose(ex["state"][:8], (frame["state"] - s["mean"]) / (s["std"] + 1e-6),
                             rtol=1e-5)
  np.testing.assert_array_equal(ex["state"][8:], 0)  # padded after normalization
  assert ex["actions"].shape == (HORIZON, ACTION_DIM) and ex["actions"].dtype == np.float32
  np.testing.assert_allclose(ex["actions"][:, :7],
                             (frame["actions"][:HORIZON] - a["mean"]) / (a["std"] + 1e-6),
                             rtol=1e-5)
  np.testing.assert_array_equal(ex["actions"][:, 7:], 0)
  np.testing.assert_array_equal(ex["actions_is_pad"], [False, False, False, True])

  tok = tokenizer.PromptTokenizer(tokenizer.SYNTHETIC_TOKENIZER, MAX_LEN)
  ids = tok.encode(frame["prompt"])
  assert ex["tokenized_prompt"].dtype == np.int32 and ex["tokenized_prompt"].shape == (MAX_LEN,)
  np.testing.assert_array_equal(ex["tokenized_prompt"][:len(ids)], ids)
  np.testing.assert_array_equal(ex["tokenized_prompt"][len(ids):], 0)
  np.testing.assert_array_equal(ex["tokenized_prompt_mask"], np.arange(MAX_LEN) < len(ids))


def test_delta_actions_before_normalization(norm_stats):
  frame = _frame()
  ex = _transform(norm_stats, delta_action_dims=6)(0, records.encode_frame(frame))
  a = norm_stats["actions"]
  expected = frame["actions"][:HORIZON].copy()
  for t in range(HORIZON):
    for d in range(6):
      expected[t, d] -= frame["state"][d]
  np.testing.assert_allclose(ex["actions"][:, :7], (expected - a["mean"]) / (a["std"] + 1e-6),
                             rtol=1e-5, atol=1e-6)


def test_quantile_padding_is_zero(norm_stats):
  ex = _transform(norm_stats, normalization="quantile")(0, records.encode_frame(_frame()))
  q = norm_stats["state"]
  expected = (_frame()["state"] - q["q01"]) / (q["q99"] - q["q01"] + 1e-6) * 2 - 1
  np.testing.assert_allclose(ex["state"][:8], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ex["state"][8:], 0)


# ---------------------------------------------------------------------------- errors


def test_corrupt_image_names_field_and_record(norm_stats):
  frame = _frame()
  frame["wrist_image"] = b"\x89PNG not really"
  with pytest.raises(records.RecordError, match=r"record 42.*episode 3 frame 5.*'wrist_image'"):
    _transform(norm_stats)(42, records.encode_frame(frame))


def test_undecodable_record_names_index(norm_stats):
  with pytest.raises(records.RecordError, match="record 9"):
    _transform(norm_stats)(9, b"\x00garbage")


def test_bad_shapes_name_field(norm_stats):
  frame = _frame()
  frame["actions"] = np.zeros((2, 7), np.float32)
  frame["actions_is_pad"] = np.zeros(2, bool)
  with pytest.raises(records.RecordError, match="'actions'.*action_horizon"):
    _transform(norm_stats)(0, records.encode_frame(frame))
  frame = _frame()
  with pytest.raises(records.RecordError, match="state.*action_dim"):
    _transform(norm_stats, action_dim=4)(0, records.encode_frame(frame))
