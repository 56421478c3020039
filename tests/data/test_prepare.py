"""prepare: round trip of every source format, norm stats, bad input, interrupted runs."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import prepare
from pipeline.data import prepared
from pipeline.data import records
from pipeline.data import synthetic
from tests.data import conftest as data_conftest

REPO = Path(__file__).resolve().parents[2]
VARIANTS = list(data_conftest.SOURCE_VARIANTS)


def _naive_chunk(actions, t, horizon):
  """Frame t's chunk by a plain loop: past the end, repeat the last action and mark padding."""
  chunk, pad = [], []
  for h in range(horizon):
    i = t + h
    pad.append(i >= len(actions))
    chunk.append(actions[min(i, len(actions) - 1)])
  return np.array(chunk, np.float32), np.array(pad)


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_equals_source(name, prepared_dir, reference_episodes):
  horizon = 5
  ds = prepared.open_prepared(prepared_dir(name, horizon))
  ref = reference_episodes(name)
  m = ds.manifest
  assert m["complete"] is True
  assert m["num_episodes"] == len(ref) == data_conftest.NUM_EPISODES
  assert m["num_records"] == sum(len(e["state"]) for e in ref) == len(ds)
  assert m["action_horizon"] == horizon
  assert m["format"] == {"lerobot_v20": "lerobot_v2", "lerobot_v21": "lerobot_v2",
                         "rlds": "rlds"}.get(name, "lerobot_v3")
  assert [e["episode_index"] for e in m["episodes"]] == [e["episode_index"] for e in ref]
  index = 0
  for ep_meta, ep in zip(m["episodes"], ref):
    n = len(ep["state"])
    assert (ep_meta["start"], ep_meta["end"], ep_meta["length"]) == (index, index + n, n)
    assert ep_meta["task"] == ep["prompt"][0]
    for t in range(n):
      frame = ds.frame(index)
      assert frame["image"] == ep["image"][t]
      assert frame["wrist_image"] == ep["wrist_image"][t]
      np.testing.assert_array_equal(frame["state"], ep["state"][t])
      chunk, pad = _naive_chunk(ep["actions"], t, horizon)
      np.testing.assert_array_equal(frame["actions"], chunk)
      np.testing.assert_array_equal(frame["actions_is_pad"], pad)
      assert frame["actions"].dtype == np.float32 and frame["actions_is_pad"].dtype == bool
      assert frame["prompt"] == ep["prompt"][t]
      assert frame["task_index"] == ep["task_index"][t]
      assert (frame["episode_index"], frame["frame_index"]) == (ep["episode_index"], t)
      index += 1
  ds.close()


