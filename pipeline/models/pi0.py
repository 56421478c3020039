"""Pi0: PaliGemma prefix + action expert trained by flow matching.

Token layout (as openpi pi0): prefix = 3 image slots (SigLIP tokens) followed
by the prompt tokens, all bidirectional; suffix = one state token and
`action_horizon` noisy-action tokens carrying the flow time. The suffix sees
the whole prefix, the prefix never sees the suffix, the state token does not
see the actions, and the action tokens see each other. Flow time t = 1 is
pure noise and t = 0 the data; sampling integrates from 1 to 0 with Euler
steps on top of a KV cache of the prefix.

An optional energy head E(prefix tokens, action chunk) is trained with
InfoNCE over the batch, in the mode config.model.energy_mode names (see
`compute_train_loss`).
"""

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from pipeline import batch as batch_lib
from pipeline.models import energy as energy_lib
from pipeline.models import gemma
from pipeline.models.pi0_config import Pi0Config
from pipeline.models import preprocess as preprocess_lib
from pipeline.models import siglip

# Salt of the augmentation's key: fold_in(step key, AUGMENT_SALT).
AUGMENT_SALT = 0x617567


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
  """Attention mask from validity and block-causal markers (big_vision rule).

  Token i may attend token j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are
  valid. An ar=True token starts a new block that earlier tokens cannot see.

  Args:
    input_mask: bool [B, N], True for real tokens.
    ar_mask: bool [N] or [B, N].

  Returns:
    bool [B, N, N], True = query i may attend key j.
  """
  ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
  cumsum = jnp.cumsum(ar_mask.astype(jnp.int32), axis=1)
  attn = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  return attn & valid


