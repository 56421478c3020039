"""Tests for the energy head: pairwise scoring, masking, InfoNCE, refinement."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pipeline.models import energy as energy_lib
from pipeline.models import energy_layers

# Small, mutually coprime sizes so that shape checks on the jaxpr can tell a
# context repeated per pair (B*B*S*head_dim elements) from legal tensors.
B, S, H, A = 3, 7, 5, 8
CONTEXT_DIM, ACT_DIM = 12, 3
HIDDEN, HEADS, LAYERS = 32, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _make_model(seed=0, **kwargs):
  params = dict(hidden=HIDDEN, heads=HEADS, num_layers=LAYERS, horizon=H)
  params.update(kwargs)
  return energy_lib.EnergyModel(
    CONTEXT_DIM, ACT_DIM, rngs=nnx.Rngs(seed), **params
  )


@pytest.fixture(scope="module")
def model():
  return _make_model()


@pytest.fixture(scope="module")
def fns(model):
  """(state, jitted __call__, jitted pairwise), each taking state first."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def call(state, context, mask, actions):
    return nnx.merge(graphdef, state)(context, mask, actions)

  @jax.jit
  def pairwise(state, context, mask, actions):
    return nnx.merge(graphdef, state).pairwise(context, mask, actions)

  return state, call, pairwise


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  context = rng.normal(size=(B, S, CONTEXT_DIM)).astype(np.float32)
  # Row 0 full, row 1 partly padded, row 2 with no valid token at all.
  lengths = np.array([S, 3, 0])
  mask = np.arange(S)[None, :] < lengths[:, None]
  actions = rng.normal(size=(B, H, A)).astype(np.float32)
  return jnp.asarray(context), jnp.asarray(mask), jnp.asarray(actions)


