"""Fine-tune Pi0 on LIBERO (openpi pi0_libero recipe); the energy head only monitors.

The energy statistics are computed on stop_gradient inputs: no gradient from them reaches any
parameter, so the flow model trains exactly as in openpi.
"""
import os
import sys

# config_flags loads this file by path; make the repo (configs/, pipeline/) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  c.model.use_energy_loss = False
  c.model.train_only_energy_model = False
  return common.finalize(c, arg)
