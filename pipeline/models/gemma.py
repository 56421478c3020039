"""Gemma decoder whose layers hold one weight set per expert.

Pi0 runs two token groups through one transformer: the prefix (images +
prompt) through the PaliGemma weights (expert 0) and the suffix (state +
actions) through the smaller action expert (expert 1). Each group uses its own
norms, projections and MLP, but attention is joint: the q/k/v of all groups
are concatenated along the sequence axis and attend to each other under one
mask. Parameter names follow the PaliGemma / openpi layout so released
checkpoints load without renaming: expert 0 has no suffix, expert i > 0 gets
`_{i}`, and every layer parameter carries a leading depth axis (scanned
layers).
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Large negative logit for masked positions (the value big_vision/openpi use).
BIG_NEG = -2.3819763e38
PALIGEMMA_VOCAB_SIZE = 257_152


@dataclasses.dataclass(frozen=True)
class Config:
  """Size of one expert."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int


_VARIANTS = {
    'gemma_2b': Config(width=2048, depth=18, mlp_dim=16_384, num_heads=8,
                       num_kv_heads=1, head_dim=256),
    'gemma_300m': Config(width=1024, depth=18, mlp_dim=4096, num_heads=8,
                         num_kv_heads=1, head_dim=256),
    'dummy': Config(width=64, depth=4, mlp_dim=128, num_heads=8,
                    num_kv_heads=1, head_dim=16),
    # CPU-sized variants; both must share depth / heads / head_dim so that
    # any pair of them can be combined as prefix + action expert.
    'tiny': Config(width=32, depth=2, mlp_dim=64, num_heads=2,
                   num_kv_heads=1, head_dim=8),
    'tiny_small': Config(width=16, depth=2, mlp_dim=32, num_heads=2,
                         num_kv_heads=1, head_dim=8),
}


def get_config(variant: str) -> Config:
  """Returns the expert size for a variant name."""
  if variant not in _VARIANTS:
    raise ValueError(
        f'Unknown Gemma variant {variant!r}; known: {sorted(_VARIANTS)}.')
  return _VARIANTS[variant]


def _suffix(expert: int) -> str:
  # Expert 0 keeps the plain PaliGemma names so its checkpoint loads as is.
  return '' if expert == 0 else f'_{expert}'


def _lecun(in_axis, out_axis, batch_axis):
  return jax.nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


def _param(init, rngs: nnx.Rngs, shape):
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Gemma RMSNorm: variance in f32, `x * (1 + scale)`, output in x.dtype."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  normed = xf * jax.lax.rsqrt(var + eps)
  return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array,
               max_wavelength: float = 10_000.0) -> jax.Array:
  """Rotary embedding, split-halves convention, computed in f32.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] integer positions.
    max_wavelength: base of the geometric frequency progression.

  Returns:
    Rotated x in its original dtype.
  """
  head_dim = x.shape[-1]
  freq_exponents = (2.0 / head_dim) * jnp.arange(head_dim // 2,
                                                  dtype=jnp.float32)
  timescale = max_wavelength**freq_exponents
  radians = positions[..., None].astype(jnp.float32) / timescale
  radians = radians[..., None, :]  # broadcast over heads
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class _Weight(nnx.Module):
  """Holds one einsum weight named `w` (openpi's Einsum layout)."""

  def __init__(self, init, shape, rngs: nnx.Rngs):
    self.w = _param(init, rngs, shape)


class _Scale(nnx.Module):
  """RMSNorm scale (zero init, so the norm starts as plain RMS scaling)."""

  def __init__(self, shape):
    self.scale = nnx.Param(jnp.zeros(shape, jnp.float32))


class _FeedForward(nnx.Module):
  """GeGLU weights: gating_einsum [2, D, F] and linear [F, D]."""

  def __init__(self, depth: int, cfg: Config, rngs: nnx.Rngs):
    self.gating_einsum = _param(_lecun(-2, -1, (0, 1)), rngs,
                                (depth, 2, cfg.width, cfg.mlp_dim))
    self.linear = _param(_lecun(-2, -1, (0,)), rngs,
                         (depth, cfg.mlp_dim, cfg.width))


