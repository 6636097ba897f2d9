"""Writers: documents -> JSONL or Parquet shards, each file written atomically.

JSONL lines are `{"text", "id", "metadata"}`; Parquet has columns text, id and metadata (a JSON string),
the field/column `text` being what `lmstack data tokenize` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from lmstack.data.curate.document import Document
from lmstack.errors import require
from lmstack.utils.io import atomic_path

FORMATS = ("jsonl", "parquet")


class ShardWriter:
    """Writes `prefix-00000.{jsonl,parquet}`, `prefix-00001...`, `docs_per_shard` documents each."""

    def __init__(self, out_dir: str | Path, prefix: str, fmt: str = "jsonl", docs_per_shard: int = 100_000):
        require(fmt in FORMATS, f"output.format must be jsonl or parquet, got {fmt!r}")
        require(docs_per_shard > 0, f"output.docs_per_shard must be > 0, got {docs_per_shard}")
        self.out_dir, self.prefix, self.fmt, self.docs_per_shard = Path(out_dir), prefix, fmt, docs_per_shard
        self.pending: list[Document] = []
        self.files: list[Path] = []
        self.documents = 0

    def write(self, doc: Document) -> None:
        self.pending.append(doc)
        self.documents += 1
        if len(self.pending) >= self.docs_per_shard:
            self.flush()

    def write_all(self, docs: Iterable[Document]) -> None:
        for doc in docs:
            self.write(doc)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out_dir / f"{self.prefix}-{len(self.files):05d}.{self.fmt}"
        with atomic_path(path) as tmp:
            if self.fmt == "jsonl":
                _write_jsonl(tmp, self.pending)
            else:
                _write_parquet(tmp, self.pending)
        self.files.append(path)
        self.pending = []

    def close(self) -> list[Path]:
        self.flush()
        return self.files


def _public_metadata(doc: Document) -> dict:
    return {k: v for k, v in doc.metadata.items() if not k.startswith("_")}


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            record = {"text": doc.text, "id": doc.id, "metadata": _public_metadata(doc)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _write_parquet(path: Path, docs: list[Document]) -> None:
    import pyarrow as pa  # ~0.4 s to import; only parquet output needs it
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "text": [d.text for d in docs],
            "id": [d.id for d in docs],
            "metadata": [json.dumps(_public_metadata(d), ensure_ascii=False) for d in docs],
        }
    )
    pq.write_table(table, path)


def write_jsonl_documents(path: str | Path, docs: list[Document]) -> None:
    """All `docs` to one JSONL file, atomically (the intermediate files between pipeline stages)."""
    with atomic_path(path) as tmp:
        _write_jsonl(tmp, docs)


def read_jsonl_documents(path: str | Path) -> list[Document]:
    """The documents of a JSONL shard written by `ShardWriter` (used between pipeline stages)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            docs.append(Document(text=record["text"], id=record["id"], metadata=record["metadata"]))
    return docs
