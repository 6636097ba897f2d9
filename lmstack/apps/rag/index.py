"""A RAG index directory: build it, update it incrementally, open it for search.

    index.json    format, embedding model (name, dim, fingerprint), chunking, store settings, and per file
                  its content hash and chunk ids (what makes re-indexing incremental)
    chunks.jsonl  every chunk: id, path, record, heading, text, character and line span
    chroma/       the vectors (embedded Chroma; see store.py)
    bm25/         the BM25 index over the same chunks, in chunks.jsonl order (bm25s)

Re-indexing reads only files whose SHA-256 changed, removes the chunks of deleted files, and leaves the
rest untouched. An index remembers its embedding model; querying it with another one is an error that
names both, because vectors from two models are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.apps.rag.chunking import chunk_text
from lmstack.apps.rag.loaders import file_digest, list_documents, read_source
from lmstack.apps.rag.store import VectorStore, open_store
from lmstack.errors import LmstackError, require
from lmstack.model.encoder import TextEncoder
from lmstack.utils.io import atomic_write_text

INDEX_FORMAT = "lmstack-rag-index"
FINGERPRINT_TEXT = "lmstack embedding fingerprint: 检索增强生成"
_WORD = re.compile(r"[a-z0-9_]+|[\u3400-\u9fff\uf900-\ufaff]+")
# English function words that carry no topic; BM25 and the answer metrics skip them.
STOPWORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "by", "do", "does", "for", "from", "how", "in", "is", "it")
    + ("of", "on", "or", "the", "to", "what", "which", "with")
)


@dataclass
class StoredChunk:
    id: str
    path: str
    record: str
    heading: str
    text: str
    start: int
    end: int
    start_line: int
    end_line: int

    @property
    def embed_text(self) -> str:
        return f"{self.heading}\n{self.text}" if self.heading else self.text

    def citation(self) -> str:
        """Where the chunk came from: `path, lines 3-7` for a file, `path, line 3` for a JSONL record."""
        if self.record:
            return f"{self.path}, {self.record}"
        if self.start_line == self.end_line:
            return f"{self.path}, line {self.start_line}"
        return f"{self.path}, lines {self.start_line}-{self.end_line}"


@dataclass
class IndexReport:
    added: int
    updated: int
    removed: int
    unchanged: int
    chunks: int
    embedded: int


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words, and Chinese as single characters plus character bigrams (no word segmenter)."""
    tokens: list[str] = []
    for run in _WORD.findall(text.lower()):
        if run[0] >= "\u3400":
            tokens.extend(run)
            tokens.extend(run[i : i + 2] for i in range(len(run) - 1))
        elif run not in STOPWORDS:
            tokens.append(run)
    return tokens


def embedding_fingerprint(encoder: TextEncoder) -> str:
    vector = encoder.embed([FINGERPRINT_TEXT])[0]
    return hashlib.sha256(np.round(vector[:32], 3).tobytes()).hexdigest()[:16]


def _chunk_id(path: str, digest: str, record: str, n: int) -> str:
    return hashlib.sha256(f"{path}\0{digest}\0{record}\0{n}".encode()).hexdigest()[:24]


class RagIndex:
    def __init__(self, directory: str | Path, manifest: dict[str, Any], chunks: list[StoredChunk]):
        self.directory = Path(directory)
        self.manifest = manifest
        self.chunks = chunks
        self.by_id = {c.id: c for c in chunks}
        self._store: VectorStore | None = None
        self._bm25: Any = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path) -> RagIndex:
        directory = Path(directory)
        path = directory / "index.json"
        require(
            path.is_file(), f"{str(directory)!r} is not a RAG index (no index.json); build it with `lmstack rag index`"
        )
        manifest = json.loads(path.read_text(encoding="utf-8"))
        require(manifest.get("format") == INDEX_FORMAT, f"{path} was not written by `lmstack rag index`")
        return cls(directory, manifest, _read_chunks(directory / "chunks.jsonl"))

    @property
    def embed_model(self) -> str:
        return self.manifest["embedding"]["model"]

    @property
    def store(self) -> VectorStore:
        if self._store is None:
            self._store = open_store(self.directory, self.manifest.get("store", {}))
        return self._store

    def check_encoder(self, encoder: TextEncoder) -> None:
        """Refuse an encoder whose vectors are not comparable with the index's."""
        expected = self.manifest["embedding"]
        same = encoder.dim == expected["dim"] and embedding_fingerprint(encoder) == expected["fingerprint"]
        if not same:
            raise LmstackError(
                f"the index {str(self.directory)!r} was built with embedding model {expected['model']!r} "
                f"({expected['dim']} dims) but the query uses {encoder.name!r} ({encoder.dim} dims, different "
                "vectors); query with --embed-model "
                f"{expected['model']} or rebuild the index with the new model into a fresh --index directory"
            )

    # -- BM25 ---------------------------------------------------------------------------------
    def bm25_search(self, query: str, k: int) -> list[tuple[str, float]]:
        import bm25s

        if not self.chunks:
            return []
        if self._bm25 is None:
            self._bm25 = bm25s.BM25.load(str(self.directory / "bm25"))
        vocab = self._bm25.vocab_dict
        tokens = [t for t in bm25_tokens(query) if t in vocab]
        if not tokens:
            return []
        rows, scores = self._bm25.retrieve([tokens], k=min(k, len(self.chunks)), show_progress=False)
        return [(self.chunks[int(r)].id, float(s)) for r, s in zip(rows[0], scores[0], strict=True) if s > 0]


