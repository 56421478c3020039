"""fileio: directories and files appear complete or not at all."""
import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline import fileio


def _tmp_siblings(dst):
  return sorted(p.name for p in dst.parent.iterdir()
                if p.name.startswith(f".{dst.name}.tmp-{socket.gethostname()}-"))


def test_directory_appears_when_the_block_ends(tmp_path):
  dst = tmp_path / "out" / "data"
  with fileio.atomic_directory(dst) as tmp:
    assert tmp.parent == dst.parent and tmp.is_dir() and not any(tmp.iterdir())
    assert tmp.name == f".data.tmp-{socket.gethostname()}-{os.getpid()}"
    (tmp / "a.txt").write_text("a")
    assert not dst.exists()
  assert (dst / "a.txt").read_text() == "a"
  assert _tmp_siblings(dst) == []


def test_error_in_block_leaves_nothing(tmp_path):
  dst = tmp_path / "data"
  with pytest.raises(KeyError):
    with fileio.atomic_directory(dst) as tmp:
      (tmp / "a.txt").write_text("a")
      raise KeyError("boom")
  assert list(tmp_path.iterdir()) == []


def test_empty_destination_is_replaced(tmp_path):
  dst = tmp_path / "data"
  dst.mkdir()
  with fileio.atomic_directory(dst) as tmp:
    (tmp / "a.txt").write_text("a")
  assert [p.name for p in dst.iterdir()] == ["a.txt"]


def test_stale_tmp_of_dead_process_is_removed(tmp_path):
  dst = tmp_path / "data"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  prefix = f".data.tmp-{socket.gethostname()}-"
  stale = tmp_path / f"{prefix}{int(dead.stdout)}"
  alive = tmp_path / f"{prefix}{os.getppid()}"
  other_host = tmp_path / f".data.tmp-elsewhere-{int(dead.stdout)}"
  for d in (stale, alive, other_host):
    d.mkdir()
  with fileio.atomic_directory(dst):
    pass
  assert not stale.exists()
  assert alive.exists() and other_host.exists()  # a live run's, and another host's


def test_destination_completed_by_another_process(tmp_path):
  dst = tmp_path / "data"
  with fileio.atomic_directory(dst, is_complete=lambda d: (d / "done").exists()) as tmp:
    (tmp / "ours").write_text("x")
    dst.mkdir()
    (dst / "done").write_text("theirs")
  assert sorted(p.name for p in dst.iterdir()) == ["done"]
  assert _tmp_siblings(dst) == []

  other = tmp_path / "other"
  with pytest.raises(OSError):
    with fileio.atomic_directory(other, is_complete=lambda d: (d / "done").exists()) as tmp:
      other.mkdir()
      (other / "half").write_text("not done")
  assert [p.name for p in other.iterdir()] == ["half"]
  assert _tmp_siblings(other) == []


def test_atomic_write_text_and_json(tmp_path, monkeypatch):
  path = tmp_path / "m.json"
  fileio.atomic_write_json(path, {"b": 1, "a": "ü"})
  assert list(json.loads(path.read_text(encoding="utf-8"))) == ["b", "a"]  # key order kept
  assert "ü" in path.read_text(encoding="utf-8")
  fileio.atomic_write_text(path, "new")
  assert path.read_text() == "new"
  assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    fileio.atomic_write_text(path, "lost")
  assert path.read_text() == "new"  # the old content stays whole
  assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
