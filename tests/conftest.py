"""Shared fixtures: real text, a tokenizer trained on it, and token shards (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so test timings are stable and processes don't oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    from lmstack.data.builtin import write_builtin_corpus

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_builtin_corpus(path, max_bytes=600_000)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, tmp_path_factory):
    from lmstack.tokenizer import train_tokenizer_from_files

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer_from_files([corpus_file], vocab_size=1024, out_dir=out)
    return out


@pytest.fixture(scope="session")
def token_data_dir(corpus_file, tokenizer_dir, tmp_path_factory):
    from lmstack.data.tokenize import tokenize_corpus

    out = tmp_path_factory.mktemp("tokens")
    tokenize_corpus([corpus_file], tokenizer_dir, out, val_fraction=0.05, workers=1)
    return out


def _unigram_cross_entropy(data) -> float:
    """Cross-entropy (nats/token) of val under the train split's token frequencies (add-one smoothed)."""
    import numpy as np

    from lmstack.data.shards import load_meta, load_split

    vocab = load_meta(data)["vocab_size"]
    counts = np.bincount(np.asarray(load_split(data, "train")), minlength=vocab) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(load_split(data, "val"))].mean())


@pytest.fixture(scope="session")
def unigram_baseline():
    """The loss a model must clearly beat to have learned more than token frequencies."""
    return _unigram_cross_entropy
