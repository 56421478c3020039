"""tf.train.Example protos and TFRecord framing, read and written without TensorFlow.

Both are simple enough to handle by hand (an Example is three list types in a map; a record is a
length, two CRCs and the payload), and importing TensorFlow in every worker process would cost
seconds and memory. The RLDS reader and the synthetic RLDS writer both use this module.

An Example's features are `{key: list[bytes] | float array | int array}` when written, and
`{key: (kind, values)}` when parsed, with kind 'bytes', 'float', 'int64' or 'empty'.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Iterator, Sequence

import numpy as np

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


class DecodeError(ValueError):
  """Bytes that are not a valid TFRecord file or tf.train.Example."""


# ----------------------------------------------------------------------------------------------
# Protobuf wire format.


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 values are written as their two's complement
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if not n:
      out.append(b)
      return bytes(out)
    out.append(b | 0x80)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise DecodeError("truncated varint")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise DecodeError("varint too long")


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field."""
  return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
  """Yields (field number, wire type, value) of a protobuf message; value is a memoryview for
  length-delimited fields, an int for varints, raw bytes for fixed32/64."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire == _LENGTH_DELIMITED:
      n, pos = _read_varint(buf, pos)
      if pos + n > end:
        raise DecodeError("truncated length-delimited field")
      value, pos = buf[pos:pos + n], pos + n
    elif wire == _FIXED32:
      value, pos = bytes(buf[pos:pos + 4]), pos + 4
    elif wire == _FIXED64:
      value, pos = bytes(buf[pos:pos + 8]), pos + 8
    else:
      raise DecodeError(f"unsupported wire type {wire}")
    yield number, wire, value


# ----------------------------------------------------------------------------------------------
# tf.train.Example: Example{1: Features{1: map entry{1: key, 2: Feature}}}, Feature is one of
# 1: BytesList, 2: FloatList, 3: Int64List, each with its values in field 1.


def _encode_feature(value) -> bytes:
  """tf.train.Feature from a list of bytes, a float array or an int array."""
  if isinstance(value, list):
    return _field(1, b"".join(_field(1, v) for v in value))
  arr = np.asarray(value)
  if arr.dtype.kind == "f":
    return _field(2, _field(1, arr.astype("<f4").tobytes()))
  return _field(3, _field(1, b"".join(_varint(int(v)) for v in arr.reshape(-1))))


def _decode_feature(buf: memoryview) -> tuple[str, Any]:
  """tf.train.Feature -> ('bytes', [bytes]) | ('float', f32 array) | ('int64', i64 array)."""
  for number, _, value in _fields(buf):
    if number == 1:
      return "bytes", [bytes(v) for n, _, v in _fields(value) if n == 1]
    if number == 2:  # packed (wire 2) or one fixed32 per value (wire 5)
      parts = [np.frombuffer(v if wire == _FIXED32 else bytes(v), dtype="<f4")
               for n, wire, v in _fields(value) if n == 1]
      return "float", np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if number == 3:  # packed varints or one varint per value
      out = []
      for n, wire, v in _fields(value):
        if n != 1:
          continue
        if wire == _VARINT:
          out.append(v)
        else:
          pos = 0
          while pos < len(v):
            x, pos = _read_varint(v, pos)
            out.append(x)
      return "int64", np.array(out, dtype=np.uint64).astype(np.int64)  # two's complement
  return "empty", []


def encode_example(features: dict) -> bytes:
  """Serializes {key: list[bytes] | float array | int array} as a tf.train.Example."""
  entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, _encode_feature(v)))
                     for k, v in sorted(features.items()))
  return _field(1, entries)


def parse_example(data: bytes, keys: Sequence[str] | None = None) -> dict[str, tuple[str, Any]]:
  """Parses a serialized tf.train.Example into {key: (kind, values)}; only `keys` if given."""
  wanted = None if keys is None else set(keys)
  out = {}
  for number, _, features in _fields(memoryview(data)):
    if number != 1:
      continue
    for n, _, entry in _fields(features):
      if n != 1:
        continue
      key, feature = None, None
      for m, _, v in _fields(entry):
        if m == 1:
          key = bytes(v).decode("utf-8")
        elif m == 2:
          feature = v
      if key is None or (wanted is not None and key not in wanted):
        continue
      out[key] = _decode_feature(feature) if feature is not None else ("empty", [])
  return out


# ----------------------------------------------------------------------------------------------
# TFRecord framing: length u64, masked CRC of the length u32, payload, masked CRC of the payload.

_CRC_TABLE = None


def crc32c(data: bytes, crc: int = 0) -> int:
  """CRC-32C (Castagnoli), pure Python; payload CRCs of large files are not checked on read
  (too slow in Python), only the 8-byte length headers."""
  global _CRC_TABLE
  if _CRC_TABLE is None:
    table = []
    for i in range(256):
      c = i
      for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
      table.append(c)
    _CRC_TABLE = table
  table = _CRC_TABLE
  crc ^= 0xFFFFFFFF
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc_bytes(data: bytes) -> bytes:
  return struct.pack("<I", masked_crc32c(data))


def frame_record(payload: bytes) -> bytes:
  """One TFRecord: what a file holds for `payload`."""
  length = struct.pack("<Q", len(payload))
  return length + _crc_bytes(length) + payload + _crc_bytes(payload)


def record_offsets(path: str) -> list[tuple[int, int]]:
  """(payload offset, payload length) of every record in a TFRecord file, reading only headers."""
  out = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      header = f.read(12)
      if len(header) < 12:
        raise DecodeError(f"{path}: truncated TFRecord header at byte {pos}")
      if _crc_bytes(header[:8]) != header[8:]:
        raise DecodeError(f"{path}: corrupt TFRecord length header at byte {pos}")
      (length,) = struct.unpack("<Q", header[:8])
      if pos + 12 + length + 4 > size:
        raise DecodeError(f"{path}: truncated TFRecord at byte {pos} (record of {length} bytes "
                          f"runs past the end of the {size}-byte file)")
      out.append((pos + 12, length))
      pos += 12 + length + 4
      f.seek(pos)
  return out
