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

import functools
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


# spaCy keeps every string it has seen in its vocabulary: that cache is what makes it fast on real text,
# but it grows without bound over a large corpus, so the pipeline is rebuilt past this many entries.
_SPACY_MAX_VOCAB = 500_000


def _spacy_tokenizer():
    """spaCy's blank English tokenizer (rules only; built on first use, rebuilt when its vocabulary is big)."""
    nlp = _SPACY.get("en")
    if nlp is None or len(nlp.vocab) > _SPACY_MAX_VOCAB:
        try:
            import spacy
        except ImportError:
            raise LmstackError(
                'the Gopher, C4 and FineWeb filters split English words with spaCy; pip install -e ".[data]"'
            ) from None
        nlp = _SPACY["en"] = spacy.blank("en")
    nlp.max_length = 1 << 31  # the tokenizer has no memory limit of its own; max_length is for parsers
    return nlp


def _token_array(text: str) -> list[list[int]]:
    """[start, length, is_punct] per spaCy token: plain ints, without building a Python Token per word."""
    from spacy.attrs import IDX, IS_PUNCT, LENGTH

    return _spacy_tokenizer().tokenizer(text).to_array([IDX, LENGTH, IS_PUNCT]).tolist()


def english_words(text: str) -> list[str]:
    """spaCy's rule-based English tokens, whitespace stripped and empty tokens dropped (datatrove's split)."""
    tokens = [text[start : start + length].strip() for start, length, _ in _token_array(text)]
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
    """Sentences in `text`: for English the count spaCy's sentencizer gives (what datatrove's C4 filter
    counts), computed on the tokenizer's output; for CJK text the terminal marks."""
    if cjk:
        return len(_SENTENCE_END.findall(text))
    tokens = _token_array(text)
    if not tokens:
        return 0
    # spaCy's Sentencizer.predict: a sentence starts at the first token that is not punctuation after a
    # sentence-final mark.
    sentences, seen_final, marks = 1, False, _sentencizer_marks()
    for start, length, is_punct in tokens:
        is_final = text[start : start + length] in marks
        if seen_final and not is_punct and not is_final:
            sentences += 1
            seen_final = False
        elif is_final:
            seen_final = True
    return sentences


@functools.cache
def _sentencizer_marks() -> frozenset[str]:
    from spacy.pipeline.sentencizer import Sentencizer  # spaCy is present: _token_array ran first

    return frozenset(Sentencizer.default_punct_chars)


# ASCII terminals end a sentence only before a space, the end or a closing quote ("3.14" and "e.g."
# mid-word do not); full-width terminals end one wherever they stand, since Chinese puts no space after them.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$|[\"'”」』])|[。！？]+")


def non_symbol_words(tokens: list[str]) -> list[str]:
    """Tokens with at least one character that is not punctuation (str.translate deletes at C speed)."""
    return [w for w in tokens if w.translate(_DELETE_PUNCTUATION)]


def has_letter(word: str) -> bool:
    return _LETTER.search(word) is not None


_LETTER = re.compile(r"[^\W\d_]")  # str.isalpha's letters


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
_DELETE_PUNCTUATION = str.maketrans({ch: None for ch in PUNCTUATION})
