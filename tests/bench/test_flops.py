"""The benchmarks' FLOP counter: matmul / conv FLOPs from the jaxpr, loops per iteration."""
import jax
import jax.numpy as jnp

from pipeline.bench import flops


def _sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_count_flops_matmul():
  m, k, n = 8, 16, 4
  assert flops.count_flops(jnp.matmul, _sds(m, k), _sds(k, n))["flops"] == 2 * m * n * k
  # Batched: batch dims multiply.
  assert flops.count_flops(jnp.matmul, _sds(3, m, k), _sds(3, k, n))["flops"] == 3 * 2 * m * n * k


def test_count_flops_scan_counts_every_iteration():
  m, k = 8, 16

  def f(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0]

  args = (_sds(m, k), _sds(k, k))
  counted = flops.count_flops(f, *args)
  assert counted == {"flops": 10 * 2 * m * k * k, "uncounted_while": 0}
  # XLA counts the loop body once: the reason for the counter.
  xla = jax.jit(f).lower(*args).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 2 * 2 * m * k * k
  # A fori_loop with static bounds (a scan) and one with a traced bound (a while: counted once,
  # flagged).
  fori = lambda x, w, n: jax.lax.fori_loop(0, n, lambda i, c: c @ w, x)
  assert flops.count_flops(lambda x, w: fori(x, w, 7), *args)["flops"] == 7 * 2 * m * k * k
  dyn = flops.count_flops(fori, *args, jax.ShapeDtypeStruct((), jnp.int32))
  assert dyn == {"flops": 2 * m * k * k, "uncounted_while": 1}


def test_count_flops_mlp_value_and_grad():
  b, d0, d1, d2 = 4, 8, 16, 2

  def loss(params, x):
    h = jnp.tanh(x @ params["w1"])
    return jnp.sum((h @ params["w2"])**2)

  params = {"w1": _sds(d0, d1), "w2": _sds(d1, d2)}
  fwd = 2 * b * d0 * d1 + 2 * b * d1 * d2
  assert flops.count_flops(loss, params, _sds(b, d0))["flops"] == fwd
  # Backward: a weight-gradient matmul per layer, and an input-gradient matmul for every layer
  # but the first (x is not differentiated): fwd + fwd + the second layer's dL/dh.
  grad = jax.value_and_grad(loss)
  assert flops.count_flops(grad, params, _sds(b, d0))["flops"] == 2 * fwd + 2 * b * d2 * d1
  # Differentiating x too adds the first layer's input gradient: exactly 3x forward.
  grad_x = jax.value_and_grad(loss, argnums=(0, 1))
  assert flops.count_flops(grad_x, params, _sds(b, d0))["flops"] == 3 * fwd
  # remat recomputes the forward inside the backward: its matmuls count again.
  remat_grad = jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1))
  assert flops.count_flops(remat_grad, params, _sds(b, d0))["flops"] == 4 * fwd


def test_count_flops_conv():
  n, h, w, cin, cout, kh, kw, groups = 2, 9, 7, 6, 4, 3, 2, 2

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  counted = flops.count_flops(conv, _sds(n, h, w, cin), _sds(kh, kw, cin // groups, cout))
  out_elements = n * (h - kh + 1) * (w - kw + 1) * cout
  assert counted["flops"] == 2 * out_elements * kh * kw * cin // groups
