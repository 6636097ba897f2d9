"""Every method: exactly its parameters get gradients and change, everything else stays bit-identical,
the loss goes down on a tiny memorisation task, and trainable vs total parameters are printed."""

from __future__ import annotations

import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.peft import PeftConfig, apply_peft
from tests.peft.conftest import tiny_model

# method -> (predicate on parameter names that must train, learning rate for the tiny task)
INTENDED = {
    "full": (lambda n: True, 3e-3),
    "freeze": (lambda n: n.startswith(("layers.1.", "norm.")), 3e-3),
    "lora": (lambda n: ".lora_" in n, 1e-2),
    "dora": (lambda n: ".lora_" in n, 1e-2),
    "dylora": (lambda n: ".lora_" in n, 1e-2),
    "qlora": (lambda n: ".lora_" in n, 1e-2),
    "adalora": (lambda n: ".lora_" in n, 1e-2),
    "adapter": (lambda n: ".adapter_" in n, 1e-2),
    "ia3": (lambda n: ".ia3_l." in n, 1e-1),
    "prefix": (lambda n: n.startswith("peft_prompt."), 1e-2),
    "ptuning-v2": (lambda n: n.startswith("peft_prompt."), 1e-1),
    "prompt": (lambda n: n.startswith("peft_prompt."), 1e-1),
    "bitfit": (lambda n: n.endswith(".bias"), 3e-2),
}


def _settings(method: str) -> PeftConfig:
    return PeftConfig(
        method=method, r=4, alpha=8, freeze_trainable_layers=1, num_virtual_tokens=4, adapter_size=8, adalora_init_r=6
    )


@pytest.mark.parametrize("method", sorted(INTENDED))
def test_only_intended_parameters_train(method, batch, capsys):
    x, _ = batch
    y = torch.full_like(x, 7)  # the tiny task: always predict token 7
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, _settings(method))
    assert f"[peft] {method}: trainable" in capsys.readouterr().err
    must_train, lr = INTENDED[method]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if must_train(n)}

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(40):
        loss = model(x, y).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == trainable
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    for name, p in model.named_parameters():
        original = name.replace(".base_layer", "")  # wrapped slots keep their weights under base_layer
        if name in trainable:
            assert original not in before or not torch.equal(p, before[original]), f"{name} did not change"
        else:
            assert torch.equal(p, before[original]), f"{name} is frozen but changed"
    assert losses[-1] < losses[0] - 0.3, f"{method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_freeze_named_modules():
    model = apply_peft(tiny_model(), PeftConfig(method="freeze", freeze_trainable=["norm", "layers.0.ffn"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"norm.weight", *(f"layers.0.ffn.{m}_proj.weight" for m in ("gate", "up", "down"))}


def test_bitfit_starts_unchanged_and_records_biases(batch):
    model = tiny_model()
    reference = model(batch[0]).logits
    apply_peft(model, PeftConfig(method="bitfit"))
    assert model.cfg.bias and torch.equal(model(batch[0]).logits, reference)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(target_modules=["qkv"]), "matches no linear layer"),
        (dict(r=65), "larger than layer"),
        (dict(method="freeze", freeze_trainable_layers=3), "between 1 and"),
        (dict(method="freeze", freeze_trainable=["nothing_here"]), "matches no module"),
    ],
)
def test_bad_settings_fail_before_training(settings, message):
    with pytest.raises(LmstackError, match=message):
        apply_peft(tiny_model(), PeftConfig(**settings))


def test_unknown_method_and_bad_values():
    with pytest.raises(LmstackError, match="unknown; choose one of"):
        PeftConfig(method="lorax")
    with pytest.raises(LmstackError, match="peft.r must be at least 1"):
        PeftConfig(r=0)
