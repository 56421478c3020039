"""Pi0: masks, embeddings, flow-matching loss, cached sampling, loss modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from pipeline import batch as batch_lib
from pipeline.models import build_model
from pipeline.models import pi0 as pi0_lib

B = 2
IMAGE = 16
TOKENS = 6
H = 4
A = 8
KEYS = batch_lib.CAMERAS

TINY = dict(
    common.model_config().to_dict(), paligemma_variant='tiny', action_expert_variant='tiny_small',
    vision_variant='tiny', image_size=IMAGE, action_dim=A, action_horizon=H,
    max_token_len=TOKENS, vocab_size=64, dtype='float32', remat=True,
    energy_mode='monitor',
    energy_hidden=16, energy_heads=2, energy_layers=1, energy_act_dim=3,
    energy_tau=0.5, energy_weight=0.1, energy_dropout=0.0)


def make_obs(seed=0, b=B):
  rng = np.random.RandomState(seed)
  mask = np.ones((b, TOKENS), bool)
  mask[0, 4:] = False  # right padding in the first example
  tokens = rng.randint(1, 64, (b, TOKENS)).astype(np.int32) * mask
  return {
      'image': {k: rng.uniform(-1, 1, (b, IMAGE, IMAGE, 3)).astype(np.float32)
                for k in KEYS},
      'image_mask': {KEYS[0]: np.ones(b, bool), KEYS[1]: np.ones(b, bool),
                     KEYS[2]: np.array([False] + [True] * (b - 1))},
      'state': rng.randn(b, A).astype(np.float32),
      'tokenized_prompt': tokens,
      'tokenized_prompt_mask': mask,
  }


def fast_build(cfg, seed=0):
  """Tiny model with random parameters, skipping the compiled initialisers.

  Initialising for real compiles one program per parameter shape; tests
  only need some well-scaled random values (real init is tested elsewhere).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(
      cfg, nnx.Rngs(0))))
  rng = np.random.RandomState(seed)

  def fill(x):
    std = 1.0 / math.sqrt(x.shape[-2]) if x.ndim >= 2 else 0.1
    return jnp.asarray(rng.randn(*x.shape).astype(np.float32) * std, x.dtype)

  return nnx.merge(graphdef, jax.tree.map(fill, state))


@pytest.fixture(scope='module')
def model():
  return fast_build(TINY)


@pytest.fixture(scope='module')
def obs():
  return make_obs()


@pytest.fixture(scope='module')
def actions():
  return np.random.RandomState(1).randn(B, H, A).astype(np.float32)


encode_prefix = nnx.jit(lambda m, o: m.encode_prefix(o))
velocity_full = nnx.jit(lambda m, o, x, t: m.velocity_full(m.preprocess(o), x, t))
compute_loss = nnx.jit(lambda m, r, o, a: m.compute_loss(r, o, a))


# -------------------------------------------------------------- pure pieces


def test_attn_mask_toy_sequence():
  # 3 prefix tokens (last one padding), state token, 2 action tokens.
  input_mask = np.array([[1, 1, 0, 1, 1, 1]], bool)
  ar_mask = np.array([0, 0, 0, 1, 1, 0], bool)
  want = np.array([
      # keys: p0 p1 pad st a0 a1
      [1, 1, 0, 0, 0, 0],  # p0: bidirectional prefix, no suffix
      [1, 1, 0, 0, 0, 0],  # p1
      [0, 0, 0, 0, 0, 0],  # pad attends nothing
      [1, 1, 0, 1, 0, 0],  # state: prefix + itself
      [1, 1, 0, 1, 1, 1],  # actions: prefix, state, all actions
      [1, 1, 0, 1, 1, 1],
  ], bool)
  got = pi0_lib.make_attn_mask(jnp.asarray(input_mask), jnp.asarray(ar_mask))
  np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_posemb_sincos_matches_numpy():
  t = np.array([0.001, 0.5, 1.0], np.float32)
  got = np.asarray(pi0_lib.posemb_sincos(jnp.asarray(t), 8, 4e-3, 4.0))
  periods = 4e-3 * (4.0 / 4e-3)**np.linspace(0, 1, 4)
  arg = t[:, None] * 2 * np.pi / periods[None]
  np.testing.assert_allclose(got, np.concatenate([np.sin(arg), np.cos(arg)],
                                                 -1), rtol=1e-5, atol=2e-4)


