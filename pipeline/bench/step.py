"""`bench step`: steps/s, tokens/s and MFU of the joint and energy-only train steps."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.bench import harness


def run(size: str = "mid", batch: int | None = None, steps: int = 3, peak: float | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  batch = batch or harness.default_batch(size)
  peak = harness.peak_tflops(peak)
  result: dict[str, Any] = {"command": "step", "device": harness.device_kind(), "size": size,
                            "batch": batch, "peak_tflops": peak}
  for mode in ("joint", "energy_only"):
    trainer, compiled, _, counted = harness.compiled_step(size, mode, batch)
    flops = counted["flops"]
    timed = harness.time_train_steps({mode: (trainer, compiled)}, steps)[mode]
    m = trainer.config.model
    # Tokens through the LLM per example: the prefix, plus the suffix (state + actions) when the
    # action expert runs.
    tokens = harness.prefix_len(m) + (0 if mode == "energy_only" else 1 + m.action_horizon)
    row = {"flops": flops, "step_s": timed["step_s"], "steps_per_s": 1.0 / timed["step_s"],
           "tokens_per_s": batch * tokens / timed["step_s"],
           "achieved_tflops": flops / timed["step_s"] / 1e12}
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    result[mode] = row
    mfu = f"{row['mfu']:.1%}" if peak else "n/a"
    log(f"  {mode}: {row['steps_per_s']:.2f} steps/s, {row['tokens_per_s']:.0f} tokens/s, "
        f"{row['achieved_tflops'] * 1e3:.2f} GFLOP/s, MFU {mfu}")
  return result


def format_table(result: dict[str, Any]) -> str:
  peak = result["peak_tflops"]
  lines = [f"== bench step on {result['device']}",
           f"size={result['size']} batch={result['batch']} peak TFLOP/s={peak or 'n/a'}"]
  for mode in ("joint", "energy_only"):
    r = result[mode]
    mfu = f"{r['mfu']:.2%}" if r["mfu"] is not None else "n/a"
    lines.append(f"  {mode:<12} {r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:.0f} "
                 f"tokens/s, {r['flops'] / 1e9:.2f} GFLOPs/step, MFU {mfu}")
  return "\n".join(lines)
