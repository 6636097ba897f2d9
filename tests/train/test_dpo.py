"""Preference optimization and reward models on a tiny model: each loss equals its formula computed by
hand on a fixed batch, a short run raises held-out preference accuracy, bad input fails before training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.data.demo import PREFERENCES
from lmstack.errors import LmstackError
from lmstack.train.dpo import (
    REFERENCE_CACHE,
    REWARD_HEAD,
    PairScores,
    RewardModel,
    align,
    load_align_config,
    preference_loss,
    reward_model_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _scores() -> PairScores:
    return PairScores(
        chosen=torch.tensor([-10.0, -6.0]),
        rejected=torch.tensor([-12.0, -5.0]),
        chosen_len=torch.tensor([5, 3]),
        rejected_len=torch.tensor([4, 2]),
        ref_chosen=torch.tensor([-11.0, -6.5]),
        ref_rejected=torch.tensor([-11.5, -4.0]),
    )


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_losses_equal_hand_computed_values():
    s, beta = _scores(), 0.5
    # pair 0: policy/ref log-ratios chosen +1, rejected -0.5 -> h = 1.5; pair 1: +0.5 and -1 -> h = 1.5
    h = [(-10 + 11) - (-12 + 11.5), (-6 + 6.5) - (-5 + 4)]
    dpo, margin = preference_loss(s, "dpo", beta)
    assert dpo.tolist() == pytest.approx([-_logsig(beta * x) for x in h], abs=1e-6)
    assert margin.tolist() == pytest.approx([beta * x for x in h], abs=1e-6)
    ipo, _ = preference_loss(s, "ipo", beta)
    assert ipo.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h], abs=1e-6)
    avg_c, avg_r = [-10 / 5, -6 / 3], [-12 / 4, -5 / 2]
    simpo, _ = preference_loss(s, "simpo", 2.0, simpo_gamma=1.0)
    expect = [-_logsig(2.0 * (c - r) - 1.0) for c, r in zip(avg_c, avg_r, strict=True)]
    assert simpo.tolist() == pytest.approx(expect, abs=1e-6)
    orpo, _ = preference_loss(s, "orpo", 0.1)

    def log_odds(a):
        p = math.exp(a)
        return math.log(p / (1 - p))

    expect = [-c - 0.1 * _logsig(log_odds(c) - log_odds(r)) for c, r in zip(avg_c, avg_r, strict=True)]
    assert orpo.tolist() == pytest.approx(expect, abs=1e-5)
    bt = reward_model_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]))
    assert bt.tolist() == pytest.approx([-_logsig(1.0), -_logsig(-1.0)], abs=1e-6)


@pytest.fixture(scope="module")
def style_pairs(tmp_path_factory):
    """The demo pairs whose rejected reply is the evasive one: a preference a 64-dim random model can learn
    and carry to held-out prompts (facts about capitals it cannot know)."""
    from lmstack.data.demo.build_alignment import EVASIVE_EN, EVASIVE_ZH

    rows = [r for r in PREFERENCES.read_text(encoding="utf-8").splitlines() if EVASIVE_EN in r or EVASIVE_ZH in r]
    path = tmp_path_factory.mktemp("pairs") / "style.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _config(base_dir, out, *settings, data=PREFERENCES):
    return load_align_config(
        None,
        [
            f"base_model={base_dir}",
            f"data={data}",
            f"out={out}",
            "seq_len=128",
            "batch_size=8",
            "val_fraction=0.25",
            "tensorboard=false",
            "sample_tokens=4",
            "log_every=10",
            *settings,
        ],
    )


def _evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "preference_accuracy" in r]


def test_dpo_with_lora_raises_preference_accuracy(base_dir, style_pairs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "dpo"
    cfg = _config(
        base_dir,
        out,
        "max_steps=30",
        "lr=5e-3",
        "eval_every=10",
        "peft.target_modules=[q_proj,v_proj,lm_head]",
        data=style_pairs,
    )
    summary = align(cfg)
    assert load_file(str(out / REFERENCE_CACHE))["val"].shape == (10, 2)  # the base's log-probs, cached once
    # At step 0 the policy is the reference: every implicit reward margin is 0 and accuracy (margin > 0) is 0.
    margins = [e["reward_margin"] for e in _evals(out)]
    assert summary["preference_accuracy"] >= 0.9 and margins[0] > 0 and margins[-1] > margins[0]
    assert (out / "checkpoint" / "adapter_config.json").is_file()
    with pytest.raises(LmstackError, match="already holds a checkpoint"):
        align(cfg)


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_other_losses_learn(base_dir, style_pairs, tmp_path, loss):
    out = tmp_path / loss
    settings = (
        f"loss={loss}",
        "max_steps=20",
        "lr=1e-2",
        "eval_every=20",
        "peft.target_modules=[q_proj,v_proj,lm_head]",
    )
    summary = align(_config(base_dir, out, *settings, data=style_pairs))
    assert summary["preference_accuracy"] >= 0.9 and summary["reward_margin"] > 0
    assert (out / REFERENCE_CACHE).is_file() == (loss == "ipo")  # simpo and orpo need no reference


def test_reward_model_orders_held_out_pairs(base_dir, style_pairs, tmp_path):
    out = tmp_path / "rm"
    settings = ("loss=rm", "max_steps=30", "lr=3e-3", "eval_every=30", "peft.method=full")
    summary = align(_config(base_dir, out, *settings, data=style_pairs))
    assert summary["preference_accuracy"] >= 0.8
    assert (out / "checkpoint" / REWARD_HEAD).is_file()
    model, tokenizer = RewardModel.load(out / "checkpoint")
    assert isinstance(model.score(tokenizer, "What is the capital of France?", "Paris."), float)


def test_bad_input_fails_before_training(base_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    with pytest.raises(LmstackError, match=r"bad.jsonl:2: row has no 'rejected'"):
        align(load_align_config(None, [f"base_model={base_dir}", f"data={bad}", f"out={tmp_path / 'o'}"]))
    with pytest.raises(LmstackError, match="loss must be one of"):
        load_align_config(None, ["loss=kto"])
    # a reference model with another vocabulary
    from lmstack.config import ModelConfig
    from lmstack.model.io import save_model_dir
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import train_tokenizer

    other_tok = train_tokenizer(["some other text entirely, a different vocabulary"] * 20, vocab_size=400)
    other = tmp_path / "other"
    save_model_dir(
        Transformer(ModelConfig(vocab_size=other_tok.vocab_size, n_layer=1, n_head=2, d_model=32, d_ff=64)),
        other,
        other_tok,
    )
    with pytest.raises(LmstackError, match="different vocabulary"):
        align(_config(base_dir, tmp_path / "r", f"ref_model={other}", "max_steps=1"))


def test_cli_align_dpo_and_rm(base_dir, style_pairs, tmp_path, capsys):
    from lmstack.cli import main

    common = [
        "--model",
        str(base_dir),
        "--data",
        str(style_pairs),
        "--set",
        "seq_len=128",
        "--set",
        "tensorboard=false",
    ]
    assert main(["align", "dpo", "--loss", "simpo", "--out", str(tmp_path / "a"), *common, "--set", "max_steps=2"]) == 0
    assert "preference accuracy" in capsys.readouterr().err
    assert main(["align", "rm", "--method", "full", "--out", str(tmp_path / "b"), *common, "--set", "max_steps=1"]) == 0
    assert (tmp_path / "b" / "checkpoint" / REWARD_HEAD).is_file()
    assert (
        main(["align", "dpo", "--model", str(base_dir), "--data", "missing.jsonl", "--out", str(tmp_path / "c")]) == 2
    )
    assert "error: preference file 'missing.jsonl' not found" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_dpo_with_virtual_token_methods_learns_and_its_adapter_loads_back(base_dir, style_pairs, tmp_path, method):
    """Prefix/prompt tuning through alignment: the reference is the base without virtual tokens, the policy
    scores only the real tokens (the virtual positions sit in the cache). Held-out = the training pairs."""
    import numpy as np
    from safetensors.torch import load_file

    from lmstack.data.preference import read_pairs, tokenize_pairs
    from lmstack.hub import load_model
    from lmstack.peft import apply_peft
    from lmstack.train.dpo import pair_scores

    out = tmp_path / method
    settings = [f"peft.method={method}", "peft.num_virtual_tokens=8", "max_steps=20", "eval_every=10"]
    cfg = _config(base_dir, out, *settings, "lr=3e-2", f"val_data={style_pairs}", data=style_pairs)
    align(cfg)
    base, tokenizer = load_model(base_dir)
    pairs = tokenize_pairs(tokenizer, read_pairs(style_pairs), 128)
    batch = pairs.batch(np.arange(len(pairs)), tokenizer.pad_id or 0)
    reference = load_file(str(out / REFERENCE_CACHE))["val"]

    @torch.no_grad()
    def margins(model) -> torch.Tensor:
        s = pair_scores(model.eval(), batch, torch.device("cpu"))
        return cfg.beta * ((s.chosen - reference[:, 0]) - (s.rejected - reference[:, 1]))

    assert margins(base).abs().max() < 1e-4  # the cached reference is the bare base
    torch.manual_seed(cfg.seed)  # the run's virtual-token initialisation
    before = margins(apply_peft(load_model(base_dir)[0], cfg.peft, tokenizer, verbose=False))
    trained, _ = load_model(out / "checkpoint")  # the saved adapter, over its recorded base
    assert trained.peft_config.method == method
    after = margins(trained)
    # measured: accuracy 12.5% -> 100% (prefix), 7.5% -> 100% (prompt); mean margin -0.01 -> 1.14 / 0.10
    assert float((before > 0).float().mean()) < 0.5 and float((after > 0).float().mean()) >= 0.9
    assert float(after.mean()) > float(before.mean()) + 0.05
    last = _evals(out)[-1]
    assert float(after.mean()) == pytest.approx(last["reward_margin"], abs=1e-4)  # loads back as trained
