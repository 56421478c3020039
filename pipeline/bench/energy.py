"""`bench energy`: what the energy head costs a train step, against no head and a naive head.

FLOPs (counted from the jaxpr) and peak temporary memory of compiled train steps (abstract shapes
only, nothing is allocated): (a) no energy head, (b) joint mode, (c) joint mode with the naive
head that repeats the context B times, (d) energy-only; the head alone, pairwise vs naive; and
wall-clock steps of (a), (b), (c) at `time_size`.

With `devices` > 1, also per device on a mesh of that many devices (fsdp, the default FSDP
rules) against one: (a), (b), (d) and the pairwise head alone, compiled; (a) and (b) timed. The
head's per-device cost is (b) - (a) at each device count; split like the rest of the step, it
falls to 1/devices. FLOPs per device come from each device's partitioned HLO (flops.hlo_flops).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from pipeline.bench import flops as flops_lib
from pipeline.bench import harness
from pipeline import sharding
from pipeline import trainer as trainer_lib
from pipeline.bench import naive_head
from pipeline.models import energy as energy_lib
from pipeline.models import gemma

# Modes compiled on `devices` devices: the naive head is a one-device reference.
MULTI_MODES = ("no_head", "joint", "energy_only")


def step_costs(size: str, batch: int, log: Callable[[str], None] = print,
               modes=tuple(harness.MODES), devices: int = 1) -> dict[str, dict]:
  """Compiled cost of each mode's train step."""
  out = {}
  for mode in modes:
    _, compiled, seconds, counted = harness.compiled_step(size, mode, batch, devices)
    out[mode] = flops_lib.compiled_cost(compiled, counted)
    out[mode]["compile_s"] = seconds
    log(f"  compiled {mode} train step at size={size} batch={batch} on {devices} device(s): "
        f"{out[mode]['flops']:.4g} FLOPs ({out[mode]['device_flops']:.4g} per device), "
        f"{out[mode]['temp_bytes'] / 2**20:.1f} MiB temp per device ({seconds:.0f} s)")
  return out


def head_costs(size: str, batch: int, devices: int = 1) -> dict[str, Any]:
  """The energy head alone on the prefix output [B, S, W]: pairwise vs naive.

  'fwd' = the [B, B] energies; 'train' = value_and_grad of InfoNCE w.r.t. head params and the
  context (as in joint training). With devices > 1: the pairwise head only, on a mesh of that
  many devices, inputs split over the batch as in the train step, parameters replicated.
  """
  m = harness.mode_config(size, "joint", batch).model
  width = gemma.get_config(m.paligemma_variant).width
  seq = harness.prefix_len(m)
  dtype = jnp.dtype(m.dtype)
  context = jax.ShapeDtypeStruct((batch, seq, width), dtype)
  mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
  actions = jax.ShapeDtypeStruct((batch, m.action_horizon, m.action_dim), jnp.float32)
  out: dict[str, Any] = {"context_shape": [batch, seq, width]}
  heads = (("pairwise", energy_lib.EnergyModel), ("naive", naive_head.NaiveEnergyModel))
  mesh = harness.mesh_of(devices) if devices > 1 else None
  for name, cls in heads[:1] if mesh else heads:
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

    def compile_(fn):
      if mesh is None:
        return jax.jit(fn).lower(*args).compile()
      split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
      return jax.jit(trainer_lib.under_mesh(mesh, fn),
                     in_shardings=(whole, split, split, split)).lower(*args).compile()

    out[name] = {
        kind: flops_lib.compiled_cost(compile_(fn), flops_lib.count_flops(fn, *args))
        for kind, fn in (("fwd", energies),
                         ("train", jax.value_and_grad(loss, argnums=(0, 1))))
    }
  return out