def test_embed_suffix_matches_numpy(model):
  rng = np.random.RandomState(5)
  state = rng.randn(B, A).astype(np.float32)
  x_t = rng.randn(B, H, A).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)
  tokens, input_mask, ar_mask = model.embed_suffix(jnp.asarray(state),
                                                   jnp.asarray(x_t),
                                                   jnp.asarray(t))
  p = nnx.state(model, nnx.Param).to_pure_dict()
  lin = lambda name, x: x @ np.asarray(p[name]['kernel']) + np.asarray(
      p[name]['bias'])
  w = model.expert_width
  periods = 4e-3 * (4.0 / 4e-3)**np.linspace(0, 1, w // 2)
  arg = t[:, None] * 2 * np.pi / periods
  temb = np.concatenate([np.sin(arg), np.cos(arg)], -1)
  h = np.concatenate([lin('action_in_proj', x_t),
                      np.repeat(temb[:, None], H, 1)], -1)
  h = lin('action_time_mlp_in', h)
  h = lin('action_time_mlp_out', h / (1 + np.exp(-h)))
  want = np.concatenate([lin('state_proj', state)[:, None], h], 1)
  np.testing.assert_allclose(np.asarray(tokens), want, rtol=1e-4, atol=2e-4)
  np.testing.assert_array_equal(np.asarray(ar_mask),
                                [True, True] + [False] * (H - 1))
  assert np.asarray(input_mask).all()


# ------------------------------------------------------------ flow matching


def test_flow_loss_matches_numpy(model, obs, actions):
  rng = jax.random.key(7)
  loss = np.asarray(compute_loss(model, rng, obs, actions))
  assert loss.shape == (B, H)
  # Same draws as the model: split into (noise, time) keys.
  noise_rng, time_rng = jax.random.split(rng)
  noise = np.asarray(jax.random.normal(noise_rng, actions.shape))
  time = np.asarray(jax.random.beta(time_rng, 1.5, 1.0, (B,))) * 0.999 + 0.001
  t = time[:, None, None]
  x_t = t * noise + (1 - t) * actions
  v_t, _, _ = velocity_full(model, obs, jnp.asarray(x_t, jnp.float32),
                            jnp.asarray(time, jnp.float32))
  want = np.mean((np.asarray(v_t) - (noise - actions))**2, axis=-1)
  np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)


def test_encode_prefix_equals_prefix_of_joint_pass(model, obs, actions):
  out, mask = encode_prefix(model, obs)
  s = 3 * (IMAGE // 8)**2 + TOKENS
  assert out.shape == (B, s, 32) and mask.shape == (B, s)
  _, joint_out, joint_mask = velocity_full(model, obs, jnp.asarray(actions),
                                           jnp.full((B,), 0.5))
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(joint_mask))
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out)[m], np.asarray(joint_out)[m],
                             rtol=1e-5, atol=1e-5)


def test_padding_and_masked_images_do_not_change_valid_outputs(
    model, obs, actions):
  changed = make_obs()
  changed['tokenized_prompt'] = changed['tokenized_prompt'].copy()
  changed['tokenized_prompt'][0, 4:] = 17  # padded prompt positions
  changed['image'][KEYS[2]] = changed['image'][KEYS[2]].copy()
  changed['image'][KEYS[2]][0] = 0.9  # image of example 0 is masked out
  out_a, mask = encode_prefix(model, obs)
  out_b, _ = encode_prefix(model, changed)
  m = np.asarray(mask)
  assert not m.all()
  np.testing.assert_allclose(np.asarray(out_a)[m], np.asarray(out_b)[m],
                             rtol=1e-6, atol=1e-6)
  rng = jax.random.key(3)
  np.testing.assert_allclose(np.asarray(compute_loss(model, rng, obs, actions)),
                             np.asarray(compute_loss(model, rng, changed,
                                                     actions)),
                             rtol=1e-6, atol=1e-6)


def test_uint8_images_are_rescaled(model):
  o = make_obs(seed=4)
  u8 = {k: np.random.RandomState(i).randint(0, 256, (B, IMAGE, IMAGE, 3))
        .astype(np.uint8) for i, k in enumerate(KEYS)}
  checked = model.preprocess(dict(o, image=u8))
  for k in KEYS:
    np.testing.assert_allclose(np.asarray(checked['image'][k]),
                               u8[k].astype(np.float32) / 255 * 2 - 1,
                               rtol=1e-6, atol=1e-6)
  assert checked['image_mask'][KEYS[0]].dtype == bool


