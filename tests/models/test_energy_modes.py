"""Pi0 energy-loss modes: which parameters the energy term reaches.

monitor (default): the energy term is logged only, no parameter gets its
gradient. joint: the head and the prefix expert get it.
energy_only: only the head is trained and the
action expert never runs.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public API

from configs import common
from pipeline import batch as batch_lib
from pipeline.models import build_model
from pipeline.models import gemma
from pipeline.models import pi0

B, ACTION_DIM, HORIZON, TOKENS, IMAGE = 4, 8, 4, 5, 16
BASE_CONFIG = dict(
  common.model_config().to_dict(),
  paligemma_variant="tiny",
  action_expert_variant="tiny_small",
  vision_variant="tiny",
  image_size=IMAGE,
  action_dim=ACTION_DIM,
  action_horizon=HORIZON,
  max_token_len=TOKENS,
  vocab_size=64,
  dtype="float32",
  remat=False,
  energy_mode="monitor",
  energy_hidden=16,
  energy_heads=2,
  energy_layers=1,
  energy_act_dim=3,
  energy_weight=0.1,
)
METRICS = ("flow_loss", "energy_loss", "E_pos", "E_neg", "energy_accuracy")
ENERGY_PARTS = ("context_encoder", "action_encoder", "attention", "head")
PREFIX_Q = "PaliGemma/llm/layers/attn/q_einsum/w"
ACTION_EXPERT_MODULES = (
  "action_in_proj",
  "action_out_proj",
  "state_proj",
  "action_time_mlp_in",
  "action_time_mlp_out",
)


def _graphdef(**flags):
  # eval_shape: the graph only, no eager initialisation ops.
  config = {**BASE_CONFIG, **flags}
  return nnx.graphdef(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))


def _path(keys) -> str:
  # Dict keys only: drops the `.value` attribute of nnx.Param leaves.
  return "/".join(
    str(k.key) for k in keys if not isinstance(k, jax.tree_util.GetAttrKey)
  )


def _is_action_expert(path: str) -> bool:
  parts = path.split("/")
  if parts[0] in ACTION_EXPERT_MODULES:
    return True
  # Second expert of the LLM: names carry the `_1` suffix.
  return parts[:2] == ["PaliGemma", "llm"] and any(
    p.endswith("_1") for p in parts[2:]
  )


def _flat(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path(keys): np.asarray(leaf) for keys, leaf in leaves}


@pytest.fixture(scope="module")
def setup():
  abstract = nnx.eval_shape(lambda: build_model(BASE_CONFIG, nnx.Rngs(0)))
  # Random values drawn on the host: the checks are about gradient paths,
  # and eager initialisation would cost many small compiles.
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape).astype(x.dtype)),
    nnx.state(abstract),
  )
  images = {
    key: rng.uniform(-1, 1, (B, IMAGE, IMAGE, 3)).astype(np.float32)
    for key in batch_lib.CAMERAS
  }
  obs = {
    "image": images,
    "image_mask": {
      "base_0_rgb": np.ones(B, bool),
      "left_wrist_0_rgb": np.array([True, False, True, True]),
      "right_wrist_0_rgb": np.zeros(B, bool),
    },
    "state": rng.normal(size=(B, ACTION_DIM)).astype(np.float32),
    "tokenized_prompt": rng.integers(1, 64, (B, TOKENS)).astype(np.int32),
    "tokenized_prompt_mask": np.arange(TOKENS)[None]
    < np.array([[5], [3], [1], [4]]),
  }
  actions = rng.normal(size=(B, HORIZON, ACTION_DIM)).astype(np.float32)
  return state, obs, actions, jax.random.key(0)


def _jacobians(graphdef, setup, names):
  """Jitted d(metric)/d(params) for each name ('loss' = the training loss)."""
  state, obs, actions, key = setup

  def values(state):
    loss, metrics = nnx.merge(graphdef, state).compute_train_loss(
      key, obs, actions
    )
    metrics = {**metrics, "loss": loss}
    return jnp.stack([metrics[n] for n in names]), metrics

  jac, metrics = jax.jit(jax.jacrev(values, has_aux=True))(state)
  rows = {n: {} for n in names}
  for path, value in _flat(jac).items():
    for i, n in enumerate(names):
      rows[n][path] = value[i]
  return rows, {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def joint(setup):
  return _jacobians(
    _graphdef(energy_mode="joint"), setup, ("loss", "energy_loss", "flow_loss")
  )


@pytest.fixture(scope="module")
def monitor(setup):
  return _jacobians(_graphdef(), setup, ("loss", "energy_loss"))


def _assert_trees_close(got, want):
  # Different compiled graphs round differently; gradients that are zero in
  # exact arithmetic come out as noise, so the scale is the whole tree's.
  atol = 1e-6 * max(np.abs(w).max() for w in want.values())
  for path in want:
    np.testing.assert_allclose(
      got[path], want[path], rtol=1e-4, atol=atol, err_msg=path
    )


def _assert_head_gets_gradient(grads):
  for part in ENERGY_PARTS:
    prefix = f"energy/{part}/"
    biggest = max(np.abs(g).max() for p, g in grads.items() if p.startswith(prefix))
    assert biggest > 0, f"no gradient reaches energy/{part}"


def test_joint_energy_gradient_reaches_head_and_prefix(joint):
  rows, metrics = joint
  energy = rows["energy_loss"]
  _assert_head_gets_gradient(energy)
  assert np.abs(energy[PREFIX_Q]).max() > 0
  # The prefix never attends to the suffix, so the action expert cannot
  # influence the energy.
  for path, grad in energy.items():
    if _is_action_expert(path):
      assert np.all(grad == 0), path
  # loss = flow + w * energy, also for the gradients.
  weight = BASE_CONFIG["energy_weight"]
  np.testing.assert_allclose(
    metrics["loss"],
    metrics["flow_loss"] + weight * metrics["energy_loss"],
    rtol=1e-6,
  )
  _assert_trees_close(
    rows["loss"],
    {p: g + weight * energy[p] for p, g in rows["flow_loss"].items()},
  )
  assert set(METRICS) <= set(metrics)


def test_monitor_energy_term_has_exactly_zero_gradient(monitor, joint):
  rows, metrics = monitor
  for path, grad in rows["energy_loss"].items():
    assert np.all(grad == 0), path
  for path, grad in rows["loss"].items():
    if path.startswith("energy/"):
      assert np.all(grad == 0), path
  # The monitor loss trains exactly like the joint flow term alone.
  joint_rows, joint_metrics = joint
  _assert_trees_close(rows["loss"], joint_rows["flow_loss"])
  # Same statistics are logged as in joint mode.
  for name in METRICS:
    np.testing.assert_allclose(metrics[name], joint_metrics[name], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], metrics["flow_loss"], rtol=1e-6)


@pytest.fixture(scope="module")
def energy_only_graphdef():
  return _graphdef(energy_mode="energy_only")


def test_energy_only_trains_only_the_head(energy_only_graphdef, setup):
  state, obs, actions, key = setup

  def loss_fn(state):
    model = nnx.merge(energy_only_graphdef, state)
    return model.compute_train_loss(key, obs, actions)

  grads, metrics = jax.jit(jax.grad(loss_fn, has_aux=True))(state)
  grads = _flat(grads)
  _assert_head_gets_gradient(grads)
  for path, grad in grads.items():
    if not path.startswith("energy/"):
      assert np.all(grad == 0), path
  assert "flow_loss" not in metrics
  assert set(METRICS) - {"flow_loss"} <= set(metrics)


def test_energy_only_never_runs_action_expert(energy_only_graphdef, setup):
  state, obs, actions, key = setup
  leaves, treedef = jax.tree.flatten(state)
  paths = list(_flat(state))
  suffix_calls, llm_groups = [], []
  real_embed_suffix, real_llm_call = pi0.Pi0.embed_suffix, gemma.Gemma.__call__

  def embed_suffix(self, *args, **kwargs):
    suffix_calls.append(1)
    return real_embed_suffix(self, *args, **kwargs)

  def llm_call(self, embedded, *args, **kwargs):
    llm_groups.append(tuple(x is not None for x in embedded))
    return real_llm_call(self, embedded, *args, **kwargs)

  def loss_fn(*leaves):
    state = jax.tree.unflatten(treedef, leaves)
    model = nnx.merge(energy_only_graphdef, state)
    return model.compute_train_loss(key, obs, actions)[0]

  with (
    mock.patch.object(pi0.Pi0, "embed_suffix", embed_suffix),
    mock.patch.object(gemma.Gemma, "__call__", llm_call),
  ):
    closed = jax.make_jaxpr(jax.jit(loss_fn))(*leaves)
  assert not suffix_calls, "energy-only step embedded the suffix"
  assert llm_groups, "the prefix forward did not run"
  assert all(groups == (True, False) for groups in llm_groups), llm_groups
  # Dependency analysis of the traced step: the loss depends on no
  # action-expert parameter (in particular no expert-1 LLM weight).
  _, used = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  used = dict(zip(paths, used))
  assert [p for p, u in used.items() if u and _is_action_expert(p)] == []
  assert used[PREFIX_Q] and used["energy/head/output_proj/kernel"]
  assert any(_is_action_expert(p) for p in paths)
