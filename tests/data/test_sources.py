"""Source readers: detection, column mapping, image checks, bad input."""
import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import prepare
from pipeline.data import prepared
from pipeline.data import sources
from pipeline.data import synthetic
from pipeline.data import tfrecord
from tests.data import conftest as data_conftest

EXPECTED_FORMAT = {"lerobot_v20": "lerobot_v2", "lerobot_v21": "lerobot_v2",
                   "lerobot_v30": "lerobot_v3", "lerobot_v30_image2": "lerobot_v3",
                   "rlds": "rlds"}


@pytest.mark.parametrize("name", list(data_conftest.SOURCE_VARIANTS))
def test_detect_and_read(name, source_dir, reference_episodes):
  root = source_dir(name)
  assert sources.detect_format(root) == EXPECTED_FORMAT[name]
  src = sources.open_source(root)
  ref = reference_episodes(name)
  refs = src.episode_refs()
  assert [r.episode_index for r in refs] == [e["episode_index"] for e in ref]
  assert [r.length for r in refs] == [len(e["state"]) for e in ref]
  tasks = src.tasks()
  for e in ref:
    assert all(tasks[i] == p for i, p in zip(e["task_index"], e["prompt"]))
  ep = src.read_episode(refs[-1])
  np.testing.assert_array_equal(ep.actions, ref[-1]["actions"])
  assert ep.wrist_image == ref[-1]["wrist_image"]
  assert ep.state.dtype == np.float32 and ep.state.shape[1] == 8


def test_rlds_detected_at_version_dir(source_dir):
  root = source_dir("rlds")
  version_dir = root / "libero_goal_no_noops" / "1.0.0"
  assert sources.detect_format(version_dir) == "rlds"
  assert len(sources.open_source(version_dir).episode_refs()) == data_conftest.NUM_EPISODES // 2
  assert sources.detect_format(root / "libero_goal_no_noops") == "rlds"


def test_explicit_format_names(source_dir):
  for fmt in ("lerobot_v2", "lerobot_v21", "lerobot_v2.0"):
    assert isinstance(sources.open_source(source_dir("lerobot_v21"), fmt),
                      sources.LeRobotV2Source)
  with pytest.raises(sources.SourceError, match="unknown format 'hdf5'"):
    sources.open_source(source_dir("lerobot_v21"), "hdf5")


def test_prepared_dir_is_not_a_source(prepared_dataset):
  with pytest.raises(sources.SourceError, match="already a prepared ArrayRecord dataset"):
    sources.detect_format(prepared_dataset)


def test_v3_row_ranges_cross_files_and_row_groups(source_dir):
  root = source_dir("lerobot_v30")
  files = sorted(root.glob("data/chunk-000/file-*.parquet"))
  assert len(files) == 2  # 4 + 2 episodes
  assert pq.ParquetFile(files[0]).metadata.num_row_groups > 1
  refs = sources.open_source(root).episode_refs()
  assert {r.path for r in refs} == {str(f) for f in files}
  assert refs[4].location[0] == 0  # first episode of the second file starts at its row 0


# ----------------------------------------------------------------------------------------------
# Image checks.


def _png(size=(8, 8), mode="RGB"):
  buf = io.BytesIO()
  Image.new(mode, size).save(buf, format="PNG")
  return buf.getvalue()


def test_check_image():
  assert sources.check_image(_png()) == ""
  assert sources.check_image(synthetic.encode_image(np.zeros((8, 8, 3), np.uint8), "jpeg")) == ""
  assert "declares 16x16" in sources.check_image(_png(), shape=[16, 16, 3])
  assert "mode L" in sources.check_image(_png(mode="L"))
  assert "empty" in sources.check_image(b"")
  assert "empty" in sources.check_image(None)
  assert "truncated JPEG" in sources.check_image(b"\xff\xd8\xff\xe0" + bytes(100))


# ----------------------------------------------------------------------------------------------
# Bad input in the v3 and RLDS readers.


def _small(tmp_path, fmt, n=3, **kw):
  return synthetic.write_dataset(tmp_path / "src", fmt, n, image_size=16, min_length=4,
                                 max_length=6, seed=3, **kw)


def test_v3_video_dataset_is_declined(tmp_path):
  src = _small(tmp_path, "lerobot_v30")
  info = json.loads((src / "meta" / "info.json").read_text())
  info["features"]["observation.images.image"]["dtype"] = "video"
  (src / "meta" / "info.json").write_text(json.dumps(info))
  with pytest.raises(prepare.PrepareError, match="'observation.images.image' is stored as mp4"):
    prepare.prepare(src, tmp_path / "dst")


def test_v3_missing_feature_and_column(tmp_path):
  src = _small(tmp_path, "lerobot_v30")
  info_path = src / "meta" / "info.json"
  info = json.loads(info_path.read_text())
  broken = json.loads(json.dumps(info))
  del broken["features"]["observation.state"]
  info_path.write_text(json.dumps(broken))
  with pytest.raises(prepare.PrepareError, match="info.json: no state feature"):
    prepare.prepare(src, tmp_path / "dst")
  info_path.write_text(json.dumps(info))
  path = src / "data" / "chunk-000" / "file-000.parquet"
  pq.write_table(pq.read_table(path).drop_columns(["action"]), path)
  with pytest.raises(prepare.PrepareError, match="file-000.parquet: episode 0.*missing column"):
    prepare.prepare(src, tmp_path / "dst")


