"""`bench serve`: latency of the policy server per request, plain sampling against the energy.

One in-process server (pipeline.serve) per variant, all up at once, each with its own
openpi-client `WebsocketClientPolicy`; the timed requests go round-robin over the variants, so
that a change of machine load hits all of them alike. Each request is one LIBERO observation
(two 256x256 uint8 cameras, 8-d state, a task prompt), as openpi's LIBERO example sends it.
Reported per variant, p50 / p95 over the timed requests (after the warm-up call and a few
untimed requests):
  infer      the server's `server_timing.infer_ms`: host transforms + the jitted sampler +
             absolute actions, what a rollout waits for beyond the network
  model      `policy_timing.infer_ms`: the jitted sampler alone
  round trip what the client measures around `infer` (msgpack, websocket, loopback)
Random params of the model size (latency does not depend on the values), identity norm stats.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from pipeline import policy as policy_lib
from pipeline import serve
from pipeline import trainer as trainer_lib
from pipeline.bench import harness
from pipeline.data import tokenizer

WARM_REQUESTS = 3
PROMPT = "put both the alphabet soup and the tomato sauce in the basket"


def _variants(candidates: Sequence[int],
              refine_steps: int) -> dict[str, policy_lib.SamplingOptions]:
  out = {"plain": policy_lib.SamplingOptions()}
  out.update({f"best_of_{n}": policy_lib.SamplingOptions(num_candidates=n) for n in candidates})
  if refine_steps:
    out[f"refine_{refine_steps}"] = policy_lib.SamplingOptions(refine_steps=refine_steps)
  return out


def _config(size: str, stats_dir: str):
  config = harness.mode_config(size, "joint", 1)  # joint: a model with its energy head
  stats = {"norm_stats": {"state": {"mean": [0.0] * 8, "std": [1.0] * 8},
                          "actions": {"mean": [0.0] * 7, "std": [1.0] * 7}}}
  path = os.path.join(stats_dir, "norm_stats.json")
  with open(path, "w") as f:
    json.dump(stats, f)
  config.data.norm_stats_path = path
  config.data.tokenizer_path = tokenizer.SYNTHETIC_TOKENIZER  # no download; fits every size
  return config


def _observation(rng: np.random.Generator) -> dict[str, Any]:
  return {"observation/image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
          "observation/wrist_image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
          "observation/state": rng.normal(size=8).astype(np.float32), "prompt": PROMPT}


def _percentiles(values: list[float]) -> dict[str, float]:
  p50, p95 = np.percentile(np.asarray(values), [50, 95])
  return {"p50": float(p50), "p95": float(p95)}


def run(size: str = "mid", requests: int = 50, candidates: Sequence[int] = (4, 16),
        refine_steps: int = 5, log: Callable[[str], None] = print) -> dict[str, Any]:
  from openpi_client import websocket_client_policy  # pylint: disable=g-import-not-at-top
  variants = _variants(candidates, refine_steps)
  with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
    config = _config(size, tmp)
    trainer = trainer_lib.Trainer(config, harness.mesh_of(1))
    params = trainer.init_params(jax.random.key(0))
    clients, compile_s = {}, {}
    for name, options in variants.items():
      policy = policy_lib.Policy(config, params, trainer, options)
      compile_s[name] = policy.warmup()
      log(f"  {name}: compiled and warmed up in {compile_s[name]:.1f} s")
      port = servers.enter_context(serve.in_thread(policy))
      clients[name] = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
    rng = np.random.default_rng(0)
    for _ in range(WARM_REQUESTS):
      obs = _observation(rng)
      for client in clients.values():
        client.infer(obs)
    times = {name: {"infer": [], "model": [], "round_trip": []} for name in variants}
    for _ in range(requests):
      obs = _observation(rng)
      for name, client in clients.items():
        start = time.perf_counter()
        reply = client.infer(obs)
        t = times[name]
        t["round_trip"].append((time.perf_counter() - start) * 1e3)
        t["infer"].append(reply["server_timing"]["infer_ms"])
        t["model"].append(reply["policy_timing"]["infer_ms"])
  ms = {name: {k: _percentiles(v) for k, v in t.items()} for name, t in times.items()}
  plain = ms["plain"]["infer"]
  return {"command": "serve", "device": harness.device_kind(), "size": size,
          "requests": requests, "image": [256, 256], "num_steps": 10, "compile_s": compile_s,
          "ms": ms, "over_plain": {name: {q: harness.ratio(m["infer"][q], plain[q])
                                          for q in ("p50", "p95")} for name, m in ms.items()}}


def format_table(result: dict[str, Any]) -> str:
  lines = [f"== bench serve on {result['device']}",
           f"policy server, size={result['size']}, one LIBERO observation per request "
           f"(256x256 cameras), {result['num_steps']} Euler steps; ms over {result['requests']} "
           "requests after warm-up",
           f"  {'variant':<12} {'infer p50':>10} {'infer p95':>10} {'model p50':>10} "
           f"{'round trip p50':>15} {'p50 vs plain':>13} {'p95 vs plain':>13}"]
  for name, m in result["ms"].items():
    r = result["over_plain"][name]
    lines.append(f"  {name:<12} {m['infer']['p50']:>10.1f} {m['infer']['p95']:>10.1f} "
                 f"{m['model']['p50']:>10.1f} {m['round_trip']['p50']:>15.1f} "
                 f"{r['p50']:>12.2f}x {r['p95']:>12.2f}x")
  return "\n".join(lines)
