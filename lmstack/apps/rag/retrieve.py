"""Search an index: dense (encoder + vector store), BM25 (bm25s), or both fused by reciprocal rank.

Hybrid search takes the top candidates of each ranking and scores a chunk by sum(1 / (60 + rank)) over
the rankings it appears in (Cormack et al. 2009), which needs no calibration between cosine similarities
and BM25 scores. A cross-encoder (a BERT sequence-classification checkpoint, e.g. an MS MARCO reranker)
can reorder the candidates by reading query and chunk together.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.apps.rag.index import RagIndex, StoredChunk
from lmstack.errors import require
from lmstack.model.encoder import TextEncoder

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60


@dataclass
class Hit:
    chunk: StoredChunk
    score: float


class Retriever:
    def __init__(
        self,
        index: RagIndex,
        encoder: TextEncoder | None,
        mode: str = "hybrid",
        reranker: TextEncoder | None = None,
    ):
        require(mode in MODES, f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        require(encoder is not None or mode == "bm25", f"{mode} retrieval needs the embedding model")
        if encoder is not None:
            index.check_encoder(encoder)
        if reranker is not None:
            require(
                len(reranker.cfg.labels) == 1,
                f"reranker {reranker.name!r} has {len(reranker.cfg.labels)} labels; a cross-encoder scores a "
                "(query, passage) pair with one logit",
            )
        self.index, self.encoder, self.mode, self.reranker = index, encoder, mode, reranker

    def dense(self, query: str, k: int) -> list[tuple[str, float]]:
        vector = self.encoder.embed([query])[0]
        return [(n.id, n.similarity) for n in self.index.store.nearest(vector, k)]

    def search(self, query: str, k: int = 4) -> list[Hit]:
        require(bool(query.strip()), "the query is empty")
        require(k > 0, f"--k must be positive, got {k}")
        pool = max(4 * k, 20) if (self.mode == "hybrid" or self.reranker) else k
        if self.mode == "dense":
            ranked = self.dense(query, pool)
        elif self.mode == "bm25":
            ranked = self.index.bm25_search(query, pool)
        else:
            ranked = reciprocal_rank_fusion([self.dense(query, pool), self.index.bm25_search(query, pool)])
        hits = [Hit(self.index.by_id[cid], score) for cid, score in ranked if cid in self.index.by_id]
        if self.reranker is not None and hits:
            scores = self.reranker.classify([query] * len(hits), [h.chunk.embed_text for h in hits])[:, 0]
            hits = sorted((Hit(h.chunk, float(s)) for h, s in zip(hits, scores, strict=True)), key=lambda h: -h.score)
        return hits[:k]


def reciprocal_rank_fusion(rankings: list[list[tuple[str, float]]], k: int = RRF_K) -> list[tuple[str, float]]:
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, (cid, _) in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])
