"""Shared base for the training configs.

Every config file exposes `get_config(arg)`; `arg` picks a variant:
  ''      the real run: full Pi0 on the prepared LIBERO ArrayRecord dataset, openpi weights.
  'smoke' a tiny CPU model on a synthetic dataset that `train.run` writes into the workdir.

Paths may contain '{workdir}', which `train.run` replaces with the run's workdir.
"""
from __future__ import annotations

import ml_collections

OPENPI_PI0_LIBERO = "gs://openpi-assets/checkpoints/pi0_libero/params"
VARIANTS = ("", "smoke")


def parse_arg(arg: str | None) -> str:
  arg = (arg or "").strip()
  if arg not in VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; expected one of {VARIANTS}")
  return arg


def model_config() -> ml_collections.ConfigDict:
  """Full-size Pi0 (openpi Pi0Config defaults) plus the energy head."""
  m = ml_collections.ConfigDict()
  m.paligemma_variant = "gemma_2b"
  m.action_expert_variant = "gemma_300m"
  m.vision_variant = "So400m/14"
  m.image_size = 224
  m.action_dim = 32
  m.action_horizon = 50
  m.max_token_len = 48
  m.vocab_size = 257_152
  m.dtype = "bfloat16"
  m.remat = True
  # off: no head; monitor: the flow model trains as openpi, energy statistics are only logged (no
  # gradient reaches any parameter);
  # joint: flow + energy_weight * InfoNCE; energy_only: only the head trains (prefix forward only).
  m.energy_mode = "monitor"
  m.energy_hidden = 512
  m.energy_heads = 8
  m.energy_layers = 4
  m.energy_act_dim = 7
  m.energy_tau = 0.5
  m.energy_weight = 0.1
  m.energy_dropout = 0.0
  return m


def data_config() -> ml_collections.ConfigDict:
  """config.data: the prepared dataset, its source, the host transforms and the Grain loader."""
  from pipeline.data import tokenizer  # pylint: disable=g-import-not-at-top

  d = ml_collections.ConfigDict()
  d.dataset_dir = "/data/pi0e/libero_arrayrecord"  # ArrayRecord dir written by data.prepare
  # When the dataset has no manifest yet, train.run prepares it from source_dir first.
  d.source_dir = ""
  d.source_format = "auto"
  # Write a procedural LIBERO-format source into source_dir when absent (smoke runs only).
  d.synthetic = False
  d.synthetic_episodes = 0
  d.synthetic_image_size = 64
  d.tokenizer_path = tokenizer.PALIGEMMA_TOKENIZER
  # The stats the weights were trained with, so the data matches them. '': this run's own
  # checkpoint when resuming, else init.weights' (openpi: <ckpt>/assets/<asset_id>/norm_stats.json
  # next to its params/; ours: the checkpoint's), else the dataset's; 'dataset': the dataset's
  # (dataset_dir/norm_stats.json); otherwise a norm_stats.json file or a directory holding one.
  d.norm_stats_path = ""
  d.asset_id = "physical-intelligence/libero"  # openpi's assets/<asset_id>/ (lookup and export)
  d.normalization = "zscore"  # pi0: zscore; pi05 / pi0-FAST: quantile
  # openpi pi0_libero's extra delta transform: actions[:, :6] -= state[:6] (gripper absolute)
  # before normalizing; actions go back to absolute wherever they leave the model. The stats
  # must be computed the same way (prepare --delta_action_dims).
  d.delta_action_dims = 6
  d.eval_fraction = 0.05  # share of episodes held out for evaluation
  d.split_seed = 0  # picks the held-out episodes; separate from shuffle_seed so they stay fixed
  d.eval_repeat = False  # eval iterates once unless True
  d.shuffle_seed = 0  # global shuffle order
  d.augment = True  # device-side training augmentation in the train step (never in eval)
  d.resize_on_device = True  # ship images at their stored size; False: resize on the host
  d.num_workers = 4  # decoding worker processes per host (0: threads in the main process)
  d.num_threads = 4  # reader threads, each building whole batches (per worker process)
  d.prefetch = 4  # batches read ahead by the reader threads (per worker process)
  d.worker_buffer = 2  # batches buffered per worker process
  d.skip_bad_records = False  # True: drop records that fail to decode (logged, counted)
  return d


