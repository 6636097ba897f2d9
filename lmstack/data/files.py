"""Reading text documents from files: the one home for every file format lmstack reads text from.

Used by tokenizer training and `lmstack data tokenize` (strict: a bad line is an error that names the
file and line) and by the curation readers (lenient: a bad line is counted, reported and skipped). The
policy is the caller's `on_problem(message, reason)`; the readers only find the problems. This module
imports nothing from lmstack but `lmstack.errors`, so every layer may use it.

Formats: .txt/.md (a file is a document), .jsonl (one JSON object per line), .json (an object or a
list of objects), .csv (a header row, then records), .parquet and Arrow IPC streams (columns). Records
hold the text in a field chosen by the caller (`text` by default).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmstack.errors import LmstackError

# Called with a message naming the file (and line or row) and a short machine-readable reason.
OnProblem = Callable[[str, str], None]
# (where: "file:line" for messages, local id: "name:line" for document ids, the record itself)
Record = tuple[str, str, Any]

SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

_STRICT_HINTS = {
    "missing_text_field": "pass --text-field NAME (text_field: in a recipe) naming the field that holds the text",
    "undecodable_bytes": "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)",
}


def raise_problem(message: str, reason: str) -> None:
    """The strict policy: the first problem stops the work with a message naming the place and the fix."""
    raise LmstackError(f"{message}; {_STRICT_HINTS.get(reason, 'fix or remove it')}")


def file_format(path: Path) -> str | None:
    """The format a file's suffix names, or None for a suffix lmstack does not read as text records."""
    return SUFFIX_FORMATS.get(path.suffix.lower())


def decode(data: bytes, where: str, on_problem: OnProblem) -> str | None:
    """UTF-8 (a byte-order mark is dropped); None after reporting undecodable bytes."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        on_problem(f"{where}: undecodable bytes ({exc.reason} at byte {exc.start})", "undecodable_bytes")
        return None


def read_text_file(path: Path, on_problem: OnProblem) -> str | None:
    """A whole .txt/.md file as one string."""
    return decode(path.read_bytes(), str(path), on_problem)


def record_text(record: Any, text_field: str, where: str, on_problem: OnProblem) -> str | None:
    """The text of one record, or None after reporting why it has none."""
    if not isinstance(record, dict):
        on_problem(f"{where}: expected a JSON object, got {type(record).__name__}", "malformed_record")
        return None
    text = record.get(text_field)
    if not isinstance(text, str):
        fields = ", ".join(map(str, record))
        on_problem(f"{where}: no string field {text_field!r} (fields: {fields})", "missing_text_field")
        return None
    return text


def iter_jsonl_records(path: Path, on_problem: OnProblem, start: int = 0, end: int = 0) -> Iterator[Record]:
    """Records of a jsonl file, or of the lines in bytes [start, end) when a range is given (end 0: to the
    end of the file). Ranges must begin at a line start; line numbers stay those of the whole file."""
    with open(path, "rb") as f:
        line_no = _count_lines_before(f, start) if start else 0
        f.seek(start)
        while not end or f.tell() < end:
            raw = f.readline()
            if not raw:
                break
            line_no += 1
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            line = decode(raw, where, on_problem)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                on_problem(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})", "malformed_json")
                continue
            yield where, f"{path.name}:{line_no}", record


def iter_jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value) for every non-blank line of a training-data jsonl file; the first line
    that is not JSON stops with an error naming the file and line (the strict policy of training data)."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmstackError(f"{where}: not valid JSON ({exc.msg})") from None


def _count_lines_before(f: BinaryIO, offset: int, block: int = 1 << 22) -> int:
    f.seek(0)
    count, left = 0, offset
    while left > 0:
        chunk = f.read(min(block, left))
        if not chunk:
            break
        count += chunk.count(b"\n")
        left -= len(chunk)
    return count


def line_aligned_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Cut a file into byte ranges of about `size` bytes that start at line starts: [(start, end), ...]."""
    total = path.stat().st_size
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < total:
            f.seek(min(start + size, total))
            f.readline()  # move to the start of the next line
            end = min(f.tell(), total)
            ranges.append((start, end))
            start = end
    return ranges


