"""Readers: files and directories of many formats -> `Document`s, one read task per file.

Formats: .txt/.md (a file is a document), .jsonl and .json (choose `text_field`), .csv, .parquet,
.html/.htm, WARC (.warc, .warc.gz), and Hugging Face `datasets` saved with `save_to_disk` (read
directly with pyarrow, so the `datasets` package is not needed). The record formats are read by
`lmstack.data.files` (shared with tokenization); this module adds HTML, WARC and web pages, sources and
read tasks. Bad input never stops a run: an undecodable file or line, a malformed JSON line or a record
without the text field is skipped, counted under its reason and listed with file and line number in
the report.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.data.curate.collect import WebConfig
from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.files import (
    SUFFIX_FORMATS,
    OnProblem,
    decode,
    iter_records,
    line_aligned_ranges,
    read_text_file,
    record_text,
)
from lmstack.errors import LmstackError, require

SUFFIX_TYPES = {
    **SUFFIX_FORMATS,
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
    # jsonl files larger than this are read as several tasks of about this many bytes (cut at line starts),
    # so parallel workers share one big file; 0 keeps one task per file.
    split_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        require(self.type in SOURCE_TYPES, f"source {self.name!r}: type must be one of {', '.join(SOURCE_TYPES)}")
        require(self.weight >= 0 and self.target_tokens >= 0, f"source {self.name!r}: weight must be >= 0")
        require(self.split_bytes >= 0, f"source {self.name!r}: split_bytes must be >= 0, got {self.split_bytes}")
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
    start: int = 0  # a byte range of a jsonl file (line-aligned); end 0 reads to the end of the file
    end: int = 0


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
    pieces: list[tuple[str, Path, int, int]] = []
    for kind, path in list_files(source, base):
        if kind == "jsonl" and source.split_bytes and path.stat().st_size > source.split_bytes:
            pieces.extend((kind, path, start, end) for start, end in line_aligned_ranges(path, source.split_bytes))
        else:
            pieces.append((kind, path, 0, 0))
    return [
        ReadTask(
            f"{source_index:02d}-{source.name}-{i:05d}",
            source.name,
            kind,
            str(p),
            source.text_field,
            source.id_field,
            start,
            end,
        )
        for i, (kind, p, start, end) in enumerate(pieces)
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


def _skip_and_count(stats: BlockStats) -> OnProblem:
    """The lenient policy: a bad file, line or record is counted under its reason, listed, and skipped."""

    def on_problem(message: str, reason: str) -> None:
        stats.seen += 1
        stats.error(f"{message}; skipped", reason)

    return on_problem


def _read_text(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = read_text_file(Path(task.path), _skip_and_count(stats))
    if text is not None:
        yield Document(text=text, id=f"{task.source}/{Path(task.path).name}", metadata={"file": task.path})


def _read_records(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    """jsonl, json, csv, parquet and saved-dataset arrow files: one document per record."""
    on_problem = _skip_and_count(stats)
    fmt = "arrow" if task.type == "hf" else task.type
    records = iter_records(Path(task.path), fmt, on_problem, task.text_field, (task.start, task.end))
    for where, local_id, record in records:
        text = record_text(record, task.text_field, where, on_problem)
        if text is None:
            continue
        has_id = task.id_field and task.id_field in record
        doc_id = str(record[task.id_field]) if has_id else f"{task.source}/{local_id}"
        yield Document(text=text, id=doc_id, metadata=record_metadata(record, task))


# Keys lmstack itself writes into metadata; a record field of the same name is kept as `record_<name>`.
RESERVED_METADATA = ("file", "source", "language", "url", "format", "copy")


def record_metadata(record: dict, task: ReadTask) -> dict:
    """Every field of a record except its text and id, so provenance and labels survive curation.

    Values that JSON cannot hold (timestamps, bytes from parquet) are kept as strings."""
    metadata: dict = {}
    for key, value in record.items():
        key = str(key)
        if key in (task.text_field, task.id_field):
            continue
        name = f"record_{key}" if key in RESERVED_METADATA or key.startswith("_") else key
        metadata[name] = json.loads(json.dumps(value, ensure_ascii=False, default=str))
    metadata["file"] = task.path
    return metadata


def _read_html(task: ReadTask, stats: BlockStats) -> Iterator[Document]:
    text = read_text_file(Path(task.path), _skip_and_count(stats))
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
            text = decode(record.content_stream().read(), f"{task.path} {url}", _skip_and_count(stats))
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
    "jsonl": _read_records,
    "json": _read_records,
    "csv": _read_records,
    "parquet": _read_records,
    "hf": _read_records,
    "html": _read_html,
    "warc": _read_warc,
    "web": _read_web_pages,
}