# ---------------------------------------------------------------- sampling


STEPS = 3


@pytest.fixture(scope='module')
def sampling_noise():
  return jnp.asarray(np.random.RandomState(9).randn(B, H, A), jnp.float32)


@pytest.fixture(scope='module')
def cached_samples(model, obs, sampling_noise):
  sample = nnx.jit(lambda m, o, n: m.sample_actions(
      jax.random.key(0), o, num_steps=STEPS, noise=n))
  return np.asarray(sample(model, obs, sampling_noise))


def test_cached_sampling_equals_uncached_euler(model, obs, sampling_noise,
                                               cached_samples):
  x = sampling_noise
  dt = -1.0 / STEPS
  for i in range(STEPS):
    v, _, _ = velocity_full(model, obs, x, jnp.full((B,), 1.0 + i * dt))
    x = x + dt * v
  np.testing.assert_allclose(cached_samples, np.asarray(x), rtol=1e-4,
                             atol=1e-4)
  assert np.isfinite(cached_samples).all()


def test_refine_moves_only_energy_dims(model, obs, sampling_noise,
                                       cached_samples):
  sample = nnx.jit(lambda m, o, n: m.sample_actions(
      jax.random.key(0), o, num_steps=STEPS, noise=n, refine_steps=2,
      refine_step_size=0.5, refine_max_step=0.5))
  r = np.asarray(sample(model, obs, sampling_noise))
  a = cached_samples
  np.testing.assert_allclose(r[..., 3:], a[..., 3:], rtol=1e-5, atol=1e-5)
  assert np.abs(r[..., :3] - a[..., :3]).max() > 0


