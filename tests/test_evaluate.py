"""pipeline.evaluate on a workdir trained for a few steps (tiny smoke model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import energy_only
from pipeline import evaluate
from pipeline import sharding
from pipeline import train
from pipeline import trainer as trainer_lib
from pipeline.data import loader
from tests.data.conftest import prepared_dataset  # pylint: disable=unused-import
from tests.test_train import read_scalars

STEPS = 3


def tiny_config(dataset_dir):
  c = energy_only.get_config("smoke")
  c.batch_size = 4
  c.num_train_steps = STEPS
  c.log_every = STEPS
  c.eval_every = 1000
  c.eval_batches = 1
  c.save_every = STEPS
  c.data.dataset_dir = str(dataset_dir)
  c.data.source_dir = ""
  c.data.synthetic = False
  c.data.prefetch = 2
  c.data.eval_fraction = 0.2
  return c


def one_device_mesh():
  return sharding.make_mesh(1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_dataset):  # pylint: disable=redefined-outer-name
  workdir = str(tmp_path_factory.mktemp("eval_workdir"))
  config = tiny_config(prepared_dataset)
  state = train.run(config, workdir, one_device_mesh())
  return dict(workdir=workdir, config=config, state=state)


@pytest.fixture(scope="module")
def evaluated(trained):
  lines = []
  step, values = evaluate.evaluate_workdir(
      trained["config"], trained["workdir"], mesh=one_device_mesh(), num_batches=2,
      refine_steps=2, step_sizes=(0.01, 0.1), num_candidates=(2,), print_fn=lines.append)
  return dict(step=step, values=values, table="\n".join(lines))


def test_prints_table_and_writes_eval_scalars(trained, evaluated):
  assert evaluated["step"] == STEPS
  names = ("flow_loss", "energy_loss", "retrieval_accuracy", "E_pos", "E_neg", "sample_mse",
           "sample_mse_refine_0.01", "sample_mse_refine_0.1", "sample_mse_best_of_2",
           "sample_mse_best_of_2_refine_0.1")
  for name in names:
    assert np.isfinite(evaluated["values"][f"eval/{name}"]), name
    assert name in evaluated["table"], name
  assert evaluated["values"]["eval/uses_ema"] == 1.0
  assert 0.0 <= evaluated["values"]["eval/retrieval_accuracy"] <= 1.0
  scalars = read_scalars(trained["workdir"])
  for name in names:
    assert STEPS in [st for st, _ in scalars[f"eval/{name}"]], name


def test_loss_metrics_match_the_training_eval(trained, evaluated):
  """Same params (EMA), batches and rng as the training run's evaluation -> the same numbers."""
  scalars = read_scalars(trained["workdir"])
  # The training run evaluated config.eval_batches = 1 batch at its last step.
  _, one = evaluate.evaluate_workdir(trained["config"], trained["workdir"],
                                     mesh=one_device_mesh(), num_batches=1, refine_steps=0,
                                     write=False, print_fn=None)
  for name in ("energy_loss", "E_pos", "E_neg", "retrieval_accuracy", "flow_loss"):
    train_value = [v for st, v in scalars[f"eval/{name}"] if st == STEPS]
    np.testing.assert_allclose(one[f"eval/{name}"], train_value[0], rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert "eval/sample_mse_refine_0.01" not in one


def test_sample_mse_matches_sample_actions_reference(trained):
  """The jitted sample step equals a numpy MSE over model.sample_actions (best-of-N, refined)."""
  config = loader.resolve_paths(trained["config"], trained["workdir"])
  trainer = trainer_lib.Trainer(config, one_device_mesh())
  params = trained["state"].params
  batch = next(iter(loader.make_dataset(config, split="eval")))
  batch = dict(batch)
  batch["actions_is_pad"] = batch["actions_is_pad"].copy()
  batch["actions_is_pad"][0, -3:] = True  # some padded steps must be excluded
  rng = jax.random.key(7)
  step = evaluate.make_sample_step(trainer.parts, num_steps=3, refine_steps=2,
                                   step_sizes=(0.1,), max_step=0.05, num_candidates=(3,))
  act_dim = config.model.energy_act_dim
  got = evaluate.squared_errors(jax.jit(step)(params, batch, rng), batch, act_dim)
  assert sorted(got) == ["sample_mse", "sample_mse_best_of_3", "sample_mse_best_of_3_refine_0.1",
                         "sample_mse_refine_0.1"]
  model = trainer.parts.bind(params)
  noise = jax.random.normal(rng, batch["actions"].shape, jnp.float32)
  more = jax.random.normal(jax.random.fold_in(rng, 3), (noise.shape[0], 2, *noise.shape[1:]))
  noise3 = jnp.concatenate([noise[:, None], more], axis=1)
  valid = ~batch["actions_is_pad"]
  refine = dict(refine_steps=2, refine_step_size=0.1, refine_max_step=0.05)
  for name, kw in (("sample_mse", dict(noise=noise)),
                   ("sample_mse_refine_0.1", dict(noise=noise, **refine)),
                   ("sample_mse_best_of_3", dict(noise=noise3, num_candidates=3)),
                   ("sample_mse_best_of_3_refine_0.1", dict(noise=noise3, num_candidates=3,
                                                             **refine))):
    pred = np.asarray(model.sample_actions(rng, batch, num_steps=3, **kw))
    err = (pred[..., :act_dim] - batch["actions"][..., :act_dim])[valid]
    sse, count = got[name]
    np.testing.assert_allclose(count, err.size)
    np.testing.assert_allclose(sse / count, np.mean(err**2), rtol=1e-4, err_msg=name)


# pylint: disable-next=redefined-outer-name
def test_missing_checkpoint_is_a_clear_error(tmp_path, prepared_dataset):
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    evaluate.evaluate_workdir(tiny_config(prepared_dataset), str(tmp_path), mesh=one_device_mesh())


def test_absolute_action_space_recovers_the_recorded_actions(trained):
  """Ground truth through the model's space and back: the robot's raw actions of the records."""
  import grain  # pylint: disable=g-import-not-at-top
  from pipeline import weights  # pylint: disable=g-import-not-at-top
  from pipeline.data import records  # pylint: disable=g-import-not-at-top
  config = weights.with_norm_stats(
      loader.resolve_paths(trained["config"], trained["workdir"]), trained["workdir"])
  assert config.data.delta_action_dims == 6  # the recipe makes the round trip non-trivial
  info = loader.DatasetInfo(config.data.dataset_dir)
  transform = loader.make_frame_transform(config, info=info)
  source = grain.sources.ArrayRecordDataSource(info.shard_paths)
  frames = [records.decode_frame(source[i]) for i in (0, 7)]
  examples = [transform.transform_frame(f) for f in frames]
  batch = {k: np.stack([e[k] for e in examples]) for k in ("state", "actions", "actions_is_pad")}
  got = evaluate.absolute_action_space(config)(batch["actions"], batch)
  horizon = config.model.action_horizon
  for g, frame in zip(got, frames):
    raw = np.asarray(frame["actions"], np.float32)[:horizon]
    np.testing.assert_allclose(g, raw[:, :7], rtol=1e-4, atol=1e-4)
