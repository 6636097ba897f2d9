"""lmstack.eval: perplexity/bits per byte, multiple-choice log-likelihood, greedy agreement, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmstack.cli import main
from lmstack.errors import LmstackError
from lmstack.eval import evaluate
from lmstack.eval.agreement import ReferenceContinuations, default_prompts, greedy_agreement
from lmstack.eval.tasks import (
    Item,
    builtin_task_names,
    choice_loglikelihoods,
    encode_pair,
    load_task,
    parse_task_lines,
    score_task,
)
from lmstack.eval.text import heldout_texts, perplexity, start_token
from lmstack.model.io import save_model_dir
from tests.eval.tiny import tiny_model, tiny_tokenizer


def model_for(tokenizer, seed: int = 0, **overrides):
    return tiny_model(seed, vocab_size=tokenizer.vocab_size, **overrides)


def test_uniform_model_has_perplexity_equal_to_vocab_and_exact_bits_per_byte():
    tok = tiny_tokenizer()
    model = model_for(tok, tie_embeddings=False)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: the uniform distribution
    texts = heldout_texts()
    result = perplexity(model, tok, texts, window=48, stride=16)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    assert result["tokens"] == n_tokens  # every token scored exactly once despite the overlapping windows
    assert result["ppl"] == pytest.approx(tok.vocab_size, rel=1e-5)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result["bpb"] == pytest.approx(n_tokens * math.log2(tok.vocab_size) / n_bytes, rel=1e-5)


def test_sliding_window_scores_match_a_direct_forward_when_everything_fits():
    tok = tiny_tokenizer()
    model = model_for(tok)
    text = heldout_texts()[0][:80]
    ids = [start_token(tok), *tok.encode(text)]
    assert len(ids) < 60
    with torch.no_grad():
        direct = float(model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).lm_loss)
    assert perplexity(model, tok, [text], window=63)["nll"] == pytest.approx(direct, rel=1e-5)


def test_choice_loglikelihoods_equal_manual_sums_of_continuation_log_probs():
    tok = tiny_tokenizer()
    model = model_for(tok, seed=3)
    items = [
        Item("a", "The harbour town woke ", ("slowly", "quickly on"), 0),
        Item("b", "计算机用", ("二进制", "十"), 0),
    ]
    got = choice_loglikelihoods(model, tok, items)
    for item, row in zip(items, got, strict=True):
        for choice, value in zip(item.choices, row, strict=True):
            context_ids, cont_ids = encode_pair(tok, item.context, choice)
            ids = torch.tensor([context_ids + cont_ids])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            manual = sum(float(logp[len(context_ids) - 1 + k, t]) for k, t in enumerate(cont_ids))
            assert value == pytest.approx(manual, abs=1e-4)


def test_encode_pair_moves_trailing_whitespace_into_the_continuation():
    tok = tiny_tokenizer()
    context_ids, cont_ids = encode_pair(tok, "The bread ", "rises")
    assert tok.decode(context_ids[1:]) == "The bread"
    assert tok.decode(cont_ids) == " rises"


def test_acc_and_acc_norm_follow_the_log_likelihoods(monkeypatch):
    tok = tiny_tokenizer()
    items = [Item("1", "x", ("a", "bbbbbbbb"), 1), Item("2", "y", ("cc", "d"), 0)]
    fake = [[-1.0, -4.0], [-2.0, -1.5]]  # raw sums pick the wrong choice twice, per-character sums never
    monkeypatch.setattr("lmstack.eval.tasks.choice_loglikelihoods", lambda *a, **k: fake)
    result = score_task(None, tok, items)
    assert result == {"acc": 0.0, "acc_norm": 1.0, "n": 2}


def test_builtin_tasks_are_bilingual_and_well_formed():
    names = builtin_task_names()
    assert {n.rsplit("_", 1)[1] for n in names} == {"en", "zh"}
    total = 0
    for name in names:
        _, items = load_task(name)
        total += len(items)
        assert len({i.id for i in items}) == len(items)
    assert total >= 200


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"context": "a", "choices": ["x", "y"], "answer": 0', "not valid JSON"),
        ('{"context": "a", "choices": ["x"], "answer": 0}', "at least two"),
        ('{"context": "a", "choices": ["x", "y"], "answer": 2}', "'answer' must be an integer index"),
        ('{"context": 3, "choices": ["x", "y"], "answer": 0}', "'context' must be a string"),
        ('["a", "b"]', "must be a JSON object"),
    ],
)
def test_malformed_task_row_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "answer": 1}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LmstackError, match=rf"mine\.jsonl:3: .*{problem}"):
        load_task(str(path))


def test_unknown_task_and_missing_reference_are_clear_errors():
    tok = tiny_tokenizer()
    with pytest.raises(LmstackError, match="unknown task 'nope'"):
        evaluate(model_for(tok), ["nope"], tokenizer=tok)
    with pytest.raises(LmstackError, match="--reference"):
        evaluate(model_for(tok), ["agreement"], tokenizer=tok)
    with pytest.raises(LmstackError, match="not valid JSON"):
        parse_task_lines(["{"], "inline")


def test_greedy_agreement_is_one_against_itself_and_lower_against_another_model():
    tok = tiny_tokenizer()
    model, other = model_for(tok, seed=1, tie_embeddings=False), model_for(tok, seed=2, tie_embeddings=False)
    reference = ReferenceContinuations.generate(model, tok, default_prompts()[:3], max_new_tokens=8)
    assert greedy_agreement(model, reference) == {"token_agreement": 1.0, "prefix_agreement": 1.0, "tokens": 24}
    assert greedy_agreement(other, reference)["token_agreement"] < 0.5
    with pytest.raises(LmstackError, match="one vocabulary"):
        greedy_agreement(tiny_model(vocab_size=tok.vocab_size + 1), reference)


def test_evaluate_a_model_reference_and_the_cli(tmp_path, capsys):
    tok = tiny_tokenizer()
    save_model_dir(model_for(tok), tmp_path / "m", tok)
    results = evaluate(str(tmp_path / "m"), "ppl,knowledge_en,arithmetic_zh", limit=5, device="cpu")
    assert set(results) == {"ppl", "knowledge_en", "arithmetic_zh", "mc_average"}
    assert results["knowledge_en"]["n"] == 5 and 0 <= results["knowledge_en"]["acc"] <= 1
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tmp_path / "m"), "--tasks", "ppl,commonsense_zh,agreement", "--limit", "4"]
    code = main([*argv, "--reference", str(tmp_path / "m"), "--out", str(out), "--device", "cpu"])
    assert code == 0
    saved = json.loads(out.read_text())["results"]
    assert saved["agreement"]["token_agreement"] == 1.0  # the model against itself
    assert "commonsense_zh" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.slow
def test_smollm2_scores_well_above_chance_on_english_knowledge():
    results = evaluate("smollm2-135m-instruct", ["knowledge_en", "ppl"], limit=40, device="cpu")
    assert results["knowledge_en"]["acc"] >= 0.6  # 4 choices: chance is 0.25
    assert results["ppl"]["bpb"] < 2.0