def iter_json_records(path: Path, on_problem: OnProblem) -> Iterator[Record]:
    text = read_text_file(path, on_problem)
    if text is None:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        on_problem(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})", "malformed_json")
        return
    for i, record in enumerate(data if isinstance(data, list) else [data]):
        yield f"{path}[{i}]", f"{path.name}[{i}]", record


def iter_csv_records(path: Path, on_problem: OnProblem) -> Iterator[Record]:
    text = read_text_file(path, on_problem)
    if text is None:
        return
    for row_no, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), 2):  # row 1 is the header
        yield f"{path}:{row_no}", f"{path.name}:{row_no}", row


def iter_parquet_records(path: Path, on_problem: OnProblem, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # pyarrow costs ~0.3 s to import; only parquet inputs need it

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        on_problem(f"{path}: not a readable parquet file ({exc})", "unreadable_file")
        return
    yield from iter_batch_records(path, table.iter_batches(), on_problem, text_field)


def iter_arrow_records(path: Path, on_problem: OnProblem, text_field: str) -> Iterator[Record]:
    """An Arrow IPC stream (the files of a Hugging Face dataset saved with `save_to_disk`)."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(path)
    except Exception as exc:
        on_problem(f"{path}: not a readable arrow file ({exc})", "unreadable_file")
        return
    yield from iter_batch_records(path, reader, on_problem, text_field)


def iter_batch_records(path: Path, batches: Iterable[Any], on_problem: OnProblem, text_field: str) -> Iterator[Record]:
    """Rows of Arrow record batches as dicts; a batch without the text column is reported once."""
    row = 0
    for batch in batches:
        if text_field not in batch.schema.names:
            columns = ", ".join(batch.schema.names)
            on_problem(f"{path}: no column {text_field!r} (columns: {columns})", "missing_text_field")
            return
        for record in batch.to_pylist():
            yield f"{path} row {row}", f"{path.name}:{row}", record
            row += 1


def iter_records(
    path: Path, fmt: str, on_problem: OnProblem, text_field: str = "text", byte_range: tuple[int, int] = (0, 0)
) -> Iterator[Record]:
    """Records of a file in a record format (jsonl, json, csv, parquet, arrow); jsonl may be read in a
    line-aligned byte range (see `line_aligned_ranges`)."""
    if fmt == "jsonl":
        return iter_jsonl_records(path, on_problem, *byte_range)
    if fmt == "json":
        return iter_json_records(path, on_problem)
    if fmt == "csv":
        return iter_csv_records(path, on_problem)
    if fmt == "parquet":
        return iter_parquet_records(path, on_problem, text_field)
    if fmt == "arrow":
        return iter_arrow_records(path, on_problem, text_field)
    raise ValueError(f"not a record format: {fmt!r}")


def resolve_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand directories, check that every input exists, has a readable format, and that some text is there."""
    known = ", ".join(SUFFIX_FORMATS)
    if not inputs:
        raise LmstackError(f"no input given; pass --input FILE_OR_DIR ({known})")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p) is not None)
            if not found:
                raise LmstackError(f"directory {str(path)!r} holds no {known} files")
            files.extend(found)
        elif path.is_file():
            if file_format(path) is None:
                raise LmstackError(f"{str(path)!r}: unsupported file type; use {known}")
            files.append(path)
        else:
            raise LmstackError(f"input {str(path)!r} does not exist; check the path")
    if all(f.stat().st_size == 0 for f in files):
        raise LmstackError(f"the inputs are empty: {', '.join(map(str, files))}; give files with text")
    return files


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of `files` (from `resolve_inputs`), strictly: a bad record is an error."""
    for path in files:
        fmt = file_format(path)
        if fmt == "text":
            texts: Iterable[str | None] = [read_text_file(path, raise_problem)]
        else:
            records = iter_records(path, fmt, raise_problem, text_field)
            texts = (record_text(record, text_field, where, raise_problem) for where, _, record in records)
        for text in texts:
            if text and text.strip():
                yield text