def test_v3_empty_episode(tmp_path):
  src = _small(tmp_path, "lerobot_v30")
  path = src / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
  rows = pq.read_table(path).to_pylist()
  rows[1]["dataset_to_index"] = rows[1]["dataset_from_index"]
  import pyarrow as pa
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(prepare.PrepareError, match="episode 1.*0 frames"):
    prepare.prepare(src, tmp_path / "dst")


def _rewrite_rlds(root, fn):
  """Rewrites every episode of every shard: fn(episode index, features) -> features."""
  index = 0
  for path in sorted(root.glob("*.tfrecord*")):
    out = []
    for offset, length in tfrecord.record_offsets(str(path)):
      data = path.read_bytes()[offset:offset + length]
      feats = {k: v for k, (kind, v) in tfrecord.parse_example(data).items()}
      out.append(tfrecord.frame_record(tfrecord.encode_example(fn(index, feats))))
      index += 1
    path.write_bytes(b"".join(out))


def test_rlds_corrupt_jpeg_names_episode(tmp_path):
  src = _small(tmp_path, "rlds", n=4)

  def damage(i, feats):
    if i == 2:
      feats["steps/observation/image"][1] = b"\x00" * 50
    return feats

  _rewrite_rlds(src, damage)
  with pytest.raises(prepare.PrepareError) as err:
    prepare.prepare(src, tmp_path / "dst", action_horizon=3)
  text = str(err.value)
  for part in ("tfrecord-00001-of-00002", "episode 2", "'image'", "frame 1", "not a PNG or JPEG"):
    assert part in text, (part, text)


def test_rlds_missing_key_and_empty_episode(tmp_path):
  src = _small(tmp_path, "rlds", n=4)
  pristine = {p.name: p.read_bytes() for p in src.glob("*.tfrecord*")}
  _rewrite_rlds(src, lambda i, f: {k: v for k, v in f.items()
                                   if not (i == 1 and k == "steps/action")})
  with pytest.raises(prepare.PrepareError, match="episode 1.*'steps/action': missing"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=3)
  for name, data in pristine.items():
    (src / name).write_bytes(data)

  def empty(i, feats):
    if i == 3:
      feats = {k: ([] if isinstance(v, list) else v[:0]) for k, v in feats.items()}
    return feats

  _rewrite_rlds(src, empty)
  with pytest.raises(prepare.PrepareError, match="episode 3.*0 frames"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=3)
  dst = prepare.prepare(src, tmp_path / "dst", action_horizon=3, skip_bad=True)
  assert prepared.open_prepared(dst).manifest["num_skipped"] == 1


def test_rlds_truncated_shard(tmp_path):
  src = _small(tmp_path, "rlds", n=2)
  shard = sorted(src.glob("*.tfrecord*"))[0]
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(prepare.PrepareError, match="truncated TFRecord"):
    prepare.prepare(src, tmp_path / "dst")


def test_lerobot_missing_metadata(tmp_path):
  src = _small(tmp_path, "lerobot_v21")
  (src / "meta" / "tasks.jsonl").unlink()
  with pytest.raises(prepare.PrepareError, match="missing meta/tasks.jsonl"):
    prepare.prepare(src, tmp_path / "dst")
  shutil.rmtree(src)
  src = _small(tmp_path, "lerobot_v21")
  (src / "meta" / "info.json").write_text("{broken")
  with pytest.raises(prepare.PrepareError, match="info.json: cannot read JSON"):
    prepare.prepare(src, tmp_path / "dst")


def test_unknown_task_index(tmp_path):
  src = _small(tmp_path, "lerobot_v21")
  (src / "meta" / "tasks.jsonl").write_text('{"task_index": 7, "task": "other"}\n')
  with pytest.raises(prepare.PrepareError, match="episode 0.*'task_index'.*not in the task table"):
    prepare.prepare(src, tmp_path / "dst")


def test_rlds_inconsistent_dims(tmp_path):
  src = _small(tmp_path, "rlds", n=4)

  def shrink(i, feats):
    if i == 3:
      n = len(feats["steps/language_instruction"])
      feats["steps/observation/state"] = feats["steps/observation/state"].reshape(n, 8)[:, :6]
      feats["steps/observation/state"] = feats["steps/observation/state"].reshape(-1)
    return feats

  _rewrite_rlds(src, shrink)
  with pytest.raises(prepare.PrepareError, match="episode 3 has state/action dims \\[6, 7\\]"):
    prepare.prepare(src, tmp_path / "dst", action_horizon=3)


@pytest.mark.parametrize("fmt,extra", [("lerobot_v21", {}),
                                       ("lerobot_v30", {"episodes_per_file": 1})])
def test_several_chunk_dirs(tmp_path, fmt, extra):
  src = _small(tmp_path, fmt, n=5, chunks_size=2, **extra)
  assert len(list((src / "data").iterdir())) == 3  # chunk-000 .. chunk-002
  dst = prepare.prepare(src, tmp_path / "dst", action_horizon=3)
  m = prepared.open_prepared(dst).manifest
  assert [e["episode_index"] for e in m["episodes"]] == list(range(5))
