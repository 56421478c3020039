"""A trained Pi0 as a LIBERO policy: one observation in openpi's format -> an absolute action chunk.

  policy = Policy.load(W, step=None, options=SamplingOptions(num_candidates=4))
  policy.infer({"observation/image": uint8 [H, W, 3], "observation/wrist_image": uint8 [H, W, 3],
                "observation/state": [8], "prompt": str})
    -> {"actions": float32 [action_horizon, 7], "policy_timing": {"infer_ms": ...},
        + "energy" (float) when the energy head took part, "candidate_energies" (N floats) with
        best-of-N}

W is what pipeline.weights resolves: one of our workdirs or steps (the run's saved config; EMA
params where kept) or an openpi params dir such as pipeline.export's D (then `config` names the
model). What openpi's pi0_libero policy does around its model is done by this project's own
pieces, so that serving sees the input training saw:
  LiberoInputs, Normalize, ResizeImages(224), TokenizePrompt, PadStatesAndActions
      -> FrameTransform.observation (the loader's per-frame code: resize with pad to
         model.image_size on the host, normalize and pad the state, tokenize the prompt)
  the model -> Pi0.sample_with_energies (sample_actions' code), jitted once, params in the
      trainer's shardings (FSDP rules over the devices), the observation replicated
  Unnormalize, AbsoluteActions, LiberoOutputs -> FrameTransform.absolute_actions (first 7 dims)
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from pipeline import optim
from pipeline import sharding as sharding_lib
from pipeline import trainer as trainer_lib
from pipeline import weights as weights_lib
from pipeline.data import loader
from pipeline.data import records

# Request key -> FrameTransform image field (openpi's LiberoInputs: base and left wrist cameras).
IMAGE_KEYS = {"observation/image": "image", "observation/wrist_image": "wrist_image"}
STATE_KEY, PROMPT_KEY = "observation/state", "prompt"
# Optional, ours: the noise of this request comes from jax.random.key(seed) (reproducible calls).
SEED_KEY = "seed"
REQUIRED_KEYS = (*IMAGE_KEYS, STATE_KEY, PROMPT_KEY)
MAX_IMAGE_SIDE = 4096  # a larger image is a mistake, not a camera


class RequestError(ValueError):
  """A malformed observation; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  num_steps: int = 10  # Euler steps of the flow
  num_candidates: int = 1  # > 1: best-of-N by energy
  refine_steps: int = 0  # > 0: gradient steps on the energy after sampling
  refine_step_size: float = 0.1
  refine_max_step: float = 0.1
  seed: int = 0  # request i (counted over all clients) uses fold_in(key(seed), i)

  @property
  def uses_energy(self) -> bool:
    return self.num_candidates > 1 or self.refine_steps > 0

  def check(self) -> None:
    if self.num_steps < 1 or self.num_candidates < 1 or self.refine_steps < 0:
      raise ValueError(f"need num_steps >= 1, num_candidates >= 1, refine_steps >= 0; got {self}")


def _describe(x: Any) -> str:
  if isinstance(x, np.ndarray):
    return f"an array of shape {x.shape} dtype {x.dtype}"
  return f"a {type(x).__name__}"


def serving_mesh(config: ml_collections.ConfigDict, fsdp: int | None = None):
  """The run's mesh.fsdp where it divides this host's devices, else every device on fsdp."""
  fsdp = int(config.mesh.fsdp if fsdp is None else fsdp)
  if fsdp != -1 and jax.device_count() % fsdp:
    fsdp = -1  # trained on another device count: shard over what is here
  return sharding_lib.make_mesh(fsdp)


