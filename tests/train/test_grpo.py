"""GRPO: advantages, clipping and the k3 KL on a fixed batch; the built-in rewards; a short run through
the engine on a tiny model; reward functions that fail are refused before training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.data.demo import ARITHMETIC
from lmstack.errors import LmstackError
from lmstack.train.grpo import group_advantages, grpo, grpo_loss, load_grpo_config, rollout_params
from lmstack.train.rewards import exact_match, extract_answer, format_reward, resolve_reward

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv[:4].tolist() == pytest.approx([x / (std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)], abs=1e-5)
    assert adv[4:].tolist() == [0.0] * 4  # a group that all agrees teaches nothing


def test_clipped_objective_and_k3_kl_on_a_fixed_batch():
    # two completions: tokens 0,1 belong to row 0 (advantage +1), token 2 to row 1 (advantage -1)
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.55, 0.25]))  # ratios 1.5, 1.1, 0.5
    rows, adv = torch.tensor([0, 0, 1]), torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(new, old, adv, rows, 2, clip_eps=0.2)
    # row 0: min(1.5, 1.2) = 1.2 and min(1.1, 1.1) = 1.1 -> -(1.2 + 1.1) / 2; row 1: min(-0.5, -0.8) = -0.8 -> +0.8
    assert float(loss) == pytest.approx((-(1.2 + 1.1) / 2 + 0.8) / 2, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    ref = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    loss_kl, stats = grpo_loss(new, old, adv, rows, 2, clip_eps=0.2, ref_logps=ref, kl_coef=0.1)
    k3 = [r - math.log(r) - 1 for r in (0.5 / 0.75, 0.5 / 0.55, 0.5 / 0.25)]  # exp(d) - d - 1, d = ref - logp
    expect = ((-1.2 + 0.1 * k3[0] - 1.1 + 0.1 * k3[1]) / 2 + (0.8 + 0.1 * k3[2])) / 2
    assert float(loss_kl) == pytest.approx(expect, abs=1e-6)
    assert stats["kl"] == pytest.approx(sum(k3) / 3, abs=1e-6)
    # the gradient flows through the ratio only where it is not clipped
    new = new.clone().requires_grad_(True)
    grpo_loss(new, old, adv, rows, 2, clip_eps=0.2)[0].backward()
    assert new.grad[0] == 0 and new.grad[2] == 0 and new.grad[1] != 0


def test_every_sampled_completion_gets_its_own_seed():
    # the engine draws the i-th of n completions from seed + i: prompts of one rollout, and rollouts,
    # must not share seeds, or the i-th completions of different prompts reuse the same random numbers
    cfg = load_grpo_config(None, ["num_generations=4", "temperature=0.7", "max_new_tokens=5"])
    seeds = [p.seed + i for key in (7, 8) for p in rollout_params(cfg, 3, key) for i in range(p.n)]
    assert len(set(seeds)) == len(seeds) == 2 * 3 * 4
    p = rollout_params(cfg, 3, 7)[0]
    assert (p.n, p.temperature, p.max_new_tokens) == (4, 0.7, 5)


def test_builtin_rewards():
    assert extract_answer("so 3 + 4 = 7. Answer: 7") == "7" and extract_answer("it is -12") == "-12"
    completions = ["Answer: 12", "The sum is 12.", "Answer: 13", "no idea"]
    assert exact_match([""] * 4, completions, answer=["12"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert format_reward([""] * 4, completions) == [1.0, 0.0, 1.0, 0.0]
    assert resolve_reward("tests.train.test_grpo:length_reward")([""], ["abc"]) == [3.0]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def failing_reward(prompts, completions, **columns):
    raise KeyError("answer_text")


@pytest.fixture(scope="module")
def base_dir(tokenizer_dir, tmp_path_factory):
    from lmstack.config import ModelConfig
    from lmstack.model.io import save_model_dir
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128)
    out = tmp_path_factory.mktemp("base")
    save_model_dir(Transformer(cfg), out, tokenizer)
    return out


def _config(base_dir, out, *settings):
    return load_grpo_config(
        None,
        [
            f"base_model={base_dir}",
            f"data={ARITHMETIC}",
            f"out={out}",
            "batch_size=2",
            "num_generations=4",
            "max_new_tokens=6",
            "eval_prompts=4",
            "tensorboard=false",
            "sample_tokens=4",
            *settings,
        ],
    )


def test_grpo_runs_through_the_engine_and_saves_an_adapter(base_dir, tmp_path):
    out = tmp_path / "grpo"
    # a length reward has spread even for a random model, so the step has non-zero advantages
    reward = "tests.train.test_grpo:length_reward"
    summary = grpo(
        _config(base_dir, out, "max_steps=3", "eval_every=3", f"rewards=[{reward}]", "kl_coef=0.05", "lr=1e-2")
    )
    assert summary["steps"] == 3 and (out / "checkpoint" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in rows if "rollout_reward" in r]
    assert len(stats) == 3 and all(r["kl"] >= 0 for r in stats) and stats[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert any("accuracy" in r for r in rows)


def test_grpo_runs_under_bf16_autocast(base_dir, tmp_path):
    """Rollouts under bf16 autocast hand the engine bf16 queries over its fp32 KV pool: the paged cache
    takes its portable path for them instead of failing in the fp32 kernel; and the nested autocast
    leaves the process as it found it."""
    out = tmp_path / "grpo-bf16"
    reward = "tests.train.test_grpo:length_reward"
    summary = grpo(_config(base_dir, out, "max_steps=1", "eval_every=1", f"rewards=[{reward}]", "dtype=bfloat16"))
    assert summary["steps"] == 1 and (out / "checkpoint" / "adapter_config.json").is_file()
    # rollouts enter autocast inside the step's autocast: it must be off again afterwards
    assert not torch.is_autocast_enabled("cpu")


def test_bad_rewards_fail_before_training(base_dir, tmp_path):
    with pytest.raises(LmstackError, match=r"reward function 'tests.train.test_grpo:failing_reward' raised KeyError"):
        grpo(_config(base_dir, tmp_path / "a", "rewards=[tests.train.test_grpo:failing_reward]"))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    with pytest.raises(LmstackError, match="has no function 'nope'"):
        grpo(_config(base_dir, tmp_path / "b", "rewards=[tests.train.test_grpo:nope]"))
    with pytest.raises(LmstackError, match="neither a built-in"):
        grpo(_config(base_dir, tmp_path / "c", "rewards=[exactmatch]"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    with pytest.raises(LmstackError, match=r"bad.jsonl:2: row has no 'prompt'"):
        grpo(load_grpo_config(None, [f"base_model={base_dir}", f"data={bad}", f"out={tmp_path / 'd'}"]))


def test_cli_refuses_a_raising_reward_with_one_line(base_dir, tmp_path, capsys):
    from lmstack.cli import main

    argv = ["align", "grpo", "--model", str(base_dir), "--data", str(ARITHMETIC), "--out", str(tmp_path / "o")]
    assert main([*argv, "--reward", "tests.train.test_grpo:failing_reward"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: reward function 'tests.train.test_grpo:failing_reward' raised KeyError")


def letter_e_share(prompts, completions, **columns):
    """Dense and learnable from a random start: the share of a reply's characters that are 'e'."""
    return [c.count("e") / max(len(c), 1) for c in completions]


@pytest.mark.slow
def test_grpo_raises_a_learnable_reward(base_dir, tmp_path):
    # A random 2 x 64 model samples 'e' in a few percent of characters; the group-normalised objective
    # must push that share up within 20 steps (measured: 0.04 -> 0.15 over the first/last five steps; with
    # the advantages' sign flipped it falls to 0.0 by step 12).
    out = tmp_path / "e"
    settings = ["peft.method=full", "lr=3e-2", "max_steps=20", "eval_every=20", "warmup_steps=0", "num_generations=8"]
    summary = grpo(_config(base_dir, out, *settings, "rewards=[tests.train.test_grpo:letter_e_share]"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["rollout_reward"] for r in rows if "rollout_reward" in r]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.05 and last > 2 * first, curve
    assert summary["mean_reward"] > first, (summary["mean_reward"], curve)  # greedy held-out replies too
