"""Synthetic episodes: the on-disk layouts of each format, and that the actions are learnable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import synthetic

FLOAT_LIST = lambda n: pa.list_(pa.field("element", pa.float32()), n)
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
REPO = Path(__file__).resolve().parents[2]


def test_task_list_matches_asset():
  table = synthetic.libero_tasks()
  assert set(table) >= set(synthetic.SUITES)
  tasks = synthetic.task_list()
  assert len(tasks) == 40 == len(set(tasks))
  assert tasks[:10] == table["libero_10"] and tasks[-10:] == table["libero_spatial"]
  with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_99'"):
    synthetic.task_list(["libero_99"])


def test_lerobot_v21_layout(source_dir):
  root = source_dir("lerobot_v21")
  info = json.loads((root / "meta" / "info.json").read_text())
  assert info["codebase_version"] == "v2.1"
  for key in ("robot_type", "total_episodes", "total_frames", "total_tasks", "total_videos",
              "total_chunks", "chunks_size", "fps", "splits", "data_path", "video_path",
              "features"):
    assert key in info, key
  assert info["data_path"] == "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
  assert list(info["features"]) == ["image", "wrist_image", "state", "actions", "timestamp",
                                    "frame_index", "episode_index", "index", "task_index"]
  assert info["features"]["image"]["dtype"] == "image"
  assert info["features"]["state"] == {"dtype": "float32", "shape": [8], "names": ["state"]}
  assert sorted(p.name for p in (root / "meta").iterdir()) == [
      "episodes.jsonl", "episodes_stats.jsonl", "info.json", "tasks.jsonl"]
  episodes = [json.loads(l) for l in (root / "meta" / "episodes.jsonl").read_text().splitlines()]
  tasks = [json.loads(l) for l in (root / "meta" / "tasks.jsonl").read_text().splitlines()]
  stats = [json.loads(l)
           for l in (root / "meta" / "episodes_stats.jsonl").read_text().splitlines()]
  assert len(episodes) == info["total_episodes"] == len(stats)
  assert sum(e["length"] for e in episodes) == info["total_frames"]
  assert [t["task_index"] for t in tasks] == list(range(info["total_tasks"]))
  assert set(stats[0]["stats"]) == set(info["features"])
  assert np.array(stats[0]["stats"]["image"]["mean"]).shape == (3, 1, 1)
  assert stats[0]["stats"]["state"]["count"] == [episodes[0]["length"]]

  index = 0
  for ep in episodes:
    path = root / "data" / "chunk-000" / f"episode_{ep['episode_index']:06d}.parquet"
    table = pq.read_table(path)
    assert table.schema.names == list(info["features"])
    types = dict(zip(table.schema.names, table.schema.types))
    assert types["image"] == IMAGE and types["wrist_image"] == IMAGE
    assert types["state"] == FLOAT_LIST(8) and types["actions"] == FLOAT_LIST(7)
    assert types["timestamp"] == pa.float32()
    assert all(types[k] == pa.int64() for k in ("frame_index", "episode_index", "index",
                                                "task_index"))
    assert b"huggingface" in table.schema.metadata
    rows = table.to_pylist()
    assert len(rows) == ep["length"]
    assert [r["frame_index"] for r in rows] == list(range(len(rows)))
    assert [r["index"] for r in rows] == list(range(index, index + len(rows)))
    np.testing.assert_allclose([r["timestamp"] for r in rows],
                               np.arange(len(rows), dtype=np.float32) / info["fps"])
    assert rows[0]["image"]["bytes"].startswith(b"\x89PNG")
    assert rows[0]["image"]["path"] == "frame_000000.png"
    assert tasks[rows[0]["task_index"]]["task"] == ep["tasks"][0]
    index += len(rows)


def test_lerobot_v20_has_global_stats(source_dir):
  meta = source_dir("lerobot_v20") / "meta"
  assert json.loads((meta / "info.json").read_text())["codebase_version"] == "v2.0"
  assert (meta / "stats.json").is_file() and not (meta / "episodes_stats.jsonl").exists()
  stats = json.loads((meta / "stats.json").read_text())
  assert set(stats["state"]) == {"min", "max", "mean", "std"} and len(stats["state"]["mean"]) == 8


def test_lerobot_v30_layout(source_dir):
  root = source_dir("lerobot_v30")
  info = json.loads((root / "meta" / "info.json").read_text())
  assert info["codebase_version"] == "v3.0"
  assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
  assert "total_chunks" not in info and "total_videos" not in info
  assert info["video_path"] is None and info["data_files_size_in_mb"] == 100
  assert all(spec["fps"] == info["fps"] for spec in info["features"].values())
  assert {"observation.images.image", "observation.images.wrist_image", "observation.state",
          "action"} <= set(info["features"])
  tasks = pq.read_table(root / "meta" / "tasks.parquet")
  assert tasks.schema.names == ["task_index", "__index_level_0__"]
  episodes = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
  for col in ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
              "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
              "meta/episodes/file_index", "stats/observation.state/mean", "stats/action/std"):
    assert col in episodes.schema.names, col
  rows = episodes.to_pylist()
  assert rows[0]["dataset_from_index"] == 0
  for a, b in zip(rows, rows[1:]):
    assert b["dataset_from_index"] == a["dataset_to_index"]
  data = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet")
  types = dict(zip(data.schema.names, data.schema.types))
  assert types["observation.images.image"] == IMAGE and types["action"] == FLOAT_LIST(7)
  assert data.num_rows == sum(r["length"] for r in rows if r["data/file_index"] == 0)


def test_rlds_layout(source_dir):
  import tensorflow as tf
  version_dir = source_dir("rlds") / "libero_goal_no_noops" / "1.0.0"
  info = json.loads((version_dir / "dataset_info.json").read_text())
  assert info["name"] == "libero_goal" and info["version"] == "1.0.0"
  assert info["fileFormat"] == "tfrecord"
  split = info["splits"][0]
  assert split["name"] == "train"
  assert split["filepathTemplate"] == "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  shards = sorted(p.name for p in version_dir.glob("*.tfrecord*"))
  assert shards == ["libero_goal-train.tfrecord-00000-of-00002",
                    "libero_goal-train.tfrecord-00001-of-00002"]
  assert (version_dir / "features.json").is_file()
  lengths = []
  for shard in shards:
    records = list(tf.data.TFRecordDataset(str(version_dir / shard)))
    lengths.append(str(len(records)))
    for raw in records:
      feats = tf.train.Example.FromString(raw.numpy()).features.feature
      assert set(feats) == {
          "episode_metadata/file_path", "steps/observation/image",
          "steps/observation/wrist_image", "steps/observation/state",
          "steps/observation/joint_state", "steps/action", "steps/discount", "steps/reward",
          "steps/is_first", "steps/is_last", "steps/is_terminal", "steps/language_instruction"}
      n = len(feats["steps/language_instruction"].bytes_list.value)
      assert len(feats["steps/observation/image"].bytes_list.value) == n
      assert feats["steps/observation/image"].bytes_list.value[0][:3] == b"\xff\xd8\xff"
      assert len(feats["steps/observation/state"].float_list.value) == 8 * n
      assert len(feats["steps/action"].float_list.value) == 7 * n
      assert list(feats["steps/is_last"].int64_list.value) == [0] * (n - 1) + [1]
  assert split["shardLengths"] == lengths


def test_episodes_are_learnable():
  """Actions are a function of the target, the state and the task; the images show the target."""
  eps = list(synthetic.generate_episodes(4, seed=7, image_size=64, min_length=15,
                                         max_length=15))
  located = 0
  for ep in eps:
    tz, goal_rot = synthetic.task_goal(ep.task_id)
    assert ep.target[2] == tz
    for t in range(len(ep.state)):
      np.testing.assert_array_equal(ep.actions[t],
                                    synthetic.expert_action(ep.state[t], ep.target, goal_rot))
    # The target's image position: the wholly red pixels of a frame where the gripper is clear.
    u, v = synthetic.project(ep.target)
    clear = [t for t in range(len(ep.state))
             if np.hypot(*np.subtract(synthetic.project(ep.state[t]), (u, v))) > 0.6]
    for t in clear[:1]:
      rows, cols = np.nonzero(np.all(ep.image[t] == synthetic.RED, axis=-1))
      np.testing.assert_allclose((np.array([cols.mean(), rows.mean()]) + 0.5) / 64 * 2 - 1,
                                 (u, v), atol=1.5 / 32)
      located += 1
    # The state integrates the actions (plus small noise).
    moved = ep.state[1:, :3] - ep.state[:-1, :3]
    np.testing.assert_allclose(moved, synthetic.STEP * ep.actions[:-1, :3], atol=0.03)
    assert set(np.unique(ep.actions[:, 6])) <= {-1.0, 1.0}
  assert located >= 2
  # Different tasks at the same state ask for different actions.
  state = eps[0].state[0]
  a = synthetic.expert_action(state, np.array([0, 0, synthetic.task_goal(0)[0]], np.float32),
                              synthetic.task_goal(0)[1])
  b = synthetic.expert_action(state, np.array([0, 0, synthetic.task_goal(7)[0]], np.float32),
                              synthetic.task_goal(7)[1])
  assert not np.allclose(a, b)


def test_images_show_every_state_dim_at_32px():
  """The energy head sees images and prompt, not the state: each state dim the demonstrator
  acts on (position, orientation, gripper) and the target's position must show at the tiny
  model's 32 px."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    state = np.zeros(synthetic.STATE_DIM, np.float32)
    state[:3] = rng.uniform(-0.8, 0.8, 3)
    state[3:6] = rng.uniform(-0.4, 0.4, 3)
    state[6] = rng.uniform(0, synthetic.GRIPPER_OPEN)
    state[7] = -state[6]
    target = np.array([*rng.uniform(-0.7, 0.7, 2), 0.0], np.float32)
    base = np.concatenate(synthetic.render(3, target, state, 32)).astype(int)
    moves = [("state", d, 0.05) for d in range(6)] + [("state", 6, 0.005 * np.sign(0.02 - state[6]))]
    moves += [("target", d, 0.05) for d in range(2)]
    for what, d, step in moves:
      s, t = state.copy(), target.copy()
      (s if what == "state" else t)[d] += step
      moved = np.concatenate(synthetic.render(3, t, s, 32)).astype(int)
      assert np.abs(moved - base).sum() > 200, (what, d)


