"""Synthetic episodes as LeRobot datasets: codebase v2.0, v2.1 or v3.0, PNG-in-parquet."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.synthetic.episodes import (ACTION_DIM, STATE_DIM, SyntheticEpisode,
                                              encode_image, generate_episodes)

# Role -> column name for each codebase version.
V2_COLUMNS = {"image": "image", "wrist_image": "wrist_image", "state": "state",
              "actions": "actions"}
V3_COLUMNS = {"image": "observation.images.image",
              "wrist_image": "observation.images.wrist_image", "state": "observation.state",
              "actions": "action"}


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
  keys = dict(V3_COLUMNS if version == "v3.0" else V2_COLUMNS)
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
