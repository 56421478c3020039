"""`bench sample`: what best-of-N selection costs against plain sampling.

Best-of-N samples N chunks per observation and keeps the lowest-energy one; the prefix (SigLIP +
the 2B language expert, most of a sample's cost) and its KV cache are computed once per
observation and shared by its candidates, so N candidates cost N action-expert integrations and N
head evaluations, not N prefixes. FLOPs are counted from the jaxpr of `Pi0.sample_actions` on
abstract shapes (nothing is allocated) at `size`; wall time is measured at `time_size`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pipeline import batch as batch_lib
from pipeline import trainer as trainer_lib
from pipeline.bench import flops as flops_lib
from pipeline.bench import harness


def _sampler(size: str, batch: int, num_candidates: int, num_steps: int):
  """(sample(params, batch) -> actions, abstract params, abstract batch) of one variant."""
  config = harness.mode_config(size, "joint", batch)
  parts = trainer_lib.ModelParts(config.model)

  def sample(params, observation):
    return parts.bind(params).sample_actions(jax.random.key(0), observation, num_steps=num_steps,
                                             num_candidates=num_candidates)

  return sample, parts.abstract_params, batch_lib.spec(config.model, batch), config.model


def _variants(candidates: Sequence[int]) -> dict[str, int]:
  return {"plain": 1, **{f"best_of_{n}": n for n in candidates}}


def run(size: str = "full", batch: int = 1, candidates: Sequence[int] = (4, 16),
        time_size: str | None = "mid", time_batch: int = 1, steps: int = 5, num_steps: int = 10,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  ratio = harness.ratio
  variants = _variants(candidates)
  result: dict[str, Any] = {"command": "sample", "device": harness.device_kind(), "size": size,
                            "batch": batch, "num_steps": num_steps, "flops": {}}
  for name, n in variants.items():
    sample, params, spec, _ = _sampler(size, batch, n, num_steps)
    result["flops"][name] = flops_lib.count_flops(sample, params, spec)["flops"]
    log(f"  {name} at size={size}: {result['flops'][name] / 1e9:.2f} GFLOPs per batch of {batch}")
  plain = result["flops"]["plain"]
  result["flops_over_plain"] = {k: ratio(v, plain) for k, v in result["flops"].items()}
  largest = f"best_of_{max(candidates)}"
  result["targets"] = {f"{largest}_le_3x_plain_flops": result["flops_over_plain"][largest] <= 3}
  if time_size:
    timed = {}
    for name, n in variants.items():
      sample, params, spec, m = _sampler(time_size, time_batch, n, num_steps)
      rng = np.random.default_rng(0)
      values = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
                            params)
      observation = batch_lib.random_batch(spec, vocab_size=m.vocab_size,
                                           act_dim=m.energy_act_dim)
      fn = jax.jit(sample)
      timed[name] = harness.median_seconds(lambda fn=fn: fn(values, observation), steps)
      log(f"  {name} at size={time_size}: {timed[name] * 1e3:.1f} ms per batch of {time_batch}")
    result["timed"] = {"size": time_size, "batch": time_batch, "steps": steps, "seconds": timed,
                       "over_plain": {k: ratio(v, timed["plain"]) for k, v in timed.items()}}
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = [f"== bench sample on {result['device']}",
           f"sample_actions ({result['num_steps']} Euler steps), size={result['size']} "
           f"batch={result['batch']}: GFLOPs counted from the jaxpr"]
  for name, value in result["flops"].items():
    lines.append(f"  {name:<12} {value / 1e9:>10.2f} GFLOPs  {result['flops_over_plain'][name]:.2f}x "
                 "plain")
  if "timed" in result:
    t = result["timed"]
    lines.append(f"wall clock at size={t['size']} batch={t['batch']} (median of {t['steps']}):")
    for name, seconds in t["seconds"].items():
      lines.append(f"  {name:<12} {seconds * 1e3:>9.1f} ms  {t['over_plain'][name]:.2f}x plain")
  lines.append(harness.targets_line(result))
  return "\n".join(lines)
