"""Gemma multi-expert decoder vs a numpy re-implementation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.models import gemma

VOCAB = 40


def _perturbed_model(seed=0):
  """Tiny two-expert Gemma with every parameter randomised (incl. norms)."""
  cfgs = [gemma.get_config('tiny'), gemma.get_config('tiny_small')]
  # eval_shape + numpy values: no compiled initialisers (fast on CPU).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: gemma.Gemma(
      cfgs, vocab_size=VOCAB, dtype=jnp.float32, remat=False,
      rngs=nnx.Rngs(seed))))
  rng = np.random.RandomState(seed)

  def fill(x):
    std = 1.0 / math.sqrt(x.shape[-2]) if x.ndim >= 2 else 0.3
    return jnp.asarray(rng.randn(*x.shape) * std, jnp.float32)

  model = nnx.merge(graphdef, jax.tree.map(fill, state))
  pure = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  return model, pure


@pytest.fixture(scope='module')
def model_and_params():
  return _perturbed_model()


# ---------------------------------------------------------------- numpy ref


def np_rope(x, positions, max_wavelength=10_000.0):
  """Naive loop over frequency pairs (split-halves convention)."""
  h = x.shape[-1]
  half = h // 2
  out = np.empty_like(x, dtype=np.float64)
  for i in range(half):
    angle = positions.astype(np.float64) / max_wavelength**(2.0 * i / h)
    c, s = np.cos(angle)[..., None], np.sin(angle)[..., None]
    out[..., i] = x[..., i] * c - x[..., i + half] * s
    out[..., i + half] = x[..., i + half] * c + x[..., i] * s
  return out


def np_rms(x, scale):
  var = np.mean(x * x, axis=-1, keepdims=True)
  return x / np.sqrt(var + 1e-6) * (1.0 + scale)


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_gemma(p, xs, positions, mask):
  """Reference forward of all experts; p is the pure param dict."""
  layers = p['layers']
  depth = layers['mlp']['linear'].shape[0]
  sfx = ['', '_1']
  xs = [x.astype(np.float64) for x in xs]
  for l in range(depth):
    qs, ks, vs = [], [], []
    for i, x in enumerate(xs):
      h = np_rms(x, layers['pre_attention_norm' + sfx[i]]['scale'][l])
      wq = layers['attn']['q_einsum' + sfx[i]]['w'][l]  # [N, D, H]
      wkv = layers['attn']['kv_einsum' + sfx[i]]['w'][l]  # [2, K, D, H]
      qs.append(np.einsum('btd,ndh->btnh', h, wq))
      ks.append(np.einsum('btd,kdh->btkh', h, wkv[0]))
      vs.append(np.einsum('btd,kdh->btkh', h, wkv[1]))
    q = np_rope(np.concatenate(qs, 1), positions)
    k = np_rope(np.concatenate(ks, 1), positions)
    v = np.concatenate(vs, 1)
    head_dim = q.shape[-1]
    q = q / math.sqrt(head_dim)
    b, t, n, _ = q.shape
    nk = k.shape[2]
    enc = np.zeros_like(q)
    for bi in range(b):
      for hi in range(n):
        kh = hi // (n // nk)
        logits = q[bi, :, hi] @ k[bi, :, kh].T
        logits = np.where(mask[bi], logits, -1e30)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        enc[bi, :, hi] = w @ v[bi, :, kh]
    start = 0
    new = []
    for i, x in enumerate(xs):
      e = enc[:, start:start + x.shape[1]]
      start += x.shape[1]
      wo = layers['attn']['attn_vec_einsum' + sfx[i]]['w'][l]
      x = x + np.einsum('btnh,nhd->btd', e, wo)
      h = np_rms(x, layers['pre_ffw_norm' + sfx[i]]['scale'][l])
      mlp = layers['mlp' + sfx[i]]
      g = mlp['gating_einsum'][l]
      x = x + (np_gelu(h @ g[0]) * (h @ g[1])) @ mlp['linear'][l]
      new.append(x)
    xs = new
  return [np_rms(x, p['final_norm' + sfx[i]]['scale'])
          for i, x in enumerate(xs)]


# -------------------------------------------------------------------- tests


def test_rope_matches_numpy():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 8).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4], [7, 3, 100, 2000, 0]], np.int32)
  got = np.asarray(gemma.apply_rope(jnp.asarray(x), jnp.asarray(pos)))
  np.testing.assert_allclose(got, np_rope(x, pos), rtol=1e-4, atol=1e-4)


def test_rope_keeps_dtype_and_position_zero_is_identity():
  x = jnp.asarray(np.random.RandomState(1).randn(1, 2, 1, 8), jnp.bfloat16)
  out = gemma.apply_rope(x, jnp.zeros((1, 2), jnp.int32))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(x, np.float32))


def test_rms_norm_matches_numpy():
  rng = np.random.RandomState(2)
  x = rng.randn(3, 4, 16).astype(np.float32)
  scale = rng.randn(16).astype(np.float32)
  got = gemma.rms_norm(jnp.asarray(x), jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(got), np_rms(x, scale), rtol=1e-5,
                             atol=1e-5)


def test_embed_scales_by_sqrt_width(model_and_params):
  model, p = model_and_params
  tokens = np.array([[1, 5, 0]], np.int32)
  got = np.asarray(model.embed(jnp.asarray(tokens)))
  want = p['embedder']['input_embedding'][tokens] * math.sqrt(32)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_real_init_statistics():
  """The real initialisers: zero norm scales, lecun-scaled projections."""
  model = gemma.Gemma([gemma.get_config('tiny'), gemma.get_config('tiny')],
                      vocab_size=VOCAB, rngs=nnx.Rngs(0))
  p = nnx.state(model, nnx.Param).to_pure_dict()
  assert not np.asarray(p['layers']['pre_ffw_norm_1']['scale']).any()
  assert not np.asarray(p['final_norm']['scale']).any()
  q = np.asarray(p['layers']['attn']['q_einsum']['w'])  # fan-in = width 32
  assert 0.5 / math.sqrt(32) < q.std() < 1.5 / math.sqrt(32)
  emb = np.asarray(p['embedder']['input_embedding'])
  assert 0.005 < emb.std() < 0.02


def test_two_expert_forward_matches_numpy(model_and_params):
  model, p = model_and_params
  rng = np.random.RandomState(3)
  b, t0, t1 = 2, 5, 3
  x0 = rng.randn(b, t0, 32).astype(np.float32)
  x1 = rng.randn(b, t1, 16).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 2, 2, 3, 4, 5]])
  # Prefix-LM style mask with one padded prefix token in the second row.
  mask = np.tril(np.ones((t0 + t1, t0 + t1), bool))
  mask[:t0, :t0] = True
  mask = np.stack([mask, mask])
  mask[1, :, 3] = False
  mask[1, 3, :] = False
  (o0, o1), (k, v) = model([jnp.asarray(x0), jnp.asarray(x1)],
                           jnp.asarray(positions), jnp.asarray(mask))
  r0, r1 = np_gemma(p, [x0, x1], positions, mask)
  valid0 = np.ones((b, t0), bool)
  valid0[1, 3] = False  # a fully masked query row is unspecified
  np.testing.assert_allclose(np.asarray(o0)[valid0], r0[valid0], rtol=2e-4,
                             atol=2e-4)
  np.testing.assert_allclose(np.asarray(o1), r1, rtol=2e-4, atol=2e-4)
  assert k.shape == (2, b, t0 + t1, 1, 8) and v.shape == k.shape


def test_kv_cache_equals_joint_pass(model_and_params):
  """Prefix into the cache, then the suffix alone == one joint pass."""
  model, _ = model_and_params
  rng = np.random.RandomState(4)
  b, t0, t1 = 2, 4, 3
  x0 = jnp.asarray(rng.randn(b, t0, 32), jnp.float32)
  x1 = jnp.asarray(rng.randn(b, t1, 16), jnp.float32)
  mask = np.ones((t0 + t1, t0 + t1), bool)
  mask[:t0, t0:] = False  # prefix does not see the suffix
  mask = jnp.asarray(np.broadcast_to(mask, (b, t0 + t1, t0 + t1)))
  pos = jnp.broadcast_to(jnp.arange(t0 + t1), (b, t0 + t1))
  (_, joint1), _ = model([x0, x1], pos, mask)
  (p0, none1), cache = model([x0, None], pos[:, :t0], mask[:, :t0, :t0])
  assert none1 is None and cache[0].shape == (2, b, t0, 1, 8)
  (none0, cached1), _ = model([None, x1], pos[:, t0:], mask[:, t0:],
                              kv_cache=cache)
  assert none0 is None
  np.testing.assert_allclose(np.asarray(cached1), np.asarray(joint1),
                             rtol=1e-5, atol=1e-5)


def test_scanned_param_layout():
  model = nnx.eval_shape(lambda: gemma.Gemma(
      [gemma.get_config('dummy')] * 2, vocab_size=11, rngs=nnx.Rngs(0)))
  flat = {'/'.join(str(k.key) for k in path): v.shape for path, v in
          jax.tree_util.tree_flatten_with_path(
              nnx.state(model, nnx.Param).to_pure_dict())[0]}
  assert flat['layers/attn/q_einsum_1/w'] == (4, 8, 64, 16)
  assert flat['layers/attn/kv_einsum/w'] == (4, 2, 1, 64, 16)
  assert flat['layers/mlp_1/gating_einsum'] == (4, 2, 64, 128)
  assert flat['embedder/input_embedding'] == (11, 64)
  assert 'final_norm_1/scale' in flat


def test_config_errors():
  with pytest.raises(ValueError, match='Unknown Gemma variant'):
    gemma.get_config('gemma_7b')
  with pytest.raises(ValueError, match='share depth'):
    gemma.Gemma([gemma.get_config('tiny'), gemma.get_config('dummy')],
                vocab_size=4, rngs=nnx.Rngs(0))
