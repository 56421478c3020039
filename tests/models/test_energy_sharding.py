"""The energy head's pairwise part split over 8 CPU devices: same result, 1/8 of the work each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pipeline import sharding
from pipeline.bench import flops as flops_lib
from pipeline.models import energy as energy_lib

B, S, H, A = 16, 7, 5, 8
CONTEXT_DIM, ACT_DIM = 12, 3


def _model(dropout=0.0):
  return energy_lib.EnergyModel(CONTEXT_DIM, ACT_DIM, hidden=16, heads=2, num_layers=1,
                                horizon=H, dropout=dropout, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  context = rng.normal(size=(B, S, CONTEXT_DIM)).astype(np.float32)
  # Padded rows of every length, one with no valid token at all.
  mask = np.arange(S)[None, :] < (np.arange(B) % (S + 1))[:, None]
  actions = rng.normal(size=(B, H, A)).astype(np.float32)
  return jnp.asarray(context), jnp.asarray(mask), jnp.asarray(actions)


def _step(model, mesh, pair_chunk=None):
  """Jitted (InfoNCE, energies) and gradients w.r.t. params, context and actions on `mesh`
  (batch split over its axes as in training, under it as the context mesh), or on one device
  with no mesh at all."""
  graphdef, state = nnx.split(model)

  def loss(state, context, mask, actions, key):
    energies = nnx.merge(graphdef, state).pairwise(context, mask, actions, rngs=key,
                                                   pair_chunk=pair_chunk)
    return energy_lib.infonce(energies, 0.5)[0], energies

  grad = jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True)
  if mesh is None:
    return state, jax.jit(grad)

  def under_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return grad(*args)

  split, whole = NamedSharding(mesh, P(sharding.DATA_AXES)), NamedSharding(mesh, P())
  return state, jax.jit(under_mesh, in_shardings=(whole, split, split, split, whole))


def _assert_same(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def no_dropout(inputs):
  """{name: (state, compiled step)} without a mesh ('one') and on fsdp=8 (2 contexts each)."""
  model = _model()
  out = {}
  for name, mesh in (("one", None), ("fsdp8", sharding.make_mesh(8))):
    state, fn = _step(model, mesh)
    out[name] = state, fn.lower(state, *inputs, None).compile()
  return out


def test_split_over_devices_matches_one_device(inputs, no_dropout):
  (state, one), (_, eight) = no_dropout["one"], no_dropout["fsdp8"]
  _assert_same(eight(state, *inputs, None), one(state, *inputs, None))


def test_dropout_does_not_depend_on_devices_or_chunks(inputs):
  """Each context draws its own dropout mask: data=2 x fsdp=4 devices in chunks of 1 context
  equal one program in 16 chunks of 1 and one in a single chunk."""
  model = _model(dropout=0.3)
  key = jax.random.key(1)
  state, fn = _step(model, sharding.make_mesh(4), pair_chunk=1)
  got = fn(state, *inputs, key)
  state, fn = _step(model, None)
  _assert_same(got, fn(state, *inputs, key))
  # The dropout is really on: another key changes the energies.
  assert not np.allclose(fn(state, *inputs, jax.random.key(2))[0][1], got[0][1])


def test_each_device_does_an_eighth_of_the_pairwise_work(no_dropout):
  """Per-device dot FLOPs of the head's training on 8 devices: 1/8 of one device's (no
  replicated per-pair part)."""
  one, eight = (flops_lib.hlo_flops(no_dropout[k][1])["flops"] for k in ("one", "fsdp8"))
  assert eight / one <= 0.15, (eight, one)


def test_split_only_with_a_mesh_that_divides_the_batch(inputs):
  model = _model()
  graphdef, state = nnx.split(model)

  def jaxpr(mesh, batch, **kwargs):
    context, mask, actions = (x[:batch] for x in inputs)

    def fn(state):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return nnx.merge(graphdef, state).pairwise(context, mask, actions, **kwargs)

    return str(jax.make_jaxpr(fn)(state))

  mesh = sharding.make_mesh(8)
  assert "shard_map" in jaxpr(mesh, B)
  assert "shard_map" not in jaxpr(mesh, 12)  # 12 contexts on 8 devices: one program
  assert "shard_map" not in jaxpr(sharding.make_mesh(1, devices=jax.devices()[:1]), B)
  assert "shard_map" in jaxpr(sharding.make_mesh(4), 12, batch_axes=("fsdp",))
  with pytest.raises(ValueError, match=r"pair_chunk 4 must divide the batch 2 per device"):
    jaxpr(mesh, B, pair_chunk=4)
  with pytest.raises(ValueError, match=r"batch_axes \['model'\] are not axes"):
    jaxpr(mesh, B, batch_axes=("model",))
