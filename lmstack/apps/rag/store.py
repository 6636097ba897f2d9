"""Where chunk vectors live: a small interface, with Chroma as the embedded default.

`VectorStore` is all the index needs (upsert, delete, nearest neighbours, count). `ChromaStore` keeps
the collection in the index directory (`chromadb.PersistentClient`); pointing the same class at a Chroma
server is a config change (`store: {kind: chroma-http, host: ..., port: ...}` in the index's
`index.json`), and another vector database is one more class with these four methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lmstack.errors import LmstackError

COLLECTION = "chunks"


@dataclass
class Neighbour:
    id: str
    similarity: float  # cosine similarity, higher is closer


class VectorStore(Protocol):
    def upsert(self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]]) -> None: ...

    def delete(self, ids: list[str]) -> None: ...

    def nearest(self, vector: np.ndarray, k: int) -> list[Neighbour]: ...

    def count(self) -> int: ...


class ChromaStore:
    """A Chroma collection with cosine distance; vectors are always given (Chroma never embeds)."""

    def __init__(self, client: Any):
        self.collection = client.get_or_create_collection(
            COLLECTION, metadata={"hnsw:space": "cosine"}, embedding_function=None
        )

    def upsert(self, ids: list[str], vectors: np.ndarray, metadatas: list[dict[str, Any]]) -> None:
        step = 4096  # Chroma caps one call's batch size
        for i in range(0, len(ids), step):
            self.collection.upsert(
                ids=ids[i : i + step], embeddings=vectors[i : i + step].tolist(), metadatas=metadatas[i : i + step]
            )

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.collection.delete(ids=ids)

    def nearest(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        n = min(k, self.count())
        if n == 0:
            return []
        result = self.collection.query(query_embeddings=[vector.tolist()], n_results=n, include=["distances"])
        return [Neighbour(i, 1.0 - d) for i, d in zip(result["ids"][0], result["distances"][0], strict=True)]

    def count(self) -> int:
        return self.collection.count()


def open_store(index_dir: Path, settings: dict[str, Any]) -> VectorStore:
    """The store an index's `index.json` names: embedded Chroma (default) or a Chroma server."""
    import chromadb
    from chromadb.config import Settings

    kind = settings.get("kind", "chroma")
    chroma_settings = Settings(anonymized_telemetry=False)
    if kind == "chroma":
        return ChromaStore(chromadb.PersistentClient(path=str(index_dir / "chroma"), settings=chroma_settings))
    if kind == "chroma-http":
        return ChromaStore(
            chromadb.HttpClient(
                host=settings.get("host", "localhost"), port=settings.get("port", 8000), settings=chroma_settings
            )
        )
    raise LmstackError(f"{index_dir}/index.json: unknown store kind {kind!r}; use chroma or chroma-http")
