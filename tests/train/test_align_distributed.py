"""`lmstack align dpo|rm|grpo` and `lmstack distill` with `--nproc-per-node 2` (DDP over gloo on CPU).

The pair/row sampler lays a step's global batch out as (micro-step, rank, row), so 2 ranks x batch 4 see
exactly the pairs of 1 process x batch 8: the losses agree up to float summation order. The launcher
checks everything (and computes the reference log-probs / teacher top-k) once before starting the
processes; rank 0 alone writes the run directory and prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.data.demo import ARITHMETIC, INSTRUCTIONS, PREFERENCES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


COMMON = ["tensorboard=false", "sample_tokens=4", "log_every=1", "threads=1"]


def _run(argv: list[str], out: Path, settings: list[str], nproc: int) -> subprocess.CompletedProcess:
    """`lmstack ARGV --out OUT --set ...` in a fresh process (the launcher starts its own ranks)."""
    cmd = [sys.executable, "-m", "lmstack.cli", *argv, "--out", str(out), "--nproc-per-node", str(nproc)]
    cmd += [arg for item in settings for arg in ("--set", item)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _records(out: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _same_tensors(a: Path, b: Path, tol: float) -> None:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for name in x:
        assert (x[name] - y[name]).abs().max() <= tol, name


@pytest.mark.slow
def test_dpo_two_processes_match_one(base_dir, tmp_path):
    settings = [*COMMON, "seq_len=128", "val_fraction=0.25", "max_steps=6", "eval_every=3", "lr=5e-3"]
    settings += ["peft.target_modules=[q_proj,v_proj,lm_head]"]
    argv = ["align", "dpo", "--model", str(base_dir), "--data", str(PREFERENCES)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one), *(a for s in [*settings, "batch_size=8"] for a in ("--set", s))]) == 0
    proc = _run(argv, two, [*settings, "batch_size=4"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in _records(two, "loss")]
    assert losses == pytest.approx([r["loss"] for r in _records(one, "loss")], rel=1e-4)
    assert len(losses) == 6 and losses[-1] < losses[0]
    margins = [r["reward_margin"] for r in _records(two, "reward_margin")]
    assert margins == pytest.approx([r["reward_margin"] for r in _records(one, "reward_margin")], rel=1e-4, abs=1e-6)
    assert _files(two) == _files(one)
    _same_tensors(one / "checkpoint/adapter_model.safetensors", two / "checkpoint/adapter_model.safetensors", 1e-5)
    state = json.loads((two / "checkpoint/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 8
    # The reference runs once, in the launcher; the ranks read its cache; one summary line, from rank 0.
    assert proc.stderr.count("computing reference log-probs") == 1
    assert proc.stderr.count("reference log-probs from") == 1
    assert proc.stderr.count("held-out pairs: reward margin") == 1


@pytest.mark.slow
def test_distill_and_reward_model_two_processes_match_one(base_dir, tmp_path):
    settings = [*COMMON, "seq_len=128", "max_steps=4", "eval_every=4", "top_k=16", "lr=1e-3"]
    argv = ["distill", "--teacher", str(base_dir), "--student", str(base_dir), "--data", str(INSTRUCTIONS)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one), *(a for s in [*settings, "batch_size=4"] for a in ("--set", s))]) == 0
    proc = _run(argv, two, [*settings, "batch_size=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in _records(two, "loss")] == pytest.approx(
        [r["loss"] for r in _records(one, "loss")], rel=1e-4
    )
    assert _files(two) == _files(one)
    _same_tensors(one / "checkpoint/model.safetensors", two / "checkpoint/model.safetensors", 1e-5)
    assert proc.stderr.count("running the teacher once") == 1  # in the launcher; the ranks read the cache
    assert proc.stderr.count("student held-out loss") == 1

    rm = tmp_path / "rm"
    argv = ["align", "rm", "--model", str(base_dir), "--data", str(PREFERENCES), "--method", "full"]
    proc = _run(argv, rm, [*COMMON, "seq_len=128", "max_steps=2", "batch_size=4"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (rm / "checkpoint/reward_head.safetensors").is_file() and len(_records(rm, "loss")) == 2


@pytest.mark.slow
def test_grpo_two_processes(base_dir, tmp_path):
    """Each rank samples its own prompts' groups through its engine; the gradients are all-reduced."""
    settings = [*COMMON, "batch_size=1", "num_generations=4", "max_new_tokens=6", "eval_prompts=4"]
    settings += ["max_steps=2", "eval_every=2", "rewards=[tests.train.test_grpo:length_reward]", "lr=1e-2"]
    argv = ["align", "grpo", "--model", str(base_dir), "--data", str(ARITHMETIC)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one), *(a for s in settings for a in ("--set", s))]) == 0
    proc = _run(argv, two, settings, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(two) == _files(one)
    assert len(_records(two, "rollout_reward")) == 2 and len(_records(two, "accuracy")) == 1
    state = json.loads((two / "checkpoint/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 2


def test_bad_input_fails_once_before_any_process_starts(base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": "a"}\n')
    argv = ["align", "dpo", "--model", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "o")]
    assert main([*argv, "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "bad.jsonl:2: row has no 'rejected'" in err and "Traceback" not in err
    assert main([*argv, "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be at least 1" in capsys.readouterr().err
    argv = ["distill", "--teacher", str(base_dir), "--student", "tiny", "--data", str(INSTRUCTIONS)]
    assert main([*argv, "--out", str(tmp_path / "d"), "--method", "lora", "--nproc-per-node", "2"]) == 2
    assert "use --method full" in capsys.readouterr().err
    argv = ["align", "grpo", "--model", str(base_dir), "--data", str(ARITHMETIC), "--out", str(tmp_path / "g")]
    assert main([*argv, "--method", "prefix", "--nproc-per-node", "2"]) == 2
    assert "rollouts run on the batched engine's paged KV cache" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "g" / "checkpoint").exists()