class Policy:
  """Host transforms + one jitted sampler; `infer` is thread-safe for one caller at a time."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any,
               trainer: trainer_lib.Trainer, options: SamplingOptions = SamplingOptions(),
               info: dict | None = None):
    """config.data.norm_stats_path must name the stats the params were trained with."""
    options.check()
    if options.uses_energy and "energy" not in params:
      raise ValueError("--num_candidates > 1 / --refine_steps > 0 need the energy head; this "
                       f"model has none (config.model.energy_mode={config.model.energy_mode!r})")
    self.config, self.params, self.options = config, params, options
    self.transform = loader.make_frame_transform(config)  # the training loader's transform
    self.state_dim = int(self.transform.norm_stats["state"]["mean"].shape[-1])
    self.act_dim = int(self.transform.norm_stats["actions"]["mean"].shape[-1])
    self._requests = itertools.count()
    o, mesh = options, trainer.mesh

    def sample(params, batch, rng):
      return trainer.parts.bind(params).sample_with_energies(
          rng, batch, num_steps=o.num_steps, num_candidates=o.num_candidates,
          refine_steps=o.refine_steps, refine_step_size=o.refine_step_size,
          refine_max_step=o.refine_max_step)

    self._sample = jax.jit(trainer_lib.under_mesh(mesh, sample),
                           in_shardings=(trainer.param_shardings, trainer.replicated,
                                         trainer.replicated),
                           out_shardings=trainer.replicated)
    m, d = config.model, config.data
    self.metadata = {
        "server": "pi0-energy", **(info or {}), "norm_stats": d.norm_stats_path,
        "action_horizon": int(m.action_horizon), "action_dim": self.act_dim,
        "state_dim": self.state_dim, "image_size": int(m.image_size),
        "max_token_len": int(m.max_token_len), "normalization": d.normalization,
        "delta_action_dims": int(d.delta_action_dims), "energy_head": "energy" in params,
        "best_of_n": o.num_candidates > 1, "refine": o.refine_steps > 0,
        **dataclasses.asdict(o), "devices": int(mesh.devices.size),
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()}}

  @classmethod
  def load(cls, path: str, *, step: int | None = None,
           config: ml_collections.ConfigDict | None = None,
           options: SamplingOptions = SamplingOptions(), use_ema: bool = True,
           fsdp: int | None = None) -> "Policy":
    """Weights (+ norm stats) of `path` (see the module docstring) into the serving mesh."""
    options.check()  # before anything is read
    asset_id = config.data.asset_id if config is not None else weights_lib.DEFAULT_ASSET_ID
    if step is not None:
      path = f"{path.rstrip('/')}/checkpoints/{step}"
    source = weights_lib.resolve(path, asset_id=asset_id,
                                 field="--step" if step is not None else "--workdir")
    if config is None:
      if source.kind != weights_lib.OURS or not source.config:
        raise ValueError(f"{source.describe()} holds no config: pass --config (the model's "
                         "config file, e.g. configs/pi0_libero.py)")
      config = ml_collections.ConfigDict(source.config)
    else:
      weights_lib.check_recipe(source, config)
    if source.norm_stats_path is None:
      raise FileNotFoundError(f"{source.describe()} comes without norm stats (looked for "
                              f"{source.norm_stats_looked_for}); its actions cannot be "
                              "unnormalized")
    config = copy.deepcopy(config)
    with config.unlocked():
      config.data.norm_stats_path = source.norm_stats_path  # the stats it trained with
    trainer = trainer_lib.Trainer(config, serving_mesh(config, fsdp))
    target = trainer_lib.with_shardings(trainer.parts.abstract_params, trainer.param_shardings)
    # A head that is not used may be absent (openpi's own params); one that is used may not.
    missing_ok = r"energy/.*" if not options.uses_energy else ""
    params, fresh, used_ema = weights_lib.load(source, target, missing_ok=missing_ok,
                                               use_ema=use_ema)
    if fresh:  # an unused head absent from the weights: keep a fresh one, never read
      params = optim.merge(params, trainer.init_params(jax.random.key(0), fresh))
    info = {"weights": source.describe(), "step": source.step, "ema": used_ema,
            "energy_weights": "energy" in params and not fresh}
    return cls(config, params, trainer, options, info)

  # -------------------------------------------------------------------------------------------

  def check_request(self, obs: Any) -> tuple[dict, np.ndarray, str, jax.Array]:
    """(images by transform field, raw state, prompt, noise key) of a request, or RequestError."""
    if not isinstance(obs, dict):
      raise RequestError(f"a request is a dict of {list(REQUIRED_KEYS)}, got {_describe(obs)}")
    missing = [k for k in REQUIRED_KEYS if k not in obs]
    if missing:
      raise RequestError(f"missing key(s) {missing} (got {sorted(map(str, obs))})")
    images = {}
    for key, field in IMAGE_KEYS.items():
      img = obs[key]
      if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or
          img.shape[-1] != 3 or not 0 < min(img.shape[:2]) <= max(img.shape[:2]) <= MAX_IMAGE_SIDE):
        raise RequestError(f"{key!r} must be a uint8 array [H, W, 3] (H, W in 1..{MAX_IMAGE_SIDE})"
                           f", got {_describe(img)}")
      images[field] = img
    state = obs[STATE_KEY]
    if isinstance(state, (list, tuple)):
      state = np.asarray(state)
    if (not isinstance(state, np.ndarray) or state.dtype.kind not in "iuf" or
        state.shape != (self.state_dim,)):
      raise RequestError(f"{STATE_KEY!r} must be {self.state_dim} numbers, got {_describe(state)}")
    if not np.all(np.isfinite(state)):
      raise RequestError(f"{STATE_KEY!r} holds non-finite values: {state.tolist()}")
    prompt = obs[PROMPT_KEY]
    if not isinstance(prompt, str):
      raise RequestError(f"{PROMPT_KEY!r} must be a str, got {_describe(prompt)}")
    tokens, budget = len(self.transform.tokenizer.encode(prompt)), self.config.model.max_token_len
    if tokens > budget:
      raise RequestError(f"{PROMPT_KEY!r} is {tokens} tokens, over the model's budget "
                         f"(model.max_token_len={budget}): {prompt!r}")
    seed = obs.get(SEED_KEY)
    if seed is None:
      rng = jax.random.fold_in(jax.random.key(self.options.seed), next(self._requests))
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2**32:
      rng = jax.random.key(int(seed))
    else:
      raise RequestError(f"{SEED_KEY!r} must be an int in [0, 2**32), got {seed!r}")
    return images, state.astype(np.float32), prompt, rng

  def batch(self, images: dict, state: np.ndarray, prompt: str) -> dict:
    """The model's batch of one observation: the training loader's transform, batch dim 1."""
    try:
      example = self.transform.observation(images, state, prompt)
    except records.RecordError as e:
      raise RequestError(str(e)) from e
    return jax.tree.map(lambda x: np.asarray(x)[None], example)

  def infer(self, obs: Any) -> dict:
    images, state, prompt, rng = self.check_request(obs)
    batch = self.batch(images, state, prompt)
    start = time.monotonic()
    out = jax.device_get(self._sample(self.params, batch, rng))
    model_ms = (time.monotonic() - start) * 1e3
    result = {"actions": self.transform.absolute_actions(out["actions"][0], state,
                                                         act_dim=self.act_dim)}
    if "energy" in out:
      result["energy"] = float(out["energy"][0])
    if "candidate_energies" in out:
      result["candidate_energies"] = [float(e) for e in out["candidate_energies"][0]]
    result["policy_timing"] = {"infer_ms": model_ms}
    return result

  def warmup(self) -> float:
    """Compiles the sampler on a blank observation; returns the seconds it took."""
    blank = np.zeros((256, 256, 3), np.uint8)  # LIBERO's camera size: the host resize runs too
    start = time.monotonic()
    self.infer({"observation/image": blank, "observation/wrist_image": blank,
                STATE_KEY: np.zeros(self.state_dim, np.float32), PROMPT_KEY: "", SEED_KEY: 0})
    # The per-request key of requests without a seed (op by op: compiled on first use).
    jax.block_until_ready(jax.random.fold_in(jax.random.key(self.options.seed), 0))
    seconds = time.monotonic() - start
    logging.info("policy: compiled and ran the sampler in %.1f s", seconds)
    return seconds
