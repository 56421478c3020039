"""The train state and everything that acts on it: model parts, shardings, jitted steps.

Params live in the train state as one pure nested dict (nnx.State.to_pure_dict()). The train step
splits it into trainable / frozen parts (the model's energy mode, narrowed by config.optim) and
differentiates the trainable part only.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from pipeline import optim
from pipeline import sharding as sharding_lib
from pipeline import weights as weights_lib
from pipeline.models import pi0 as pi0_lib
from pipeline.models import pi0_config

ENERGY_METRICS = ("energy_loss", "E_pos", "E_neg", "energy_accuracy")


@flax.struct.dataclass
class TrainState:
  # Batches consumed, applied or skipped as non-finite: the data position and the RNG stream.
  # The optimizer counts applied updates only (optim.applied_updates), and its schedule with it.
  step: jax.Array
  params: Any  # pure nested dict of all model params
  opt_state: Any  # optax state; holds nothing for frozen params
  ema: Any  # EMA of the trainable params (pure dict), or None
  rng: jax.Array  # raw key data (uint32), so checkpoints hold plain arrays
  bad_steps: jax.Array  # consecutive non-finite steps


class ModelParts:
  """Graph definition + param template of a model, to rebuild it from a pure param dict.

  Models keep no state but their parameters (randomness comes in as explicit keys), so that
  checkpoints and EMA hold only arrays.
  """

  def __init__(self, model_config, build_fn: Callable = pi0_lib.build_model):
    self.model_config = model_config
    self.build_fn = build_fn
    abstract = nnx.eval_shape(lambda: build_fn(model_config, nnx.Rngs(0)))
    self.graphdef, self.param_template, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError(f"{type(abstract).__name__} holds non-parameter state "
                       f"{list(rest.flat_state())[:4]}; pass randomness as explicit keys")
    self.abstract_params = self.param_template.to_pure_dict()

  def init(self, key: jax.Array) -> dict:
    return nnx.state(self.build_fn(self.model_config, nnx.Rngs(key)), nnx.Param).to_pure_dict()

  def bind(self, params: dict):
    state = jax.tree.map(lambda x: x, self.param_template)  # fresh copy of the State structure
    state.replace_by_pure_dict(params)
    return nnx.merge(self.graphdef, state)


def trainable_mask(config: ml_collections.ConfigDict, abstract_params: dict) -> dict:
  """What trains: the energy mode's parameters, narrowed by config.optim.trainable / frozen."""
  o = config.optim
  mode = config.model.get("energy_mode")  # absent from non-Pi0 models: no restriction
  within = pi0_config.trainable_pattern(mode)
  mask = optim.trainable_mask(abstract_params, o.trainable, (*o.frozen,))
  mode_mask = optim.trainable_mask(abstract_params, (within,))
  mask = jax.tree.map(lambda a, b: a and b, mode_mask, mask)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"config.optim.trainable={tuple(o.trainable)} leaves no trainable parameter "
                     f"within model.energy_mode={mode!r} (which trains {within!r})")
  return mask


# ---------------------------------------------------------------------------------------------
# Steps


