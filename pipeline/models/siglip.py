"""SigLIP vision tower (ViT, no pooling) with a projection to the LLM width.

Parameter names follow big_vision / openpi (`embedding`, `pos_embedding`,
`Transformer/encoderblock/...`, `Transformer/encoder_norm`, `head`) and the
encoder blocks are stacked on a leading depth axis, so PaliGemma and openpi
checkpoints load without renaming or reshaping.
"""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  # openpi zero-initialises the projection head; tiny from-scratch models
  # keep a random head so image content reaches the LLM from step 0.
  head_zeroinit: bool = True


_VARIANTS = {
    'So400m/14': Config(width=1152, depth=27, mlp_dim=4304, num_heads=16,
                        patch_size=14),
    'tiny': Config(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8,
                   head_zeroinit=False),
}


def get_config(variant: str) -> Config:
  if variant not in _VARIANTS:
    raise ValueError(
        f'Unknown SigLIP variant {variant!r}; known: {sorted(_VARIANTS)}.')
  return _VARIANTS[variant]


def layer_norm(x, scale, bias, eps: float = 1e-6):
  """LayerNorm with statistics in f32; output in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


class _LayerNorm(nnx.Module):

  def __init__(self, shape):
    self.scale = nnx.Param(jnp.ones(shape, jnp.float32))
    self.bias = nnx.Param(jnp.zeros(shape, jnp.float32))

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...])


class _Dense(nnx.Module):
  """Kernel/bias pair of arbitrary (stacked) shapes."""

  def __init__(self, kernel_shape, bias_shape, kernel_init, bias_init,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape,
                                        jnp.float32))
    self.bias = nnx.Param(bias_init(rngs.params(), bias_shape, jnp.float32))


def _xavier(in_axis, out_axis, batch_axis):
  return jax.nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


_zeros = jax.nn.initializers.zeros


class _Attention(nnx.Module):
  """MultiHeadDotProductAttention_0: query/key/value/out, stacked."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d, w, n = cfg.depth, cfg.width, cfg.num_heads
    hd = w // n
    for name in ('query', 'key', 'value'):
      setattr(self, name, _Dense((d, w, n, hd), (d, n, hd),
                                 _xavier(-3, (-2, -1), (0,)), _zeros, rngs))
    self.out = _Dense((d, n, hd, w), (d, w), _xavier((-3, -2), -1, (0,)),
                      _zeros, rngs)

  def __call__(self, x, dtype):
    def proj(p):
      return (jnp.einsum('BTD,DNH->BTNH', x, p.kernel[...].astype(dtype)) +
              p.bias[...].astype(dtype))
    q, k, v = proj(self.query), proj(self.key), proj(self.value)
    q = q * jnp.asarray(q.shape[-1]**-0.5, dtype)
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    enc = jnp.einsum('BNTS,BSNH->BTNH', probs, v)
    return (jnp.einsum('BTNH,NHD->BTD', enc, self.out.kernel[...].astype(dtype))
            + self.out.bias[...].astype(dtype))


class _MlpBlock(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    d = cfg.depth
    bias_init = jax.nn.initializers.normal(1e-6)
    self.Dense_0 = _Dense((d, cfg.width, cfg.mlp_dim), (d, cfg.mlp_dim),
                          _xavier(-2, -1, (0,)), bias_init, rngs)
    self.Dense_1 = _Dense((d, cfg.mlp_dim, cfg.width), (d, cfg.width),
                          _xavier(-2, -1, (0,)), bias_init, rngs)

  def __call__(self, x, dtype):
    h = (x @ self.Dense_0.kernel[...].astype(dtype) +
         self.Dense_0.bias[...].astype(dtype))
    h = jax.nn.gelu(h, approximate=True)
    return (h @ self.Dense_1.kernel[...].astype(dtype) +
            self.Dense_1.bias[...].astype(dtype))


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block; parameters carry a leading depth axis.

  `__call__` runs one block on per-layer (unstacked) parameters.
  """

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.LayerNorm_0 = _LayerNorm((cfg.depth, cfg.width))
    self.MultiHeadDotProductAttention_0 = _Attention(cfg, rngs)
    self.LayerNorm_1 = _LayerNorm((cfg.depth, cfg.width))
    self.MlpBlock_0 = _MlpBlock(cfg, rngs)

  def __call__(self, x, dtype):
    x = x + self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), dtype)
    x = x + self.MlpBlock_0(self.LayerNorm_1(x), dtype)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg: Config, *, remat: bool, rngs: nnx.Rngs):
    self.encoderblock = EncoderBlock(cfg, rngs)
    self.encoder_norm = _LayerNorm((cfg.width,))
    self.remat = remat

  def __call__(self, x, dtype):
    graphdef, state = nnx.split(self.encoderblock)

    def body(carry, layer_state):
      return nnx.merge(graphdef, layer_state)(carry, dtype), None

    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False,
                            policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = jax.lax.scan(body, x, state)
    return self.encoder_norm(x)


class SigLIP(nnx.Module):
  """ViT image encoder: [B, H, W, 3] in [-1, 1] -> [B, N, out_dim] tokens."""

  def __init__(self, cfg: Config, *, image_size: int, out_dim: int,
               dtype=jnp.bfloat16, remat: bool = True, rngs: nnx.Rngs):
    if image_size % cfg.patch_size:
      raise ValueError(f'image_size {image_size} is not a multiple of the '
                       f'patch size {cfg.patch_size}.')
    if cfg.width % cfg.num_heads:
      raise ValueError('SigLIP width must be divisible by num_heads.')
    self.cfg = cfg
    self.image_size = image_size
    self.dtype = jnp.dtype(dtype)
    p, w = cfg.patch_size, cfg.width
    self.num_tokens = (image_size // p)**2
    self.embedding = _Dense((p, p, 3, w), (w,),
                            jax.nn.initializers.lecun_normal(), _zeros, rngs)
    self.pos_embedding = nnx.Param(
        jax.nn.initializers.normal(w**-0.5)(
            rngs.params(), (1, self.num_tokens, w), jnp.float32))
    self.Transformer = Encoder(cfg, remat=remat, rngs=rngs)
    head_init = (_zeros if cfg.head_zeroinit
                 else jax.nn.initializers.lecun_normal())
    self.head = _Dense((w, out_dim), (out_dim,), head_init, _zeros, rngs)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def __call__(self, image: jax.Array) -> jax.Array:
    if image.ndim != 4 or image.shape[1:] != self.image_shape:
      raise ValueError(f'SigLIP expects images [B, {self.image_size}, '
                       f'{self.image_size}, 3], got {image.shape}.')
    b = image.shape[0]
    p = self.cfg.patch_size
    g = self.image_size // p
    # Non-overlapping patch conv == patchify + matmul; kept in f32 as openpi.
    x = image.astype(jnp.float32).reshape(b, g, p, g, p, 3)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gy, gx, py, px, C]
    x = jnp.einsum('BYXijc,ijcD->BYXD', x, self.embedding.kernel[...])
    x = x.reshape(b, g * g, -1) + self.embedding.bias[...]
    x = x + self.pos_embedding[...]
    x = x.astype(self.dtype)
    x = self.Transformer(x, self.dtype)
    return (x @ self.head.kernel[...].astype(self.dtype) +
            self.head.bias[...].astype(self.dtype))