def test_best_of_n_keeps_the_lowest_energy_candidate(model, obs,
                                                     sampling_noise,
                                                     cached_samples):
  n = 3
  # Candidate 0 starts from the plain sample's noise; the others from more.
  extra = np.random.RandomState(10).randn(B, n - 1, H, A).astype(np.float32)
  noise = jnp.concatenate([sampling_noise[:, None], jnp.asarray(extra)], 1)
  best = nnx.jit(lambda m, o, z: m.sample_actions(
      jax.random.key(0), o, num_steps=STEPS, noise=z, num_candidates=n))
  got = np.asarray(best(model, obs, noise))
  # Reference: each candidate sampled on its own (plain sampling, its own
  # prefix pass) and scored as a matched pair by the head's __call__.
  plain = nnx.jit(lambda m, o, z: m.sample_actions(
      jax.random.key(0), o, num_steps=STEPS, noise=z))
  cands = np.stack([np.asarray(plain(model, obs, noise[:, k]))
                    for k in range(n)], 1)
  np.testing.assert_allclose(cands[:, 0], cached_samples, rtol=1e-6)
  context, mask = encode_prefix(model, obs)
  energy = nnx.jit(lambda m, c, k, a: m.energy(c, k, a))
  energies = np.stack([np.asarray(energy(model, context, mask,
                                         jnp.asarray(cands[:, k])))
                       for k in range(n)], 1)
  want = cands[np.arange(B), np.argmin(energies, 1)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The candidates really differ in energy, so the choice is not trivial.
  assert np.ptp(energies, axis=1).min() > 1e-4
  with pytest.raises(ValueError, match='noise has shape'):
    model.sample_actions(jax.random.key(0), obs, num_steps=1,
                         noise=sampling_noise, num_candidates=n)


def test_sample_with_energies_reports_the_heads_energies(model, obs,
                                                         sampling_noise):
  """sample_actions' actions, plus the energies the head gave them."""
  n = 3
  extra = np.random.RandomState(11).randn(B, n - 1, H, A).astype(np.float32)
  noise = jnp.concatenate([sampling_noise[:, None], jnp.asarray(extra)], 1)
  kw = dict(num_steps=STEPS, num_candidates=n)
  refine = dict(refine_steps=2, refine_step_size=0.5, refine_max_step=0.5)
  context, mask = encode_prefix(model, obs)
  energy = nnx.jit(lambda m, c, k, a: m.energy(c, k, a[..., :3]))
  outs = []
  for extra_kw in ({}, refine):
    # (sample_actions returns the 'actions' of this very call.)
    out = nnx.jit(lambda m, o, z, e=extra_kw: m.sample_with_energies(
        jax.random.key(0), o, noise=z, **kw, **e))(model, obs, noise)
    assert out['candidate_energies'].shape == (B, n)
    np.testing.assert_allclose(
        out['energy'], energy(model, context, mask, out['actions']),
        rtol=1e-4, atol=1e-4)
    outs.append(out)
  # Without refinement the kept chunk's energy is its candidates' minimum.
  np.testing.assert_allclose(outs[0]['energy'],
                             np.min(outs[0]['candidate_energies'], axis=1))
  assert np.abs(outs[1]['actions'] - outs[0]['actions']).max() > 0
  plain = nnx.jit(lambda m, o: m.sample_with_energies(
      jax.random.key(0), o, num_steps=STEPS))(model, obs)
  assert sorted(plain) == ['actions']  # the head does not run


# -------------------------------------------------------------- loss modes


@pytest.fixture(scope='module')
def monitor_run(model, obs, actions):
  """Loss, metrics and gradients of one jitted monitor-mode train step."""

  @nnx.jit
  def step(m, rng, obs, actions):
    def f(m):
      return m.compute_train_loss(rng, obs, actions)
    (loss, metrics), g = nnx.value_and_grad(f, has_aux=True)(m)
    return loss, metrics, g

  loss, metrics, g = step(model, jax.random.key(0), obs, actions)
  flat = {'/'.join(str(k.key) for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_flatten_with_path(g.to_pure_dict())[0]}
  return float(loss), {k: float(v) for k, v in metrics.items()}, flat


def _norm(flat, prefix):
  return sum(float(np.abs(v).sum()) for k, v in flat.items()
             if k.startswith(prefix))


def test_monitor_mode(monitor_run):
  loss, metrics, g = monitor_run
  assert set(metrics) == {'flow_loss', 'energy_loss', 'E_pos', 'E_neg',
                          'energy_accuracy'}
  assert math.isfinite(loss) and loss == pytest.approx(metrics['flow_loss'])
  assert all(math.isfinite(v) for v in metrics.values())
  assert all(np.isfinite(v).all() for v in g.values())
  assert _norm(g, 'energy/') == 0.0
  assert _norm(g, 'PaliGemma/llm/layers/mlp/') > 0
  assert _norm(g, 'PaliGemma/img/') > 0
  assert _norm(g, 'action_out_proj/') > 0


def _metric_keys(cfg_overrides, obs, actions):
  """Metric names of compute_train_loss, by shape evaluation (no compile)."""
  m = nnx.eval_shape(lambda: build_model(dict(TINY, **cfg_overrides),
                                         nnx.Rngs(0)))
  loss, metrics = nnx.eval_shape(
      lambda m: m.compute_train_loss(jax.random.key(0), obs, actions), m)
  assert loss.shape == () and all(v.shape == () for v in metrics.values())
  return set(metrics)


def test_metric_keys_by_mode(obs, actions):
  # Gradient routing per mode is covered by test_energy_modes.py.
  energy = {'energy_loss', 'E_pos', 'E_neg', 'energy_accuracy'}
  assert _metric_keys({'energy_mode': 'joint'}, obs, actions) == (
      energy | {'flow_loss'})
  assert _metric_keys({'energy_mode': 'monitor'}, obs, actions) == (
      energy | {'flow_loss'})
  assert _metric_keys({'energy_mode': 'energy_only'}, obs, actions) == energy
  assert _metric_keys({'energy_mode': 'off'}, obs, actions) == {'flow_loss'}


# ------------------------------------------------------------- bad inputs


def test_bad_inputs(model, obs, actions):
  # No image and no mask entry: a mistake, not an absent camera.
  bad = dict(obs, image={k: v for k, v in obs['image'].items() if k != KEYS[1]},
             image_mask={k: v for k, v in (obs.get('image_mask') or {}).items()
                         if k != KEYS[1]})
  with pytest.raises(KeyError, match='left_wrist_0_rgb'):
    model.preprocess(bad)
  for shape in ((B, 8, 8, 4), (B + 1, 8, 8, 3), (8, 8, 3)):
    bad = dict(obs, image=dict(obs['image'],
                               base_0_rgb=np.zeros(shape, np.float32)))
    with pytest.raises(ValueError, match=r"\['base_0_rgb'\] has shape"):
      model.preprocess(bad)
  with pytest.raises(ValueError, match='state'):
    model.preprocess(dict(obs, state=np.zeros((B, A + 1))))
  bad_tokens = obs['tokenized_prompt'].copy()
  bad_tokens[0, 0] = 64
  with pytest.raises(ValueError, match='vocab_size=64'):
    model.preprocess(dict(obs, tokenized_prompt=bad_tokens))
  with pytest.raises(ValueError, match='actions have shape'):
    model.compute_loss(jax.random.key(0), obs, actions[..., :-1])
  with pytest.raises(ValueError, match='Unknown Gemma variant'):
    build_model(dict(TINY, paligemma_variant='nope'), nnx.Rngs(0))
  with pytest.raises(ValueError, match='energy_mode'):
    build_model(dict(TINY, energy_mode='both'), nnx.Rngs(0))
  # The model config is taken whole: unknown and missing keys are errors.
  with pytest.raises(ValueError, match=r"unknown keys \['use_energy_loss'\]"):
    build_model(dict(TINY, use_energy_loss=True), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"missing keys \['energy_tau'\]"):
    build_model({k: v for k, v in TINY.items() if k != 'energy_tau'}, nnx.Rngs(0))


def test_camera_with_only_a_mask_is_absent(model, obs):
  absent = KEYS[2]
  images = {k: v for k, v in obs['image'].items() if k != absent}
  masks = dict(obs.get('image_mask') or {}, **{absent: np.zeros(B, bool)})
  got = model.preprocess(dict(obs, image=images, image_mask=masks))
  size = model.image_size
  np.testing.assert_array_equal(got['image'][absent],
                                np.full((B, size, size, 3), -1.0, np.float32))
  assert not np.asarray(got['image_mask'][absent]).any()
  # Same prefix as shipping the black image itself.
  black = dict(obs['image'], **{absent: np.zeros((B, size, size, 3), np.uint8)})
  want = model.preprocess(dict(obs, image=black, image_mask=masks))
  for key in KEYS:
    np.testing.assert_array_equal(got['image'][key], want['image'][key])


def test_other_image_sizes_are_resized_with_pad_like_the_host(model, obs):
  # Reference: the loader's host path (PIL bilinear, then [-1, 1]).
  from pipeline.data import transforms  # pylint: disable=g-import-not-at-top
  size = model.image_size
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (B, 2 * size, 3 * size, 3), dtype=np.uint8)
  got = np.asarray(model.preprocess(
      dict(obs, image=dict(obs['image'], base_0_rgb=wide)))['image']['base_0_rgb'])
  want = np.stack([transforms.resize_with_pad(x, size, size) for x in wide])
  want = want.astype(np.float32) / 255 * 2 - 1
  assert got.shape == (B, size, size, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1.01 * 2 / 255)
  # The 3:2 image fills the width; the rows above and below are black.
  scaled_h = int(2 * size / 3)
  top = (size - scaled_h) // 2
  assert (got[:, :top] == -1).all() and (got[:, top + scaled_h:] == -1).all()
  assert (got[:, top:top + scaled_h] > -1).any()


def test_long_prompt_is_truncated_with_warning(model, obs, caplog):
  long = dict(obs)
  long['tokenized_prompt'] = np.concatenate(
      [obs['tokenized_prompt'], np.full((B, 3), 5, np.int32)], 1)
  long['tokenized_prompt_mask'] = np.concatenate(
      [obs['tokenized_prompt_mask'], np.ones((B, 3), bool)], 1)
  with caplog.at_level('WARNING'):
    checked = model.preprocess(long)
  assert 'truncating' in caplog.text
  np.testing.assert_array_equal(np.asarray(checked['tokenized_prompt']),
                                obs['tokenized_prompt'])


def test_bfloat16_compute_keeps_f32_params(obs, actions):
  cfg = dict(TINY, dtype='bfloat16', energy_mode='off')
  m = fast_build(cfg, seed=1)
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  out, _ = nnx.eval_shape(lambda m: m.encode_prefix(obs), m)
  assert out.dtype == jnp.bfloat16
  assert m.energy is None
  loss = compute_loss(m, jax.random.key(0), obs, actions)
  assert loss.dtype == jnp.float32 and np.isfinite(np.asarray(loss)).all()
