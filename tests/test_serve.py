"""pipeline.serve with openpi's own client (openpi-client from PyPI) on a tiny trained workdir.

One server process (best-of-3, one CPU device, as `python -m pipeline.serve` runs by default)
serves the protocol tests; in-process servers with the params sharded over the 8 host devices
cover plain sampling and refinement; openpi-layout params are served in process too. Every
answer is compared with Pi0.sample_actions run directly on the restored checkpoint (EMA params),
one device, same seed.
"""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
from openpi_client import action_chunk_broker
from openpi_client import websocket_client_policy

from pipeline import checkpoint as checkpoint_lib
from pipeline import export
from pipeline import policy as policy_lib
from pipeline import serve
from pipeline import train
from pipeline import trainer as trainer_lib
from pipeline import weights
from pipeline.data import loader
from pipeline.data import normalization
from tests.data.conftest import prepared_dataset  # pylint: disable=unused-import
from tests.test_evaluate import one_device_mesh
from tests.test_evaluate import tiny_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
CANDIDATES = 3
PROMPT = "put the bowl on the plate"


@pytest.fixture(scope="module")
def run(tmp_path_factory, prepared_dataset):  # pylint: disable=redefined-outer-name
  """(workdir, config) of a tiny energy_only run of STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("serve_workdir"))
  config = tiny_config(prepared_dataset)
  config.num_train_steps = config.save_every = STEPS
  config.eval_every = 0  # no evaluation: only the checkpoint matters here
  train.run(config, workdir, one_device_mesh())
  return workdir, config


@pytest.fixture(scope="module")
def server_process(run):
  """`python -m pipeline.serve --num_candidates=3` on one CPU device, on a free port, starting.

  Started before the reference is built, so that both compile at the same time.
  """
  workdir = run[0]
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS="")  # the default: one device
  log = open(os.path.join(workdir, "serve.log"), "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, "-m", "pipeline.serve", f"--workdir={workdir}", f"--port={port}",
       "--host=127.0.0.1", f"--num_candidates={CANDIDATES}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  yield dict(proc=proc, port=port, log=os.path.join(workdir, "serve.log"))
  if proc.poll() is None:
    proc.kill()
  log.close()


@pytest.fixture(scope="module")
def trained(run, server_process):  # pylint: disable=redefined-outer-name,unused-argument
  """The run and the reference: its EMA params, restored as evaluation does, sampled directly."""
  workdir, config = run
  config = weights.with_norm_stats(loader.resolve_paths(config, workdir), workdir)
  trainer = trainer_lib.Trainer(config, one_device_mesh())
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=STEPS)
  state, _ = ckpt.restore(STEPS, trainer.abstract_state)
  ckpt.close()
  assert state.ema is not None
  params = trainer_lib.eval_params(state, trainer.mask, use_ema=True)
  transform = loader.make_frame_transform(config)
  samplers = {}

  def direct(obs, seed, **kw):
    """(sample_with_energies outputs, absolute actions) of one observation, run directly."""
    key = tuple(sorted(kw.items()))
    if key not in samplers:
      samplers[key] = jax.jit(lambda p, b, k, kw=kw: trainer.parts.bind(p).sample_with_energies(
          k, b, num_steps=10, **kw))
    images = {"image": obs["observation/image"], "wrist_image": obs["observation/wrist_image"]}
    example = transform.observation(images, obs["observation/state"], obs["prompt"])
    batch = jax.tree.map(lambda x: np.asarray(x)[None], example)
    out = jax.device_get(samplers[key](params, batch, jax.random.key(seed)))
    # openpi's Unnormalize + AbsoluteActions + LiberoOutputs, written out: z-score back, the
    # first 6 dims relative to the state, 7 dims kept.
    stats = transform.norm_stats["actions"]
    raw = out["actions"][0, :, :7] * (stats["std"] + normalization.NORM_EPS) + stats["mean"]
    raw[:, :6] += np.asarray(obs["observation/state"], np.float32)[:6]
    return out, raw

  direct(observation(), 0, num_candidates=CANDIDATES)  # compiles while the server does
  return dict(workdir=workdir, config=config, direct=direct)


def observation(size=(256, 256), seed=0, **extra):
  rng = np.random.default_rng(seed)
  return {"observation/image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
          "observation/wrist_image": rng.integers(0, 256, (*size, 3), dtype=np.uint8),
          "observation/state": rng.normal(size=8).astype(np.float32), "prompt": PROMPT, **extra}


@pytest.fixture(scope="module")
def server(server_process, trained):  # pylint: disable=unused-argument
  """The server process once warm and listening (it prints one line then)."""
  line = server_process["proc"].stdout.readline()
  if "listening" not in line:
    server_process["proc"].kill()
    log = Path(server_process["log"]).read_text()[-3000:]
    pytest.fail(f"server did not start: {line!r}\n{log}")
  return server_process


@pytest.fixture(scope="module")
def client(server):
  return websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server["port"])


def test_metadata_and_health(client, server):
  meta = client.get_server_metadata()
  assert meta["server"] == "pi0-energy" and meta["step"] == STEPS and meta["ema"] is True
  assert meta["best_of_n"] is True and meta["num_candidates"] == CANDIDATES
  assert meta["refine"] is False and meta["refine_steps"] == 0
  assert (meta["action_horizon"], meta["action_dim"], meta["state_dim"]) == (10, 7, 8)
  assert meta["devices"] == 1
  url = f"http://127.0.0.1:{server['port']}/healthz"
  assert urllib.request.urlopen(url, timeout=10).status == 200


@pytest.mark.parametrize("size", [(256, 256), (180, 240)])
def test_actions_equal_direct_best_of_n(client, trained, size):
  obs = observation(size, seed=1)
  # Keys other than LIBERO's are ignored, as openpi's LiberoInputs does.
  got = client.infer(dict(obs, seed=5, **{"observation/joint_state": np.zeros(7)}))
  out, want = trained["direct"](obs, 5, num_candidates=CANDIDATES)
  assert got["actions"].shape == (10, 7) and got["actions"].dtype == np.float32
  np.testing.assert_allclose(got["actions"], want, rtol=1e-4, atol=1e-4)
  # The chunk kept is the lowest-energy candidate; its energy is their minimum.
  energies = np.asarray(got["candidate_energies"])
  np.testing.assert_allclose(energies, out["candidate_energies"][0], rtol=1e-4, atol=1e-5)
  assert got["energy"] == pytest.approx(energies.min())
  assert set(got["server_timing"]) >= {"infer_ms"} and got["policy_timing"]["infer_ms"] > 0


def test_requests_without_seed_draw_fresh_noise(client):
  obs = observation(seed=2)
  a, b = client.infer(obs)["actions"], client.infer(obs)["actions"]
  assert not np.allclose(a, b)
  assert "prev_total_ms" in client.infer(obs)["server_timing"]


def test_chunk_broker_steps_through_the_chunk(server):
  """openpi's ActionChunkBroker (what LIBERO rollouts wrap the client in) takes our answers."""
  broker = action_chunk_broker.ActionChunkBroker(
      websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server["port"]),
      action_horizon=5)
  first = broker.infer(observation(seed=3))
  assert first["actions"].shape == (7,)


