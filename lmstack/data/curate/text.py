"""Text helpers shared by the filters: word splitting, sentence counting, punctuation sets, duplicates.

Words of non-CJK documents come from spaCy's rule-based English tokenizer (`spacy.blank("en")`: rules
only, nothing to download), the tokenizer datatrove's Gopher, C4 and FineWeb filters use, so URLs, paths,
"e.g.", "Node.js" and "and/or" stay whole and thresholds mean what they mean there. A document's words
are computed once and shared by every block that reads them (`document_words`).

Chinese has no spaces, so "words" there are characters: `words()` returns each CJK character as its
own word and splits the rest on whitespace and punctuation, so word-count thresholds mean the same
thing for both scripts (a Chinese character carries about as much as a short English word).
"""

from __future__ import annotations

import re
import string
import unicodedata

from lmstack.data.curate.document import Document
from lmstack.errors import LmstackError

# CJK Unified Ideographs (+ extension A, compatibility), Hiragana/Katakana, Hangul syllables.
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
# A word: a CJK character alone, or a run of letters/digits (with inner ' or -), or one symbol character.
_WORD = re.compile(rf"[{CJK_RANGES}]|[^\s{CJK_RANGES}\W]+(?:['\-][^\s{CJK_RANGES}\W]+)*|[^\w\s]")

FULLWIDTH_TERMINAL = ("。", "！", "？", "…", "」", "』", "”", "；")
ASCII_TERMINAL = (".", "!", "?", '"', "'")
TERMINAL_PUNCTUATION = ASCII_TERMINAL + FULLWIDTH_TERMINAL
# ASCII punctuation, CJK and typographic marks, and control characters: a token made only of these is a
# symbol, not a word (the same reading as datatrove's PUNCTUATION_SET).
PUNCTUATION = (
    set(string.punctuation)
    | set("，。！？；：、“”‘’（）《》【】「」『』…—·～％１〈〉━„´–．«»►∶＂")
    | {chr(c) for c in (*range(0, 9), *range(11, 32), *range(127, 160))}
)

CJK_SHARE_THRESHOLD = 0.3  # a document is "CJK" when this share of its non-space characters are CJK
CJK_LANGUAGES = ("zh", "ja", "ko")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


_SPACY: dict[str, object] = {}


def _spacy(kind: str):
    """spaCy's blank English pipeline: the tokenizer ("words") or tokenizer + sentencizer ("sentences")."""
    nlp = _SPACY.get(kind)
    if nlp is None:
        try:
            import spacy
        except ImportError:
            raise LmstackError(
                'the Gopher, C4 and FineWeb filters split English words with spaCy; pip install -e ".[data]"'
            ) from None
        nlp = spacy.blank("en")
        if kind == "sentences":
            nlp.add_pipe("sentencizer")
        _SPACY[kind] = nlp
    return nlp


def english_words(text: str) -> list[str]:
    """spaCy's rule-based English tokens, whitespace stripped and empty tokens dropped."""
    nlp = _spacy("words")
    nlp.max_length = len(text) + 10
    with nlp.memory_zone():
        tokens = [t.text.strip() for t in nlp.tokenizer(text)]
    return [t for t in tokens if t]


def document_words(doc: Document) -> list[str]:
    """The document's words (characters for CJK text), computed once per version of its text."""
    cached = doc.metadata.get("_words")
    if cached is not None and cached[0] is doc.text:
        return cached[1]
    tokens = words(doc.text) if is_cjk(doc) else english_words(doc.text)
    doc.metadata["_words"] = (doc.text, tokens)
    return tokens


def count_sentences(text: str, cjk: bool) -> int:
    """Sentences in `text`: spaCy's sentencizer for English (as datatrove's C4 filter counts them),
    terminal marks for CJK text."""
    if cjk:
        return len(_SENTENCE_END.findall(text))
    nlp = _spacy("sentences")
    nlp.max_length = len(text) + 10
    with nlp.memory_zone():
        return sum(1 for _ in nlp(text).sents)


# ASCII terminals end a sentence only before a space, the end or a closing quote ("3.14" and "e.g."
# mid-word do not); full-width terminals end one wherever they stand, since Chinese puts no space after them.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$|[\"'”」』])|[。！？]+")


def non_symbol_words(tokens: list[str]) -> list[str]:
    return [w for w in tokens if any(ch not in PUNCTUATION for ch in w)]


def is_cjk(doc: Document) -> bool:
    """Whether counts should be character-based. Uses the language block's answer when there is one."""
    lang = doc.metadata.get("language")
    if lang is not None:
        return lang in CJK_LANGUAGES
    cached = doc.metadata.get("_cjk")
    if cached is None:
        cached = cjk_share(doc.text) >= CJK_SHARE_THRESHOLD
        doc.metadata["_cjk"] = cached
    return cached


def cjk_share(text: str) -> float:
    sample = text[:5000]
    visible = len("".join(sample.split()))  # non-whitespace characters, counted at C speed
    return len(_CJK_CHAR.findall(sample)) / visible if visible else 0.0


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their characters): Gopher's repetition measure."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


def simplify(text: str) -> str:
    """Lowercase, NFKC, punctuation to spaces, whitespace collapsed: the form hashed for dedup/decontam."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCT_TO_SPACE)
    return " ".join(text.split())


_PUNCT_TO_SPACE = str.maketrans({ch: " " for ch in PUNCTUATION})
