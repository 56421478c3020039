"""Writes that readers never see half done: a file or directory appears complete or not at all.

Everything is written beside its destination and renamed into place, which is atomic within one
file system. Temporary names carry the host and process id, so runs on hosts that share a file
system stay apart and a later run can tell a dead run's leftovers from a live run's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator


def _tmp_prefix(dst: Path) -> str:
  return f".{dst.name}.tmp-{socket.gethostname()}-"


def _tmp_path(dst: Path) -> Path:
  return dst.parent / f"{_tmp_prefix(dst)}{os.getpid()}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_tmp_dirs(dst: Path) -> None:
  """Deletes temporary dirs of earlier runs for `dst` on this host whose process is gone."""
  if not dst.parent.is_dir():
    return
  prefix = _tmp_prefix(dst)
  for entry in dst.parent.iterdir():
    if entry.name.startswith(prefix) and entry.is_dir():
      try:
        pid = int(entry.name[len(prefix):])
      except ValueError:
        continue
      if pid != os.getpid() and not _pid_alive(pid):
        logging.info("removing %s left by an interrupted run", entry)
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike,
                     is_complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
  """Yields an empty temporary sibling of `dst` to fill; renames it to `dst` when the block ends.

  `dst` may exist only as an empty directory (callers check before the work). If the block
  raises (or the process is killed), `dst` is untouched: the temporary directory is removed, or,
  after a kill, left for the next call for the same `dst` on this host to remove. When another
  process put `dst` in place while the block ran, theirs is kept and ours discarded if
  `is_complete(dst)` says theirs is finished; otherwise the rename's error is raised.
  """
  dst = Path(dst)
  _remove_stale_tmp_dirs(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_path(dst)
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    try:
      os.rename(tmp, dst)
    except OSError:
      if is_complete is None or not is_complete(dst):
        raise
      logging.info("%s was completed by another process first; keeping that one", dst)
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` aside, flushed to disk, then replaces `path` with it."""
  path = Path(path)
  tmp = _tmp_path(path)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
  """`atomic_write_text` of `obj` as JSON (key order kept, non-ASCII text as is)."""
  atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))
