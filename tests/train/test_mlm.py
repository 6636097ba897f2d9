"""Masked-LM pretraining of the encoder through `lmstack train` (lmstack.train.mlm): masking, learning,
exact resume, the output as an encoder reference, and the recipe errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_run import interrupt_after, run_losses

from lmstack.errors import LmstackError
from lmstack.train.mlm import (
    IGNORE,
    MLMConfig,
    load_pretrain_config,
    load_wordpiece_tokenizer,
    mask_tokens,
    pretrain_mlm,
    special_ids,
)

TINY_ENCODER = [
    "encoder.n_layer=2",
    "encoder.n_head=2",
    "encoder.d_model=64",
    "encoder.d_ff=128",
    "encoder.max_position=64",
    "encoder.max_seq_len=64",
]


SETTINGS = [
    *TINY_ENCODER,
    "batch_size=8",
    "seq_len=64",
    "warmup_steps=2",
    "log_every=1",
    "eval_batches=2",
    "save_every=100",
    "tensorboard=false",
    # One thread: these steps are milliseconds of work, and on a busy 2-core machine two OpenMP threads
    # spin-wait on each other (measured 10x slower than one).
    "threads=1",
]


def _cfg(out, data, *extra: str) -> MLMConfig:
    cfg = load_pretrain_config(None, [*SETTINGS, f"data={data}", f"out={out}", *extra])
    assert isinstance(cfg, MLMConfig)
    return cfg


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """pretrain_mlm sets torch's thread count (threads=1 above); give the next test module what it had."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_wordpiece_tokenizer("all-minilm-l6-v2")


# --- masking -----------------------------------------------------------------------------------------


def test_masking_statistics(minilm_tokenizer):
    """15% of ordinary tokens selected, 80/10/10 among them; specials and padding never selected."""
    specials = special_ids(minilm_tokenizer)
    cls, sep, pad = (minilm_tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    mask = minilm_tokenizer.token_to_id("[MASK]")
    vocab = minilm_tokenizer.get_vocab_size()
    rng = np.random.default_rng(0)
    rows, length = 256, 128
    ids = rng.integers(1000, vocab, size=(rows, length))  # ordinary word pieces
    ids[:, 0], ids[:, 60] = cls, sep
    ids[:, 100:] = pad  # right padding
    selectable = ~np.isin(ids, specials)  # what the trainer passes
    inputs, labels = mask_tokens(ids, selectable, np.random.default_rng(1), mask, vocab)
    selected = labels != IGNORE
    assert not selected[~selectable].any()  # [CLS], [SEP] and padding are never selected
    assert (inputs[~selected] == ids[~selected]).all()  # unselected positions are untouched
    assert (labels[selected] == ids[selected]).all()  # the label is the original token
    assert selected[selectable].mean() == pytest.approx(0.15, abs=0.01)
    n = selected.sum()
    as_mask = (inputs[selected] == mask).sum() / n
    kept = (inputs[selected] == ids[selected]).sum() / n
    randomised = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)
    assert randomised == pytest.approx(0.1, abs=0.02)
    # Seeded: the same generator seed gives the same masks (exact resume depends on it).
    again, again_labels = mask_tokens(ids, selectable, np.random.default_rng(1), mask, vocab)
    assert (again == inputs).all() and (again_labels == labels).all()


# --- training ----------------------------------------------------------------------------------------


def test_mlm_loss_goes_down_and_output_is_an_encoder(tmp_path, corpus_file):
    from lmstack.hub import load_encoder

    run = tmp_path / "run"
    summary = pretrain_mlm(_cfg(run, corpus_file, "max_steps=40", "lr=2e-3", "eval_every=20", "encoder.dropout=0"))
    losses = run_losses(run)
    start, end = losses[1], summary["val_loss"]
    vocab = 30522
    assert start > math.log(vocab) - 0.5  # starts near uniform over the vocabulary
    assert end < start - 2.0 and end < math.log(vocab) - 2.0, (start, end)
    assert 0.0 < summary["val_masked_accuracy"] <= 1.0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_masked_accuracy" in r for r in evals)

    encoder = load_encoder(run)  # the run directory is an encoder reference (its checkpoint/)
    assert encoder.cfg.d_model == 64 and encoder.cfg.mlm_head
    vectors = encoder.embed(["Return the list of files.", "Open the socket and read a line."])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["format"] == "lmstack-encoder" and config["pretraining"]["objective"] == "masked-lm"


