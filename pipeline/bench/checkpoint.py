"""`bench checkpoint`: how long a save blocks the training loop, async against synchronous.

Orbax `CheckpointManager` through `pipeline.checkpoint.Checkpointer`, the same state saved both
ways. Between async saves the pending write is awaited outside the clock, as the loop does useful
work while it runs (saves are save_every steps apart). One row per `extra_mib` value: the train
state at `size` plus one float32 array of that many MiB. The async save's blocking part has a
fixed cost per array (Orbax bookkeeping, device-to-host copies), so the ratio falls with the bytes
per array; the full Pi0 train state's size is printed for that reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from pipeline import checkpoint as checkpoint_lib
from pipeline import optim
from pipeline.bench import harness


def time_saves(state: Any, saves: int, log: Callable[[str], None]) -> dict[str, Any]:
  """Median seconds the caller is blocked by, and the total of, async and sync saves of state."""
  out = {}
  tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
  try:
    for async_save in (True, False):
      name = "async" if async_save else "sync"
      ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp, name), save_every=1, max_to_keep=2,
                                         async_save=async_save)
      blocked, total = [], []
      try:
        for step in range(1, saves + 1):
          t0 = time.perf_counter()
          ckpt.save(step, state, force=True)
          blocked.append(time.perf_counter() - t0)
          ckpt.wait_until_finished()
          total.append(time.perf_counter() - t0)
      finally:
        ckpt.close()
      out[name] = {"blocked_s": statistics.median(blocked), "total_s": statistics.median(total),
                   "blocked_all_s": blocked}
      log(f"  {name} save: loop blocked {out[name]['blocked_s'] * 1e3:.1f} ms "
          f"(save done after {out[name]['total_s'] * 1e3:.1f} ms)")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def run(size: str = "mid", batch: int | None = None, saves: int = 5,
        extra_mib: Sequence[float] = (0.0, 256.0, 1024.0),
        log: Callable[[str], None] = print) -> dict[str, Any]:
  batch = batch or harness.default_batch(size)
  train_state = harness.block(harness.synthetic_state(harness.make_trainer(size, "joint", batch)))
  full_state = harness.make_trainer("full", "joint", harness.default_batch("full")).abstract_state
  result: dict[str, Any] = {
      "command": "checkpoint", "device": harness.device_kind(), "size": size, "saves": saves,
      "full_state_mib": optim.state_bytes(full_state) / 2**20,
      "full_state_arrays": len(jax.tree.leaves(full_state)), "rows": []}
  log(f"full Pi0 joint train state: {result['full_state_mib'] / 1024:.1f} GiB in "
      f"{result['full_state_arrays']} arrays")
  for extra in extra_mib:
    state = train_state
    if extra > 0:
      # Random values: Orbax compresses, so a constant array would cost almost nothing to write.
      array = jax.random.normal(jax.random.key(1), (int(extra * 2**20) // 4,), jnp.float32)
      state = {"train_state": train_state, "extra": harness.block(array)}
    row = {"extra_mib": extra, "state_mib": optim.state_bytes(state) / 2**20,
           "num_arrays": len(jax.tree.leaves(state))}
    log(f"state {row['state_mib']:.1f} MiB in {row['num_arrays']} arrays:")
    row.update(time_saves(state, saves, log))
    row["async_over_sync_blocked"] = harness.ratio(row["async"]["blocked_s"],
                                                   row["sync"]["blocked_s"])
    result["rows"].append(row)
    del state
  largest = max(result["rows"], key=lambda r: r["state_mib"])
  result["async_over_sync_blocked"] = largest["async_over_sync_blocked"]
  result["targets"] = {"async_blocks_le_0.1x_sync_at_largest_state":
                       result["async_over_sync_blocked"] <= 0.1}
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = [f"== bench checkpoint on {result['device']}",
           f"median of {result['saves']} saves; the full Pi0 joint train state is "
           f"{result['full_state_mib'] / 1024:.1f} GiB in {result['full_state_arrays']} arrays"]
  for r in result["rows"]:
    lines.append(f"  state {r['state_mib']:8.1f} MiB in {r['num_arrays']} arrays: loop blocked "
                 f"async {r['async']['blocked_s'] * 1e3:.1f} ms, sync "
                 f"{r['sync']['blocked_s'] * 1e3:.1f} ms (async save done after "
                 f"{r['async']['total_s'] * 1e3:.1f} ms), async / sync "
                 f"{r['async_over_sync_blocked']:.3f}")
  lines.append(harness.targets_line(result))
  return "\n".join(lines)
