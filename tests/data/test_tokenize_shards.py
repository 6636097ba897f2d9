"""Text -> token shards: eos separators, document-level split, dtype, meta, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmstack.data.shards import load_meta, load_split
from lmstack.data.tokenize import tokenize_corpus
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer


def test_shards_hold_every_document_followed_by_eos(token_data_dir, tokenizer_dir, corpus_file):
    meta = load_meta(token_data_dir)
    tok = Tokenizer.load(tokenizer_dir)
    train, val = load_split(token_data_dir, "train"), load_split(token_data_dir, "val")
    assert train.dtype == np.uint16 and meta["dtype"] == "uint16"
    n_docs = len(corpus_file.read_text().splitlines())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_docs
    assert int((train == tok.eos_id).sum()) == meta["splits"]["train"]["documents"]
    assert int((val == tok.eos_id).sum()) == meta["splits"]["val"]["documents"] > 0
    assert train.size == meta["splits"]["train"]["tokens"]
    # The first train document decodes back to a corpus document.
    first_doc = tok.decode(train[: int(np.argmax(train == tok.eos_id))].tolist())
    assert first_doc in {json.loads(line)["text"] for line in corpus_file.read_text().splitlines()}
    assert (token_data_dir / "tokenizer" / "tokenizer.json").is_file()


def test_split_is_deterministic_and_multiprocess_equals_single(corpus_file, tokenizer_dir, tmp_path):
    a = tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "a", val_fraction=0.1, workers=1, seed=3)
    b = tokenize_corpus([corpus_file], tokenizer_dir, tmp_path / "b", val_fraction=0.1, workers=2, seed=3)
    assert a["splits"] == b["splits"]
    assert np.array_equal(load_split(tmp_path / "a", "val"), load_split(tmp_path / "b", "val"))


def test_single_text_file_still_gets_a_val_split(tokenizer_dir, tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("\n".join(f"Line {i} of a long book." for i in range(400)))
    meta = tokenize_corpus([src], tokenizer_dir, tmp_path / "out", val_fraction=0.1)
    assert meta["splits"]["val"]["tokens"] > 0 and meta["splits"]["train"]["tokens"] > meta["splits"]["val"]["tokens"]


def test_bad_inputs_are_clear_errors(tokenizer_dir, tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        tokenize_corpus([tmp_path / "missing.txt"], tokenizer_dir, tmp_path / "o")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmstackError, match="empty"):
        tokenize_corpus([tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "o")
    with pytest.raises(LmstackError, match="val-fraction"):
        tokenize_corpus([tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "o", val_fraction=1.5)
    with pytest.raises(LmstackError, match="meta.json"):
        load_meta(tmp_path)