def loss_and_grads(parts: ModelParts, trainable: dict, frozen: dict, rng: jax.Array,
                   batch: Mapping[str, Any], *, augment: bool = False):
  """((loss, metrics), grads) of the model's training loss w.r.t. the trainable params only.

  Only the trainable subtree is an argument of grad: no frozen gradient is ever computed.
  """

  def loss_fn(tr):
    model = parts.bind(optim.merge(tr, frozen))
    return model.compute_train_loss(rng, batch, batch["actions"], train=True, augment=augment)

  return jax.value_and_grad(loss_fn, has_aux=True)(trainable)


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, mask: dict,
                    schedule: optax.Schedule, ema_decay: float, augment: bool = False):
  """(state, batch) -> (state, metrics). Non-finite loss/grads leave the state unchanged."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    trainable, frozen = optim.split(state.params, mask)
    (loss, metrics), grads = loss_and_grads(parts, trainable, frozen, rng, batch,
                                            augment=augment)
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
    # The rate of this step's update: the schedule at the optimizer's count before it.
    applied = optim.applied_updates(state.opt_state)
    out.update(loss=loss, grad_norm=grad_norm, lr=schedule(applied),
               param_norm=optax.global_norm(new_trainable),
               bad_step=(~ok).astype(jnp.float32), bad_steps=bad_steps)
    return new_state, out

  return train_step


def make_eval_step(parts: ModelParts):
  """(params, batch, rng) -> metrics: flow loss, energy loss, E_pos, E_neg, retrieval accuracy.

  The flow loss is measured even when the training objective skips it (energy_only).
  """

  def eval_step(params, batch, rng):
    model = parts.bind(params)
    actions = batch["actions"]
    flow_rng, loss_rng = jax.random.split(rng)
    _, m = model.compute_train_loss(loss_rng, batch, actions, train=False)
    out = {k: m[k] for k in ENERGY_METRICS if k in m}
    if "energy_accuracy" in out:
      out["retrieval_accuracy"] = out.pop("energy_accuracy")
    out["flow_loss"] = m["flow_loss"] if "flow_loss" in m else jnp.mean(
        model.compute_loss(flow_rng, batch, actions, train=False))
    return out

  return eval_step


def eval_params(state: TrainState, mask: dict, use_ema: bool) -> dict:
  """The params to evaluate: EMA of the trainable ones (when kept and asked for) + the frozen."""
  if use_ema and state.ema is not None:
    return optim.merge(state.ema, optim.split(state.params, mask)[1])
  return state.params


# ---------------------------------------------------------------------------------------------
# State construction and sharding


def make_init_state_fn(tx: optax.GradientTransformation, mask: dict, ema_decay: float,
                       seed: int) -> Callable[[dict], TrainState]:
  def init_state(params):
    trainable, _ = optim.split(params, mask)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, trainable) if ema_decay else None,
        rng=jax.random.key_data(jax.random.key(seed)), bad_steps=jnp.zeros((), jnp.int32))
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


def under_mesh(mesh, fn: Callable) -> Callable:
  """fn traced with `mesh` as the context mesh: the model splits over it what GSPMD would not
  (EnergyModel.pairwise: each device scores its own contexts)."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


class Trainer:
  """Model parts, optimizer, shardings and jitted functions of one config on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, mesh,
               build_fn: Callable = pi0_lib.build_model):
    self.config = config
    self.mesh = mesh
    self.parts = ModelParts(config.model, build_fn)
    abstract_params = self.parts.abstract_params
    o = config.optim
    self.mask = trainable_mask(config, abstract_params)
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
        under_mesh(mesh, make_train_step(self.parts, self.tx, self.mask, self.schedule,
                                         self.ema_decay, augment=bool(config.data.augment))),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)
    self.eval_step = jax.jit(
        under_mesh(mesh, make_eval_step(self.parts)),
        in_shardings=(self.param_shardings, self.batch_sharding, self.replicated),
        out_shardings=self.replicated)

    n_train = optim.num_params(optim.split(abstract_params, self.mask)[0])
    logging.info("model: %d params, %d trainable; optimizer state %.1f MiB",
                 optim.num_params(abstract_params), n_train,
                 optim.state_bytes(abstract_state.opt_state) / 2**20)
    logging.info("param shardings:\n%s", sharding_lib.describe(abstract_params, self.param_specs))

  def init_params(self, key: jax.Array, only: list[str] | None = None) -> dict:
    """Fresh params, created sharded; `only` restricts to those paths (XLA drops the rest)."""
    if only is None:
      return jax.jit(self.parts.init, out_shardings=self.param_shardings)(key)
    keep = set(only)

    def select(tree):
      flat = flax.traverse_util.flatten_dict(tree)
      return flax.traverse_util.unflatten_dict(
          {k: v for k, v in flat.items() if "/".join(map(str, k)) in keep})

    return jax.jit(lambda k: select(self.parts.init(k)),
                   out_shardings=select(self.param_shardings))(key)

  def new_state(self) -> TrainState:
    """Initial train state: fresh params, merged with config.init.weights / energy_weights."""
    key = jax.random.key(self.config.seed)
    init = self.config.init
    if init.weights or init.get("energy_weights"):
      target = with_shardings(self.parts.abstract_params, self.param_shardings)
      loaded, fresh = weights_lib.load_init_params(self.config, target)
      params = optim.merge(loaded, self.init_params(key, fresh)) if fresh else loaded
    else:
      params = self.init_params(key)
    return self._init_state(params)
