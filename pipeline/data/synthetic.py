"""Procedural LIBERO-like episodes, written in the real on-disk formats.

The episodes are learnable: every action is a fixed function of what the images, the state and the
task string show, so a model that reads its inputs can drive the flow loss well below that of one
that ignores them.

Scene (coordinates in [-1, 1]):
  * A red target blob sits at (tx, ty) in the agent-view image; the end effector is a square at
    the state's (x, y), drawn larger when it is higher (z) and green while the gripper is closed.
  * The target height tz and the goal orientation are not drawn: they follow from the task (its
    position in the LIBERO task list), so the prompt matters too.
  * The wrist camera shows the target relative to the end effector (offset blob that grows as the
    heights meet) and the gripper opening as a bar.
Policy (`expert_action`): move toward the target, rotate toward the task's goal orientation,
close the gripper when near. The state integrates the actions.

State (8) = [x, y, z, rx, ry, rz, q, -q] (gripper finger positions), actions (7) =
[dx, dy, dz, drx, dry, drz, gripper], gripper -1 open / +1 close, as in LIBERO.

Writers: `write_lerobot_dataset` (codebase v2.0, v2.1 or v3.0 PNG-in-parquet), `write_rlds_dataset`
(TFDS TFRecord shards with JPEG images), `write_dataset` (by format name). Command line:
  python -m pipeline.data.synthetic --dst=DIR --format=lerobot_v21 --episodes=N
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.data import sources

ASSETS = Path(__file__).resolve().parent / "assets"
# The order openpi's LeRobot conversion read the four suites in.
SUITES = ("libero_10", "libero_goal", "libero_object", "libero_spatial")
STATE_DIM = 8
ACTION_DIM = 7
MAX_DELTA = 0.9375  # LIBERO's OSC actions saturate here
STEP = 0.12  # how far one action moves the state
FORMATS = ("lerobot_v20", "lerobot_v21", "lerobot_v30", "rlds")


def libero_tasks() -> dict[str, list[str]]:
  """Suite name -> its 10 task strings (benchmark order)."""
  with open(ASSETS / "libero_tasks.json", encoding="utf-8") as f:
    return json.load(f)


def task_list(suites: Sequence[str] | None = None) -> list[str]:
  """Task strings of `suites` (default: the four standard suites), concatenated."""
  table = libero_tasks()
  out = []
  for suite in suites or SUITES:
    if suite not in table:
      raise ValueError(f"unknown LIBERO suite {suite!r}; known: {sorted(table)}")
    out += table[suite]
  return out


@dataclasses.dataclass
class SyntheticEpisode:
  task_id: int  # position in the task list; drives the hidden part of the policy
  task: str
  image: np.ndarray  # uint8[T, S, S, 3]
  wrist_image: np.ndarray  # uint8[T, S, S, 3]
  state: np.ndarray  # f32[T, 8]
  actions: np.ndarray  # f32[T, 7]


def task_goal(task_id: int) -> tuple[float, np.ndarray]:
  """Target height and goal orientation that the task string implies."""
  z = float(np.linspace(-0.6, 0.6, 5)[task_id % 5])
  rot = np.array([0.0, 0.0, 0.3 if (task_id // 5) % 2 else -0.3], np.float32)
  return z, rot


def expert_action(state: np.ndarray, target: np.ndarray, goal_rot: np.ndarray) -> np.ndarray:
  """The demonstrator: f32[7] from the current state, 3-d target and goal orientation."""
  delta = target - state[:3]
  action = np.empty(ACTION_DIM, np.float32)
  action[:3] = np.clip(2.5 * delta, -MAX_DELTA, MAX_DELTA)
  action[3:6] = np.clip(2.0 * (goal_rot - state[3:6]), -MAX_DELTA, MAX_DELTA)
  action[6] = 1.0 if np.linalg.norm(delta) < 0.25 else -1.0
  return action


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
  return np.meshgrid(coords, coords, indexing="ij")  # rows = y, cols = x


def _render_agentview(yy, xx, task_id, target, state) -> np.ndarray:
  size = yy.shape[0]
  img = np.empty((size, size, 3), np.float32)
  # Slight per-task tint and a vertical gradient so the background is not flat.
  tint = np.array([(task_id * 37) % 64, (task_id * 17) % 64, (task_id * 53) % 64], np.float32)
  img[:] = 70 + tint + 30 * (yy[..., None] + 1)
  blob = (xx - target[0]) ** 2 + (yy - target[1]) ** 2 < 0.16 ** 2
  img[blob] = (220, 40, 40)
  half = 0.06 + 0.03 * (state[2] + 1)
  eef = (np.abs(xx - state[0]) < half) & (np.abs(yy - state[1]) < half)
  closed = state[6] < 0.02
  img[eef] = (40, 200, 60) if closed else (40, 80, 230)
  return img.astype(np.uint8)


def _render_wrist(yy, xx, target, state) -> np.ndarray:
  size = yy.shape[0]
  img = np.full((size, size, 3), 35, np.float32)
  rel = (target[:2] - state[:2]) * 0.8
  radius = 0.12 + 0.25 * max(0.0, 1 - abs(float(target[2] - state[2])))
  blob = (xx - rel[0]) ** 2 + (yy - rel[1]) ** 2 < radius ** 2
  img[blob] = (230, 60, 50)
  cross = (np.abs(xx) < 0.03) | (np.abs(yy) < 0.03)
  img[cross & (np.abs(xx) < 0.3) & (np.abs(yy) < 0.3)] = (240, 240, 240)
  opening = float(np.clip(state[6] / 0.04, 0, 1))
  bar = (yy > 0.85) & (np.abs(xx) < 0.1 + 0.8 * opening)
  img[bar] = (250, 210, 40)
  return img.astype(np.uint8)


def make_episode(rng: np.random.Generator, task_id: int, task: str, length: int,
                 image_size: int = 256) -> SyntheticEpisode:
  """One episode of `length` frames for task `task_id`."""
  tz, goal_rot = task_goal(task_id)
  target = np.array([*rng.uniform(-0.7, 0.7, 2), tz], np.float32)
  state = np.zeros(STATE_DIM, np.float32)
  state[:3] = rng.uniform(-0.8, 0.8, 3)
  state[3:6] = rng.uniform(-0.4, 0.4, 3)
  state[6], state[7] = 0.04, -0.04
  yy, xx = _grid(image_size)
  images, wrists, states, actions = [], [], [], []
  for _ in range(length):
    action = expert_action(state, target, goal_rot)
    images.append(_render_agentview(yy, xx, task_id, target, state))
    wrists.append(_render_wrist(yy, xx, target, state))
    states.append(state.copy())
    actions.append(action)
    state = state.copy()
    state[:3] += STEP * action[:3] + rng.normal(0, 0.005, 3).astype(np.float32)
    state[3:6] += STEP * action[3:6]
    q = state[6] + 0.5 * ((0.0 if action[6] > 0 else 0.04) - state[6])
    state[6], state[7] = q, -q
  return SyntheticEpisode(task_id=task_id, task=task, image=np.stack(images),
                          wrist_image=np.stack(wrists), state=np.stack(states),
                          actions=np.stack(actions))


def generate_episodes(num_episodes: int, *, seed: int = 0, image_size: int = 256,
                      min_length: int = 12, max_length: int = 20,
                      suites: Sequence[str] | None = None) -> Iterator[SyntheticEpisode]:
  """Yields `num_episodes` episodes with random tasks and lengths in [min_length, max_length]."""
  if min_length < 1 or max_length < min_length:
    raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
  tasks = task_list(suites)
  rng = np.random.default_rng(seed)
  for _ in range(num_episodes):
    task_id = int(rng.integers(len(tasks)))
    length = int(rng.integers(min_length, max_length + 1))
    yield make_episode(rng, task_id, tasks[task_id], length, image_size)


def encode_image(img: np.ndarray, fmt: str = "png") -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(img).save(buf, format="PNG")
  else:
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# LeRobot writers.

# Role -> column name for each codebase version.
V2_KEYS = {"image": "image", "wrist_image": "wrist_image", "state": "state",
           "actions": "actions"}
V3_KEYS = {"image": "observation.images.image", "wrist_image": "observation.images.wrist_image",
           "state": "observation.state", "actions": "action"}


def _features(keys: dict, image_size: int, version: str, fps: int) -> dict:
  shape = [image_size, image_size, 3]
  feats = {
      keys["image"]: {"dtype": "image", "shape": shape, "names": ["height", "width", "channel"]},
      keys["wrist_image"]: {"dtype": "image", "shape": shape,
                            "names": ["height", "width", "channel"]},
      keys["state"]: {"dtype": "float32", "shape": [STATE_DIM], "names": ["state"]},
      keys["actions"]: {"dtype": "float32", "shape": [ACTION_DIM], "names": ["actions"]},
      "timestamp": {"dtype": "float32", "shape": [1], "names": None},
      "frame_index": {"dtype": "int64", "shape": [1], "names": None},
      "episode_index": {"dtype": "int64", "shape": [1], "names": None},
      "index": {"dtype": "int64", "shape": [1], "names": None},
      "task_index": {"dtype": "int64", "shape": [1], "names": None},
  }
  if version == "v3.0":
    for spec in feats.values():
      spec["fps"] = fps
  return feats


def _hf_metadata(features: dict) -> bytes:
  """The `huggingface` schema metadata that the datasets library writes."""
  out = {}
  for key, spec in features.items():
    if spec["dtype"] == "image":
      out[key] = {"_type": "Image"}
    elif spec["shape"] == [1]:
      out[key] = {"dtype": spec["dtype"], "_type": "Value"}
    else:
      out[key] = {"feature": {"dtype": spec["dtype"], "_type": "Value"},
                  "length": spec["shape"][0], "_type": "Sequence"}
  return json.dumps({"info": {"features": out}}).encode()


def _episode_table(ep: SyntheticEpisode, keys: dict, features: dict, episode_index: int,
                   task_index: int, start: int, fps: int):
  """Arrow table of one episode with the column types of a LeRobot parquet file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  n = len(ep.state)
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

  def images(frames):
    return pa.array([{"bytes": encode_image(f), "path": f"frame_{t:06d}.png"}
                     for t, f in enumerate(frames)], type=image_type)

  def vectors(x):
    return pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1), pa.float32()), type=pa.list_(pa.field("element", pa.float32()),
                                                              x.shape[1]))

  columns = {
      keys["image"]: images(ep.image),
      keys["wrist_image"]: images(ep.wrist_image),
      keys["state"]: vectors(ep.state),
      keys["actions"]: vectors(ep.actions),
      "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps, pa.float32()),
      "frame_index": pa.array(np.arange(n), pa.int64()),
      "episode_index": pa.array(np.full(n, episode_index), pa.int64()),
      "index": pa.array(np.arange(start, start + n), pa.int64()),
      "task_index": pa.array(np.full(n, task_index), pa.int64()),
  }
  table = pa.table(columns)
  return table.replace_schema_metadata({"huggingface": _hf_metadata(features)})


