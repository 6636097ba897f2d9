"""The train/val split is near the requested fraction of the text whatever the corpus's shape, and every
split counts its bytes (so bits per byte is defined on both)."""

from __future__ import annotations

import json
import math

import pytest

from lmstack.config import load_train_config
from lmstack.data.shards import load_meta
from lmstack.data.tokenize import MIN_VAL_DOCUMENTS, plan_split, tokenize_corpus
from lmstack.train.pretrain import pretrain

TINY_MODEL = ["model.preset=tiny", "model.vocab_size=1024", "model.n_layer=2", "model.d_model=64", "model.d_ff=128"]


@pytest.fixture(scope="module")
def two_file_folder(corpus_file, tmp_path_factory):
    """A common shape: one big plain-text file per source (here 70% and 30% of real prose)."""
    texts = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").splitlines()]
    cut = int(len(texts) * 0.7)
    folder = tmp_path_factory.mktemp("two_files")
    (folder / "big.txt").write_text("\n\n".join(texts[:cut]), encoding="utf-8")
    (folder / "small.txt").write_text("\n\n".join(texts[cut:]), encoding="utf-8")
    return folder


def _bytes(folder) -> int:
    return sum(len(p.read_text(encoding="utf-8").encode("utf-8")) for p in folder.glob("*.txt"))


def test_two_files_are_split_inside_both_near_the_fraction(two_file_folder, tokenizer_dir, tmp_path):
    meta = tokenize_corpus([two_file_folder], tokenizer_dir, tmp_path / "tok", val_fraction=0.05, workers=1)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert meta["split"]["method"] == "spans"
    assert val["documents"] == 2  # a held-out span from each file, not one whole file
    assert 0.04 <= val["tokens"] / (train["tokens"] + val["tokens"]) <= 0.06
    assert val["bytes"] > 0 and train["bytes"] + val["bytes"] == _bytes(two_file_folder)
    assert 0.045 <= meta["split"]["val_share_of_bytes"] <= 0.055
    assert "warning" not in meta["split"]


def test_bits_per_byte_is_finite_after_training_on_two_files(two_file_folder, tokenizer_dir, tmp_path):
    data = tmp_path / "tok"
    tokenize_corpus([two_file_folder], tokenizer_dir, data, val_fraction=0.05, workers=1)
    settings = [f"data={data}", f"out={tmp_path / 'run'}", "batch_size=4", "seq_len=32", "max_steps=6"]
    settings += ["eval_every=6", "eval_batches=2", "log_every=3", "sample_every=0", "warmup_steps=2"]
    summary = pretrain(load_train_config(None, [*TINY_MODEL, *settings]))
    assert math.isfinite(summary["val_bpb"]) and 0 < summary["val_bpb"] < 20
    expected = summary["val_loss"] * load_meta(data)["splits"]["val"]["tokens"]
    assert summary["val_bpb"] == pytest.approx(expected / (math.log(2) * load_meta(data)["splits"]["val"]["bytes"]))


def test_many_documents_are_split_by_document_with_bytes_counted(token_data_dir, corpus_file):
    meta = load_meta(token_data_dir)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    texts = [json.loads(line)["text"] for line in corpus_file.read_text(encoding="utf-8").splitlines()]
    assert meta["split"]["method"] == "documents" and val["documents"] >= MIN_VAL_DOCUMENTS
    assert train["bytes"] + val["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert 0.025 <= val["bytes"] / (train["bytes"] + val["bytes"]) <= 0.1


def test_few_large_documents_fall_back_to_spans_and_skewed_sizes_too():
    line = "a line of text that repeats\n"
    assert plan_split([line * 400, line * 300, line * 200], 0.1, seed=0).method == "spans"
    # hundreds of documents, but one holds almost all the text: a whole-document split would be far off
    skewed = [line * 5000] + [line] * 300
    plan = plan_split(skewed, 0.05, seed=0)
    assert plan.method == "spans" and 0.04 <= plan.val_share <= 0.06


def test_spans_cut_at_line_breaks_and_keep_all_text():
    doc = "".join(f"line {i:03d}\n" for i in range(200))
    plan = plan_split([doc], 0.1, seed=0)
    (train, _), (val, split) = plan.pieces
    assert split == "val" and train + val == doc
    assert train.endswith("\n") and val.startswith("line ")


def test_a_split_that_cannot_be_near_the_fraction_warns(tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "short.jsonl"
    src.write_text("".join(json.dumps({"text": "tiny doc"}) + "\n" for _ in range(3)))
    meta = tokenize_corpus([src], tokenizer_dir, tmp_path / "tok", val_fraction=0.01, workers=1)
    assert "too short" in meta["split"]["warning"]
    assert "warning: the validation split holds" in capsys.readouterr().err
    assert meta["splits"]["val"]["bytes"] > 0


def test_zero_val_fraction_keeps_everything_in_train(tokenizer_dir, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text\n" * 50)
    meta = tokenize_corpus([src], tokenizer_dir, tmp_path / "tok", val_fraction=0.0, workers=1)
    assert meta["split"]["method"] == "none" and meta["splits"]["val"]["documents"] == 0
