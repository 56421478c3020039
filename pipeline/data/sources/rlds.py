"""RLDS / TFDS datasets (e.g. openvla/modified_libero_rlds): one tf.train.Example per episode.

Shards are TFRecord files holding `steps/...` keys with JPEG images, parsed here without
TensorFlow (`pipeline.data.tfrecord`).
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from pipeline.data import tfrecord
from pipeline.data.sources.base import (BadEpisodeError, Episode, EpisodeRef, Source,
                                        SourceError, read_json)

# Role -> Example key.
FEATURE_KEYS = {
    "image": "steps/observation/image",
    "wrist_image": "steps/observation/wrist_image",
    "state": "steps/observation/state",
    "actions": "steps/action",
    "prompt": "steps/language_instruction",
}


def dataset_dirs(root: Path) -> list[Path]:
  """Dirs at or up to two levels below `root` holding dataset_info.json and tfrecord shards."""
  found = []
  for pattern in ("", "*", "*/*"):
    for d in sorted(root.glob(pattern)) if pattern else [root]:
      if (d / "dataset_info.json").is_file() and glob.glob(str(d / "*.tfrecord*")):
        found.append(d)
  return found


class RldsSource(Source):
  """RLDS/TFDS TFRecord shards, one episode per tf.train.Example.

  `root` is one dataset version dir (with dataset_info.json) or a dir above several (e.g. the whole
  modified_libero_rlds download); episodes are numbered over the dataset dirs in sorted order,
  then shards in order, then records in order. Task indices follow the order in which
  instructions first appear, which is how a LeRobot conversion of the same data numbers them.
  """
  format = "rlds"

  def __init__(self, root):
    super().__init__(root)
    dirs = dataset_dirs(self.root)
    if not dirs:
      raise SourceError(f"{self.root}: no dataset_info.json with *.tfrecord* shards at or below")
    self.version = str(read_json(dirs[0] / "dataset_info.json").get("version", ""))
    self._files = []
    for d in dirs:
      self._files += sorted(p for p in glob.glob(str(d / "*.tfrecord*")))
    self._refs = None
    self._tasks = None

  def _scan(self):
    """One pass over the shards: record offsets and each episode's instruction."""
    refs, tasks = [], {}
    for path in self._files:
      try:
        offsets = tfrecord.record_offsets(path)
      except tfrecord.DecodeError as e:
        raise SourceError(str(e)) from e
      with open(path, "rb") as f:
        for offset, length in offsets:
          f.seek(offset)
          data = f.read(length)
          index = len(refs)
          try:
            feats = tfrecord.parse_example(data, [FEATURE_KEYS["prompt"]])
          except ValueError as e:
            raise SourceError(f"{path}: record at byte {offset} is not a tf.train.Example: "
                              f"{e}") from e
          prompts = feats.get(FEATURE_KEYS["prompt"], ("empty", []))[1]
          for p in dict.fromkeys(prompts):
            tasks.setdefault(p.decode("utf-8", "replace"), len(tasks))
          refs.append(EpisodeRef(episode_index=index, path=path, length=len(prompts),
                                 location=(offset, length)))
    self._refs = refs
    self._tasks = {i: t for t, i in tasks.items()}

  def tasks(self):
    if self._tasks is None:
      self._scan()
    return dict(self._tasks)

  def episode_refs(self):
    if self._refs is None:
      self._scan()
    return list(self._refs)

  def read_episode(self, ref):
    if self._tasks is None:
      self._scan()
    offset, length = ref.location

    def bad(field, message):
      raise BadEpisodeError(f"{ref.path}: episode {ref.episode_index} (record at byte {offset}), "
                            f"key {field!r}: {message}", episode_index=ref.episode_index,
                            path=ref.path, field=field)

    with open(ref.path, "rb") as f:
      f.seek(offset)
      data = f.read(length)
    if len(data) != length:
      bad("record", "file is shorter than its index says")
    try:
      feats = tfrecord.parse_example(data, list(FEATURE_KEYS.values()))
    except ValueError as e:
      bad("record", f"not a tf.train.Example: {e}")
    values = {}
    for role, key in FEATURE_KEYS.items():
      if key not in feats:
        bad(key, f"missing; the example has {sorted(tfrecord.parse_example(data))}")
      values[role] = feats[key][1]
    n = len(values["prompt"])
    state = np.asarray(values["state"], np.float32)
    actions = np.asarray(values["actions"], np.float32)
    if n and (state.size % n or actions.size % n):
      bad("steps", f"{n} steps but {state.size} state / {actions.size} action values")
    state = state.reshape(n, -1) if n else np.zeros((0, 8), np.float32)
    actions = actions.reshape(n, -1) if n else np.zeros((0, 7), np.float32)
    prompt = [p.decode("utf-8", "replace") for p in values["prompt"]]
    inverse = {t: i for i, t in self._tasks.items()}
    task_index = np.array([inverse.get(p, -1) for p in prompt], np.int64)
    return Episode(episode_index=ref.episode_index, image=list(values["image"]),
                   wrist_image=list(values["wrist_image"]), state=state, actions=actions,
                   task_index=task_index, prompt=prompt, path=ref.path)

