"""The on-disk record of one frame: a msgpack map, numpy arrays as (dtype, shape, bytes).

Records hold images still encoded (PNG or JPEG bytes, as the source stored them) so that shards stay
small and decoding runs in the loader's worker processes.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

# Fields every prepared frame carries, with the dtype each array field must have.
ARRAY_FIELDS = {"state": np.float32, "actions": np.float32, "actions_is_pad": np.bool_}
BYTES_FIELDS = ("image", "wrist_image")
SCALAR_FIELDS = {"prompt": str, "episode_index": int, "frame_index": int, "task_index": int}
FIELDS = tuple(ARRAY_FIELDS) + BYTES_FIELDS + tuple(SCALAR_FIELDS)

_NDARRAY = "__ndarray__"


class RecordError(ValueError):
  """A record that cannot be decoded or lacks a field."""


def _pack(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    return {_NDARRAY: [obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes()]}
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def _unpack(obj: dict) -> Any:
  if _NDARRAY in obj:
    dtype, shape, data = obj[_NDARRAY]
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
  return obj


def encode_frame(frame: dict[str, Any]) -> bytes:
  """Serializes one frame; every field of FIELDS must be present."""
  missing = [k for k in FIELDS if k not in frame]
  if missing:
    raise RecordError(f"frame is missing fields {missing}")
  out = {}
  for key, value in frame.items():
    if key in ARRAY_FIELDS:
      value = np.asarray(value, dtype=ARRAY_FIELDS[key])
    out[key] = value
  return msgpack.packb(out, default=_pack, use_bin_type=True)


def decode_frame(data: bytes) -> dict[str, Any]:
  """Inverse of encode_frame; raises RecordError naming what is wrong."""
  try:
    frame = msgpack.unpackb(data, object_hook=_unpack, raw=False)
  except Exception as e:  # msgpack raises several unrelated types
    raise RecordError(f"undecodable record ({len(data)} bytes): {e}") from e
  if not isinstance(frame, dict):
    raise RecordError(f"record is a {type(frame).__name__}, expected a map")
  missing = [k for k in FIELDS if k not in frame]
  if missing:
    raise RecordError(f"record of episode {frame.get('episode_index')} frame "
                      f"{frame.get('frame_index')} lacks fields {missing}")
  return frame