def _image_stats(frames: np.ndarray) -> dict:
  """Per-channel stats in [0, 1] from a sample of downsampled frames (as lerobot estimates them)."""
  count = len(frames)
  step = max(1, frames.shape[1] // 64)
  sample = frames[np.linspace(0, count - 1, min(count, 20)).astype(int), ::step, ::step]
  x = sample.astype(np.float32) / 255.0
  per_channel = lambda v: [[[float(c)]] for c in v]  # (3, 1, 1) as lerobot stores them
  return {"min": per_channel(x.min((0, 1, 2))), "max": per_channel(x.max((0, 1, 2))),
          "mean": per_channel(x.mean((0, 1, 2))), "std": per_channel(x.std((0, 1, 2))),
          "count": [count]}


def _vector_stats(x: np.ndarray) -> dict:
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
          "std": x.std(0).tolist(), "count": [len(x)]}


def _episode_stats(ep: SyntheticEpisode, keys: dict, episode_index: int, task_index: int,
                   start: int, fps: int) -> dict:
  n = len(ep.state)
  return {
      keys["image"]: _image_stats(ep.image),
      keys["wrist_image"]: _image_stats(ep.wrist_image),
      keys["state"]: _vector_stats(ep.state),
      keys["actions"]: _vector_stats(ep.actions),
      "timestamp": _vector_stats(np.arange(n, dtype=np.float32) / fps),
      "frame_index": _vector_stats(np.arange(n)),
      "episode_index": _vector_stats(np.full(n, episode_index)),
      "index": _vector_stats(np.arange(start, start + n)),
      "task_index": _vector_stats(np.full(n, task_index)),
  }


