"""Readers: files and directories of many formats -> `Document`s, one read task per file.

Formats: .txt/.md (a file is a document), .jsonl and .json (choose `text_field`), .csv, .parquet,
.html/.htm, WARC (.warc, .warc.gz), and Hugging Face `datasets` saved with `save_to_disk` (read
directly with pyarrow, so the `datasets` package is not needed). Bad input never stops a run: an
undecodable file or line, a malformed JSON line or a record without the text field is skipped, counted
under its reason and listed with file and line number in the report.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.data.curate.collect import WebConfig
from lmstack.data.curate.document import BlockStats, Document
from lmstack.errors import LmstackError, require

SUFFIX_TYPES = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".html": "html",
    ".htm": "html",
    ".warc": "warc",
    ".gz": "warc",  # .warc.gz; other .gz files are rejected when listed
}
SOURCE_TYPES = ("auto", "text", "jsonl", "json", "csv", "parquet", "html", "warc", "hf", "web")


@dataclass
class SourceConfig:
    """One input source. `weight` or `target_tokens` take part in mixing (see mix.py)."""

    name: str = ""
    type: str = "auto"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    id_field: str = ""
    weight: float = 0.0
    target_tokens: int = 0
    web: WebConfig | None = None

    def __post_init__(self) -> None:
        require(self.type in SOURCE_TYPES, f"source {self.name!r}: type must be one of {', '.join(SOURCE_TYPES)}")
        require(self.weight >= 0 and self.target_tokens >= 0, f"source {self.name!r}: weight must be >= 0")
        if self.type == "web":
            require(
                self.web is not None,
                f"source {self.name!r}: type web needs a `web:` mapping with urls or seeds",
            )
        else:
            require(bool(self.paths), f"source {self.name!r}: give `paths:` (files, directories or globs)")


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a file (or an arrow file of a saved dataset) of one source."""

    task_id: str
    source: str
    type: str
    path: str
    text_field: str = "text"
    id_field: str = ""


def list_files(source: SourceConfig, base: Path) -> list[tuple[str, Path]]:
    """(type, path) for every file the source names, in a stable order."""
    found: list[tuple[str, Path]] = []
    for raw in source.paths:
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        if any(ch in raw for ch in "*?["):
            matches = sorted(p for p in path.parent.glob(path.name))
            require(bool(matches), f"source {source.name!r}: pattern {raw!r} matches no file")
            candidates = matches
        elif path.is_dir():
            if source.type == "hf" or _is_saved_dataset(path):
                found.extend(("hf", p) for p in _arrow_files(path))
                continue
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            candidates = [path]
        else:
            raise LmstackError(f"source {source.name!r}: path {str(path)!r} does not exist; check `paths:`")
        for p in candidates:
            kind = _file_type(source, p)
            if kind is not None:
                found.append((kind, p))
            elif not path.is_dir():
                raise LmstackError(
                    f"source {source.name!r}: cannot tell the format of {str(p)!r}; set `type:` "
                    f"({', '.join(SOURCE_TYPES[1:-2])}) or use a known suffix"
                )
    return found


