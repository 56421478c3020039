"""Full-size parameter trees == openpi's measured listings (no allocation)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import common
from pipeline.models import build_model

# openpi's parameter listings (path, shape, dtype), measured from openpi itself.
REFERENCE = Path(__file__).resolve().parent / 'reference'


def _flat_params(model_config):
  model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
  pure = nnx.state(model, nnx.Param).to_pure_dict()
  return {'/'.join(str(k.key) for k in path): (tuple(v.shape), str(v.dtype))
          for path, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _reference(name):
  listing = json.loads((REFERENCE / name).read_text())['params']
  return {p['path']: (tuple(p['shape']), p['dtype']) for p in listing}


def _diff(got, want):
  lines = []
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      lines.append(f'{key}: ours {got.get(key)} openpi {want.get(key)}')
  return '\n'.join(lines)


FULL = dict(common.model_config().to_dict(), energy_mode='monitor')


def test_full_size_tree_matches_openpi():
  got = _flat_params(FULL)
  energy = {k for k in got if k.startswith('energy/')}
  assert energy, 'the energy head should be part of the tree'
  got = {k: v for k, v in got.items() if k not in energy}
  want = _reference('openpi_params_pi0.json')
  assert all(dtype == 'float32' for _, dtype in want.values())
  assert got == want, _diff(got, want)


def test_dummy_tree_matches_openpi():
  # openpi's dummy Pi0 keeps the full So400m tower; only the LLMs shrink.
  got = _flat_params(dict(FULL, paligemma_variant='dummy',
                          action_expert_variant='dummy', energy_mode='off'))
  want = _reference('openpi_params_pi0_dummy.json')
  assert got == want, _diff(got, want)


def test_full_size_train_loss_traces():
  """Shapes only: the full model's train loss and prefix encoding trace."""
  model = nnx.eval_shape(lambda: build_model(FULL, nnx.Rngs(0)))
  b = 2
  sds = jax.ShapeDtypeStruct
  keys = ('base_0_rgb', 'left_wrist_0_rgb', 'right_wrist_0_rgb')
  obs = {
      'image': {k: sds((b, 224, 224, 3), jnp.float32) for k in keys},
      'image_mask': {k: sds((b,), jnp.bool_) for k in keys},
      'state': sds((b, 32), jnp.float32),
      'tokenized_prompt': sds((b, 48), jnp.int32),
      'tokenized_prompt_mask': sds((b, 48), jnp.bool_),
  }
  actions = sds((b, 50, 32), jnp.float32)

  def run(model, obs, actions):
    loss, metrics = model.compute_train_loss(jax.random.key(0), obs, actions)
    prefix, mask = model.encode_prefix(obs)
    return loss, metrics, prefix, mask

  loss, metrics, prefix, mask = nnx.eval_shape(run, model, obs, actions)
  assert loss.shape == () and loss.dtype == jnp.float32
  assert set(metrics) == {'flow_loss', 'energy_loss', 'E_pos', 'E_neg',
                          'energy_accuracy'}
  # 3 x 256 image tokens + 48 prompt tokens (openpi: 816).
  assert prefix.shape == (b, 816, 2048) and prefix.dtype == jnp.bfloat16
  assert mask.shape == (b, 816)
