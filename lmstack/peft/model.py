"""`apply_peft(model, PeftConfig) -> model`: make a Transformer trainable the way the method says.

The method table (what each method makes trainable):
  full        every parameter
  freeze      the last `freeze_trainable_layers` blocks, or the modules matching `freeze_trainable`
  lora/dora/dylora/adalora  LoraLinear around each targeted linear slot; only the adapter trains
  qlora       the targeted slots' weights become NF4 (double-quantised, frozen), LoRA around them
  adapter     bottleneck adapters after attention and MLP (houlsby) or after the MLP (pfeiffer)
  ia3         learned rescaling vectors on k_proj, v_proj and the MLP's down_proj input
  prefix / ptuning-v2 / prompt   virtual key/value positions (lmstack.peft.prompts)
  bitfit      biases only. The LLaMA family has none, so bitfit adds zero-initialised biases to
              every linear layer of the blocks (the model then starts unchanged) and sets the
              config's `bias`, which keeps the result a plain lmstack/HF model (LLaMA with
              attention_bias + mlp_bias).
Everything else is frozen (`requires_grad=False`). The model object is changed in place and returned.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.peft.config import LORA_METHODS, VIRTUAL_TOKEN_METHODS, PeftConfig
from lmstack.peft.layers import BottleneckAdapter, IA3Linear
from lmstack.peft.lora import LoraLinear

if TYPE_CHECKING:
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

LINEAR_SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
DEFAULT_ADAPTER = "default"


def _is_linear_slot(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _pattern_matches(pattern: str, name: str) -> bool:
    """A bare name matches the module name's last part(s); anything else is a full-name regex (as PEFT)."""
    if re.fullmatch(r"[\w.]+", pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def match_linear_slots(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the plain linear slots that `patterns` select; errors for patterns matching nothing."""
    slots = [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LINEAR_SLOTS and _is_linear_slot(module) and "base_layer" not in name
    ]
    chosen = [name for name in slots if any(_pattern_matches(p, name) for p in patterns)]
    for pattern in patterns:
        if not any(_pattern_matches(pattern, name) for name in slots):
            raise LmstackError(
                f"peft target module {pattern!r} matches no linear layer; the model's linear layers are named "
                f"{', '.join(sorted({s.rsplit('.', 1)[-1] for s in slots}))} (e.g. {slots[0]!r}); "
                "set peft.target_modules to some of them"
            )
    return chosen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_rank(name: str, module: nn.Module, r: int) -> None:
    if r > min(module.in_features, module.out_features):
        raise LmstackError(
            f"peft rank r={r} is larger than layer {name!r} ({module.out_features} x {module.in_features}) allows "
            f"(at most {min(module.in_features, module.out_features)}); lower peft.r"
        )


def add_lora(model: Transformer, cfg: PeftConfig, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Add adapter `adapter_name` of kind cfg.method to the targeted slots (wrapping them on first use)."""
    kind = "lora" if cfg.method == "qlora" else cfg.method
    names = match_linear_slots(model, cfg.target_modules)
    for name in names:
        module = model.get_submodule(name)
        _check_rank(name, module, cfg.initial_rank)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear):
            if name == "lm_head" and model.cfg.tie_embeddings:
                raise LmstackError("lm_head is tied to the embeddings; leave it out of peft.target_modules")
            module = LoraLinear(module)
            _replace(model, name, module)
        module.add_adapter(adapter_name, cfg.initial_rank, cfg.alpha, cfg.dropout, kind, cfg.use_rslora)
    return names


def quantize_targets_nf4(model: Transformer, cfg: PeftConfig) -> None:
    """QLoRA's base: the targeted linear weights in NF4 with double-quantised scales (lmstack.compress.nf4)."""
    from lmstack.compress.nf4 import NF4Linear

    for name in match_linear_slots(model, cfg.target_modules):
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):  # a slot already quantized (or wrapped) stays as it is
            _replace(model, name, NF4Linear.from_float(linear, block_size=cfg.nf4_block_size))


def _freeze(model: Transformer, cfg: PeftConfig) -> None:
    if cfg.freeze_trainable:
        names = [n for n, _ in model.named_parameters() if any(_pattern_matches(p, n) for p in cfg.freeze_trainable)]
        modules = [n for n, _ in model.named_modules() if any(_pattern_matches(p, n) for p in cfg.freeze_trainable)]
        if not names and not modules:
            raise LmstackError(
                f"peft.freeze_trainable {cfg.freeze_trainable} matches no module; use names such as "
                "'norm', 'layers.11' or 'layers\\.1[01]\\..*'"
            )
        for n in modules:
            model.get_submodule(n).requires_grad_(True)
        for n, p in model.named_parameters():
            if n in names:
                p.requires_grad_(True)
        return
    n_layer = model.cfg.n_layer
    k = cfg.freeze_trainable_layers
    if not 1 <= k <= n_layer:
        raise LmstackError(f"peft.freeze_trainable_layers={k} must be between 1 and the model's {n_layer} layers")
    for block in model.layers[n_layer - k :]:
        block.requires_grad_(True)
    model.norm.requires_grad_(True)


