"""Procedural LIBERO-like episodes, written in the real on-disk formats.

The episodes are learnable: every action is a fixed function of what the images and the task
string show (the state vector repeats what the images show), so a model that reads its inputs can
drive the flow loss well below that of one that ignores them, and an energy head that sees only
images and prompt can tell an observation's action chunk from another's (the scene and its
demonstrator: `episodes`).

Writers: `write_lerobot_dataset` (codebase v2.0, v2.1 or v3.0 PNG-in-parquet), `write_rlds_dataset`
(TFDS TFRecord shards with JPEG images), `write_dataset` (by format name), `ensure_dataset` (once,
atomically). Command line:
  python -m pipeline.data.synthetic --dst=DIR --format=lerobot_v21 --episodes=N
"""
from __future__ import annotations

from pathlib import Path

from pipeline import fileio
from pipeline.data.synthetic.episodes import (ACTION_DIM, ASSETS, GRIPPER_OPEN, MAX_DELTA, RED,
                                              STATE_DIM, STEP, SUITES, SyntheticEpisode,
                                              encode_image, expert_action, generate_episodes,
                                              libero_tasks, make_episode, project, render,
                                              task_goal, task_list)
from pipeline.data.synthetic.lerobot import write_lerobot_dataset
from pipeline.data.synthetic.rlds import rlds_example, write_rlds_dataset

__all__ = ["ACTION_DIM", "ASSETS", "FORMATS", "GRIPPER_OPEN", "MAX_DELTA", "RED", "STATE_DIM",
           "STEP", "SUITES", "SyntheticEpisode", "encode_image", "ensure_dataset",
           "expert_action", "generate_episodes", "libero_tasks", "make_episode", "project",
           "render", "rlds_example", "task_goal", "task_list", "write_dataset",
           "write_lerobot_dataset", "write_rlds_dataset"]

FORMATS = ("lerobot_v20", "lerobot_v21", "lerobot_v30", "rlds")
_LEROBOT_VERSIONS = {"lerobot_v20": "v2.0", "lerobot_v21": "v2.1", "lerobot_v30": "v3.0"}


def write_dataset(root, format: str, num_episodes: int, **kwargs) -> Path:
  """Writes `num_episodes` synthetic episodes in `format` (one of FORMATS)."""
  if format == "rlds":
    return write_rlds_dataset(root, num_episodes, **kwargs)
  if format not in _LEROBOT_VERSIONS:
    raise ValueError(f"unknown synthetic format {format!r}; expected one of {FORMATS}")
  return write_lerobot_dataset(root, num_episodes, version=_LEROBOT_VERSIONS[format], **kwargs)


def ensure_dataset(root, format: str = "lerobot_v21", num_episodes: int = 20,
                   **kwargs) -> Path:
  """Writes a synthetic dataset at `root` unless one is there already; returns `root`.

  Written into a temporary sibling that is renamed into place, so an interrupted run never leaves
  a partial dataset at `root`.
  """
  root = Path(root)
  marker = "dataset_info.json" if format == "rlds" else "meta/info.json"
  if (root / marker).is_file():
    return root
  if root.exists() and any(root.iterdir()):
    raise FileExistsError(f"{root} exists but holds no {format} dataset ({marker} missing)")
  with fileio.atomic_directory(root, is_complete=lambda d: (d / marker).is_file()) as tmp:
    write_dataset(tmp, format, num_episodes, **kwargs)
  return root