def test_shipped_recipe_trains(tmp_path, corpus_file):
    """recipes/encoder-tiny.yaml as shipped (2 x 128, batch 16 x 128), two steps on the session corpus."""
    settings = ["max_steps=2", "eval_every=2", "eval_batches=1", "tensorboard=false", "threads=1"]
    cfg = load_pretrain_config("recipes/encoder-tiny.yaml", [f"data={corpus_file}", f"out={tmp_path}", *settings])
    summary = pretrain_mlm(cfg)
    assert summary["steps"] == 2 and 0 < summary["val_loss"] < math.log(30522) + 0.5
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_cli_embed_and_classify_accept_the_output(tmp_path, corpus_file):
    from lmstack.cli import main

    run = tmp_path / "run"
    pretrain_mlm(_cfg(run, corpus_file, "max_steps=2", "eval_every=2"))
    texts = tmp_path / "texts.txt"
    texts.write_text("first line\nsecond line\nthird\n")
    assert main(["embed", "--model", str(run), "--input", str(texts), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (3, 64)
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(6)] + [
        {"text": f"bad {i}", "label": "neg"} for i in range(6)
    ]
    data = tmp_path / "cls.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["finetune", "--task", "classify", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "cls")]
    assert main([*args, "--set", "epochs=1"]) == 0
    assert json.loads((tmp_path / "cls" / "metrics.json").read_text())["labels"] == ["neg", "pos"]


def test_resumed_mlm_run_matches_straight_run(tmp_path, corpus_file, monkeypatch):
    extra = ("max_steps=6", "eval_every=3", "encoder.dropout=0.1", "grad_accum=2")
    straight = pretrain_mlm(_cfg(tmp_path / "straight", corpus_file, *extra))
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            pretrain_mlm(_cfg(tmp_path / "split", corpus_file, *extra))
    assert json.loads((tmp_path / "split/checkpoint/trainer_state.json").read_text())["step"] == 3
    resumed = pretrain_mlm(_cfg(tmp_path / "split", corpus_file, *extra), resume=True)
    assert resumed["steps"] == straight["steps"] == 6
    assert run_losses(tmp_path / "straight") == run_losses(tmp_path / "split")
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["val_masked_accuracy"] == straight["val_masked_accuracy"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight/checkpoint/model.safetensors")
    b = load_file(tmp_path / "split/checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LmstackError, match="cannot resume .*mask_prob"):
        pretrain_mlm(_cfg(tmp_path / "split", corpus_file, *extra, "max_steps=8", "mask_prob=0.2"), resume=True)


def test_step_does_not_depend_on_how_the_batch_is_split(tmp_path, corpus_file):
    """Masks follow (seed, step, row) and losses are weighted by selected tokens: batch 8 = batch 4 x grad_accum 2."""
    extra = ("max_steps=3", "eval_every=3", "encoder.dropout=0")
    whole = pretrain_mlm(_cfg(tmp_path / "whole", corpus_file, *extra))
    split = pretrain_mlm(_cfg(tmp_path / "accum", corpus_file, *extra, "batch_size=4", "grad_accum=2"))
    a, b = run_losses(tmp_path / "whole"), run_losses(tmp_path / "accum")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-5) for k in a)
    assert whole["train_loss"] == pytest.approx(split["train_loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, corpus_file, parallel):
    """`lmstack train --nproc-per-node 2` (gloo) trains the encoder loss for loss like one process."""
    extra = ["max_steps=3", "eval_every=3", "encoder.dropout=0"]
    pretrain_mlm(_cfg(tmp_path / "one", corpus_file, *extra))
    cmd = [sys.executable, "-m", "lmstack.cli", "train", "--nproc-per-node", "2"]  # the encoder.* keys: MLM
    cmd += ["--out", str(tmp_path / "two"), "--data", str(corpus_file)]
    for item in [*SETTINGS, *extra, "batch_size=4", f"parallel={parallel}"]:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = run_losses(tmp_path / "one"), run_losses(tmp_path / "two")
    assert one.keys() == two.keys() and all(one[k] == pytest.approx(two[k], abs=1e-4) for k in one)
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one_evals = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    val = lambda records: [r["val_loss"] for r in records if "val_loss" in r]
    assert val(evals) == pytest.approx(val(one_evals), abs=1e-4)


# --- bad input ----------------------------------------------------------------------------------------


def test_encoder_recipe_with_decoder_keys_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("encoder:\n  n_layer: 2\nmodel: tiny\nsample_tokens: 8\n")
    with pytest.raises(LmstackError, match=r"'model', 'sample_tokens': decoder-only key\(s\) in an encoder"):
        load_pretrain_config(recipe)


def test_decoder_recipe_with_encoder_keys_is_refused():
    with pytest.raises(LmstackError, match=r"'mask_prob': encoder \(masked-LM\) key\(s\) in a decoder recipe"):
        load_pretrain_config("recipes/tiny.yaml", ["mask_prob=0.15"])
    assert not isinstance(load_pretrain_config("recipes/tiny.yaml"), MLMConfig)  # decoder recipes as before
    assert isinstance(load_pretrain_config("recipes/encoder-tiny.yaml"), MLMConfig)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_mask_prob_outside_unit_interval_is_refused(value):
    with pytest.raises(LmstackError, match=r"mask_prob must be in \(0, 1\)"):
        load_pretrain_config("recipes/encoder-tiny.yaml", [f"mask_prob={value}"])


def test_replacement_shares_must_fit():
    with pytest.raises(LmstackError, match="sum to at most 1"):
        load_pretrain_config("recipes/encoder-tiny.yaml", ["mask_token_prob=0.9", "random_token_prob=0.2"])


def test_tokenizer_without_mask_token_is_refused(tmp_path, tokenizer_dir, corpus_file):
    # The decoder's byte-level BPE tokenizer has no [CLS]/[SEP]/[MASK].
    with pytest.raises(LmstackError, match=r"has no \[CLS\] \[SEP\] \[PAD\] \[MASK\] token\(s\).*WordPiece"):
        pretrain_mlm(_cfg(tmp_path, corpus_file, f"tokenizer={tokenizer_dir}"))
    with pytest.raises(LmstackError, match="tokenizer 'nowhere' not found"):
        pretrain_mlm(_cfg(tmp_path, corpus_file, "tokenizer=nowhere"))
    assert not (tmp_path / "checkpoint").exists()


def test_bad_data_is_refused_before_training(tmp_path, token_data_dir, corpus_file):
    with pytest.raises(LmstackError, match="token-shard directory .*an encoder recipe reads text"):
        pretrain_mlm(_cfg(tmp_path, token_data_dir))
    with pytest.raises(LmstackError, match="encoder.vocab_size is 1,000; set --set encoder.vocab_size=30522"):
        pretrain_mlm(_cfg(tmp_path, corpus_file, "encoder.vocab_size=1000"))
    with pytest.raises(LmstackError, match=r"seq_len=65 must be in 3\.\.encoder\.max_position=64"):
        _cfg(tmp_path, corpus_file, "seq_len=65")


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    from lmstack.cli import main

    code = main(["train", "--recipe", "recipes/encoder-tiny.yaml", "--set", "model=tiny", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decoder-only key(s) in an encoder" in err[0]