def _add_biases(model: Transformer) -> None:
    """BitFit on a model without biases: zero biases on every linear layer of the blocks."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_SLOTS[:-1] and isinstance(module, nn.Linear) and module.bias is None:
            w = module.weight
            module.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    model.cfg.bias = True
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))


def _add_bottlenecks(model: Transformer, cfg: PeftConfig) -> None:
    slots = ["o_proj", "down_proj"] if cfg.adapter_placement == "houlsby" else ["down_proj"]
    for name in match_linear_slots(model, slots):
        _replace(model, name, BottleneckAdapter(model.get_submodule(name), cfg.adapter_size))


def _add_ia3(model: Transformer, cfg: PeftConfig) -> None:
    for name in match_linear_slots(model, cfg.ia3_target_modules):
        feedforward = any(_pattern_matches(p, name) for p in cfg.ia3_feedforward_modules)
        _replace(model, name, IA3Linear(model.get_submodule(name), feedforward))


def _add_virtual_tokens(model: Transformer, cfg: PeftConfig, tokenizer: Tokenizer | None) -> None:
    from lmstack.peft.prompts import VirtualTokens, virtual_tokens_pre_hook

    n = cfg.num_virtual_tokens
    emb = model.tok_emb.weight
    ids = tokenizer.encode(cfg.prompt_init_text) if (tokenizer is not None and cfg.prompt_init_text) else []
    # The text's embeddings repeated to length n (PEFT's TEXT init), else random vocabulary entries (RANDOM).
    ids = (ids * (n // len(ids) + 1))[:n] if ids else torch.randint(0, emb.shape[0], (n,)).tolist()
    init = emb.detach()[torch.tensor(ids, device=emb.device)].float()
    model.peft_prompt = VirtualTokens(model.cfg, cfg.method, n, cfg.prefix_hidden, init)
    model.register_forward_pre_hook(virtual_tokens_pre_hook, with_kwargs=True)


def apply_peft(
    model: Transformer,
    cfg: PeftConfig,
    tokenizer: Tokenizer | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    verbose: bool = True,
) -> Transformer:
    """Freeze `model` and add the trainable parts of `cfg.method`; prints trainable vs total parameters."""
    method = cfg.method
    model.requires_grad_(method == "full")
    if method == "freeze":
        _freeze(model, cfg)
    elif method == "qlora":
        quantize_targets_nf4(model, cfg)
        add_lora(model, cfg, adapter_name)
    elif method in LORA_METHODS:
        add_lora(model, cfg, adapter_name)
    elif method == "adapter":
        _add_bottlenecks(model, cfg)
    elif method == "ia3":
        _add_ia3(model, cfg)
    elif method in VIRTUAL_TOKEN_METHODS:
        _add_virtual_tokens(model, cfg, tokenizer)
    elif method == "bitfit":
        _add_biases(model)
    model.peft_config = cfg
    if verbose:
        print(f"[peft] {describe_trainable(model, method)}", file=sys.stderr)
    return model


def store_frozen_base(model: Transformer, dtype: torch.dtype) -> int:
    """Keep every frozen linear weight of the blocks (and an untied frozen lm_head) in `dtype`; returns how
    many weights changed.

    For adapter methods trained under `dtype` autocast: autocast casts an fp32 weight to `dtype` in every
    forward (and keeps that copy for backward), re-reading the whole frozen base each step. A frozen weight
    never changes, so one cast up front gives the same numbers (the same rounding of the same values)
    without the per-step copies, and halves the base's memory. Trainable parameters (adapters, and any
    unfrozen weight), norms and embeddings stay fp32, so the optimizer still steps fp32 values; a tied
    lm_head is the embedding table and stays fp32 with it.
    """
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and id(p) not in tied and p.dtype != dtype:
                p.data = p.data.to(dtype)
                changed += 1
    return changed


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied and shared tensors counted once; a quantized slot (packed
    buffers, no weight parameter) counts its in x out weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if hasattr(module, "dequantize") and not isinstance(module, nn.Linear) and not hasattr(module, "base_layer"):
            total += module.in_features * module.out_features
    return trainable, total


def describe_trainable(model: nn.Module, method: str) -> str:
    trainable, total = count_parameters(model)
    return f"{method}: trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one every LoRA layer runs (None: the bare base model)."""
    layers = lora_layers(model)
    if name is not None and not any(name in layer.lora_A for layer in layers):
        have = sorted({n for layer in layers for n in layer.lora_A})
        raise LmstackError(f"no adapter named {name!r} is loaded; loaded adapters: {', '.join(have) or 'none'}")
    for layer in layers:
        layer.active_adapter = name


def set_dylora_rank(model: nn.Module, rank: int | None) -> None:
    """DyLoRA: serve with the first `rank` ranks of every adapter (None: all of them)."""
    for layer in lora_layers(model):
        layer.serve_rank = rank
