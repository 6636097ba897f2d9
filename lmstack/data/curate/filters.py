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

For English the rules are datatrove's (0.10) rule for rule: the same spaCy word split, the same order of
checks, the same strict/non-strict comparisons, C4's page-level "lorem ipsum" and "{" checks on the lines
that survive C4's line rules, sentences counted by spaCy's sentencizer. tests/data/test_filters_parity.py
checks agreement with datatrove. Deliberate differences (docs/data.md lists them): FineWeb's
duplicate-line character ratio defaults to the paper's 0.1 (datatrove's code: 0.01); C4's line-end marks
include full-width ones; CJK documents count characters as words.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmstack.data.curate.base import Block, Filter
from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.text import (
    TERMINAL_PUNCTUATION,
    count_sentences,
    document_words,
    find_duplicates,
    has_letter,
    is_cjk,
    non_symbol_words,
    words,
)
from lmstack.errors import LmstackError, require

ENGLISH_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's list
CHINESE_STOP_WORDS = frozenset("的了是在和有我不人这他们也就都而及与着或")
BULLETS = ("•", "-")  # Gopher's bullet marks, as datatrove reads them
ELLIPSES = ("...", "…")


# --- Gopher quality -------------------------------------------------------------------------------


@dataclass
class GopherQualityConfig:
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" per word, and ellipses per word
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
        tokens = document_words(doc)
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
        # "#" and ellipses are each compared with all tokens, symbols included (Gopher; datatrove)
        if text.count("#") / len(tokens) > cfg.max_symbol_word_ratio:
            return "hash_word_ratio"
        if (text.count("...") + text.count("…")) / len(tokens) > cfg.max_symbol_word_ratio:
            return "ellipsis_word_ratio"
        lines = text.splitlines()
        if lines:
            bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
            if bullets / len(lines) > cfg.max_bullet_lines_ratio:
                return "bullet_lines_ratio"
            ellipsis_lines = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
            if ellipsis_lines / len(lines) > cfg.max_ellipsis_lines_ratio:
                return "ellipsis_lines_ratio"
        alpha = sum(1 for w in tokens if has_letter(w))
        if alpha / len(tokens) < cfg.min_alpha_words_ratio:
            return "alpha_words_ratio"
        # distinct stop words present, as written (datatrove intersects the stop list with the word set)
        stop_words = CHINESE_STOP_WORDS if cjk else ENGLISH_STOP_WORDS
        if len(stop_words.intersection(tokens)) < cfg.min_stop_words:
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
        tokens = document_words(doc)
        grams = _NGrams(tokens)
        for n, limit in sorted(cfg.top_n_grams.items()):
            if grams.top_ngram_chars(n) / len(text) > limit:
                return f"top_{n}_gram"
        for n, limit in sorted(cfg.dup_n_grams.items()):
            if grams.duplicated_ngram_chars(n) / len(text) > limit:
                return f"duplicated_{n}_grams"
        return None


class _NGrams:
    """Gopher's n-gram repetition measures over integer n-gram hashes instead of joined strings.

    Words get integer ids; the n-grams of all positions are 64-bit polynomial hashes of their ids, each n
    built from n - 1 in one numpy step. The results equal the string versions (a hash collision between
    different n-grams would have to happen by chance, odds ~1e-19 per pair). Once no n-gram repeats at some
    n, none repeats at any larger n, and every measure beyond it is O(1)."""

    _BASE = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, tokens: list[str]):
        index: dict[str, int] = {}
        self.ids = np.array([index.setdefault(w, len(index)) for w in tokens], dtype=np.uint64) + np.uint64(1)
        self.char_prefix = np.concatenate(([0], np.cumsum([len(w) for w in tokens], dtype=np.int64)))
        self._hashes = {1: self.ids}
        self._unique_from: int | None = None  # smallest n whose n-grams are all distinct

    def hashes(self, n: int) -> np.ndarray:
        for k in range(max(self._hashes) + 1, n + 1):
            previous = self._hashes[k - 1]
            with np.errstate(over="ignore"):
                self._hashes[k] = previous[:-1] * self._BASE + self.ids[k - 1 :]
        return self._hashes[n]

    def _all_distinct(self, n: int) -> bool:
        if self._unique_from is not None and n >= self._unique_from:
            return True
        h = np.sort(self.hashes(n))
        if h.size > 1 and (h[1:] == h[:-1]).any():
            return False
        self._unique_from = n if self._unique_from is None else min(n, self._unique_from)
        return True

    def _chars(self, n: int) -> np.ndarray:
        """Characters of each n-gram's words (without the spaces between them)."""
        return self.char_prefix[n:] - self.char_prefix[:-n]

    def top_ngram_chars(self, n: int) -> int:
        """Length (words joined by spaces) x count of the most frequent n-gram, ties to the first seen."""
        if self.ids.size < n:
            return 0
        if self._all_distinct(n):  # every count is 1: the first n-gram wins the tie
            return int(self.char_prefix[n]) + n - 1
        _, first, counts = np.unique(self.hashes(n), return_index=True, return_counts=True)
        most = counts.max()
        position = int(first[counts == most].min())
        return (int(self._chars(n)[position]) + n - 1) * int(most)

    def duplicated_ngram_chars(self, n: int) -> int:
        """Characters in n-grams seen before, walking left to right and jumping n words past each repeat
        (so overlapping repeats count once; the n-grams jumped over are not recorded as seen: Gopher's rule
        as datatrove implements it). Positions whose n-gram occurs nowhere earlier are recorded in bulk, so
        the walk costs Python steps only at possible repeats."""
        if self.ids.size < n or self._all_distinct(n):
            return 0
        h = self.hashes(n)
        m = h.size
        _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
        cand = np.flatnonzero(first[inverse] < np.arange(m)).tolist()
        hashes, chars = h.tolist(), self._chars(n).tolist()
        seen = set(hashes[: cand[0]])
        repeated, i, c = 0, cand[0], 0
        while i < m:
            while c < len(cand) and cand[c] < i:
                c += 1
            following = cand[c] if c < len(cand) else m
            if following > i:  # no earlier occurrence anywhere: new n-grams, recorded at C speed
                seen.update(hashes[i:following])
                i = following
                continue
            if hashes[i] in seen:
                repeated += chars[i]
                i += n
            else:
                seen.add(hashes[i])
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