def _openpi_stats(x):
  """openpi's compute_norm_stats formulas: std = sqrt(max(0, E[x^2] - E[x]^2)), in float64."""
  x = np.asarray(x, np.float64)
  mean = x.mean(0)
  return {"mean": mean, "std": np.sqrt(np.maximum(0, (x * x).mean(0) - mean**2)),
          "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}


@pytest.mark.parametrize("name,delta", [("lerobot_v21", 0), ("lerobot_v21", 6), ("rlds", 6)])
def test_norm_stats_equal_openpi_reference(name, delta, prepared_dir, reference_episodes):
  """State per frame; actions over every frame's whole chunk, after the delta transform."""
  horizon = 5
  root = prepared_dir(name, horizon, delta)
  ref = reference_episodes(name)
  with open(root / "norm_stats.json") as f:
    stats = json.load(f)
  pooled = []
  for e in ref:
    for t in range(len(e["actions"])):
      chunk, _ = _naive_chunk(e["actions"], t, horizon)
      chunk = chunk.astype(np.float64)
      chunk[:, :delta] -= e["state"][t, :delta]
      pooled.extend(chunk)
  want = {"state": _openpi_stats(np.concatenate([e["state"] for e in ref])),
          "actions": _openpi_stats(np.array(pooled))}
  assert len(pooled) == horizon * sum(len(e["actions"]) for e in ref)
  assert set(stats) == {"norm_stats"} and set(stats["norm_stats"]) == {"state", "actions"}
  for key in ("state", "actions"):
    assert set(stats["norm_stats"][key]) == set(want[key])
    for stat, value in want[key].items():
      np.testing.assert_allclose(stats["norm_stats"][key][stat], value, rtol=1e-9, atol=1e-12,
                                 err_msg=f"{key}.{stat}")
  m = prepared.open_prepared(root).manifest
  assert m["delta_action_dims"] == delta and f"[0, {delta})" in m["norm_stats_actions"]


def test_manifest_schema(prepared_dataset):
  m = prepared.open_prepared(prepared_dataset).manifest
  for key in ("version", "format", "source_version", "source", "split", "action_horizon",
              "num_episodes", "num_records", "num_frames", "num_tasks", "num_skipped", "tasks",
              "features", "shards", "episodes", "skipped", "norm_stats", "complete"):
    assert key in m, key
  assert list(m)[-1] == "complete"  # written last
  assert m["format"] == "lerobot_v2" and m["source_version"] == "v2.1"
  assert m["split"] is None  # LeRobot sources have no splits
  assert m["action_horizon"] == data_conftest.PREPARED_HORIZON
  assert m["features"]["actions"]["shape"] == [data_conftest.PREPARED_HORIZON, 7]
  assert m["features"]["state"]["shape"] == [8]
  assert m["features"]["image"]["encoding"] == "png"
  assert len(m["shards"]) == 3  # episodes_per_shard=2
  assert sum(s["num_records"] for s in m["shards"]) == m["num_records"]
  for i, shard in enumerate(m["shards"]):
    assert shard["path"] == f"frames-{i:05d}-of-00003.array_record"
    assert (prepared_dataset / shard["path"]).is_file()
  # Records run in episode order across the shards.
  starts = [e["start"] for e in m["episodes"]]
  assert starts == sorted(starts) and starts[0] == 0
  assert m["episodes"][-1]["end"] == m["num_records"]


def test_parallel_workers_write_the_same_records(tmp_path, source_dir, prepared_dir):
  serial = prepared.open_prepared(prepared_dir("lerobot_v21"))
  out = prepare.prepare(source_dir("lerobot_v21"), tmp_path / "par", action_horizon=5,
                        num_workers=2, episodes_per_shard=4)
  parallel = prepared.open_prepared(out)
  assert len(parallel.manifest["shards"]) == 2
  assert len(parallel) == len(serial)
  for i in range(len(serial)):
    assert parallel.read_record(i) == serial.read_record(i)
  assert parallel.norm_stats == serial.norm_stats


def test_grain_reads_shards(prepared_dataset):
  import grain.python as grain
  ds = prepared.open_prepared(prepared_dataset)
  source = grain.ArrayRecordDataSource(ds.shard_paths)
  assert len(source) == len(ds)
  for i in (0, len(ds) // 2, len(ds) - 1):
    assert source[i] == ds.read_record(i)


# ----------------------------------------------------------------------------------------------
# Bad input.


def _small_v21(root, num_episodes=3):
  return synthetic.write_lerobot_dataset(root, num_episodes, image_size=16, min_length=4,
                                         max_length=6, seed=5)


def _rewrite_column(path, column, fn):
  table = pq.read_table(path)
  rows = table.column(column).to_pylist()
  fn(rows)
  i = table.column_names.index(column)
  table = table.set_column(i, table.field(i), pa.array(rows, table.field(i).type))
  pq.write_table(table, path)


def _episode_file(root, index):
  return root / "data" / "chunk-000" / f"episode_{index:06d}.parquet"


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"definitely not an image", "not a PNG or JPEG"),
    (lambda b: b[:len(b) // 2], "truncated PNG"),
    (lambda b: b[:40] + bytes(20) + b[60:], "undecodable PNG"),
])
def test_corrupt_image(tmp_path, damage, message):
  src = _small_v21(tmp_path / "src")

  def corrupt(rows):
    rows[2] = dict(rows[2], bytes=damage(rows[2]["bytes"]))

  _rewrite_column(_episode_file(src, 1), "wrist_image", corrupt)
  with pytest.raises(prepare.PrepareError) as err:
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)
  text = str(err.value)
  for part in ("episode_000001.parquet", "episode 1", "'wrist_image'", "frame 2", message):
    assert part in text, (part, text)
  assert not (tmp_path / "dst").exists()


