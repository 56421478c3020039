"""`bench energy`: what the energy head costs a train step, against no head and a naive head.

FLOPs (counted from the jaxpr) and peak temporary memory of compiled train steps (abstract shapes
only, nothing is allocated): (a) no energy head, (b) joint mode, (c) joint mode with the naive
head that repeats the context B times, (d) energy-only; the head alone, pairwise vs naive; and
wall-clock steps of (a), (b), (c) at `time_size`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from pipeline.bench import flops as flops_lib
from pipeline.bench import harness
from pipeline.bench import naive_head
from pipeline.models import energy as energy_lib
from pipeline.models import gemma


def step_costs(size: str, batch: int, log: Callable[[str], None] = print) -> dict[str, dict]:
  """Compiled cost of each mode's train step."""
  out = {}
  for mode in harness.MODES:
    _, compiled, seconds, counted = harness.compiled_step(size, mode, batch)
    out[mode] = flops_lib.compiled_cost(compiled, counted)
    out[mode]["compile_s"] = seconds
    log(f"  compiled {mode} train step at size={size} batch={batch}: "
        f"{out[mode]['flops']:.4g} FLOPs, {out[mode]['temp_bytes'] / 2**20:.1f} MiB temp "
        f"({seconds:.0f} s)")
  return out


def head_costs(size: str, batch: int) -> dict[str, Any]:
  """The energy head alone on the prefix output [B, S, W]: pairwise vs naive.

  'fwd' = the [B, B] energies; 'train' = value_and_grad of InfoNCE w.r.t. head params and the
  context (as in joint training).
  """
  m = harness.mode_config(size, "joint", batch).model
  width = gemma.get_config(m.paligemma_variant).width
  seq = harness.prefix_len(m)
  dtype = jnp.dtype(m.dtype)
  context = jax.ShapeDtypeStruct((batch, seq, width), dtype)
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
  actions = jax.ShapeDtypeStruct((batch, m.action_horizon, m.action_dim), jnp.float32)
  out: dict[str, Any] = {"context_shape": [batch, seq, width]}
  for name, cls in (("pairwise", energy_lib.EnergyModel), ("naive", naive_head.NaiveEnergyModel)):
    abstract = nnx.eval_shape(lambda cls=cls: cls(
        width, m.energy_act_dim, hidden=m.energy_hidden, heads=m.energy_heads,
        num_layers=m.energy_layers, horizon=m.action_horizon, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def energies(state, context, mask, actions, graphdef=graphdef):
      model = nnx.merge(graphdef, state)
      return model.pairwise(context, mask, actions[..., :m.energy_act_dim])

    def loss(state, context, mask, actions, energies=energies):
      return energy_lib.infonce(energies(state, context, mask, actions), m.energy_tau)[0]

    args = (state, context, mask, actions)
    out[name] = {
        kind: flops_lib.compiled_cost(jax.jit(fn).lower(*args).compile(),
                                      flops_lib.count_flops(fn, *args))
        for kind, fn in (("fwd", energies),
                         ("train", jax.value_and_grad(loss, argnums=(0, 1))))
    }
  return out


def run(size: str = "full", batch: int | None = None, time_size: str | None = "mid",
        time_batch: int | None = None, steps: int = 3,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiled FLOPs / temp memory of the four steps and of the head alone; timed steps."""
  ratio = harness.ratio
  batch = batch or harness.default_batch(size)
  result: dict[str, Any] = {"command": "energy", "device": harness.device_kind(), "size": size,
                            "batch": batch}
  costs = step_costs(size, batch, log=log)
  a, b, c, d = (costs[k]["flops"] for k in ("no_head", "joint", "naive", "energy_only"))
  result["steps"] = costs
  result["overhead"] = ratio(b - a, a)
  result["naive_overhead"] = ratio(c - a, a)
  result["energy_only_over_joint"] = ratio(d, b)
  result["joint_temp_over_no_head_temp"] = ratio(costs["joint"]["temp_bytes"],
                                                 costs["no_head"]["temp_bytes"])
  result["naive_temp_over_joint_temp"] = ratio(costs["naive"]["temp_bytes"],
                                               costs["joint"]["temp_bytes"])
  head = result["head"] = head_costs(size, batch)
  for kind in ("fwd", "train"):
    result[f"head_naive_over_pairwise_temp_{kind}"] = ratio(
        head["naive"][kind]["temp_bytes"], head["pairwise"][kind]["temp_bytes"])
    result[f"head_naive_over_pairwise_flops_{kind}"] = ratio(
        head["naive"][kind]["flops"], head["pairwise"][kind]["flops"])
  # The head's own training cost as a share of the step without it: explains `overhead`.
  result["head_train_flops_over_no_head_step"] = ratio(head["pairwise"]["train"]["flops"], a)
  result["targets"] = {
      "overhead_le_1pct": result["overhead"] <= 0.01,
      "energy_only_le_0.4x_joint": result["energy_only_over_joint"] <= 0.4,
      "head_temp_ge_10x_below_naive": result["head_naive_over_pairwise_temp_train"] >= 10,
  }
  if time_size:
    time_batch = time_batch or harness.default_batch(time_size)
    runs = {mode: harness.compiled_step(time_size, mode, time_batch)[:2]
            for mode in ("no_head", "joint", "naive")}
    timed = harness.time_train_steps(runs, steps)
    for mode, t in timed.items():
      log(f"  timed {mode} at size={time_size} batch={time_batch}: "
          f"{t['step_s'] * 1e3:.1f} ms/step")
    result["timed"] = {"size": time_size, "batch": time_batch, "steps": steps, **timed}
    t = {k: timed[k]["step_s"] for k in timed}
    result["timed_overhead"] = ratio(t["joint"] - t["no_head"], t["no_head"])
    result["timed_naive_overhead"] = ratio(t["naive"] - t["no_head"], t["no_head"])
  return result


def format_table(result: dict[str, Any]) -> str:
  lines = [f"== bench energy on {result['device']}",
           f"train step at size={result['size']} batch={result['batch']} (GFLOPs: matmul/conv "
           "FLOPs counted from the jaxpr, loops x iterations; temp: compiled memory_analysis):",
           f"  {'mode':<12} {'GFLOPs':>12} {'temp MiB':>10}   XLA cost_analysis GFLOPs "
           "(loop bodies counted once)"]
  for mode in harness.MODES:
    s = result["steps"][mode]
    lines.append(f"  {mode:<12} {s['flops'] / 1e9:>12.2f} {s['temp_bytes'] / 2**20:>10.1f}   "
                 f"{s['xla_flops_loop_bodies_once'] / 1e9:.2f}")
  lines.append(f"  overhead (b-a)/a            {result['overhead']:.3%}")
  lines.append(f"  naive overhead (c-a)/a      {result['naive_overhead']:.3%}")
  lines.append(f"  energy-only / joint  d/b    {result['energy_only_over_joint']:.3f}")
  h = result["head"]
  lines.append(f"head alone on prefix output {h['context_shape']}:")
  for kind in ("fwd", "train"):
    p, n = h["pairwise"][kind], h["naive"][kind]
    lines.append(f"  {kind:<5} pairwise {p['flops'] / 1e9:.2f} GFLOPs "
                 f"{p['temp_bytes'] / 2**20:.1f} MiB temp | naive {n['flops'] / 1e9:.2f} GFLOPs "
                 f"{n['temp_bytes'] / 2**20:.1f} MiB temp | naive/pairwise temp "
                 f"{result[f'head_naive_over_pairwise_temp_{kind}']:.1f}x")
  lines.append(f"  head train FLOPs / no-head step FLOPs "
               f"{result['head_train_flops_over_no_head_step']:.3%}")
  uncounted = sum(s["uncounted_while"] for s in result["steps"].values())
  if uncounted:
    lines.append(f"  WARNING: {uncounted} while loops of unknown trip count counted once")
  if "timed" in result:
    t = result["timed"]
    lines.append(f"wall clock at size={t['size']} batch={t['batch']} (median of {t['steps']}):")
    for mode in ("no_head", "joint", "naive"):
      lines.append(f"  {mode:<12} {t[mode]['step_s'] * 1e3:.1f} ms/step")
    lines.append(f"  overhead {result['timed_overhead']:.2%}, naive overhead "
                 f"{result['timed_naive_overhead']:.2%}")
  lines.append(harness.targets_line(result))
  return "\n".join(lines)