class C4Filter(Block):
    """C4 works line by line: bad lines are removed, then the page is dropped if too little remains.

    The checks run in the order of C4's code (and datatrove's port): a line with an over-long word goes,
    citations are cut, then terminal punctuation, words per line, "lorem ipsum" (drops the page),
    "javascript", "{" (drops the page) and policy phrases are checked on what is left. So a curly bracket
    or lorem ipsum on a line that was removed anyway does not cost the page."""

    name = "c4"

    def __init__(self, cfg: C4Config):
        self.cfg = cfg

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        cfg, cjk = self.cfg, is_cjk(doc)
        kept: list[str] = []
        removed = sentences = 0
        for line in doc.text.splitlines():
            verdict = self._line_verdict(line.strip(), cjk)
            if verdict in ("lorem_ipsum", "curly_bracket"):
                stats.drop(doc, verdict)
                return None
            if verdict is None:
                removed += 1
                continue
            if sentences < cfg.min_sentences:  # counting past the minimum changes nothing
                sentences += count_sentences(verdict, cjk)
            kept.append(verdict)
        if sentences < cfg.min_sentences:
            stats.drop(doc, "too_few_sentences")
            return None
        stats.edits["lines_removed"] += removed
        doc.text = "\n".join(kept).strip()
        return doc

    def _line_verdict(self, line: str, cjk: bool) -> str | None:
        """The line to keep (citations cut), None to remove it, or a page-level drop reason."""
        cfg = self.cfg
        tokens = words(line) if cjk else line.split()
        if cfg.max_word_length > 0 and any(len(w) > cfg.max_word_length for w in tokens):
            return None
        if cfg.remove_citations:
            line = _CITATION.sub("", line)
        if cfg.filter_no_terminal_punct and (not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("...")):
            return None
        if len(non_symbol_words(tokens) if cjk else tokens) < cfg.min_words_per_line:
            return None
        lowered = line.lower()
        if cfg.filter_lorem_ipsum and "lorem ipsum" in lowered:
            return "lorem_ipsum"
        if cfg.filter_javascript and "javascript" in lowered:
            return None
        if cfg.filter_curly_bracket and "{" in line:
            return "curly_bracket"
        if cfg.filter_policy and any(p in lowered for p in _POLICY):
            return None
        return line


# --- FineWeb --------------------------------------------------------------------------------------


@dataclass
class FineWebConfig:
    line_punct_thr: float = 0.12  # drop if the share of lines ending in terminal punctuation is below this
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67  # drop if more than this share of lines are short
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.1  # the paper's value (datatrove's code default is 0.01)
    new_line_ratio: float = 0.3  # drop list-like pages: more than this many line breaks per word

    def build(self) -> FineWebFilter:
        return FineWebFilter(self)


# Sentence-final marks of many scripts (Latin, Armenian, Arabic, Urdu, Devanagari, Burmese, Ethiopic,
# Khmer, CJK): FineWeb's "line ends in terminal punctuation". Closing quotes do not count here.
SENTENCE_FINAL = tuple("!.?։؟۔।॥။።፧។៕‼‽⁇⁈⁉。！？｡．")


class FineWebFilter(Filter):
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.cfg = cfg

    def reason_to_drop(self, doc: Document) -> str | None:
        cfg = self.cfg
        lines = [line for line in doc.text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        ratio = sum(1 for line in lines if line.endswith(SENTENCE_FINAL)) / len(lines)
        if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= cfg.short_line_length) / len(lines) > cfg.short_line_thr:
            return "short_line_ratio"
        if find_duplicates(lines)[1] / max(1, len(doc.text.replace("\n", ""))) > cfg.char_duplicates_ratio:
            return "char_dup_ratio"
        tokens = document_words(doc)
        if doc.text.count("\n") / max(1, len(tokens)) > cfg.new_line_ratio:
            return "list_ratio"
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
