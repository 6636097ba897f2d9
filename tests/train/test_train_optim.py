"""Optimizer groups, learning-rate schedules, loss options and numerics of the training step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_run import tiny_config

from lmstack.config import TrainConfig, model_config
from lmstack.model.transformer import Transformer
from lmstack.train.optim import build_optimizer, lr_at, param_groups


def _cfg(tmp_path, data, *extra: str) -> TrainConfig:
    return tiny_config(
        tmp_path,
        data,
        "batch_size=4",
        "seq_len=64",
        "max_steps=4",
        "warmup_steps=2",
        "eval_every=1000",
        "eval_batches=2",
        "log_every=1",
        "tensorboard=false",
        *extra,
    )


def test_warmup_then_cosine_reaches_floor():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_flat_then_decays_linearly():
    cfg = TrainConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=5, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(4, cfg) == pytest.approx(2.0)
    assert lr_at(50, cfg) == pytest.approx(2.0)
    assert lr_at(79, cfg) == pytest.approx(2.0)
    assert lr_at(80, cfg) == pytest.approx(2.0)  # decay starts at step 80 of 100
    assert lr_at(90, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = TrainConfig(lr=0.5, warmup_steps=4, max_steps=10, schedule="constant")
    assert [lr_at(s, cfg) for s in (0, 3, 4, 9)] == pytest.approx([0.125, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "moe-tiny"])
def test_no_decay_on_norms_biases_embeddings(preset):
    model = Transformer(model_config(preset, vocab_size=256, n_layer=2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "tok_emb.weight" in kept and "tok_emb.weight" not in decayed  # also the tied lm_head
    assert all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in decayed)
    assert any("q_proj" in n for n in decayed) and any("down_proj" in n for n in decayed)
    assert all(("norm" in n or n.endswith("bias") or "emb" in n) for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_cpu_optimizer_is_fused_adamw_matching_the_reference_loop():
    torch.manual_seed(0)
    models = [Transformer(model_config("tiny", vocab_size=256, n_layer=2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(models[0], cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(param_groups(models[1], 0.1), lr=1e-2, betas=(cfg.beta1, cfg.beta2), foreach=False)
    tokens = torch.randint(0, 256, (4, 33))
    for _ in range(5):
        for model, opt in zip(models, (fused, loop), strict=True):
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # fp32 rounding order differs


def _train_losses(tmp_path, data, *extra: str) -> list[float]:

    from lmstack.train.pretrain import pretrain

    pretrain(_cfg(tmp_path, data, "max_steps=4", "lr=1e-2", *extra))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_label_smoothing_changes_the_loss(tmp_path, token_data_dir):
    plain = _train_losses(tmp_path / "a", token_data_dir)
    smoothed = _train_losses(tmp_path / "b", token_data_dir, "label_smoothing=0.2")
    assert all(math.isfinite(v) for v in plain + smoothed)
    # Smoothing adds the cross-entropy against the uniform distribution: once the model has moved
    # away from uniform predictions, the smoothed loss is clearly above the plain one.
    assert smoothed[-1] > plain[-1] + 0.01


def test_bf16_autocast_on_cpu_trains(tmp_path, token_data_dir):
    from lmstack.train.pretrain import pretrain

    summary = pretrain(_cfg(tmp_path, token_data_dir, "dtype=bfloat16", "max_steps=6", "lr=1e-2"))
    assert summary["steps"] == 6 and math.isfinite(summary["val_loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]


def _norms_seen_by_the_optimizer(tmp_path, data, grad_clip: float) -> tuple[list[float], list[float]]:
    """(gradient norm the optimizer steps on, pre-clip norm the trainer logs) for each of 2 steps."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from lmstack.train.pretrain import pretrain

    stepped: list[float] = []

    def record(optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        stepped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        pretrain(_cfg(tmp_path, data, f"grad_clip={grad_clip}", "max_steps=2"))
    finally:
        handle.remove()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return stepped, [r["grad_norm"] for r in records if "grad_norm" in r]


def test_grad_clip_bounds_the_update(tmp_path, token_data_dir):
    """The optimizer steps on gradients of norm <= grad_clip; the log keeps the (larger) pre-clip norm."""
    stepped, logged = _norms_seen_by_the_optimizer(tmp_path, token_data_dir, grad_clip=1e-3)
    assert len(stepped) == len(logged) == 2
    assert all(norm <= 1e-3 * (1 + 1e-5) for norm in stepped), stepped
    assert all(norm > 1e-2 for norm in logged), logged


def test_grad_below_the_clip_is_untouched(tmp_path, token_data_dir):
    stepped, logged = _norms_seen_by_the_optimizer(tmp_path, token_data_dir, grad_clip=1e6)
    assert len(stepped) == len(logged) == 2
    assert stepped == pytest.approx(logged, rel=1e-5)
