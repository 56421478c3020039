"""Train only the energy head on top of frozen openpi pi0_libero weights.

Freezing is `optim.trainable = ('energy/.*',)`: every other parameter is frozen, gets no
gradient (the step differentiates the energy subtree only) and no optimizer state.
"""
import os
import sys

# config_flags loads this file by path; make the repo (configs/, pipeline/) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  # The model treats these flags as exclusive modes; energy-only is not 'use_energy_loss'.
  c.model.use_energy_loss = False
  c.model.train_only_energy_model = True
  c.optim.trainable = ("energy/.*",)
  return common.finalize(c, arg)
