"""`lmstack rag eval`: retrieval and answer quality on a QA set (JSONL: question, answer, source).

Retrieval, per mode: recall@k (a chunk of the gold source file is among the top k) and MRR (1 / rank of
the first such chunk within the top 10). Answers, with a chat model: containment (the normalised gold
answer appears in the generated one), token F1 against the gold answer, citation rate, and faithfulness
(the share of the answer's content tokens that occur in the chunks it cites, or in all chunks it was
shown when it cites none). Tokens are lower-cased words and single Chinese characters.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lmstack.apps.rag.index import STOPWORDS
from lmstack.errors import LmstackError, require

MRR_DEPTH = 10
_TOKEN = re.compile(r"[a-z0-9_.:?()<>]+|[\u3400-\u9fff]")
_STOP = STOPWORDS | {"的", "是", "了", "在"}  # plus the commonest Chinese particles


def load_qa(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    require(path.is_file(), f"QA file {str(path)!r} does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmstackError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        missing = [k for k in ("question", "answer", "source") if not isinstance(item.get(k), str)]
        require(not missing, f"{path}:{number}: needs string fields question, answer, source (missing {missing})")
        items.append(item)
    require(bool(items), f"{path} holds no questions")
    return items


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = Counter(tokens(prediction)), Counter(tokens(gold))
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def faithfulness(answer: str, support: list[str]) -> float:
    words = tokens(answer)
    if not words:
        return 0.0
    supported = set(tokens(" ".join(support)))
    return sum(w in supported for w in words) / len(words)


def retrieval_scores(retriever, qa: list[dict[str, str]], k: int) -> dict[str, float]:
    hits_at_k, reciprocal = 0, 0.0
    for item in qa:
        paths = [h.chunk.path for h in retriever.search(item["question"], max(k, MRR_DEPTH))]
        hits_at_k += item["source"] in paths[:k]
        rank = next((i for i, p in enumerate(paths[:MRR_DEPTH], 1) if p == item["source"]), None)
        reciprocal += 1.0 / rank if rank else 0.0
    return {f"recall@{k}": hits_at_k / len(qa), "mrr": reciprocal / len(qa)}


def answer_scores(answers, qa: list[dict[str, str]]) -> dict[str, float]:
    n = len(qa)
    contained = f1 = faithful = cites = 0.0
    for answer, item in zip(answers, qa, strict=True):
        contained += normalise(item["answer"]) in normalise(answer.text)
        f1 += token_f1(answer.text, item["answer"])
        cited = [answer.sources[i - 1].chunk.embed_text for i in answer.cited]
        faithful += faithfulness(answer.text, cited or [h.chunk.embed_text for h in answer.sources])
        cites += bool(answer.cited)
    return {"containment": contained / n, "f1": f1 / n, "faithfulness": faithful / n, "citation_rate": cites / n}


def evaluate(
    index_dir: str | Path,
    qa_path: str | Path,
    encoder,
    modes: list[str],
    k: int,
    chat=None,
    params=None,
    reranker=None,
) -> dict[str, dict[str, float]]:
    """Scores per retrieval mode; answer scores too when a chat model is given."""
    from lmstack.apps.rag.answer import answer_questions
    from lmstack.apps.rag.index import RagIndex
    from lmstack.apps.rag.retrieve import Retriever

    qa = load_qa(qa_path)
    index = RagIndex.open(index_dir)
    known = set(index.manifest["files"])
    unknown = sorted({item["source"] for item in qa} - known)
    require(not unknown, f"QA sources {unknown[:3]} are not files of the index; sources are paths relative to --docs")
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        retriever = Retriever(index, encoder if mode != "bm25" else None, mode, reranker)
        scores: dict[str, Any] = retrieval_scores(retriever, qa, k)
        if chat is not None:
            answers = answer_questions(chat, retriever, [item["question"] for item in qa], k, params)
            scores.update(answer_scores(answers, qa))
        results[mode] = scores
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| mode | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {mode} | " + " | ".join(f"{s[c]:.3f}" for c in columns) + " |" for mode, s in results.items()]
    return "\n".join(lines)
