"""A small nnx model with the Pi0 training interface, for optimizer / checkpoint tests."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx


class TinyNet(nnx.Module):
  """backbone (frozen in energy-only tests) + energy head; loss = MSE of a 2-layer MLP."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    self.backbone = nnx.Dict(
        embed=nnx.Linear(cfg.din, cfg.width, rngs=rngs),
        layers=nnx.List([nnx.Linear(cfg.width, cfg.width, rngs=rngs) for _ in range(2)]))
    self.energy = nnx.Dict(out=nnx.Linear(cfg.width, cfg.dout, rngs=rngs))

  def compute_train_loss(self, rng, obs, actions, *, train=True, augment=False):
    del train, augment
    h = jnp.tanh(self.backbone["embed"](obs["x"]))
    for layer in self.backbone["layers"]:
      h = jnp.tanh(layer(h))
    noise = 0.01 * jax.random.normal(rng, actions.shape)
    err = self.energy["out"](h) - actions + noise
    loss = jnp.mean(err**2)
    return loss, {"energy_loss": loss, "E_pos": jnp.mean(err), "E_neg": jnp.max(err),
                  "energy_accuracy": jnp.mean(jnp.abs(err) < 0.5)}

  def compute_loss(self, rng, obs, actions, *, train=False):
    return self.compute_train_loss(rng, obs, actions, train=train)[0] * jnp.ones((1, 1))


def build_tiny(cfg, rngs):
  return TinyNet(cfg, rngs)


def model_config(din=8, width=64, dout=4):
  return ml_collections.ConfigDict(dict(din=din, width=width, dout=dout))


def batch(n=16, din=8, dout=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, din)).astype(np.float32)
  return {"x": x, "actions": np.tanh(x[:, :dout] * 2).astype(np.float32)}
