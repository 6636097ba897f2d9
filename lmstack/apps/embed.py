"""`lmstack embed`: texts from a file -> one embedding per text, in input order.

Inputs: `.txt` (one text per line), `.jsonl` (a string field per line) or `.parquet` (a string column).
Every row must yield a text: a blank line, a malformed JSON line or a missing field is an error naming
the line, because skipping it would shift every later row out of alignment with its input.
Outputs: `.npy` (float32 matrix, rows in input order) or `.parquet` (`text` and `embedding` columns).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lmstack.errors import LmstackError, require
from lmstack.utils.io import atomic_path

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
OUTPUT_SUFFIXES = (".npy", ".parquet")


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    path = Path(path)
    require(path.is_file(), f"input file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    require(suffix in INPUT_SUFFIXES, f"input {path.name!r}: use one of {', '.join(INPUT_SUFFIXES)}")
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise LmstackError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if suffix == ".txt":
        for number, line in enumerate(lines, 1):
            require(bool(line.strip()), f"{path}:{number} is blank; remove blank lines (one text per line)")
        return lines
    return [_jsonl_text(line, f"{path}:{number}", text_field) for number, line in enumerate(lines, 1)]


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LmstackError(f"{where}: malformed JSON ({exc.msg}); every line must be one JSON object") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise LmstackError(f"{where}: no string field {text_field!r}; pass the right one with --text-field")
    return record[text_field]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise LmstackError(f"{path} is not a readable parquet file ({exc})") from None
    require(
        text_field in table.column_names,
        f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); pass --text-field",
    )
    texts = table.column(text_field).to_pylist()
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    require(bad is None, f"{path} row {bad}: {text_field!r} is not a string")
    return texts


def write_embeddings(path: str | Path, texts: list[str], vectors: np.ndarray) -> None:
    path = Path(path)
    if path.suffix.lower() == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vectors)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"text": texts, "embedding": column}), tmp)


def embed_file(
    model: str,
    input_path: str | Path,
    out_path: str | Path,
    batch_size: int = 32,
    text_field: str = "text",
    device: str = "cpu",
) -> np.ndarray:
    """Embed every text of `input_path` with encoder `model`; write and return the (N, dim) matrix."""
    from lmstack.hub import load_encoder
    from lmstack.utils.device import resolve_device

    out_suffix = Path(out_path).suffix.lower()
    require(out_suffix in OUTPUT_SUFFIXES, f"--out {str(out_path)!r}: use a {' or '.join(OUTPUT_SUFFIXES)} file")
    require(batch_size > 0, f"--batch-size must be positive, got {batch_size}")
    texts = read_texts(input_path, text_field)
    require(bool(texts), f"{input_path} holds no texts")
    encoder = load_encoder(model, device=resolve_device(device))
    vectors = encoder.embed(texts, batch_size=batch_size, progress=True)
    write_embeddings(out_path, texts, vectors)
    print(f"embedded {len(texts):,} texts -> {out_path} ({vectors.shape[1]} dims, {encoder.name})", file=sys.stderr)
    return vectors