def _file_type(source: SourceConfig, path: Path) -> str | None:
    if source.type not in ("auto", "hf"):
        return source.type
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".gz" and not suffixes.endswith(".warc.gz"):
        return None
    return SUFFIX_TYPES.get(path.suffix.lower())


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _arrow_files(path: Path) -> list[Path]:
    """Arrow files of a `save_to_disk` directory: a Dataset (state.json) or a DatasetDict (its splits)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _arrow_files(path / split)]
    state = path / "state.json"
    if not state.is_file():
        raise LmstackError(f"{str(path)!r} is not a dataset saved with save_to_disk (no state.json)")
    return [path / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]


def make_tasks(source_index: int, source: SourceConfig, base: Path) -> list[ReadTask]:
    files = list_files(source, base)
    return [
        ReadTask(
            f"{source_index:02d}-{source.name}-{i:05d}",
            source.name,
            kind,
            str(p),
            source.text_field,
            source.id_field,
        )
        for i, (kind, p) in enumerate(files)
    ]


def read_task(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    """Documents of one task; problems are counted in `stats` (block "read") and skipped."""
    reader = _READERS[task.type]
    for doc in reader(task, stats):
        stats.seen += 1
        if not doc.text.strip():
            stats.dropped["empty_text"] += 1
            continue
        doc.metadata.setdefault("source", task.source)
        stats.kept += 1
        yield doc


def _decode(data: bytes, where: str, stats: BlockStats) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        stats.seen += 1
        stats.error(f"{where}: undecodable bytes ({exc.reason} at byte {exc.start}); skipped", "undecodable_bytes")
        return None


def _read_text(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = _decode(Path(task.path).read_bytes(), task.path, stats)
    if text is not None:
        yield Document(text=text, id=f"{task.source}/{Path(task.path).name}", metadata={"file": task.path})


def _record_to_doc(record: Any, task: ReadTask, where: str, fallback_id: str, stats: BlockStats) -> Document | None:
    if not isinstance(record, dict):
        stats.seen += 1
        stats.error(f"{where}: expected a JSON object, got {type(record).__name__}", "malformed_record")
        return None
    text = record.get(task.text_field)
    if not isinstance(text, str):
        stats.seen += 1
        stats.error(
            f"{where}: no string field {task.text_field!r} (fields: {', '.join(map(str, record))})",
            "missing_text_field",
        )
        return None
    doc_id = str(record[task.id_field]) if task.id_field and task.id_field in record else fallback_id
    return Document(text=text, id=doc_id, metadata={"file": task.path})


def _read_jsonl(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    name = Path(task.path).name
    with open(task.path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{task.path}:{line_no}"
            line = _decode(raw, where, stats)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                stats.seen += 1
                stats.error(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); skipped", "malformed_json")
                continue
            doc = _record_to_doc(record, task, where, f"{task.source}/{name}:{line_no}", stats)
            if doc is not None:
                yield doc


def _read_json(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = _decode(Path(task.path).read_bytes(), task.path, stats)
    if text is None:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        stats.seen += 1
        stats.error(f"{task.path}:{exc.lineno}: malformed JSON ({exc.msg}); file skipped", "malformed_json")
        return
    records = data if isinstance(data, list) else [data]
    name = Path(task.path).name
    for i, record in enumerate(records):
        doc = _record_to_doc(record, task, f"{task.path}[{i}]", f"{task.source}/{name}[{i}]", stats)
        if doc is not None:
            yield doc


def _read_csv(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = _decode(Path(task.path).read_bytes(), task.path, stats)
    if text is None:
        return
    name = Path(task.path).name
    for row_no, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):  # row 1 is the header
        doc = _record_to_doc(row, task, f"{task.path}:{row_no}", f"{task.source}/{name}:{row_no}", stats)
        if doc is not None:
            yield doc


def _read_parquet(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(task.path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        stats.seen += 1
        stats.error(f"{task.path}: not a readable parquet file ({exc}); skipped", "unreadable_file")
        return
    yield from _read_record_batches(task, table.iter_batches(), stats)


def _read_arrow(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(task.path)
    except Exception as exc:
        stats.seen += 1
        stats.error(f"{task.path}: not a readable arrow file ({exc}); skipped", "unreadable_file")
        return
    yield from _read_record_batches(task, reader, stats)


def _read_record_batches(task: ReadTask, batches, stats: BlockStats) -> Iterator[Document]:
    name, row = Path(task.path).name, 0
    for batch in batches:
        if task.text_field not in batch.schema.names:
            stats.seen += 1
            stats.error(
                f"{task.path}: no column {task.text_field!r} (columns: {', '.join(batch.schema.names)})",
                "missing_text_field",
            )
            return
        for record in batch.to_pylist():
            doc = _record_to_doc(record, task, f"{task.path} row {row}", f"{task.source}/{name}:{row}", stats)
            row += 1
            if doc is not None:
                yield doc


def _read_html(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = _decode(Path(task.path).read_bytes(), task.path, stats)
    if text is not None:
        meta = {"file": task.path, "format": "html"}
        yield Document(text=text, id=f"{task.source}/{Path(task.path).name}", metadata=meta)


def _read_warc(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise LmstackError('WARC sources need warcio; pip install -e ".[data]"') from None
    with open(task.path, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type not in ("response", "conversion"):
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            content_type = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
            if record.rec_type == "response" and "html" not in content_type:
                continue
            text = _decode(record.content_stream().read(), f"{task.path} {url}", stats)
            if text is None:
                continue
            fmt = "html" if record.rec_type == "response" else "text"
            record_id = record.rec_headers.get_header("WARC-Record-ID") or url
            yield Document(text=text, id=record_id, metadata={"file": task.path, "url": url, "format": fmt})


def _read_web_pages(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    """Pages written by the web collector (one JSON object per line: url, html)."""
    with open(task.path, "rb") as f:
        for raw in f:
            try:
                page = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write; the collector refetches that page
            yield Document(text=page["html"], id=page["url"], metadata={"url": page["url"], "format": "html"})


_READERS = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hf": _read_arrow,
    "html": _read_html,
    "warc": _read_warc,
    "web": _read_web_pages,
}
