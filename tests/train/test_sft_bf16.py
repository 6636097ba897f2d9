"""`lmstack finetune --set dtype=bfloat16` with LoRA: the frozen base is stored in bf16 once, the adapter
stays fp32 and trains, the loss falls, the saved adapter is the usual fp32 PEFT file and loads back."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmstack.data.demo import INSTRUCTIONS
from lmstack.hub import load_model
from lmstack.model.io import read_safetensors
from lmstack.peft.lora import LoraLinear
from lmstack.train.distributed import cleanup, init_distributed
from lmstack.train.sft import SFTTrainer, load_sft_config, prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _config(base_dir, out, dtype: str):
    settings = ["max_steps=12", "lr=1e-2", "eval_every=6", "log_every=3", "seq_len=128", "batch_size=4"]
    settings += ["tensorboard=false", "sample_tokens=4", "peft.target_modules=[q_proj,v_proj,lm_head]"]
    return load_sft_config(
        None, [f"base_model={base_dir}", f"data={INSTRUCTIONS}", f"out={out}", f"dtype={dtype}"] + settings
    )


def _train(cfg, run: bool = True) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model, frozen weights before, adapter weights before); runs the trainer when `run`."""
    ctx = init_distributed(torch.device("cpu"))
    try:
        trainer = SFTTrainer(cfg, ctx, prepare(cfg), None)
        model = trainer.model
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if run:
            trainer.run()
    finally:
        cleanup(ctx)
    return model, frozen, adapters


def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_learns(base_dir, tmp_path):
    out = tmp_path / "bf16"
    model, frozen, adapters = _train(_config(base_dir, out, "bfloat16"))
    bases = [m.base_layer.weight for m in model.modules() if isinstance(m, LoraLinear)]
    plain = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    assert len(bases) == 2 * 2 + 1 and all(w.dtype == torch.bfloat16 and not w.requires_grad for w in bases + plain)
    assert model.tok_emb.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and not torch.equal(p, adapters[name]), f"{name} did not train"
        else:
            assert torch.equal(p, frozen[name]), f"{name} is frozen but changed"

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert losses[-1] < losses[0] - 0.3 and evals[-1] < evals[0]

    saved = read_safetensors(out / "checkpoint" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    adapted, _ = load_model(out)  # onto the fp32 base, as any adapter
    assert all(p.dtype == torch.float32 for p in adapted.parameters())


def test_fp32_lora_keeps_everything_fp32(base_dir, tmp_path):
    model, _, _ = _train(_config(base_dir, tmp_path / "fp32", "float32"), run=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
