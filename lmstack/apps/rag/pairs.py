"""Training pairs for contrastive embedding fine-tuning, made from an index.

Two sources, used together by default:
- Inverse cloze task (Lee et al., 2019, ORQA), no labels needed: a sentence of a chunk is the query and the
  rest of the chunk (with its heading) is the positive passage. It teaches the encoder to match a statement
  to the passage it came from, in the corpus's own vocabulary and languages.
- Labelled questions (`--qa`, rows of question / answer / source like the eval set): the positive is the
  chunk of the source file that holds the answer. Real questions are what retrieval serves, and statements
  alone do not teach an English encoder to map a Chinese question onto its passage (docs/rag.md). Keep these
  questions disjoint from the evaluation set (`rag pairs` refuses to write a pair whose question is in
  `--exclude`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.apps.rag.chunking import sentence_spans
from lmstack.apps.rag.evaluate import load_qa
from lmstack.apps.rag.index import RagIndex
from lmstack.errors import LmstackError, require
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


def _squash(text: str) -> str:
    return " ".join(text.split())


def question_pairs(index: RagIndex, qa: list[dict[str, str]], qa_path: str | Path) -> list[dict[str, str]]:
    """One (question, chunk) pair per labelled question: the chunk of its source file that holds the answer.

    When the answer occurs in several chunks of the file (overlap), the one BM25 ranks highest for the
    question wins, so the pair points at the passage a reader would cite."""
    by_path: dict[str, list] = {}
    for chunk in index.chunks:
        by_path.setdefault(chunk.path, []).append(chunk)
    pairs = []
    for number, item in enumerate(qa, 1):
        source = item["source"]
        require(source in by_path, f"{qa_path}: question {number} cites {source!r}, which is not a file of the index")
        holding = [c for c in by_path[source] if _squash(item["answer"]) in _squash(c.text)]
        require(
            bool(holding),
            f"{qa_path}: question {number}: the answer {item['answer']!r} is not in any chunk of {source!r}; "
            "quote it as the document writes it",
        )
        ranked = {cid: rank for rank, (cid, _) in enumerate(index.bm25_search(item["question"], len(index.chunks)))}
        best = min(holding, key=lambda c: ranked.get(c.id, len(ranked)))
        pairs.append({"query": item["question"], "positive": best.embed_text})
    return pairs


def write_pairs(
    index_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    qa: str | Path | None = None,
    cloze: bool = True,
    exclude: str | Path | None = None,
) -> int:
    """Write (query, positive) pairs from an index: inverse-cloze pairs and/or pairs from a labelled QA file."""
    require(cloze or qa is not None, "no pairs asked for: give --qa FILE or drop --no-cloze")
    index = RagIndex.open(index_dir)
    pairs = inverse_cloze_pairs(index, seed) if cloze else []
    if qa is not None:
        questions = load_qa(qa)
        if exclude is not None:
            held_out = {_squash(item["question"]) for item in load_qa(exclude)}
            leaked = [item["question"] for item in questions if _squash(item["question"]) in held_out]
            if leaked:
                raise LmstackError(f"{qa} shares {len(leaked)} question(s) with {exclude}, e.g. {leaked[0]!r}")
        pairs += question_pairs(index, questions, qa)
        random.Random(seed).shuffle(pairs)
    require(len(pairs) >= 4, f"the index {str(index_dir)!r} yields only {len(pairs)} pairs; index more documents")
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return len(pairs)
