"""PII scrubbing: emails, phone numbers (mainland mobiles and landlines, international, North American),
IP addresses, Chinese resident ID numbers, credit cards.

Each match becomes a typed placeholder (`<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>`, `<CN_ID>`,
`<CREDIT_CARD>`) and is counted by type. Numbers with a checksum are only replaced when the checksum
holds (ID: ISO 7064 mod 11-2; cards: Luhn), which keeps order numbers and timestamps intact.
Detectors run most-specific first so an 18-digit ID is never half-eaten by the phone pattern.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from lmstack.data.curate.base import Block
from lmstack.data.curate.document import BlockStats, Document
from lmstack.errors import require

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# 18 characters: 6 area digits, birth date 18xx-20xx with a real month and day, 3 sequence digits, check.
CN_ID = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[0-9Xx](?![0-9A-Za-z])"
)
CREDIT_CARD = re.compile(r"(?<![\d+-])(?:\d[ -]?){12,18}\d(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6 = re.compile(
    r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])|(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![:\w])"
)
CN_MOBILE = re.compile(r"(?<![\d+])(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)")
# Mainland landline: area code (010, 02x, or 0 + three digits starting 3-9) set off by a hyphen, a space or
# (full-width) parentheses, then a 7-8 digit local number that never starts with 0 or 1. The separator is
# required, so a bare digit run (an order number, a timestamp) is never read as a phone number. The
# boundaries are ASCII letters and digits only: Chinese text runs straight into the number.
CN_LANDLINE = re.compile(
    r"(?<![0-9A-Za-z+-])(?:[(（]0(?:10|2\d|[3-9]\d{2})[)）][ -]?|0(?:10|2\d|[3-9]\d{2})[ -])"
    r"[2-9]\d{2,3}[ -]?\d{4}(?:-\d{1,5})?(?![0-9A-Za-z-])"
)
# International (+country code) or North-American style; needs separators or a "+" so bare numbers
# (years, counts, order ids) do not match.
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w-])"
)

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def valid_cn_id(number: str) -> bool:
    """GB 11643-1999 check character (ISO 7064 MOD 11-2)."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _valid_phone(match: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in match) <= 15


# (type, pattern, validator) in the order they run.
DETECTORS: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("EMAIL", EMAIL, None),
    ("CN_ID", CN_ID, valid_cn_id),
    ("CREDIT_CARD", CREDIT_CARD, luhn_valid),
    ("IP_ADDRESS", IPV4, None),
    ("IP_ADDRESS", IPV6, None),
    ("PHONE", CN_MOBILE, None),
    ("PHONE", CN_LANDLINE, None),
    ("PHONE", PHONE, _valid_phone),
]
PII_TYPES = ("EMAIL", "PHONE", "IP_ADDRESS", "CN_ID", "CREDIT_CARD")


def scrub(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """Replace PII with `<TYPE>` placeholders; returns the new text and counts by type."""
    counts: dict[str, int] = {}
    for kind, pattern, validator in DETECTORS:
        if kind not in types:
            continue

        def replace(m: re.Match, kind: str = kind, validator=validator) -> str:
            if validator is not None and not validator(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return f"<{kind}>"

        text = pattern.sub(replace, text)
    return text, counts


@dataclass
class PiiConfig:
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))

    def build(self) -> PiiBlock:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        require(not unknown, f"pii.types has unknown {unknown}; choose from {', '.join(PII_TYPES)}")
        return PiiBlock(self)


class PiiBlock(Block):
    name = "pii"

    def __init__(self, cfg: PiiConfig):
        self.types = tuple(cfg.types)

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        doc.text, counts = scrub(doc.text, self.types)
        stats.edits.update(counts)
        if counts:
            stats.edits["documents_changed"] += 1
        return doc
