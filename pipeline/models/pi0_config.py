"""Pi0's hyper-parameters: the `config.model` section, read whole (configs/common.py sets them)."""

import dataclasses
from typing import Any, Mapping

ENERGY_MODES = ('off', 'monitor', 'joint', 'energy_only')


@dataclasses.dataclass(frozen=True)
class Pi0Config:
  """Model hyper-parameters: the `config.model` section (configs/common.py sets the defaults)."""
  paligemma_variant: str
  action_expert_variant: str
  vision_variant: str
  image_size: int
  action_dim: int
  action_horizon: int
  max_token_len: int
  vocab_size: int
  dtype: str
  remat: bool
  # off | monitor | joint | energy_only (see Pi0.compute_train_loss).
  energy_mode: str
  energy_hidden: int
  energy_heads: int
  energy_layers: int
  energy_act_dim: int
  energy_tau: float
  energy_weight: float
  energy_dropout: float

  @classmethod
  def from_model_config(cls, model_config: Any) -> 'Pi0Config':
    """Reads a ConfigDict / mapping / Pi0Config; a missing or unknown key is an error."""
    if isinstance(model_config, cls):
      return model_config
    if hasattr(model_config, 'to_dict'):
      model_config = model_config.to_dict()
    if not isinstance(model_config, Mapping):
      raise TypeError('model config must be a ConfigDict, a mapping or a '
                      f'Pi0Config, got {type(model_config).__name__}.')
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(model_config) - set(names))
    missing = [k for k in names if k not in model_config]
    if unknown or missing:
      raise ValueError(f'config.model: unknown keys {unknown}, missing keys '
                       f'{missing} (fields: {names}).')
    return cls(**model_config)

  @property
  def energy_head(self) -> bool:
    return self.energy_mode != 'off'

  def validate(self) -> None:
    if self.dtype not in ('bfloat16', 'float32', 'float16'):
      raise ValueError(f"config.model.dtype must be 'bfloat16' or 'float32', "
                       f'got {self.dtype!r}.')
    for key in ('image_size', 'action_dim', 'action_horizon', 'max_token_len',
                'vocab_size'):
      if getattr(self, key) < 1:
        raise ValueError(f'config.model.{key} must be >= 1, got '
                         f'{getattr(self, key)}.')
    if self.energy_mode not in ENERGY_MODES:
      raise ValueError(f'config.model.energy_mode must be one of {ENERGY_MODES}, '
                       f'got {self.energy_mode!r}.')
    if self.energy_head and not 1 <= self.energy_act_dim <= self.action_dim:
      raise ValueError(f'config.model.energy_act_dim must be in [1, '
                       f'action_dim={self.action_dim}], got '
                       f'{self.energy_act_dim}.')


def trainable_pattern(energy_mode: str) -> str:
  """Regex of the parameters a mode may train: energy_only trains the head only."""
  return r'energy/.*' if energy_mode == 'energy_only' else r'.*'