def test_pairwise_matches_per_pair_calls(fns, inputs):
  state, call, pairwise = fns
  context, mask, actions = inputs
  got = np.asarray(pairwise(state, context, mask, actions))
  assert got.shape == (B, B) and got.dtype == np.float32
  want = np.zeros((B, B), np.float32)
  for i in range(B):
    for j in range(B):
      want[i, j] = call(
        state, context[i : i + 1], mask[i : i + 1], actions[j : j + 1]
      )[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The matched-pair call is the diagonal.
  np.testing.assert_allclose(
    np.asarray(call(state, context, mask, actions)),
    np.diagonal(got),
    rtol=1e-5,
    atol=1e-5,
  )


def test_pairwise_accepts_other_action_batch(fns, inputs):
  state, _, pairwise = fns
  context, mask, actions = inputs
  got = np.asarray(pairwise(state, context, mask, actions[:2]))
  assert got.shape == (B, 2)
  full = np.asarray(pairwise(state, context, mask, actions))
  np.testing.assert_allclose(got, full[:, :2], rtol=1e-5, atol=1e-5)


def _all_shapes(jaxpr):
  """Shapes of every value produced anywhere in a (nested) jaxpr."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes.extend(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes.extend(_all_shapes(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes.extend(_all_shapes(sub))
  return shapes


def test_pairwise_never_repeats_context(model, inputs):
  graphdef, state = nnx.split(model)
  context, mask, actions = inputs

  def pairwise(state, context, mask, actions):
    return nnx.merge(graphdef, state).pairwise(context, mask, actions)

  jaxpr = jax.make_jaxpr(pairwise)(state, context, mask, actions).jaxpr
  forbidden = B * B * S * HEAD_DIM
  offenders = [s for s in _all_shapes(jaxpr) if s and np.prod(s) % forbidden == 0]
  assert not offenders, f"per-pair context tensors: {offenders}"
  # The context encoder sees each token once: its widest activation is
  # [B, S, MLP_RATIO * hidden], never with a second batch dim.
  assert (B, S, energy_layers.MLP_RATIO * HIDDEN) in _all_shapes(jaxpr)


@pytest.fixture(scope="module")
def chunked_fns(model):
  """Jitted (energies, InfoNCE gradients) of pairwise at a given pair_chunk."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=0)
  def run(pair_chunk, state, context, mask, actions, dropout_key=None):
    def loss(state, context):
      energies = nnx.merge(graphdef, state).pairwise(
        context, mask, actions, rngs=dropout_key, pair_chunk=pair_chunk
      )
      return energy_lib.infonce(energies, 0.5)[0], energies

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(state, context)

  return state, run


def test_chunked_pairwise_matches_per_pair_calls(fns, chunked_fns, inputs):
  # One context per chunk (a loop of 3 checkpointed chunks) vs one chunk.
  _, call, _ = fns
  state, run = chunked_fns
  context, mask, actions = inputs
  grads, got = run(1, state, context, mask, actions)
  want = np.array([
    [float(call(state, context[i : i + 1], mask[i : i + 1],
                actions[j : j + 1])[0]) for j in range(B)]
    for i in range(B)
  ])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  want_grads, want_energies = run(B, state, context, mask, actions)
  np.testing.assert_allclose(got, want_energies, rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-6)


def test_chunked_pairwise_with_dropout(inputs):
  model = _make_model(dropout=0.5)
  context, mask, actions = inputs

  @jax.jit
  def run(key):
    return model.pairwise(context, mask, actions, rngs=key, pair_chunk=1)

  first, again, other = map(
    np.asarray, (run(jax.random.key(0)), run(jax.random.key(0)),
                 run(jax.random.key(1)))
  )
  assert np.all(np.isfinite(first))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_pair_chunk_choice(model, monkeypatch):
  # Full-size head (abstract, nothing allocated): B=32 contexts, 816 prefix
  # tokens, horizon 50 -> several equal chunks.
  full = nnx.eval_shape(
    lambda: energy_lib.EnergyModel(2048, 7, rngs=nnx.Rngs(0))
  )
  chunk = full.pair_chunk(32, 32 * 50, 816)
  assert 32 % chunk == 0 and 32 // chunk >= 4
  assert chunk * 32 * 50 * 8 * 816 <= energy_lib._PAIR_CHUNK_ELEMENTS
  # Small inputs fit one chunk; a prime batch falls back to a divisor.
  assert model.pair_chunk(B, B * H, S) == B
  bound = 2 * B * H * energy_layers.MLP_RATIO * HIDDEN  # two contexts' head activations
  monkeypatch.setattr(energy_lib, "_PAIR_CHUNK_ELEMENTS", bound)
  assert model.pair_chunk(4, B * H, S) == 2
  assert model.pair_chunk(B, B * H, S) == 1


def test_chunked_pairwise_holds_one_chunk_of_logits(model, inputs):
  graphdef, state = nnx.split(model)
  context, mask, actions = inputs

  def pairwise(state, context):
    return nnx.merge(graphdef, state).pairwise(
      context, mask, actions, pair_chunk=1
    )

  shapes = _all_shapes(jax.make_jaxpr(pairwise)(state, context).jaxpr)
  assert (1, HEADS, B * H, S) in shapes  # attention logits of one chunk
  assert (B, HEADS, B * H, S) not in shapes


def test_bad_pair_chunk(model, inputs):
  context, mask, actions = inputs
  with pytest.raises(ValueError, match="pair_chunk"):
    model.pairwise(context, mask, actions, pair_chunk=0)
  with pytest.raises(ValueError, match="pair_chunk 2 must divide"):
    model.pairwise(context, mask, actions, pair_chunk=2)


def test_padded_context_has_no_influence(fns, inputs):
  state, call, pairwise = fns
  context, mask, actions = inputs
  noise = 1e3 * jax.random.normal(jax.random.key(1), context.shape)
  changed = jnp.where(mask[..., None], context, noise)
  with_nan = jnp.where(mask[..., None], context, jnp.nan)
  base = pairwise(state, context, mask, actions)
  assert np.all(np.isfinite(np.asarray(base))), "all-masked row must be finite"
  for other in (changed, with_nan):
    np.testing.assert_array_equal(
      np.asarray(pairwise(state, other, mask, actions)), np.asarray(base)
    )
    np.testing.assert_array_equal(
      np.asarray(call(state, other, mask, actions)),
      np.asarray(call(state, context, mask, actions)),
    )


def test_valid_context_does_matter(fns, inputs):
  # Guards against a mask that hides everything (e.g. inverted polarity).
  state, _, pairwise = fns
  context, mask, actions = inputs
  shifted = context.at[:, 0].add(1.0)
  diff = np.abs(
    np.asarray(pairwise(state, shifted, mask, actions))
    - np.asarray(pairwise(state, context, mask, actions))
  )
  assert diff[:2].min() > 0  # rows with valid token 0
  assert diff[2].max() == 0  # fully padded row


def test_gradients_finite_with_fully_padded_row(model, inputs):
  graphdef, state = nnx.split(model)
  context, mask, actions = inputs

  @jax.jit
  def loss(state, context):
    energies = nnx.merge(graphdef, state).pairwise(context, mask, actions)
    return energy_lib.infonce(energies, 0.5)[0]

  grads = jax.grad(loss, argnums=(0, 1))(state, context)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # No gradient flows into padded tokens.
  context_grad = np.asarray(grads[1])
  assert np.all(context_grad[~np.asarray(mask)] == 0)


def test_low_precision_context_matches_f32(fns, inputs):
  state, call, _ = fns
  context, mask, actions = inputs
  low = context.astype(jnp.bfloat16)
  low_actions = actions.astype(jnp.bfloat16)
  got = call(state, low, mask, low_actions)
  want = call(
    state, low.astype(jnp.float32), mask, low_actions.astype(jnp.float32)
  )
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_compute_stays_close_and_masked(fns, inputs):
  # Same weights computed in bf16 (as Pi0 may configure the head).
  state, _, pairwise_f32 = fns
  context, mask, actions = inputs
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: _make_model(dtype=jnp.bfloat16))
  )

  @jax.jit
  def pairwise(state, context):
    return nnx.merge(graphdef, state).pairwise(context, mask, actions)

  got = pairwise(state, context)
  assert got.dtype == jnp.float32
  want = pairwise_f32(state, context, mask, actions)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.1)
  noisy = jnp.where(mask[..., None], context, 1e4)
  np.testing.assert_array_equal(np.asarray(pairwise(state, noisy)), np.asarray(got))


