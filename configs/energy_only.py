"""Train only the energy head on top of frozen openpi pi0_libero weights.

`model.energy_mode = 'energy_only'`: every parameter outside `energy/` is frozen, gets no gradient
(the step differentiates the energy subtree only) and no optimizer state; the step runs the prefix
forward only.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg)
  c = common.get_base_config()
  c.model.energy_mode = "energy_only"
  return common.finalize(c, arg)