class _Attention(nnx.Module):
  """Per-expert q / kv / output projections (attributes set by name)."""

  def __init__(self, configs: Sequence[Config], rngs: nnx.Rngs):
    for i, cfg in enumerate(configs):
      d, n, k, h = cfg.depth, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
      sfx = _suffix(i)
      setattr(self, f'q_einsum{sfx}',
              _Weight(_lecun(-2, -1, (0, 1)), (d, n, cfg.width, h), rngs))
      setattr(self, f'kv_einsum{sfx}',
              _Weight(_lecun(-2, -1, (0, 1, 2)), (d, 2, k, cfg.width, h),
                      rngs))
      setattr(self, f'attn_vec_einsum{sfx}',
              _Weight(_lecun((-3, -2), -1, (0,)), (d, n, h, cfg.width), rngs))


class Layers(nnx.Module):
  """All decoder layers; every parameter has a leading depth axis.

  `__call__` runs ONE layer and expects parameters without the depth axis:
  `Gemma` scans it over the stacked state.
  """

  def __init__(self, configs: Sequence[Config], rngs: nnx.Rngs):
    self.num_experts = len(configs)
    self.head_dim = configs[0].head_dim
    self.num_kv_heads = configs[0].num_kv_heads
    self.attn = _Attention(configs, rngs)
    for i, cfg in enumerate(configs):
      sfx = _suffix(i)
      d = cfg.depth
      setattr(self, f'mlp{sfx}', _FeedForward(d, cfg, rngs))
      setattr(self, f'pre_attention_norm{sfx}', _Scale((d, cfg.width)))
      setattr(self, f'pre_ffw_norm{sfx}', _Scale((d, cfg.width)))

  def __call__(self, xs, positions, mask, kv_cache, dtype):
    """One decoder layer over all expert groups.

    Args:
      xs: list (one per expert) of [B, T_i, W_i] or None.
      positions: [B, sum T_i] positions of the present tokens.
      mask: [B, sum T_i, S] bool, True = may attend; S = cached + new tokens.
      kv_cache: None or (k, v) of this layer, each [B, T_cache, K, H].
      dtype: compute dtype.

    Returns:
      (new xs, (k, v)) where k/v include the cached tokens.
    """
    qs, ks, vs, lengths = [], [], [], []
    for i, x in enumerate(xs):
      if x is None:
        continue
      sfx = _suffix(i)
      h = rms_norm(x, getattr(self, f'pre_attention_norm{sfx}').scale[...])
      wq = getattr(self.attn, f'q_einsum{sfx}').w[...].astype(dtype)
      wkv = getattr(self.attn, f'kv_einsum{sfx}').w[...].astype(dtype)
      qs.append(jnp.einsum('BTD,NDH->BTNH', h, wq))
      k, v = jnp.einsum('BSD,CKDH->CBSKH', h, wkv)
      ks.append(k)
      vs.append(v)
      lengths.append(x.shape[1])
    q = jnp.concatenate(qs, axis=1)
    k = jnp.concatenate(ks, axis=1)
    v = jnp.concatenate(vs, axis=1)

    q = apply_rope(q, positions)
    k = apply_rope(k, positions)
    q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)

    if kv_cache is not None:
      cache_k, cache_v = kv_cache
      k = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)

    b, t, n, hd = q.shape
    kh = self.num_kv_heads
    # Multi-query: query heads are grouped onto the shared kv heads.
    qg = q.reshape(b, t, kh, n // kh, hd)
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', qg, k,
                        preferred_element_type=jnp.float32)
    if mask.shape != (b, t, k.shape[1]):
      raise ValueError(f'Attention mask has shape {mask.shape}, expected '
                       f'{(b, t, k.shape[1])} (batch, queries, keys).')
    logits = jnp.where(mask[:, None, None, :, :], logits, BIG_NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    enc = jnp.einsum('BKGTS,BSKH->BTKGH', probs, v).reshape(b, t, n, hd)

    out = []
    start = 0
    for i, x in enumerate(xs):
      if x is None:
        out.append(None)
        continue
      sfx = _suffix(i)
      length = x.shape[1]
      enc_i = enc[:, start:start + length]
      start += length
      wo = getattr(self.attn, f'attn_vec_einsum{sfx}').w[...].astype(dtype)
      x = x + jnp.einsum('BTNH,NHD->BTD', enc_i, wo)
      h = rms_norm(x, getattr(self, f'pre_ffw_norm{sfx}').scale[...])
      mlp = getattr(self, f'mlp{sfx}')
      gate_w = mlp.gating_einsum[...].astype(dtype)
      gate = jnp.einsum('BTD,DF->BTF', h, gate_w[0])
      up = jnp.einsum('BTD,DF->BTF', h, gate_w[1])
      act = jax.nn.gelu(gate, approximate=True) * up
      x = x + jnp.einsum('BTF,FD->BTD', act, mlp.linear[...].astype(dtype))
      out.append(x)
    return out, (k, v)


class _Embedder(nnx.Module):

  def __init__(self, vocab_size: int, width: int, rngs: nnx.Rngs):
    self.input_embedding = _param(jax.nn.initializers.normal(1e-2), rngs,
                                  (vocab_size, width))


class Gemma(nnx.Module):
  """Multi-expert Gemma decoder (openpi `gemma.Module` layout).

  Attributes: embedder/input_embedding [vocab, W0], layers/... (scanned),
  final_norm{_i}/scale.
  """

  def __init__(self, configs: Sequence[Config], *, vocab_size: int,
               dtype=jnp.bfloat16, remat: bool = True, rngs: nnx.Rngs):
    configs = list(configs)
    if not configs:
      raise ValueError('Gemma needs at least one expert config.')
    first = configs[0]
    for c in configs[1:]:
      for field in ('depth', 'num_heads', 'num_kv_heads', 'head_dim'):
        if getattr(c, field) != getattr(first, field):
          raise ValueError(
              f'All experts must share {field}: got {getattr(first, field)} '
              f'and {getattr(c, field)}.')
    if first.num_heads % first.num_kv_heads:
      raise ValueError('num_heads must be a multiple of num_kv_heads.')
    if first.head_dim % 2:
      raise ValueError('head_dim must be even for RoPE.')
    self.configs = tuple(configs)
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    self.embedder = _Embedder(vocab_size, first.width, rngs)
    self.layers = Layers(configs, rngs)
    for i, cfg in enumerate(configs):
      setattr(self, f'final_norm{_suffix(i)}', _Scale((cfg.width,)))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token ids [B, T] -> embeddings [B, T, W0] * sqrt(W0) in compute dtype."""
    table = self.embedder.input_embedding
    x = jnp.take(table[...], tokens, axis=0)
    x = x * jnp.sqrt(jnp.asarray(table.shape[-1], jnp.float32))
    return x.astype(self.dtype)

  def __call__(self, embedded: Sequence[Optional[jax.Array]],
               positions: jax.Array, mask: jax.Array, *,
               kv_cache=None):
    """Runs all layers over the present expert groups.

    Args:
      embedded: one entry per expert, [B, T_i, W_i] or None (absent group).
      positions: [B, sum T_i] int positions of the present tokens.
      mask: [B, sum T_i, T_cache + sum T_i] bool attention mask.
      kv_cache: None or (k, v), each [L, B, T_cache, K, H] (from a previous
        call), placed in front of the new keys/values.

    Returns:
      (outputs, (k, v)): outputs per expert after its final norm (None for
      absent groups); k/v [L, B, T_cache + sum T_i, K, H].
    """
    if len(embedded) != len(self.configs):
      raise ValueError(f'Expected {len(self.configs)} expert inputs, got '
                       f'{len(embedded)}.')
    xs = []
    for i, (x, cfg) in enumerate(zip(embedded, self.configs)):
      if x is not None:
        if x.ndim != 3 or x.shape[-1] != cfg.width:
          raise ValueError(f'Expert {i} input has shape {x.shape}, expected '
                           f'[B, T, {cfg.width}].')
        x = x.astype(self.dtype)
      xs.append(x)
    if all(x is None for x in xs):
      raise ValueError('At least one expert input must be given.')

    graphdef, state = nnx.split(self.layers)
    dtype = self.dtype

    def body(carry, layer_in):
      layer_state, layer_cache = layer_in
      layer = nnx.merge(graphdef, layer_state)
      return layer(carry, positions, mask, layer_cache, dtype)

    if self.remat:
      # Recompute each layer in the backward pass: activations of one layer
      # are the only ones kept alive (openpi: nothing_saveable policy).
      body = jax.checkpoint(
          body, prevent_cse=False,
          policy=jax.checkpoint_policies.nothing_saveable)
    xs, kv = jax.lax.scan(body, xs, (state, kv_cache))

    outputs = []
    for i, x in enumerate(xs):
      if x is None:
        outputs.append(None)
      else:
        outputs.append(rms_norm(x, getattr(self, f'final_norm{_suffix(i)}')
                                .scale[...]))
    return outputs, kv
