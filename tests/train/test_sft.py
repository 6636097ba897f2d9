"""`lmstack finetune` on a tiny model over the shipped demo instructions: the loss falls, the output
directory is a model reference (load, generate, merge), resume is exact, bad input fails early."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.data.demo import INSTRUCTIONS
from lmstack.errors import LmstackError
from lmstack.hub import load_model, resolve
from lmstack.train.sft import finetune, load_sft_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _config(base_dir, out, *settings):
    return load_sft_config(
        None,
        [
            f"base_model={base_dir}",
            f"data={INSTRUCTIONS}",
            f"out={out}",
            "seq_len=128",
            "batch_size=4",
            "tensorboard=false",
            "sample_tokens=8",
            *settings,
        ],
    )


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_finetune_learns_and_is_a_model_reference(base_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _config(
        base_dir,
        out,
        "max_steps=30",
        "lr=1e-2",
        "eval_every=10",
        "log_every=5",
        "peft.target_modules=[q_proj,v_proj,lm_head]",
    )
    summary = finetune(cfg)
    evals = [m["val_loss"] for m in _metrics(out) if "val_loss" in m]
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3 and losses[-1] < losses[0] - 0.5
    assert (out / "loss.png").is_file() and (out / "report.html").is_file()

    kind, path = resolve(out)
    assert (kind, path) == ("adapter", out / "checkpoint") and summary["model"] == str(path)
    model, tokenizer = load_model(out)
    x = torch.tensor([tokenizer.encode("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        adapted, base = model(x).logits, load_model(base_dir)[0](x).logits
    assert not torch.allclose(adapted, base, atol=1e-3)

    assert main(["merge", "--model", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted, atol=1e-4, rtol=1e-4)
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--chat", "--max-new-tokens", "4"]) == 0
    assert main(["inspect", "--model", str(out)]) == 0
    assert main(["convert", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0  # merged
    exported, _ = load_model(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, adapted, atol=1e-4, rtol=1e-4)


def test_lora_resume_is_exact(base_dir, tmp_path):
    from lmstack.model.io import read_safetensors

    common = ("lr=1e-2", "schedule=constant", "warmup_steps=2", "eval_every=0", "log_every=1", "save_every=0")
    finetune(_config(base_dir, tmp_path / "straight", "max_steps=6", *common))
    finetune(_config(base_dir, tmp_path / "resumed", "max_steps=3", *common))
    finetune(_config(base_dir, tmp_path / "resumed", "max_steps=6", *common), resume=True)
    a = read_safetensors(tmp_path / "straight" / "checkpoint" / "trainable.safetensors")
    b = read_safetensors(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {m["step"]: m["loss"] for m in _metrics(tmp_path / "straight") if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in _metrics(tmp_path / "resumed") if "loss" in m}
    assert losses == resumed


@pytest.mark.parametrize("method", ["full", "bitfit", "prompt", "prefix", "adapter"])
def test_methods_run_through_the_trainer(method, base_dir, tmp_path):
    out = tmp_path / method
    finetune(
        _config(base_dir, out, f"peft.method={method}", "max_steps=2", "eval_every=2", "peft.num_virtual_tokens=4")
    )
    kind, _ = resolve(out)
    assert kind == ("lmstack" if method in ("full", "bitfit") else "adapter")
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--chat", "--max-new-tokens", "4"]) == 0


def test_config_errors(base_dir, tmp_path):
    with pytest.raises(LmstackError, match="takes its model from --model"):
        _config(base_dir, tmp_path, "model.n_layer=2")
    with pytest.raises(LmstackError, match="did you mean 'alpha'"):
        _config(base_dir, tmp_path, "peft.alpah=4")
    with pytest.raises(LmstackError, match="no checkpoint"):
        finetune(_config(base_dir, tmp_path / "none", "max_steps=1"), resume=True)
    with pytest.raises(LmstackError, match="matches no linear layer"):
        finetune(_config(base_dir, tmp_path / "t", "max_steps=1", "peft.target_modules=[query]"))
    with pytest.raises(LmstackError, match="longer than the model's context"):
        finetune(_config(base_dir, tmp_path / "t", "max_steps=1", "seq_len=4096"))


def test_cli_bad_data_is_one_line(base_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    code = main(["finetune", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and f"{data}:2" in err[-1] and "'output'" in err[-1]


@pytest.mark.slow
def test_lora_ddp_two_processes_match_one(base_dir, tmp_path):
    """2 ranks x 2 packed rows = 1 process x 4 rows, loss for loss: each rank's token mean is weighted by
    its share of the micro-batch's tokens, so DDP's gradient average is the mean over all of them."""
    out = tmp_path / "ddp"
    settings = ["max_steps=3", "seq_len=128", "eval_every=3", "log_every=1", "tensorboard=false", "threads=1"]
    args = ["finetune", "--model", str(base_dir), "--data", str(INSTRUCTIONS), "--out", str(out)]
    args += ["--nproc-per-node", "2", *(a for s in [*settings, "batch_size=2"] for a in ("--set", s))]
    assert main(args) == 0
    assert resolve(out)[0] == "adapter"
    finetune(_config(base_dir, tmp_path / "one", *settings))  # batch_size=4
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert losses == pytest.approx([m["loss"] for m in _metrics(tmp_path / "one") if "loss" in m], rel=1e-4)
    assert len(losses) == 3


def test_fsdp_with_an_adapter_method_is_refused(base_dir, tmp_path, capsys):
    args = ["finetune", "--model", str(base_dir), "--data", str(INSTRUCTIONS), "--out", str(tmp_path / "o")]
    assert main([*args, "--nproc-per-node", "2", "--set", "parallel=fsdp"]) == 2
    assert "adapter method 'lora' trains with DDP" in capsys.readouterr().err


def test_nproc_flag_checks_the_data_once_before_starting_processes(base_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    args = ["finetune", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{data}:2" in err and "Traceback" not in err
