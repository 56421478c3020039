"""The training run: build or restore the train state, step, periodic actions, clean exit.

`run(config, workdir, mesh)`:
  1. prepares the dataset when the config asks for it (smoke: synthetic source in the workdir);
  2. builds the trainer (abstract model, shardings, jitted steps; pipeline.trainer);
  3. restores the latest checkpoint (train state + data iterator) if there is one, else
     initializes the params sharded and merges initial weights; a checkpoint records the topology
     that saved it, and a restore into another mesh or process count reshards the state;
  4. runs one jitted, donated train step per batch; logs (TensorBoard, and metrics.jsonl on
     process 0), evaluates, saves periodically;
  5. on a preemption notice (SIGTERM to any process) saves at the step all processes agree on,
     waits for the writes and returns; at the end waits for pending saves. Rerunning resumes with
     the same data order, RNG and logged metrics as a run that was never interrupted.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import ml_collections

from pipeline import checkpoint as checkpoint_lib
from pipeline import evaluate
from pipeline import metrics as metrics_lib
from pipeline import sharding as sharding_lib
from pipeline import trainer as trainer_lib
from pipeline import weights as weights_lib
from pipeline.data import loader
from pipeline.data import normalization
from pipeline.data import prepare
from pipeline.models import pi0 as pi0_lib


def run(config: ml_collections.ConfigDict, workdir: str, mesh, *,
        build_fn: Callable = pi0_lib.build_model) -> trainer_lib.TrainState:
  """Trains per config in workdir on mesh; resumes from workdir/checkpoints when present.

  Returns the final state, or the state at the preemption step after a preemption notice
  (SIGTERM), which is then saved with all pending writes finished.
  """
  config = loader.resolve_paths(config, workdir)
  # The stats the weights were trained with (this run's own when resuming; see configs/common).
  config = weights_lib.with_norm_stats(config, workdir)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  if config.max_bad_steps < 1:
    raise ValueError(f"config.max_bad_steps must be >= 1, got {config.max_bad_steps}")
  if config.log_every < 1:
    raise ValueError(f"config.log_every must be >= 1, got {config.log_every}")
  prepare.ensure_from_config(config)

  trainer = trainer_lib.Trainer(config, mesh, build_fn)
  topology = checkpoint_lib.topology(config, mesh)
  saved_with_each_step = dict(
      config=checkpoint_lib.config_to_json(config), topology=topology,
      norm_stats=normalization.read_norm_stats_json(config.data.norm_stats_path))

  writer = None
  # SIGTERM stays a preemption notice until the last write has finished; everything opened is
  # closed on every exit path.
  with checkpoint_lib.sigterm_as_preemption(), loader.open_iterator(config, "train") as train_iter:
    ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config)
    try:
      unlogged = []  # step metrics since the last log line; saved with each checkpoint
      latest = ckpt.latest_step()
      if latest is not None:
        logging.info("resuming from checkpoint step %d in %s", latest, ckpt.directory)
        state, train_iter, saved = checkpoint_lib.restore(ckpt, latest, trainer.abstract_state,
                                                          train_iter, topology)
        unlogged = metrics_lib.steps_from_json(saved)
      else:
        state = trainer.new_state()
      start = int(jax.device_get(state.step))
      writer = metrics_lib.make_train_writer(workdir, start)
      if latest is None:
        writer.write_hparams(_hparams(config))
      state = _train_loop(config, workdir, trainer, ckpt, writer, state, train_iter, unlogged,
                          start, saved_with_each_step)
    finally:
      if writer is not None:
        writer.close()  # flushes the asynchronous writer
      ckpt.wait_until_finished()
      ckpt.close()
  return state


def _train_loop(config, workdir: str, trainer: trainer_lib.Trainer,
                ckpt: checkpoint_lib.Checkpointer, writer, state, train_iter, unlogged: list,
                start: int, saved_with_each_step: dict[str, Any]) -> trainer_lib.TrainState:
  num_steps = config.num_train_steps
  if start >= num_steps:
    logging.info("checkpoint is at step %d >= config.num_train_steps=%d: nothing to train",
                 start, num_steps)
  else:
    logging.info("training steps %d..%d (batch %d on mesh %s)", start + 1, num_steps,
                 config.batch_size, dict(trainer.mesh.shape))

  hooks = metrics_lib.make_periodic_actions(config, workdir, writer, num_steps)
  acc = metrics_lib.MeanAccumulator()
  for m in unlogged:
    acc.add(m)
  eval_rng = jax.random.key(config.seed + 1)
  # Warns once when the first batches are far from standardized (stats that do not fit the data).
  standardization = normalization.StandardizationCheck(
      normalization.load_norm_stats(config.data.norm_stats_path), config.data.norm_stats_path,
      config.data.normalization)
  # (step, on-device bad-step counter) not yet checked. Checking one step late keeps dispatch
  # asynchronous; eval and saves check first, so a run that must stop saves nothing more.
  pending = None

  def settle():
    nonlocal pending
    if pending is not None:
      _check_bad_steps(int(pending[1]), config.max_bad_steps, pending[0])
      pending = None

  t0 = time.time()
  for step in range(start + 1, num_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      local_batch = next(train_iter)
      if standardization is not None and standardization.add(local_batch):
        standardization = None
      batch = loader.to_global_batch(local_batch, trainer.batch_sharding)
      state, step_metrics = trainer.train_step(state, batch)
    settle()
    pending = (step, step_metrics.pop("bad_steps"))
    acc.add(step_metrics)
    unlogged.append(step_metrics)
    for hook in hooks:
      hook(step)

    if step % config.log_every == 0 or step == num_steps:
      writer.write_scalars(step, acc.summary("train/"))
      unlogged.clear()
    # eval_every <= 0 turns evaluation off (the final one too).
    if config.eval_every > 0 and (step % config.eval_every == 0 or step == num_steps):
      settle()
      params = trainer_lib.eval_params(state, trainer.mask, config.eval_use_ema)
      values, _ = evaluate.evaluate_split(trainer, params, rng=eval_rng,
                                          num_batches=config.eval_batches)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in values.items()})
    # Every host must ask at every step: they agree on the step at which to stop.
    preempted = ckpt.reached_preemption(step)
    if preempted or step == num_steps or ckpt.should_save(step):
      settle()
      ckpt.save(step, state, train_iter, metrics=metrics_lib.steps_to_json(unlogged),
                force=preempted or step == num_steps, **saved_with_each_step)
    if preempted:
      ckpt.wait_until_finished()
      logging.warning("preemption notice (SIGTERM): checkpoint saved at step %d (agreed by all "
                      "%d process(es)); exiting cleanly, rerun the same command to resume", step,
                      jax.process_count())
      return state
  settle()
  logging.info("training done at step %d (%.1f s)", max(start, num_steps), time.time() - t0)
  return state


def _check_bad_steps(bad: int, max_bad: int, step: int) -> None:
  if bad >= max_bad:
    raise FloatingPointError(
        f"{bad} consecutive steps up to step {step} had a non-finite loss or gradient; stopping "
        f"(config.max_bad_steps={max_bad}). Those updates were not applied and no such state "
        "was saved.")
  if bad:
    logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, bad)


def _hparams(config) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}