def test_generation_is_deterministic():
  a = list(synthetic.generate_episodes(2, seed=3, image_size=16))
  b = list(synthetic.generate_episodes(2, seed=3, image_size=16))
  c = list(synthetic.generate_episodes(2, seed=4, image_size=16))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.actions, y.actions)
  assert not np.array_equal(a[0].state[0], c[0].state[0])
  assert a[0].image.shape[1:] == (16, 16, 3) and a[0].image.dtype == np.uint8
  assert 12 <= len(a[0].state) <= 20


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pipeline.data.synthetic", *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                        text=True, timeout=120)


def test_cli(tmp_path):
  proc = _cli(f"--dst={tmp_path / 'd'}", "--format=lerobot_v30", "--episodes=2",
              "--image_size=8", "--min_length=2", "--max_length=3", "--suites=libero_object")
  assert proc.returncode == 0, proc.stderr
  assert "wrote 2 lerobot_v30 episodes" in proc.stdout
  tasks = pq.read_table(tmp_path / "d" / "meta" / "tasks.parquet").column(
      "__index_level_0__").to_pylist()
  assert set(tasks) <= set(synthetic.libero_tasks()["libero_object"])
  with pytest.raises(ValueError, match="unknown synthetic format"):
    synthetic.write_dataset(tmp_path / "e", "hdf5", 1)
  proc = _cli(f"--dst={tmp_path / 'f'}", "--min_length=5", "--max_length=2")
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "synthetic failed: need 1 <= min_length <= max_length, got 5, 2")
  proc = _cli("--format=hdf5", f"--dst={tmp_path / 'g'}")
  assert proc.returncode != 0 and "--format" in proc.stderr
  assert not (tmp_path / "g").exists()


def test_ensure_dataset_writes_once(tmp_path):
  root = tmp_path / "syn"
  kw = dict(image_size=8, min_length=2, max_length=3)
  synthetic.ensure_dataset(root, "lerobot_v21", 2, **kw)
  info = root / "meta" / "info.json"
  before = info.stat().st_mtime_ns
  synthetic.ensure_dataset(root, "lerobot_v21", 2, **kw)
  assert info.stat().st_mtime_ns == before
  assert [p.name for p in tmp_path.iterdir()] == ["syn"]
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x").write_text("x")
  with pytest.raises(FileExistsError, match="holds no rlds dataset"):
    synthetic.ensure_dataset(tmp_path / "other", "rlds", 2, **kw)