def test_extra_action_dims_are_ignored(fns, inputs):
  state, call, _ = fns
  context, mask, actions = inputs
  other = actions.at[..., ACT_DIM:].set(123.0)
  np.testing.assert_array_equal(
    np.asarray(call(state, context, mask, other)),
    np.asarray(call(state, context, mask, actions)),
  )


def test_state_holds_only_params_and_dropout_uses_call_rngs(inputs):
  model = _make_model(dropout=0.5)
  assert not nnx.state(model, nnx.Not(nnx.Param))
  graphdef, state = nnx.split(model)
  no_dropout_graphdef = nnx.graphdef(nnx.eval_shape(_make_model))
  context, mask, actions = inputs

  @jax.jit
  def run(state):
    with_dropout = nnx.merge(graphdef, state)
    without = nnx.merge(no_dropout_graphdef, state)
    return (
      with_dropout(context, mask, actions, rngs=jax.random.key(0)),
      with_dropout(context, mask, actions, rngs=jax.random.key(1)),
      with_dropout(context, mask, actions, rngs=nnx.Rngs(dropout=0)),
      with_dropout(context, mask, actions),
      without(context, mask, actions),
    )

  key0, key1, rngs0, no_rngs, rate0 = map(np.asarray, run(state))
  assert not np.allclose(key0, key1)
  # A key and Rngs seeded alike give the same masks.
  np.testing.assert_array_equal(key0, rngs0)
  # Without rngs dropout is off: equal to the same weights at rate 0.
  np.testing.assert_array_equal(no_rngs, rate0)


def test_bad_inputs_name_the_problem(model, inputs):
  context, mask, actions = inputs
  with pytest.raises(ValueError, match="context"):
    model(context[..., :-1], mask, actions)
  with pytest.raises(ValueError, match="context_mask"):
    model(context, mask[:, :-1], actions)
  with pytest.raises(ValueError, match="actions"):
    model(context, mask, actions[..., :2])
  with pytest.raises(ValueError, match="equal batches"):
    model(context, mask, actions[:2])
  with pytest.raises(ValueError, match="horizon"):
    model(context, mask, jnp.concatenate([actions, actions], axis=1))
  with pytest.raises(ValueError, match="energy_heads"):
    energy_lib.EnergyModel(4, 2, hidden=30, heads=4, rngs=nnx.Rngs(0))


# -- InfoNCE -----------------------------------------------------------------


def _infonce_numpy(energies, tau):
  logits = -energies.astype(np.float64) / tau
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  n = len(energies)
  off = ~np.eye(n, dtype=bool)
  return -np.mean(np.diag(log_probs)), {
    "E_pos": np.mean(np.diag(energies)),
    "E_neg": np.mean(energies[off]),
    "accuracy": np.mean(np.argmin(energies, axis=1) == np.arange(n)),
  }


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_infonce_matches_numpy(scale):
  rng = np.random.default_rng(3)
  energies = (scale * rng.normal(size=(6, 6))).astype(np.float32)
  # Make a few rows correct so accuracy is neither 0 nor 1.
  energies[[0, 2, 3], [0, 2, 3]] -= 3 * scale
  loss, metrics = jax.jit(energy_lib.infonce, static_argnums=1)(energies, 0.5)
  want_loss, want_metrics = _infonce_numpy(energies, 0.5)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  for key, value in want_metrics.items():
    np.testing.assert_allclose(
      float(metrics[key]), value, rtol=1e-5, atol=1e-6 * scale, err_msg=key
    )
  assert 0 < float(metrics["accuracy"]) < 1


