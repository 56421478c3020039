"""The synthetic scene, its demonstrator and episode generation (format-independent).

The scene shows everything the demonstrator acts on, as LIBERO's cameras show the arm and the
objects: the images and the task string determine the action chunk, without the state vector
(the energy head sees only images and prompt). Every cue stays legible at the tiny model's 32 px.

Agent view (a front camera looking down at the table; world (x, y, z) -> image (u, v) by
`project`, so a higher point appears higher in the image):
  * the target, a red disc at the projection of (tx, ty, tz);
  * the gripper: its shadow on the table below it, and above that its body (larger when higher,
    blue while open, green when closed, shaded by the opening) crossed by a white finger bar at
    the angle ROT_GAIN * rz.
Wrist camera (moves with the gripper):
  * the target relative to the gripper (a red disc that grows as the heights meet);
  * the room's far wall: at infinity it moves with the gripper's orientation only; its edge sits
    lower as rx grows and tilts by ROT_GAIN * rz, and an orange door frame in it moves across
    with ry;
  * the gripper's opening as a yellow bar along the bottom edge.
The target height tz and the goal orientation follow from the task (its position in the LIBERO
task list); the table's tint also varies by task.

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
GRIPPER_OPEN = 0.04  # finger position of the open gripper
ROT_GAIN = 2.0  # drawn angle per radian of rz, so +-0.4 rad turns the bar visibly at 32 px
TARGET_RADIUS = 0.17
# Colors (RGB).
RED = (220, 40, 40)
OPEN = np.array((40, 80, 230), np.float32)
CLOSED = np.array((40, 200, 60), np.float32)
FINGERS = (245, 245, 245)
WALL = (150, 165, 200)
DOOR = (240, 140, 30)
BAR = (250, 210, 40)


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
  task_id: int  # position in the task list; sets the target height and goal orientation
  task: str
  image: np.ndarray  # uint8[T, S, S, 3]
  wrist_image: np.ndarray  # uint8[T, S, S, 3]
  state: np.ndarray  # f32[T, 8]
  actions: np.ndarray  # f32[T, 7]
  target: np.ndarray | None = None  # f32[3], the target the demonstrator moves to


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


def project(point) -> tuple[float, float]:
  """Agent-view image position (u, v) in [-1, 1] of a world point (x, y, z); v points down.

  The table (z = -1) is foreshortened and a point z above it appears 0.25 * (z + 1) higher.
  """
  x, y, z = (float(c) for c in point[:3])
  return 0.85 * x, 0.7 * y - 0.25 * z


class _Canvas:
  """A float RGB image; shapes are signed distance functions (< 0 inside) painted with soft,
  anti-aliased edges, which keep sub-pixel positions in the pixel values (a 32 px model needs
  them). A shape given a bounding box is evaluated only near it."""

  def __init__(self, size: int):
    self.size = size
    self.coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres
    self.img = np.zeros((size, size, 3), np.float32)

  def _window(self, lo: float, hi: float) -> slice:
    margin = 4.0 / self.size  # two pixels: coverage vanishes one pixel outside the shape
    return slice(int(np.searchsorted(self.coords, lo - margin)),
                 int(np.searchsorted(self.coords, hi + margin, side="right")))

  def grid(self, rows: slice = slice(None), cols: slice = slice(None)):
    """(v, u) coordinates of the pixels in rows x cols; v points down."""
    return np.meshgrid(self.coords[rows], self.coords[cols], indexing="ij")

  def paint(self, sdf, color, *, box=None, alpha: float = 1.0) -> None:
    """Paints sdf(v, u) <= 0 in `color`; box = (u, v, half extent) bounds the shape."""
    rows = cols = slice(None)
    if box is not None:
      u, v, half = box
      rows, cols = self._window(v - half, v + half), self._window(u - half, u + half)
    yy, xx = self.grid(rows, cols)
    cover = np.clip(0.5 - sdf(yy, xx) * self.size / 2, 0.0, 1.0)[..., None] * alpha
    region = self.img[rows, cols]  # a view: painted in place
    region *= 1 - cover
    region += cover * np.asarray(color, np.float32)

  def uint8(self) -> np.ndarray:
    return np.round(self.img).astype(np.uint8)


def _disc(u, v, radius):
  return lambda yy, xx: np.hypot(xx - u, yy - v) - radius


def _bar(u, v, angle, half_length, half_width):
  """A rectangle centred at (u, v) whose long side points along `angle`."""
  c, s = np.cos(angle), np.sin(angle)

  def sdf(yy, xx):
    along = (xx - u) * c + (yy - v) * s
    across = -(xx - u) * s + (yy - v) * c
    return np.maximum(np.abs(along) - half_length, np.abs(across) - half_width)

  return sdf


def _render_agentview(size, task_id, target, state) -> np.ndarray:
  canvas = _Canvas(size)
  # Per-task tint and a vertical gradient so the table is not flat.
  tint = np.array([(task_id * 37) % 64, (task_id * 17) % 64, (task_id * 53) % 64], np.float32)
  canvas.img[:] = 70 + tint + 30 * (canvas.coords[:, None, None] + 1)
  u, v = project(target)
  canvas.paint(_disc(u, v, TARGET_RADIUS), RED, box=(u, v, TARGET_RADIUS))
  u, v = project((state[0], state[1], -1.0))
  canvas.paint(_disc(u, v, 0.1), (0, 0, 0), box=(u, v, 0.1), alpha=0.6)  # the shadow
  u, v = project(state)
  radius = 0.1 + 0.04 * (state[2] + 1)  # closer to the camera when higher
  opening = float(np.clip(state[6] / GRIPPER_OPEN, 0, 1))
  canvas.paint(_disc(u, v, radius), opening * OPEN + (1 - opening) * CLOSED, box=(u, v, radius))
  canvas.paint(_bar(u, v, ROT_GAIN * state[5], 1.7 * radius, 0.04), FINGERS,
               box=(u, v, 1.8 * radius))
  return canvas.uint8()


def _render_wrist(size, target, state) -> np.ndarray:
  canvas = _Canvas(size)
  canvas.img[:] = 35
  # The far wall: its edge and door frame depend on the orientation only (points at infinity).
  angle = ROT_GAIN * float(state[5])
  c, s = np.cos(angle), np.sin(angle)
  edge = lambda yy, xx: -xx * s + yy * c - (-0.5 + 0.8 * float(state[3]))
  canvas.paint(edge, WALL)
  door = lambda yy, xx: np.maximum(np.abs(xx * c + yy * s - 0.9 * float(state[4])) - 0.07,
                                   edge(yy, xx))
  canvas.paint(door, DOOR)
  u, v = (target[:2] - state[:2]) * 0.8
  radius = 0.12 + 0.25 * max(0.0, 1 - abs(float(target[2] - state[2])))
  canvas.paint(_disc(u, v, radius), (230, 60, 50), box=(u, v, radius))
  cross = lambda yy, xx: np.minimum(_bar(0, 0, 0.0, 0.3, 0.03)(yy, xx),
                                    _bar(0, 0, np.pi / 2, 0.3, 0.03)(yy, xx))
  canvas.paint(cross, (240, 240, 240), box=(0, 0, 0.3))
  opening = float(np.clip(state[6] / GRIPPER_OPEN, 0, 1))
  half = 0.1 + 0.8 * opening
  canvas.paint(_bar(0, 0.92, 0.0, half, 0.06), BAR, box=(0, 0.92, half))
  return canvas.uint8()


def render(task_id: int, target: np.ndarray, state: np.ndarray,
           image_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """The agent-view and wrist images (uint8[S, S, 3] each) of one frame."""
  return (_render_agentview(image_size, task_id, target, state),
          _render_wrist(image_size, target, state))


def make_episode(rng: np.random.Generator, task_id: int, task: str, length: int,
                 image_size: int = 256) -> SyntheticEpisode:
  """One episode of `length` frames for task `task_id`."""
  tz, goal_rot = task_goal(task_id)
  target = np.array([*rng.uniform(-0.7, 0.7, 2), tz], np.float32)
  state = np.zeros(STATE_DIM, np.float32)
  state[:3] = rng.uniform(-0.8, 0.8, 3)
  state[3:6] = rng.uniform(-0.4, 0.4, 3)
  state[6], state[7] = GRIPPER_OPEN, -GRIPPER_OPEN
  images, wrists, states, actions = [], [], [], []
  for _ in range(length):
    action = expert_action(state, target, goal_rot)
    image, wrist = render(task_id, target, state, image_size)
    images.append(image)
    wrists.append(wrist)
    states.append(state.copy())
    actions.append(action)
    state = state.copy()
    state[:3] += STEP * action[:3] + rng.normal(0, 0.005, 3).astype(np.float32)
    state[3:6] += STEP * action[3:6]
    q = state[6] + 0.5 * ((0.0 if action[6] > 0 else GRIPPER_OPEN) - state[6])
    state[6], state[7] = q, -q
  return SyntheticEpisode(task_id=task_id, task=task, image=np.stack(images),
                          wrist_image=np.stack(wrists), state=np.stack(states),
                          actions=np.stack(actions), target=target)


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
