"""Extraction and normalization: HTML main text (trafilatura), mojibake repair (ftfy), Unicode form,
control characters and whitespace.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from lmstack.data.curate.base import Block
from lmstack.data.curate.document import BlockStats, Document
from lmstack.errors import LmstackError, require

# C0/C1 controls except tab and newline, plus zero-width and bidi marks that only hide in text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\ufeff]")
_SPACE_RUN = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass
class NormalizeConfig:
    form: str = "NFC"  # NFC keeps full-width punctuation; NFKC also folds compatibility characters
    fix_mojibake: bool = True
    remove_control_chars: bool = True
    collapse_whitespace: bool = True

    def build(self) -> NormalizeBlock:
        return NormalizeBlock(self)


class NormalizeBlock(Block):
    name = "normalize"

    def __init__(self, cfg: NormalizeConfig):
        require(cfg.form in ("NFC", "NFKC", "none"), f"normalize.form must be NFC, NFKC or none, got {cfg.form!r}")
        self.cfg = cfg
        self._fix_text = _load_ftfy() if cfg.fix_mojibake else None

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        text = doc.text
        if self._fix_text is not None:
            # mojibake only: width folding and quote uncurling would flatten Chinese punctuation
            fixed = self._fix_text(text, normalization=None, fix_character_width=False, uncurl_quotes=False)
            if fixed != text:
                stats.edits["mojibake_fixed"] += 1
                text = fixed
        if self.cfg.form != "none":
            text = unicodedata.normalize(self.cfg.form, text)
        if self.cfg.remove_control_chars:
            text, n = _CONTROL.subn("", text)
            if n:
                stats.edits["control_chars_removed"] += n
        if self.cfg.collapse_whitespace:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
            text = "\n".join(_SPACE_RUN.sub(" ", line).strip() for line in text.split("\n"))
            text = _BLANK_LINES.sub("\n\n", text).strip()
        if not text:
            stats.drop(doc, "empty_after_normalize")
            return None
        if text != doc.text:
            stats.edits["documents_changed"] += 1
            doc.text = text
        return doc


def _load_ftfy():
    try:
        from ftfy import fix_text
    except ImportError:
        raise LmstackError('normalize.fix_mojibake needs ftfy; pip install -e ".[data]" (or set it false)') from None
    return fix_text


@dataclass
class HtmlExtractConfig:
    include_tables: bool = False
    include_comments: bool = False
    favor_precision: bool = False

    def build(self) -> HtmlExtractBlock:
        return HtmlExtractBlock(self)


class HtmlExtractBlock(Block):
    """Main text of HTML documents (readers mark them `metadata.format == "html"`); others pass through."""

    name = "html_extract"

    def __init__(self, cfg: HtmlExtractConfig):
        self.cfg = cfg
        try:
            import trafilatura
        except ImportError:
            raise LmstackError('HTML sources need trafilatura; pip install -e ".[data]"') from None
        self._extract = trafilatura.extract

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        if doc.metadata.get("format") != "html":
            return doc
        text = self._extract(
            doc.text,
            url=doc.metadata.get("url"),
            include_tables=self.cfg.include_tables,
            include_comments=self.cfg.include_comments,
            favor_precision=self.cfg.favor_precision,
        )
        if not text or not text.strip():
            stats.drop(doc, "no_main_text")
            return None
        doc.text = text
        doc.metadata["format"] = "text"
        return doc
