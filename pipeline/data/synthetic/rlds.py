"""Synthetic episodes as an RLDS / TFDS dataset: TFRecord shards of tf.train.Examples with JPEG
images, laid out as openvla/modified_libero_rlds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import fileio
from pipeline.data import tfrecord
from pipeline.data.synthetic.episodes import (ACTION_DIM, STATE_DIM, SyntheticEpisode,
                                              encode_image, generate_episodes)


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
                       episodes: Sequence[SyntheticEpisode] | None = None,
                       split: str = "train") -> Path:
  """Writes split `split` of an RLDS dataset version dir (dataset_info.json, features.json,
  TFRecord shards).

  Episodes fill the shards in contiguous blocks, in order. Writing another split into the same
  dir adds it to dataset_info.json beside the ones there, as TFDS lists several splits.
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
    path = root / f"{name}-{split}.tfrecord-{s:05d}-of-{num_shards:05d}"
    with open(path, "wb") as f:
      for i in range(bounds[s], bounds[s + 1]):
        ex = rlds_example(episodes[i], f"/data/{name}/demo_{i}.hdf5")
        f.write(tfrecord.frame_record(tfrecord.encode_example(ex)))
    shard_lengths.append(str(bounds[s + 1] - bounds[s]))
    num_bytes += path.stat().st_size
  info_path = root / "dataset_info.json"
  other_splits = []
  if info_path.is_file():
    with open(info_path, encoding="utf-8") as f:
      other_splits = [s for s in json.load(f)["splits"] if s["name"] != split]
  info = {
      "fileFormat": "tfrecord",
      "moduleName": f"{name}_dataset_builder",
      "name": name,
      "splits": other_splits + [
          {"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", "name": split,
           "numBytes": str(num_bytes), "shardLengths": shard_lengths}],
      "version": "1.0.0",
  }
  fileio.atomic_write_json(info_path, info, indent=4)
  fileio.atomic_write_json(root / "features.json", _rlds_features_json(image_size), indent=4)
  return root
