"""Each curation filter on literal documents: the drop reason it records, and what it keeps."""

from __future__ import annotations

import pytest

from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.filters import (
    BadWordsConfig,
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    LengthConfig,
)
from lmstack.data.curate.normalize import HtmlExtractConfig, NormalizeConfig
from lmstack.errors import LmstackError

GOOD_EN = (
    "The river town grew slowly over the nineteenth century, and its people learned to live with the floods.\n"
    "Every spring the water rose to the steps of the church, and the farmers moved their animals to the hills.\n"
    "Merchants built their houses on stone foundations that have lasted to this day.\n"
    "When the railway arrived in 1871, the town became a market for the whole valley.\n"
    "Today the old warehouses hold a museum, a library and a school for young musicians.\n"
    "Visitors come in the summer to walk along the embankment and to watch the boats pass by."
)
GOOD_ZH = (
    "我们的城市在河边慢慢地发展起来了。每年春天，河水都会上涨，农民们就把牲畜赶到山上去。\n"
    "商人们在石头的地基上建造了他们的房子，这些房子一直保存到了今天。\n"
    "铁路通车以后，这里成为了整个山谷的市场，人们在这里买卖粮食和布匹。\n"
    "现在，旧仓库里有一座博物馆、一座图书馆和一所音乐学校，夏天有很多游客来这里散步。"
)


def run(block, text: str, doc_id: str = "d", **metadata) -> tuple[Document | None, BlockStats]:
    stats = BlockStats(block.name)
    out = list(block.run([Document(text=text, id=doc_id, metadata=dict(metadata))], stats))
    return (out[0] if out else None), stats


def reason(block, text: str, doc_id: str = "d", **metadata) -> str | None:
    doc, stats = run(block, text, doc_id, **metadata)
    return None if doc is not None else next(iter(stats.dropped))


# --- Gopher quality ---


def test_gopher_quality_keeps_prose_and_names_each_rule():
    gq = GopherQualityConfig().build()
    assert reason(gq, GOOD_EN) is None
    assert reason(gq, "Too short to be a document.") == "too_few_words"
    assert reason(gq, " ".join(["a b c d e f g h"] * 20)) == "avg_word_length_too_short"
    assert reason(gq, " ".join(["internationalization"] * 60)) == "avg_word_length_too_long"
    hashes = GOOD_EN + " " + " ".join(["#tag"] * 20)
    assert reason(gq, hashes) == "hash_word_ratio"
    bullets = "\n".join(f"• item number {i} of the big list with the names" for i in range(60))
    assert reason(gq, bullets) == "bullet_lines_ratio"
    ellipsis_lines = "\n".join(f"Read more about the story number {i} and the rest of it..." for i in range(20))
    assert reason(gq, ellipsis_lines) in ("ellipsis_lines_ratio", "ellipsis_word_ratio")
    numbers = " ".join(str(i * 7919) for i in range(100)) + " the and of to"
    assert reason(gq, numbers) == "alpha_words_ratio"
    no_stop = " ".join(["apple banana cherry orange lemon melon grape"] * 10)
    assert reason(gq, no_stop) == "too_few_stop_words"


def test_gopher_quality_is_chinese_aware():
    gq = GopherQualityConfig().build()
    assert reason(gq, GOOD_ZH) is None  # characters count as words; no average-word-length rule
    assert reason(gq, "床前明月光，疑是地上霜。") == "too_few_words"
    no_stop_words = "床前明月光疑似地上霜举头望明月低头思故乡" * 4
    assert reason(gq, no_stop_words) == "too_few_stop_words"


# --- Gopher repetition ---


def test_gopher_repetition_reasons():
    gr = GopherRepetitionConfig().build()
    assert reason(gr, GOOD_EN) is None
    assert reason(gr, "\n\n".join(["Same paragraph here with several words."] * 4 + ["Another one."])) == (
        "dup_para_frac"
    )
    lines = "\n".join(["Buy now and save money today."] * 5 + [f"Unique line {i} about things." for i in range(6)])
    assert reason(gr, lines) == "dup_line_frac"
    top2 = GOOD_EN + " " + "click here " * 60
    assert reason(gr, top2) == "top_2_gram"
    # many different repeated 5-grams, none dominant: the duplicated n-gram rule fires
    chunks = [f"alpha{i} beta{i} gamma{i} delta{i} epsilon{i}" for i in range(30)]
    assert reason(gr, " ".join(chunks + chunks)) == "duplicated_5_grams"


