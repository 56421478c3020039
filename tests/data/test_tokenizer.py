"""Prompt tokenizer: pi0 format, padding, truncation, the shipped synthetic model."""
import json
import logging
import os

import numpy as np
import pytest
import sentencepiece as spm

from pipeline.data import tokenizer

_TASKS_CANDIDATES = (tokenizer.LIBERO_TASKS, "/work/shared/reference/libero_tasks.json")


def _tasks_json():
  for path in _TASKS_CANDIDATES:
    if os.path.exists(path):
      return path
  pytest.skip("libero_tasks.json not available")


@pytest.fixture(scope="module")
def sp():
  # An independent handle on the same model, to build expected ids by hand.
  proc = spm.SentencePieceProcessor()
  proc.Load(tokenizer.SYNTHETIC_TOKENIZER)
  return proc


def test_synthetic_model_ships_and_fits_tiny_vocab():
  assert os.path.exists(tokenizer.SYNTHETIC_TOKENIZER)
  assert tokenizer.vocab_size(tokenizer.SYNTHETIC_TOKENIZER) <= 512


def test_pi0_format(sp):
  tok = tokenizer.PromptTokenizer(tokenizer.SYNTHETIC_TOKENIZER, max_len=40)
  prompt = "  pick_up the ketchup\nand place it in the basket "
  ids, mask = tok(prompt)
  clean = "pick up the ketchup and place it in the basket"
  expected = [sp.bos_id()] + sp.encode(clean) + sp.encode("\n")
  assert sp.bos_id() == 2 and sp.pad_id() == 0
  assert len(sp.encode("\n")) == 1  # one start-of-answer token, as PaliGemma's "\n"
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape == (40,)
  n = len(expected)
  np.testing.assert_array_equal(ids[:n], expected)
  np.testing.assert_array_equal(ids[n:], 0)
  np.testing.assert_array_equal(mask, np.arange(40) < n)
  # Whole words stay whole for the task strings: few tokens per prompt.
  assert n <= 14
  assert sp.decode(ids[1:n - 1].tolist()) == clean


def test_truncation_warns(caplog):
  tok = tokenizer.PromptTokenizer(tokenizer.SYNTHETIC_TOKENIZER, max_len=5)
  prompt = "pick up the black bowl on the stove and place it on the plate (truncation test)"
  with caplog.at_level(logging.WARNING, logger="pipeline.data.tokenizer"):
    ids, mask = tok(prompt)
    tok(prompt)
  full = tok.encode(prompt)
  assert len(full) > 5
  np.testing.assert_array_equal(ids, full[:5])
  assert mask.all()
  # Warned once for a prompt however often it is seen.
  assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


def test_all_task_strings_in_vocab_without_unknowns(sp):
  with open(_tasks_json()) as f:
    tasks = [t for ts in json.load(f).values() for t in ts]
  tok = tokenizer.PromptTokenizer(tokenizer.SYNTHETIC_TOKENIZER, max_len=48)
  for task in tasks:
    ids = tok.encode(task)
    assert sp.unk_id() not in ids
    assert max(ids) < 512 and len(ids) <= 48


def test_regeneration_is_deterministic(tmp_path):
  out = tokenizer.write_synthetic_tokenizer(_tasks_json(), str(tmp_path / "t.model"))
  with open(out, "rb") as f, open(tokenizer.SYNTHETIC_TOKENIZER, "rb") as g:
    assert f.read() == g.read()


def test_missing_tokenizer_names_config_key(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer_path"):
    tokenizer.vocab_size(str(tmp_path / "nope.model"))
