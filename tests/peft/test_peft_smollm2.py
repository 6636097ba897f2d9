"""The real model: a LoRA adapter on SmolLM2-135M-Instruct loads in `peft` over lmstack's HF export with
the same logits, and `quickstart --finetune-only` runs end to end (both slow)."""

from __future__ import annotations

import pytest
import torch

from lmstack.hub import load_model
from lmstack.peft import PeftConfig, apply_peft, save_adapter
from tests.peft.conftest import randomize_adapters

pytestmark = pytest.mark.slow
ALIAS = "smollm2-135m-instruct"


def test_smollm2_lora_adapter_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmstack.convert.hf import save_hf_dir

    model, tokenizer = load_model(ALIAS)
    save_hf_dir(model, tokenizer, tmp_path / "hf")
    apply_peft(model, PeftConfig(method="dora", r=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    randomize_adapters(model)
    save_adapter(model.eval(), tmp_path / "adapter", ALIAS)
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "你好, hi!"}]))])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours_logits, their_logits = model(ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, their_logits, atol=2e-4, rtol=1e-4)
    reloaded, _ = load_model(tmp_path / "adapter")  # the adapter dir is a model reference over its base
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours_logits, atol=1e-5, rtol=1e-5)


def test_quickstart_finetune_runs(tmp_path):
    from lmstack.quickstart import quickstart_finetune

    summary = quickstart_finetune(tmp_path / "qs", minutes=3, threads=2, max_steps=3)
    assert 1 <= summary["steps"] <= 3 and len(summary["after"]) == len(summary["prompts"]) == 5
    assert all(summary["before"]) and all(summary["after"])
    assert (tmp_path / "qs" / "checkpoint" / "adapter_model.safetensors").is_file()
