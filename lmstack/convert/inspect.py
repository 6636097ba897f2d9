"""`lmstack inspect --model REF`: what a model is, read from headers and metadata only.

Nothing is dequantized or built, so inspecting even a large checkpoint takes a fraction of a second
(plus the tokenizer, which is loaded to report its size and special tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmstack.config import ModelConfig
from lmstack.convert.gguf import describe, gguf_model_config
from lmstack.convert.gguf_reader import read_gguf
from lmstack.convert.gguf_tokenizer import tokenizer_from_gguf
from lmstack.convert.hf import (
    describe_safetensors,
    hf_architecture,
    hf_model_config,
    read_hf_config,
    safetensors_files,
)
from lmstack.hub import resolve
from lmstack.model.io import read_model_config
from lmstack.tokenizer import Tokenizer


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _arch_line(cfg: ModelConfig) -> str:
    parts = [
        f"{cfg.n_layer} layers",
        f"d_model {cfg.d_model}",
        f"{cfg.n_head} heads ({cfg.n_kv_head} kv, head_dim {cfg.head_dim})",
        f"d_ff {cfg.d_ff}",
    ]
    if cfg.is_moe:
        parts.append(f"{cfg.n_experts} experts, top-{cfg.n_experts_per_tok}")
    if cfg.family == "llama":
        parts.append(f"rope_theta {cfg.rope_theta:g}")
    if cfg.qkv_bias:
        parts.append("qkv bias")
    if cfg.bias:
        parts.append("bias")
    parts.append("tied embeddings" if cfg.tie_embeddings else "untied embeddings")
    return ", ".join(parts)


def describe_model(ref: str | Path) -> dict[str, Any]:
    """Facts about a model reference as a dict (what `inspect_model` prints)."""
    kind, path = resolve(ref)
    if kind == "adapter":  # the base's facts plus what the adapter is
        from lmstack.peft.io import adapter_base, read_adapter_config

        config, extra = read_adapter_config(path)
        base = adapter_base(path)
        adapter = {"peft_type": config.get("peft_type"), "method": extra.get("peft", {}).get("method"), "base": base}
        return {**describe_model(base), "reference": str(ref), "format": kind, "path": str(path), "adapter": adapter}
    info: dict[str, Any] = {"reference": str(ref), "format": kind, "path": str(path)}
    tokenizer = None
    if kind == "gguf":
        gf = read_gguf(path)
        cfg = gguf_model_config(gf)
        info.update(describe(gf), architecture=f"gguf:{gf.architecture}", name=gf.metadata.get("general.name"))
        info["files"] = {path.name: path.stat().st_size}
        tokenizer = tokenizer_from_gguf(gf.metadata, path)
        info["tokenizer_pre"] = gf.metadata.get("tokenizer.ggml.pre")
    elif kind == "hf":
        raw = read_hf_config(path)
        cfg = hf_model_config(raw, path)
        files = safetensors_files(path)
        info.update(describe_safetensors(files), architecture=hf_architecture(raw, path))
        info["files"] = {f.name: f.stat().st_size for f in files}
    else:
        cfg = read_model_config(path)
        weights = path / "model.safetensors"
        info.update(describe_safetensors([weights]), architecture=f"lmstack:{cfg.family}")
        info["files"] = {weights.name: weights.stat().st_size}
    if kind != "gguf" and (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(path)
        info["files"]["tokenizer.json"] = (path / "tokenizer.json").stat().st_size
    info["config"] = cfg
    info["params"] = cfg.num_params()
    info["fp32_bytes"] = 4 * cfg.num_params()
    info["context_length"] = cfg.max_seq_len
    if tokenizer is not None:
        stops = sorted(tokenizer.backend.id_to_token(i) for i in tokenizer.stop_ids)
        info["tokenizer"] = {
            "vocab_size": tokenizer.vocab_size,
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "stop_tokens": stops,
            "add_bos": tokenizer.add_bos,
        }
        info["chat_template"] = tokenizer.chat_template
    return info


def inspect_model(ref: str | Path) -> dict[str, Any]:
    """Print a model's architecture, size, dtypes, context, tokenizer and chat template; return the facts."""
    info = describe_model(ref)
    cfg: ModelConfig = info["config"]
    dtypes = info.get("tensor_types") or info.get("tensor_dtypes") or {}
    training_flops = cfg.flops_per_token()  # forward + backward = 3 forward passes
    lines = [
        f"model         {info['reference']}",
        f"format        {info['format']} ({info['path']})",
        f"architecture  {info['architecture']} -> lmstack family {cfg.family!r}",
        f"              {_arch_line(cfg)}",
        f"parameters    {info['params']:,} ({info['params'] / 1e6:.1f}M; fp32 in memory {_size(info['fp32_bytes'])})",
        f"compute       {training_flops / 3 / 1e6:,.1f} MFLOPs/token forward at full context "
        f"({training_flops / 1e6:,.1f} training)",
        f"stored as     {', '.join(f'{k} x{v}' for k, v in dtypes.items())}",
        f"context       {info['context_length']:,} tokens",
    ]
    tok = info.get("tokenizer")
    if tok:
        lines.append(
            f"tokenizer     {tok['vocab_size']:,} tokens (model vocab {cfg.vocab_size:,}); "
            f"bos {tok['bos']!r}, eos {tok['eos']!r}, pad {tok['pad']!r}, stops {tok['stop_tokens']}, "
            f"add_bos {tok['add_bos']}"
        )
        if info.get("tokenizer_pre"):
            lines.append(f"pre-tokenizer {info['tokenizer_pre']}")
    else:
        lines.append("tokenizer     none (generation needs one: save the model with its tokenizer files)")
    for name, size in info["files"].items():
        lines.append(f"file          {name}: {_size(size)}")
    template = info.get("chat_template")
    if template:
        lines.append("chat template:")
        lines.extend("  " + line for line in template.splitlines())
    else:
        lines.append("chat template none")
    print("\n".join(lines))
    return info
