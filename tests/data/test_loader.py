"""Grain loader: batch format, exact resume from Orbax, process shards, splits, bad records."""
import io
import json
import os

import grain
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from pipeline.data import loader
from pipeline.data import prepare
from pipeline.data import prepared
from pipeline.data import records
from pipeline.data import tokenizer
from pipeline.data import transforms
from configs import common
from pipeline import batch as batch_lib
from pipeline import sharding
from pipeline.models import preprocess
from tests.data.conftest import PREPARED_IMAGE_SIZE

SIZE, ACTION_DIM, HORIZON, MAX_LEN = 16, 32, 4, 24


def _png(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def _write_small_dataset(directory, episode_lengths, *, corrupt=(), image_hw=lambda i: (20, 24)):
  """A hand-written prepared dataset (2 shards) whose records in `corrupt` hold a broken image.

  image_hw(record index) is the size of that record's base camera image.
  """
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  frames, episodes = [], []
  for ep, length in enumerate(episode_lengths):
    episodes.append({"episode_index": ep, "start": len(frames), "end": len(frames) + length})
    for t in range(length):
      frame = {
          "image": _png(rng.integers(0, 256, (*image_hw(len(frames)), 3), dtype=np.uint8)),
          "wrist_image": _png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),
          "state": rng.normal(size=8).astype(np.float32),
          "actions": rng.normal(size=(HORIZON, 7)).astype(np.float32),
          "actions_is_pad": np.arange(HORIZON) >= length - t,
          "prompt": "put the bowl on the plate", "episode_index": ep, "frame_index": t,
          "task_index": 0,
      }
      if len(frames) in corrupt:
        frame["image"] = b"not an image"
      frames.append(records.encode_frame(frame))
  half = len(frames) // 2
  shards = []
  for i, part in enumerate((frames[:half], frames[half:])):
    name = f"frames-{i:05d}-of-00002.array_record"
    writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name), "group_size:1")
    for data in part:
      writer.write(data)
    writer.close()
    shards.append({"path": name, "num_records": len(part)})
  ones = {"mean": [0.0] * 8, "std": [1.0] * 8, "q01": [-2.0] * 8, "q99": [2.0] * 8}
  with open(os.path.join(directory, loader.NORM_STATS), "w") as f:
    json.dump({"norm_stats": {"state": ones, "actions": ones}}, f)
  manifest = {"version": prepared.MANIFEST_VERSION, "action_horizon": HORIZON, "delta_action_dims": 6,
              "num_records": len(frames), "shards": shards, "episodes": episodes, "complete": True}
  with open(os.path.join(directory, loader.MANIFEST), "w") as f:
    json.dump(manifest, f)
  return str(directory)


@pytest.fixture(scope="module")
def dataset_dir(prepared_dataset):
  return str(prepared_dataset)


@pytest.fixture(scope="module")
def record_of(dataset_dir):
  """Identifies the record behind each example of a batch by its normalized state (all distinct)."""
  ds = prepared.open_prepared(dataset_dir)
  stats = ds.norm_stats["state"]
  mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
  table = {}
  for i in range(ds.num_records):
    key = tuple(np.round((ds.frame(i)["state"] - mean) / (std + 1e-6), 3))
    table[key] = i
  ds.close()
  assert len(table) == ds.num_records

  def ids(batch):
    return [table[tuple(np.round(s[:8], 3))] for s in batch["state"]]

  return ids


def _config(dataset_dir, **data):
  config = ml_collections.ConfigDict()
  config.data = common.data_config()
  config.data.dataset_dir = dataset_dir
  config.data.tokenizer_path = tokenizer.SYNTHETIC_TOKENIZER
  config.data.num_workers = 0
  config.data.num_threads = 2
  config.data.prefetch = 2
  config.data.eval_fraction = 0.25
  config.data.update(data)
  config.model = ml_collections.ConfigDict(dict(image_size=SIZE, action_dim=ACTION_DIM,
                                                action_horizon=HORIZON, max_token_len=MAX_LEN))
  config.batch_size = 4
  return config


def _ids(record_of, batches):
  return sum((record_of(b) for b in batches), [])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for (path, u), (path_v, v) in zip(_flatten(x), _flatten(y)):
      assert path == path_v
      np.testing.assert_array_equal(u, v, err_msg=path)


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = []
    for k in sorted(tree):
      out += _flatten(tree[k], f"{prefix}/{k}")
    return out
  return [(prefix, tree)]


