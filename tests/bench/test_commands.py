"""pipeline.bench: every command runs on tiny settings and returns / prints valid JSON."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline.bench import __main__ as bench_main
from pipeline.bench import checkpoint as bench_checkpoint
from pipeline.bench import energy as bench_energy
from pipeline.bench import harness
from pipeline.bench import loader as bench_loader
from pipeline.bench import naive_head
from pipeline.bench import sample as bench_sample
from pipeline.bench import serve as bench_serve
from pipeline.bench import step as bench_step
from pipeline.data import tokenizer
from pipeline.models import energy as energy_lib
from tests.data.conftest import prepared_dataset  # pylint: disable=unused-import


def _check_json(result):
  text = json.dumps(result)
  assert json.loads(text)["command"] == result["command"]
  return text


def test_naive_pairwise_matches_pairwise():
  """The bench's naive reference computes the same [B, B] energies as the O(B) pairwise head."""
  model = energy_lib.EnergyModel(16, 3, hidden=8, heads=2, num_layers=1, horizon=4,
                                 rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  context = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(3, 5)) > 0.3).at[:, 0].set(True)
  actions = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
  naive = naive_head.naive_pairwise(model, context, mask, actions)
  one = jax.jit(lambda c, m, a: model(c[None], m[None], a[None])[0])
  ref = np.array([[float(one(context[i], mask[i], actions[j])) for j in range(3)]
                  for i in range(3)])
  np.testing.assert_allclose(naive, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.pairwise(context, mask, actions), ref, rtol=1e-5, atol=1e-5)


def test_prefix_len_full_size():
  config = harness.mode_config("full", "joint", 32)
  assert harness.prefix_len(config.model) == 3 * 256 + 48  # the [32, 816, 2048] prefix output


def test_energy_tiny():
  # Timing is covered by test_step_tiny; here only the compiled costs (4 steps + the head), on
  # one device and per device on 8.
  result = bench_energy.run(size="tiny", batch=8, time_size=None, devices=8)
  _check_json(result)
  steps = result["steps"]
  assert set(steps) == set(harness.MODES)
  # The head adds work; the naive head more; energy-only skips the action expert's backward.
  assert steps["no_head"]["flops"] < steps["joint"]["flops"] < steps["naive"]["flops"]
  assert steps["energy_only"]["flops"] < steps["joint"]["flops"]
  assert result["naive_overhead"] > result["overhead"] > 0
  head = result["head"]
  assert head["context_shape"] == [8, harness.prefix_len(harness.mode_config("tiny", "joint", 8).model),
                                   32]
  assert head["naive"]["train"]["temp_bytes"] > head["pairwise"]["train"]["temp_bytes"]
  assert "timed" not in result
  # On 8 devices each does about an eighth of the head's work (1 context each).
  multi = result["multi"]
  assert set(multi["steps"]) == set(bench_energy.MULTI_MODES)
  assert 0 < multi["head_device_flops_ratio"] <= 0.2
  assert 0 < multi["head_alone_train_device_flops_ratio"] <= 0.2
  assert result["targets"]["head_flops_per_device_le_0.2x_at_8"]
  table = bench_energy.format_table(result)
  assert "overhead" in table and "naive" in table and "1 vs 8 devices" in table


def test_step_tiny():
  # Batch 8: the steps test_energy_tiny compiled (one compile per shape and process).
  result = bench_step.run(size="tiny", batch=8, steps=1, peak=1.0)
  _check_json(result)
  for mode in ("joint", "energy_only"):
    r = result[mode]
    assert r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and r["flops"] > 0
    np.testing.assert_allclose(r["mfu"], r["flops"] * r["steps_per_s"] / 1e12, rtol=1e-6)
  assert "MFU" in bench_step.format_table(result)


def test_step_mfu_is_na_without_peak():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("peak known for accelerators")
  assert harness.peak_tflops(None) is None
  assert harness.peak_tflops(2.5) == 2.5


