"""Prompt tokenization in the pi0 format, and the small tokenizer shipped for synthetic data.

pi0 prompt format: the prompt is cleaned (strip, '_' and newlines become spaces), encoded with a
leading BOS, followed by the encoding of "\\n" (PaliGemma's start-of-answer marker). Token ids are
right-padded with 0 to a fixed length with a boolean mask; longer prompts are truncated.

The real tokenizer is PaliGemma's (vocab 257152, `gs://big_vision/paligemma_tokenizer.model`).
`pipeline/data/assets/synthetic_tokenizer.model` is a 512-piece BPE model trained on the LIBERO task
strings so that tiny models and the synthetic smoke run need no download; regenerate it with
`python -m pipeline.data.tokenizer --tasks=pipeline/data/assets/libero_tasks.json
--out=pipeline/data/assets/synthetic_tokenizer.model`.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os

from absl import app
from absl import flags
import numpy as np
import sentencepiece as spm

PALIGEMMA_TOKENIZER = "gs://big_vision/paligemma_tokenizer.model"
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SYNTHETIC_TOKENIZER = os.path.join(ASSETS_DIR, "synthetic_tokenizer.model")
LIBERO_TASKS = os.path.join(ASSETS_DIR, "libero_tasks.json")
SYNTHETIC_VOCAB_SIZE = 512

# Ids laid out as in PaliGemma's model so that padding with 0 means <pad> in both.
_SPECIAL_IDS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _read_bytes(path: str) -> bytes:
  """Reads a local or remote (gs://, ...) file."""
  if "://" not in path:
    with open(path, "rb") as f:
      return f.read()
  from etils import epath  # Imported lazily: only remote paths need it.
  return epath.Path(path).read_bytes()


@functools.lru_cache(maxsize=8)
def load_processor(path: str) -> spm.SentencePieceProcessor:
  """Loads (once per process) a sentencepiece model from a local path or URL."""
  try:
    proto = _read_bytes(path)
  except Exception as e:
    raise FileNotFoundError(
        f"cannot read tokenizer model config.data.tokenizer_path={path!r}: {e}") from e
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(proto)
  except Exception as e:
    raise ValueError(
        f"config.data.tokenizer_path={path!r} is not a sentencepiece model: {e}") from e
  return sp


def vocab_size(path: str) -> int:
  """Number of token ids of the model at `path` (configs check it against model.vocab_size)."""
  return load_processor(path).vocab_size()


def clean_prompt(prompt: str) -> str:
  return prompt.strip().replace("_", " ").replace("\n", " ")


class PromptTokenizer:
  """Tokenizes prompts into fixed-length (ids int32[max_len], mask bool[max_len]).

  Holds only the path so that it pickles cheaply into loader worker processes; the sentencepiece
  model is loaded lazily in each process.
  """

  def __init__(self, path: str, max_len: int):
    if max_len <= 0:
      raise ValueError(f"model.max_token_len must be positive, got {max_len}")
    self.path = path
    self.max_len = max_len

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    return load_processor(self.path)

  @property
  def vocab_size(self) -> int:
    return self.processor.vocab_size()

  def encode(self, prompt: str) -> list[int]:
    """Token ids of a prompt in the pi0 format, unpadded and untruncated."""
    sp = self.processor
    return sp.encode(clean_prompt(prompt), add_bos=True) + sp.encode("\n")

  def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(prompt)
    if len(ids) > self.max_len:
      if prompt not in _warned:  # Once per prompt and process: training repeats prompts a lot.
        _warned.add(prompt)
        _log.warning("prompt of %d tokens truncated to model.max_token_len=%d: %r", len(ids),
                     self.max_len, prompt)
      ids = ids[:self.max_len]
    tokens = np.zeros(self.max_len, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros(self.max_len, np.bool_)
    mask[:len(ids)] = True
    return tokens, mask


def train_synthetic_tokenizer(task_strings: list[str], vocab: int = SYNTHETIC_VOCAB_SIZE) -> bytes:
  """Trains the small BPE tokenizer on task strings; returns the serialized model.

  BPE keeps whole words at this size (short prompts); byte fallback makes any text encodable;
  "\\n" is its own piece and no dummy prefix is added, so encode("\\n") is one id as in PaliGemma.
  Single-threaded training is deterministic.
  """
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sorted(set(task_strings))), model_writer=out, vocab_size=vocab,
      model_type="bpe", byte_fallback=True, user_defined_symbols=["\n"], add_dummy_prefix=False,
      normalization_rule_name="identity", num_threads=1, hard_vocab_limit=False, minloglevel=2,
      **_SPECIAL_IDS)
  return out.getvalue()


def load_task_strings(tasks_json: str) -> list[str]:
  """Task strings of a {suite: [task, ...]} json file (libero_tasks.json)."""
  with open(tasks_json) as f:
    suites = json.load(f)
  return [t for tasks in suites.values() for t in tasks]


def write_synthetic_tokenizer(tasks_json: str = LIBERO_TASKS,
                              out: str = SYNTHETIC_TOKENIZER) -> str:
  """Trains the synthetic tokenizer on the task strings of `tasks_json`, writes it to `out`."""
  model = train_synthetic_tokenizer(load_task_strings(tasks_json))
  with open(out, "wb") as f:
    f.write(model)
  return out


def _define_flags():
  flags.DEFINE_string("tasks", LIBERO_TASKS, "{suite: [task, ...]} json file to train on.")
  flags.DEFINE_string("out", SYNTHETIC_TOKENIZER, "Where to write the sentencepiece model.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    path = write_synthetic_tokenizer(flags.FLAGS.tasks, flags.FLAGS.out)
  except (OSError, ValueError) as e:
    raise SystemExit(f"tokenizer failed: {e}") from None
  print(f"wrote {path} (vocab {vocab_size(path)})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
