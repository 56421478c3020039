"""The training loop: build or restore the train state, step, periodic actions, clean exit.

`run(config, workdir, mesh)`:
  1. prepares the dataset when the config asks for it (smoke: synthetic source in the workdir);
  2. builds the model abstractly (nnx.eval_shape), derives parameter / train-state shardings;
  3. restores the latest checkpoint (train state + data iterator) if there is one, else
     initializes the params sharded (jax.jit with out_shardings) and merges initial weights;
     a checkpoint records the topology that saved it, and a restore into another mesh or process
     count reshards the state (see `restore_checkpoint`);
  4. runs one jitted, donated train step per batch; logs (TensorBoard, and metrics.jsonl on
     process 0), evaluates, saves periodically;
  5. on a preemption notice (SIGTERM to any process) saves at the step all processes agree on,
     waits for the writes and returns; at the end waits for pending saves. Rerunning resumes with
     the same data order, RNG and logged metrics as a run that was never interrupted.

Params live in the train state as one pure nested dict (nnx.State.to_pure_dict()). The step splits
it into trainable / frozen parts by the config's regexes and differentiates the trainable part only.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from absl import logging
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import PartitionSpec as P

from pipeline import checkpoint as checkpoint_lib
from pipeline import metrics as metrics_lib
from pipeline import optim
from pipeline import sharding as sharding_lib
from pipeline.data import augment as augment_lib
from pipeline.models import pi0 as pi0_lib

ENERGY_METRICS = ("energy_loss", "E_pos", "E_neg", "energy_accuracy")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of batches consumed (applied or skipped as non-finite)
  params: Any  # pure nested dict of all model params
  opt_state: Any  # optax state; holds nothing for frozen params
  ema: Any  # EMA of the trainable params (pure dict), or None
  rng: jax.Array  # raw key data (uint32), so checkpoints hold plain arrays
  bad_steps: jax.Array  # consecutive non-finite steps


# ---------------------------------------------------------------------------------------------
# Model plumbing


def build_model(model_config, rngs: nnx.Rngs):
  return pi0_lib.build_model(model_config, rngs)


class ModelParts:
  """Graph definition + param template of a model, to rebuild it from a pure param dict."""

  def __init__(self, model_config, build_fn: Callable = build_model):
    self.model_config = model_config
    self.build_fn = build_fn
    abstract = nnx.eval_shape(lambda: build_fn(model_config, nnx.Rngs(0)))
    self.graphdef, self.param_template, self.rest_template = nnx.split(abstract, nnx.Param, ...)
    self.abstract_params = self.param_template.to_pure_dict()
    self.rest = None  # concrete non-param state (e.g. RNG streams), set by init

  def init(self, key: jax.Array) -> tuple[dict, Any]:
    model = self.build_fn(self.model_config, nnx.Rngs(key))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params.to_pure_dict(), rest

  def bind(self, params: dict):
    state = jax.tree.map(lambda x: x, self.param_template)  # fresh copy of the State structure
    state.replace_by_pure_dict(params)
    if self.rest is None:
      raise RuntimeError("ModelParts.bind before the non-param state exists; call init first")
    return nnx.merge(self.graphdef, state, self.rest)


def model_inputs(batch: Mapping[str, Any]) -> tuple[Mapping[str, Any], jax.Array]:
  """(observation, actions) from a batch in the loader's format."""
  return batch, batch["actions"]


# ---------------------------------------------------------------------------------------------
# State construction and sharding


def _key_data(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def make_init_state_fn(tx: optax.GradientTransformation, mask: dict, ema_decay: float,
                       seed: int) -> Callable[[dict], TrainState]:
  def init_state(params):
    trainable, _ = optim.split(params, mask)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, trainable) if ema_decay else None,
        rng=_key_data(seed), bad_steps=jnp.zeros((), jnp.int32))
  return init_state


