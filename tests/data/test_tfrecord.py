"""The TF-free Example / TFRecord codec, checked against TensorFlow's own reader and writer."""
import struct

import numpy as np
import pytest

from pipeline.data import tfrecord


def test_crc32c_known_value():
  assert tfrecord.crc32c(b"123456789") == 0xE3069283
  assert tfrecord.crc32c(b"") == 0


def test_parse_example_matches_tensorflow():
  import tensorflow as tf
  rng = np.random.default_rng(0)
  floats = rng.normal(size=13).astype(np.float32)
  ints = [0, 1, -1, 2**40, -(2**62), 127, 128]
  ex = tf.train.Example(features=tf.train.Features(feature={
      "f": tf.train.Feature(float_list=tf.train.FloatList(value=floats)),
      "i": tf.train.Feature(int64_list=tf.train.Int64List(value=ints)),
      "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"", b"\x00\xff", b"x" * 300])),
      "empty": tf.train.Feature(float_list=tf.train.FloatList(value=[])),
  }))
  parsed = tfrecord.parse_example(ex.SerializeToString())
  assert parsed["f"][0] == "float"
  np.testing.assert_array_equal(parsed["f"][1], floats)
  assert list(parsed["i"][1]) == ints
  assert parsed["b"] == ("bytes", [b"", b"\x00\xff", b"x" * 300])
  assert len(parsed["empty"][1]) == 0
  assert set(tfrecord.parse_example(ex.SerializeToString(), ["f"])) == {"f"}
  # Our encoder's output is what TensorFlow reads back.
  ours = tfrecord.encode_example({"f": floats, "i": np.array(ints), "b": [b"a", b"bc"]})
  back = tf.train.Example.FromString(ours).features.feature
  np.testing.assert_array_equal(back["f"].float_list.value, floats)
  assert list(back["i"].int64_list.value) == ints
  assert list(back["b"].bytes_list.value) == [b"a", b"bc"]


def test_parse_unpacked_float_list():
  # proto2-style encoders may write one fixed32 field per value instead of a packed run.
  values = [1.5, -2.25, 3.0]
  float_list = b"".join(b"\x0d" + struct.pack("<f", v) for v in values)
  feature = b"\x12" + bytes([len(float_list)]) + float_list
  entry = b"\x0a\x01k" + b"\x12" + bytes([len(feature)]) + feature
  features = b"\x0a" + bytes([len(entry)]) + entry
  example = b"\x0a" + bytes([len(features)]) + features
  kind, arr = tfrecord.parse_example(example)["k"]
  assert kind == "float" and arr.tolist() == values


def test_parse_rejects_truncated_example():
  data = tfrecord.encode_example({"b": [b"x" * 20]})
  with pytest.raises(tfrecord.DecodeError, match="truncated"):
    tfrecord.parse_example(data[:-5])


def test_record_offsets_match_tensorflow_writer(tmp_path):
  import tensorflow as tf
  payloads = [b"", b"a", b"xyz" * 1000]
  path = str(tmp_path / "x.tfrecord")
  with tf.io.TFRecordWriter(path) as w:
    for p in payloads:
      w.write(p)
  offsets = tfrecord.record_offsets(path)
  data = open(path, "rb").read()
  assert [data[o:o + n] for o, n in offsets] == payloads
  assert open(path, "rb").read() == b"".join(tfrecord.frame_record(p) for p in payloads)
  with open(path, "r+b") as f:
    f.truncate(len(data) - 10)
  with pytest.raises(tfrecord.DecodeError, match="truncated TFRecord"):
    tfrecord.record_offsets(path)


def test_tensorflow_reads_our_records(tmp_path):
  import tensorflow as tf
  payloads = [b"", tfrecord.encode_example({"k": np.arange(5)}), b"\x00" * 70000]
  path = tmp_path / "ours.tfrecord"
  path.write_bytes(b"".join(tfrecord.frame_record(p) for p in payloads))
  # TensorFlow checks both CRCs of every record.
  assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == payloads


def test_corrupt_length_header(tmp_path):
  path = tmp_path / "x.tfrecord"
  data = bytearray(tfrecord.frame_record(b"abc"))
  data[9] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(tfrecord.DecodeError, match="corrupt TFRecord length header at byte 0"):
    tfrecord.record_offsets(str(path))
