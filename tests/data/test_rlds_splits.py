"""RLDS splits: only the chosen TFDS split is prepared, its shard counts are checked.

The datasets here are written by TensorFlow's own TFRecordWriter / tf.train.Example (and
ArrayRecordWriter for array_record shards), with JPEGs from tf.io.encode_jpeg: nothing of
pipeline.data's codec or synthetic writer takes part, except where a test says so.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import prepare
from pipeline.data import prepared
from pipeline.data import synthetic

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def _episodes(n, seed):
  return list(synthetic.generate_episodes(n, seed=seed, image_size=16, min_length=3,
                                          max_length=5))


def _tf_example(ep) -> bytes:
  import tensorflow as tf
  n = len(ep.state)

  def bytes_feature(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

  def float_feature(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))

  def int_feature(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

  last = [int(t == n - 1) for t in range(n)]
  feature = {
      "episode_metadata/file_path": bytes_feature([b"/data/demo.hdf5"]),
      "steps/observation/image": bytes_feature([tf.io.encode_jpeg(f).numpy() for f in ep.image]),
      "steps/observation/wrist_image": bytes_feature(
          [tf.io.encode_jpeg(f).numpy() for f in ep.wrist_image]),
      "steps/observation/state": float_feature(ep.state.reshape(-1)),
      "steps/action": float_feature(ep.actions.reshape(-1)),
      "steps/language_instruction": bytes_feature([ep.task.encode()] * n),
      "steps/is_first": int_feature([int(t == 0) for t in range(n)]),
      "steps/is_last": int_feature(last),
      "steps/is_terminal": int_feature(last),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfds(root: Path, splits: dict, *, name: str = "libero_goal",
               file_format: str = "tfrecord") -> Path:
  """A TFDS dataset version dir: splits = {split name: [[episodes of shard 0], ...]}."""
  import tensorflow as tf
  from array_record.python import array_record_module
  root.mkdir(parents=True, exist_ok=True)
  entries = []
  for split, shards in splits.items():
    for k, shard in enumerate(shards):
      path = str(root / f"{name}-{split}.{file_format}-{k:05d}-of-{len(shards):05d}")
      if file_format == "tfrecord":
        with tf.io.TFRecordWriter(path) as writer:
          for ep in shard:
            writer.write(_tf_example(ep))
      else:
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for ep in shard:
          writer.write(_tf_example(ep))
        writer.close()
    entries.append({"filepathTemplate": TEMPLATE, "name": split, "numBytes": "0",
                    "shardLengths": [str(len(shard)) for shard in shards]})
  info = {"fileFormat": file_format, "moduleName": f"{name}_dataset_builder", "name": name,
          "splits": entries, "version": "1.0.0"}
  (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
  return root


def _prepared_episodes(dst):
  """Per episode of a prepared dataset: (prompt, states [T, 8], first actions [T, 7])."""
  ds = prepared.open_prepared(dst)
  out = []
  for e in ds.manifest["episodes"]:
    frames = [ds.frame(i) for i in range(e["start"], e["end"])]
    out.append((frames[0]["prompt"], np.stack([f["state"] for f in frames]),
                np.stack([f["actions"][0] for f in frames])))
  ds.close()
  return out


def _assert_same_episodes(dst, episodes):
  got = _prepared_episodes(dst)
  assert len(got) == len(episodes)
  for (prompt, states, actions), ep in zip(got, episodes):
    assert prompt == ep.task
    np.testing.assert_array_equal(states, ep.state)
    np.testing.assert_array_equal(actions, ep.actions)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_train_split_is_the_default_and_val_stays_out(tmp_path, file_format):
  train, val = _episodes(3, seed=1), _episodes(2, seed=2)
  src = write_tfds(tmp_path / "src", {"train": [train[:2], train[2:]], "val": [val]},
                   file_format=file_format)
  dst = prepare.prepare(src, tmp_path / "train", action_horizon=2)
  assert prepared.open_prepared(dst).manifest["split"] == "train"
  _assert_same_episodes(dst, train)
  dst = prepare.prepare(src, tmp_path / "val", action_horizon=2, split="val")
  assert prepared.open_prepared(dst).manifest["split"] == "val"
  _assert_same_episodes(dst, val)


def test_without_train_split_a_choice_is_required(tmp_path):
  val, test = _episodes(2, seed=3), _episodes(1, seed=4)
  src = write_tfds(tmp_path / "src", {"val": [val], "test": [test]})
  with pytest.raises(prepare.PrepareError,
                     match=r"no 'train' split, and several others \['test', 'val'\]; "
                           r"pass --split=NAME"):
    prepare.prepare(src, tmp_path / "dst")
  with pytest.raises(prepare.PrepareError,
                     match=r"no split 'train'; the dataset's splits are \['test', 'val'\]"):
    prepare.prepare(src, tmp_path / "dst", split="train")
  assert not (tmp_path / "dst").exists()
  dst = prepare.prepare(src, tmp_path / "dst", action_horizon=2, split="test")
  assert prepared.open_prepared(dst).manifest["split"] == "test"
  _assert_same_episodes(dst, test)


def test_a_lone_split_is_read_and_named(tmp_path, caplog):
  val = _episodes(2, seed=5)
  src = write_tfds(tmp_path / "src", {"val": [val[:1], val[1:]]})
  with caplog.at_level("WARNING"):
    dst = prepare.prepare(src, tmp_path / "dst", action_horizon=2)
  assert "has no 'train' split; reading its only split 'val'" in caplog.text
  assert prepared.open_prepared(dst).manifest["split"] == "val"
  _assert_same_episodes(dst, val)


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_shard_lengths_are_checked(tmp_path, file_format):
  src = write_tfds(tmp_path / "src", {"train": [_episodes(2, seed=6), _episodes(2, seed=7)]},
                   file_format=file_format)
  info = json.loads((src / "dataset_info.json").read_text())
  info["splits"][0]["shardLengths"] = ["2", "3"]
  (src / "dataset_info.json").write_text(json.dumps(info))
  shard = f"libero_goal-train.{file_format}-00001-of-00002"
  with pytest.raises(prepare.PrepareError,
                     match=f"{shard}: 2 records, but dataset_info.json's shardLengths says 3"):
    prepare.prepare(src, tmp_path / "dst")
  os.remove(src / shard)
  with pytest.raises(prepare.PrepareError,
                     match=f"{shard}: shard 1 of split 'train' listed in dataset_info.json is "
                           "missing"):
    prepare.prepare(src, tmp_path / "dst")


def test_split_across_dataset_dirs(tmp_path):
  # Written by the synthetic writer, one split at a time, as TFDS lists them side by side.
  kw = dict(image_size=16, min_length=3, max_length=5)
  goal = tmp_path / "src" / "libero_goal_no_noops" / "1.0.0"
  synthetic.write_rlds_dataset(goal, 2, name="libero_goal", seed=8, **kw)
  synthetic.write_rlds_dataset(goal, 1, name="libero_goal", seed=9, split="val", **kw)
  spatial = tmp_path / "src" / "libero_spatial_no_noops" / "1.0.0"
  synthetic.write_rlds_dataset(spatial, 3, name="libero_spatial", num_shards=1, seed=10, **kw)
  info = json.loads((goal / "dataset_info.json").read_text())
  assert [s["name"] for s in info["splits"]] == ["train", "val"]
  assert [s["shardLengths"] for s in info["splits"]] == [["1", "1"], ["1"]]
  dst = prepare.prepare(tmp_path / "src", tmp_path / "dst", action_horizon=2)
  m = prepared.open_prepared(dst).manifest
  assert m["split"] == "train" and m["num_episodes"] == 5
  with pytest.raises(prepare.PrepareError,
                     match=r"libero_spatial_no_noops/1.0.0/dataset_info.json: no split 'val'"):
    prepare.prepare(tmp_path / "src", tmp_path / "val", split="val")


def test_lerobot_sources_have_no_splits(tmp_path):
  src = synthetic.write_lerobot_dataset(tmp_path / "src", 1, image_size=16, min_length=3,
                                        max_length=4)
  with pytest.raises(prepare.PrepareError, match="has no splits.*applies to RLDS sources only"):
    prepare.prepare(src, tmp_path / "dst", split="train")
  dst = prepare.prepare(src, tmp_path / "dst", action_horizon=2)
  assert prepared.open_prepared(dst).manifest["split"] is None


def test_cli_split_flag(tmp_path):
  src = write_tfds(tmp_path / "src", {"val": [_episodes(1, seed=11)],
                                      "test": [_episodes(2, seed=12)]})

  def run(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.data.prepare", f"--src={src}",
                           "--action_horizon=2", "--num_workers=1", *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)

  proc = run(f"--dst={tmp_path / 'dst'}")
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("prepare failed: ") and "['test', 'val']" in last
  assert "--split=NAME" in last
  proc = run(f"--dst={tmp_path / 'dst'}", "--split=test")
  assert proc.returncode == 0, proc.stderr
  assert prepared.open_prepared(tmp_path / "dst").manifest["split"] == "test"
