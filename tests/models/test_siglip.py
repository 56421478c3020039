"""SigLIP tower vs a numpy re-implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.models import siglip

IMAGE = 16
OUT = 12


@pytest.fixture(scope='module')
def model_and_params():
  cfg = siglip.get_config('tiny')
  model = siglip.SigLIP(cfg, image_size=IMAGE, out_dim=OUT, dtype=jnp.float32,
                        remat=False, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state.to_pure_dict())
  rng = np.random.RandomState(0)
  leaves = [np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32)
            for x in leaves]
  pure = jax.tree.unflatten(treedef, leaves)
  state.replace_by_pure_dict(pure)
  nnx.update(model, state)
  return model, pure


def np_ln(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_siglip(p, images, patch):
  b, s = images.shape[:2]
  g = s // patch
  kernel = p['embedding']['kernel']
  tokens = np.zeros((b, g * g, kernel.shape[-1]))
  for bi in range(b):
    for y in range(g):
      for x in range(g):
        crop = images[bi, y * patch:(y + 1) * patch, x * patch:(x + 1) * patch]
        tokens[bi, y * g + x] = np.einsum('ijc,ijcd->d', crop, kernel)
  x = tokens + p['embedding']['bias'] + p['pos_embedding']
  blk = p['Transformer']['encoderblock']
  depth = blk['LayerNorm_0']['scale'].shape[0]
  for l in range(depth):
    h = np_ln(x, blk['LayerNorm_0']['scale'][l], blk['LayerNorm_0']['bias'][l])
    att = blk['MultiHeadDotProductAttention_0']
    q, k, v = (np.einsum('btd,dnh->btnh', h, att[n]['kernel'][l]) +
               att[n]['bias'][l] for n in ('query', 'key', 'value'))
    logits = np.einsum('btnh,bsnh->bnts', q, k) / math.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    enc = np.einsum('bnts,bsnh->btnh', w, v)
    x = x + np.einsum('btnh,nhd->btd', enc, att['out']['kernel'][l]) + (
        att['out']['bias'][l])
    h = np_ln(x, blk['LayerNorm_1']['scale'][l], blk['LayerNorm_1']['bias'][l])
    mlp = blk['MlpBlock_0']
    h = np_gelu(h @ mlp['Dense_0']['kernel'][l] + mlp['Dense_0']['bias'][l])
    x = x + h @ mlp['Dense_1']['kernel'][l] + mlp['Dense_1']['bias'][l]
  norm = p['Transformer']['encoder_norm']
  x = np_ln(x, norm['scale'], norm['bias'])
  return x @ p['head']['kernel'] + p['head']['bias']


def test_forward_matches_numpy(model_and_params):
  model, p = model_and_params
  images = np.random.RandomState(1).uniform(-1, 1, (2, IMAGE, IMAGE, 3))
  got = np.asarray(model(jnp.asarray(images, jnp.float32)))
  assert got.shape == (2, (IMAGE // 8)**2, OUT)
  want = np_siglip(p, images.astype(np.float64), 8)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_patch_embedding_equals_valid_conv(model_and_params):
  """Patchify + matmul must equal a stride-p VALID convolution."""
  model, p = model_and_params
  images = jnp.asarray(np.random.RandomState(2).uniform(-1, 1,
                                                        (1, IMAGE, IMAGE, 3)),
                       jnp.float32)
  conv = jax.lax.conv_general_dilated(
      images, jnp.asarray(p['embedding']['kernel']), (8, 8), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  # Zero the transformer's contribution: compare at the token-embedding stage.
  g = IMAGE // 8
  x = images.reshape(1, g, 8, g, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  ours = jnp.einsum('BYXijc,ijcD->BYXD', x, p['embedding']['kernel'])
  np.testing.assert_allclose(np.asarray(ours), np.asarray(conv), rtol=1e-5,
                             atol=1e-5)


def test_so400m_param_shapes():
  model = nnx.eval_shape(lambda: siglip.SigLIP(
      siglip.get_config('So400m/14'), image_size=224, out_dim=2048,
      rngs=nnx.Rngs(0)))
  flat = {'/'.join(str(k.key) for k in path): v.shape for path, v in
          jax.tree_util.tree_flatten_with_path(
              nnx.state(model, nnx.Param).to_pure_dict())[0]}
  blk = 'Transformer/encoderblock/'
  assert flat['pos_embedding'] == (1, 256, 1152)
  assert flat['embedding/kernel'] == (14, 14, 3, 1152)
  assert flat[blk + 'MultiHeadDotProductAttention_0/query/kernel'] == (
      27, 1152, 16, 72)
  assert flat[blk + 'MultiHeadDotProductAttention_0/out/kernel'] == (
      27, 16, 72, 1152)
  assert flat[blk + 'MlpBlock_0/Dense_1/kernel'] == (27, 4304, 1152)
  assert flat['head/kernel'] == (1152, 2048)
  assert len(flat) == 23


def test_bad_image_shape(model_and_params):
  model, _ = model_and_params
  with pytest.raises(ValueError, match='SigLIP expects images'):
    model(jnp.zeros((1, IMAGE + 1, IMAGE, 3)))
  with pytest.raises(ValueError, match='not a multiple of the patch size'):
    siglip.SigLIP(siglip.get_config('tiny'), image_size=12, out_dim=4,
                  rngs=nnx.Rngs(0))
