"""Keep/drop agreement with datatrove (the reference implementation of the Gopher, C4 and FineWeb rules).

Both run on the same documents: real English prose and docstrings (the built-in stdlib corpus) plus planted
cases for every rule, the technical text that a naive word splitter gets wrong (URLs, paths, "e.g.",
"Node.js", "and/or", underlines) among them. FineWeb's duplicate-line character ratio is set to the
paper's 0.1 on both sides (lmstack's default; datatrove's code default is 0.01: a documented difference).
"""

from __future__ import annotations

import json
import random

import pytest

from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.filters import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig

pytestmark = pytest.mark.slow  # ~40 s on 2 idle cores: both implementations over 1,172 documents

PROSE = (
    "The library keeps a small cache of compiled patterns, so calling the same function twice is cheap. "
    "When the cache is full, the oldest entries are dropped and compiled again on demand. "
    "Most programs never notice this, and the defaults work well for scripts and for servers alike."
)
TECHNICAL = (
    "Install the package with pip, e.g. `pip install tool`, and read https://example.com/docs/setup.html first. "
    "The config lives in /etc/tool/config.yaml and/or ~/.config/tool.yaml, and Node.js users can call it too. "
    "It doesn't need root, and the logs go to /var/log/tool/ by default.\n"
    "Usage\n------\n"
    "Run the tool with a file name and it prints a summary of what it found, line by line, to the terminal."
)


def planted_documents() -> list[str]:
    rng = random.Random(0)
    words = PROSE.replace(",", "").replace(".", "").split()
    docs = [
        TECHNICAL * 2,
        PROSE + "\n" + "\n".join(f"- item {i} of the list" for i in range(40)),  # bullets
        PROSE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        PROSE + "\nA set literal such as {1, 2} is written with braces.",
        PROSE + "\nfunction f() { return 1; }",
        "\n".join([PROSE] * 4),  # repeated lines
        PROSE + " " + " ".join(["buy now"] * 40) + ".",  # a repeated bigram
        PROSE + "\n" + "\n".join(["Read more..."] * 12),  # ellipsis lines
        "#" * 40 + " " + PROSE,
        "\n".join(rng.sample(words, 6)) + "\n" + PROSE,
        "Short page.",
        PROSE + "\nPlease enable JavaScript to continue.\nWe use cookies; see our privacy policy.",
    ]
    docs += [" ".join(rng.choices(words, k=rng.randint(30, 300))) + "." for _ in range(40)]
    docs += [". ".join(" ".join(rng.choices(words, k=8)) for _ in range(rng.randint(2, 9))) + "." for _ in range(40)]
    return docs


@pytest.fixture(scope="module")
def corpus(corpus_file) -> list[str]:
    texts = [json.loads(line)["text"] for line in corpus_file.open()]
    return texts + planted_documents()


def ours_keep(block, text: str) -> bool:
    return block.apply(Document(text, "d"), BlockStats(block.name)) is not None


def theirs_keep(block, text: str) -> bool:
    from datatrove.data import Document as DatatroveDocument

    verdict = block.filter(DatatroveDocument(text=text, id="d"))
    return verdict if isinstance(verdict, bool) else bool(verdict[0])


def blocks():
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [
        ("gopher_repetition", GopherRepetitionConfig().build(), GopherRepetitionFilter()),
        ("gopher_quality", GopherQualityConfig().build(), GopherQualityFilter()),
        ("c4", C4Config().build(), C4QualityFilter()),
        ("fineweb", FineWebConfig().build(), FineWebQualityFilter(char_duplicates_ratio=0.1)),
    ]


@pytest.mark.parametrize("name", ["gopher_repetition", "gopher_quality", "c4", "fineweb"])
def test_keep_drop_agrees_with_datatrove(corpus, name):
    pytest.importorskip("datatrove")
    ours, theirs = next((o, t) for n, o, t in blocks() if n == name)
    disagree = [text for text in corpus if ours_keep(ours, text) != theirs_keep(theirs, text)]
    agreement = 1 - len(disagree) / len(corpus)
    kept = sum(ours_keep(ours, text) for text in corpus)
    print(f"{name}: agreement {agreement:.4f} on {len(corpus)} documents, lmstack keeps {kept}")
    assert 0 < kept < len(corpus)  # the corpus exercises both outcomes
    assert agreement >= 0.98, [t[:200] for t in disagree[:5]]


def test_c4_output_text_matches_datatrove(corpus):
    """Where both keep a page, C4's line removal leaves the same text."""
    pytest.importorskip("datatrove")
    from datatrove.data import Document as DatatroveDocument
    from datatrove.pipeline.filters import C4QualityFilter

    ours, theirs = C4Config().build(), C4QualityFilter()
    same = total = 0
    for text in corpus:
        doc = ours.apply(Document(text, "d"), BlockStats("c4"))
        reference = DatatroveDocument(text=text, id="d")
        verdict = theirs.filter(reference)
        if doc is not None and (verdict if isinstance(verdict, bool) else verdict[0]):
            total += 1
            same += doc.text == reference.text
    assert total > 20 and same == total
