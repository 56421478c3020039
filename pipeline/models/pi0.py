"""Pi0: PaliGemma prefix + action expert trained by flow matching.

Token layout (as openpi pi0): prefix = 3 image slots (SigLIP tokens) followed
by the prompt tokens, all bidirectional; suffix = one state token and
`action_horizon` noisy-action tokens carrying the flow time. The suffix sees
the whole prefix, the prefix never sees the suffix, the state token does not
see the actions, and the action tokens see each other. Flow time t = 1 is
pure noise and t = 0 the data; sampling integrates from 1 to 0 with Euler
steps on top of a KV cache of the prefix.

An optional energy head E(prefix tokens, action chunk) is trained with
InfoNCE over the batch, in one of three modes (see `compute_train_loss`).
"""

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipeline.models import energy as energy_lib
from pipeline.models import gemma
from pipeline.models import siglip

IMAGE_KEYS = ('base_0_rgb', 'left_wrist_0_rgb', 'right_wrist_0_rgb')


def scale_image(image: jax.Array) -> jax.Array:
  """The model's input range: uint8 -> x / 255 * 2 - 1; float (already in [-1, 1]) -> f32."""
  if image.dtype == jnp.uint8:
    return image.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  return image.astype(jnp.float32)


def resize_with_pad(images: jax.Array, height: int, width: int) -> jax.Array:
  """Fits [B, h, w, C] images into [B, height, width, C] on the device.

  Keeps the aspect ratio: scaled size floor(side / ratio) with ratio =
  max(w / width, h / height), bilinear with PIL's antialiasing when shrinking,
  centered on black; the same geometry as the host's
  `pipeline.data.transforms.resize_with_pad`, so a loader may ship images at
  their stored size and leave the resize to the accelerator. Returns float32
  in [-1, 1] (uint8 input is scaled first).
  """
  images = scale_image(images)
  b, h, w, c = images.shape
  if (h, w) == (height, width):
    return images
  ratio = max(w / width, h / height)
  new_h, new_w = int(h / ratio), int(w / ratio)
  resized = jax.image.resize(images, (b, new_h, new_w, c), method='linear',
                             antialias=True)
  top, left = (height - new_h) // 2, (width - new_w) // 2
  pad = ((0, 0), (top, height - new_h - top), (left, width - new_w - left),
         (0, 0))
  return jnp.pad(resized, pad, constant_values=-1.0)


def fit_images(images: Mapping[str, Any], size: int) -> dict[str, jax.Array]:
  """`resize_with_pad` of every camera of a batch to size x size."""
  return {key: resize_with_pad(jnp.asarray(image), size, size)
          for key, image in images.items()}


