"""openpi-compatible websocket policy server: openpi's clients talk to a trained checkpoint.

  python -m pipeline.serve --workdir=W [--step=N] [--port=8000] [--num_candidates=N]
      [--refine_steps=K] [--refine_step_size=S] [--config=configs/pi0_libero.py]

W: one of our workdirs or checkpoint steps, or openpi-layout params (pipeline.export's D, with
--config naming the model); see pipeline.policy. Inference is compiled by a warm-up call before
the port opens.

Protocol (openpi's, so `openpi_client.websocket_client_policy.WebsocketClientPolicy` works
unchanged), every binary frame msgpack with openpi's numpy extension (openpi_client.msgpack_numpy):
  on connect   the server sends its metadata (weights, step, norm stats, sizes, which energy
               features are on)
  per request  the client sends an observation dict (openpi's LIBERO keys: observation/image,
               observation/wrist_image, observation/state, prompt); the server answers
               {"actions": float32 [action_horizon, 7] absolute, unnormalized (LiberoOutputs),
                "policy_timing": {"infer_ms"}, "server_timing": {"infer_ms"[, "prev_total_ms"]},
                + "energy" / "candidate_energies" when the energy head takes part}
  on an error  a text frame with the reason (the client raises RuntimeError with it); unlike
               openpi the connection stays open for the next request
HTTP GET /healthz answers 200. Requests of all clients share one inference thread, in arrival
order. SIGINT / SIGTERM close the connections and exit 0.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http
import os
import signal
import threading
import time
import traceback
from typing import Callable, Iterator

from absl import app
from absl import flags
from absl import logging
from openpi_client import msgpack_numpy
from websockets.asyncio import server as ws_server
import websockets.exceptions

from pipeline import policy as policy_lib


def _healthz(connection, request):
  if request.path == "/healthz":
    return connection.respond(http.HTTPStatus.OK, "OK\n")
  return None  # anything else: the websocket handshake


async def _answer(policy: policy_lib.Policy, infer_thread, message) -> dict | str:
  """One request frame -> the result dict, or the error reason (sent as a text frame)."""
  start = time.monotonic()
  try:
    if isinstance(message, str):
      raise policy_lib.RequestError("expected a binary msgpack frame (openpi_client's "
                                    "msgpack_numpy), got a text frame")
    try:
      obs = msgpack_numpy.unpackb(message)
    except Exception as e:  # msgpack raises several types for bad bytes
      raise policy_lib.RequestError(f"cannot decode the request as msgpack: {e}") from e
    result = await asyncio.get_running_loop().run_in_executor(infer_thread, policy.infer, obs)
  except policy_lib.RequestError as e:
    logging.warning("bad request: %s", e)
    return f"bad request: {e}"
  except Exception:  # a bug must not take the server down: the client gets the traceback
    logging.exception("inference failed")
    return f"inference failed:\n{traceback.format_exc()}"
  result["server_timing"] = {"infer_ms": (time.monotonic() - start) * 1e3}
  return result


async def serve(policy: policy_lib.Policy, host: str, port: int, stop: asyncio.Future, *,
                ready: Callable[[int], None] | None = None) -> None:
  """Serves until `stop` is done; `ready(port)` once listening (port 0 picks a free one)."""
  infer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="infer")
  packed_metadata = msgpack_numpy.packb(policy.metadata)

  async def handler(conn):
    logging.info("client %s connected", conn.remote_address)
    prev_total_ms = None
    try:
      await conn.send(packed_metadata)
      while True:
        start = time.monotonic()  # as openpi: prev_total_ms includes waiting for the request
        reply = await _answer(policy, infer_thread, await conn.recv())
        if isinstance(reply, dict):
          if prev_total_ms is not None:
            reply["server_timing"]["prev_total_ms"] = prev_total_ms
          reply = msgpack_numpy.packb(reply)
        await conn.send(reply)
        prev_total_ms = (time.monotonic() - start) * 1e3
    except websockets.exceptions.ConnectionClosed:
      logging.info("client %s disconnected", conn.remote_address)

  try:
    async with ws_server.serve(handler, host, port, compression=None, max_size=None,
                               process_request=_healthz) as server:
      port = server.sockets[0].getsockname()[1]
      if ready is not None:
        ready(port)
      await stop
  finally:
    infer_thread.shutdown(wait=True)


@contextlib.contextmanager
def in_thread(policy: policy_lib.Policy, host: str = "127.0.0.1", port: int = 0
              ) -> Iterator[int]:
  """The server on a background thread (tests, benchmarks); yields its port, stops on exit."""
  loop = asyncio.new_event_loop()
  stop = loop.create_future()
  started = threading.Event()
  ports, errors = [], []

  def run():
    try:
      loop.run_until_complete(serve(policy, host, port, stop,
                                    ready=lambda p: (ports.append(p), started.set())))
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)
      started.set()
    finally:
      loop.close()

  thread = threading.Thread(target=run, name="pipeline.serve", daemon=True)
  thread.start()
  started.wait()
  if errors:
    raise errors[0]
  try:
    yield ports[0]
  finally:
    loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
    thread.join()


async def _main_async(policy: policy_lib.Policy, host: str, port: int) -> None:
  loop = asyncio.get_running_loop()
  stop = loop.create_future()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, lambda s=sig: stop.done() or (
        logging.warning("%s: stopping", signal.Signals(s).name), stop.set_result(None)))

  def ready(bound: int) -> None:
    # One stdout line that scripts (and the tests) wait for.
    print(f"pipeline.serve: listening on ws://{host}:{bound}", flush=True)

  await serve(policy, host, port, stop, ready=ready)


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "Model config (`path.py:variant`): needed for openpi-layout params; "
      "default for our checkpoints: the run's saved config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "One of our workdirs or checkpoint steps, or an "
                      "openpi-layout params dir (pipeline.export's D).")
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
  flags.DEFINE_string("host", "0.0.0.0", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free one, printed).")
  flags.DEFINE_integer("num_candidates", 1, "> 1: best-of-N by energy.")
  flags.DEFINE_integer("refine_steps", 0, "> 0: energy refinement steps after sampling.")
  flags.DEFINE_float("refine_step_size", 0.1, "Step size of the energy refinement.")
  flags.DEFINE_float("refine_max_step", 0.1, "Bound on the L2 norm of one refinement step.")
  flags.DEFINE_integer("num_steps", 10, "Euler steps of the flow.")
  flags.DEFINE_integer("seed", 0, "Request i uses noise from fold_in(key(seed), i).")
  flags.DEFINE_bool("ema", True, "Our checkpoints: serve the EMA params where the run kept them.")
  flags.DEFINE_integer("fsdp", None, "Devices the params are sharded over (-1: all; default: "
                       "the run's mesh.fsdp where it divides the device count, else all).")
  flags.mark_flags_as_required(["workdir"])


def _exit_before_serving(signum, frame):  # pylint: disable=unused-argument
  logging.warning("%s: stopped before serving", signal.Signals(signum).name)
  logging.flush()
  os._exit(0)  # pylint: disable=protected-access


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.INFO)
  options = policy_lib.SamplingOptions(
      num_steps=f.num_steps, num_candidates=f.num_candidates, refine_steps=f.refine_steps,
      refine_step_size=f.refine_step_size, refine_max_step=f.refine_max_step, seed=f.seed)
  # Stopped while loading or compiling: nothing to close yet, and unwinding out of a JAX import or
  # compile can crash the interpreter's teardown, so leave at once.
  signal.signal(signal.SIGTERM, _exit_before_serving)
  signal.signal(signal.SIGINT, _exit_before_serving)
  try:
    policy = policy_lib.Policy.load(os.path.expanduser(f.workdir), step=f.step, config=f.config,
                                    options=options, use_ema=f.ema, fsdp=f.fsdp)
    policy.warmup()
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"serve: {e}") from None
  try:
    asyncio.run(_main_async(policy, f.host, f.port))
  except OSError as e:  # the port is taken, the host unknown
    raise SystemExit(f"serve: cannot listen on {f.host}:{f.port}: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
