"""BERT-family bidirectional encoder: sentence embeddings, sequence classification, masked-LM pretraining.

The encoder reuses the decoder's `Attention` and `FeedForward` modules from `transformer.py` (same
q/k/v/o projections with biases, same GELU MLP); what differs from GPT-2 is written here:
  - absolute learned positions plus token-type (segment) embeddings, LayerNorm'd before the first layer;
  - post-LN blocks: x = LN(x + attn(x)); x = LN(x + ffn(x)), as in BERT;
  - bidirectional attention: a key-padding mask (B, 1, 1, T) is always passed, so attention never
    falls back to the decoder's causal path;
  - pooling (CLS token or mean over real tokens), optional L2 normalisation (sentence-transformers'
    `Normalize`), a classification head (BERT pooler + linear) and a masked-LM head tied to the
    word embeddings.

Checkpoints: Hugging Face BERT directories (BertModel / BertForSequenceClassification / BertForMaskedLM,
sentence-transformers layouts included: `modules.json`, `1_Pooling/config.json`) and lmstack encoder
directories (config.json with "format": "lmstack-encoder" + model.safetensors + tokenizer.json).

    from lmstack.hub import load_encoder
    embedder = load_encoder("all-minilm-l6-v2")
    vectors = embedder.embed(["a sentence", "another one"])   # (2, 384) float32, L2-normalised
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError, require
from lmstack.model.transformer import Attention, FeedForward
from lmstack.utils.config_loader import build_dataclass
from lmstack.utils.io import atomic_path, atomic_write_text

ENCODER_FORMAT = "lmstack-encoder"
POOLINGS = ("mean", "cls")
_HF_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


@dataclass
class EncoderConfig:
    """One BERT-family encoder. Field names match `ModelConfig` where the meaning is the same."""

    vocab_size: int = 30522
    n_layer: int = 6
    n_head: int = 12
    d_model: int = 384
    d_ff: int = 1536
    max_position: int = 512  # rows of the learned position table
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    gelu_approximate: str = "none"  # BERT uses exact erf GELU
    dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 0
    # How text becomes one vector.
    pooling: str = "mean"
    normalize: bool = True
    max_seq_len: int = 256  # inputs are truncated to this many tokens (sentence-transformers' max_seq_length)
    # Heads: a classification head when labels are given; a masked-LM head for pretraining.
    labels: list[str] = field(default_factory=list)
    mlm_head: bool = False

    def __post_init__(self) -> None:
        require(self.pooling in POOLINGS, f"encoder pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        require(self.d_model % self.n_head == 0, f"encoder d_model={self.d_model} must be divisible by n_head")
        require(
            0 < self.max_seq_len <= self.max_position,
            f"encoder max_seq_len={self.max_seq_len} must be in 1..max_position={self.max_position}",
        )

    def layer_config(self) -> ModelConfig:
        """The decoder config whose `Attention`/`FeedForward` are exactly BERT's (biases, GELU MLP)."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            d_ff=self.d_ff,
            max_seq_len=self.max_position,
            family="gpt2",
            bias=True,
            gelu_approximate=self.gelu_approximate,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
        )