# --- C4 ---


def test_c4_removes_bad_lines_and_drops_thin_pages():
    c4 = C4Config().build()
    page = GOOD_EN + "\nShare this\nPlease enable JavaScript to view the comments.\nRead our privacy policy here."
    doc, stats = run(c4, page)
    assert doc is not None and "Share this" not in doc.text and "JavaScript" not in doc.text
    assert "privacy policy" not in doc.text
    assert stats.edits["lines_removed"] == 3
    assert reason(c4, GOOD_EN + "\nLorem ipsum dolor sit amet.") == "lorem_ipsum"
    # "{" and "lorem ipsum" cost the page only on lines that survive the line rules (C4's code, datatrove)
    assert reason(c4, GOOD_EN + "\nIn code, a block such as { x = 1 } is written with braces.") == "curly_bracket"
    assert reason(c4, GOOD_EN + "\nfunction f() { return 1; }") is None  # no end mark: the line goes first
    assert reason(c4, GOOD_EN + "\nlorem ipsum") is None
    assert reason(c4, "One sentence only here.\nAnd another one here.") == "too_few_sentences"
    cited = run(c4, GOOD_EN.replace("floods.", "floods.[1]"))[0]
    assert "[1]" not in cited.text


def test_c4_chinese_terminal_punctuation():
    c4 = C4Config(min_sentences=3).build()
    doc, _ = run(c4, GOOD_ZH)
    assert doc is not None and doc.text.count("\n") == 3  # full-width "。" ends lines: all four kept


def test_c4_counts_chinese_sentences_without_spaces():
    one_paragraph = GOOD_ZH.replace("\n", "")  # five sentences, no space or newline after any "。"
    assert reason(C4Config().build(), one_paragraph) is None  # default needs 5 sentences
    assert reason(C4Config().build(), "我们的城市在河边。河水上涨了。") == "too_few_sentences"


# --- FineWeb ---


def test_fineweb_three_rules():
    fw = FineWebConfig().build()
    assert reason(fw, GOOD_EN) is None
    no_punct = "\n".join(f"Menu item number {i} for the navigation of this big website" for i in range(10))
    assert reason(fw, no_punct) == "line_punct_ratio"
    dup = GOOD_EN + "\n" + "\n".join(["This sentence repeats itself several times here."] * 3)
    assert reason(fw, dup) == "char_dup_ratio"
    short = "\n".join([f"Short {i}." for i in range(8)] + [GOOD_EN.splitlines()[0]])
    assert reason(fw, short) == "short_line_ratio"


def test_fineweb_thresholds_are_inclusive_as_published():
    # exactly 0.12 of lines ending in punctuation drops (the rule is <=); 2 of 17 = 0.1176
    lines = [f"Heading number {i} without an end mark for this page" for i in range(15)]
    text = "\n".join(lines + ["A full sentence that ends properly here.", "Another proper sentence here."])
    assert reason(FineWebConfig().build(), text) == "line_punct_ratio"


def test_fineweb_chinese_full_width_punctuation_counts():
    assert reason(FineWebConfig(short_line_length=10).build(), GOOD_ZH) is None


# --- Length, language ---


def test_length_bounds():
    lf = LengthConfig(min_chars=50, max_chars=1000, min_words=10).build()
    assert reason(lf, "tiny") == "too_short_chars"
    assert reason(lf, "x" * 2000) == "too_long_chars"
    assert reason(lf, "word " * 3 + "y" * 60) == "too_short_words"
    assert reason(lf, GOOD_EN[:500]) is None


def test_language_labels_and_filters():
    keep_en = LanguageConfig(languages=["en"], min_score=0.5).build()
    doc, _ = run(keep_en, GOOD_EN)
    assert doc.metadata["language"] == "en" and doc.metadata["language_score"] > 0.9
    assert reason(keep_en, GOOD_ZH) == "language_zh"
    assert reason(LanguageConfig(min_score=0.99).build(), "ok ok 123 hmm") == "low_language_score"
    doc, _ = run(LanguageConfig(languages=["zh"], min_score=0.5).build(), GOOD_ZH)
    assert doc.metadata["language"] == "zh"


# --- Normalization and extraction ---


