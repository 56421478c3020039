"""Session-wide synthetic datasets in every source format, and one prepared ArrayRecord dataset.

`prepared_dataset` is the dataset the loader and training tests read: a LeRobot v2.1 source of
PREPARED_EPISODES episodes (PREPARED_IMAGE_SIZE px images) prepared with action_horizon
PREPARED_HORIZON and the configs' action recipe (delta_action_dims 6).
"""
from pathlib import Path

import pytest

from pipeline.data import prepare
from pipeline.data import synthetic

IMAGE_SIZE = 32  # small images keep PNG/JPEG encoding out of the test time
NUM_EPISODES = 6
MIN_LENGTH, MAX_LENGTH = 12, 20
PREPARED_EPISODES = 6
PREPARED_IMAGE_SIZE = 64
PREPARED_HORIZON = 10

# name -> (writer format, extra writer arguments). The v3 variants cover several data files,
# small row groups (episodes crossing row-group borders) and the 'image2' wrist column.
SOURCE_VARIANTS = {
    "lerobot_v20": ("lerobot_v20", {}),
    "lerobot_v21": ("lerobot_v21", {}),
    "lerobot_v30": ("lerobot_v30", {"episodes_per_file": 4, "row_group_size": 7}),
    "lerobot_v30_image2": ("lerobot_v30", {"wrist_key": "observation.images.image2"}),
    "rlds": ("rlds", {}),
}


def write_source(root: Path, name: str, *, num_episodes: int = NUM_EPISODES, seed: int = 0,
                 image_size: int = IMAGE_SIZE) -> Path:
  """Writes the synthetic source variant `name` under `root` and returns the dir to prepare."""
  fmt, extra = SOURCE_VARIANTS[name]
  kw = dict(image_size=image_size, min_length=MIN_LENGTH, max_length=MAX_LENGTH, **extra)
  if fmt == "rlds":
    # Two suites side by side, laid out as the modified_libero_rlds download.
    half = num_episodes // 2
    synthetic.write_rlds_dataset(root / "libero_goal_no_noops" / "1.0.0", half,
                                 name="libero_goal", num_shards=2, seed=seed,
                                 suites=["libero_goal"], **kw)
    synthetic.write_rlds_dataset(root / "libero_spatial_no_noops" / "1.0.0",
                                 num_episodes - half, name="libero_spatial", num_shards=1,
                                 seed=seed + 1, suites=["libero_spatial"], **kw)
    return root
  return synthetic.write_dataset(root, fmt, num_episodes, seed=seed, **kw)


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory):
  """Factory: name in SOURCE_VARIANTS -> path of that synthetic source (written once)."""
  cache = {}

  def get(name: str) -> Path:
    if name not in cache:
      cache[name] = write_source(tmp_path_factory.mktemp(f"src_{name}"), name)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, source_dir):
  """Factory: source variant name -> path of its prepared dataset (action_horizon 5)."""
  cache = {}

  def get(name: str, action_horizon: int = 5, delta_action_dims: int = 0) -> Path:
    key = (name, action_horizon, delta_action_dims)
    if key not in cache:
      dst = tmp_path_factory.mktemp(f"prep_{name}") / "prepared"
      cache[key] = prepare.prepare(source_dir(name), dst, action_horizon=action_horizon,
                                   num_workers=1, episodes_per_shard=4,
                                   delta_action_dims=delta_action_dims)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> Path:
  """Path of a complete prepared dataset (LeRobot v2.1 source, action_horizon 10)."""
  root = tmp_path_factory.mktemp("prepared_dataset")
  src = synthetic.write_lerobot_dataset(
      root / "source", PREPARED_EPISODES, version="v2.1", image_size=PREPARED_IMAGE_SIZE,
      min_length=MIN_LENGTH, max_length=MAX_LENGTH, seed=123)
  return prepare.prepare(src, root / "prepared", action_horizon=PREPARED_HORIZON,
                         num_workers=1, episodes_per_shard=2, delta_action_dims=6)


# ----------------------------------------------------------------------------------------------
# Independent readers of the sources: pyarrow / TensorFlow directly, no pipeline.data.sources.


