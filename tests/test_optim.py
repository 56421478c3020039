"""Freeze labels, optimizer (vs a numpy AdamW), schedules, EMA and the train step's update rules."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import energy_only
from pipeline import optim
from pipeline import trainer as trainer_lib
from tests import train_fakes

PARAMS = {"PaliGemma": {"img": {"w": np.ones((3, 2), np.float32)},
                        "llm": {"layers": {0: {"w": np.ones(4, np.float32)}}}},
          "energy": {"head": {"kernel": np.ones((2, 2), np.float32)}}}


def _cfg(**kw):
  c = energy_only.get_config("smoke").optim
  for k, v in kw.items():
    c[k] = v
  return c


def test_trainable_mask_regexes():
  m = optim.trainable_mask(PARAMS, ["energy/.*"])
  assert m == {"PaliGemma": {"img": {"w": False}, "llm": {"layers": {0: {"w": False}}}},
               "energy": {"head": {"kernel": True}}}
  m = optim.trainable_mask(PARAMS, [".*"], ["PaliGemma/img/.*"])
  assert not m["PaliGemma"]["img"]["w"] and m["PaliGemma"]["llm"]["layers"][0]["w"]
  # Integer keys (nnx.List) match as their decimal string.
  m = optim.trainable_mask(PARAMS, ["PaliGemma/llm/layers/0/w"])
  assert m["PaliGemma"]["llm"]["layers"][0]["w"] and not m["energy"]["head"]["kernel"]
  # re.fullmatch: a prefix alone does not match.
  with pytest.raises(ValueError, match="leave no trainable parameter"):
    optim.trainable_mask(PARAMS, ["energy"])


def test_split_merge_roundtrip():
  mask = optim.trainable_mask(PARAMS, ["energy/.*"])
  tr, fr = optim.split(PARAMS, mask)
  assert list(tr) == ["energy"] and list(fr) == ["PaliGemma"]
  assert jax.tree.structure(optim.merge(tr, fr)) == jax.tree.structure(PARAMS)
  with pytest.raises(ValueError, match="energy/head/kernel present in both"):
    optim.merge(tr, tr)


def test_warmup_cosine_matches_openpi_formula():
  c = _cfg(schedule="warmup_cosine", peak_lr=2.5e-5, warmup_steps=1000, decay_steps=30000,
           end_lr=2.5e-6)
  sched = optim.make_schedule(c)

  def ref(step):  # independent re-statement of openpi's CosineDecaySchedule
    init = c.peak_lr / (c.warmup_steps + 1)
    if step < c.warmup_steps:
      return init + (c.peak_lr - init) * step / c.warmup_steps
    span = c.decay_steps - c.warmup_steps
    t = min(step - c.warmup_steps, span) / span
    return c.end_lr + (c.peak_lr - c.end_lr) * 0.5 * (1 + math.cos(math.pi * t))

  for step in [0, 1, 500, 999, 1000, 1001, 15000, 29999, 30000, 40000]:
    np.testing.assert_allclose(float(sched(step)), ref(step), rtol=1e-5, atol=1e-12)
  constant = optim.make_schedule(_cfg(schedule="constant", peak_lr=0.3))
  assert float(constant(123)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="config.optim.schedule='linear'"):
    optim.make_schedule(_cfg(schedule="linear"))


def test_adamw_clip_matches_numpy_and_frozen_has_no_state():
  c = _cfg(schedule="constant", peak_lr=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01,
           clip_norm=1.0)
  mask = optim.trainable_mask(PARAMS, [".*"], ["PaliGemma/img/.*"])
  tx = optim.make_optimizer(c, optim.labels(mask))
  params = jax.tree.map(jnp.asarray, PARAMS)
  state = tx.init(params)
  # Adam mu/nu exist only for the 2 trainable leaves (+ scalar counts).
  arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert sorted(x.shape for x in arrays) == [(2, 2), (2, 2), (4,), (4,)]

  rng = np.random.default_rng(0)
  grads_np = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 3, PARAMS)
  flat_p = {"/".join(map(str, k)): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(PARAMS).items()}
  flat_g = {"/".join(map(str, k)): np.asarray(v, np.float64)
            for k, v in traverse_util.flatten_dict(grads_np).items()}
  trainable = [k for k in flat_p if not k.startswith("PaliGemma/img")]
  m = {k: 0.0 for k in trainable}
  v = {k: 0.0 for k in trainable}
  grads = jax.tree.map(jnp.asarray, grads_np)
  for t in range(1, 3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    gnorm = math.sqrt(sum(np.sum(flat_g[k] ** 2) for k in trainable))
    scale = min(1.0, c.clip_norm / gnorm)
    for k in trainable:
      g = flat_g[k] * scale
      m[k] = c.b1 * m[k] + (1 - c.b1) * g
      v[k] = c.b2 * v[k] + (1 - c.b2) * g * g
      mhat, vhat = m[k] / (1 - c.b1**t), v[k] / (1 - c.b2**t)
      step = mhat / (np.sqrt(vhat) + c.eps) + c.weight_decay * flat_p[k]
      flat_p[k] = flat_p[k] - c.peak_lr * step
  got = {"/".join(map(str, k)): np.asarray(v)
         for k, v in traverse_util.flatten_dict(params).items()}
  for k in flat_p:
    np.testing.assert_allclose(got[k], flat_p[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(got["PaliGemma/img/w"], PARAMS["PaliGemma"]["img"]["w"])


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0])}
  new = {"a": jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(optim.ema_update(ema, new, 0.9)["a"], [1.2, 2.4], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_step():
  c = energy_only.get_config("smoke")
  c.optim.schedule = "constant"
  c.optim.peak_lr = 0.05
  c.optim.ema_decay = 0.5
  parts = trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)
  params = parts.init(jax.random.key(0))
  mask = trainer_lib.trainable_mask(c, params)
  sched = optim.make_schedule(c.optim)
  tx = optim.make_optimizer(c.optim, optim.labels(mask), sched)
  step_fn = trainer_lib.make_train_step(parts, tx, mask, sched, c.optim.ema_decay)
  init = trainer_lib.make_init_state_fn(tx, mask, c.optim.ema_decay, seed=0)
  return dict(parts=parts, params=params, mask=mask, step=jax.jit(step_fn), raw_step=step_fn,
              init=init)


def test_step_freezes_and_updates(tiny_step):
  t = tiny_step
  state0 = t["init"](t["params"])
  before = jax.device_get(state0.params)
  state = state0
  b = jax.tree.map(jnp.asarray, train_fakes.batch())
  ema_ref = jax.device_get(optim.split(before, t["mask"])[0])
  losses = []
  for _ in range(4):
    state, m = t["step"](state, b)
    losses.append(float(m["loss"]))
    tr = jax.device_get(optim.split(state.params, t["mask"])[0])
    ema_ref = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema_ref, tr)
  after = jax.device_get(state.params)
  # Frozen (non-energy) leaves are bit-identical; trainable ones moved; loss fell.
  for k, v in traverse_util.flatten_dict(before).items():
    same = np.array_equal(v, traverse_util.flatten_dict(after)[k])
    assert same == (k[0] != "energy"), k
  assert losses[-1] < losses[0]
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema), ema_ref)
  assert int(state.step) == 4 and int(state.bad_steps) == 0


def test_grads_only_for_trainable(tiny_step):
  t = tiny_step
  tr, fr = optim.split(t["params"], t["mask"])
  b = jax.tree.map(jnp.asarray, train_fakes.batch())
  (_, _), grads = jax.eval_shape(functools.partial(trainer_lib.loss_and_grads, t["parts"]),
                                 tr, fr, jax.random.key(0), b)
  paths = ["/".join(map(str, k)) for k in traverse_util.flatten_dict(grads)]
  assert paths and all(p.startswith("energy/") for p in paths), paths
  # Lowered step: 4 forward matmuls + 1 for the head kernel's gradient. The gradient w.r.t. the
  # head's input (and everything behind it) is never formed. Training everything needs dW and dx
  # for head and the 2 layers, and dW for the embedding: 4 + 2 * 3 + 1.
  state = t["init"](t["params"])
  text = jax.jit(t["raw_step"]).lower(state, b).as_text()
  assert text.count("dot_general") == 4 + 1
  c = energy_only.get_config("smoke").optim
  all_mask = optim.trainable_mask(t["params"], [".*"])
  tx = optim.make_optimizer(c, optim.labels(all_mask))
  full_step = trainer_lib.make_train_step(t["parts"], tx, all_mask, optim.make_schedule(c), 0.0)
  full_state = trainer_lib.make_init_state_fn(tx, all_mask, 0.0, seed=0)(t["params"])
  assert jax.jit(full_step).lower(full_state, b).as_text().count("dot_general") == 4 + 2 * 3 + 1


def test_non_finite_step_is_skipped(tiny_step):
  t = tiny_step
  state = t["init"](t["params"])
  good = jax.tree.map(jnp.asarray, train_fakes.batch())
  state, _ = t["step"](state, good)
  snapshot = jax.device_get(state)
  bad = dict(good, x=good["x"].at[0, 0].set(jnp.nan))
  state, m = t["step"](state, bad)
  assert float(m["bad_step"]) == 1.0 and int(state.bad_steps) == 1
  state, m = t["step"](state, bad)
  assert int(state.bad_steps) == 2 and int(state.step) == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(snapshot.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.opt_state)),
                  jax.tree.leaves(snapshot.opt_state)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.ema)), jax.tree.leaves(snapshot.ema)):
    np.testing.assert_array_equal(a, b)
  state, m = t["step"](state, good)
  assert int(state.bad_steps) == 0 and float(m["bad_step"]) == 0.0


def test_logged_lr_is_the_applied_one_after_a_skipped_step():
  """A skipped step consumes its batch (state.step) but no schedule step (the optimizer count):
  the logged lr is the rate the next applied update really uses."""
  c = energy_only.get_config("smoke")
  c.optim.update(schedule="warmup_cosine", peak_lr=1e-3, warmup_steps=20, decay_steps=100,
                 ema_decay=0.0)
  parts = trainer_lib.ModelParts(train_fakes.model_config(), train_fakes.build_tiny)
  params = parts.init(jax.random.key(0))
  mask = trainer_lib.trainable_mask(c, params)
  sched = optim.make_schedule(c.optim)
  tx = optim.make_optimizer(c.optim, optim.labels(mask), sched)
  step = jax.jit(trainer_lib.make_train_step(parts, tx, mask, sched, 0.0))
  state = trainer_lib.make_init_state_fn(tx, mask, 0.0, seed=0)(params)
  good = jax.tree.map(jnp.asarray, train_fakes.batch())
  bad = dict(good, x=good["x"].at[0, 0].set(jnp.nan))
  applied = 0
  for batch in (good, bad, bad, good, good):
    # Independent reference: optax's schedule formula at the number of updates applied so far,
    # and Adam's own count in the optimizer state.
    adam_count = [v for path, v in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
                  if path[-1].tuple_name == "ScaleByAdamState"]
    assert [int(x) for x in adam_count] == [applied]
    want = optax.warmup_cosine_decay_schedule(1e-3 / 21, 1e-3, 20, 100, c.optim.end_lr)(applied)
    state, m = step(state, batch)
    np.testing.assert_allclose(float(m["lr"]), float(want), rtol=1e-6)
    applied += int(m["bad_step"] == 0)
  assert int(state.step) == 5 and applied == 3
  assert int(optim.applied_updates(state.opt_state)) == 3
