"""Documents of a folder, read with the data pipeline's readers, as text with headings kept.

Every file the readers know (.txt/.md, .html, .jsonl/.json/.csv/.parquet records) becomes one or more
`SourceText`s. HTML is turned into plain text with its <h1>-<h6> headings written as Markdown headings, so
the chunker sees the same structure as in a Markdown file. Record formats give one text per record,
addressed as `file:line` (JSONL) or `file[index]`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmstack.data.curate.document import BlockStats
from lmstack.data.curate.readers import SourceConfig, make_tasks, read_task
from lmstack.errors import LmstackError, require

RECORD_UNITS = {"jsonl": "line", "json": "item", "csv": "row", "parquet": "row"}  # how a record is located
RECORD_TYPES = tuple(RECORD_UNITS)
SUPPORTED = (".txt", ".md", ".html", ".htm", ".jsonl", ".json", ".csv", ".parquet")


@dataclass
class SourceText:
    path: str  # relative to the documents folder, with forward slashes
    record: str  # "" for a whole file; "line 3" / "row 2" for a record of a data file
    text: str


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def list_documents(docs_dir: str | Path) -> dict[str, Path]:
    """Relative path -> file for every supported file under `docs_dir` (hidden files skipped)."""
    root = Path(docs_dir)
    require(root.is_dir(), f"documents folder {str(root)!r} does not exist")
    files = {
        p.relative_to(root).as_posix(): p
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in SUPPORTED and not any(part.startswith(".") for part in p.parts)
    }
    if not files:
        raise LmstackError(
            f"documents folder {str(root)!r} has no documents; add {', '.join(SUPPORTED)} files and index again"
        )
    return files


def read_source(root: Path, relative: str) -> list[SourceText]:
    """The texts of one file, through the curation readers (bad records are skipped and counted)."""
    stats = BlockStats("read")
    source = SourceConfig(name="docs", paths=[relative])
    texts: list[SourceText] = []
    for task in make_tasks(0, source, root):
        for doc in read_task(task, stats):
            if doc.metadata.get("format") == "html":
                texts.append(SourceText(relative, "", html_to_text(doc.text)))
            elif task.type in RECORD_TYPES:
                texts.append(SourceText(relative, _record_label(doc.id, relative, task.type), doc.text))
            else:
                texts.append(SourceText(relative, "", doc.text))
    return [t for t in texts if t.text.strip()]


def _record_label(doc_id: str, relative: str, kind: str) -> str:
    """Readers name records `source/file:N` (JSONL line, CSV/parquet row) or `source/file[i]` (JSON item)."""
    tail = doc_id.rsplit(Path(relative).name, 1)[-1].strip(":[]")
    return f"{RECORD_UNITS[kind]} {tail}"


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; headings become Markdown headings, blocks become paragraphs."""

    BLOCKS = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "table", "ul", "ol"}
    SKIP = {"script", "style", "head", "title", "noscript"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6") or tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    paragraphs = (" ".join(p.split()) for p in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p)