def test_normalize_fixes_mojibake_controls_and_whitespace():
    block = NormalizeConfig(form="NFKC").build()
    doc, stats = run(block, "The cafÃ© is open.\x00\x07  Two   spaces\u200b.\r\n\n\n\n\nＦｕｌｌ width.")
    assert doc.text == "The café is open. Two spaces.\n\nFull width."
    assert stats.edits["mojibake_fixed"] == 1 and stats.edits["documents_changed"] == 1
    assert reason(block, " \x00 \n ") == "empty_after_normalize"
    nfc = NormalizeConfig(form="NFC").build()
    assert run(nfc, "全角标点，保留。")[0].text == "全角标点，保留。"


def test_html_extract_main_text_and_no_text():
    block = HtmlExtractConfig().build()
    body = " ".join(f"<p>{line}</p>" for line in GOOD_EN.splitlines())
    html = f"<html><head><title>T</title></head><body><nav>Home | About</nav><article>{body}</article></body></html>"
    doc, _ = run(block, html, format="html")
    assert "railway arrived in 1871" in doc.text and "<p>" not in doc.text and "Home | About" not in doc.text
    assert reason(block, "<html><body><script>var x;</script></body></html>", format="html") == "no_main_text"
    assert run(block, "plain text passes through")[0].text == "plain text passes through"


@pytest.mark.parametrize("bad", [{"form": "NFD"}])
def test_bad_block_option_is_a_clear_error(bad):
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="normalize.form"):
        NormalizeConfig(**bad).build()


# --- C4 bad words ---


def test_badwords_whole_words_cjk_substrings_and_keep_fraction(tmp_path):
    (tmp_path / "words.txt").write_text("# a comment line\nbadword\nrude phrase\n坏词\n")
    bw = BadWordsConfig(words_files=["words.txt"]).build(tmp_path)
    assert reason(bw, "This has a BadWord in it.") == "bad_word"
    assert reason(bw, "A rude phrase here.") == "bad_word"
    assert reason(bw, "这里有一个坏词。") == "bad_word"  # no spaces in Chinese: substring match
    assert reason(bw, "badwordsmith and notbadword are other words") is None  # whole words only
    assert reason(bw, "a comment line") is None  # comments are not words
    flagged = [f"badword number {i}" for i in range(400)]
    keep_some = BadWordsConfig(words_files=["words.txt"], keep_fraction=0.25).build(tmp_path)
    kept = [t for i, t in enumerate(flagged) if reason(keep_some, t, f"doc-{i}") is None]
    assert 60 < len(kept) < 140  # about a quarter, the same ones on every run
    assert kept == [t for i, t in enumerate(flagged) if reason(keep_some, t, f"doc-{i}") is None]


def test_badwords_needs_an_existing_list(tmp_path):
    with pytest.raises(LmstackError, match="badwords needs `words_files:`"):
        BadWordsConfig().build(tmp_path)
    with pytest.raises(LmstackError, match="not found; fix badwords.words_files"):
        BadWordsConfig(words_files=["missing.txt"]).build(tmp_path)


def test_ngram_repetition_measures_equal_the_string_algorithm():
    """The hashed, vectorised n-gram measures give exactly what Gopher's string loop gives."""
    import random
    from collections import Counter

    from lmstack.data.curate.filters import _NGrams

    def top_chars(tokens, n):
        grams = [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        if not grams:
            return 0
        gram, count = Counter(grams).most_common(1)[0]
        return len(gram) * count

    def dup_chars(tokens, n):
        seen, repeated, i = set(), 0, 0
        while i < len(tokens) - n + 1:
            gram = tuple(tokens[i : i + n])
            if gram in seen:
                repeated += sum(map(len, gram))
                i += n
            else:
                seen.add(gram)
                i += 1
        return repeated

    rng = random.Random(3)
    for trial in range(200):
        vocab = [rng.choice(["a", "bb", "ccc", "dddd", "the", "x"]) + str(k) for k in range(rng.randint(1, 12))]
        tokens = rng.choices(vocab, k=rng.randint(0, 120))
        if trial % 3 == 0:  # long verbatim repeats
            tokens = tokens[:30] * 3 + tokens[30:]
        grams = _NGrams(tokens)
        for n in range(1, 11):
            assert grams.top_ngram_chars(n) == top_chars(tokens, n), (trial, n)
            assert grams.duplicated_ngram_chars(n) == dup_chars(tokens, n), (trial, n)
