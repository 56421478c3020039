"""Full-size parameter trees == openpi's measured listings (no allocation)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pipeline.models import build_model

REFERENCE = Path(__file__).resolve().parents[3] / 'shared' / 'reference'

# openpi pi0 (gemma_2b + gemma_300m + So400m/14) parameter shapes, all float32,
# as listed in shared/reference/openpi_params_pi0.json.
OPENPI_PI0 = {
    'PaliGemma/img/Transformer/encoder_norm/bias': (1152,),
    'PaliGemma/img/Transformer/encoder_norm/scale': (1152,),
    'PaliGemma/img/Transformer/encoderblock/LayerNorm_0/bias': (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/LayerNorm_0/scale': (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/LayerNorm_1/bias': (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/LayerNorm_1/scale': (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias':
        (27, 4304),
    'PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel':
        (27, 1152, 4304),
    'PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias':
        (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel':
        (27, 4304, 1152),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias':
        (27, 16, 72),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/kernel':
        (27, 1152, 16, 72),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias':
        (27, 1152),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel':
        (27, 16, 72, 1152),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias':
        (27, 16, 72),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel':
        (27, 1152, 16, 72),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/bias':
        (27, 16, 72),
    'PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/value/kernel':
        (27, 1152, 16, 72),
    'PaliGemma/img/embedding/bias': (1152,),
    'PaliGemma/img/embedding/kernel': (14, 14, 3, 1152),
    'PaliGemma/img/head/bias': (2048,),
    'PaliGemma/img/head/kernel': (1152, 2048),
    'PaliGemma/img/pos_embedding': (1, 256, 1152),
    'PaliGemma/llm/embedder/input_embedding': (257152, 2048),
    'PaliGemma/llm/final_norm/scale': (2048,),
    'PaliGemma/llm/final_norm_1/scale': (1024,),
    'PaliGemma/llm/layers/attn/attn_vec_einsum/w': (18, 8, 256, 2048),
    'PaliGemma/llm/layers/attn/attn_vec_einsum_1/w': (18, 8, 256, 1024),
    'PaliGemma/llm/layers/attn/kv_einsum/w': (18, 2, 1, 2048, 256),
    'PaliGemma/llm/layers/attn/kv_einsum_1/w': (18, 2, 1, 1024, 256),
    'PaliGemma/llm/layers/attn/q_einsum/w': (18, 8, 2048, 256),
    'PaliGemma/llm/layers/attn/q_einsum_1/w': (18, 8, 1024, 256),
    'PaliGemma/llm/layers/mlp/gating_einsum': (18, 2, 2048, 16384),
    'PaliGemma/llm/layers/mlp/linear': (18, 16384, 2048),
    'PaliGemma/llm/layers/mlp_1/gating_einsum': (18, 2, 1024, 4096),
    'PaliGemma/llm/layers/mlp_1/linear': (18, 4096, 1024),
    'PaliGemma/llm/layers/pre_attention_norm/scale': (18, 2048),
    'PaliGemma/llm/layers/pre_attention_norm_1/scale': (18, 1024),
    'PaliGemma/llm/layers/pre_ffw_norm/scale': (18, 2048),
    'PaliGemma/llm/layers/pre_ffw_norm_1/scale': (18, 1024),
    'action_in_proj/bias': (1024,),
    'action_in_proj/kernel': (32, 1024),
    'action_out_proj/bias': (32,),
    'action_out_proj/kernel': (1024, 32),
    'action_time_mlp_in/bias': (1024,),
    'action_time_mlp_in/kernel': (2048, 1024),
    'action_time_mlp_out/bias': (1024,),
    'action_time_mlp_out/kernel': (1024, 1024),
    'state_proj/bias': (1024,),
    'state_proj/kernel': (32, 1024),
}


def _flat_params(model_config):
  model = nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))
  pure = nnx.state(model, nnx.Param).to_pure_dict()
  return {'/'.join(str(k.key) for k in path): (tuple(v.shape), str(v.dtype))
          for path, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _reference(name):
  path = REFERENCE / name
  if not path.exists():
    pytest.skip(f'reference listing {path} not available')
  listing = json.loads(path.read_text())['params']
  return {p['path']: (tuple(p['shape']), p['dtype']) for p in listing}


def _diff(got, want):
  lines = []
  for key in sorted(set(got) | set(want)):
    if got.get(key) != want.get(key):
      lines.append(f'{key}: ours {got.get(key)} openpi {want.get(key)}')
  return '\n'.join(lines)


FULL = dict(paligemma_variant='gemma_2b', action_expert_variant='gemma_300m',
            vision_variant='So400m/14', image_size=224, vocab_size=257_152,
            action_dim=32, action_horizon=50, max_token_len=48,
            dtype='bfloat16', energy_head=True)


def test_full_size_tree_matches_openpi():
  got = _flat_params(FULL)
  energy = {k for k in got if k.startswith('energy/')}
  assert energy, 'the energy head should be part of the tree'
  got = {k: v for k, v in got.items() if k not in energy}
  want = {k: (v, 'float32') for k, v in OPENPI_PI0.items()}
  assert got == want, _diff(got, want)
  listing = REFERENCE / 'openpi_params_pi0.json'
  if listing.exists():  # the embedded copy must agree with the listing
    assert want == _reference('openpi_params_pi0.json')


def test_dummy_tree_matches_openpi():
  # openpi's dummy Pi0 keeps the full So400m tower; only the LLMs shrink.
  got = _flat_params(dict(FULL, paligemma_variant='dummy',
                          action_expert_variant='dummy', energy_head=False))
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
