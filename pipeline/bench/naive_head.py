"""The naive energy head: the reference the pairwise head's cost is measured against.

It computes E(context_i, actions_j) for all B x B pairs by repeating every context B times and
running the whole head on each pair, which is what the pairwise head avoids.
"""
from __future__ import annotations

import jax.numpy as jnp

from pipeline.models import energy as energy_lib
from pipeline.models import pi0


def naive_pairwise(energy_model, context, context_mask, actions, *, rngs=None):
  """[i, j] = E(context_i, actions_j) by materializing all B*B pairs and calling the head."""
  b_ctx, b_act = context.shape[0], actions.shape[0]
  ctx = jnp.repeat(context, b_act, axis=0)  # pair p = i * b_act + j
  mask = jnp.repeat(context_mask, b_act, axis=0)
  act = jnp.tile(actions, (b_ctx, 1, 1))
  return energy_model(ctx, mask, act, rngs=rngs).reshape(b_ctx, b_act)


class NaiveEnergyModel(energy_lib.EnergyModel):
  """Same parameters as EnergyModel; `pairwise` repeats the context B times."""

  def pairwise(self, context, context_mask, actions, *, rngs=None):
    return naive_pairwise(self, context, context_mask, actions, rngs=rngs)


def build_model(model_config, rngs):
  """Pi0 whose energy head computes pairwise energies naively (same parameter tree)."""
  model = pi0.build_model(model_config, rngs)
  cfg = model.config
  model.energy = NaiveEnergyModel(
      model.prefix_width, cfg.energy_act_dim, hidden=cfg.energy_hidden, heads=cfg.energy_heads,
      num_layers=cfg.energy_layers, horizon=cfg.action_horizon, dropout=cfg.energy_dropout,
      dtype=model.dtype, rngs=rngs)
  return model