def test_full_image_check_decodes_pixels(tmp_path):
  src = _small_v21(tmp_path / "src")

  def corrupt(rows):
    # Damage the compressed pixel data but keep signature, header and end marker intact.
    b = bytearray(rows[0]["bytes"])
    idat = b.index(b"IDAT") + 4
    b[idat:idat + 8] = bytes(8)
    rows[0] = dict(rows[0], bytes=bytes(b))

  _rewrite_column(_episode_file(src, 0), "image", corrupt)
  prepare.prepare(src, tmp_path / "header", action_horizon=4)  # the cheap check passes
  with pytest.raises(prepare.PrepareError, match="episode 0.*'image'.*frame 0"):
    prepare.prepare(src, tmp_path / "full", action_horizon=4, verify_images="full")


def test_skip_bad_counts_and_reports(tmp_path, caplog):
  src = _small_v21(tmp_path / "src", num_episodes=4)
  _rewrite_column(_episode_file(src, 2), "image",
                  lambda rows: rows.__setitem__(0, dict(rows[0], bytes=b"junk")))
  with caplog.at_level("WARNING"):
    dst = prepare.prepare(src, tmp_path / "dst", action_horizon=4, skip_bad=True)
  assert "skipping episode 2" in caplog.text
  m = prepared.open_prepared(dst).manifest
  assert m["num_skipped"] == 1 and m["num_episodes"] == 3
  assert m["skipped"][0]["episode_index"] == 2 and m["skipped"][0]["field"] == "image"
  assert "episode_000002.parquet" in m["skipped"][0]["path"]
  assert [e["episode_index"] for e in m["episodes"]] == [0, 1, 3]
  ds = prepared.open_prepared(dst)
  assert {ds.frame(i)["episode_index"] for i in range(len(ds))} == {0, 1, 3}


def test_missing_column(tmp_path):
  src = _small_v21(tmp_path / "src")
  path = _episode_file(src, 1)
  pq.write_table(pq.read_table(path).drop_columns(["state"]), path)
  with pytest.raises(prepare.PrepareError) as err:
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)
  assert "episode_000001.parquet" in str(err.value) and "'state'" in str(err.value)
  assert "missing column" in str(err.value)


def test_missing_episode_file(tmp_path):
  src = _small_v21(tmp_path / "src")
  os.remove(_episode_file(src, 2))
  with pytest.raises(prepare.PrepareError, match="episode_000002.parquet.*missing"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)


@pytest.mark.parametrize("column", ["state", "actions"])
def test_nan_values(tmp_path, column):
  src = _small_v21(tmp_path / "src")

  def poison(rows):
    rows[3] = list(rows[3])
    rows[3][1] = float("nan")

  _rewrite_column(_episode_file(src, 0), column, poison)
  with pytest.raises(prepare.PrepareError) as err:
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)
  text = str(err.value)
  for part in ("episode_000000.parquet", "episode 0", f"'{column}'", "frame 3", "dim 1"):
    assert part in text, (part, text)


def test_empty_episode(tmp_path):
  src = _small_v21(tmp_path / "src")
  path = _episode_file(src, 1)
  pq.write_table(pq.read_table(path).slice(0, 0), path)
  with pytest.raises(prepare.PrepareError, match="episode 1.*0 frames"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)
  dst = prepare.prepare(src, tmp_path / "dst", action_horizon=4, skip_bad=True)
  assert prepared.open_prepared(dst).manifest["num_skipped"] == 1