def _write_json(path: Path, obj) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=4, ensure_ascii=False)


def _write_jsonl(path: Path, rows) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_lerobot_dataset(root, num_episodes: int, *, version: str = "v2.1",
                          image_size: int = 256, min_length: int = 12, max_length: int = 20,
                          seed: int = 0, suites: Sequence[str] | None = None, fps: int = 10,
                          chunks_size: int = 1000, wrist_key: str | None = None,
                          episodes_per_file: int = 1000, row_group_size: int | None = None,
                          episodes: Sequence[SyntheticEpisode] | None = None) -> Path:
  """Writes a LeRobot dataset of synthetic episodes and returns its root.

  Args:
    root: output directory (created).
    num_episodes: episodes to generate (ignored when `episodes` is given).
    version: 'v2.0' (with meta/stats.json), 'v2.1' (with meta/episodes_stats.jsonl) or 'v3.0'
      (consolidated data files, meta/tasks.parquet, meta/episodes/).
    image_size: side of the square camera images.
    min_length, max_length, seed, suites: passed to `generate_episodes`.
    fps: frames per second declared in info.json (timestamps are frame_index / fps).
    chunks_size: episodes per chunk dir (v2) / files per chunk dir (v3).
    wrist_key: column of the wrist camera (v3 default 'observation.images.wrist_image'; the
      HuggingFaceVLA/libero variant uses 'observation.images.image2').
    episodes_per_file: v3 only, episodes per data parquet file.
    row_group_size: parquet row group size (None: pyarrow's default).
    episodes: write these instead of generating.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if version not in ("v2.0", "v2.1", "v3.0"):
    raise ValueError(f"version must be 'v2.0', 'v2.1' or 'v3.0', got {version!r}")
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  keys = dict(V3_KEYS if version == "v3.0" else V2_KEYS)
  if wrist_key:
    keys["wrist_image"] = wrist_key
  features = _features(keys, image_size, version, fps)
  if episodes is None:
    episodes = generate_episodes(num_episodes, seed=seed, image_size=image_size,
                                 min_length=min_length, max_length=max_length, suites=suites)

  tasks: dict[str, int] = {}  # LeRobot numbers tasks in order of first appearance
  episode_rows, stats_rows = [], []
  all_state, all_actions = [], []
  total = 0
  v3_file_tables, v3_files = [], []

  def flush_v3_file():
    if not v3_file_tables:
      return
    file_index = len(v3_files)
    chunk, file_in_chunk = divmod(file_index, chunks_size)
    path = root / f"data/chunk-{chunk:03d}/file-{file_in_chunk:03d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(v3_file_tables), path, row_group_size=row_group_size)
    v3_files.append(path)
    v3_file_tables.clear()

  for episode_index, ep in enumerate(episodes):
    task_index = tasks.setdefault(ep.task, len(tasks))
    n = len(ep.state)
    table = _episode_table(ep, keys, features, episode_index, task_index, total, fps)
    stats = _episode_stats(ep, keys, episode_index, task_index, total, fps)
    if version == "v3.0":
      file_index = len(v3_files)
      row = {"episode_index": episode_index, "tasks": [ep.task], "length": n,
             "data/chunk_index": file_index // chunks_size,
             "data/file_index": file_index % chunks_size,
             "dataset_from_index": total, "dataset_to_index": total + n,
             "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
      for key in (keys["state"], keys["actions"]):
        for stat, value in stats[key].items():
          row[f"stats/{key}/{stat}"] = value
      episode_rows.append(row)
      v3_file_tables.append(table)
      if len(v3_file_tables) >= episodes_per_file:
        flush_v3_file()
    else:
      path = root / (f"data/chunk-{episode_index // chunks_size:03d}/"
                     f"episode_{episode_index:06d}.parquet")
      path.parent.mkdir(parents=True, exist_ok=True)
      pq.write_table(table, path, row_group_size=row_group_size)
      episode_rows.append({"episode_index": episode_index, "tasks": [ep.task], "length": n})
      stats_rows.append({"episode_index": episode_index, "stats": stats})
    all_state.append(ep.state)
    all_actions.append(ep.actions)
    total += n
  flush_v3_file()

  num = len(episode_rows)
  info = {
      "codebase_version": version,
      "robot_type": "panda",
      "total_episodes": num,
      "total_frames": total,
      "total_tasks": len(tasks),
  }
  if version == "v3.0":
    info.update({"chunks_size": chunks_size, "data_files_size_in_mb": 100,
                 "video_files_size_in_mb": 500, "fps": fps, "splits": {"train": f"0:{num}"},
                 "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 "video_path": None, "features": features})
  else:
    info.update({"total_videos": 0, "total_chunks": max(1, -(-num // chunks_size)),
                 "chunks_size": chunks_size, "fps": fps, "splits": {"train": f"0:{num}"},
                 "data_path": ("data/chunk-{episode_chunk:03d}/"
                               "episode_{episode_index:06d}.parquet"),
                 "video_path": ("videos/chunk-{episode_chunk:03d}/{video_key}/"
                                "episode_{episode_index:06d}.mp4"),
                 "features": features})
  _write_json(root / "meta" / "info.json", info)
  global_stats = {}
  if all_state:
    global_stats = {keys["state"]: _vector_stats(np.concatenate(all_state)),
                    keys["actions"]: _vector_stats(np.concatenate(all_actions))}
    for stat in global_stats.values():
      stat.pop("count")
  if version == "v3.0":
    _write_json(root / "meta" / "stats.json", global_stats)
    task_table = pa.table({"task_index": pa.array(list(tasks.values()), pa.int64()),
                           "__index_level_0__": pa.array(list(tasks), pa.string())})
    pq.write_table(task_table, root / "meta" / "tasks.parquet")
    path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if episode_rows:
      pq.write_table(pa.Table.from_pylist(episode_rows), path)
    else:
      pq.write_table(pa.table({"episode_index": pa.array([], pa.int64()),
                               "length": pa.array([], pa.int64())}), path)
  else:
    _write_jsonl(root / "meta" / "tasks.jsonl",
                 [{"task_index": i, "task": t} for t, i in tasks.items()])
    _write_jsonl(root / "meta" / "episodes.jsonl", episode_rows)
    if version == "v2.1":
      _write_jsonl(root / "meta" / "episodes_stats.jsonl", stats_rows)
    else:
      _write_json(root / "meta" / "stats.json", global_stats)
  return root


# ----------------------------------------------------------------------------------------------
# RLDS writer (tf.train.Example protos and TFRecord framing, written by hand).


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
  """tf.train.Feature from a list of bytes, a float array or an int array."""
  if isinstance(value, list):
    return _field(1, b"".join(_field(1, v) for v in value))
  arr = np.asarray(value)
  if arr.dtype.kind == "f":
    return _field(2, _field(1, arr.astype("<f4").tobytes()))
  return _field(3, _field(1, b"".join(_varint(int(v)) for v in arr.reshape(-1))))


def encode_example(features: dict) -> bytes:
  """Serializes {key: list[bytes] | float array | int array} as a tf.train.Example."""
  entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, _feature(v)))
                     for k, v in sorted(features.items()))
  return _field(1, entries)


def tfrecord_frame(payload: bytes) -> bytes:
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", sources.masked_crc32c(length)) + payload +
          struct.pack("<I", sources.masked_crc32c(payload)))


def rlds_example(ep: SyntheticEpisode, file_path: str = "") -> dict:
  """The `steps/...` features of one RLDS episode (as openvla/modified_libero_rlds)."""
  n = len(ep.state)
  flags = lambda cond: np.array([int(c) for c in cond], np.int64)
  return {
      "episode_metadata/file_path": [file_path.encode()],
      "steps/observation/image": [encode_image(f, "jpeg") for f in ep.image],
      "steps/observation/wrist_image": [encode_image(f, "jpeg") for f in ep.wrist_image],
      "steps/observation/state": ep.state.astype(np.float32).reshape(-1),
      # Not simulated: a joint-space view of the same state, for the layout only.
      "steps/observation/joint_state": np.concatenate(
          [ep.state[:, :6], ep.state[:, 6:7]], axis=1).astype(np.float32).reshape(-1),
      "steps/action": ep.actions.astype(np.float32).reshape(-1),
      "steps/discount": np.ones(n, np.float32),
      "steps/reward": np.array([float(t == n - 1) for t in range(n)], np.float32),
      "steps/is_first": flags(t == 0 for t in range(n)),
      "steps/is_last": flags(t == n - 1 for t in range(n)),
      "steps/is_terminal": flags(t == n - 1 for t in range(n)),
      "steps/language_instruction": [ep.task.encode()] * n,
  }


def _rlds_features_json(image_size: int) -> dict:
  """A TFDS features.json describing the LIBERO RLDS spec."""
  def tensor(shape, dtype, encoding="none"):
    return {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": dtype,
                       "encoding": encoding}}

  def image():
    return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"shape": {"dimensions": [str(image_size), str(image_size), "3"]},
                      "dtype": "uint8", "encodingFormat": "jpeg"}}

  text = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
          "text": {}}
  scalar = lambda dtype: {"pythonClassName":
                          "tensorflow_datasets.core.features.scalar.Scalar",
                          "tensor": {"shape": {}, "dtype": dtype, "encoding": "none"}}
  fdict = lambda feats: {"pythonClassName":
                         "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                         "featuresDict": {"features": feats}}
  steps = fdict({
      "observation": fdict({"image": image(), "wrist_image": image(),
                            "state": tensor([STATE_DIM], "float32"),
                            "joint_state": tensor([7], "float32")}),
      "action": tensor([ACTION_DIM], "float32"), "discount": scalar("float32"),
      "reward": scalar("float32"), "is_first": scalar("bool"), "is_last": scalar("bool"),
      "is_terminal": scalar("bool"), "language_instruction": text})
  return fdict({
      "steps": {"pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                "sequence": {"feature": steps, "length": "-1"}},
      "episode_metadata": fdict({"file_path": text})})


def write_rlds_dataset(root, num_episodes: int, *, name: str = "libero_spatial",
                       num_shards: int = 2, image_size: int = 256, min_length: int = 12,
                       max_length: int = 20, seed: int = 0,
                       suites: Sequence[str] | None = None,
                       episodes: Sequence[SyntheticEpisode] | None = None) -> Path:
  """Writes an RLDS dataset version dir (dataset_info.json, features.json, TFRecord shards).

  Episodes fill the shards in contiguous blocks, in order.
  """
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  if episodes is None:
    episodes = list(generate_episodes(num_episodes, seed=seed, image_size=image_size,
                                      min_length=min_length, max_length=max_length,
                                      suites=suites))
  episodes = list(episodes)
  num_shards = max(1, min(num_shards, len(episodes)))
  bounds = np.linspace(0, len(episodes), num_shards + 1).astype(int)
  shard_lengths, num_bytes = [], 0
  for s in range(num_shards):
    path = root / f"{name}-train.tfrecord-{s:05d}-of-{num_shards:05d}"
    with open(path, "wb") as f:
      for i in range(bounds[s], bounds[s + 1]):
        ex = rlds_example(episodes[i], f"/data/{name}/demo_{i}.hdf5")
        f.write(tfrecord_frame(encode_example(ex)))
    shard_lengths.append(str(bounds[s + 1] - bounds[s]))
    num_bytes += path.stat().st_size
  info = {
      "fileFormat": "tfrecord",
      "moduleName": f"{name}_dataset_builder",
      "name": name,
      "splits": [{"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                  "name": "train", "numBytes": str(num_bytes), "shardLengths": shard_lengths}],
      "version": "1.0.0",
  }
  _write_json(root / "dataset_info.json", info)
  _write_json(root / "features.json", _rlds_features_json(image_size))
  return root


def write_dataset(root, format: str, num_episodes: int, **kwargs) -> Path:
  """Writes `num_episodes` synthetic episodes in `format` (one of FORMATS)."""
  if format == "rlds":
    return write_rlds_dataset(root, num_episodes, **kwargs)
  versions = {"lerobot_v20": "v2.0", "lerobot_v21": "v2.1", "lerobot_v30": "v3.0"}
  if format not in versions:
    raise ValueError(f"unknown synthetic format {format!r}; expected one of {FORMATS}")
  return write_lerobot_dataset(root, num_episodes, version=versions[format], **kwargs)


def ensure_dataset(root, format: str = "lerobot_v21", num_episodes: int = 20,
                   **kwargs) -> Path:
  """Writes a synthetic dataset at `root` unless one is there already; returns `root`.

  Writes into a temporary sibling that is renamed into place, so an interrupted run never leaves
  a partial dataset at `root`.
  """
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  root = Path(root)
  marker = "dataset_info.json" if format == "rlds" else "meta/info.json"
  if (root / marker).is_file():
    return root
  if root.exists() and any(root.iterdir()):
    raise FileExistsError(f"{root} exists but holds no {format} dataset ({marker} missing)")
  tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    write_dataset(tmp, format, num_episodes, **kwargs)
    if root.exists():
      root.rmdir()
    os.rename(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dst", required=True, help="output directory")
  parser.add_argument("--format", default="lerobot_v21", choices=FORMATS)
  parser.add_argument("--episodes", type=int, default=20)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--min_length", type=int, default=12)
  parser.add_argument("--max_length", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--suites", default="", help="comma-separated LIBERO suites (default all)")
  args = parser.parse_args(argv)
  suites = [s for s in args.suites.split(",") if s] or None
  root = write_dataset(args.dst, args.format, args.episodes, image_size=args.image_size,
                       min_length=args.min_length, max_length=args.max_length, seed=args.seed,
                       suites=suites)
  print(f"wrote {args.episodes} {args.format} episodes to {root}")


if __name__ == "__main__":
  main()
