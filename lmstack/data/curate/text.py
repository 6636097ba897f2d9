"""Text helpers shared by the filters: CJK-aware word splitting, punctuation sets, duplicate counting.

Chinese has no spaces, so "words" there are characters: `words()` returns each CJK character as its
own word and splits the rest on whitespace and punctuation, so word-count thresholds mean the same
thing for both scripts (a Chinese character carries about as much as a short English word).
"""

from __future__ import annotations

import re
import string
import unicodedata

from lmstack.data.curate.document import Document

# CJK Unified Ideographs (+ extension A, compatibility), Hiragana/Katakana, Hangul syllables.
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
# A word: a CJK character alone, or a run of letters/digits (with inner ' or -), or one symbol character.
_WORD = re.compile(rf"[{CJK_RANGES}]|[^\s{CJK_RANGES}\W]+(?:['\-][^\s{CJK_RANGES}\W]+)*|[^\w\s]")

FULLWIDTH_TERMINAL = ("。", "！", "？", "…", "」", "』", "”", "；")
ASCII_TERMINAL = (".", "!", "?", '"', "'")
TERMINAL_PUNCTUATION = ASCII_TERMINAL + FULLWIDTH_TERMINAL
PUNCTUATION = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】「」『』…—·～")

CJK_SHARE_THRESHOLD = 0.3  # a document is "CJK" when this share of its non-space characters are CJK
CJK_LANGUAGES = ("zh", "ja", "ko")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


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
