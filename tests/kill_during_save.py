"""`python -m tests.kill_during_save ARGS`: `python -m pipeline.main ARGS` whose process SIGKILLs
itself right after the async save of step $KILL_DURING_SAVE_STEP has started, before Orbax commits
it (a machine lost mid-save)."""
import os
import signal

from absl import app

from pipeline import checkpoint
from pipeline import main

_save = checkpoint.Checkpointer.save


def _save_then_die(self, step, *args, **kwargs):
  saved = _save(self, step, *args, **kwargs)
  if saved and step == int(os.environ["KILL_DURING_SAVE_STEP"]):
    os.kill(os.getpid(), signal.SIGKILL)
  return saved


checkpoint.Checkpointer.save = _save_then_die

if __name__ == "__main__":
  app.run(main.main, flags_parser=main.parse_flags)
