"""Training entry point.

  python -m pipeline.main --config=configs/energy_only.py:smoke --workdir=/tmp/pi0e \
      [--config.batch_size=64 ...]

Multi-process runs call jax.distributed.initialize() first: from --coordinator_address /
--num_processes / --process_id, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment, or (TPU pod slices, Slurm, ...) JAX's own cluster detection when
--distributed=auto. Rerunning the same command resumes from workdir/checkpoints.

Exit status: 0 when training finished or stopped after a preemption notice (SIGTERM to any
process: a checkpoint is saved at a step all processes agree on); 1 with a `FATAL: ...` line on
an error (bad config, topology, data, non-finite training).
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pipeline import sharding
from pipeline import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, `path.py:variant`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, data (smoke).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialize when a coordinator is given or a multi-host TPU is detected; on: always "
    "(JAX detects the cluster); off: never.")
_VERBOSE_CHECKPOINTS = flags.DEFINE_bool(
    "verbose_checkpoints", False,
    "Keep Orbax's INFO logs (otherwise one line per checkpoint step).")
flags.mark_flags_as_required(["config", "workdir"])


def _multihost_tpu() -> bool:
  # Cloud TPU VMs list every worker of the slice; one name means a single host.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize_distributed() -> None:
  address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value
  if num is None and os.environ.get("JAX_NUM_PROCESSES"):
    num = int(os.environ["JAX_NUM_PROCESSES"])
  pid = _PROCESS_ID.value
  if pid is None and os.environ.get("JAX_PROCESS_ID"):
    pid = int(os.environ["JAX_PROCESS_ID"])
  mode = _DISTRIBUTED.value
  if mode == "off":
    return
  if address or num is not None or pid is not None:
    if not (address and num is not None and pid is not None):
      raise app.UsageError(
          "multi-process run needs all of coordinator address, process count and process id "
          f"(got address={address!r}, num_processes={num}, process_id={pid})")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif mode == "on" or _multihost_tpu():
    jax.distributed.initialize()


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with config overrides of unknown keys reported by their full name."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    # ml_collections raises AttributeError('<key>') for a key the locked config lacks.
    key = str(e).strip("'\"")
    overrides = [a for a in argv if a.startswith("--config.") and key in a]
    if not overrides:  # some other AttributeError, e.g. inside a config file
      raise
    raise SystemExit(f"FATAL: unknown config key {key!r} in {' '.join(overrides)}; the "
                     "config is locked, see configs/common.py for its fields") from e


class _QuietCheckpointInfo(logging.logging.Filter):
  """Drops Orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _VERBOSE_CHECKPOINTS.value:
    logging.get_absl_handler().addFilter(_QuietCheckpointInfo())
  maybe_initialize_distributed()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if "://" not in workdir:  # gs:// and other remote paths are used as given
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
  try:
    mesh = sharding.make_mesh(config.mesh.fsdp)
    logging.info("process %d/%d; local devices %d, global devices %d (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    logging.info("mesh %s", dict(mesh.shape))
    logging.info("config:\n%s", config)
    train.run(config, workdir, mesh)
  except Exception as e:  # pylint: disable=broad-except
    # The traceback goes to the log; the last line says what went wrong.
    logging.exception("training failed")
    raise SystemExit(f"FATAL: {type(e).__name__}: {e}") from e


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