def state_specs(abstract_state: TrainState, param_specs: Any) -> TrainState:
  """Specs for every train-state leaf: params by rule; opt state / EMA follow their params."""
  params = abstract_state.params
  return TrainState(
      step=P(), params=param_specs,
      opt_state=sharding_lib.follow_params(abstract_state.opt_state, params, param_specs),
      ema=(None if abstract_state.ema is None else
           sharding_lib.follow_params(abstract_state.ema, params, param_specs)),
      rng=P(), bad_steps=P())


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ---------------------------------------------------------------------------------------------
# Steps


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, mask: dict,
                    schedule: optax.Schedule, ema_decay: float, augment: bool = False):
  """(state, batch) -> (state, metrics). Non-finite loss/grads leave the state unchanged.

  augment: augment the batch's images on the device first (pipeline.data.augment).
  """

  def grads_fn(trainable, frozen, rng, batch):
    obs, actions = model_inputs(batch)

    def loss_fn(tr):
      model = parts.bind(optim.merge(tr, frozen))
      return model.compute_train_loss(rng, obs, actions, train=True)

    # Only the trainable subtree is an argument of grad: no frozen gradient is ever computed.
    return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if augment:
      # openpi's order: fit the images to the model size first (the loader may ship them at
      # their stored size), then augment. A separate stream from the loss's, keyed per example
      # by position in the global batch.
      size = parts.model_config.image_size
      batch = dict(batch, image=pi0_lib.fit_images(batch["image"], size))
      batch = augment_lib.augment_observation(jax.random.fold_in(rng, 0x617567), batch, train=True)
    trainable, frozen = optim.split(state.params, mask)
    (loss, metrics), grads = grads_fn(trainable, frozen, rng, batch)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    # Frozen leaves enter the optimizer as zeros; their set_to_zero updates are discarded.
    full_grads = optim.merge(grads, optim.zeros_like_tree(frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, optim.split(updates, mask)[0])

    def keep_if_bad(new, old):
      return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    new_trainable = keep_if_bad(new_trainable, trainable)
    opt_state = keep_if_bad(opt_state, state.opt_state)
    ema = state.ema
    if ema is not None:
      ema = keep_if_bad(optim.ema_update(ema, new_trainable, ema_decay), ema)
    bad_steps = jnp.where(ok, 0, state.bad_steps + 1)
    new_state = state.replace(step=state.step + 1, params=optim.merge(new_trainable, frozen),
                              opt_state=opt_state, ema=ema, bad_steps=bad_steps)
    out = dict(metrics)
    out.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
               param_norm=optax.global_norm(new_trainable),
               bad_step=(~ok).astype(jnp.float32), bad_steps=bad_steps)
    return new_state, out

  train_step.grads_fn = grads_fn
  return train_step


def make_eval_step(parts: ModelParts):
  """(params, batch, rng) -> metrics: flow loss, energy loss, E_pos, E_neg, retrieval accuracy.

  The flow loss is measured even when the training objective skips it (energy_only).
  """

  def eval_step(params, batch, rng):
    model = parts.bind(params)
    obs, actions = model_inputs(batch)
    flow_rng, loss_rng = jax.random.split(rng)
    _, m = model.compute_train_loss(loss_rng, obs, actions, train=False)
    out = {k: m[k] for k in ENERGY_METRICS if k in m}
    if "energy_accuracy" in out:
      out["retrieval_accuracy"] = out.pop("energy_accuracy")
    out["flow_loss"] = m["flow_loss"] if "flow_loss" in m else jnp.mean(
        model.compute_loss(flow_rng, obs, actions, train=False))
    return out

  return eval_step


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Any], *, rng: jax.Array,
             num_batches: int | None = None) -> dict[str, float]:
  """Mean of eval_step metrics over (at most num_batches) global batches."""
  acc = metrics_lib.MeanAccumulator()
  for i, batch in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    acc.add(eval_step(params, batch, jax.random.fold_in(rng, i)))
  if not len(acc):
    raise ValueError("evaluation got no batch (empty eval split?)")
  return acc.summary()


def eval_params(state: TrainState, mask: dict, use_ema: bool) -> dict:
  if use_ema and state.ema is not None:
    return optim.merge(state.ema, optim.split(state.params, mask)[1])
  return state.params


# ---------------------------------------------------------------------------------------------
# Data


