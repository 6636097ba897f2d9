"""Quality filters with their published thresholds, each drop carrying a reason.

Sources of the defaults:
- Gopher quality and repetition: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights
  from Training Gopher", appendix A.1.1 and table A1 (as implemented in datatrove).
- C4: Raffel et al. 2020, section 2.2 (lines must end in terminal punctuation and have >= 3 words,
  pages need >= 5 sentences, no "lorem ipsum", no "{", no "javascript" lines, policy lines removed).
- FineWeb: Penedo et al. 2024, section 3.5 (line-ending punctuation ratio <= 0.12, duplicated-line
  characters >= 0.1, lines of <= 30 characters >= 0.67 of all lines: each drops the document).
Chinese-aware: for CJK documents a "word" is a character (see text.py), terminal punctuation includes
full-width marks, the average-word-length rule is skipped, and stop words come from a Chinese list.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.data.curate.base import Block, Filter
from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.text import (
    TERMINAL_PUNCTUATION,
    find_duplicates,
    is_cjk,
    non_symbol_words,
    words,
)
from lmstack.errors import LmstackError, require

ENGLISH_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's list
CHINESE_STOP_WORDS = frozenset("的了是在和有我不人这他们也就都而及与着或")
BULLETS = ("•", "-", "*", "·", "●", "◦", "▪", "‣")
ELLIPSES = ("...", "…")


# --- Gopher quality -------------------------------------------------------------------------------


@dataclass
class GopherQualityConfig:
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and ellipses per word
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8  # share of words with at least one alphabetic character
    min_stop_words: int = 2

    def build(self) -> GopherQualityFilter:
        return GopherQualityFilter(self)


class GopherQualityFilter(Filter):
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.cfg = cfg

    def reason_to_drop(self, doc: Document) -> str | None:
        cfg, text, cjk = self.cfg, doc.text, is_cjk(doc)
        tokens = words(text)
        content = non_symbol_words(tokens)
        n = len(content)
        if n < cfg.min_doc_words:
            return "too_few_words"
        if n > cfg.max_doc_words:
            return "too_many_words"
        if not cjk:
            avg = sum(len(w) for w in content) / n
            if avg < cfg.min_avg_word_length:
                return "avg_word_length_too_short"
            if avg > cfg.max_avg_word_length:
                return "avg_word_length_too_long"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
        lines = text.splitlines()
        if lines:
            bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
            if bullets / len(lines) > cfg.max_bullet_lines_ratio:
                return "bullet_lines_ratio"
            ellipsis_lines = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
            if ellipsis_lines / len(lines) > cfg.max_ellipsis_lines_ratio:
                return "ellipsis_lines_ratio"
        alpha = sum(1 for w in tokens if any(ch.isalpha() for ch in w))
        if alpha / max(1, len(tokens)) < cfg.min_alpha_words_ratio:
            return "alpha_words_ratio"
        stop_words = CHINESE_STOP_WORDS if cjk else ENGLISH_STOP_WORDS
        if sum(1 for w in content if w.lower() in stop_words) < cfg.min_stop_words:
            return "too_few_stop_words"
        return None


# --- Gopher repetition ----------------------------------------------------------------------------


@dataclass
class GopherRepetitionConfig:
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_n_grams: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    def build(self) -> GopherRepetitionFilter:
        return GopherRepetitionFilter(self)


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig):
        self.cfg = cfg

    def reason_to_drop(self, doc: Document) -> str | None:
        cfg, text = self.cfg, doc.text
        if not text:
            return "empty"
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        dup_paras, dup_para_chars = find_duplicates(paragraphs)
        if dup_paras / len(paragraphs) > cfg.dup_para_frac:
            return "dup_para_frac"
        if dup_para_chars / len(text) > cfg.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        dup_lines, dup_line_chars = find_duplicates(lines)
        if dup_lines / len(lines) > cfg.dup_line_frac:
            return "dup_line_frac"
        if dup_line_chars / len(text) > cfg.dup_line_char_frac:
            return "dup_line_char_frac"
        tokens = words(text)
        for n, limit in sorted(cfg.top_n_grams.items()):
            grams = [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            if grams:
                gram, count = Counter(grams).most_common(1)[0]
                if count > 1 and len(gram) * count / len(text) > limit:
                    return f"top_{n}_gram"
        for n, limit in sorted(cfg.dup_n_grams.items()):
            if _duplicated_ngram_chars(tokens, n) / len(text) > limit:
                return f"duplicated_{n}_grams"
        return None


def _duplicated_ngram_chars(tokens: list[str], n: int) -> int:
    """Characters in n-grams seen before, skipping past each repeat so overlaps count once (Gopher)."""
    seen: set[tuple[str, ...]] = set()
    repeated, i = 0, 0
    while i < len(tokens) - n + 1:
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeated += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


# --- C4 -------------------------------------------------------------------------------------------


@dataclass
class C4Config:
    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def build(self) -> C4Filter:
        return C4Filter(self)


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# ASCII terminals end a sentence only before a space, the end or a closing quote ("3.14" and "e.g."
# mid-word do not); full-width terminals end one wherever they stand, since Chinese puts no space after them.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$|[\"'”」』])|[。！？]+")


class C4Filter(Block):
    """C4 works line by line: bad lines are removed, then the page is dropped if too little remains."""

    name = "c4"

    def __init__(self, cfg: C4Config):
        self.cfg = cfg

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        cfg = self.cfg
        lowered = doc.text.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lowered:
            stats.drop(doc, "lorem_ipsum")
            return None
        if cfg.filter_curly_bracket and "{" in doc.text:
            stats.drop(doc, "curly_bracket")
            return None
        kept_lines, removed = self._keep_lines(doc, stats)
        text = "\n".join(kept_lines)
        if len(_SENTENCE_END.findall(text)) < cfg.min_sentences:
            stats.drop(doc, "too_few_sentences")
            return None
        stats.edits["lines_removed"] += removed
        doc.text = text
        return doc

    def _keep_lines(self, doc: Document, stats: BlockStats) -> tuple[list[str], int]:
        cfg, cjk = self.cfg, is_cjk(doc)
        kept: list[str] = []
        removed = 0
        for line in doc.text.splitlines():
            line = line.strip()
            if not line:
                continue
            if cfg.remove_citations:
                line = _CITATION.sub("", line)
            lowered = line.lower()
            tokens = words(line) if cjk else line.split()
            drop = (
                (cfg.filter_no_terminal_punct and (not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("...")))
                or len(non_symbol_words(tokens)) < cfg.min_words_per_line
                or any(len(w) > cfg.max_word_length for w in tokens)
                or (cfg.filter_javascript and "javascript" in lowered)
                or (cfg.filter_policy and any(p in lowered for p in _POLICY))
            )
            if drop:
                removed += 1
            else:
                kept.append(line)
        return kept, removed


# --- FineWeb --------------------------------------------------------------------------------------


@dataclass
class FineWebConfig:
    line_punct_thr: float = 0.12  # drop if the share of lines ending in punctuation is <= this
    line_punct_exclude_zero: bool = False
    char_duplicates_ratio: float = 0.1  # the paper's value (datatrove's code default is 0.01)
    short_line_thr: float = 0.67
    short_line_length: int = 30

    def build(self) -> FineWebFilter:
        return FineWebFilter(self)


class FineWebFilter(Filter):
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.cfg = cfg

    def reason_to_drop(self, doc: Document) -> str | None:
        cfg = self.cfg
        lines = [line.strip() for line in doc.text.split("\n")]
        lines = [line for line in lines if line]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION)) / len(lines)
        if ratio <= cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
            return "line_punct_ratio"
        chars = len(doc.text.replace("\n", ""))
        if find_duplicates(lines)[1] / max(1, chars) >= cfg.char_duplicates_ratio:
            return "char_dup_ratio"
        if sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines) >= cfg.short_line_thr:
            return "short_line_ratio"
        return None


# --- C4 bad words ---------------------------------------------------------------------------------


@dataclass
class BadWordsConfig:
    """C4's page rule: drop a page containing any word of a block list (C4 used the LDNOOBW lists).

    No list ships with lmstack and none is downloaded: name your own files, one word or phrase per
    line (`#` starts a comment). Words with CJK characters match as substrings (no spaces between
    words); others match whole words, case-insensitively.
    """

    words_files: list[str] = field(default_factory=list)
    keep_fraction: float = 0.0  # keep this share of flagged pages (datatrove's option), chosen by id hash

    def build(self, base: Path = Path(".")) -> BadWordsFilter:
        require(bool(self.words_files), "badwords needs `words_files:` (files with one word or phrase per line)")
        require(0.0 <= self.keep_fraction <= 1.0, f"badwords.keep_fraction must be in [0, 1], got {self.keep_fraction}")
        words: list[str] = []
        for name in self.words_files:
            path = base / name
            if not path.is_file():
                raise LmstackError(f"bad-words list {str(path)!r} not found; fix badwords.words_files")
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            words += [w.strip().lower() for w in lines if w.strip() and not w.lstrip().startswith("#")]
        require(bool(words), f"the bad-words lists {self.words_files} hold no words")
        return BadWordsFilter(words, self.keep_fraction)


class BadWordsFilter(Filter):
    name = "badwords"

    def __init__(self, words: list[str], keep_fraction: float):
        cjk = sorted({w for w in words if _CJK_CHAR.search(w)}, key=len, reverse=True)
        spaced = sorted({w for w in words if not _CJK_CHAR.search(w)}, key=len, reverse=True)
        parts = [f"(?<!\\w)(?:{'|'.join(map(re.escape, spaced))})(?!\\w)"] if spaced else []
        parts += [f"(?:{'|'.join(map(re.escape, cjk))})"] if cjk else []
        self.pattern = re.compile(f"(?:{'|'.join(parts)})", re.IGNORECASE)
        self.keep_fraction = keep_fraction

    def reason_to_drop(self, doc: Document) -> str | None:
        if not self.pattern.search(doc.text):
            return None
        if self.keep_fraction and _unit_hash(doc.id) < self.keep_fraction:
            return None
        return "bad_word"


_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) from a document id: the same pages are kept on every run."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


# --- Length ---------------------------------------------------------------------------------------


@dataclass
class LengthConfig:
    min_chars: int = 0
    max_chars: int = 0  # 0: no limit
    min_words: int = 0
    max_words: int = 0  # 0: no limit

    def build(self) -> LengthFilter:
        return LengthFilter(self)


class LengthFilter(Filter):
    name = "length"

    def __init__(self, cfg: LengthConfig):
        self.cfg = cfg

    def reason_to_drop(self, doc: Document) -> str | None:
        cfg, n_chars = self.cfg, len(doc.text)
        if n_chars < cfg.min_chars:
            return "too_short_chars"
        if cfg.max_chars and n_chars > cfg.max_chars:
            return "too_long_chars"
        if cfg.min_words or cfg.max_words:
            n_words = len(non_symbol_words(words(doc.text)))
            if n_words < cfg.min_words:
                return "too_short_words"
            if cfg.max_words and n_words > cfg.max_words:
                return "too_long_words"
        return None


# --- Language identification ----------------------------------------------------------------------


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=list)  # ISO 639-1 codes to keep; empty: keep all, label only
    min_score: float = 0.65  # FineWeb keeps English with fastText score >= 0.65

    def build(self) -> LanguageFilter:
        return LanguageFilter(self)


class LanguageFilter(Filter):
    """py3langid (its model ships inside the package, nothing is downloaded); labels `metadata.language`."""

    name = "language"

    def __init__(self, cfg: LanguageConfig):
        require(0.0 <= cfg.min_score <= 1.0, f"language.min_score must be in [0, 1], got {cfg.min_score}")
        self.cfg = cfg
        self._identifier = None

    def identify(self, text: str) -> tuple[str, float]:
        if self._identifier is None:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError:
                raise LmstackError('language filter needs py3langid; pip install -e ".[data]"') from None
            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(text[:10_000].replace("\n", " "))
        return lang, float(score)

    def reason_to_drop(self, doc: Document) -> str | None:
        lang, score = self.identify(doc.text)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        doc.metadata.pop("_cjk", None)
        if self.cfg.languages and lang not in self.cfg.languages:
            return f"language_{lang}"
        if score < self.cfg.min_score:
            return "low_language_score"
        return None
