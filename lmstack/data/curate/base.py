"""Block protocol: a block turns a stream of documents into a stream of documents and counts what it did.

Filters only decide keep/drop, so they implement `reason_to_drop(doc) -> str | None`; the base class
does the counting. Transforming blocks (normalize, PII, HTML extraction) implement `apply(doc, stats)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lmstack.data.curate.document import BlockStats, Document


class Block:
    """A pipeline step. `name` is what the report shows and the prefix of every drop reason."""

    name = "block"

    def run(self, docs: Iterable[Document], stats: BlockStats) -> Iterator[Document]:
        for doc in docs:
            stats.seen += 1
            out = self.apply(doc, stats)
            if out is not None:
                stats.kept += 1
                yield out

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        """Return the (possibly edited) document, or None after `stats.drop(doc, reason)`."""
        raise NotImplementedError


class Filter(Block):
    """A keep/drop decision with a reason; the document passes through unchanged when kept."""

    def apply(self, doc: Document, stats: BlockStats) -> Document | None:
        reason = self.reason_to_drop(doc)
        if reason is None:
            return doc
        stats.drop(doc, reason)
        return None

    def reason_to_drop(self, doc: Document) -> str | None:
        raise NotImplementedError
