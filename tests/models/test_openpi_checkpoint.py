"""openpi params reader on a checkpoint written in openpi's on-disk layout."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import common
from pipeline.models import build_model
from pipeline.models.openpi_checkpoint import checkpoint_param_shapes
from pipeline.models.openpi_checkpoint import restore_openpi_params

TINY = dict(
    common.model_config().to_dict(), paligemma_variant='tiny', action_expert_variant='tiny_small',
    vision_variant='tiny', image_size=16, action_dim=8, action_horizon=4,
    max_token_len=6, vocab_size=64, dtype='float32', energy_mode='monitor',
    energy_hidden=16, energy_heads=2, energy_layers=1, energy_act_dim=3)


def _flat(tree):
  return {'/'.join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def abstract():
  """Abstract pure-dict params of the tiny model (no allocation)."""
  model = nnx.eval_shape(lambda: build_model(TINY, nnx.Rngs(0)))
  return nnx.state(model, nnx.Param).to_pure_dict()


@pytest.fixture(scope='module')
def saved(tmp_path_factory, abstract):
  """openpi layout: <step>/params with {'params': {<path>: {'value': x}}}."""
  rng = np.random.RandomState(0)
  no_energy = {k: v for k, v in abstract.items() if k != 'energy'}
  values = jax.tree.map(
      lambda s: rng.randn(*s.shape).astype(np.float32), no_energy)
  step_dir = tmp_path_factory.mktemp('ckpt') / '1000'
  ocp.PyTreeCheckpointer().save(
      step_dir / 'params',
      {'params': jax.tree.map(lambda x: {'value': x}, values)})
  return step_dir, values


def _mesh():
  return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ('data', 'fsdp'))


def test_restore_into_sharding_and_dtype(saved, abstract):
  step_dir, values = saved
  mesh = _mesh()
  target = {k: v for k, v in abstract.items() if k != 'energy'}

  def spec(path, s):
    # Shard dim 0 over fsdp where it divides; replicate otherwise.
    if s.ndim and s.shape[0] % 2 == 0:
      return NamedSharding(mesh, P('fsdp'))
    return NamedSharding(mesh, P())

  target = jax.tree_util.tree_map_with_path(
      lambda p, s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                        sharding=spec(p, s)), target)
  restored = restore_openpi_params(step_dir, target=target,
                                   dtype=jnp.bfloat16)
  got, want, tgt = _flat(restored), _flat(values), _flat(target)
  assert set(got) == set(want)
  for k, arr in got.items():
    assert arr.dtype == jnp.bfloat16, k
    assert arr.sharding == tgt[k].sharding, k
    np.testing.assert_array_equal(
        np.asarray(arr.astype(jnp.float32)),
        np.asarray(jnp.asarray(want[k]).astype(jnp.bfloat16)
                   .astype(jnp.float32)))


def test_metadata_listing(saved):
  step_dir, values = saved
  shapes = checkpoint_param_shapes(step_dir / 'params')
  assert shapes == {k: (v.shape, np.dtype(np.float32))
                    for k, v in _flat(values).items()}


def test_restore_without_target_replicates(saved):
  step_dir, values = saved
  restored = restore_openpi_params(step_dir)
  got = _flat(restored)
  k = 'PaliGemma/llm/layers/mlp/linear'
  assert got[k].dtype == jnp.float32
  assert got[k].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(got[k]), _flat(values)[k])


def test_missing_energy_is_an_error_unless_allowed(saved, abstract):
  step_dir, _ = saved
  with pytest.raises(ValueError, match=r'missing from the checkpoint: energy/'):
    restore_openpi_params(step_dir, target=abstract)
  restored = restore_openpi_params(step_dir, target=abstract,
                                   missing_ok=r'^energy/')
  assert 'energy' not in restored
  assert 'PaliGemma' in restored


def test_extra_and_mismatched_parameters_are_named(saved, abstract):
  step_dir, _ = saved
  target = {k: v for k, v in abstract.items() if k not in ('energy',
                                                            'state_proj')}
  with pytest.raises(ValueError, match='not in the model: state_proj/bias'):
    restore_openpi_params(step_dir, target=target)
  partial = restore_openpi_params(step_dir, target=target, allow_extra=True)
  assert 'state_proj' not in partial and 'action_in_proj' in partial

  bad = dict(target)
  bad['action_out_proj'] = dict(target['action_out_proj'],
                                bias=jax.ShapeDtypeStruct((9,), jnp.float32))
  with pytest.raises(ValueError,
                     match=r'action_out_proj/bias: checkpoint \(8,\) vs '
                     r'model \(9,\)'):
    restore_openpi_params(step_dir, target=bad, allow_extra=True)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError):
    restore_openpi_params(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='_METADATA'):
    restore_openpi_params(tmp_path)
