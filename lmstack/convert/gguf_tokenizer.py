"""The tokenizer inside a GGUF file <-> a `tokenizers` byte-level BPE.

A GGUF carries no tokenizer.json; llama.cpp stores the pieces under `tokenizer.ggml.*`: the token
strings (already in GPT-2's byte-to-unicode spelling), the merges as "a b" strings, a type per token
(normal / control / user-defined / unused), the special token ids and a pre-tokenizer *name*
(`tokenizer.ggml.pre`) that selects one of llama.cpp's built-in split regexes.

Import builds `models.BPE(vocab, merges)` directly (about 0.2 s for a 49k vocabulary; transformers'
GGUF path takes seconds because it goes through its slow-tokenizer converter), adds control tokens as
special and user-defined ones as plain added tokens (as transformers does), and chooses the
pre-tokenizer from the name with the regexes llama.cpp uses for it (`llama-vocab.cpp`).

Export goes the other way and picks the `tokenizer.ggml.pre` name whose llama.cpp regex and merge
rule equal our pre-tokenizer. lmstack's own tokenizers (GPT-4-style Split + ByteLevel(use_regex=False),
merges always applied) map to "smaug-bpe": the Llama-3 regex *without* "llama-bpe"'s ignore_merges
rule, which would take a whole pre-token whenever it is in the vocabulary, as Llama 3 does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lmstack.errors import LmstackError
from lmstack.tokenizer import IM_END, Tokenizer, bytes_to_unicode

# The split regexes, as in Hugging Face tokenizer.json files (llama.cpp spells the same ones with
# explicit case classes instead of (?i:...)).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (pre-tokenizer kind, ignore_merges, llama.cpp's add_bos default).
# kind: "llama3"/"qwen2" = that Split regex + ByteLevel(use_regex=False); "digits" = every digit alone,
# then GPT-2's regex (StarCoder/SmolLM); "gpt2" = GPT-2's regex inside ByteLevel.
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **{
        name: ("llama3", True, True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
    },
    **{name: ("llama3", False, False) for name in ("smaug-bpe", "dbrx")},
    **{name: ("qwen2", False, False) for name in ("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2")},
    **{
        name: ("digits", False, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    **{
        name: ("gpt2", False, False)
        for name in ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4", "default")
    },
}

# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _pre_tokenizer(kind: str):
    if kind in ("llama3", "qwen2"):
        regex = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if kind == "digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# --- import ----------------------------------------------------------------------------------------


def tokenizer_from_gguf(meta: dict[str, Any], path: Path) -> Tokenizer:
    """Rebuild the tokenizer a GGUF describes (byte-level BPE, `tokenizer.ggml.model == "gpt2"`)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise LmstackError(
            f"{path} has no tokenizer (metadata 'tokenizer.ggml.tokens' is missing); "
            "export it again with its tokenizer, or use a GGUF made by llama.cpp's converter"
        )
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmstackError(
            f"{path}: tokenizer type {kind!r} (tokenizer.ggml.model) is not supported; "
            "supported: 'gpt2' (byte-level BPE, used by Llama 3, Qwen2, SmolLM, GPT-2)"
        )
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in PRE_TOKENIZERS:
        raise LmstackError(
            f"{path}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    pre_kind, ignore_merges, default_add_bos = PRE_TOKENIZERS[pre_name]
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    # A token spelled outside the byte alphabet (a literal space, say) is respelled byte by byte,
    # as transformers does, so BPE can reach it.
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise LmstackError(f"{path}: merge {m!r} in tokenizer.ggml.merges is not 'a b'; the file is corrupt")
        merges.append((a, b))
    try:
        model = models.BPE(vocab, merges, ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the Rust builder names the merge whose tokens are missing
        raise LmstackError(f"{path}: the vocabulary and merges do not form a BPE model ({exc})") from None
    backend = Backend(model)
    backend.pre_tokenizer = _pre_tokenizer(pre_kind)
    backend.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == USER_DEFINED
    ]
    backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    template = meta.get("tokenizer.chat_template")
    extra_eos = [t for t in (token("eot_token_id"), token("eom_token_id")) if t]
    if template and IM_END in template and IM_END in vocab:
        extra_eos.append(IM_END)
    return Tokenizer(
        backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=template,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        extra_eos_tokens=extra_eos,
    )


# --- export ----------------------------------------------------------------------------------------


def gguf_pre_name(backend_json: dict[str, Any]) -> str:
    """The `tokenizer.ggml.pre` whose llama.cpp pre-tokenizer equals this tokenizer's, or an error."""
    model = backend_json.get("model") or {}
    if model.get("type") != "BPE":
        raise LmstackError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    if backend_json.get("normalizer"):
        raise LmstackError("GGUF export: tokenizers with a normalizer are not supported (llama.cpp has none)")
    pre = backend_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    ignore = bool(model.get("ignore_merges"))
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe" if ignore else "smaug-bpe"
        if regex == QWEN2_SPLIT and not ignore:
            return "qwen2"
    byte_level = steps[-1]
    gpt2_regex = byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")
    if not ignore and gpt2_regex and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if not ignore and gpt2_regex and kinds == ["ByteLevel"]:
        return "gpt-2"
    raise LmstackError(
        f"GGUF export: no llama.cpp pre-tokenizer matches this tokenizer's ({json.dumps(pre)[:120]}...); "
        "supported: the Llama-3/GPT-4 split, the Qwen2 split, digits + GPT-2, or GPT-2's ByteLevel"
    )


def write_gguf_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Add `tokenizer.ggml.*` and `tokenizer.chat_template` to a `gguf.GGUFWriter`."""
    backend_json = json.loads(tokenizer.backend.to_str())
    pre = gguf_pre_name(backend_json)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise LmstackError(
            f"GGUF export: the tokenizer has {len(vocab)} tokens but the model's embedding has only "
            f"{vocab_size} rows; they do not belong together"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, NORMAL
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.pad_id is not None:
        writer.add_pad_token_id(tokenizer.pad_id)
    other_stops = sorted(tokenizer.stop_ids - {tokenizer.eos_id})
    if other_stops:
        writer.add_eot_token_id(other_stops[0])
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