# -- Training a toy head and refining with it --------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _toy_batch(key, batch):
  """Context tokens encode a latent z; actions are a fixed function of z."""
  z_key, pad_key, noise_key, junk_key = jax.random.split(key, 4)
  z = jax.random.normal(z_key, (batch, ACT_DIM))
  proj = jax.random.normal(jax.random.key(100), (S, ACT_DIM, CONTEXT_DIM))
  context = jnp.einsum("bz,szc->bsc", z, proj)
  lengths = jax.random.randint(pad_key, (batch,), 2, S + 1)
  mask = jnp.arange(S)[None, :] < lengths[:, None]
  # Padded tokens carry garbage that must be ignored.
  context = jnp.where(mask[..., None], context, 50.0)
  mix = jax.random.normal(jax.random.key(101), (H, ACT_DIM, ACT_DIM))
  actions = jnp.tanh(jnp.einsum("bz,hzk->bhk", z, mix))
  actions = actions + 0.05 * jax.random.normal(noise_key, actions.shape)
  junk = jax.random.normal(junk_key, (batch, H, A - ACT_DIM))
  return context, mask, jnp.concatenate([actions, junk], axis=-1)


TRAIN_BATCH, TRAIN_STEPS, TAU = 16, 400, 0.5


@pytest.fixture(scope="module")
def trained():
  model = _make_model(seed=1)
  graphdef, state = nnx.split(model)
  optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, TRAIN_STEPS, 0.1))

  def loss_fn(state, key):
    context, mask, actions = _toy_batch(key, TRAIN_BATCH)
    energies = nnx.merge(graphdef, state).pairwise(context, mask, actions)
    return energy_lib.infonce(energies, TAU)[0]

  @jax.jit
  def train(state, key):
    def step(carry, key):
      state, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(state, key)
      updates, opt_state = optimizer.update(grads, opt_state, state)
      return (optax.apply_updates(state, updates), opt_state), loss

    keys = jax.random.split(key, TRAIN_STEPS)
    (state, _), losses = jax.lax.scan(step, (state, optimizer.init(state)), keys)
    return state, losses

  state, losses = train(state, jax.random.key(0))
  return graphdef, state, np.asarray(losses)


def test_toy_head_learns_mapping(trained):
  graphdef, state, losses = trained
  assert losses[-20:].mean() < 0.5 * losses[:20].mean()

  @jax.jit
  def evaluate(state, key):
    context, mask, actions = _toy_batch(key, TRAIN_BATCH)
    energies = nnx.merge(graphdef, state).pairwise(context, mask, actions)
    return energy_lib.infonce(energies, TAU)

  # Fresh batches (chance accuracy is 1/16).
  results = [evaluate(state, jax.random.key(12345 + k))[1] for k in range(4)]
  accuracy = np.mean([float(m["accuracy"]) for m in results])
  assert accuracy > 0.8, results
  for m in results:
    assert float(m["E_pos"]) < float(m["E_neg"]), m


REFINE_STEPS = 5


@pytest.fixture(scope="module")
def refined(trained):
  graphdef, state, _ = trained
  context, mask, actions = _toy_batch(jax.random.key(7), 8)
  # Start away from the data so there is something to fix.
  start = actions + 0.3 * jax.random.normal(jax.random.key(8), actions.shape)

  @jax.jit
  def run(state, start, step_size, max_step):
    model = nnx.merge(graphdef, state)
    out = energy_lib.refine(
      model, context, mask, start,
      steps=REFINE_STEPS, step_size=step_size, max_step=max_step,
    )
    return out, model(context, mask, start), model(context, mask, out)

  return start, run, state


def test_refine_lowers_energy_and_keeps_other_dims(refined):
  start, run, state = refined
  out, e_before, e_after = run(state, start, 0.02, 10.0)
  assert out.shape == start.shape and out.dtype == start.dtype
  assert np.all(np.asarray(e_after) < np.asarray(e_before)), (e_before, e_after)
  np.testing.assert_array_equal(
    np.asarray(out[..., ACT_DIM:]), np.asarray(start[..., ACT_DIM:])
  )
  assert np.any(np.asarray(out[..., :ACT_DIM]) != np.asarray(start[..., :ACT_DIM]))


def test_refine_respects_max_step(refined):
  start, run, state = refined
  max_step = 1e-3
  # A huge step size makes the clip active on every step.
  out, _, _ = run(state, start, 1e3, max_step)
  moved = np.asarray(out - start)[..., :ACT_DIM]
  norms = np.sqrt((moved.astype(np.float64) ** 2).sum(axis=(1, 2)))
  assert np.all(norms <= REFINE_STEPS * max_step * (1 + 1e-4)), norms
  assert np.all(norms > 0.5 * max_step), norms


def test_refine_zero_steps_is_identity(trained):
  graphdef, state, _ = trained
  context, mask, actions = _toy_batch(jax.random.key(9), 8)
  out = energy_lib.refine(
    nnx.merge(graphdef, state), context, mask, actions,
    steps=0, step_size=1.0, max_step=1.0,
  )
  assert out is actions