def optim_config() -> ml_collections.ConfigDict:
  """openpi defaults: AdamW + clip 1.0, warmup-cosine 1k/2.5e-5/30k/2.5e-6, EMA 0.99."""
  o = ml_collections.ConfigDict()
  o.schedule = "warmup_cosine"  # 'warmup_cosine' | 'constant'
  o.peak_lr = 2.5e-5
  o.warmup_steps = 1_000
  o.decay_steps = 30_000  # optax counts warmup inside decay_steps, as openpi.
  o.end_lr = 2.5e-6
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 1e-10
  o.clip_norm = 1.0
  o.ema_decay = 0.99  # 0 disables EMA
  # model.energy_mode decides what may train (energy_only: the head only); within that, a
  # parameter ('/'-joined pure-dict path, re.fullmatch) trains iff it matches one of `trainable`
  # and none of `frozen`. Frozen params get no gradient and no optimizer state.
  o.trainable = (".*",)
  o.frozen = ()
  return o


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.batch_size = 32  # global, over all processes
  c.num_train_steps = 30_000
  c.log_every = 100
  c.eval_every = 1_000
  c.eval_batches = 8
  c.eval_use_ema = True
  c.eval_num_candidates = (4, 16)  # pipeline.evaluate: best-of-N sample MSE for each N
  c.save_every = 1_000
  c.max_bad_steps = 10  # consecutive non-finite steps before the run stops

  c.model = model_config()
  c.data = data_config()
  c.optim = optim_config()

  c.init = ml_collections.ConfigDict()
  # An openpi params dir (local or gs://; e.g. pipeline.export's D/params), one of our checkpoint
  # steps (<workdir>/checkpoints/<step>) or one of our workdirs (its latest step); '': random init.
  c.init.weights = OPENPI_PI0_LIBERO
  c.init.use_ema = True  # from our checkpoints: the EMA params where the state has them
  c.init.missing_ok = r"energy/.*"  # params that may be absent from the weights (keep their init)
  # The energy head alone, loaded over init.weights: `pipeline.export --only=energy`'s D/params,
  # or any of the forms of init.weights (only its energy/ params are taken). '': none.
  c.init.energy_weights = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = -1  # -1: all devices on the fsdp axis; data axis gets the rest

  c.sharding = ml_collections.ConfigDict()
  # Ordered (regex on '/'-joined param path, tactic); first re.fullmatch wins. A tactic is
  # 'fsdp', 'replicate' or a PartitionSpec-like tuple, e.g. (None, 'fsdp').
  c.sharding.rules = ((".*", "fsdp"),)
  c.sharding.min_size_mib = 4.0  # the 'fsdp' tactic replicates arrays smaller than this

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 1
  c.checkpoint.keep_period = 5_000  # also keep every step divisible by this (0: none)
  c.checkpoint.async_save = True

  c.profile = ml_collections.ConfigDict()
  c.profile.enabled = False
  c.profile.first_step = 10
  c.profile.num_steps = 5
  c.profile.every_secs = 3600.0
  return c


def tiny_model(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The smoke model (about 113k params): trains on a 2-core CPU in seconds."""
  from pipeline.data import tokenizer  # pylint: disable=g-import-not-at-top

  m.paligemma_variant = "tiny"
  m.action_expert_variant = "tiny"
  m.vision_variant = "tiny"
  m.image_size = 32
  m.action_horizon = 10
  m.max_token_len = 24  # the longest LIBERO prompt is 21 synthetic-tokenizer tokens
  m.vocab_size = tokenizer.SYNTHETIC_VOCAB_SIZE
  m.dtype = "float32"
  m.remat = False
  m.energy_hidden = 32
  m.energy_heads = 2
  m.energy_layers = 1
  return m


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Tiny model, synthetic data in the workdir, fast schedule: trains on a 2-core CPU."""
  from pipeline.data import tokenizer  # pylint: disable=g-import-not-at-top

  c.batch_size = 16
  c.num_train_steps = 300
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 2
  c.save_every = 100

  tiny_model(c.model)

  d = c.data
  d.source_dir = "{workdir}/synthetic_source"
  d.dataset_dir = "{workdir}/data"
  d.synthetic = True
  d.synthetic_episodes = 64
  d.eval_fraction = 0.1
  d.num_workers = 0
  d.num_threads = 2
  d.prefetch = 16
  d.augment = False
  d.tokenizer_path = tokenizer.SYNTHETIC_TOKENIZER

  o = c.optim
  o.peak_lr = 1e-3
  o.warmup_steps = 20
  o.decay_steps = 300
  o.end_lr = 1e-4
  o.ema_decay = 0.9

  c.init.weights = ""
  c.mesh.fsdp = 1
  c.sharding.min_size_mib = 0.0
  c.checkpoint.max_to_keep = 2
  c.checkpoint.keep_period = 0
  return c


def finalize(c: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  if arg == "smoke":
    apply_smoke(c)
  c.lock()  # unknown keys are errors, for overrides from code as well as from flags
  return c