BAD = {
    "missing key": (lambda o: o.pop("observation/wrist_image"), "observation/wrist_image"),
    "image dtype": (lambda o: o.update({"observation/image": o["observation/image"] / 255.0}),
                    "observation/image"),
    "image shape": (lambda o: o.update({"observation/image": o["observation/image"][..., 0]}),
                    "observation/image"),
    "state length": (lambda o: o.update({"observation/state": np.zeros(7, np.float32)}),
                     "observation/state"),
    "state NaN": (lambda o: o["observation/state"].__setitem__(3, np.nan), "non-finite"),
    "state strings": (lambda o: o.update({"observation/state": ["a"] * 8}), "observation/state"),
    "long prompt": (lambda o: o.update(prompt="pick up the black bowl " * 10), "max_token_len"),
    "prompt type": (lambda o: o.update(prompt=3), "'prompt'"),
    "bad seed": (lambda o: o.update(seed=-1), "'seed'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_a_text_error_and_the_next_request_succeeds(client, name):
  spoil, words = BAD[name]
  obs = observation(seed=4)
  spoil(obs)
  with pytest.raises(RuntimeError, match="Error in inference server") as error:
    client.infer(obs)
  assert words in str(error.value) and "bad request" in str(error.value)
  assert client.infer(observation(seed=4))["actions"].shape == (10, 7)


def test_non_dict_and_text_frames_are_errors(client):
  with pytest.raises(RuntimeError, match="a request is a dict"):
    client.infer([1, 2, 3])
  client._ws.send("not msgpack")  # pylint: disable=protected-access
  assert "text frame" in client._ws.recv()  # pylint: disable=protected-access
  assert client.infer(observation())["actions"].shape == (10, 7)


def test_two_clients_at_once(server, trained):
  barrier, results, errors = threading.Barrier(2), {}, []

  def run(i):
    try:
      c = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server["port"])
      barrier.wait(timeout=30)
      results[i] = [c.infer(dict(observation(seed=10 + i), seed=20 + k))["actions"]
                    for k in range(3)]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors, errors
  for i in range(2):
    for k in range(3):
      _, want = trained["direct"](observation(seed=10 + i), 20 + k, num_candidates=CANDIDATES)
      np.testing.assert_allclose(results[i][k], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["plain", "refine"])
def test_in_process_server_params_sharded_over_8_devices(trained, kind):
  options, kw = policy_lib.SamplingOptions(), {}
  if kind == "refine":
    options = policy_lib.SamplingOptions(refine_steps=2, refine_step_size=0.05)
    kw = dict(refine_steps=2, refine_step_size=0.05, refine_max_step=0.1)
  policy = policy_lib.Policy.load(trained["workdir"], options=options, fsdp=8)
  assert policy.metadata["mesh"] == {"data": 1, "fsdp": 8}
  assert not policy.metadata["best_of_n"]
  sharded = [x for x in jax.tree.leaves(policy.params)
             if len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated]
  assert sharded, "no parameter is sharded"
  policy.warmup()
  with serve.in_thread(policy) as port:
    c = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
    assert c.get_server_metadata()["refine"] == (kind == "refine")
    obs = observation((200, 200), seed=6)
    got = c.infer(dict(obs, seed=9))
  out, want = trained["direct"](obs, 9, **kw)
  np.testing.assert_allclose(got["actions"], want, rtol=1e-4, atol=1e-4)
  assert ("energy" in got) == (kind == "refine")
  if kind == "refine":
    assert got["energy"] == pytest.approx(float(out["energy"][0]), rel=1e-4, abs=1e-5)


def test_openpi_layout_params_serve_the_same_actions(trained, tmp_path):
  dst = str(tmp_path / "export")
  export.export(trained["workdir"], dst)
  with pytest.raises(ValueError, match="--config"):
    policy_lib.Policy.load(dst)
  policy = policy_lib.Policy.load(dst, config=trained["config"])
  assert policy.metadata["weights"].startswith("openpi-layout params")
  obs = observation(seed=7)
  got = policy.infer(dict(obs, seed=1))
  np.testing.assert_allclose(got["actions"], trained["direct"](obs, 1)[1], rtol=1e-4, atol=1e-4)


def test_sigterm_stops_the_server_cleanly(server, client):
  """Last: stops the module's server while a client is connected."""
  assert client.infer(observation())["actions"].shape == (10, 7)
  start = time.monotonic()
  server["proc"].send_signal(signal.SIGTERM)
  assert server["proc"].wait(timeout=60) == 0
  assert time.monotonic() - start < 30
