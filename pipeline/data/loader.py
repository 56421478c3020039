"""Grain input pipeline over a prepared ArrayRecord dataset.

Train: records of the train episodes -> global shuffle by seed -> repeat forever -> this process's
stride [process_index::process_count] of the global order -> decode + transform (threads, and
worker processes when num_workers > 0) -> per-process batch. Every process shuffles identically, so
the strides are disjoint and together cover the global order. Images leave the host as uint8 at
their stored size (the dataset's first record sets it per camera; other frames are resized to it):
the model resizes them with padding to its size on the device (config.data.resize_on_device=False
does that on the host instead). Training augmentation also runs on the device, in the model's
preprocessing (pipeline.models.preprocess, keyed by step and position in the global batch), so the
host chain stays close to decode cost.

Eval: records of the held-out episodes in one fixed shuffled order (so a batch mixes episodes), once
(optionally repeated); the split is truncated to whole global batches so every
process yields the same number of batches.

The iterator of the returned dataset checkpoints with Orbax:
  ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)) /
  ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh_it)).
Its state is positional, so a restore reproduces the stream exactly when seed, split, per-process
batch, process count and worker count are unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from pipeline.data import records
from pipeline.data import tokenizer as tokenizer_lib
from pipeline.data import transforms
from pipeline.data.prepared import MANIFEST, NORM_STATS, DatasetInfo, RecordLocator, split_episodes

SPLITS = ("train", "eval")

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Grain pieces


class _SplitSource(grain.sources.RandomAccessDataSource):
  """Random access over a subset of records: i -> (global record index, raw bytes)."""

  def __init__(self, shard_paths: Sequence[str], indices: np.ndarray):
    self._paths = list(shard_paths)
    self._indices = np.asarray(indices, np.int64)
    self._reader = None

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    if self._reader is None:  # Opened lazily, once per worker process.
      self._reader = grain.sources.ArrayRecordDataSource(self._paths)
    index = int(self._indices[i])
    return index, self._reader[index]

  def __getstate__(self):
    return {"_paths": self._paths, "_indices": self._indices, "_reader": None}

  def __repr__(self) -> str:
    return f"_SplitSource({len(self._paths)} shards, {len(self._indices)} records)"


class FrameMap:
  """Per-element map: (record index, bytes) -> example, or None for a skipped record."""

  def __init__(self, transform: transforms.FrameTransform, skip_bad: bool):
    self.transform = transform
    self.skip_bad = skip_bad
    self.skipped = 0

  def __call__(self, item: tuple[int, bytes]) -> dict[str, Any] | None:
    record_index, data = item
    try:
      return self.transform(record_index, data)
    except records.RecordError as e:
      if not self.skip_bad:
        raise
      self.skipped += 1
      _log.warning("skipping bad record (%d skipped so far in this process): %s", self.skipped, e)
      return None


def _not_none(x: Any) -> bool:
  return x is not None


def _norm_stats_path(config: ml_collections.ConfigDict, info: DatasetInfo | None) -> str:
  """config.data.norm_stats_path, resolved (pipeline.weights.with_norm_stats); '' / 'dataset': the
  dataset's, whose stats must then be of the configured action recipe."""
  d = config.data
  path = d.norm_stats_path
  init = config.get("init")
  if not path and init is not None and (init.get("weights") or init.get("energy_weights")):
    raise ValueError("config.data.norm_stats_path='' with config.init.weights set: resolve it "
                     "with pipeline.weights.with_norm_stats first, so that the data is normalized "
                     "as the weights were trained")
  if path not in ("", "dataset"):
    return path
  path = os.path.join(d.dataset_dir, NORM_STATS)
  have = int(info.manifest.get("delta_action_dims", 0)) if info is not None else None
  if have is not None and have != d.delta_action_dims:
    raise ValueError(
        f"{path} holds stats of actions with delta_action_dims={have} ({MANIFEST}), but "
        f"config.data.delta_action_dims={d.delta_action_dims}: prepare the dataset again with "
        f"--delta_action_dims={d.delta_action_dims} (smoke runs: delete {d.dataset_dir}), or set "
        "config.data.norm_stats_path to stats computed that way")
  return path


def make_frame_transform(config: ml_collections.ConfigDict, *,
                         info: DatasetInfo | None = None) -> transforms.FrameTransform:
  """The per-record transform that make_dataset applies, built from the config."""
  m = config.model
  tokenizer_path = config.data.tokenizer_path
  if "vocab_size" in m and tokenizer_lib.vocab_size(tokenizer_path) > m.vocab_size:
    raise ValueError(f"config.data.tokenizer_path={tokenizer_path!r} has "
                     f"{tokenizer_lib.vocab_size(tokenizer_path)} tokens, more than "
                     f"model.vocab_size={m.vocab_size}")
  if info is not None and info.action_horizon and info.action_horizon < m.action_horizon:
    raise ValueError(f"model.action_horizon={m.action_horizon} exceeds the dataset's stored chunk "
                     f"length {info.action_horizon} ({info.directory}/{MANIFEST})")
  image_shapes = None
  if info is not None and config.data.resize_on_device:
    try:
      image_shapes = info.stored_image_shapes()
    except records.RecordError as e:
      # That record fails again, with its location, when the loader reaches it.
      _log.warning("%s: first record unreadable (%s); resizing images on the host",
                   info.directory, e)
  return transforms.FrameTransform(
      norm_stats=transforms.load_norm_stats(_norm_stats_path(config, info)),
      tokenizer_path=tokenizer_path, image_size=m.image_size, image_shapes=image_shapes,
      action_dim=m.action_dim, action_horizon=m.action_horizon, max_token_len=m.max_token_len,
      normalization=config.data.normalization,
      describe=RecordLocator(info) if info else None,
      delta_action_dims=config.data.delta_action_dims)


