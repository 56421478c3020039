"""Fine-tune Pi0 on LIBERO (openpi pi0_libero recipe); the energy head only monitors.

The energy statistics are computed on stop_gradient inputs: no gradient from them reaches any
parameter, so the flow model trains exactly as in openpi.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  c.model.energy_mode = "monitor"
  return common.finalize(c, arg)
