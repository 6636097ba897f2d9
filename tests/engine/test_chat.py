"""`lmstack chat`: each turn sees the whole conversation, /reset forgets it, long histories are trimmed."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch

from lmstack.cli import main
from lmstack.config import model_config
from lmstack.engine import chat, generate
from lmstack.engine.sampling import SamplingParams
from lmstack.errors import LmstackError
from lmstack.model import Transformer
from lmstack.model.io import save_model_dir
from lmstack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_model(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(1)
    model = Transformer(model_config("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, max_seq_len=256))
    return model.eval(), tok


def test_each_turn_is_prompted_with_the_whole_conversation(chat_model, monkeypatch, capsys):
    """The prompt of every turn is the chat template over all earlier turns, replies included."""
    model, tok = chat_model
    prompts: list[str] = []
    replies = iter(["Paris.", " It is the Seine. ", "Hello."])

    def fake_stream(model_, tok_, ids, params):
        prompts.append(tok.decode(ids, skip_special_tokens=False))
        yield next(replies)

    monkeypatch.setattr(generate, "load_for_inference", lambda *a: (model, tok))
    monkeypatch.setattr(chat, "stream_text", fake_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Capital of France?\nIts river?\n/reset\nHi\n/exit\nnever read\n"))
    assert main(["chat", "--model", "m", "--system", "Be brief."]) == 0

    system = {"role": "system", "content": "Be brief."}
    expected = [
        [system, {"role": "user", "content": "Capital of France?"}],
        [
            system,
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Its river?"},
        ],
        [system, {"role": "user", "content": "Hi"}],  # after /reset: only the system prompt is kept
    ]
    assert prompts == [tok.apply_chat_template(m, add_generation_prompt=True) for m in expected]
    out = capsys.readouterr()
    assert out.out == "Paris.\n It is the Seine. \nHello.\n"  # only replies on stdout
    assert "(history cleared)" in out.err


def test_cli_chat_streams_replies_and_exits_cleanly(chat_model, tmp_path):
    model, tok = chat_model
    save_model_dir(model, tmp_path / "m", tok)
    proc = subprocess.run(
        [sys.executable, "-m", "lmstack.cli", "chat", "--model", str(tmp_path / "m"), "--max-new-tokens", "4"],
        input="hello\nhow are you?\n",  # ends with EOF instead of /exit
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") >= 2 and "Traceback" not in proc.stderr


def test_fit_history_drops_oldest_turns_but_keeps_the_system_prompt(chat_model):
    _, tok = chat_model
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"message number {i} " * 20} for i, r in enumerate(["user", "assistant"] * 4)]
    messages, ids = chat.fit_history(
        tok, [system, *turns, {"role": "user", "content": "last"}], context=300, reserve=50
    )
    assert messages[0] == system and messages[-1]["content"] == "last"
    assert len(messages) < len(turns) + 2 and len(ids) + 50 <= 300
    with pytest.raises(LmstackError, match="write a shorter message"):
        chat.fit_history(tok, [system, {"role": "user", "content": "word " * 400}], context=300, reserve=50)


def test_chat_without_a_template_is_a_clear_error(chat_model):
    model, tok = chat_model
    plain = copy.copy(tok)
    plain.chat_template = None
    with pytest.raises(LmstackError, match="no chat template"):
        chat.chat_session(model, plain, SamplingParams(max_new_tokens=1), read_line=lambda _: "hi")