def per_process_batch(config, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the process count "
                     f"{process_count}")
  return config.batch_size // process_count


def split_records(config, info: DatasetInfo, split: str, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """(record index, bytes) of a split in stream order: this process's stride."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  per_process = per_process_batch(config, process_index, process_count)
  rows = split_episodes(info, config.data.eval_fraction, config.data.split_seed)[split]
  indices = info.record_indices(rows)
  if split == "eval":
    # A fixed shuffle mixes episodes within each batch: in-batch retrieval over consecutive frames
    # of one episode would measure nothing. Fixed, so every evaluation sees the same batches.
    indices = indices[np.random.default_rng(config.data.split_seed).permutation(len(indices))]
    # Whole global batches only, so that every process yields the same number of batches.
    usable = len(indices) // (per_process * process_count) * per_process * process_count
    if usable == 0:
      raise ValueError(f"eval split has {len(indices)} records ({len(rows)} episodes), fewer "
                       f"than one global batch of config.batch_size={config.batch_size}; raise "
                       "config.data.eval_fraction or lower the batch size")
    indices = indices[:usable]
  elif len(indices) == 0:
    raise ValueError(f"train split of {info.directory} is empty")
  ds = grain.MapDataset.source(_SplitSource(info.shard_paths, indices))
  if split == "train":
    ds = ds.seed(config.data.shuffle_seed).shuffle().repeat(None)
  elif config.data.eval_repeat:
    ds = ds.repeat(None)
  return ds[process_index::process_count]


def batches(examples: grain.MapDataset, config, per_process: int, *,
            allow_nones: bool = False) -> grain.IterDataset:
  """Per-process batches of mapped records, read by threads and config.data.num_workers workers.

  allow_nones: the map returns None for records to skip.
  """
  prefetch = int(config.data.prefetch)
  if allow_nones:
    # Skipped records are None and batches form after they are filtered out, in the iterator;
    # the state stays positional (it counts source elements), but the batch composition then
    # depends on the worker count.
    read = grain.ReadOptions(num_threads=config.data.num_threads,
                             prefetch_buffer_size=prefetch * per_process)
    it = examples.to_iter_dataset(read_options=read, allow_nones=True).filter(_not_none)
    it = it.batch(per_process, drop_remainder=True)
  else:
    # Batching the map dataset makes worker processes split whole batches, so the stream is the
    # same for any worker count.
    read = grain.ReadOptions(num_threads=config.data.num_threads, prefetch_buffer_size=prefetch)
    it = examples.batch(per_process, drop_remainder=True).to_iter_dataset(read_options=read)
  workers = int(config.data.num_workers)
  if workers > 0:
    _ensure_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=config.data.worker_buffer))
  return it


def make_dataset(config: ml_collections.ConfigDict, *, split: str, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The per-process batch stream of a split.

  Args:
    config: uses config.data.* (configs/common.py), config.model.{image_size, action_dim,
      action_horizon, max_token_len, vocab_size (optional: checked against the tokenizer)} and
      config.batch_size (global).
    split: 'train' (shuffled, infinite) or 'eval' (one fixed shuffle, once unless
      config.data.eval_repeat). Neither is augmented here: the model does it on the device.
    process_index: this process's index; pass jax.process_index() computed after
      jax.distributed.initialize.
    process_count: number of processes (jax.process_count()).

  Returns:
    An IterDataset of numpy batches of the batch contract (pipeline.batch) with
    config.batch_size // process_count examples each; `iter()` of it is checkpointable with
    grain.checkpoint.CheckpointSave.
  """
  per_process = per_process_batch(config, process_index, process_count)
  info = DatasetInfo(config.data.dataset_dir)
  skip_bad = bool(config.data.skip_bad_records)
  examples = split_records(config, info, split, process_index, process_count)
  examples = examples.map(FrameMap(make_frame_transform(config, info=info), skip_bad))
  return batches(examples, config, per_process, allow_nones=skip_bad)


def _ensure_flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing
  # parsed them, which would make the first worker fail.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@contextlib.contextmanager
def open_iterator(config: ml_collections.ConfigDict, split: str
                  ) -> Iterator[grain.DatasetIterator]:
  """This process's iterator of a split (jax.process_index / count), closed on exit.

  Grain's worker processes hold shared memory until their iterator is closed.
  """
  it = iter(make_dataset(config, split=split, process_index=jax.process_index(),
                         process_count=jax.process_count()))
  try:
    yield it
  finally:
    if hasattr(it, "close"):
      it.close()


def to_global_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Per-process numpy batch -> global jax.Arrays in the (batch) sharding of the step.

  Every process passes its own rows; together they form the global batch in process order.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Copy of the config with '{workdir}' in data paths replaced."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for key in ("dataset_dir", "source_dir", "norm_stats_path", "tokenizer_path"):
      if isinstance(config.data[key], str):
        config.data[key] = config.data[key].replace("{workdir}", workdir)
  return config
