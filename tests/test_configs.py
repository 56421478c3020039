"""Config files: defaults of the real run, the smoke variant, locking and overrides."""
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from configs import energy_only
from configs import joint
from configs import pi0_libero

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"pi0_libero": pi0_libero, "energy_only": energy_only, "joint": joint}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_real_run_defaults(name):
  c = MODULES[name].get_config()
  assert c.model.paligemma_variant == "gemma_2b"
  assert c.model.action_expert_variant == "gemma_300m"
  assert c.model.vision_variant == "So400m/14"
  assert c.init.weights == "gs://openpi-assets/checkpoints/pi0_libero/params"
  assert c.init.missing_ok == "energy/.*"
  assert (c.batch_size, c.seed) == (32, 42)
  o = c.optim
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 1e-10, 1.0)
  assert (o.schedule, o.warmup_steps, o.peak_lr, o.decay_steps, o.end_lr) == (
      "warmup_cosine", 1000, 2.5e-5, 30000, 2.5e-6)
  assert o.ema_decay == 0.99
  assert c.data.dataset_dir and not c.data.synthetic
  # openpi pi0_libero's data recipe: delta on dims 0-5, the weights' own norm stats.
  assert (c.data.delta_action_dims, c.data.normalization) == (6, "zscore")
  assert c.data.norm_stats_path == "" and c.data.asset_id == "physical-intelligence/libero"
  assert c.init.use_ema and c.init.energy_weights == ""


def test_modes():
  p, e, j = pi0_libero.get_config(), energy_only.get_config(), joint.get_config()
  assert p.model.energy_mode == "monitor"
  assert p.optim.trainable == (".*",) and p.optim.frozen == ()
  assert e.model.energy_mode == "energy_only" and e.optim.trainable == (".*",)
  assert j.model.energy_mode == "joint"
  assert j.model.energy_weight == 0.1


def _trained(config):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from pipeline import trainer  # pylint: disable=g-import-not-at-top
  params = {"energy": {"head": {"w": np.zeros(2)}, "enc": {"w": np.zeros(2)}},
            "PaliGemma": {"llm": {"w": np.zeros(2)}}}
  mask = traverse_util.flatten_dict(trainer.trainable_mask(config, params), sep="/")
  return sorted(k for k, v in mask.items() if v)


def test_trainable_set_follows_the_mode_and_optim_narrows_it():
  assert _trained(energy_only.get_config()) == ["energy/enc/w", "energy/head/w"]
  assert _trained(joint.get_config()) == ["PaliGemma/llm/w", "energy/enc/w", "energy/head/w"]
  c = energy_only.get_config()
  c.optim.trainable = ("energy/head/.*",)
  assert _trained(c) == ["energy/head/w"]
  c = pi0_libero.get_config()
  c.optim.frozen = ("energy/.*",)
  assert _trained(c) == ["PaliGemma/llm/w"]
  c = energy_only.get_config()
  c.optim.trainable = ("PaliGemma/.*",)  # cannot widen the mode
  with pytest.raises(ValueError, match="leaves no trainable parameter within "
                     "model.energy_mode='energy_only'"):
    _trained(c)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_smoke_variant(name):
  c = MODULES[name].get_config("smoke")
  assert c.model.paligemma_variant == "tiny" and c.model.vision_variant == "tiny"
  assert c.init.weights == ""
  assert c.data.synthetic
  assert c.data.source_dir == "{workdir}/synthetic_source"
  assert c.data.dataset_dir == "{workdir}/data"
  assert c.mesh.fsdp == 1


def test_unknown_variant():
  with pytest.raises(ValueError, match="bogus"):
    energy_only.get_config("bogus")


def test_locked_config_rejects_unknown_key():
  c = energy_only.get_config("smoke")
  with pytest.raises(AttributeError, match="nonexistent_key"):
    c.model.nonexistent_key = 1
  with pytest.raises(AttributeError, match="nonexistent"):
    c.nonexistent = 1
  c.optim.peak_lr = 1e-3  # existing keys stay writable
  assert c.optim.peak_lr == 1e-3


def _parse(argv, monkeypatch):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides from sys.argv
  fv(argv)
  return fv.config


def test_flag_overrides(monkeypatch):
  c = _parse(["prog", f"--config={ROOT}/configs/joint.py:smoke", "--config.optim.peak_lr=0.01",
              "--config.optim.frozen=('PaliGemma/img/.*',)", "--config.batch_size=8",
              "--config.sharding.rules=(('PaliGemma/img/.*', 'replicate'), ('.*', 'fsdp'))"],
             monkeypatch)
  assert c.sharding.rules == (("PaliGemma/img/.*", "replicate"), (".*", "fsdp"))
  assert c.optim.peak_lr == 0.01
  assert c.optim.frozen == ("PaliGemma/img/.*",)
  assert c.batch_size == 8
  assert isinstance(c, ml_collections.ConfigDict)


def test_main_unknown_override_names_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "pipeline.main", "--config=configs/energy_only.py:smoke",
       "--config.model.nonexistent_key=3", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config key 'nonexistent_key'" in proc.stderr
  assert "--config.model.nonexistent_key=3" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing ran


def test_common_variants_listed():
  assert common.parse_arg(None) == "" and common.parse_arg("smoke") == "smoke"
