"""DDP and FSDP2 under `torchrun --nproc-per-node 2` (gloo on CPU) match single-process training.

The sampler makes the global batch independent of how it is split, so 2 ranks x batch 4 see exactly
the windows of 1 process x batch 8, and the losses agree up to float summation order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmstack.config import load_train_config
from lmstack.model.io import load_model_dir
from lmstack.train.pretrain import pretrain

SETTINGS = [
    "model.vocab_size=1024",
    "model.n_layer=2",
    "model.d_model=64",
    "model.d_ff=128",
    "seq_len=64",
    "max_steps=5",
    "warmup_steps=2",
    "eval_every=5",
    "eval_batches=2",
    "log_every=1",
    "tensorboard=false",
    "sample_tokens=4",
    "threads=1",
]


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _torchrun(out, data, *extra: str, resume: bool = False, via_flag: bool = False) -> subprocess.CompletedProcess:
    """2 processes, launched by torchrun directly or by `lmstack train --nproc-per-node 2`."""
    if via_flag:
        cmd = [sys.executable, "-m", "lmstack.cli", "train", "--nproc-per-node", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd += ["-m", "lmstack.cli", "train"]
    cmd += ["--out", str(out), "--data", str(data)]
    if resume:
        cmd.append("--resume")
    for item in [*SETTINGS, "batch_size=4", *extra]:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, token_data_dir):
    out = tmp_path_factory.mktemp("single")
    pretrain(load_train_config(None, [*SETTINGS, "batch_size=8", f"data={token_data_dir}", f"out={out}"]))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_training_matches_single_process(parallel, tmp_path, token_data_dir, single_process_run):
    proc = _torchrun(tmp_path, token_data_dir, f"parallel={parallel}", via_flag=parallel == "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, reference = _losses(tmp_path), _losses(single_process_run)
    assert len(ours) == len(reference) == 5
    assert ours == pytest.approx(reference, rel=1e-4)
    assert ours[-1] < ours[0]
    # The checkpoint is the ordinary single-file model format whatever the parallelism.
    model, tok = load_model_dir(tmp_path / "checkpoint")
    ref, _ = load_model_dir(single_process_run / "checkpoint")
    for name, tensor in ref.state_dict().items():
        assert (model.state_dict()[name] - tensor).abs().max() < 1e-4, name
    assert tok is not None
    state = json.loads((tmp_path / "checkpoint/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 8


def test_fsdp_resumes_a_single_process_checkpoint(tmp_path, token_data_dir, single_process_run):
    """Checkpoints are parallelism-agnostic: FSDP re-shards the full optimizer state of a 1-process run."""
    import shutil

    fsdp_dir, single_dir = tmp_path / "fsdp", tmp_path / "single"
    shutil.copytree(single_process_run, fsdp_dir)
    shutil.copytree(single_process_run, single_dir)
    pretrain(
        load_train_config(
            None, [*SETTINGS, "batch_size=8", "max_steps=7", f"data={token_data_dir}", f"out={single_dir}"]
        ),
        resume=True,
    )
    proc = _torchrun(fsdp_dir, token_data_dir, "parallel=fsdp", "max_steps=7", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert _losses(fsdp_dir) == pytest.approx(_losses(single_dir), rel=1e-4)
    assert len(_losses(fsdp_dir)) == 7


def test_nproc_flag_checks_the_data_once_before_starting_processes(tmp_path, token_data_dir):
    proc = _torchrun(tmp_path, token_data_dir, "batch_size=100000", via_flag=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "fewer than one batch per rank (2 ranks" in proc.stderr
    assert not (tmp_path / "checkpoint").exists()