def multi_device(size: str, batch: int, devices: int, one: dict[str, Any], time_size: str | None,
                 time_batch: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
  """Per-device cost on `devices` devices against one (`one`: the one-device result so far)."""
  ratio = harness.ratio
  costs = step_costs(size, batch, log=log, modes=MULTI_MODES, devices=devices)
  out: dict[str, Any] = {"devices": devices, "steps": costs}
  for key in ("device_flops", "xla_flops_loop_bodies_once", "temp_bytes"):
    # The head's share of a device's step: joint - no head, on 1 and on `devices` devices.
    at = [c["joint"][key] - c["no_head"][key] for c in (one["steps"], costs)]
    out[f"head_{key}"] = at
    out[f"head_{key}_ratio"] = ratio(at[1], at[0])
  head = out["head"] = head_costs(size, batch, devices)["pairwise"]
  for kind in ("fwd", "train"):
    for key in ("device_flops", "temp_bytes"):
      out[f"head_alone_{kind}_{key}_ratio"] = ratio(head[kind][key],
                                                    one["head"]["pairwise"][kind][key])
  for key in ("device_flops", "temp_bytes", "total_bytes"):
    out[f"energy_only_{key}_ratio"] = ratio(costs["energy_only"][key],
                                            one["steps"]["energy_only"][key])
  # On one device the head's tensors fit under the backbone's peak (joint - no head temp is ~0,
  # either sign), so its one-device memory cost is the head alone's training temp.
  out["head_temp_over_head_alone_1_device"] = ratio(
      out["head_temp_bytes"][1], one["head"]["pairwise"]["train"]["temp_bytes"])
  out["targets"] = {
      f"head_flops_per_device_le_0.2x_at_{devices}": out["head_device_flops_ratio"] <= 0.2,
      f"head_temp_per_device_le_0.2x_at_{devices}":
          out["head_temp_over_head_alone_1_device"] <= 0.2,
  }
  if time_size:
    # All four steps in one interleaved run, so that a change of load hits them alike.
    runs = {f"{mode}@{n}": harness.compiled_step(time_size, mode, time_batch, n)[:2]
            for n in (1, devices) for mode in ("no_head", "joint")}
    times = harness.time_train_steps(runs, steps)
    timed = {}
    for n in (1, devices):
      timed[n] = {mode: times[f"{mode}@{n}"] for mode in ("no_head", "joint")}
      t = {k: v["step_s"] for k, v in timed[n].items()}
      timed[n]["overhead"] = ratio(t["joint"] - t["no_head"], t["no_head"])
      log(f"  timed at size={time_size} batch={time_batch} on {n} device(s): no head "
          f"{t['no_head'] * 1e3:.1f} ms, joint {t['joint'] * 1e3:.1f} ms per step")
    out["timed"] = {"size": time_size, "batch": time_batch, "steps": steps,
                    "one": timed[1], "multi": timed[devices]}
  return out


def run(size: str = "full", batch: int | None = None, time_size: str | None = "mid",
        time_batch: int | None = None, steps: int = 3, devices: int = 1,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiled FLOPs / temp memory of the four steps and of the head alone; timed steps; with
  devices > 1, the same per device on that many devices against one (`multi`)."""
  ratio = harness.ratio
  batch = batch or harness.default_batch(size)
  time_batch = time_batch or harness.default_batch(time_size or size)
  for name, value in (("batch", batch), ("time_batch", time_batch if time_size else 0)):
    if value % devices:
      raise ValueError(f"{name}={value} does not split over {devices} devices")
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
  if devices > 1:
    multi = result["multi"] = multi_device(size, batch, devices, result, time_size, time_batch,
                                           steps, log)
    result["targets"].update(multi["targets"])
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
  if "multi" in result:
    lines += _multi_lines(result)
  lines.append(harness.targets_line(result))
  return "\n".join(lines)


def _multi_lines(result: dict[str, Any]) -> list[str]:
  m, n = result["multi"], result["multi"]["devices"]
  gib, tf = 2**30, 1e12
  lines = [f"per device, 1 vs {n} devices (TFLOPs: dots in the device's partitioned HLO, loops x "
           "trip count; XLA: cost_analysis, loop bodies once):",
           f"  {'mode':<12} {'devices':>7} {'TFLOPs':>9} {'XLA TFLOPs':>11} {'temp GiB':>9} "
           f"{'total GiB':>10}"]
  for mode in MULTI_MODES:
    for devices, steps in ((1, result["steps"]), (n, m["steps"])):
      s = steps[mode]
      lines.append(f"  {mode:<12} {devices:>7} {s['device_flops'] / tf:>9.3f} "
                   f"{s['xla_flops_loop_bodies_once'] / tf:>11.3f} {s['temp_bytes'] / gib:>9.2f} "
                   f"{s['total_bytes'] / gib:>10.2f}")
  for key, label, unit, scale in (("device_flops", "TFLOPs", "T", tf),
                                  ("xla_flops_loop_bodies_once", "XLA TFLOPs", "T", tf),
                                  ("temp_bytes", "temp", " GiB", gib)):
    one, many = m[f"head_{key}"]
    # A one-device increment at or below 0 (temp) is buffer-assignment noise: no ratio.
    r = f"ratio {m[f'head_{key}_ratio']:.3f}" if one > 0 else "ratio n/a"
    lines.append(f"  head (joint - no_head) {label:<10} 1 device {one / scale:+.3f}{unit}, "
                 f"{n} devices {many / scale:+.3f}{unit}, {r}")
  lines.append(f"  head temp on {n} devices / head alone training temp on 1 device "
               f"{m['head_temp_over_head_alone_1_device']:.3f}")
  for kind in ("fwd", "train"):
    h = m["head"][kind]
    lines.append(f"  head alone {kind:<5} on {n} devices: {h['device_flops'] / tf:.3f} TFLOPs, "
                 f"{h['temp_bytes'] / gib:.2f} GiB temp per device; vs 1 device: FLOPs "
                 f"{m[f'head_alone_{kind}_device_flops_ratio']:.3f}, temp "
                 f"{m[f'head_alone_{kind}_temp_bytes_ratio']:.3f}")
  lines.append(f"  energy_only {n} devices / 1: FLOPs {m['energy_only_device_flops_ratio']:.3f}, "
               f"temp {m['energy_only_temp_bytes_ratio']:.3f}, total "
               f"{m['energy_only_total_bytes_ratio']:.3f}")
  if "timed" in m:
    t = m["timed"]
    lines.append(f"wall clock at size={t['size']} batch={t['batch']} (median of {t['steps']}), "
                 f"1 vs {n} host devices:")
    for name, devices in (("one", 1), ("multi", n)):
      r = t[name]
      lines.append(f"  {devices} device(s): no_head {r['no_head']['step_s'] * 1e3:.1f} ms, joint "
                   f"{r['joint']['step_s'] * 1e3:.1f} ms, overhead {r['overhead']:.2%}")
  return lines