class EncoderBlock(nn.Module):
    """Post-LN Transformer block around the decoder's attention and MLP modules."""

    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        shared = cfg.layer_config()
        self.attn = Attention(shared, layer)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(shared)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, None, mask, None)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then the (tied) word embeddings plus a bias."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.gelu_approximate = cfg.gelu_approximate

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.dense(hidden), approximate=self.gelu_approximate))
        return F.linear(h, word_embeddings, self.bias)  # (..., vocab)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.pos_emb = nn.Embedding(cfg.max_position, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderBlock(cfg, i) for i in range(cfg.n_layer))
        if cfg.labels:  # BERT's sequence-classification head: tanh pooler on [CLS], then a linear layer
            self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.classifier = nn.Linear(cfg.d_model, len(cfg.labels))
        if cfg.mlm_head:
            self.mlm = MLMHead(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT init: N(0, init_std) for matrices and embeddings, zero biases, unit LayerNorm weights."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask (1 = real token), token_type_ids: (B, T) -> hidden states (B, T, d_model)."""
        B, T = input_ids.shape
        if self.cfg.max_position < T:
            raise LmstackError(
                f"input of {T} tokens exceeds the encoder's {self.cfg.max_position} positions; truncate it"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)  # (B, T, d)
        x = self.drop(self.emb_norm(x))
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees all real keys
        for block in self.layers:
            x = block(x, mask)
        return x

    def pool(self, hidden: Tensor, attention_mask: Tensor, normalize: bool | None = None) -> Tensor:
        """(B, T, d) -> (B, d) by the configured pooling, L2-normalised when configured."""
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        normalize = self.cfg.normalize if normalize is None else normalize
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def classify(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, d) -> (B, n_labels) logits: pooler + linear over the pooled vector.

        HF's BertForSequenceClassification pools [CLS] (its import sets pooling "cls"); a head added to a
        sentence-embedding model keeps that model's pooling (mean for MiniLM), which is what it was trained for.
        """
        require(bool(self.cfg.labels), "this encoder has no classification head; fine-tune one with --task classify")
        pooled = self.pool(hidden, attention_mask, normalize=False)
        return self.classifier(self.drop(torch.tanh(self.pooler(pooled))))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        require(self.cfg.mlm_head, "this encoder has no masked-LM head; build it with mlm_head=True")
        return self.mlm(hidden, self.tok_emb.weight)


# --- text in, vectors out ----------------------------------------------------------------------------


@dataclass
class EncodedBatch:
    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor


class TextEncoder:
    """An `Encoder` with its WordPiece tokenizer: texts -> embeddings, class scores or pair scores."""

    def __init__(self, model: Encoder, tokenizer: Any, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` (BERT WordPiece, [CLS] ... [SEP] template)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(model.cfg.max_seq_len)
        self.name = name  # the reference it was loaded from; RAG indexes record it

    @property
    def cfg(self) -> EncoderConfig:
        return self.model.cfg

    @property
    def dim(self) -> int:
        return self.cfg.d_model

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without [CLS]/[SEP] and without truncation (for chunking)."""
        return len(self.word_pieces(text))

    def word_pieces(self, text: str) -> list[tuple[int, int]]:
        """Character spans (start, end) of the text's word pieces, untruncated."""
        self.tokenizer.no_truncation()
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.enable_truncation(self.cfg.max_seq_len)
        return list(encoding.offsets)

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[Any]:
        if pairs is None:
            return self.tokenizer.encode_batch(texts)
        return self.tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))

    def collate(self, encodings: list[Any]) -> EncodedBatch:
        """Right-pad a list of `tokenizers.Encoding`s into tensors on the model's device."""
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.cfg.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
        to = lambda a: torch.from_numpy(a).to(self.device)
        return EncodedBatch(to(ids), to(mask), to(types))

    def batches(self, encodings: list[Any], batch_size: int) -> Iterator[tuple[np.ndarray, EncodedBatch]]:
        """Batches of similar length (longest first), so little compute goes to padding.

        Yields (original row indices, batch); callers scatter results back into input order.
        """
        require(batch_size > 0, f"batch size must be positive, got {batch_size}")
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield rows, self.collate([encodings[i] for i in rows])

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 embeddings in input order."""
        from tqdm import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenize(texts)
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress)
        for rows, batch in self.batches(encodings, batch_size):
            hidden = self.model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            out[rows] = self.model.pool(hidden, batch.attention_mask).float().cpu().numpy()
            bar.update(len(rows))
        bar.close()
        return out

    @torch.inference_mode()
    def classify(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32) -> np.ndarray:
        """(len(texts), n_labels) logits; with `pairs`, each text is scored with its pair (cross-encoder)."""
        out = np.zeros((len(texts), len(self.cfg.labels)), dtype=np.float32)
        if not texts:
            return out
        for rows, batch in self.batches(self.tokenize(texts, pairs), batch_size):
            hidden = self.model(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            out[rows] = self.model.classify(hidden, batch.attention_mask).float().cpu().numpy()
        return out


# --- checkpoints ---------------------------------------------------------------------------------------

# Hugging Face BERT name -> ours, per layer and outside the layers.
_HF_LAYER_NAMES = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.o_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.up_proj",
    "output.dense": "ffn.down_proj",
    "output.LayerNorm": "ffn_norm",
}
_HF_NAMES = {
    "embeddings.word_embeddings": "tok_emb",
    "embeddings.position_embeddings": "pos_emb",
    "embeddings.token_type_embeddings": "type_emb",
    "embeddings.LayerNorm": "emb_norm",
    "pooler.dense": "pooler",
    "classifier": "classifier",
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
}


def hf_name_to_ours(name: str) -> str | None:
    """Map one HF BERT tensor name to ours; None for tensors we do not keep (position_ids, tied decoder)."""
    name = name.removeprefix("bert.")
    name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # old TF-converted checkpoints
    if name == "cls.predictions.bias":
        return "mlm.bias"
    stem, _, leaf = name.rpartition(".")
    if stem.startswith("encoder.layer."):
        _, _, index, rest = stem.split(".", 3)
        mapped = _HF_LAYER_NAMES.get(rest)
        return f"layers.{index}.{mapped}.{leaf}" if mapped else None
    mapped = _HF_NAMES.get(stem)
    return f"{mapped}.{leaf}" if mapped else None


def is_hf_bert_config(raw: dict[str, Any]) -> bool:
    archs = raw.get("architectures") or []
    return raw.get("model_type") == "bert" or any(str(a).startswith("Bert") for a in archs)


def _sentence_transformers_settings(directory: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length from a sentence-transformers layout, when present."""
    settings: dict[str, Any] = {}
    modules_path = directory / "modules.json"
    if modules_path.is_file():
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        settings["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            pooling_config = directory / m.get("path", "") / "config.json"
            if m.get("type", "").endswith("Pooling") and pooling_config.is_file():
                pooling = json.loads(pooling_config.read_text(encoding="utf-8"))
                if pooling.get("pooling_mode_cls_token"):
                    settings["pooling"] = "cls"
                elif pooling.get("pooling_mode_mean_tokens"):
                    settings["pooling"] = "mean"
                else:
                    raise LmstackError(f"{pooling_config}: only CLS and mean pooling are supported")
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        settings["max_seq_len"] = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length", 512)
    return settings


def hf_encoder_config(raw: dict[str, Any], directory: Path) -> EncoderConfig:
    act = raw.get("hidden_act", "gelu")
    require(act in _HF_ACTIVATIONS, f"{directory}/config.json: activation {act!r} is not supported")
    require(
        raw.get("position_embedding_type", "absolute") == "absolute",
        f"{directory}/config.json: only absolute position embeddings are supported",
    )
    archs = raw.get("architectures") or []
    labels: list[str] = []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        id2label = raw.get("id2label") or {str(i): f"LABEL_{i}" for i in range(raw.get("num_labels", 2))}
        labels = [id2label[str(i)] for i in range(len(id2label))]
    max_position = raw["max_position_embeddings"]
    settings = {"pooling": "cls" if labels else "mean", "normalize": False, "max_seq_len": min(512, max_position)}
    settings.update(_sentence_transformers_settings(directory))
    settings["max_seq_len"] = min(settings["max_seq_len"], max_position)
    return EncoderConfig(
        vocab_size=raw["vocab_size"],
        n_layer=raw["num_hidden_layers"],
        n_head=raw["num_attention_heads"],
        d_model=raw["hidden_size"],
        d_ff=raw["intermediate_size"],
        max_position=max_position,
        type_vocab_size=raw.get("type_vocab_size", 2),
        norm_eps=raw.get("layer_norm_eps", 1e-12),
        gelu_approximate=_HF_ACTIVATIONS[act],
        pad_id=raw.get("pad_token_id", 0) or 0,
        labels=labels,
        mlm_head=any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs),
        **settings,
    )


