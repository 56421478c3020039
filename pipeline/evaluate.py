"""Evaluation of a trained workdir on the held-out episodes.

  python -m pipeline.evaluate --config=configs/joint.py:smoke --workdir=/tmp/pi0e \
      [--refine_steps=5 --refine_step_sizes=0.01,0.03,0.1 --refine_max_step=0.1]

Restores the latest checkpoint in workdir/checkpoints (EMA params when the state has them and
config.eval_use_ema, else the trained params) and measures on the eval split:
  flow_loss, energy_loss (InfoNCE at the configured batch), retrieval_accuracy, E_pos, E_neg
    (the trainer's eval step);
  sample_mse: MSE of model.sample_actions vs the ground-truth actions over the first
    energy_act_dim dims and the valid (not padded) steps, both in absolute, unnormalized action
    space (as a policy returns them); sample_mse_best_of_<N> for the lowest-energy of N
    candidates; and <variant>_refine_<step size> after energy refinement of those samples.
The numbers go to TensorBoard under workdir (prefix 'eval/', at the checkpoint's step) and are
printed as a table. The training loop evaluates with the same loop (`evaluate_split`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pipeline import checkpoint as checkpoint_lib
from pipeline import metrics as metrics_lib
from pipeline import sharding as sharding_lib
from pipeline import trainer as trainer_lib
from pipeline import weights as weights_lib
from pipeline.data import loader
from pipeline.data import normalization
from pipeline.models import energy as energy_lib

DEFAULT_STEP_SIZES = (0.01, 0.03, 0.1)


def make_sample_step(parts: trainer_lib.ModelParts, *, num_steps: int = 10, refine_steps: int = 5,
                     step_sizes: Sequence[float] = DEFAULT_STEP_SIZES, max_step: float = 0.1,
                     num_candidates: Sequence[int] = ()) -> Callable:
  """(params, batch, rng) -> {name: sampled actions [B, H, action_dim]} of each sampling variant.

  sample_mse: plain sampling; best_of_<N>: the lowest-energy of N candidates, whose first
  starts from the plain sample's noise; refine_<s> suffixes: the same samples refined with step
  size s (what `sample_actions(..., num_candidates=N, refine_steps=k, refine_step_size=s)`
  computes, without re-running the flow for every variant).
  """
  step_sizes = tuple(float(s) for s in step_sizes)
  if refine_steps < 0:
    raise ValueError(f"--refine_steps must be >= 0, got {refine_steps}")
  if any(n < 2 for n in num_candidates):
    raise ValueError(f"best-of-N needs N >= 2, got {tuple(num_candidates)}")

  def sample_step(params, batch, rng):
    model = parts.bind(params)
    obs = model.preprocess(batch)
    noise = jax.random.normal(rng, batch["actions"].shape, jnp.float32)
    context, mask = model.encode_prefix(batch)
    samples = {"sample_mse": model.sample_actions(rng, batch, num_steps=num_steps, noise=noise)}
    for n in num_candidates if model.energy is not None else ():
      more = jax.random.normal(jax.random.fold_in(rng, n), (noise.shape[0], n - 1, *noise.shape[1:]))
      candidates, energies, _, _ = model.sample_candidates(
          obs, jnp.concatenate([noise[:, None], more], axis=1), num_steps=num_steps)
      best = jnp.argmin(energies, axis=1)[:, None, None, None]
      samples[f"sample_mse_best_of_{n}"] = jnp.take_along_axis(candidates, best, axis=1)[:, 0]
    if model.energy is not None and refine_steps > 0:
      for name, sampled in list(samples.items()):
        for s in step_sizes:
          samples[f"{name}_refine_{s:g}"] = energy_lib.refine(
              model.energy, context, mask, sampled, steps=refine_steps, step_size=s,
              max_step=max_step)
    return samples

  return sample_step


def squared_errors(samples: dict[str, Any], batch: Any, act_dim: int,
                   to_absolute: Callable | None = None) -> dict[str, tuple[float, float]]:
  """{name: (sum of squared errors, count)} of samples against the batch's actions.

  Over the first act_dim dims and the valid (not padded) steps; in the space `to_absolute`
  (actions, batch) -> actions maps both into (default: the model's normalized space).
  """
  convert = to_absolute or (lambda actions, _: actions)
  batch = jax.device_get(batch)
  valid = ~np.asarray(batch["actions_is_pad"])
  truth = np.asarray(convert(np.asarray(batch["actions"], np.float32), batch))[..., :act_dim]
  out = {}
  for name, pred in jax.device_get(samples).items():
    err = np.asarray(convert(np.asarray(pred, np.float32), batch))[..., :act_dim] - truth
    out[name] = (float(np.sum(np.square(err[valid]))), float(valid.sum() * act_dim))
  return out


def absolute_action_space(config: ml_collections.ConfigDict) -> Callable:
  """(actions, batch) -> the robot's actions: absolute and unnormalized, as a policy returns them.

  Uses the norm stats in config.data.norm_stats_path (resolved) and the run's action recipe; the
  batch's raw state is its normalized state, unnormalized.
  """
  d = config.data
  stats = normalization.load_norm_stats(d.norm_stats_path)
  state_dims = stats["state"]["mean"].shape[-1]

  def to_absolute(actions, batch):
    state = normalization.unnormalize(np.asarray(batch["state"])[..., :state_dims],
                                      stats["state"], d.normalization, key="state")
    return normalization.absolute_actions(
        actions, state, stats, normalization=d.normalization,
        delta_action_dims=d.delta_action_dims, act_dim=config.model.energy_act_dim)

  return to_absolute


def evaluate(trainer: trainer_lib.Trainer, params: Any, batches: Iterable[Any], *,
             rng: jax.Array, num_batches: int | None = None, sample_step: Callable | None = None,
             to_absolute: Callable | None = None) -> tuple[dict[str, float], int]:
  """(metrics, number of batches): eval-step means over batches, exact sample MSEs.

  `batches` yields global batches (already on the trainer's mesh), at most `num_batches` are
  used; `sample_step` is a jitted make_sample_step (None skips sampling), whose samples are
  compared in the space of `to_absolute` (see squared_errors). Batch i uses fold_in(rng, i).
  """
  acc = metrics_lib.MeanAccumulator()
  sums: dict[str, list[float]] = {}
  n = 0
  for i, batch in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    key = jax.random.fold_in(rng, i)
    acc.add(trainer.eval_step(params, batch, key))
    if sample_step is not None:
      errors = squared_errors(sample_step(params, batch, key), batch,
                              trainer.config.model.energy_act_dim, to_absolute)
      for name, (err, count) in errors.items():
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(err)
        total[1] += float(count)
    n += 1
  if not n:
    raise ValueError("evaluation got no batch (empty eval split?)")
  out = acc.summary()
  for name, (err, count) in sums.items():
    out[name] = err / count if count else float("nan")
  return out, n


def evaluate_split(trainer: trainer_lib.Trainer, params: Any, *, rng: jax.Array,
                   num_batches: int | None = None, sample_step: Callable | None = None,
                   to_absolute: Callable | None = None) -> tuple[dict[str, float], int]:
  """`evaluate` over this run's held-out split (config.data), read and closed here."""
  with loader.open_iterator(trainer.config, "eval") as it:
    batches = (loader.to_global_batch(b, trainer.batch_sharding) for b in it)
    return evaluate(trainer, params, batches, rng=rng, num_batches=num_batches,
                    sample_step=sample_step, to_absolute=to_absolute)


def format_table(step: int, values: dict[str, float]) -> str:
  width = max(len(k) for k in values)
  lines = [f"eval at step {step}", f"{'metric':<{width}}  value", "-" * (width + 14)]
  lines += [f"{k:<{width}}  {v:.6g}" for k, v in sorted(values.items())]
  return "\n".join(lines)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
                     num_batches: int | None = -1, use_ema: bool | None = None,
                     num_steps: int = 10, refine_steps: int = 5,
                     step_sizes: Sequence[float] = DEFAULT_STEP_SIZES, max_step: float = 0.1,
                     num_candidates: Sequence[int] | None = None, write: bool = True,
                     print_fn: Callable[[str], None] | None = print
                     ) -> tuple[int, dict[str, float]]:
  """Evaluates the latest checkpoint of workdir; returns (step, {'eval/<name>': value}).

  num_batches: -1 = config.eval_batches, None or 0 = the whole eval split.
  use_ema: None = config.eval_use_ema.
  num_candidates: best-of-N sizes; None = config.eval_num_candidates.
  """
  config = loader.resolve_paths(config, workdir)
  # Normalize as the run trained: its checkpoint's norm stats (pipeline.weights).
  config = weights_lib.with_norm_stats(config, workdir)
  if mesh is None:
    mesh = sharding_lib.make_mesh(config.mesh.fsdp)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  trainer = trainer_lib.Trainer(config, mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, save_every=max(int(config.save_every), 1))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (train first, or check --workdir)")
    state, _ = ckpt.restore(step, trainer.abstract_state)
  finally:
    ckpt.close()
  use_ema = config.eval_use_ema if use_ema is None else use_ema
  params = trainer_lib.eval_params(state, trainer.mask, use_ema)
  if num_batches == -1:
    num_batches = config.eval_batches
  sample_step = jax.jit(
      make_sample_step(trainer.parts, num_steps=num_steps, refine_steps=refine_steps,
                       step_sizes=step_sizes, max_step=max_step,
                       num_candidates=(config.eval_num_candidates if num_candidates is None
                                       else num_candidates)),
      in_shardings=(trainer.param_shardings, trainer.batch_sharding, trainer.replicated),
      out_shardings=trainer.replicated)
  values, n = evaluate_split(trainer, params, rng=jax.random.key(config.seed + 1),
                             num_batches=num_batches or None, sample_step=sample_step,
                             to_absolute=absolute_action_space(config))
  values["num_batches"] = float(n)
  values["uses_ema"] = float(bool(use_ema and state.ema is not None))
  out = {f"eval/{k}": v for k, v in values.items()}
  if write:
    writer = metrics_lib.create_writer(workdir)
    writer.write_scalars(step, out)
    writer.flush()
  if print_fn is not None:
    print_fn(format_table(step, values))
  return step, out


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file(
      "config", None, "Training config file of the run, `path.py:variant`.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints, TensorBoard).")
  flags.DEFINE_integer("eval_batches", -1,
                       "Eval batches (-1: config.eval_batches, 0: the whole eval split).")
  flags.DEFINE_enum("use_ema", "config", ["config", "true", "false"],
                    "Evaluate EMA params (config: config.eval_use_ema).")
  flags.DEFINE_integer("num_steps", 10, "Euler steps of sample_actions.")
  flags.DEFINE_integer("refine_steps", 5, "Energy refinement steps (0: no refinement).")
  flags.DEFINE_list("refine_step_sizes", [f"{s:g}" for s in DEFAULT_STEP_SIZES],
                    "Refinement step sizes, one refined MSE each.")
  flags.DEFINE_float("refine_max_step", 0.1, "Bound on the L2 norm of one refinement step.")
  flags.DEFINE_list("num_candidates", None,
                    "Best-of-N sizes, one MSE each (default: config.eval_num_candidates).")
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  use_ema = {"config": None, "true": True, "false": False}[f.use_ema]
  try:
    step_sizes = [float(s) for s in f.refine_step_sizes]
    candidates = None if f.num_candidates is None else [int(n) for n in f.num_candidates]
  except ValueError as e:
    raise app.UsageError(f"--refine_step_sizes / --num_candidates must be numbers: {e}") from e
  workdir = os.path.abspath(os.path.expanduser(f.workdir))
  logging.set_verbosity(logging.WARNING)
  evaluate_workdir(f.config, workdir, num_batches=f.eval_batches, use_ema=use_ema,
                   num_steps=f.num_steps, refine_steps=f.refine_steps, step_sizes=step_sizes,
                   max_step=f.refine_max_step, num_candidates=candidates)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
