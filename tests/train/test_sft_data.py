"""SFT data: the three formats, the assistant-only loss mask, packing without cross-document attention,
and clear errors for bad rows and missing chat templates."""

from __future__ import annotations

import json

import pytest
import torch

from lmstack.data.sft import (
    check_chat_template,
    make_example,
    pack,
    read_conversations,
    render,
    use_chatml,
)
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5. Because 2 + 3 = 5."},
    {"role": "user", "content": "和 4 相乘呢？"},
    {"role": "assistant", "content": "20。因为 5 × 4 = 20。"},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return str(path)


def test_mask_covers_exactly_the_assistant_turns(tokenizer):
    ids, mask = render(tokenizer, CONVERSATION)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    # Trained text: each assistant reply with its end-of-turn marker, nothing of the user or system turns.
    assert tokenizer.decode(trained) == "5. Because 2 + 3 = 5.<|im_end|>\n20。因为 5 × 4 = 20。<|im_end|>\n"
    spans = [(i, m) for i, m in enumerate(mask)]
    first_trained = next(i for i, m in spans if m)
    assert tokenizer.decode(ids[:first_trained]).endswith("<|im_start|>assistant\n")


def test_targets_are_shifted_and_masked(tokenizer):
    ids, mask = render(tokenizer, CONVERSATION)
    ex = make_example(ids, mask, seq_len=512)
    assert len(ex.inputs) == len(ids) - 1
    kept = ex.targets[ex.targets != -100]
    assert kept.tolist() == [t for t, m in zip(ids[1:], mask[1:], strict=True) if m]


def test_three_formats_read_alike(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"instruction": "Hi", "input": "", "output": "Hello"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Translate", "input": "猫", "output": "cat", "system": "Be brief."},
    ]
    conversations = read_conversations(_write(tmp_path / "d.jsonl", rows))
    assert conversations[0] == conversations[1] == conversations[2]
    assert conversations[3] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\n猫"},
        {"role": "assistant", "content": "cat"},
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "Hi"}, r"d.jsonl:2: row has no 'output' field"),
        ({"messages": [{"role": "user"}]}, r"d.jsonl:2 messages\[0\]: row has no 'content' field"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"d.jsonl:2: conversations\[0\] 'from' is 'bot'"),
        ({"text": "plain"}, r"d.jsonl:2: row has none of 'messages'"),
        ({"messages": [{"role": "user", "content": "x"}]}, r"d.jsonl:2: the conversation has no assistant"),
        ("{broken", r"d.jsonl:2: not valid JSON"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"instruction": "a", "output": "b"}
    with pytest.raises(LmstackError, match=message):
        read_conversations(_write(tmp_path / "d.jsonl", [good, row]))


def test_missing_chat_template_is_a_clear_error(tokenizer_dir):
    plain = Tokenizer.load(tokenizer_dir)
    plain.chat_template = None
    with pytest.raises(LmstackError, match="has no chat template"):
        check_chat_template(plain, "my-model")
    use_chatml(plain)  # our tokenizers have the ChatML tokens, so chatml can be asked for
    assert plain.chat_template


def test_chatml_needs_its_tokens(tokenizer):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(models.BPE())
    with pytest.raises(LmstackError, match="needs the tokens"):
        use_chatml(Tokenizer(backend, chat_template=None))


def test_packed_rows_do_not_attend_across_documents(tokenizer):
    """A packed row gives every document exactly the logits it gets alone (positions and masks reset)."""
    from lmstack.config import ModelConfig
    from lmstack.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    ).eval()
    convs = [CONVERSATION[:3], [{"role": "user", "content": "猫"}, {"role": "assistant", "content": "cat"}]]
    examples = [make_example(*render(tokenizer, c), seq_len=256) for c in convs]
    rows = pack(examples, seq_len=sum(len(e.inputs) for e in examples) + 3, pad_id=0)
    assert len(rows) == 1 and rows.fill < 1.0
    batch = rows.batch([0])
    with torch.no_grad():
        packed = model(batch["inputs"], cache=batch["cache"]).logits[0]
        at = 0
        for ex in sorted(examples, key=lambda e: -len(e.inputs)):  # first-fit-decreasing order
            alone = model(torch.from_numpy(ex.inputs)[None]).logits[0]
            torch.testing.assert_close(packed[at : at + len(ex.inputs)], alone, atol=1e-5, rtol=1e-5)
            at += len(ex.inputs)


def test_packing_fills_rows(tokenizer):
    from lmstack.data.demo import INSTRUCTIONS

    convs = read_conversations(INSTRUCTIONS)
    assert len(convs) >= 250
    examples = [make_example(*render(tokenizer, c), seq_len=256) for c in convs]
    packed, unpacked = pack(examples, 256, 0, packing=True), pack(examples, 256, 0, packing=False)
    assert len(unpacked) == len(examples) and len(packed) < len(unpacked) / 2
    assert packed.fill > 0.9
    assert sorted(packed.targets[packed.targets != -100].tolist()) == sorted(
        unpacked.targets[unpacked.targets != -100].tolist()
    )


def test_trained_logits_only_gives_the_same_loss_and_gradients():
    """SFT runs lm_head only where a target is trained: same loss, same gradients as the full head."""
    from lmstack.config import ModelConfig
    from lmstack.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64))
    x = torch.randint(0, 256, (2, 16))
    y = x.roll(-1, dims=1)
    y[:, :10] = -100
    results = []
    for sparse in (False, True):
        out = model(x, y, trained_logits_only=sparse)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
