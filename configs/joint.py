"""Joint training: flow-matching loss + energy_weight (0.1) x InfoNCE energy loss.

Energy gradients reach the shared prefix (vision + language expert).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  c.model.energy_mode = "joint"
  c.model.energy_weight = 0.1
  return common.finalize(c, arg)