def _reference_lerobot_v2(root: Path) -> list[dict]:
  import json
  import numpy as np
  import pyarrow.parquet as pq
  tasks = {}
  with open(root / "meta" / "tasks.jsonl") as f:
    for line in f:
      row = json.loads(line)
      tasks[row["task_index"]] = row["task"]
  episodes = []
  for path in sorted(root.glob("data/chunk-*/episode_*.parquet")):
    rows = pq.read_table(path).to_pylist()
    rows.sort(key=lambda r: r["frame_index"])
    episodes.append({
        "episode_index": rows[0]["episode_index"],
        "image": [r["image"]["bytes"] for r in rows],
        "wrist_image": [r["wrist_image"]["bytes"] for r in rows],
        "state": np.array([r["state"] for r in rows], np.float32),
        "actions": np.array([r["actions"] for r in rows], np.float32),
        "task_index": [r["task_index"] for r in rows],
        "prompt": [tasks[r["task_index"]] for r in rows],
    })
  return sorted(episodes, key=lambda e: e["episode_index"])


def _reference_lerobot_v3(root: Path) -> list[dict]:
  import json
  import numpy as np
  import pyarrow.parquet as pq
  info = json.loads((root / "meta" / "info.json").read_text())
  feats = info["features"]
  wrist = next(k for k in ("observation.images.wrist_image", "observation.images.image2")
               if k in feats)
  task_table = pq.read_table(root / "meta" / "tasks.parquet").to_pylist()
  tasks = {r["task_index"]: r["__index_level_0__"] for r in task_table}
  by_episode = {}
  for path in sorted(root.glob("data/chunk-*/file-*.parquet")):
    for r in pq.read_table(path).to_pylist():
      by_episode.setdefault(r["episode_index"], []).append(r)
  episodes = []
  for index in sorted(by_episode):
    rows = sorted(by_episode[index], key=lambda r: r["frame_index"])
    episodes.append({
        "episode_index": index,
        "image": [r["observation.images.image"]["bytes"] for r in rows],
        "wrist_image": [r[wrist]["bytes"] for r in rows],
        "state": np.array([r["observation.state"] for r in rows], np.float32),
        "actions": np.array([r["action"] for r in rows], np.float32),
        "task_index": [r["task_index"] for r in rows],
        "prompt": [tasks[r["task_index"]] for r in rows],
    })
  return episodes


def _reference_rlds(root: Path) -> list[dict]:
  import numpy as np
  import tensorflow as tf
  files = []
  for info in sorted(root.glob("**/dataset_info.json")):
    files += sorted(str(p) for p in info.parent.glob("*.tfrecord*"))
  episodes, tasks = [], {}
  for raw in tf.data.TFRecordDataset(files):  # checks the record CRCs too
    feats = tf.train.Example.FromString(raw.numpy()).features.feature
    prompts = [p.decode() for p in feats["steps/language_instruction"].bytes_list.value]
    n = len(prompts)
    for p in prompts:
      tasks.setdefault(p, len(tasks))
    episodes.append({
        "episode_index": len(episodes),
        "image": list(feats["steps/observation/image"].bytes_list.value),
        "wrist_image": list(feats["steps/observation/wrist_image"].bytes_list.value),
        "state": np.array(feats["steps/observation/state"].float_list.value,
                          np.float32).reshape(n, -1),
        "actions": np.array(feats["steps/action"].float_list.value, np.float32).reshape(n, -1),
        "task_index": [tasks[p] for p in prompts],
        "prompt": prompts,
    })
  return episodes


def read_reference(name: str, root: Path) -> list[dict]:
  """Episodes of source variant `name` at `root`, read without pipeline.data.sources."""
  fmt = SOURCE_VARIANTS[name][0]
  if fmt in ("lerobot_v20", "lerobot_v21"):
    return _reference_lerobot_v2(root)
  if fmt == "lerobot_v30":
    return _reference_lerobot_v3(root)
  return _reference_rlds(root)


@pytest.fixture(scope="session")
def reference_episodes(source_dir):
  """Factory: source variant name -> its episodes as read by the independent readers."""
  cache = {}

  def get(name: str) -> list[dict]:
    if name not in cache:
      cache[name] = read_reference(name, source_dir(name))
    return cache[name]

  return get
