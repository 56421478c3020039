"""Building blocks of the energy head: per-token MLP-ResNets and split cross-attention.

`pipeline.models.energy` assembles them into the head and scores pairs with them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Hidden width of each residual block, in multiples of the head width. The
# prediction head runs once per (context, action chunk) pair and action step,
# B^2 * H tokens, so this factor scales most of the head's cost; 2 keeps the
# full head under 1% of a Pi0 train step at batch 32 (pipeline.bench energy).
MLP_RATIO = 2


def sinusoidal_positions(length: int, width: int) -> np.ndarray:
  """Fixed sin/cos encoding of positions 0..length-1, shape [length, width]."""
  if width % 2:
    raise ValueError(f"sinusoidal encoding needs an even width, got {width}")
  half = width // 2
  freqs = np.exp(-math.log(10_000.0) * np.arange(half) / max(half - 1, 1))
  angles = np.arange(length)[:, None] * freqs[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(
    np.float32
  )


class ResidualBlock(nnx.Module):
  """Pre-norm MLP block: x + W2 gelu(W1 norm(x))."""

  def __init__(self, width: int, *, dropout: float, dtype: Any, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(width, MLP_RATIO * width, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(MLP_RATIO * width, width, dtype=dtype, rngs=rngs)
    # No rng stored: dropout keys come with each call, so the module state
    # holds only parameters (EMA and checkpoints see plain arrays).
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    y = jax.nn.gelu(self.up(self.norm(x)))
    y = self.dropout(y, deterministic=rngs is None, rngs=rngs)
    return x + self.down(y)


class MLPResNet(nnx.Module):
  """Per-token MLP-ResNet: input projection, residual blocks, norm, output."""

  def __init__(
    self,
    in_dim: int,
    width: int,
    out_dim: int,
    *,
    num_blocks: int,
    dropout: float,
    dtype: Any,
    rngs: nnx.Rngs,
  ):
    self.input_proj = nnx.Linear(in_dim, width, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List(
      [
        ResidualBlock(width, dropout=dropout, dtype=dtype, rngs=rngs)
        for _ in range(num_blocks)
      ]
    )
    self.final_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.output_proj = nnx.Linear(width, out_dim, dtype=dtype, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    *,
    offset: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """`offset` is added after the input projection (e.g. positions)."""
    h = self.input_proj(x)
    if offset is not None:
      h = h + offset
    for block in self.blocks:
      h = block(h, rngs)
    return self.output_proj(self.final_norm(h))


class CrossAttention(nnx.Module):
  """Multi-head attention of action queries over context keys/values.

  Projections are split from the attention itself so that `pairwise` can
  project each sample once and attend per pair.
  """

  def __init__(self, width: int, heads: int, *, dtype: Any, rngs: nnx.Rngs):
    if width % heads:
      raise ValueError(
        f"energy_hidden ({width}) must be divisible by energy_heads ({heads})"
      )
    self.heads = heads
    self.head_dim = width // heads
    self.query = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
    self.value = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, dtype=dtype, rngs=rngs)

  def _split(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.heads, self.head_dim)

  def project_queries(self, x: jax.Array) -> jax.Array:
    """[..., L, W] -> [..., L, heads, head_dim]."""
    return self._split(self.query(x))

  def project_context(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S, W] -> keys, values [B, S, heads, head_dim]."""
    return self._split(self.key(x)), self._split(self.value(x))

  def attend(
    self,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
  ) -> jax.Array:
    """Attention of queries over the valid context tokens.

    Args:
      queries: [B, Q, heads, d] (one query set per context) or [Q, heads, d]
        (the same queries for every context; used by `pairwise` so the
        queries are not broadcast B times).
      keys: [B, S, heads, d].
      values: [B, S, heads, d].
      mask: bool [B, S], True = valid token (attend).

    Returns:
      [B, Q, width].
    """
    scale = 1.0 / math.sqrt(self.head_dim)
    spec = "qnd,bsnd->bnqs" if queries.ndim == 3 else "bqnd,bsnd->bnqs"
    # Logits and softmax in f32 even for a low-precision compute dtype.
    logits = jnp.einsum(spec, queries, keys, preferred_element_type=jnp.float32)
    valid = mask.astype(bool)[:, None, None, :]
    logits = jnp.where(valid, logits * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # A context with no valid token would give uniform weights over padding;
    # zeroing them makes its attention output exactly 0 instead.
    probs = jnp.where(valid, probs, 0.0).astype(values.dtype)
    out = jnp.einsum("bnqs,bsnd->bqnd", probs, values)
    return self.out(out.reshape(*out.shape[:2], -1))
