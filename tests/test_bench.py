"""pipeline.bench: every command runs on tiny settings and returns / prints valid JSON."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline import bench
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
  naive = bench.naive_pairwise(model, context, mask, actions)
  one = jax.jit(lambda c, m, a: model(c[None], m[None], a[None])[0])
  ref = np.array([[float(one(context[i], mask[i], actions[j])) for j in range(3)]
                  for i in range(3)])
  np.testing.assert_allclose(naive, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.pairwise(context, mask, actions), ref, rtol=1e-5, atol=1e-5)


def test_prefix_len_full_size():
  config = bench.mode_config("full", "joint", 32)
  assert bench.prefix_len(config.model) == 3 * 256 + 48  # the [32, 816, 2048] prefix output


def test_energy_tiny():
  # Timing is covered by test_step_tiny; here only the compiled costs (4 steps + the head).
  result = bench.run("energy", size="tiny", batch=4, time_size=None)
  _check_json(result)
  steps = result["steps"]
  assert set(steps) == set(bench.MODES)
  # The head adds work; the naive head more; energy-only skips the action expert's backward.
  assert steps["no_head"]["flops"] < steps["joint"]["flops"] < steps["naive"]["flops"]
  assert steps["energy_only"]["flops"] < steps["joint"]["flops"]
  assert result["naive_overhead"] > result["overhead"] > 0
  head = result["head"]
  assert head["context_shape"] == [4, bench.prefix_len(bench.mode_config("tiny", "joint", 4).model),
                                   32]
  assert head["naive"]["train"]["temp_bytes"] > head["pairwise"]["train"]["temp_bytes"]
  assert "timed" not in result
  table = bench.format_table(result)
  assert "overhead" in table and "naive" in table


def test_step_tiny():
  result = bench.run("step", size="tiny", batch=4, steps=1, peak=1.0)
  _check_json(result)
  for mode in ("joint", "energy_only"):
    r = result[mode]
    assert r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and r["flops"] > 0
    np.testing.assert_allclose(r["mfu"], r["flops"] * r["steps_per_s"] / 1e12, rtol=1e-6)
  assert "MFU" in bench.format_table(result)


def test_step_mfu_is_na_without_peak():
  if jax.devices()[0].platform != "cpu":
    pytest.skip("peak known for accelerators")
  assert bench.peak_tflops(None) is None
  assert bench.peak_tflops(2.5) == 2.5


def test_checkpoint_tiny():
  result = bench.run("checkpoint", size="tiny", batch=4, saves=2, extra_mib=(0, 1))
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
  result = bench.run("loader", dataset_dir=str(prepared_dataset), size="tiny", batch=4,
                     num_batches=2, workers=(0,), tokenizer_path=tokenizer.SYNTHETIC_TOKENIZER)
  _check_json(result)
  (row,) = result["rows"]
  assert row["workers"] == 0
  assert row["full_samples_per_s"] > 0 and row["decode_samples_per_s"] > 0
  assert "decode-only" in bench.format_table(result)


def test_main_prints_one_json_object(capsys, monkeypatch):
  monkeypatch.setattr(bench, "run", lambda command, **kw: {"command": command, "device": "x",
                                                          "kwargs": sorted(kw)})
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS(["bench", "--json", "--size=tiny"])
  try:
    bench.main(["bench", "checkpoint"])
  finally:
    flags.FLAGS.unparse_flags()
  out = json.loads(capsys.readouterr().out)
  assert out["command"] == "checkpoint" and "saves" in out["kwargs"]


def test_bad_command_and_size():
  with pytest.raises(ValueError, match="unknown bench command"):
    bench.run("nope")
  with pytest.raises(ValueError, match="size must be one of"):
    bench.mode_config("huge", "joint", 4)


# count_flops: matmul / conv FLOPs from the jaxpr, loops counted per iteration.


def _sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_count_flops_matmul():
  m, k, n = 8, 16, 4
  assert bench.count_flops(jnp.matmul, _sds(m, k), _sds(k, n))["flops"] == 2 * m * n * k
  # Batched: batch dims multiply.
  assert bench.count_flops(jnp.matmul, _sds(3, m, k), _sds(3, k, n))["flops"] == 3 * 2 * m * n * k


def test_count_flops_scan_counts_every_iteration():
  m, k = 8, 16

  def f(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0]

  args = (_sds(m, k), _sds(k, k))
  counted = bench.count_flops(f, *args)
  assert counted == {"flops": 10 * 2 * m * k * k, "uncounted_while": 0}
  # XLA counts the loop body once: the reason for the counter.
  xla = jax.jit(f).lower(*args).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 2 * 2 * m * k * k
  # A fori_loop with static bounds (a scan) and one with a traced bound (a while: counted once,
  # flagged).
  fori = lambda x, w, n: jax.lax.fori_loop(0, n, lambda i, c: c @ w, x)
  assert bench.count_flops(lambda x, w: fori(x, w, 7), *args)["flops"] == 7 * 2 * m * k * k
  dyn = bench.count_flops(fori, *args, jax.ShapeDtypeStruct((), jnp.int32))
  assert dyn == {"flops": 2 * m * k * k, "uncounted_while": 1}


def test_count_flops_mlp_value_and_grad():
  b, d0, d1, d2 = 4, 8, 16, 2

  def loss(params, x):
    h = jnp.tanh(x @ params["w1"])
    return jnp.sum((h @ params["w2"])**2)

  params = {"w1": _sds(d0, d1), "w2": _sds(d1, d2)}
  fwd = 2 * b * d0 * d1 + 2 * b * d1 * d2
  assert bench.count_flops(loss, params, _sds(b, d0))["flops"] == fwd
  # Backward: a weight-gradient matmul per layer, and an input-gradient matmul for every layer
  # but the first (x is not differentiated): fwd + fwd + the second layer's dL/dh.
  grad = jax.value_and_grad(loss)
  assert bench.count_flops(grad, params, _sds(b, d0))["flops"] == 2 * fwd + 2 * b * d2 * d1
  # Differentiating x too adds the first layer's input gradient: exactly 3x forward.
  grad_x = jax.value_and_grad(loss, argnums=(0, 1))
  assert bench.count_flops(grad_x, params, _sds(b, d0))["flops"] == 3 * fwd
  # remat recomputes the forward inside the backward: its matmuls count again.
  remat_grad = jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1))
  assert bench.count_flops(remat_grad, params, _sds(b, d0))["flops"] == 4 * fwd


def test_count_flops_conv():
  n, h, w, cin, cout, kh, kw, groups = 2, 9, 7, 6, 4, 3, 2, 2

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  counted = bench.count_flops(conv, _sds(n, h, w, cin), _sds(kh, kw, cin // groups, cout))
  out_elements = n * (h - kh + 1) * (w - kw + 1) * cout
  assert counted["flops"] == 2 * out_elements * kh * kw * cin // groups