def _safetensors_state(directory: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LmstackError(f"no *.safetensors in {str(directory)!r}; the encoder checkpoint is incomplete")
    state: dict[str, Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise LmstackError(
                f"{path} is not a readable safetensors file ({exc}); the checkpoint is corrupt"
            ) from None
    return state


def _load_state(model: Encoder, state: dict[str, Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LmstackError(
            f"{where}: checkpoint does not match the encoder config: missing {missing[:4]} unexpected {unexpected[:4]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise LmstackError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, assign=True)


def load_hf_encoder(directory: Path) -> tuple[Encoder, EncoderConfig]:
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    cfg = hf_encoder_config(raw, directory)
    state = {}
    for name, tensor in _safetensors_state(directory).items():
        ours = hf_name_to_ours(name)
        if ours is not None:
            state[ours] = tensor.float()
    if not cfg.labels:  # a BertModel may carry an unused pooler; keep only what the config builds
        state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}
    with torch.device("meta"):
        model = Encoder(cfg)
    _load_state(model, state, directory)
    return model, cfg


def is_encoder_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(raw, dict) and (raw.get("format") == ENCODER_FORMAT or is_hf_bert_config(raw))


def load_encoder_dir(directory: str | Path, device: str | torch.device = "cpu", name: str = "") -> TextEncoder:
    """Load an lmstack encoder directory or a Hugging Face BERT directory (with its tokenizer.json)."""
    from tokenizers import Tokenizer as HFTokenizer

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if raw.get("format") == ENCODER_FORMAT:
        cfg = build_dataclass(EncoderConfig, raw["encoder"], "encoder")
        with torch.device("meta"):
            model = Encoder(cfg)
        _load_state(model, _safetensors_state(directory), directory)
    else:
        model, cfg = load_hf_encoder(directory)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise LmstackError(f"no tokenizer.json in {str(directory)!r}; an encoder directory needs its tokenizer")
    model.to(device)
    return TextEncoder(model.eval(), HFTokenizer.from_file(str(tokenizer_path)), name or str(directory))


def save_encoder_dir(encoder: TextEncoder, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors + tokenizer.json (atomically, file by file)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    encoder.tokenizer.no_truncation()
    atomic_write_text(out / "tokenizer.json", encoder.tokenizer.to_str())
    encoder.tokenizer.enable_truncation(encoder.cfg.max_seq_len)
    config = {"format": ENCODER_FORMAT, "version": 1, "encoder": dataclasses.asdict(encoder.cfg), **(extra or {})}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, ensure_ascii=False))
    return out


def with_classification_head(encoder: TextEncoder, labels: list[str]) -> TextEncoder:
    """A copy of `encoder`'s body with a fresh classification head for `labels` (pooling switches to CLS)."""
    require(len(labels) >= 2, f"classification needs at least two labels, got {labels}")
    cfg = dataclasses.replace(encoder.cfg, labels=list(labels), mlm_head=False)
    model = Encoder(cfg).to(encoder.device)
    body = {k: v for k, v in encoder.model.state_dict().items() if not k.startswith(("pooler.", "classifier.", "mlm."))}
    model.load_state_dict(body, strict=False)
    return TextEncoder(model, encoder.tokenizer, encoder.name)