def _close(it):
  close = getattr(it, "close", None)
  if close:
    close()


# ---------------------------------------------------------------------------------------------


def test_batch_format(dataset_dir):
  it = iter(loader.make_dataset(_config(dataset_dir), split="train"))
  batch = next(it)
  b = 4
  assert set(batch) == {"image", "image_mask", "state", "tokenized_prompt", "tokenized_prompt_mask",
                        "actions", "actions_is_pad"}
  # Cameras ship at their stored size (the model resizes on the device); the absent right
  # wrist camera only as its mask (the model makes it black).
  assert set(batch["image"]) == {"base_0_rgb", "left_wrist_0_rgb"}
  for key in batch["image"]:
    assert batch["image"][key].shape == (b, PREPARED_IMAGE_SIZE, PREPARED_IMAGE_SIZE, 3)
    assert batch["image"][key].dtype == np.uint8  # scaled to [-1, 1] by the model
  for key in batch_lib.CAMERAS:
    assert batch["image_mask"][key].shape == (b,) and batch["image_mask"][key].dtype == np.bool_
  assert not batch["image_mask"]["right_wrist_0_rgb"].any()
  assert batch["image_mask"]["base_0_rgb"].all() and batch["image_mask"]["left_wrist_0_rgb"].all()
  assert batch["state"].shape == (b, ACTION_DIM) and batch["state"].dtype == np.float32
  assert batch["actions"].shape == (b, HORIZON, ACTION_DIM) and batch["actions"].dtype == np.float32
  np.testing.assert_array_equal(batch["actions"][..., 7:], 0)
  assert batch["actions_is_pad"].shape == (b, HORIZON) and batch["actions_is_pad"].dtype == np.bool_
  assert batch["tokenized_prompt"].shape == (b, MAX_LEN)
  assert batch["tokenized_prompt"].dtype == np.int32
  assert batch["tokenized_prompt_mask"].shape == (b, MAX_LEN)
  assert batch["tokenized_prompt_mask"].dtype == np.bool_


def test_batches_follow_the_batch_contract(dataset_dir):
  """What the loader ships is exactly pipeline.batch.spec (benchmarks compile on that spec)."""
  config = _config(dataset_dir)
  batch = next(iter(loader.make_dataset(config, split="train")))
  shapes = loader.DatasetInfo(dataset_dir).stored_image_shapes()
  spec = batch_lib.spec(config.model, config.batch_size, image_shapes=shapes)
  got = {k: (v.shape, v.dtype) for k, v in _flatten(batch)}
  want = {k: (v.shape, v.dtype) for k, v in _flatten(spec)}
  assert got == want


def test_device_resize_matches_host_resize(dataset_dir):
  on_device = next(iter(loader.make_dataset(_config(dataset_dir), split="eval")))
  config = _config(dataset_dir, resize_on_device=False)
  on_host = next(iter(loader.make_dataset(config, split="eval")))
  for key in ("base_0_rgb", "left_wrist_0_rgb"):
    assert on_host["image"][key].shape == (4, SIZE, SIZE, 3)
    device = np.asarray(preprocess.resize_with_pad(on_device["image"][key], SIZE, SIZE))
    host = on_host["image"][key].astype(np.float32) / 255 * 2 - 1
    # PIL rounds its result to uint8; the device keeps float.
    np.testing.assert_allclose(device, host, atol=1.01 * 2 / 255)
  np.testing.assert_array_equal(on_device["state"], on_host["state"])


def test_frames_of_another_size_are_resized_to_the_first(tmp_path):
  # Record 0 sets the shipped size (20 x 24); later records are twice as large.
  directory = _write_small_dataset(tmp_path / "mixed", [6, 6],
                                   image_hw=lambda i: (20, 24) if i == 0 else (40, 48))
  config = _config(directory, eval_fraction=0.5)
  for split in ("train", "eval"):
    batch = next(iter(loader.make_dataset(config, split=split)))
    assert batch["image"]["base_0_rgb"].shape == (4, 20, 24, 3)
    assert batch["image"]["left_wrist_0_rgb"].shape == (4, 20, 20, 3)