def test_unknown_format(tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "notes.txt").write_text("hello")
  with pytest.raises(prepare.PrepareError, match="cannot detect the format.*notes.txt"):
    prepare.prepare(tmp_path / "src", tmp_path / "dst")
  with pytest.raises(prepare.PrepareError, match="unknown format 'parquet'"):
    prepare.prepare(tmp_path / "src", tmp_path / "dst", format="parquet")
  with pytest.raises(prepare.PrepareError, match="does not exist"):
    prepare.prepare(tmp_path / "nowhere", tmp_path / "dst")
  assert not (tmp_path / "dst").exists()


def test_existing_destination(tmp_path, prepared_dataset):
  src = _small_v21(tmp_path / "src")
  with pytest.raises(prepare.PrepareError, match="already holds a complete"):
    prepare.prepare(src, prepared_dataset, action_horizon=4)
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(prepare.PrepareError, match="not a complete prepared dataset"):
    prepare.prepare(src, other, action_horizon=4)
  assert (other / "keep.txt").exists()
  prepare.prepare(src, other, action_horizon=4, overwrite=True)
  assert prepared.is_complete(other)


# ----------------------------------------------------------------------------------------------
# Interrupted runs and the reader's refusal.


def test_error_inside_worker_leaves_nothing(tmp_path, monkeypatch):
  src = _small_v21(tmp_path / "src")
  real = prepare.episode_records
  calls = []

  def failing(ep, horizon):
    calls.append(ep.episode_index)
    if len(calls) == 2:
      raise RuntimeError("simulated crash")
    return real(ep, horizon)

  monkeypatch.setattr(prepare, "episode_records", failing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=4)
  assert not (tmp_path / "dst").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["src"]  # temporary dir removed


