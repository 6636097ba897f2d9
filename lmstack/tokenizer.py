"""Byte-level BPE tokenizers (HF `tokenizers`), special tokens and chat templates.

A tokenizer directory holds the two files Hugging Face uses, so our tokenizers load in
`transformers` and theirs load here:
  tokenizer.json         the `tokenizers` model (BPE merges, pre-tokenizer, special tokens)
  tokenizer_config.json  bos/eos/pad token strings, `add_bos_token`, and the Jinja chat template

Byte-level BPE means every UTF-8 string round-trips exactly: `decode(encode(x)) == x` for Chinese,
emoji, code and mixed scripts alike, because the base alphabet is the 256 bytes.

Tokenizers trained here encode with `tiktoken` (about 5x faster than `tokenizers` on 2 cores), which
gives the same ids for them (see `_tiktoken_encoding`); every other tokenizer, e.g. one read from a
GGUF file or a Hugging Face directory with another pre-tokenizer, encodes with `tokenizers`.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import tiktoken
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from lmstack.data.files import iter_documents, resolve_inputs
from lmstack.errors import LmstackError
from lmstack.utils.io import atomic_write_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML, the format SmolLM2 and Qwen2 use: <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The pre-tokenizer split used by GPT-4 (cl100k), Llama 3 and Qwen2: letters with a leading space,
# numbers in groups of at most three, punctuation runs, newlines. Better than GPT-2's for code and CJK.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template the stack needs."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        chat_template: str | None = CHATML_TEMPLATE,
        add_bos: bool = False,
        extra_eos_tokens: Iterable[str] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_id = self._special_id(bos_token)
        self.eos_id = self._special_id(eos_token)
        self.pad_id = self._special_id(pad_token)
        if self.pad_id is None:
            self.pad_id = self.eos_id
        # Tokens that end a generation: eos plus e.g. <|im_end|> for chat models.
        self.stop_ids = {i for i in [self.eos_id, *(self._special_id(t) for t in extra_eos_tokens)] if i is not None}
        self._fast: Any = None  # the tiktoken twin of `backend`, built on first encode; False: none

    def __getstate__(self) -> dict[str, Any]:  # tiktoken encodings do not pickle; rebuilt on demand
        return {**self.__dict__, "_fast": None}

    @property
    def fast_encoder(self) -> Any:
        """A `tiktoken.Encoding` giving the same ids as `backend`, or None where it would not."""
        if self._fast is None:
            self._fast = _tiktoken_encoding(self.backend) or False
        return self._fast or None

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        fast = self.fast_encoder
        # Special-token strings in the text become their ids, as `tokenizers` does with added tokens.
        ids = (
            fast.encode(text, allowed_special="all")
            if fast
            else self.backend.encode(text, add_special_tokens=False).ids
        )
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
        fast = self.fast_encoder
        if fast:
            batch = fast.encode_batch(texts, allowed_special="all")
        else:
            batch = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            return [[self.bos_id, *ids] for ids in batch]
        return batch

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render a conversation exactly as transformers' `apply_chat_template(tokenize=False)` does.

        tools: OpenAI-format function definitions, passed to templates that render them (Qwen2.5-style).
        """
        if not self.chat_template:
            raise LmstackError("this tokenizer has no chat template; use `lmstack generate` or a chat model")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LmstackError(f"chat message {m!r} needs 'role' and 'content'")
        template = _compile_template(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
        )

    # -- files ---------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.backend.to_str(pretty=False))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "chat_template": self.chat_template,
            "extra_eos_tokens": sorted(self.backend.id_to_token(i) for i in self.stop_ids - {self.eos_id}),
        }
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load from a directory with tokenizer.json (+ tokenizer_config.json): ours or Hugging Face's."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise LmstackError(
                f"no tokenizer.json in {str(directory)!r}; train one with `lmstack tokenizer train` "
                "or pass the directory that holds it"
            )
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # the Rust parser's message names the JSON problem
            raise LmstackError(f"{path} is not a valid tokenizer.json: {exc}") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise LmstackError(f"{config_path} is not valid JSON: {exc}") from None
        template = config.get("chat_template")
        if template is None and (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # HF allows a list of named templates; take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        extra_eos = list(config.get("extra_eos_tokens", []))
        if template and IM_END in template and backend.token_to_id(IM_END) is not None:
            extra_eos.append(IM_END)
        return cls(
            backend,
            bos_token=_token_str(config.get("bos_token")),
            eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")),
            chat_template=template,
            add_bos=bool(config.get("add_bos_token", False)),
            extra_eos_tokens=extra_eos,
        )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of byte-level vocabularies)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _tiktoken_encoding(backend: Any) -> Any:
    """A tiktoken Encoding with `backend`'s vocabulary, split pattern and special tokens, or None.

    tiktoken merges the adjacent pair whose concatenation has the lowest id, and takes a piece that
    is itself a token whole; `tokenizers` merges the pair earliest in its merges list. For a BPE
    learned by training (each merge's token gets the next id, and training applied every earlier
    merge exactly as encoding does) the two give the same ids; we check the parts of that which can
    be checked cheaply (ids rise in merge order; BPE on each token's own bytes yields the token) and
    test the rest against `tokenizers` on real and adversarial text (tests/test_tokenizer.py).
    Anything else (another split pattern, a normalizer, byte fallback, GGUF vocabularies) gets None.
    """
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [])
    plain_bpe = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and spec.get("normalizer") is None
    )
    split_then_bytes = (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == SPLIT_PATTERN
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
    )
    if not (plain_bpe and split_then_bytes):
        return None
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab = {token: i for token, i in model["vocab"].items() if token not in special}
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    if any(c not in to_byte for token in vocab for c in token):
        return None  # a token outside the byte alphabet
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    merged_ids = [vocab.get(a + b) for a, b in merges]
    if None in merged_ids or any(x >= y for x, y in itertools.pairwise(merged_ids)):
        return None
    if any([t.id for t in backend.model.tokenize(token)] != [i] for token, i in vocab.items()):
        return None
    ranks = {bytes(to_byte[c] for c in token): i for token, i in vocab.items()}
    return tiktoken.Encoding("lmstack", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def _token_str(value: Any) -> str | None:
    """HF configs store a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@functools.lru_cache(maxsize=16)  # a server renders every request with the same few templates
def _compile_template(source: str):
    """A sandboxed Jinja environment configured like transformers' chat template renderer."""

    def raise_exception(message: str):
        raise LmstackError(f"chat template rejected the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise LmstackError(f"chat template does not parse: {exc}") from None


def build_bpe_trainer(vocab_size: int, special_tokens: list[str], min_frequency: int):
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )


def new_byte_level_bpe():
    """An untrained byte-level BPE with the GPT-4-style split."""
    backend = Backend(models.BPE(byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(
    texts: Iterable[str] | Iterator[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Tokenizer:
    """Train a byte-level BPE on an iterator of texts."""
    special_tokens = list(special_tokens or DEFAULT_SPECIAL_TOKENS)
    minimum = 256 + len(special_tokens) + 1
    if vocab_size < minimum:
        raise LmstackError(
            f"--vocab-size {vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} special "
            f"tokens alone need {minimum - 1}; use at least {minimum}"
        )
    backend = new_byte_level_bpe()
    backend.train_from_iterator(texts, trainer=build_bpe_trainer(vocab_size, special_tokens, min_frequency))
    return Tokenizer(
        backend,
        bos_token=BOS if BOS in special_tokens else None,
        eos_token=EOS if EOS in special_tokens else None,
        pad_token=PAD if PAD in special_tokens else None,
        chat_template=chat_template if IM_START in special_tokens else None,
        extra_eos_tokens=[IM_END] if IM_END in special_tokens else [],
    )


def train_tokenizer_from_files(
    inputs: list[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    min_frequency: int = 2,
    text_field: str = "text",
) -> Tokenizer:
    """`lmstack tokenizer train`: read text files (`lmstack.data.files` formats) or directories, train, save."""
    files = resolve_inputs(inputs)
    texts = (chunk for doc in iter_documents(files, text_field) for chunk in _chunks(doc))
    tokenizer = train_tokenizer(texts, vocab_size, min_frequency=min_frequency)
    if tokenizer.vocab_size <= len(DEFAULT_SPECIAL_TOKENS) + 256:
        raise LmstackError(f"the inputs {', '.join(map(str, inputs))} contain no text to learn merges from")
    tokenizer.save(out_dir)
    return tokenizer


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Feed long documents in pieces so the trainer's memory stays bounded; cut at newlines."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end
