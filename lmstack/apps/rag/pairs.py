"""Training pairs for contrastive embedding fine-tuning, made from an index without labels.

Inverse cloze task (Lee et al., 2019, ORQA): a sentence of a chunk is the query and the rest of the chunk
(with its heading) is the positive passage. It teaches the encoder to match a statement to the passage it
came from, in the corpus's own vocabulary and languages, and needs no hand-written questions, so the QA
set stays a clean evaluation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.apps.rag.chunking import sentence_spans
from lmstack.apps.rag.index import RagIndex
from lmstack.errors import require
from lmstack.utils.io import atomic_write_text

MIN_QUERY_CHARS = 12


def inverse_cloze_pairs(index: RagIndex, seed: int = 0) -> list[dict[str, str]]:
    pairs = []
    for chunk in index.chunks:
        spans = sentence_spans(chunk.text, 0, len(chunk.text))
        sentences = [chunk.text[s:e] for s, e in spans if not chunk.text[s:e].lstrip().startswith("#")]
        sentences = [s for s in sentences if len(s) >= MIN_QUERY_CHARS]
        if len(sentences) < 2:
            continue
        for sentence in sentences:
            rest = chunk.text.replace(sentence, " ", 1)
            pairs.append({"query": sentence, "positive": f"{chunk.heading}\n{rest}" if chunk.heading else rest})
    random.Random(seed).shuffle(pairs)
    return pairs


def write_pairs(index_dir: str | Path, out: str | Path, seed: int = 0) -> int:
    pairs = inverse_cloze_pairs(RagIndex.open(index_dir), seed)
    require(len(pairs) >= 4, f"the index {str(index_dir)!r} yields only {len(pairs)} pairs; index more documents")
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs)