def test_checkpoint_tiny():
  result = bench_checkpoint.run(size="tiny", batch=4, saves=2, extra_mib=(0, 1))
  _check_json(result)
  small, large = result["rows"]
  assert large["state_mib"] - small["state_mib"] == pytest.approx(1.0)
  assert large["num_arrays"] == small["num_arrays"] + 1
  for row in result["rows"]:
    for name in ("async", "sync"):
      assert len(row[name]["blocked_all_s"]) == 2
      assert 0 < row[name]["blocked_s"] <= row[name]["total_s"]
  assert result["async_over_sync_blocked"] == large["async_over_sync_blocked"] > 0
  assert result["full_state_mib"] > 40 * 1024  # Pi0: ~3.3 B params, AdamW moments and EMA


def test_loader_tiny(prepared_dataset):  # pylint: disable=redefined-outer-name
  result = bench_loader.run(dataset_dir=str(prepared_dataset), size="tiny", batch=4,
                     num_batches=2, workers=(0,), tokenizer_path=tokenizer.SYNTHETIC_TOKENIZER)
  _check_json(result)
  (row,) = result["rows"]
  assert row["workers"] == 0
  assert row["full_samples_per_s"] > 0 and row["decode_samples_per_s"] > 0
  assert "decode-only" in bench_loader.format_table(result)


def test_main_prints_one_json_object(capsys, monkeypatch):
  def fake_run(**kw):
    print("progress goes to stderr")
    return {"command": "checkpoint", "device": "x", "kwargs": sorted(kw)}

  monkeypatch.setattr(bench_checkpoint, "run", fake_run)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(["bench", "--json", "--size=tiny"])
  try:
    bench_main.main(["bench", "checkpoint"])
  finally:
    flags.FLAGS.unparse_flags()
  out = json.loads(capsys.readouterr().out)
  assert out["command"] == "checkpoint" and "saves" in out["kwargs"]


def test_bad_command_and_size():
  from absl import app  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="energy"):
    bench_main.main(["bench", "nope"])
  with pytest.raises(ValueError, match="size must be one of"):
    harness.mode_config("huge", "joint", 4)


def test_steps_compile_on_the_loaders_batch():
  """The benchmarked step takes what the loader ships: uint8 cameras at 256 px, no right wrist."""
  trainer = harness.make_trainer("tiny", "joint", 4)
  spec = harness.step_batch_spec(trainer)
  assert set(spec["image"]) == {"base_0_rgb", "left_wrist_0_rgb"}
  assert spec["image"]["base_0_rgb"].shape == (4, 256, 256, 3)
  assert spec["image"]["base_0_rgb"].dtype == np.uint8


def test_sample_tiny():
  result = bench_sample.run(size="tiny", candidates=(2, 4), time_size="tiny", steps=1)
  _check_json(result)
  flops = result["flops"]
  # Candidates share the prefix: each adds less than a whole plain sample.
  assert flops["plain"] < flops["best_of_2"] < flops["best_of_4"] < 4 * flops["plain"]
  assert result["flops_over_plain"]["best_of_4"] == pytest.approx(
      flops["best_of_4"] / flops["plain"])
  assert set(result["timed"]["seconds"]) == {"plain", "best_of_2", "best_of_4"}
  assert "best_of_4" in bench_sample.format_table(result)


def test_serve_tiny():
  """Through real servers and openpi clients: every variant answered, percentiles ordered."""
  result = bench_serve.run(size="tiny", requests=3, candidates=(2,), refine_steps=1)
  _check_json(result)
  assert set(result["ms"]) == {"plain", "best_of_2", "refine_1"}
  for m in result["ms"].values():
    assert 0 < m["model"]["p50"] <= m["infer"]["p50"] <= m["infer"]["p95"]
  assert result["over_plain"]["plain"] == {"p50": 1.0, "p95": 1.0}
  assert "best_of_2" in bench_serve.format_table(result)
