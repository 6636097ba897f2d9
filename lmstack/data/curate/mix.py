"""Mixing: several sources combined by weight or by target token count, with up- or down-sampling.

Each source gets a sampling ratio r = target tokens / tokens it holds after curation. A document is
written floor(r) times plus once more with probability frac(r); the coin is a seeded hash of the
document id, so the mix is deterministic, independent of worker count and computed shard by shard.
Targets: `target_tokens` on a source is absolute; otherwise `weight`s share `mix.total_tokens` (default:
what the weighted sources hold together). A source with neither keeps everything once (r = 1).
Token counts before tokenization are estimated as UTF-8 bytes / 4 (about right for BPE on English and
for Chinese at ~1.5 characters per token); the tokenizer stage reports the exact count.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from lmstack.errors import require

BYTES_PER_TOKEN = 4


@dataclass
class MixConfig:
    seed: int = 0
    total_tokens: int = 0  # 0: the tokens the weighted sources hold together

    def __post_init__(self) -> None:
        require(self.total_tokens >= 0, f"mix.total_tokens must be >= 0, got {self.total_tokens}")


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN))


def sampling_ratios(
    available: dict[str, int], weights: dict[str, float], targets: dict[str, int], cfg: MixConfig
) -> dict[str, float]:
    """Ratio per source from the tokens each holds after curation. Empty sources get 0."""
    weighted = [s for s in available if weights.get(s, 0) > 0 and not targets.get(s)]
    total = cfg.total_tokens or sum(available[s] for s in weighted)
    weight_sum = sum(weights[s] for s in weighted)
    ratios = {}
    for source, have in available.items():
        if have == 0:
            ratios[source] = 0.0
        elif targets.get(source):
            ratios[source] = targets[source] / have
        elif source in weighted:
            ratios[source] = total * weights[source] / weight_sum / have
        else:
            ratios[source] = 1.0
    return ratios


def copies(doc_id: str, ratio: float, seed: int) -> int:
    """How many times to write this document: floor(ratio), plus one with probability frac(ratio)."""
    whole = math.floor(ratio)
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    coin = int.from_bytes(digest, "little") / 2**64
    return whole + (1 if coin < ratio - whole else 0)
