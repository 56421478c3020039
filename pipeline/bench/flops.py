"""Matmul / conv FLOPs counted from a jaxpr, loops counted once per iteration.

XLA's `cost_analysis()` counts a loop body (scan, while, lax.map) once, which undercounts scanned
layer stacks; this counter multiplies loop bodies by their trip counts. `hlo_flops` does the same
on one device's compiled program, after SPMD partitioning.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core  # `import jax` alone does not load jax.extend


def _sub_jaxprs(value):
  """The jaxprs inside one eqn param value (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _while_trip_count(eqn) -> int | None:
  """Trip count of a fori_loop-shaped while with literal bounds, else None.

  fori_loop with traced bounds lowers to a while with carry (i, upper, ...) and cond i < upper.
  """
  cond = eqn.params["cond_jaxpr"].jaxpr
  nconst = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
  carry = eqn.invars[nconst:]
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt" or len(carry) < 2:
    return None
  cond_carry = cond.invars[eqn.params["cond_nconsts"]:]
  if list(cond.eqns[0].invars) != list(cond_carry[:2]):
    return None
  lo, hi = carry[:2]
  if not all(isinstance(v, jax.extend.core.Literal) for v in (lo, hi)):
    return None
  return max(0, int(hi.val) - int(lo.val))


def _jaxpr_flops(jaxpr, stats: dict[str, int]) -> float:
  """Matmul / conv FLOPs of a jaxpr; counts unknown-trip-count whiles in stats."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      batch = math.prod([lhs[d] for d in lb])
      contract = math.prod([lhs[d] for d in lc])
      lhs_free = math.prod([n for d, n in enumerate(lhs) if d not in (*lc, *lb)])
      rhs_free = math.prod([n for d, n in enumerate(rhs) if d not in (*rc, *rb)])
      total += 2.0 * batch * lhs_free * rhs_free * contract
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
      # The kernel's in-feature dim is already in_features / feature_group_count.
      per_out = rhs[rhs_spec[1]] * math.prod([rhs[d] for d in rhs_spec[2:]])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
    elif name == "scan":
      total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr, stats)
    elif name == "while":
      trips = _while_trip_count(eqn)
      if trips is None:
        stats["uncounted_while"] += 1
        trips = 1
      body = _jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, stats)
      cond = _jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr, stats)
      total += trips * (body + cond) + cond
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr, stats) for b in eqn.params["branches"])
    elif name == "shard_map":
      # The body sees one device's shards and runs once per device of its manual axes.
      mesh = eqn.params["mesh"]
      copies = math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
      total += copies * sum(_jaxpr_flops(j, stats) for j in _sub_jaxprs(eqn.params["jaxpr"]))
    else:
      # pjit, closed_call, remat, custom_jvp/vjp calls, ...: their sub-jaxprs once.
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += _jaxpr_flops(sub, stats)
  return total


def count_flops(fn: Callable[..., Any], *args) -> dict[str, float]:
  """Matmul and conv FLOPs of fn(*args) from its jaxpr, loops counted once per iteration.

  args may be jax.ShapeDtypeStructs. Returns {"flops", "uncounted_while"}: the number of while
  loops with an unknown trip count, whose body is counted once.
  """
  stats = {"uncounted_while": 0}
  flops = _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, stats)
  return {"flops": float(flops), "uncounted_while": stats["uncounted_while"]}


def compiled_cost(compiled, counted: dict[str, float]) -> dict[str, float]:
  """FLOPs (counted from the jaxpr: the whole program), one device's FLOPs (from its HLO) and
  XLA's, and one device's memory (temp, total) of an executable."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0]
  cost = cost or {}
  mem = compiled.memory_analysis()
  return {
      "flops": float(counted["flops"]),
      "uncounted_while": int(counted["uncounted_while"]),
      "xla_flops_loop_bodies_once": float(cost.get("flops", float("nan"))),
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "temp_bytes": float(getattr(mem, "temp_size_in_bytes", float("nan"))),
      "argument_bytes": float(getattr(mem, "argument_size_in_bytes", float("nan"))),
      # Per device: arguments + outputs not aliased to (donated) arguments + temp.
      "total_bytes": float(sum(getattr(mem, f"{k}_size_in_bytes", float("nan"))
                               for k in ("argument", "output", "temp"))
                           - getattr(mem, "alias_size_in_bytes", 0.0)),
      "device_flops": hlo_flops(compiled)["flops"],
  }


# ---------------------------------------------------------------------------------------------
# Per-device FLOPs of a compiled (SPMD-partitioned) program

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")
_DIMS = re.compile(r"\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
  """Dims of an array shape like 'f32[4,8]{1,0}' ([] for a scalar or a tuple)."""
  m = _DIMS.search(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m and not shape.startswith("(") else []


def _instruction_flops(op: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
  if op not in ("dot", "convolution"):
    return 0.0
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  out = math.prod(_dims(shape))
  if op == "dot":
    lhs = _dims(shapes.get(operands[0], ""))
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    dims = [int(d) for d in contract.group(1).split(",") if d] if contract else []
    return 2.0 * out * math.prod(lhs[d] for d in dims)
  # convolution: each output element sums over the kernel's input features and window.
  rhs = _dims(shapes.get(operands[1], ""))
  labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
  return 2.0 * out * math.prod(n for n, c in zip(rhs, labels) if c != "o")


def hlo_flops(compiled) -> dict[str, float]:
  """Dot / convolution FLOPs of one device's program, while loops x their known trip count.

  Reads the optimized, partitioned HLO text, so work that the partitioner replicates shows up
  on every device (XLA's own cost_analysis counts loop bodies once). Returns {"flops",
  "uncounted_while"}: whiles with dots but no known trip count, counted once.
  """
  comps: dict[str, list[tuple[str, str, str]]] = {}
  shapes: dict[str, str] = {}
  entry, current = None, None
  for line in compiled.as_text().splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = comps.setdefault(m.group(1), [])
      entry = m.group(1) if line.startswith("ENTRY") else entry
      # Parameters: "name: shape" pairs in the header.
      for name, shape in re.findall(r"([\w.\-]+): (\S+?)[,)]", line.split(" -> ")[0]):
        shapes[name] = shape
      continue
    m = _INSTRUCTION.match(line)
    if m and current is not None:
      name, shape, op, rest = m.groups()
      shapes[name] = shape
      current.append((op, shape, rest))
  stats = {"uncounted_while": 0}
  memo: dict[str, float] = {}

  def total(comp: str) -> float:
    if comp not in memo:
      memo[comp] = 0.0  # guards against cycles (none in valid HLO)
      flops = 0.0
      for op, shape, rest in comps.get(comp, []):
        flops += _instruction_flops(op, shape, rest, shapes)
        if op == "while":
          body = re.search(r"body=%([\w.\-]+)", rest).group(1)
          trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
          if trips is None and total(body):
            stats["uncounted_while"] += 1
          flops += (int(trips.group(1)) if trips else 1) * total(body)
        elif op == "conditional":
          listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
          branches = re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else re.findall(
              r"_computation=%([\w.\-]+)", rest)
          flops += max((total(b) for b in branches), default=0.0)
        else:
          # fusion / call / async bodies; to_apply (reductions) holds no dots.
          for callee in re.findall(r"calls=%([\w.\-]+)", rest):
            flops += total(callee)
      memo[comp] = flops
    return memo[comp]

  return {"flops": total(entry), "uncounted_while": stats["uncounted_while"]}
