"""A real-text corpus that every machine already has: the docstrings of Python's standard library.

The quickstart and the tests need human-written prose without downloading anything. The standard
library's module, class and function docstrings are exactly that (several MB of English technical
prose written by people), and they ship with every Python install.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmstack.errors import LmstackError
from lmstack.utils.io import atomic_path

MIN_DOC_CHARS = 200  # shorter docstrings ("Return self.") teach little


def stdlib_docstrings(max_bytes: int = 4_000_000) -> Iterator[str]:
    """Yield standard-library docstrings of at least MIN_DOC_CHARS characters, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if any(
            part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.relative_to(root).parts
        ):
            continue
        for doc in _docstrings(path):
            yield doc
            total += len(doc.encode("utf-8"))
            if total >= max_bytes:
                return


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc


def write_builtin_corpus(out_path: str | Path, max_bytes: int = 4_000_000) -> int:
    """Write the corpus as .jsonl ({"text": ...} per line); returns the number of documents."""
    count = 0
    with atomic_path(out_path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for doc in stdlib_docstrings(max_bytes):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise LmstackError("found no standard-library docstrings to build the built-in corpus from")
    return count
