"""`python -m pipeline.bench COMMAND [flags]`: one benchmark, printed as a table or one JSON."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax

from pipeline.bench import checkpoint
from pipeline.bench import energy
from pipeline.bench import harness
from pipeline.bench import loader
from pipeline.bench import sample
from pipeline.bench import serve
from pipeline.bench import step

_SIZE = flags.DEFINE_enum("size", None, harness.SIZES,
                          "Model size (default: full for energy and loader, mid otherwise).")
_TIME_SIZE = flags.DEFINE_enum("time_size", "mid", harness.SIZES,
                               "energy: model size of the wall-clock comparison.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: 32 full, 8 mid, 4 tiny).")
_TIME_BATCH = flags.DEFINE_integer("time_batch", None, "energy: batch of the timed steps.")
_DEVICES = flags.DEFINE_integer("devices", 1,
                                "energy: also measure per device on this many devices against one; "
                                "> 1 runs JAX on that many host CPU devices.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_SAVES = flags.DEFINE_integer("saves", 5, "checkpoint: number of saves (median reported).")
_EXTRA_MIB = flags.DEFINE_list("extra_mib", ["0", "256", "1024"],
                               "checkpoint: one row per value, adding a float32 array of that "
                               "many MiB to the state.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None,
                                  "step: peak device TFLOP/s for the MFU (default: known TPU/GPU "
                                  "kinds; n/a on CPU).")
_DATASET_DIR = flags.DEFINE_string("dataset_dir", "",
                                   "loader: prepared dataset (default: a synthetic one in a temp "
                                   "dir).")
_EPISODES = flags.DEFINE_integer("episodes", 8, "loader: synthetic episodes to write.")
_SOURCE_IMAGE_SIZE = flags.DEFINE_integer("source_image_size", 256,
                                          "loader: synthetic image size (LIBERO: 256).")
_BATCHES = flags.DEFINE_integer("batches", 20, "loader: timed batches per pipeline.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "loader: worker counts.")
_CANDIDATES = flags.DEFINE_list("candidates", ["4", "16"], "sample, serve: best-of-N sizes.")
_REQUESTS = flags.DEFINE_integer("requests", 50, "serve: timed requests per variant.")
_REFINE_STEPS = flags.DEFINE_integer("refine_steps", 5, "serve: steps of the refine variant.")
_TOKENIZER = flags.DEFINE_string("tokenizer_path", "",
                                 "loader: tokenizer (default: the synthetic one for the synthetic "
                                 "dataset, else config.data.tokenizer_path).")

# command -> (module with run / format_table, the keyword arguments of run from the flags).
COMMANDS = {
    "energy": (energy, lambda: dict(
        size=_SIZE.value or "full", batch=_BATCH.value, time_size=_TIME_SIZE.value,
        time_batch=_TIME_BATCH.value, steps=_STEPS.value, devices=_DEVICES.value)),
    "loader": (loader, lambda: dict(
        dataset_dir=_DATASET_DIR.value, size=_SIZE.value or "full",
        batch=_BATCH.value or harness.default_batch(_SIZE.value or "full"),
        num_batches=_BATCHES.value, workers=[int(w) for w in _WORKERS.value],
        episodes=_EPISODES.value, source_image_size=_SOURCE_IMAGE_SIZE.value,
        tokenizer_path=_TOKENIZER.value)),
    "checkpoint": (checkpoint, lambda: dict(
        size=_SIZE.value or "mid", batch=_BATCH.value, saves=_SAVES.value,
        extra_mib=[float(x) for x in _EXTRA_MIB.value])),
    "sample": (sample, lambda: dict(
        size=_SIZE.value or "full", batch=_BATCH.value or 1,
        candidates=[int(n) for n in _CANDIDATES.value], time_size=_TIME_SIZE.value,
        time_batch=_TIME_BATCH.value or 1, steps=_STEPS.value)),
    "serve": (serve, lambda: dict(
        size=_SIZE.value or "mid", requests=_REQUESTS.value,
        candidates=[int(n) for n in _CANDIDATES.value], refine_steps=_REFINE_STEPS.value)),
    "step": (step, lambda: dict(
        size=_SIZE.value or "mid", batch=_BATCH.value, steps=_STEPS.value,
        peak=_PEAK_TFLOPS.value)),
}


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m pipeline.bench {{{'|'.join(COMMANDS)}}} [--json]")
  module, kwargs = COMMANDS[argv[1]]
  if _DEVICES.value > 1:
    # Host devices exist only if asked for before JAX starts its backend (nothing above has
    # touched it); the config raises if it is too late, where XLA_FLAGS would be ignored.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  logging.set_verbosity(logging.WARNING)  # the trainer logs every param's sharding at INFO
  if _JSON.value:
    # Progress goes to stderr; stdout stays one JSON object.
    log = lambda s: print(s, file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
      result = module.run(**kwargs(), log=log)
    print(json.dumps(result))
  else:
    print(module.format_table(module.run(**kwargs(), log=print)))


if __name__ == "__main__":
  app.run(main)
