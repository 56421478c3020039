"""`bench loader`: samples/s of the Grain train chain against image decoding alone.

All pipelines read the same shuffled records with the same threads and batch size; the decode
baseline only unpacks the record and decodes its two images. "full" is the train chain as
configured (images shipped at their stored size when config.data.resize_on_device), and
"full_host_resize" the same chain resizing on the host, for reference. Neither holds
augmentation: it runs on the device, in the model's preprocessing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from configs import common
from pipeline import batch as batch_lib
from pipeline.bench import harness
from pipeline.data import loader
from pipeline.data import prepare
from pipeline.data import synthetic
from pipeline.data import tokenizer
from pipeline.data import transforms
from pipeline.models import preprocess

PIPELINES = ("full", "full_host_resize", "decode")


def _decode_only(item: tuple[int, bytes]) -> dict[str, Any]:
  return transforms.decode_images_only(item[1])


def _seconds_per_batches(it, num_batches: int, warmup: int) -> float:
  # Worker start-up and the buffers filled meanwhile are excluded: the clock starts once the
  # first `warmup` batches (about what the prefetch buffers hold) are consumed.
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return time.perf_counter() - start


def samples_per_second(config, num_batches: int, workers: Sequence[int],
                       rounds: int = 2) -> list[dict[str, float]]:
  """Rows {workers, <pipeline>_samples_per_s} for each worker count; best of `rounds` turns."""
  info = loader.DatasetInfo(config.data.dataset_dir)
  per_process = loader.per_process_batch(config, 0, 1)
  host_config = config.copy_and_resolve_references()
  host_config.data.resize_on_device = False
  maps = {"full": loader.FrameMap(loader.make_frame_transform(config, info=info), False),
          "full_host_resize": loader.FrameMap(
              loader.make_frame_transform(host_config, info=info), False),
          "decode": _decode_only}
  rows = []
  for num_workers in workers:
    row = {"workers": num_workers}
    run_config = config.copy_and_resolve_references()
    run_config.data.num_workers = num_workers
    # The pipelines take turns, `rounds` times, and each keeps its best rate: load from other
    # processes then slows all of them alike instead of whichever ran at the time.
    for _ in range(rounds):
      for name in PIPELINES:
        examples = loader.split_records(run_config, info, "train").map(maps[name])
        iterator = iter(loader.batches(examples, run_config, per_process))
        try:
          warmup = 1 + (config.data.prefetch + 2) * max(1, num_workers)
          seconds = _seconds_per_batches(iterator, num_batches, warmup)
        finally:
          iterator.close()
        key = f"{name}_samples_per_s"
        row[key] = max(row.get(key, 0.0), num_batches * per_process / seconds)
    rows.append(row)
  return rows


def device_resize_seconds(batch: int, source_size: int, size: int, repeats: int = 5) -> float:
  """Median seconds the device takes to fit one batch's shipped uint8 cameras to the model size."""
  images = {k: jnp.zeros((batch, source_size, source_size, 3), jnp.uint8)
            for k in batch_lib.LIBERO_IMAGE_SHAPES}
  fit = jax.jit(functools.partial(preprocess.fit_images, size=size))
  return harness.median_seconds(lambda: fit(images), repeats)


def run(dataset_dir: str = "", *, size: str = "full", batch: int = 32, num_batches: int = 20,
        workers: Sequence[int] = (0, 1, 2), episodes: int = 8, source_image_size: int = 256,
        num_threads: int = 2, prefetch: int = 2, tokenizer_path: str = "",
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Full train chain vs decode-only samples/s per worker count, on `dataset_dir` or a synthetic
  LIBERO-format dataset prepared in a temp dir."""
  c = common.get_base_config()
  harness.model_size(c, size)
  c.batch_size = batch
  c.data.norm_stats_path = "dataset"  # throughput only: the benchmark's own data, its stats
  c.data.num_threads = num_threads
  c.data.prefetch = prefetch
  if tokenizer_path:
    c.data.tokenizer_path = tokenizer_path
  tmp = None
  try:
    if not dataset_dir:
      tmp = tempfile.mkdtemp(prefix="bench_loader_")
      src = synthetic.write_lerobot_dataset(os.path.join(tmp, "source"), episodes,
                                            image_size=source_image_size, seed=0)
      dataset_dir = str(prepare.prepare(src, os.path.join(tmp, "prepared"),
                                        action_horizon=c.model.action_horizon,
                                        delta_action_dims=c.data.delta_action_dims))
      c.data.tokenizer_path = tokenizer_path or tokenizer.SYNTHETIC_TOKENIZER
      c.model.vocab_size = max(c.model.vocab_size, tokenizer.SYNTHETIC_VOCAB_SIZE)
    c.data.dataset_dir = str(dataset_dir)
    rows = samples_per_second(c, num_batches, tuple(workers))
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  for row in rows:
    row["full_over_decode"] = harness.ratio(row["full_samples_per_s"],
                                            row["decode_samples_per_s"])
    row["host_resize_over_decode"] = harness.ratio(row["full_host_resize_samples_per_s"],
                                                   row["decode_samples_per_s"])
    log(f"  loader workers={row['workers']}: full chain {row['full_samples_per_s']:.1f} "
        f"samples/s, decode only {row['decode_samples_per_s']:.1f} samples/s")
  result = {"command": "loader", "device": harness.device_kind(), "host_cpus": os.cpu_count(),
            "dataset_dir": "synthetic (temp)" if tmp else str(dataset_dir),
            "image_size": c.model.image_size, "source_image_size": source_image_size,
            "batch": batch, "num_batches": num_batches, "num_threads": num_threads, "rows": rows,
            "device_resize_ms_per_batch": 1e3 * device_resize_seconds(
                batch, source_image_size, c.model.image_size)}
  result["targets"] = {"full_ge_0.7x_decode": all(r["full_over_decode"] >= 0.7 for r in rows)}
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = [f"== bench loader on {result['device']}",
           f"batch {result['batch']}, image {result['image_size']} px (source "
           f"{result['source_image_size']} px); resize and augmentation run on the device"]
  for r in result["rows"]:
    lines.append(f"  workers={r['workers']}: full {r['full_samples_per_s']:.1f} samples/s, "
                 f"decode-only {r['decode_samples_per_s']:.1f} samples/s, ratio "
                 f"{r['full_over_decode']:.2f} (resizing on the host: "
                 f"{r['full_host_resize_samples_per_s']:.1f} samples/s, ratio "
                 f"{r['host_resize_over_decode']:.2f})")
  lines.append(f"  device resize of a batch's two cameras: "
               f"{result['device_resize_ms_per_batch']:.1f} ms on {result['device']}")
  lines.append(harness.targets_line(result))
  return "\n".join(lines)