def test_error_in_worker_process_aborts_run(tmp_path):
  src = _small_v21(tmp_path / "src", num_episodes=4)
  _rewrite_column(_episode_file(src, 3), "state",
                  lambda rows: rows.__setitem__(0, [float("inf")] * 8))
  with pytest.raises(prepare.PrepareError, match="episode 3.*'state'.*non-finite"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=4, num_workers=2,
                    episodes_per_shard=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


_KILL_SCRIPT = """
import os, signal, sys
from pipeline.data import prepare
real = prepare.episode_records
seen = []
def killer(ep, horizon):
  seen.append(ep.episode_index)
  if len(seen) == 3:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup can run
  return real(ep, horizon)
prepare.episode_records = killer
from absl import app
prepare._define_flags()
app.run(prepare.main)
"""


def test_killed_run_is_detected_and_cleaned_up(tmp_path):
  src = _small_v21(tmp_path / "src", num_episodes=4)
  dst = tmp_path / "dst"
  args = [f"--src={src}", f"--dst={dst}", "--action_horizon=4", "--num_workers=1",
          "--episodes_per_shard=1"]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *args], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert not dst.exists()
  prefix = f".dst.tmp-{socket.gethostname()}-"
  leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(prefix)]
  assert len(leftovers) == 1
  assert json.loads((leftovers[0] / "manifest.json").read_text())["complete"] is False
  assert any(p.suffix == ".array_record" for p in leftovers[0].iterdir())
  with pytest.raises(prepared.NotPreparedError, match="incomplete"):
    prepared.open_prepared(leftovers[0])
  with pytest.raises(prepared.NotPreparedError, match="no such directory"):
    prepared.open_prepared(dst)
  # The next run (through the command line) removes the dead run's leftovers.
  proc = subprocess.run([sys.executable, "-m", "pipeline.data.prepare", *args], env=env,
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert "4 episodes" in proc.stdout
  assert not leftovers[0].exists()
  assert prepared.open_prepared(dst).manifest["num_episodes"] == 4


def test_cli_reports_bad_input(tmp_path):
  (tmp_path / "src").mkdir()
  proc = subprocess.run([sys.executable, "-m", "pipeline.data.prepare",
                         f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'dst'}",
                         "--format=rlds", "--skip_bad=false"],
                        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  assert proc.returncode != 0
  assert "prepare failed" in proc.stderr and "dataset_info.json" in proc.stderr


def test_open_prepared_refuses_incomplete(tmp_path, prepared_dataset):
  with pytest.raises(prepared.NotPreparedError, match="no manifest.json"):
    (tmp_path / "empty").mkdir()
    prepared.open_prepared(tmp_path / "empty")
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(prepared_dataset, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  (copy / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
  with pytest.raises(prepared.NotPreparedError, match="incomplete"):
    prepared.open_prepared(copy)
  (copy / "manifest.json").write_text(json.dumps(manifest)[:50])
  with pytest.raises(prepared.NotPreparedError, match="unreadable manifest"):
    prepared.open_prepared(copy)
  (copy / "manifest.json").write_text(json.dumps(manifest))
  os.remove(copy / manifest["shards"][1]["path"])
  with pytest.raises(prepared.NotPreparedError, match="frames-00001-of-00003.*missing"):
    prepared.open_prepared(copy)


def test_ensure_prepared(tmp_path, monkeypatch):
  src = _small_v21(tmp_path / "src")
  dst = tmp_path / "dst"
  assert prepare.ensure_prepared(src, dst, action_horizon=4) == dst
  created = json.loads((dst / "manifest.json").read_text())["created"]

  def fail(*args, **kwargs):
    raise AssertionError("prepared twice")

  monkeypatch.setattr(prepare, "prepare", fail)
  assert prepare.ensure_prepared(src, dst, action_horizon=4) == dst
  assert json.loads((dst / "manifest.json").read_text())["created"] == created
  monkeypatch.undo()
  # A dataset whose manifest says incomplete is rebuilt.
  manifest = json.loads((dst / "manifest.json").read_text())
  (dst / "manifest.json").write_text(json.dumps(dict(manifest, complete=False)))
  prepare.ensure_prepared(src, dst, action_horizon=4)
  assert prepared.is_complete(dst)


def test_records_decode_with_codec(prepared_dataset):
  import pickle
  ds = prepared.open_prepared(prepared_dataset)
  ds.frame(1)
  copy = pickle.loads(pickle.dumps(ds))  # open readers are not carried along
  assert copy.read_record(1) == ds.read_record(1)
  frame = records.decode_frame(ds.read_record(0))
  assert set(records.FIELDS) <= set(frame)
  assert frame["actions"].shape == (data_conftest.PREPARED_HORIZON, 7)
  last = ds.manifest["episodes"][0]["end"] - 1
  pads = ds.frame(last)["actions_is_pad"]
  assert not pads[0] and pads[1:].all()


def _data_config(tmp_path, **data):
  import ml_collections
  return ml_collections.ConfigDict({
      "seed": 3, "model": {"action_horizon": 4},
      "data": dict({"dataset_dir": str(tmp_path / "prepared"), "source_dir": str(tmp_path / "src"),
                    "source_format": "auto", "synthetic": True, "synthetic_episodes": 3,
                    "synthetic_image_size": 16, "delta_action_dims": 6}, **data)})


def test_ensure_from_config_writes_synthetic_source_and_prepares(tmp_path, monkeypatch):
  config = _data_config(tmp_path)
  prepare.ensure_from_config(config)
  m = prepared.open_prepared(tmp_path / "prepared").manifest
  assert m["num_episodes"] == 3 and m["action_horizon"] == 4 and m["format"] == "lerobot_v2"
  assert m["delta_action_dims"] == 6  # the config's recipe
  assert m["source"] == str((tmp_path / "src").resolve())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "src"]  # no temporaries

  def fail(*args, **kwargs):
    raise AssertionError("prepared twice")

  monkeypatch.setattr(prepare, "prepare", fail)
  prepare.ensure_from_config(config)  # a manifest is there: nothing to do


def test_ensure_from_config_keeps_an_existing_source(tmp_path):
  _small_v21(tmp_path / "src", num_episodes=2)
  prepare.ensure_from_config(_data_config(tmp_path))
  assert prepared.open_prepared(tmp_path / "prepared").manifest["num_episodes"] == 2
  prepare.ensure_from_config(_data_config(tmp_path / "real", synthetic=False, source_dir=""))
  assert not (tmp_path / "real").exists()  # no source, nothing to prepare
