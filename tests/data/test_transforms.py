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


def test_observation_is_the_frame_path_without_actions(norm_stats):
  """A live observation (decoded images, raw state, prompt) gives what a dataset frame gives."""
  frame = _frame()
  t = _transform(norm_stats, delta_action_dims=6)
  ex = t(0, records.encode_frame(frame))
  images = {f: np.asarray(Image.open(io.BytesIO(frame[f])).convert("RGB"))
            for f in ("image", "wrist_image")}
  obs = t.observation(images, frame["state"].tolist(), frame["prompt"])
  assert set(obs) == set(ex) - {"actions", "actions_is_pad"}
  flat = lambda d: {f"{k}/{j}" if isinstance(v, dict) else k: (v[j] if isinstance(v, dict) else v)
                    for k, v in d.items() for j in (v if isinstance(v, dict) else [None])}
  got, want = flat(obs), flat({k: ex[k] for k in obs})
  assert set(got) == set(want)
  for key in got:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  with pytest.raises(records.RecordError, match="'wrist_image' missing"):
    t.observation({"image": images["image"]}, frame["state"], frame["prompt"])
  with pytest.raises(records.RecordError, match=r"'image' has shape.*float32.*uint8"):
    t.observation(dict(images, image=images["image"].astype(np.float32)), frame["state"], "x")


@pytest.mark.parametrize("normalization", ["zscore", "quantile"])
def test_absolute_actions_invert_the_model_actions(norm_stats, normalization):
  frame = _frame()
  ex = _transform(norm_stats, delta_action_dims=6, normalization=normalization)(
      0, records.encode_frame(frame))
  got = transforms.absolute_actions(ex["actions"], frame["state"], norm_stats,
                                    normalization=normalization, delta_action_dims=6, act_dim=7)
  assert got.shape == (HORIZON, 7) and got.dtype == np.float32
  np.testing.assert_allclose(got, frame["actions"][:HORIZON], rtol=1e-5, atol=1e-5)
  # By hand, for a batch of samples: unnormalize (openpi's formulas), add the state back on 0..5.
  rng = np.random.default_rng(1)
  sampled = rng.normal(size=(2, HORIZON, ACTION_DIM)).astype(np.float32)
  states = rng.normal(size=(2, 8)).astype(np.float32)
  a = norm_stats["actions"]
  if normalization == "zscore":
    want = sampled[..., :7] * (a["std"] + 1e-6) + a["mean"]
  else:
    want = (sampled[..., :7] + 1) / 2 * (a["q99"] - a["q01"] + 1e-6) + a["q01"]
  want[..., :6] += states[:, None, :6]
  got = transforms.absolute_actions(sampled, states, norm_stats, normalization=normalization,
                                    delta_action_dims=6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_far_from_standardized_batches_warn_naming_file_and_dim(norm_stats, caplog):
  from pipeline.data import normalization
  rng = np.random.default_rng(0)
  good = {"state": rng.normal(size=(64, ACTION_DIM)).astype(np.float32),
          "actions": rng.normal(size=(64, HORIZON, ACTION_DIM)).astype(np.float32)}
  good["state"][:, 8:] = 0
  good["actions"][..., 7:] = 0
  good["state"][:, 7] = 0  # a constant dimension is not a problem
  check = normalization.StandardizationCheck(norm_stats, "/stats/norm_stats.json", "zscore",
                                             num_batches=2)
  with caplog.at_level("WARNING"):
    assert not check.add(good)
    assert check.add(good)
  assert not caplog.records
  bad = {k: v.copy() for k, v in good.items()}
  bad["actions"][..., 3] += 0.8  # the mean of raw actions under delta stats, for example
  bad["state"][:, 2] *= 3.0
  check = normalization.StandardizationCheck(norm_stats, "/stats/norm_stats.json", "zscore",
                                             num_batches=1)
  with caplog.at_level("WARNING"):
    assert check.add(bad)
  text = caplog.text
  assert "/stats/norm_stats.json" in text
  assert "actions dim 3: mean +0.8" in text and "state dim 2:" in text
  assert "actions dim 2:" not in text and "state dim 7" not in text


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
