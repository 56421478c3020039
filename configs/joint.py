"""Joint training: flow-matching loss + energy_weight (0.1) x InfoNCE energy loss.

Energy gradients reach the shared prefix (vision + language expert).
"""
import os
import sys

# config_flags loads this file by path; make the repo (configs/, pipeline/) importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  c.model.use_energy_loss = True
  c.model.train_only_energy_model = False
  c.model.energy_weight = 0.1
  return common.finalize(c, arg)
