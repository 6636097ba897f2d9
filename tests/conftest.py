"""Shared fixtures: real text, a tokenizer trained on it, and token shards (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so test timings are stable and processes don't oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# In CI a skip is a failure (a missing test dependency must never hide a parity test), except for
# tests marked `gpu`: no CI machine has a CUDA device.
SKIPS_FAIL = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _fail_skip(report, what: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{what} was skipped under CI=true ({reason}); install what it needs (pip install -e '.[dev]')"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if SKIPS_FAIL and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        _fail_skip(report, item.nodeid)


_SKIPPED_MODULES: list[str] = []


def pytest_collectreport(report):
    """A whole module skipped at import (`pytest.skip(allow_module_level=True)`, `importorskip`)."""
    if SKIPS_FAIL and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED_MODULES.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    for line in _SKIPPED_MODULES:
        terminalreporter.write_line(f"FAILED (module skipped under CI=true) {line}", red=True)


def pytest_sessionfinish(session, exitstatus):
    # The rest of the suite still runs; the run as a whole fails.
    if _SKIPPED_MODULES and exitstatus == 0:
        session.exitstatus = 1


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