def posemb_sincos(pos: jax.Array, embedding_dim: int, min_period: float,
                  max_period: float) -> jax.Array:
  """Sine-cosine embedding of scalar positions [B] -> [B, embedding_dim]."""
  if embedding_dim % 2:
    raise ValueError(f'embedding_dim ({embedding_dim}) must be even.')
  fraction = jnp.linspace(0.0, 1.0, embedding_dim // 2)
  period = min_period * (max_period / min_period)**fraction
  arg = jnp.einsum('i,j->ij', pos.astype(jnp.float32),
                   1.0 / period * 2 * math.pi,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def _variant(get_config, key: str, config: Pi0Config):
  """Looks up a variant, naming the config key on failure."""
  try:
    return get_config(getattr(config, key))
  except ValueError as e:
    raise ValueError(f'config.model.{key}: {e}') from None


class Pi0(nnx.Module):
  """Pi0 with an optional energy head (see module docstring)."""

  def __init__(self, config: Pi0Config, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    self.image_size = config.image_size
    self.action_dim = config.action_dim
    self.action_horizon = config.action_horizon
    self.max_token_len = config.max_token_len
    self.vocab_size = config.vocab_size
    pg_cfg = _variant(gemma.get_config, 'paligemma_variant', config)
    ae_cfg = _variant(gemma.get_config, 'action_expert_variant', config)
    vision_cfg = _variant(siglip.get_config, 'vision_variant', config)
    self.prefix_width = pg_cfg.width
    self.expert_width = ae_cfg.width
    llm = gemma.Gemma([pg_cfg, ae_cfg], vocab_size=config.vocab_size,
                      dtype=self.dtype, remat=config.remat, rngs=rngs)
    img = siglip.SigLIP(vision_cfg,
                        image_size=config.image_size, out_dim=pg_cfg.width,
                        dtype=self.dtype, remat=config.remat, rngs=rngs)
    self.PaliGemma = nnx.Dict(llm=llm, img=img)
    w = ae_cfg.width
    self.action_in_proj = nnx.Linear(config.action_dim, w, rngs=rngs)
    self.state_proj = nnx.Linear(config.action_dim, w, rngs=rngs)
    self.action_time_mlp_in = nnx.Linear(2 * w, w, rngs=rngs)
    self.action_time_mlp_out = nnx.Linear(w, w, rngs=rngs)
    self.action_out_proj = nnx.Linear(w, config.action_dim, rngs=rngs)
    if config.energy_head:
      self.energy = energy_lib.EnergyModel(
          pg_cfg.width, config.energy_act_dim, hidden=config.energy_hidden,
          heads=config.energy_heads, num_layers=config.energy_layers,
          horizon=config.action_horizon, dropout=config.energy_dropout,
          dtype=self.dtype, rngs=rngs)
    else:
      self.energy = None

  # ---------------------------------------------------------------- inputs

  def preprocess(self, obs: Mapping[str, Any], *,
                 augment_rng: Optional[jax.Array] = None) -> dict:
    """A batch of the batch contract -> model inputs (pipeline.models.preprocess).

    The public entry points (compute_loss, compute_train_loss, encode_prefix,
    sample_actions) call it once; the other methods take its output.
    """
    return preprocess_lib.preprocess_observation(obs, self.config,
                                                 augment_rng=augment_rng)

  def _check_actions(self, actions: jax.Array, batch: int) -> jax.Array:
    expected = (batch, self.action_horizon, self.action_dim)
    if tuple(actions.shape) != expected:
      raise ValueError(f'actions have shape {tuple(actions.shape)}, expected '
                       f'{expected} (batch, action_horizon, action_dim).')
    return actions.astype(jnp.float32)

  # ------------------------------------------------------------- embedding

  def embed_prefix(self, obs):
    """Image + prompt tokens of a preprocessed observation.

    Returns:
      tokens [B, S, W0] (compute dtype), input_mask bool [B, S],
      ar_mask bool [S] (all False: the prefix is bidirectional).
    """
    b = obs['state'].shape[0]
    # One SigLIP call over all slots (batch 3B): same result as one call per
    # image, a third of the graph to compile and larger matmuls.
    stacked = jnp.concatenate([obs['image'][k] for k in batch_lib.CAMERAS], axis=0)
    all_tokens = self.PaliGemma['img'](stacked)
    tokens, masks = [], []
    for i, key in enumerate(batch_lib.CAMERAS):
      img_tokens = all_tokens[i * b:(i + 1) * b]
      tokens.append(img_tokens)
      masks.append(jnp.broadcast_to(obs['image_mask'][key][:, None],
                                    img_tokens.shape[:2]))
    tokens.append(self.PaliGemma['llm'].embed(obs['tokenized_prompt']))
    masks.append(obs['tokenized_prompt_mask'])
    tokens = jnp.concatenate([t.astype(self.dtype) for t in tokens], axis=1)
    input_mask = jnp.concatenate(masks, axis=1)
    ar_mask = jnp.zeros((tokens.shape[1],), bool)
    return tokens, input_mask, ar_mask

  def embed_suffix(self, state, noisy_actions, timestep):
    """State token + action tokens with the flow time mixed in.

    Args:
      state: [B, action_dim].
      noisy_actions: [B, H, action_dim] (x_t).
      timestep: [B] flow time.

    Returns:
      tokens [B, 1 + H, W1] f32, input_mask [B, 1 + H], ar_mask [1 + H]
      (state and the first action token open new causal blocks).
    """
    b, h = noisy_actions.shape[:2]
    state_token = self.state_proj(state.astype(jnp.float32))[:, None, :]
    action_tokens = self.action_in_proj(noisy_actions.astype(jnp.float32))
    time_emb = posemb_sincos(timestep, self.expert_width, min_period=4e-3,
                             max_period=4.0)
    time_tokens = jnp.broadcast_to(time_emb[:, None, :],
                                   (b, h, self.expert_width))
    x = jnp.concatenate([action_tokens, time_tokens], axis=-1)
    x = self.action_time_mlp_out(nnx.swish(self.action_time_mlp_in(x)))
    tokens = jnp.concatenate([state_token, x], axis=1)
    input_mask = jnp.ones((b, 1 + h), bool)
    ar_mask = jnp.array([True, True] + [False] * (h - 1))
    return tokens, input_mask, ar_mask

  # --------------------------------------------------------------- forward

  def _prefix_forward(self, obs):
    """Prefix-only LLM pass: (prefix_out, prefix_mask, kv_cache)."""
    tokens, input_mask, ar_mask = self.embed_prefix(obs)
    attn_mask = make_attn_mask(input_mask, ar_mask)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    (prefix_out, _), kv_cache = self.PaliGemma['llm'](
        [tokens, None], positions, attn_mask)
    return prefix_out, input_mask, kv_cache

  def encode_prefix(self, obs):
    """Prefix-only forward (no action expert) of a batch.

    Returns:
      prefix_out [B, S, W0] (compute dtype, after the final norm),
      prefix_mask bool [B, S].
    """
    prefix_out, prefix_mask, _ = self._prefix_forward(self.preprocess(obs))
    return prefix_out, prefix_mask

  def _sample_noise_time(self, rng, actions):
    noise_rng, time_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
    time = jax.random.beta(time_rng, 1.5, 1.0, actions.shape[:1],
                           jnp.float32) * 0.999 + 0.001
    return noise, time

  def _flow_forward(self, rng, obs, actions):
    """Joint prefix+suffix pass: (loss [B, H], prefix_out, prefix_mask)."""
    actions = self._check_actions(jnp.asarray(actions), obs['state'].shape[0])
    noise, time = self._sample_noise_time(rng, actions)
    t = time[:, None, None]
    x_t = t * noise + (1.0 - t) * actions
    u_t = noise - actions
    v_t, prefix_out, prefix_mask = self.velocity_full(obs, x_t, time)
    return jnp.mean(jnp.square(v_t - u_t), axis=-1), prefix_out, prefix_mask

  def velocity_full(self, obs, x_t, time):
    """v_t from one joint pass of prefix and suffix (no cache).

    Args:
      obs: a preprocessed observation (`preprocess`).
      x_t: [B, H, action_dim] noisy actions.
      time: [B] flow time.

    Returns:
      (v_t [B, H, action_dim] f32, prefix_out [B, S, W0], prefix_mask).
    """
    prefix_tokens, prefix_mask, prefix_ar = self.embed_prefix(obs)
    suffix_tokens, suffix_mask, suffix_ar = self.embed_suffix(
        obs['state'], x_t, time)
    input_mask = jnp.concatenate([prefix_mask, suffix_mask], axis=1)
    ar_mask = jnp.concatenate([prefix_ar, suffix_ar], axis=0)
    attn_mask = make_attn_mask(input_mask, ar_mask)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    (prefix_out, suffix_out), _ = self.PaliGemma['llm'](
        [prefix_tokens, suffix_tokens], positions, attn_mask)
    v_t = self.action_out_proj(
        suffix_out[:, -self.action_horizon:].astype(jnp.float32))
    return v_t, prefix_out, prefix_mask

  def compute_loss(self, rng, obs, actions, *, train: bool = False):
    """Flow-matching loss per action step [B, H] (openpi Pi0.compute_loss)."""
    del train  # augmentation is the train step's choice (compute_train_loss)
    loss, _, _ = self._flow_forward(rng, self.preprocess(obs), actions)
    return loss

  # ---------------------------------------------------------------- energy

  def _energy_terms(self, rng, context, context_mask, actions, train):
    cfg = self.config
    act = actions[..., :cfg.energy_act_dim]
    dropout_rng = rng if (train and cfg.energy_dropout > 0) else None
    energies = self.energy.pairwise(context, context_mask, act,
                                    rngs=dropout_rng)
    loss, stats = energy_lib.infonce(energies, cfg.energy_tau)
    metrics = {
        'energy_loss': loss,
        'E_pos': stats['E_pos'],
        'E_neg': stats['E_neg'],
        'energy_accuracy': stats['accuracy'],
    }
    return loss, metrics

  def compute_train_loss(self, rng, obs, actions, *, train: bool = True,
                         augment: bool = False):
    """Training objective by config.model.energy_mode.

    - off: loss = flow.
    - monitor: loss = flow; energy statistics on stop-gradient inputs are
      only logged.
    - joint: loss = flow + energy_weight * InfoNCE; the energy gradient
      reaches the LLM through the prefix output of the same joint forward.
    - energy_only: prefix-only forward, loss = InfoNCE on the stop-gradient
      prefix output; no action expert runs.

    augment: augment the images first (training), keyed by
    fold_in(rng, AUGMENT_SALT), a stream of its own.

    Returns:
      (loss scalar, metrics dict of scalars).
    """
    cfg = self.config
    augment_rng = jax.random.fold_in(rng, AUGMENT_SALT) if augment else None
    obs = self.preprocess(obs, augment_rng=augment_rng)
    flow_rng, energy_rng = jax.random.split(rng)
    actions = self._check_actions(jnp.asarray(actions), obs['state'].shape[0])
    if cfg.energy_mode == 'energy_only':
      prefix_out, prefix_mask, _ = self._prefix_forward(obs)
      return self._energy_terms(energy_rng, jax.lax.stop_gradient(prefix_out),
                                prefix_mask, actions, train)

    flow_bh, prefix_out, prefix_mask = self._flow_forward(flow_rng, obs,
                                                          actions)
    flow = jnp.mean(flow_bh)
    metrics = {'flow_loss': flow}
    if cfg.energy_mode == 'off':
      return flow, metrics
    if cfg.energy_mode == 'joint':
      e_loss, e_metrics = self._energy_terms(energy_rng, prefix_out,
                                             prefix_mask, actions, train)
      total = flow + cfg.energy_weight * e_loss
    else:
      # Monitor only: no parameter may receive an energy gradient.
      _, e_metrics = self._energy_terms(
          energy_rng, jax.lax.stop_gradient(prefix_out), prefix_mask,
          actions, train)
      e_metrics = jax.lax.stop_gradient(e_metrics)
      total = flow
    metrics.update(e_metrics)
    return total, metrics

  # -------------------------------------------------------------- sampling

  def velocity_cached(self, state, x_t, time, prefix_mask, kv_cache):
    """v_t of the action expert attending to the cached prefix k/v."""
    suffix_tokens, suffix_mask, suffix_ar = self.embed_suffix(state, x_t, time)
    b, ts = suffix_mask.shape
    suffix_attn = make_attn_mask(suffix_mask, suffix_ar)
    prefix_attn = jnp.broadcast_to(prefix_mask[:, None, :],
                                   (b, ts, prefix_mask.shape[1]))
    attn_mask = jnp.concatenate([prefix_attn, suffix_attn], axis=-1)
    positions = (jnp.sum(prefix_mask, axis=-1)[:, None] +
                 jnp.cumsum(suffix_mask, axis=1) - 1)
    (_, suffix_out), _ = self.PaliGemma['llm'](
        [None, suffix_tokens], positions, attn_mask, kv_cache=kv_cache)
    return self.action_out_proj(
        suffix_out[:, -self.action_horizon:].astype(jnp.float32))

  def _integrate(self, state, noise, prefix_mask, kv_cache, num_steps: int):
    """Euler steps from t=1 (noise [B, H, D]) to t=0 over a prefix KV cache."""
    b = noise.shape[0]
    dt = -1.0 / num_steps

    def step(i, x_t):
      time = jnp.full((b,), 1.0 + i * dt, jnp.float32)
      return x_t + dt * self.velocity_cached(state, x_t, time, prefix_mask,
                                             kv_cache)

    return jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))

  def candidate_energies(self, prefix_out, prefix_mask, candidates):
    """E(prefix of observation b, candidate n of b): [B, N] f32.

    Each observation's context is encoded once and attended by its own N
    candidates only (not the B x B*N pairs of `pairwise`).
    """
    act = candidates[..., :self.config.energy_act_dim]
    per_observation = lambda c, m, a: self.energy.pairwise(c[None], m[None],
                                                           a)[0]
    return jax.vmap(per_observation)(prefix_out, prefix_mask, act)

  def sample_candidates(self, obs, noise, *, num_steps: int = 10):
    """N sampled chunks per observation and their energies.

    The prefix and its KV cache are computed once per observation and shared
    by its candidates, which integrate in one batched pass.

    Args:
      obs: a preprocessed observation (`preprocess`).
      noise: [B, N, H, action_dim] initial noise, one per candidate.
      num_steps: Euler steps.

    Returns:
      (candidates [B, N, H, action_dim] f32, energies [B, N] f32,
       prefix_out, prefix_mask).
    """
    if self.energy is None:
      raise ValueError('best-of-N selection needs the energy head '
                       "(config.model.energy_mode != 'off').")
    b, n = noise.shape[:2]
    prefix_out, prefix_mask, kv_cache = self._prefix_forward(obs)
    per_candidate = lambda x: jnp.repeat(x, n, axis=0)
    cache = jax.tree.map(lambda c: jnp.repeat(c, n, axis=1), kv_cache)
    flat = self._integrate(per_candidate(obs['state']),
                           noise.reshape(b * n, *noise.shape[2:]),
                           per_candidate(prefix_mask), cache, num_steps)
    candidates = flat.reshape(noise.shape)
    energies = self.candidate_energies(prefix_out, prefix_mask, candidates)
    return candidates, energies, prefix_out, prefix_mask

  def sample_actions(self, rng, obs, **kwargs) -> jax.Array:
    """Sampled actions [B, H, action_dim] f32 (`sample_with_energies`)."""
    return self.sample_with_energies(rng, obs, **kwargs)['actions']

  def sample_with_energies(self, rng, obs, *, num_steps: int = 10,
                           noise: Optional[jax.Array] = None,
                           num_candidates: int = 1,
                           refine_steps: int = 0,
                           refine_step_size: float = 0.1,
                           refine_max_step: float = 0.1) -> dict:
    """Euler integration of the flow from t=1 (noise) to t=0, energy-guided.

    The prefix is encoded once into a KV cache; each step runs only the
    action expert. With num_candidates = N > 1, N chunks are sampled per
    observation (noise [B, N, H, action_dim]) and the one of lowest energy
    is kept (`sample_candidates`). With refine_steps > 0 the kept actions are
    then refined by descending the energy head (using the prefix output).

    Returns:
      {'actions': [B, H, action_dim] f32} plus, when the energy head took
      part: 'energy' [B] of the returned chunk (after refinement), and with
      N > 1 'candidate_energies' [B, N] of the chunks it chose from.
    """
    if num_steps < 1:
      raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
    if num_candidates < 1:
      raise ValueError(f'num_candidates must be >= 1, got {num_candidates}.')
    obs = self.preprocess(obs)
    b = obs['state'].shape[0]
    shape = (b, self.action_horizon, self.action_dim)
    if num_candidates > 1:
      shape = (b, num_candidates) + shape[1:]
    if noise is None:
      noise = jax.random.normal(rng, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
      raise ValueError(f'noise has shape {tuple(noise.shape)}, expected '
                       f'{shape}.')
    out = {}
    if num_candidates > 1:
      candidates, energies, prefix_out, prefix_mask = self.sample_candidates(
          obs, noise, num_steps=num_steps)
      best = jnp.argmin(energies, axis=1)
      x_0 = jnp.take_along_axis(candidates, best[:, None, None, None],
                                axis=1)[:, 0]
      out['candidate_energies'] = energies
      out['energy'] = jnp.min(energies, axis=1)
    else:
      prefix_out, prefix_mask, kv_cache = self._prefix_forward(obs)
      x_0 = self._integrate(obs['state'], noise, prefix_mask, kv_cache,
                            num_steps)
    if refine_steps > 0:
      if self.energy is None:
        raise ValueError('refine_steps > 0 needs the energy head '
                         "(config.model.energy_mode != 'off').")
      x_0 = energy_lib.refine(self.energy, prefix_out, prefix_mask, x_0,
                              steps=refine_steps, step_size=refine_step_size,
                              max_step=refine_max_step)
      # The refined chunk's own energy: one more head pass (no new prefix).
      out['energy'] = self.candidate_energies(prefix_out, prefix_mask,
                                              x_0[:, None])[:, 0]
    out['actions'] = x_0
    return out


def build_model(model_config, rngs: nnx.Rngs) -> Pi0:
  """Builds Pi0 from the `config.model` section (ConfigDict or mapping)."""
  return Pi0(Pi0Config.from_model_config(model_config), rngs)
