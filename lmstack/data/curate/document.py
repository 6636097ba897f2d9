"""The unit of work (`Document`) and the mergeable counters every block writes (`BlockStats`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES_PER_REASON = 3  # dropped-document snippets kept per reason for the report
EXAMPLE_CHARS = 300
MAX_ERRORS_LISTED = 50  # reader/fetch errors listed per block; the count covers all of them


@dataclass
class Document:
    """One document. `metadata` holds provenance (source, file, url) and what blocks learned (language)."""

    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockStats:
    """What one block did: documents in/out, drops by reason, edits by kind, errors. Sums across shards."""

    name: str
    seen: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    edits: Counter = field(default_factory=Counter)  # e.g. PII replacements by type, lines removed
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, doc: Document, reason: str) -> None:
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"[{doc.id}] {doc.text[:EXAMPLE_CHARS]}")

    def error(self, message: str, reason: str) -> None:
        """A problem with the input (bad bytes, bad JSON line, failed URL): counted under `reason`, listed."""
        self.dropped[reason] += 1
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seen": self.seen,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "edits": dict(self.edits),
            "errors": self.errors,
            "error_count": self.error_count,
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockStats:
        return cls(
            name=values["name"],
            seen=values["seen"],
            kept=values["kept"],
            dropped=Counter(values["dropped"]),
            edits=Counter(values["edits"]),
            errors=list(values["errors"]),
            error_count=values["error_count"],
            examples={k: list(v) for k, v in values["examples"].items()},
        )

    def merge(self, other: BlockStats) -> None:
        self.seen += other.seen
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.edits.update(other.edits)
        self.error_count += other.error_count
        self.errors.extend(other.errors[: max(0, MAX_ERRORS_LISTED - len(self.errors))])
        for reason, shown in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[: max(0, MAX_EXAMPLES_PER_REASON - len(mine))])


def merge_stats(per_shard: list[list[dict[str, Any]]]) -> list[BlockStats]:
    """Sum block stats of many shards, keeping block order (first appearance)."""
    merged: dict[str, BlockStats] = {}
    for shard in per_shard:
        for values in shard:
            stats = BlockStats.from_dict(values)
            if stats.name in merged:
                merged[stats.name].merge(stats)
            else:
                merged[stats.name] = stats
    return list(merged.values())
