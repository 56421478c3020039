"""Runs `python -m pipeline.main` as several local processes: multi-process training on one host.

  python -m pipeline.launch_local --num_processes=2 --cpu_devices=4 [--process_logs=DIR] -- \
      --config=configs/energy_only.py:smoke --workdir=/tmp/pi0e

Every process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `pipeline.main` passes to jax.distributed.initialize; with --cpu_devices each
also sees that many host CPU devices (XLA_FLAGS). SIGTERM / SIGINT to the launcher is forwarded to
every process as SIGTERM (a preemption notice). The exit status is the first non-zero status of
the processes, else 0. Tests use `spawn` / `wait` directly.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from absl import app
from absl import flags

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  try:
    import portpicker  # pylint: disable=g-import-not-at-top
  except ImportError:
    # The OS picks a port that is free now; the coordinator binds it moments later.
    with socket.socket() as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]
  return portpicker.pick_unused_port()


def process_env(process_id: int, num_processes: int, coordinator: str | None,
                cpu_devices: int | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
  env = dict(os.environ if base is None else base)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  if num_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  if cpu_devices:
    # Replaces an inherited device count (e.g. the test suite's 8) rather than adding a second.
    xla = re.sub(_DEVICE_COUNT_FLAG + r"=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{xla} {_DEVICE_COUNT_FLAG}={cpu_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def spawn(main_args: Sequence[str], *, num_processes: int, cpu_devices: int | None = None,
          env: Mapping[str, str] | None = None, log_dir: str | None = None,
          module: str = "pipeline.main", cwd: str | None = None) -> list[subprocess.Popen]:
  """Starts `python -m module *main_args` num_processes times; logs to log_dir/process_<i>.log."""
  coordinator = f"localhost:{free_port()}" if num_processes > 1 else None
  procs = []
  for i in range(num_processes):
    out = None
    if log_dir is not None:
      os.makedirs(log_dir, exist_ok=True)
      # Appended: a rerun (resume) keeps the log of the run it continues.
      out = open(os.path.join(log_dir, f"process_{i}.log"), "a")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, *main_args], cwd=cwd,
        env=process_env(i, num_processes, coordinator, cpu_devices, env),
        stdout=out, stderr=subprocess.STDOUT if out is not None else None))
    if out is not None:
      out.close()  # the child holds its own descriptor
  return procs


def wait(procs: Sequence[subprocess.Popen], timeout: float | None = None) -> list[int]:
  """Exit statuses; on timeout every process still running is killed and TimeoutError raised."""
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired as e:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    raise TimeoutError(f"processes still running after {timeout} s: killed") from e
  return [p.returncode for p in procs]


def _define_flags() -> None:
  # Defined only when run as a program: pipeline.main, importable beside it, has --num_processes.
  flags.DEFINE_integer("num_processes", 2, "Processes to start.")
  flags.DEFINE_integer("cpu_devices", None,
                       "Host CPU devices per process (CPU runs); unset: the platform's devices.")
  flags.DEFINE_string("process_logs", None, "Per-process logs here (default: this terminal).")


def main(argv):
  f = flags.FLAGS
  procs = spawn(argv[1:], num_processes=f.num_processes, cpu_devices=f.cpu_devices,
                log_dir=f.process_logs)

  def forward(signum, frame):
    del signum, frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = wait(procs)
  bad = [c for c in codes if c]
  sys.exit(bad[0] if bad else 0)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