def resolve_paths(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Copy of the config with '{workdir}' in data paths replaced."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for key in ("dataset_dir", "source_dir", "norm_stats_path", "tokenizer_path"):
      if key in config.data and isinstance(config.data[key], str):
        config.data[key] = config.data[key].replace("{workdir}", workdir)
  return config


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Writes the synthetic source and/or prepares the ArrayRecord dataset when absent."""
  d = config.data
  if os.path.exists(os.path.join(d.dataset_dir, "manifest.json")):
    return
  if jax.process_index() == 0:
    if d.synthetic and not (os.path.isdir(d.source_dir) and os.listdir(d.source_dir)):
      from pipeline.data import synthetic  # pylint: disable=g-import-not-at-top

      logging.info("data: writing synthetic source (%d episodes) to %s", d.synthetic_episodes,
                   d.source_dir)
      # Written aside and renamed, so an interrupted write is never taken for a finished one.
      tmp = d.source_dir.rstrip("/") + ".tmp"
      shutil.rmtree(tmp, ignore_errors=True)
      synthetic.write_lerobot_dataset(tmp, num_episodes=d.synthetic_episodes,
                                      image_size=d.synthetic_image_size, seed=config.seed)
      shutil.rmtree(d.source_dir, ignore_errors=True)
      os.rename(tmp, d.source_dir)
    if d.source_dir:
      from pipeline.data import prepare  # pylint: disable=g-import-not-at-top

      logging.info("data: preparing %s -> %s", d.source_dir, d.dataset_dir)
      prepare.ensure_prepared(d.source_dir, d.dataset_dir, format=d.source_format,
                              action_horizon=config.model.action_horizon)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("prepare_data")


def make_dataset(config, split: str):
  from pipeline.data import loader  # pylint: disable=g-import-not-at-top

  return loader.make_dataset(config, split=split, process_index=jax.process_index(),
                             process_count=jax.process_count())


def to_global_batch(batch, mesh):
  from pipeline.data import loader  # pylint: disable=g-import-not-at-top

  return loader.to_global_batch(batch, mesh)


def _close(it: Any) -> None:
  close = getattr(it, "close", None)
  if close is not None:
    close()


# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
  """Everything `run` needs, built once: model parts, optimizer, shardings, jitted functions."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, build_fn: Callable = build_model):
    self.config = config
    self.mesh = mesh
    self.parts = ModelParts(config.model, build_fn)
    abstract_params = self.parts.abstract_params
    o = config.optim
    self.mask = optim.trainable_mask(abstract_params, o.trainable, o.frozen)
    self.schedule = optim.make_schedule(o)
    self.tx = optim.make_optimizer(o, optim.labels(self.mask), self.schedule)
    self.ema_decay = float(o.ema_decay or 0.0)

    self.param_specs = sharding_lib.param_specs(
        abstract_params, mesh, config.sharding.rules, config.sharding.min_size_mib)
    self.param_shardings = sharding_lib.to_named(mesh, self.param_specs)
    init_state = make_init_state_fn(self.tx, self.mask, self.ema_decay, config.seed)
    abstract_state = jax.eval_shape(init_state, abstract_params)
    self.state_shardings = sharding_lib.to_named(
        mesh, state_specs(abstract_state, self.param_specs))
    self.abstract_state = with_shardings(abstract_state, self.state_shardings)
    self.replicated = sharding_lib.replicated(mesh)
    self.batch_sharding = sharding_lib.batch_sharding(mesh)

    self._init_state = jax.jit(init_state, out_shardings=self.state_shardings,
                               donate_argnums=0)
    self.train_step = jax.jit(
        make_train_step(self.parts, self.tx, self.mask, self.schedule, self.ema_decay,
                        augment=bool(config.data.get("augment", False))),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    self.eval_step = jax.jit(
        make_eval_step(self.parts),
        in_shardings=(self.param_shardings, self.batch_sharding, self.replicated),
        out_shardings=self.replicated)

    n_train = optim.num_params(optim.split(abstract_params, self.mask)[0])
    logging.info("model: %d params, %d trainable; optimizer state %.1f MiB",
                 optim.num_params(abstract_params), n_train,
                 optim.state_bytes(abstract_state.opt_state) / 2**20)
    logging.info("param shardings:\n%s", sharding_lib.describe(abstract_params, self.param_specs))

  def init_rest(self, key: jax.Array) -> None:
    """Concrete non-param model state (replicated); never checkpointed, rebuilt from the seed."""
    rest_shardings = jax.tree.map(lambda _: self.replicated, self.parts.rest_template)
    self.parts.rest = jax.jit(lambda k: self.parts.init(k)[1], out_shardings=rest_shardings)(key)

  def init_params(self, key: jax.Array, only: list[str] | None = None) -> dict:
    """Fresh params, created sharded; `only` restricts to those paths (XLA drops the rest)."""
    if only is None:
      return jax.jit(lambda k: self.parts.init(k)[0], out_shardings=self.param_shardings)(key)
    keep = set(only)

    def select(tree):
      flat = flax.traverse_util.flatten_dict(tree)
      return flax.traverse_util.unflatten_dict(
          {k: v for k, v in flat.items() if "/".join(map(str, k)) in keep})

    return jax.jit(lambda k: select(self.parts.init(k)[0]),
                   out_shardings=select(self.param_shardings))(key)

  def new_state(self) -> TrainState:
    """Initial train state: fresh params, merged with config.init.weights when set."""
    key = jax.random.key(self.config.seed)
    weights = self.config.init.weights
    if weights:
      target = with_shardings(self.parts.abstract_params, self.param_shardings)
      loaded, missing = checkpoint_lib.load_weights(
          weights, target, missing_ok=self.config.init.missing_ok)
      params = optim.merge(loaded, self.init_params(key, missing)) if missing else loaded
    else:
      params = self.init_params(key)
    return self._init_state(params)


def _hparams(config) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
  return {k: v for k, v in flat.items() if isinstance(v, (bool, int, float, str))}


METRICS_JSONL = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as one JSON line per write ({"step": s, name: value, ...}) in workdir/metrics.jsonl.

  A machine-readable log next to the TensorBoard events; lines are flushed as written, so a killed
  run leaves whole lines (a torn last line is dropped by `truncate`).
  """

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")

  @staticmethod
  def truncate(path: str, last_step: int) -> None:
    """Drops lines after `last_step`: a resumed run rewrites them, each step stays logged once."""
    if not os.path.exists(path):
      return
    keep = []
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if row.get("step", 0) <= last_step:
          keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: str, start_step: int) -> metric_writers.MetricWriter:
  """clu default writer (TensorBoard on process 0, log lines) + metrics.jsonl on process 0.

  The JSONL log is local-disk only (it is appended to, which object stores such as gs:// lack).
  """
  writer = metrics_lib.create_writer(workdir)
  if jax.process_index() != 0 or "://" in workdir:
    return writer
  path = os.path.join(workdir, METRICS_JSONL)
  JsonlWriter.truncate(path, start_step)
  return metric_writers.MultiWriter([writer, JsonlWriter(path)])


def _metrics_to_json(steps: list[Mapping[str, Any]]) -> dict[str, Any]:
  # Values with their dtypes: the restored means are then bitwise those of an uninterrupted run.
  fetched = jax.device_get(steps)
  return {"steps": [{k: [np.asarray(v).item(), str(np.asarray(v).dtype)] for k, v in m.items()}
                    for m in fetched]}


def _metrics_from_json(saved: Mapping[str, Any] | None) -> list[dict[str, np.ndarray]]:
  if not saved:
    return []
  return [{k: np.asarray(v, dtype=dt) for k, (v, dt) in m.items()} for m in saved["steps"]]


def restore_checkpoint(ckpt: checkpoint_lib.Checkpointer, step: int, trainer: Trainer,
                       train_iter: Any, topology: dict[str, Any]):
  """(state, train iterator, unlogged step metrics) from a checkpoint step.

  The model state always restores into this run's mesh. The data iterator continues where it
  stopped when the data layout is unchanged; after a change of process count each process takes
  the shared position (every saved process consumed the same number of batches, and the global
  order is split by stride, so the same global examples come next); any other change of the data
  layout is an error.
  """
  where = str(ckpt.step_path(step))
  saved = ckpt.restore_json(step, "topology")
  metrics = _metrics_from_json(ckpt.restore_json(step, "unlogged_metrics"))
  if saved is None or saved["process_count"] == topology["process_count"]:
    if saved is not None:
      checkpoint_lib.check_data_layout(saved, topology, where)
      if saved["mesh"] != topology["mesh"]:
        logging.info("checkpoint: resharding state saved on mesh %s into mesh %s", saved["mesh"],
                     topology["mesh"])
    state, train_iter = ckpt.restore(step, trainer.abstract_state, train_iter)
    return state, train_iter, metrics
  checkpoint_lib.check_data_layout(saved, topology, where)
  states = list(ckpt.saved_data_iter_states(step).values())
  if len(states) != saved["process_count"] or any(s != states[0] for s in states):
    raise ValueError(
        f"checkpoint {where} was saved by {saved['process_count']} processes whose data-iterator "
        f"states differ ({len(states)} found), so they cannot be re-sharded over "
        f"{topology['process_count']} processes; rerun with {saved['process_count']} processes")
  state, _ = ckpt.restore(step, trainer.abstract_state)
  train_iter.set_state(states[0])
  logging.warning("checkpoint: saved by %d processes, restored into %d (mesh %s -> %s); the data "
                  "stream continues at the same global position", saved["process_count"],
                  topology["process_count"], saved["mesh"], topology["mesh"])
  return state, train_iter, metrics


def run(config: ml_collections.ConfigDict, workdir: str, mesh, *,
        build_fn: Callable = build_model) -> TrainState:
  """Trains per config in workdir on mesh; resumes from workdir/checkpoints when present.

  Returns the final state, or the state at the preemption step after a preemption notice
  (SIGTERM), which is then saved with all pending writes finished.
  """
  config = resolve_paths(config, workdir)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  if config.max_bad_steps < 1:
    raise ValueError(f"config.max_bad_steps must be >= 1, got {config.max_bad_steps}")
  if config.log_every < 1:
    raise ValueError(f"config.log_every must be >= 1, got {config.log_every}")
  prepare_data(config)

  trainer = Trainer(config, mesh, build_fn)
  trainer.init_rest(jax.random.key(config.seed))
  config_json = checkpoint_lib.config_to_json(config)
  topology = checkpoint_lib.topology(config, mesh)
  norm_stats = checkpoint_lib.read_json(
      config.data.norm_stats_path or os.path.join(config.data.dataset_dir, "norm_stats.json"))

  ckpt = checkpoint_lib.Checkpointer.from_config(workdir, config)
  train_iter = writer = None
  # SIGTERM stays a preemption notice until the last write has finished.
  with checkpoint_lib.sigterm_as_preemption():
    # Everything opened is closed on every exit path (Grain workers hold shared memory).
    try:
      train_iter = iter(make_dataset(config, "train"))
      unlogged = []  # step metrics since the last log line; saved with each checkpoint
      latest = ckpt.latest_step()
      if latest is not None:
        logging.info("resuming from checkpoint step %d in %s", latest, ckpt.directory)
        state, train_iter, unlogged = restore_checkpoint(ckpt, latest, trainer, train_iter,
                                                         topology)
      else:
        state = trainer.new_state()
      start = int(jax.device_get(state.step))
      writer = make_writer(workdir, start)
      if latest is None:
        writer.write_hparams(_hparams(config))
      state = _train_loop(config, workdir, trainer, ckpt, writer, state, train_iter, unlogged,
                          start, dict(config=config_json, norm_stats=norm_stats,
                                      topology=topology))
    finally:
      if writer is not None:
        writer.close()  # flushes the asynchronous writer
      ckpt.wait_until_finished()
      ckpt.close()
      if train_iter is not None:
        _close(train_iter)
  return state


def _train_loop(config, workdir: str, trainer: Trainer, ckpt: checkpoint_lib.Checkpointer,
                writer, state, train_iter, unlogged: list, start: int,
                items: dict[str, Any]) -> TrainState:
  mesh = trainer.mesh
  num_steps = config.num_train_steps
  if start >= num_steps:
    logging.info("checkpoint is at step %d >= config.num_train_steps=%d: nothing to train",
                 start, num_steps)
  else:
    logging.info("training steps %d..%d (batch %d on mesh %s)", start + 1, num_steps,
                 config.batch_size, dict(mesh.shape))

  hooks = metrics_lib.make_periodic_actions(config, workdir, writer, num_steps)
  acc = metrics_lib.MeanAccumulator()
  for m in unlogged:
    acc.add(m)
  eval_rng = jax.random.key(config.seed + 1)
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
      batch = to_global_batch(next(train_iter), mesh)
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
      writer.write_scalars(step, run_eval(trainer, state, config, eval_rng))
    # Every host must ask at every step: they agree on the step at which to stop.
    preempted = ckpt.reached_preemption(step)
    if preempted or step == num_steps or ckpt.should_save(step):
      settle()
      ckpt.save(step, state, train_iter, metrics=_metrics_to_json(unlogged),
                force=preempted or step == num_steps, **items)
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


def run_eval(trainer: Trainer, state: TrainState, config, rng) -> dict[str, float]:
  it = iter(make_dataset(config, "eval"))
  try:
    batches = (to_global_batch(b, trainer.mesh) for b in it)
    out = evaluate(trainer.eval_step, eval_params(state, trainer.mask, config.eval_use_ema),
                   batches, rng=rng, num_batches=config.eval_batches)
  finally:
    _close(it)
  return {f"eval/{k}": v for k, v in out.items()}
