"""Energy head over (context, action chunk) pairs, InfoNCE loss and refinement.

The head scores how well an action chunk fits a context (the prefix output
tokens of Pi0): low energy = good fit. Energies are unbounded reals so that
InfoNCE over `-E / tau` can separate positives from negatives without a cap.

Layout of one evaluation E(c, a):
  context [S, C] --context_encoder (per token)--> keys / values
  actions [H, A] --action_encoder (+ positions)--> queries
  cross-attention (queries attend to valid context tokens)
  head (per action step) -> [H] energies -> mean over H -> scalar.

`EnergyModel.pairwise` scores every context of a batch against every action
chunk. Everything that depends on one sample only (both encoders and the
key/value/query projections) runs once per sample; only the attention and
the head run per pair, so the context is never repeated B times. The
per-pair part runs in chunks of contexts, so that its largest tensors (and
their gradients) exist for one chunk at a time. Under a mesh, each device
runs the per-pair part of its own contexts only (against all action chunks).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pipeline.models import energy_layers as layers

# Bound on the elements of the largest per-pair tensor of one chunk of
# contexts in `pairwise` (256 MiB in float32); see `EnergyModel.pair_chunk`.
_PAIR_CHUNK_ELEMENTS = 2**26


def _as_rngs(rngs: nnx.Rngs | jax.Array | None) -> nnx.Rngs | None:
  """Accepts a PRNG key as a shortcut for `nnx.Rngs(dropout=key)`."""
  if rngs is None or isinstance(rngs, nnx.Rngs):
    return rngs
  return nnx.Rngs(dropout=rngs)


class EnergyModel(nnx.Module):
  """Energy E(context, action chunk) -> scalar; low = compatible.

  Args:
    context_dim: width C of the context tokens (Pi0 prefix width).
    act_dim: number of leading action dims that enter the head; the rest
      (padding up to the model action dim) is ignored.
    hidden: width of encoders, attention and head.
    heads: attention heads.
    num_layers: residual blocks in each MLP-ResNet.
    horizon: maximum action horizon H (positional encoding length).
    dropout: dropout rate inside the residual blocks (active only when a
      call gets `rngs`).
    dtype: compute dtype; parameters are always float32.
    rngs: parameter initialisation.
  """

  def __init__(
    self,
    context_dim: int,
    act_dim: int,
    *,
    hidden: int = 512,
    heads: int = 8,
    num_layers: int = 4,
    horizon: int = 50,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    for name, value in (
      ("context_dim", context_dim),
      ("energy_act_dim", act_dim),
      ("energy_hidden", hidden),
      ("energy_heads", heads),
      ("action_horizon", horizon),
    ):
      if value < 1:
        raise ValueError(f"EnergyModel: {name} must be >= 1, got {value}")
    if num_layers < 0:
      raise ValueError(f"EnergyModel: energy_layers must be >= 0, got {num_layers}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"EnergyModel: energy_dropout must be in [0, 1), got {dropout}")
    if hidden % 2:
      raise ValueError(f"EnergyModel: energy_hidden must be even, got {hidden}")
    self.context_dim = context_dim
    self.act_dim = act_dim
    self.hidden = hidden
    self.horizon = horizon
    self.dtype = dtype
    common = dict(num_blocks=num_layers, dropout=dropout, dtype=dtype, rngs=rngs)
    self.context_encoder = layers.MLPResNet(context_dim, hidden, hidden, **common)
    self.action_encoder = layers.MLPResNet(act_dim, hidden, hidden, **common)
    self.attention = layers.CrossAttention(hidden, heads, dtype=dtype, rngs=rngs)
    self.head = layers.MLPResNet(hidden, hidden, 1, **common)

  # -- per-sample parts (run once per sample, also in `pairwise`) ----------

  def _check(self, context, context_mask, actions) -> None:
    if context.ndim != 3 or context.shape[-1] != self.context_dim:
      raise ValueError(
        f"EnergyModel: context must be [B, S, {self.context_dim}], got "
        f"{context.shape}"
      )
    if context_mask.shape != context.shape[:2]:
      raise ValueError(
        f"EnergyModel: context_mask must be {context.shape[:2]}, got "
        f"{context_mask.shape}"
      )
    if actions.ndim != 3 or actions.shape[-1] < self.act_dim:
      raise ValueError(
        f"EnergyModel: actions must be [B, H, A>={self.act_dim}], got "
        f"{actions.shape}"
      )
    if actions.shape[1] > self.horizon:
      raise ValueError(
        f"EnergyModel: action horizon {actions.shape[1]} exceeds the head's "
        f"horizon {self.horizon}"
      )

  def _encode_context(self, context, context_mask, rngs):
    """Keys and values [B, S, heads, d] of the context tokens."""
    # Zero padded tokens before anything touches them, so even non-finite
    # padding values cannot leak (the attention mask alone would not stop
    # 0 * inf = nan).
    mask = context_mask.astype(bool)
    context = jnp.where(mask[..., None], context.astype(self.dtype), 0.0)
    encoded = self.context_encoder(context, rngs=rngs)
    return self.attention.project_context(encoded)

  def _encode_actions(self, actions, rngs):
    """Action features [B, H, W] and queries [B, H, heads, d]."""
    actions = actions[..., : self.act_dim].astype(self.dtype)
    positions = jnp.asarray(
      layers.sinusoidal_positions(actions.shape[1], self.hidden), self.dtype
    )
    features = self.action_encoder(actions, offset=positions, rngs=rngs)
    return features, self.attention.project_queries(features)

  def _energy_per_step(self, features, attended, rngs):
    """Head on action features + attended context -> energy per step."""
    return self.head(features + attended, rngs=rngs)[..., 0]

  # -- public API ----------------------------------------------------------

  def __call__(
    self,
    context: jax.Array,
    context_mask: jax.Array,
    actions: jax.Array,
    *,
    rngs: nnx.Rngs | jax.Array | None = None,
  ) -> jax.Array:
    """Energies of matched pairs (context_b, actions_b).

    Args:
      context: [B, S, C] prefix tokens, any float dtype.
      context_mask: bool [B, S], True = valid token.
      actions: [B, H, A]; only the first `act_dim` dims are used.
      rngs: dropout randomness (`nnx.Rngs` or a PRNG key); None = no dropout.

    Returns:
      float32 [B] energies (unbounded; lower = better match).
    """
    self._check(context, context_mask, actions)
    if actions.shape[0] != context.shape[0]:
      raise ValueError(
        f"EnergyModel: matched pairs need equal batches, got context "
        f"{context.shape[0]} and actions {actions.shape[0]} (use pairwise)"
      )
    rngs = _as_rngs(rngs)
    keys, values = self._encode_context(context, context_mask, rngs)
    features, queries = self._encode_actions(actions, rngs)
    attended = self.attention.attend(queries, keys, values, context_mask)
    per_step = self._energy_per_step(features, attended, rngs)
    return per_step.astype(jnp.float32).mean(axis=-1)

  def pair_chunk(
    self, num_contexts: int, num_queries: int, context_len: int
  ) -> int:
    """Contexts per chunk of `pairwise`'s per-pair part (automatic choice).

    Per context, the per-pair part holds attention logits [heads, Q, S] and
    head activations [Q, MLP_RATIO * hidden] for the Q = B_actions * H queries. The
    chunk is the largest divisor of `num_contexts` (chunks of equal size)
    that keeps the larger of the two below `_PAIR_CHUNK_ELEMENTS`.
    """
    per_context = num_queries * max(
      self.attention.heads * context_len, layers.MLP_RATIO * self.hidden
    )
    limit = max(1, _PAIR_CHUNK_ELEMENTS // max(per_context, 1))
    divisors = range(1, min(limit, num_contexts) + 1)
    return max((d for d in divisors if num_contexts % d == 0), default=1)

  def pairwise(
    self,
    context: jax.Array,
    context_mask: jax.Array,
    actions: jax.Array,
    *,
    rngs: nnx.Rngs | jax.Array | None = None,
    pair_chunk: int | None = None,
    batch_axes: tuple[str, ...] | None = None,
  ) -> jax.Array:
    """Energies of all pairs: result[i, j] = E(context_i, actions_j).

    Encoders and projections run once per sample; the attention runs per
    context over all B*H action queries at once, and the head per pair.
    Memory is O(B*S*D + chunk*B*H*D): the context is never repeated, and the
    per-pair part runs `pair_chunk` contexts at a time. With more than one
    chunk, each chunk is rematerialized, so the backward pass also holds one
    chunk's per-pair tensors at a time (at the cost of recomputing the
    per-pair forward once).

    Under a mesh (the context mesh of `jax.sharding.use_abstract_mesh` /
    `jax.set_mesh`, as the trainer's steps run), each device scores its own
    contexts against the action chunks of the whole batch: the per-pair part
    splits over the devices like the rest of the step, and only the action
    features and queries (B*H tokens) are gathered, never the context. The
    result does not depend on the mesh or the chunking, dropout included.

    Args:
      context: [B, S, C].
      context_mask: bool [B, S], True = valid token.
      actions: [B, H, A] (its batch may differ from the context's).
      rngs: dropout randomness; None = no dropout.
      pair_chunk: contexts per chunk on each device (must divide the
        contexts per device); None = `self.pair_chunk(...)`.
      batch_axes: mesh axes that split the contexts; None = every axis of
        the context mesh (pipeline.sharding shards the batch over all of
        them). Without a mesh, with one device, or with a batch the devices
        do not divide, everything runs in one program.

    Returns:
      float32 [B_context, B_actions].
    """
    self._check(context, context_mask, actions)
    if pair_chunk is not None and pair_chunk < 1:
      raise ValueError(
        f"EnergyModel: pair_chunk must be >= 1, got {pair_chunk}"
      )
    rngs = _as_rngs(rngs)
    keys, values = self._encode_context(context, context_mask, rngs)
    features, queries = self._encode_actions(actions, rngs)
    num_contexts, context_len = context.shape[:2]
    num_actions, horizon = actions.shape[:2]
    # All action chunks' queries as one query set shared by every context.
    flat_queries = queries.reshape(num_actions * horizon, *queries.shape[2:])
    # One dropout key per context, so the per-pair dropout masks do not depend
    # on how the contexts are chunked or split over devices.
    context_keys = (
      None if rngs is None
      else jax.random.split(rngs.dropout(), num_contexts)
    )
    mesh, axes, devices = _context_mesh(num_contexts, batch_axes)
    local_contexts = num_contexts // devices
    chunk = pair_chunk or self.pair_chunk(
      local_contexts, flat_queries.shape[0], context_len
    )
    if local_contexts % chunk:
      where = f" per device ({devices} devices)" if devices > 1 else ""
      raise ValueError(
        f"EnergyModel: pair_chunk {chunk} must divide the batch "
        f"{local_contexts}{where}"
      )
    # The modules of the per-pair part, as arrays that can enter shard_map.
    graphdef, params = nnx.split((self.attention, self.head))

    def rows(params, keys, values, mask, context_keys, features, queries):
      attention, head = nnx.merge(graphdef, params)
      return _pair_rows(
        attention, head, keys, values, mask, context_keys, features,
        queries, chunk,
      )

    args = (params, keys, values, context_mask, context_keys, features,
            flat_queries)
    if devices == 1:
      return rows(*args)
    # shard_map rather than sharding constraints: the per-pair part is a loop
    # over chunks of contexts, which GSPMD, left to itself, partitioned badly
    # (on 8 devices each did a third of the head's work and held 2.2 GiB more;
    # pipeline.bench energy --devices=8). Inside, everything is local; the
    # replicated inputs (head parameters, action features and queries) are
    # gathered once, and their gradients summed over devices.
    split, whole = P(axes), P()
    return jax.shard_map(
      rows,
      mesh=mesh,
      in_specs=(whole, split, split, split, split, whole, whole),
      out_specs=split,
      axis_names=set(axes),
    )(*args)


def _context_mesh(num_contexts: int, batch_axes: tuple[str, ...] | None):
  """(context mesh, axes that split the contexts, their device count), or
  (None, (), 1) where everything runs in one program.

  The mesh comes from the context (the trainer traces its steps under its
  mesh), so the model needs no mesh argument, imports nothing from
  pipeline.sharding, and runs unchanged without one.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None, (), 1
  axes = tuple(mesh.axis_names if batch_axes is None else batch_axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if unknown:
    raise ValueError(
      f"EnergyModel: batch_axes {unknown} are not axes of the mesh "
      f"{dict(mesh.shape)}"
    )
  devices = math.prod(mesh.shape[a] for a in axes)
  if devices == 1 or num_contexts % devices:
    return None, (), 1
  return mesh, axes, devices


def _pair_rows(
  attention: layers.CrossAttention,
  head: layers.MLPResNet,
  keys: jax.Array,
  values: jax.Array,
  mask: jax.Array,
  context_keys: jax.Array | None,
  features: jax.Array,
  queries: jax.Array,
  chunk: int,
) -> jax.Array:
  """E(context_i, actions_j) for the given contexts i and all action chunks j.

  keys, values [N, S, heads, d], mask [N, S] and context_keys [N] (or None)
  of N contexts; features [B, H, W] and queries [B*H, heads, d] of all action
  chunks. The contexts run `chunk` at a time. Returns float32 [N, B].
  """
  num_contexts = keys.shape[0]
  num_actions, horizon, width = features.shape

  def energies(keys, values, mask, dropout_key):
    attended = attention.attend(queries, keys, values, mask)
    attended = attended.reshape(-1, num_actions, horizon, width)
    per_step = head(features[None] + attended, rngs=_as_rngs(dropout_key))
    return per_step[..., 0].astype(jnp.float32).mean(axis=-1)

  def energies_of_chunk(inputs):
    keys, values, mask, context_keys = inputs
    if context_keys is None:
      return energies(keys, values, mask, None)
    # Dropout: one context at a time, each with its own key.
    one = lambda k, v, m, key: energies(k[None], v[None], m[None], key)[0]
    return jax.vmap(one)(keys, values, mask, context_keys)

  num_chunks = num_contexts // chunk
  inputs = (keys, values, mask, context_keys)
  if num_chunks <= 1:
    return energies_of_chunk(inputs)
  in_chunks = lambda x: x.reshape(num_chunks, chunk, *x.shape[1:])
  # A loop over checkpointed chunks: the forward keeps one chunk's per-pair
  # tensors at a time and the backward recomputes them chunk by chunk. (A
  # Python loop would be unrolled, and XLA then keeps all chunks alive.)
  energies_ = jax.lax.map(
    jax.checkpoint(energies_of_chunk), jax.tree.map(in_chunks, inputs)
  )
  return energies_.reshape(num_contexts, num_actions)


def infonce(
  energies: jax.Array, tau: float | jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE over rows of a pairwise energy matrix.

  Row i is a classification over action chunks j with logits -E[i, j] / tau
  and target j = i.

  Args:
    energies: [B, B], energies[i, j] = E(context_i, actions_j).
    tau: temperature (> 0).

  Returns:
    (mean loss, {"E_pos": mean diagonal, "E_neg": mean off-diagonal (0 for
    B = 1), "accuracy": fraction of rows whose argmin is the diagonal}).
  """
  if energies.ndim != 2 or energies.shape[0] != energies.shape[1]:
    raise ValueError(f"infonce: energies must be [B, B], got {energies.shape}")
  energies = energies.astype(jnp.float32)
  n = energies.shape[0]
  log_probs = jax.nn.log_softmax(-energies / tau, axis=-1)
  loss = -jnp.mean(jnp.diagonal(log_probs))
  diag = jnp.diagonal(energies)
  # Masked sum rather than total - trace, which cancels badly.
  off_diag_sum = jnp.where(jnp.eye(n, dtype=bool), 0.0, energies).sum()
  metrics = {
    "E_pos": diag.mean(),
    "E_neg": off_diag_sum / max(n * (n - 1), 1),
    "accuracy": jnp.mean(
      (jnp.argmin(energies, axis=-1) == jnp.arange(n)).astype(jnp.float32)
    ),
  }
  return loss, metrics


def refine(
  energy_model: EnergyModel,
  context: jax.Array,
  mask: jax.Array,
  actions: jax.Array,
  *,
  steps: int,
  step_size: float | jax.Array,
  max_step: float | jax.Array,
) -> jax.Array:
  """Energy-guided refinement: a <- a - clip(step_size * dE/da, max_step).

  Only the first `act_dim` action dims move; the step of each sample is
  rescaled so its L2 norm (over horizon x act_dim) is at most `max_step`.
  Works under jax.jit with `steps` static.

  Args:
    energy_model: the head (not modified).
    context: [B, S, C] prefix tokens (treated as constant).
    mask: bool [B, S], True = valid token.
    actions: [B, H, A] actions to refine.
    steps: number of gradient steps (Python int).
    step_size: gradient step size.
    max_step: per-sample bound on the L2 norm of one step.

  Returns:
    Refined actions, same shape and dtype as `actions`.
  """
  steps = int(steps)
  if steps < 0:
    raise ValueError(f"refine: steps must be >= 0, got {steps}")
  if steps == 0:
    return actions
  act_dim = energy_model.act_dim
  graphdef, state = nnx.split(energy_model)
  context = jax.lax.stop_gradient(context)

  def total_energy(moving, fixed):
    model = nnx.merge(graphdef, state)
    chunk = jnp.concatenate([moving, fixed], axis=-1)
    # Each sample's energy depends only on its own actions, so the gradient
    # of the sum is the per-sample gradient.
    return model(context, mask, chunk).sum()

  def step(_, moving):
    grad = jax.grad(total_energy)(moving, fixed)
    delta = step_size * grad
    norm = jnp.sqrt(jnp.sum(jnp.square(delta), axis=(1, 2), keepdims=True))
    scale = jnp.minimum(1.0, max_step / jnp.maximum(norm, 1e-12))
    return moving - delta * scale

  moving = actions[..., :act_dim].astype(jnp.float32)
  fixed = actions[..., act_dim:].astype(jnp.float32)
  moving = jax.lax.fori_loop(0, steps, step, moving)
  # Reassemble from the untouched original so other dims stay bit-identical.
  return actions.at[..., :act_dim].set(moving.astype(actions.dtype))
