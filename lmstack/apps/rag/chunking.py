"""Token-budgeted chunks that respect headings and sentence boundaries (English and Chinese).

A document is cut into sections at Markdown headings; each chunk belongs to one section and carries its
heading path ("Guide > Install"), which is prepended to the text that gets embedded, so a chunk deep in
a section still says what it is about. Inside a section, sentences (ending in . ! ? or 。！？；, or at
a blank line) are packed greedily up to `max_tokens` encoder tokens; the next chunk starts with the last
sentences of the previous one, up to `overlap` tokens, so an answer that straddles a boundary is
retrievable from either side. A sentence longer than the budget is split at word-piece boundaries.
Each chunk records its character span and line span in the source text, used for citations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lmstack.errors import require

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
# A sentence ends after CJK end punctuation, after .!? followed by whitespace, or at a blank line.
SENTENCE_END = re.compile(r"[。！？；!?][”’」』）)]*|[.!?][\"')\]]*(?=\s)|\n\s*\n")


@dataclass
class Chunk:
    text: str  # the chunk's own text (a span of the source)
    heading: str  # heading path, "" when the text is before any heading
    start: int  # character span in the source text
    end: int
    start_line: int  # 1-based line span
    end_line: int

    @property
    def embed_text(self) -> str:
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def sections(text: str) -> list[tuple[str, int, int]]:
    """(heading path, start, end) spans; the heading line belongs to its section's text."""
    marks = list(HEADING.finditer(text))
    spans: list[tuple[str, int, int]] = []
    if not marks or marks[0].start() > 0:
        spans.append(("", 0, marks[0].start() if marks else len(text)))
    path: list[tuple[int, str]] = []
    for i, m in enumerate(marks):
        level, title = len(m.group(1)), m.group(2).strip()
        path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        spans.append((" > ".join(t for _, t in path), m.start(), end))
    return [(h, s, e) for h, s, e in spans if text[s:e].strip()]


def sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Non-empty sentence spans (trimmed of surrounding whitespace) inside text[start:end]."""
    spans, cursor = [], start
    for m in SENTENCE_END.finditer(text, start, end):
        spans.append((cursor, m.end()))
        cursor = m.end()
    spans.append((cursor, end))
    out = []
    for s, e in spans:
        piece = text[s:e]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            out.append((s + lead, s + len(piece.rstrip())))
    return out


def chunk_text(
    text: str,
    count_tokens: Callable[[str], int],
    word_pieces: Callable[[str], list[tuple[int, int]]],
    max_tokens: int = 256,
    overlap: int = 32,
) -> list[Chunk]:
    """Chunks of `text`, each at most `max_tokens` tokens of body (see the module docstring)."""
    require(max_tokens >= 16, f"--chunk-tokens must be at least 16, got {max_tokens}")
    require(0 <= overlap < max_tokens // 2, f"--overlap must be in 0..{max_tokens // 2 - 1}, got {overlap}")
    chunks: list[Chunk] = []
    for heading, start, end in sections(text):
        units = []  # (start, end, tokens) with every unit within the budget
        for s, e in sentence_spans(text, start, end):
            n = count_tokens(text[s:e])
            units.extend(_split_long(text, s, e, word_pieces, max_tokens) if n > max_tokens else [(s, e, n)])
        chunks.extend(_pack(text, heading, units, max_tokens, overlap))
    return chunks


def _split_long(text, start, end, word_pieces, max_tokens) -> list[tuple[int, int, int]]:
    pieces = [(start + a, start + b) for a, b in word_pieces(text[start:end])]
    return [
        (pieces[i][0], pieces[min(i + max_tokens, len(pieces)) - 1][1], min(max_tokens, len(pieces) - i))
        for i in range(0, len(pieces), max_tokens)
    ]


def _pack(text: str, heading: str, units, max_tokens: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[tuple[int, int, int]] = []
    fresh = 0  # units in `current` not already emitted in the previous chunk

    def emit() -> None:
        s, e = current[0][0], current[-1][1]
        line = text.count("\n", 0, s) + 1
        chunks.append(Chunk(text[s:e], heading, s, e, line, line + text.count("\n", s, e)))

    for unit in units:
        if current and sum(u[2] for u in current) + unit[2] > max_tokens:
            emit()
            carried: list[tuple[int, int, int]] = []
            for u in reversed(current):  # the last sentences, up to `overlap` tokens, start the next chunk
                if sum(c[2] for c in carried) + u[2] > overlap or len(carried) + 1 >= len(current):
                    break
                carried.insert(0, u)
            while carried and sum(c[2] for c in carried) + unit[2] > max_tokens:
                carried.pop(0)
            current, fresh = carried, 0
        current.append(unit)
        fresh += 1
    if current and fresh:
        emit()
    return chunks