@dataclasses.dataclass(frozen=True)
class Pi0Config:
  """Model hyper-parameters (the `config.model` section)."""
  paligemma_variant: str = 'gemma_2b'
  action_expert_variant: str = 'gemma_300m'
  vision_variant: str = 'So400m/14'
  image_size: int = 224
  action_dim: int = 32
  action_horizon: int = 50
  max_token_len: int = 48
  vocab_size: int = gemma.PALIGEMMA_VOCAB_SIZE
  dtype: str = 'bfloat16'
  remat: bool = True
  energy_head: bool = True
  use_energy_loss: bool = False
  train_only_energy_model: bool = False
  energy_hidden: int = 512
  energy_heads: int = 8
  energy_layers: int = 4
  energy_act_dim: int = 7
  energy_tau: float = 0.5
  energy_weight: float = 0.1
  energy_dropout: float = 0.0

  @classmethod
  def from_model_config(cls, model_config: Any) -> 'Pi0Config':
    """Reads a ConfigDict / mapping / Pi0Config; missing keys keep defaults."""
    if isinstance(model_config, cls):
      return model_config
    if hasattr(model_config, 'to_dict'):
      model_config = model_config.to_dict()
    if not isinstance(model_config, Mapping):
      raise TypeError('model config must be a ConfigDict, a mapping or a '
                      f'Pi0Config, got {type(model_config).__name__}.')
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in model_config.items() if k in names}
    return cls(**kwargs)

  def validate(self) -> None:
    if self.dtype not in ('bfloat16', 'float32', 'float16'):
      raise ValueError(f"config.model.dtype must be 'bfloat16' or 'float32', "
                       f'got {self.dtype!r}.')
    for key in ('image_size', 'action_dim', 'action_horizon', 'max_token_len',
                'vocab_size'):
      if getattr(self, key) < 1:
        raise ValueError(f'config.model.{key} must be >= 1, got '
                         f'{getattr(self, key)}.')
    if (self.use_energy_loss or self.train_only_energy_model) and (
        not self.energy_head):
      raise ValueError('config.model.use_energy_loss / train_only_energy_model '
                       'need config.model.energy_head = True.')
    if self.energy_head and not 1 <= self.energy_act_dim <= self.action_dim:
      raise ValueError(f'config.model.energy_act_dim must be in [1, '
                       f'action_dim={self.action_dim}], got '
                       f'{self.energy_act_dim}.')


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

  def check_observation(self, obs: Mapping[str, Any]) -> dict:
    """Validates an observation batch; returns it normalised.

    Images become float in [-1, 1] (uint8 accepted) of the model's size
    (other sizes are resized with padding, as openpi does on the device),
    absent image masks become all-True, a camera with an image_mask entry but
    no image is absent (black, masked out), prompts longer than max_token_len
    are truncated with a warning (openpi behaviour).
    """
    if not isinstance(obs, Mapping):
      raise TypeError(f'observation must be a dict, got {type(obs).__name__}.')
    for key in ('image', 'state', 'tokenized_prompt'):
      if key not in obs:
        raise KeyError(f"observation is missing '{key}' (has {sorted(obs)}).")
    state = jnp.asarray(obs['state'])
    if state.ndim != 2 or state.shape[-1] != self.action_dim:
      raise ValueError(f"observation['state'] has shape {state.shape}, "
                       f'expected [B, action_dim={self.action_dim}].')
    b = state.shape[0]
    images, image_masks = {}, {}
    given_masks = obs.get('image_mask') or {}
    for key in IMAGE_KEYS:
      if key not in obs['image']:
        if key not in given_masks:
          raise KeyError(
              f"observation['image'] is missing '{key}' (has "
              f"{sorted(obs['image'])}; expected {list(IMAGE_KEYS)}; an "
              f"image_mask entry without an image marks an absent camera).")
        # An absent camera (declared by its mask entry): black and masked
        # out, made here so the loader never ships it.
        size = self.image_size
        images[key] = jnp.full((b, size, size, 3), -1.0, jnp.float32)
        image_masks[key] = jnp.zeros((b,), bool)
        continue
      img = jnp.asarray(obs['image'][key])
      if img.ndim != 4 or img.shape[0] != b or img.shape[-1] != 3:
        raise ValueError(f"observation['image']['{key}'] has shape "
                         f'{img.shape}, expected [{b}, H, W, 3] (resized to '
                         f'model.image_size={self.image_size}).')
      images[key] = resize_with_pad(img, self.image_size, self.image_size)
      if key in given_masks:
        mask = jnp.asarray(given_masks[key]).astype(bool)
        if mask.shape != (b,):
          raise ValueError(f"observation['image_mask']['{key}'] has shape "
                           f'{mask.shape}, expected ({b},).')
      else:
        mask = jnp.ones((b,), bool)
      image_masks[key] = mask
    tokens = jnp.asarray(obs['tokenized_prompt'])
    if 'tokenized_prompt_mask' in obs:
      token_mask = jnp.asarray(obs['tokenized_prompt_mask']).astype(bool)
    else:
      raise KeyError("observation is missing 'tokenized_prompt_mask'.")
    if tokens.ndim != 2 or tokens.shape[0] != b:
      raise ValueError(f"observation['tokenized_prompt'] has shape "
                       f'{tokens.shape}, expected [{b}, max_token_len].')
    if token_mask.shape != tokens.shape:
      raise ValueError(f"observation['tokenized_prompt_mask'] has shape "
                       f'{token_mask.shape}, expected {tokens.shape}.')
    raw = obs['tokenized_prompt']
    if isinstance(raw, np.ndarray) and raw.size and (
        raw.min() < 0 or raw.max() >= self.vocab_size):
      # Out-of-range ids would silently gather garbage (NaN) embeddings.
      raise ValueError(f"observation['tokenized_prompt'] has ids in "
                       f'[{raw.min()}, {raw.max()}], outside the vocabulary '
                       f'[0, config.model.vocab_size={self.vocab_size}).')
    if tokens.shape[1] > self.max_token_len:
      logging.warning(
          'tokenized_prompt has %d tokens > max_token_len=%d; truncating.',
          tokens.shape[1], self.max_token_len)
      tokens = tokens[:, :self.max_token_len]
      token_mask = token_mask[:, :self.max_token_len]
    return {
        'image': images,
        'image_mask': image_masks,
        'state': state.astype(jnp.float32),
        'tokenized_prompt': tokens.astype(jnp.int32),
        'tokenized_prompt_mask': token_mask,
    }

  def _check_actions(self, actions: jax.Array, batch: int) -> jax.Array:
    expected = (batch, self.action_horizon, self.action_dim)
    if tuple(actions.shape) != expected:
      raise ValueError(f'actions have shape {tuple(actions.shape)}, expected '
                       f'{expected} (batch, action_horizon, action_dim).')
    return actions.astype(jnp.float32)

  # ------------------------------------------------------------- embedding

  def embed_prefix(self, obs):
    """Image + prompt tokens.

    Returns:
      tokens [B, S, W0] (compute dtype), input_mask bool [B, S],
      ar_mask bool [S] (all False: the prefix is bidirectional).
    """
    obs = self.check_observation(obs)
    b = obs['state'].shape[0]
    # One SigLIP call over all slots (batch 3B): same result as one call per
    # image, a third of the graph to compile and larger matmuls.
    stacked = jnp.concatenate([obs['image'][k] for k in IMAGE_KEYS], axis=0)
    all_tokens = self.PaliGemma['img'](stacked)
    tokens, masks = [], []
    for i, key in enumerate(IMAGE_KEYS):
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
    """Prefix-only forward (no action expert).

    Returns:
      prefix_out [B, S, W0] (compute dtype, after the final norm),
      prefix_mask bool [B, S].
    """
    prefix_out, prefix_mask, _ = self._prefix_forward(obs)
    return prefix_out, prefix_mask

  def _sample_noise_time(self, rng, actions):
    noise_rng, time_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, actions.shape, jnp.float32)
    time = jax.random.beta(time_rng, 1.5, 1.0, actions.shape[:1],
                           jnp.float32) * 0.999 + 0.001
    return noise, time

  def _flow_forward(self, rng, obs, actions):
    """Joint prefix+suffix pass: (loss [B, H], prefix_out, prefix_mask)."""
    obs = self.check_observation(obs)
    actions = self._check_actions(jnp.asarray(actions), obs['state'].shape[0])
    noise, time = self._sample_noise_time(rng, actions)
    t = time[:, None, None]
    x_t = t * noise + (1.0 - t) * actions
    u_t = noise - actions
    v_t, prefix_out, prefix_mask = self.velocity_full(obs, x_t, time)
    return jnp.mean(jnp.square(v_t - u_t), axis=-1), prefix_out, prefix_mask

  def velocity_full(self, obs, x_t, time):
    """v_t from one joint pass of prefix and suffix (no cache).

    Returns:
      (v_t [B, H, action_dim] f32, prefix_out [B, S, W0], prefix_mask).
    """
    obs = self.check_observation(obs)
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
    del train  # augmentation runs in the train step (pipeline.data.augment)
    loss, _, _ = self._flow_forward(rng, obs, actions)
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

  def compute_train_loss(self, rng, obs, actions, *, train: bool = True):
    """Training objective by mode (from the model config flags).

    - monitor (default): loss = flow; energy statistics on stop-gradient
      inputs are only logged.
    - joint (use_energy_loss): loss = flow + energy_weight * InfoNCE; the
      energy gradient reaches the LLM through the prefix output of the same
      joint forward.
    - energy only (train_only_energy_model, whatever use_energy_loss says):
      prefix-only forward, loss = InfoNCE on the stop-gradient prefix
      output; no action expert runs.

    Returns:
      (loss scalar, metrics dict of scalars).
    """
    cfg = self.config
    flow_rng, energy_rng = jax.random.split(rng)
    obs = self.check_observation(obs)
    actions = self._check_actions(jnp.asarray(actions), obs['state'].shape[0])
    if cfg.train_only_energy_model:
      prefix_out, prefix_mask = self.encode_prefix(obs)
      loss, metrics = self._energy_terms(
          energy_rng, jax.lax.stop_gradient(prefix_out), prefix_mask,
          actions, train)
      return loss, metrics

    flow_bh, prefix_out, prefix_mask = self._flow_forward(flow_rng, obs,
                                                          actions)
    flow = jnp.mean(flow_bh)
    metrics = {'flow_loss': flow}
    if self.energy is None:
      return flow, metrics
    if cfg.use_energy_loss:
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

  def sample_actions(self, rng, obs, *, num_steps: int = 10,
                     noise: Optional[jax.Array] = None,
                     refine_steps: int = 0, refine_step_size: float = 0.1,
                     refine_max_step: float = 0.1):
    """Euler integration of the flow from t=1 (noise) to t=0.

    The prefix is encoded once into a KV cache; each step runs only the
    action expert. With refine_steps > 0 the final actions are refined once
    by descending the energy head (using the cached prefix output).

    Returns:
      actions [B, H, action_dim] f32.
    """
    if num_steps < 1:
      raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
    obs = self.check_observation(obs)
    b = obs['state'].shape[0]
    shape = (b, self.action_horizon, self.action_dim)
    if noise is None:
      noise = jax.random.normal(rng, shape, jnp.float32)
    elif tuple(noise.shape) != shape:
      raise ValueError(f'noise has shape {tuple(noise.shape)}, expected '
                       f'{shape}.')
    prefix_out, prefix_mask, kv_cache = self._prefix_forward(obs)
    dt = -1.0 / num_steps

    def step(i, x_t):
      time = jnp.full((b,), 1.0 + i * dt, jnp.float32)
      v_t = self.velocity_cached(obs['state'], x_t, time, prefix_mask,
                                 kv_cache)
      return x_t + dt * v_t

    x_0 = jax.lax.fori_loop(0, num_steps, step, noise.astype(jnp.float32))
    if refine_steps > 0:
      if self.energy is None:
        raise ValueError('refine_steps > 0 needs the energy head '
                         '(config.model.energy_head = True).')
      x_0 = energy_lib.refine(self.energy, prefix_out, prefix_mask, x_0,
                              steps=refine_steps, step_size=refine_step_size,
                              max_step=refine_max_step)
    return x_0


def build_model(model_config, rngs: nnx.Rngs) -> Pi0:
  """Builds Pi0 from the `config.model` section (ConfigDict or mapping)."""
  return Pi0(Pi0Config.from_model_config(model_config), rngs)