def _read_chunks(path: Path) -> list[StoredChunk]:
    if not path.is_file():
        return []
    return [StoredChunk(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _write_bm25(directory: Path, chunks: list[StoredChunk]) -> None:
    import shutil

    import bm25s

    retriever = bm25s.BM25()
    corpus = [bm25_tokens(c.embed_text) or ["\0"] for c in chunks]  # bm25s needs a token per document
    retriever.index(corpus, show_progress=False)
    tmp = directory / "bm25.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    retriever.save(str(tmp), show_progress=False)
    shutil.rmtree(directory / "bm25", ignore_errors=True)
    tmp.rename(directory / "bm25")


def build_index(
    docs_dir: str | Path,
    index_dir: str | Path,
    encoder: TextEncoder,
    chunk_tokens: int = 256,
    overlap: int = 32,
    batch_size: int = 32,
    store: dict[str, Any] | None = None,
) -> IndexReport:
    """Create or incrementally update the index of `docs_dir` in `index_dir`."""
    root, directory = Path(docs_dir), Path(index_dir)
    files = list_documents(root)  # an empty folder is an error before anything is written
    chunking = {"max_tokens": chunk_tokens, "overlap": overlap}
    chunk_text("probe", encoder.count_tokens, encoder.word_pieces, chunk_tokens, overlap)  # validates both
    old = RagIndex.open(directory) if (directory / "index.json").is_file() else None
    embedding = {"model": encoder.name, "dim": encoder.dim, "fingerprint": embedding_fingerprint(encoder)}
    if old is not None:
        old.check_encoder(encoder)
        embedding["model"] = old.embed_model
    manifest = {
        "format": INDEX_FORMAT,
        "version": 1,
        "embedding": embedding,
        "chunking": chunking,
        "store": (old.manifest.get("store") if old else None) or store or {"kind": "chroma"},
        "files": {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    index = RagIndex(directory, manifest, [])
    previous = old.manifest["files"] if old and old.manifest["chunking"] == chunking else {}
    kept: list[StoredChunk] = []
    fresh: list[StoredChunk] = []
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    old_by_path: dict[str, list[StoredChunk]] = {}
    for chunk in old.chunks if old else []:
        old_by_path.setdefault(chunk.path, []).append(chunk)
    for rel, path in files.items():
        digest = file_digest(path)
        entry = previous.get(rel)
        if entry and entry["sha256"] == digest:
            kept.extend(old_by_path.get(rel, []))
            manifest["files"][rel] = entry
            counts["unchanged"] += 1
            continue
        counts["updated" if old and rel in old.manifest["files"] else "added"] += 1
        new = _chunk_file(root, rel, digest, encoder, chunk_tokens, overlap)
        manifest["files"][rel] = {"sha256": digest, "chunks": [c.id for c in new]}
        fresh.extend(new)
    old_files = old.manifest["files"] if old else {}
    removed = len(set(old_files) - set(files))
    stale = [i for rel, entry in old_files.items() if manifest["files"].get(rel) != entry for i in entry["chunks"]]
    index.store.delete(stale)
    if fresh:
        vectors = encoder.embed([c.embed_text for c in fresh], batch_size=batch_size, progress=True)
        metadatas = [{"path": c.path, "record": c.record, "start_line": c.start_line} for c in fresh]
        index.store.upsert([c.id for c in fresh], vectors, metadatas)
    chunks = kept + fresh
    atomic_write_text(
        directory / "chunks.jsonl", "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in chunks)
    )
    _write_bm25(directory, chunks)
    atomic_write_text(directory / "index.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    report = IndexReport(counts["added"], counts["updated"], removed, counts["unchanged"], len(chunks), len(fresh))
    print(
        f"index {directory}: {report.added} added, {report.updated} updated, {report.removed} removed, "
        f"{report.unchanged} unchanged files; {report.chunks} chunks ({report.embedded} embedded)",
        file=sys.stderr,
    )
    return report


def _chunk_file(
    root: Path, rel: str, digest: str, encoder: TextEncoder, max_tokens: int, overlap: int
) -> list[StoredChunk]:
    out: list[StoredChunk] = []
    for source in read_source(root, rel):
        for chunk in chunk_text(source.text, encoder.count_tokens, encoder.word_pieces, max_tokens, overlap):
            cid = _chunk_id(rel, digest, source.record, len(out))
            out.append(
                StoredChunk(
                    cid,
                    rel,
                    source.record,
                    chunk.heading,
                    chunk.text,
                    chunk.start,
                    chunk.end,
                    chunk.start_line,
                    chunk.end_line,
                )
            )
    return out
