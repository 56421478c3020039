"""The synthetic scene, its demonstrator and episode generation (format-independent).

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
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The order openpi's LeRobot conversion read the four suites in.
SUITES = ("libero_10", "libero_goal", "libero_object", "libero_spatial")
STATE_DIM = 8
ACTION_DIM = 7
MAX_DELTA = 0.9375  # LIBERO's OSC actions saturate here
STEP = 0.12  # how far one action moves the state


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