def test_train_order_is_a_seeded_shuffle_of_train_episodes(dataset_dir, record_of):
  config = _config(dataset_dir, augment=False)
  info = loader.DatasetInfo(dataset_dir)
  train_ids = sorted(info.record_indices(loader.split_episodes(info, 0.25, 0)["train"]).tolist())
  n = len(train_ids)
  ids = _ids(record_of, _take(iter(loader.make_dataset(config, split="train")), 2 * n // 4 + 1))
  first, second = ids[:n], ids[n:2 * n]
  # Each epoch is a permutation of the train records, reshuffled between epochs.
  assert sorted(first) == train_ids and sorted(second) == train_ids
  assert first != train_ids and second != first
  again = _ids(record_of, _take(iter(loader.make_dataset(config, split="train")), 3))
  assert again == ids[:12]
  other = _config(dataset_dir, shuffle_seed=1)
  assert _ids(record_of, _take(iter(loader.make_dataset(other, split="train")), 3)) != ids[:12]


def _checkpoint_and_resume(tmp_path, config, steps_before, steps_after):
  """Batches before a save, then the batches of an iterator restored from that save."""
  import orbax.checkpoint as ocp

  it = iter(loader.make_dataset(config, split="train"))
  before = _take(it, steps_before)
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                               options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(steps_before, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  _close(it)
  fresh = iter(loader.make_dataset(config, split="train"))
  restore = ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
  restored = mngr.restore(mngr.latest_step(), args=restore)
  after = _take(restored["data_iter"], steps_after)
  _close(restored["data_iter"])
  mngr.close()
  return before + after


def test_resume_from_orbax_checkpoint(dataset_dir, tmp_path):
  config = _config(dataset_dir, augment=True)
  reference = _take(iter(loader.make_dataset(config, split="train")), 5)
  _assert_batches_equal(_checkpoint_and_resume(tmp_path, config, 2, 3), reference)


def test_worker_processes_same_stream_and_resume(dataset_dir, tmp_path):
  # Worker processes change neither the stream (workers split whole batches) nor the resume
  # point.
  reference = _take(iter(loader.make_dataset(_config(dataset_dir, augment=True), split="train")), 5)
  config = _config(dataset_dir, augment=True, num_workers=2)
  _assert_batches_equal(_checkpoint_and_resume(tmp_path, config, 3, 2), reference)


def test_processes_read_disjoint_strides_of_global_order(dataset_dir, record_of):
  config = _config(dataset_dir, augment=True)
  global_batches = _take(iter(loader.make_dataset(config, split="train")), 6)
  global_ids = _ids(record_of, global_batches)
  per_process = []
  for p in range(2):
    batches = _take(iter(loader.make_dataset(config, split="train", process_index=p,
                                             process_count=2)), 6)
    assert batches[0]["state"].shape[0] == 2  # global batch 4 over 2 processes
    per_process.append(batches)
  ids = [_ids(record_of, batches) for batches in per_process]
  assert ids[0] == global_ids[0::2] and ids[1] == global_ids[1::2]
  assert not set(ids[0]) & set(ids[1])  # 24 of the ~70 train records: all distinct
  # Same images as the single-process run (the host chain has no randomness; the device
  # augmentation is keyed by the step and the position in the global batch).
  img0 = np.concatenate([b["image"]["base_0_rgb"] for b in per_process[0]])
  img_all = np.concatenate([b["image"]["base_0_rgb"] for b in global_batches])
  np.testing.assert_array_equal(img0, img_all[0::2])


def test_split_by_episode_disjoint_and_eval_fixed_shuffle(dataset_dir, record_of):
  config = _config(dataset_dir)
  info = loader.DatasetInfo(dataset_dir)
  split = loader.split_episodes(info, 0.25, 0)
  train_eps, eval_eps = set(split["train"][:, 0]), set(split["eval"][:, 0])
  assert len(eval_eps) == round(0.25 * len(info.episodes)) and not train_eps & eval_eps
  assert train_eps | eval_eps == set(info.episodes[:, 0])
  # Chosen by seed, reproducibly.
  np.testing.assert_array_equal(loader.split_episodes(info, 0.25, 0)["eval"], split["eval"])
  assert any(set(loader.split_episodes(info, 0.25, s)["eval"][:, 0]) != eval_eps for s in (1, 2, 3))

  eval_ids = info.record_indices(split["eval"]).tolist()
  batches = list(loader.make_dataset(config, split="eval"))
  got = _ids(record_of, batches)
  # One fixed permutation of the held-out records (same on every call), once, whole batches only.
  assert len(got) == len(eval_ids) // 4 * 4 and set(got) <= set(eval_ids) and len(set(got)) == len(got)
  assert got != eval_ids[:len(got)]  # batches mix episodes instead of consecutive frames
  assert _ids(record_of, list(loader.make_dataset(config, split="eval"))) == got
  # Images are the plain transform of the record (config.data.augment only acts on the device).
  plain = loader.make_frame_transform(config, info=info)
  src = grain.sources.ArrayRecordDataSource(info.shard_paths)
  np.testing.assert_array_equal(batches[0]["image"]["base_0_rgb"][1],
                                plain(got[1], src[got[1]])["image"]["base_0_rgb"])
  train_ids = _ids(record_of, _take(iter(loader.make_dataset(config, split="train")), 20))
  assert not set(train_ids) & set(eval_ids)
  repeated = iter(loader.make_dataset(_config(dataset_dir, eval_repeat=True), split="eval"))
  assert _ids(record_of, _take(repeated, 2 * len(batches))) == got + got


def test_eval_processes_yield_equal_batch_counts(dataset_dir):
  config = _config(dataset_dir)
  counts = [len(list(loader.make_dataset(config, split="eval", process_index=p, process_count=2)))
            for p in range(2)]
  assert counts[0] == counts[1] > 0


def test_corrupt_record_named_or_skipped(tmp_path):
  lengths = (5, 7, 4, 6)  # records 0-4, 5-11, 12-15, 16-21; shard 2 starts at 11
  bad = 9  # episode 1, step 4
  directory = _write_small_dataset(tmp_path / "bad", lengths, corrupt={bad})
  config = _config(directory, eval_fraction=0.0)
  where = r"record 9 \(shard frames-00000-of-00002.array_record, entry 9, episode 1 step 4\)"
  with pytest.raises(records.RecordError, match=where + ".*'image'"):
    for _ in loader.make_dataset(config, split="train"):
      pass
  config = _config(directory, eval_fraction=0.0, skip_bad_records=True)
  batches = _take(iter(loader.make_dataset(config, split="train")), 10)
  # States are mean 0 / std 1 normalized: recover the records by their raw states.
  ds = prepared.open_prepared(directory)
  table = {tuple(np.round(ds.frame(i)["state"], 3)): i for i in range(ds.num_records)}
  ids = [table[tuple(np.round(s[:8], 3))] for b in batches for s in b["state"]]
  assert bad not in ids and set(ids) == set(range(sum(lengths))) - {bad}


def test_config_errors_name_keys(dataset_dir, tmp_path):
  with pytest.raises(ValueError, match="batch_size"):
    loader.make_dataset(_config(dataset_dir), split="train", process_index=0, process_count=3)
  with pytest.raises(prepared.NotPreparedError, match="dataset_dir"):
    loader.make_dataset(_config(str(tmp_path)), split="train")
  config = _config(dataset_dir)
  config.model.action_horizon = loader.DatasetInfo(dataset_dir).action_horizon + 1
  with pytest.raises(ValueError, match="action_horizon"):
    loader.make_dataset(config, split="train")
  with pytest.raises(ValueError, match="normalization"):
    loader.make_dataset(_config(dataset_dir, normalization="minmax"), split="train")
  config = _config(dataset_dir)
  config.model.vocab_size = 100
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    loader.make_dataset(config, split="train")


def test_to_global_batch_shards_over_all_mesh_axes(dataset_dir):
  import jax
  from jax.sharding import PartitionSpec

  config = _config(dataset_dir)
  config.batch_size = 8
  batch = next(iter(loader.make_dataset(config, split="train")))
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  out = loader.to_global_batch(batch, sharding.batch_sharding(mesh))
  arr = out["actions"]
  assert isinstance(arr, jax.Array) and arr.shape == batch["actions"].shape
  assert arr.sharding.spec == PartitionSpec(("data", "fsdp"))
  assert len(arr.addressable_shards) == 8 and arr.addressable_shards[0].data.shape[0] == 1
  np.testing.assert_array_equal(np.asarray(out["image"]["base_0_rgb"]),
                                batch["image"]["base_0_rgb"])
  np.testing.assert_array_equal(np.asarray(out["image_mask"]["right_wrist_0_rgb"]),
                                batch["image_mask"]["right_wrist_0_rgb"])
