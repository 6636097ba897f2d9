"""lmstack.data.files: one reader per format, strict for tokenization, lenient for curation."""

from __future__ import annotations

import json

import pytest

from lmstack.data.files import iter_documents, iter_records, resolve_inputs
from lmstack.errors import LmstackError


def test_every_format_yields_its_documents(tmp_path):
    (tmp_path / "a.txt").write_text("a whole file is one document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jsonl one"}) + "\n\n" + json.dumps({"text": "jsonl two"}))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "json one"}, {"text": " "}]))
    (tmp_path / "d.csv").write_text('text,id\n"csv, with a comma",1\n')
    (tmp_path / "skipped.bin").write_bytes(b"\x00")
    docs = list(iter_documents(resolve_inputs([tmp_path])))
    assert docs == ["a whole file is one document", "jsonl one", "jsonl two", "json one", "csv, with a comma"]


def test_strict_reading_names_the_place_and_the_fix(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LmstackError, match=r"latin1.txt: undecodable bytes .* at byte 3.*iconv"):
        list(iter_documents([bad]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LmstackError, match=r"rows.jsonl:1: no string field 'text' \(fields: body\).*--text-field"):
        list(iter_documents([rows]))
    with pytest.raises(LmstackError, match="unsupported file type"):
        resolve_inputs([tmp_path / "latin1.txt", _touch(tmp_path / "x.bin")])


def test_lenient_reading_reports_and_goes_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{broken\n\xff\xfe\n{"text": "also ok"}\n')
    problems: list[tuple[str, str]] = []
    records = list(iter_records(path, "jsonl", lambda message, reason: problems.append((message, reason))))
    assert [r["text"] for _, _, r in records] == ["ok", "also ok"]
    assert [reason for _, reason in problems] == ["malformed_json", "undecodable_bytes"]
    assert problems[0][0].startswith(f"{path}:2: malformed JSON")
    assert [local for _, local, _ in records] == ["mixed.jsonl:1", "mixed.jsonl:4"]


def _touch(path):
    path.write_bytes(b"x")
    return path
