"""Byte-level BPE: exact round trips in any script, special tokens, chat template, HF compatibility."""

from __future__ import annotations

import json

import pytest

from lmstack.errors import LmstackError
from lmstack.tokenizer import EOS, IM_END, Tokenizer, train_tokenizer, train_tokenizer_from_files

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "混合 scripts: English, 中文, русский, العربية, हिन्दी, 日本語のテキスト",
    "emoji 🤖🚀👩‍👩‍👧‍👦 and flags 🇨🇳🇺🇸",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n    indented = {'a': [1, 2, 3]}\r\n",
    "   leading and trailing spaces   ",
    "numbers 1234567890 3.14159 -42 1e-10",
    "special-looking text <|eos|> inside",
    "\x00\x01 control bytes and \u200b zero width",
    "",
]


@pytest.fixture(scope="module")
def trained(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_round_trip_property(trained):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.text())
    def check(text):
        assert trained.decode(trained.encode(text)) == text

    check()


@pytest.mark.parametrize("vocab_size", [300, 1024])
def test_fast_encoder_gives_the_ids_of_tokenizers(corpus_file, vocab_size):
    """Encoding goes through tiktoken for tokenizers trained here; it must match `tokenizers` id for id,
    on real text and on adversarial strings glued from random vocabulary pieces."""
    import random

    docs = [json.loads(line)["text"] for line in corpus_file.open(encoding="utf-8")]
    tok = train_tokenizer(iter(docs[:400] + SAMPLES), vocab_size)
    assert tok.fast_encoder is not None
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    rng = random.Random(vocab_size)
    glued = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(2000)]
    texts = docs[400:900] + SAMPLES + glued + ["<|im_start|>user\nhi<|im_end|>\n"]
    expected = [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts[-50:]] == expected[-50:]


def test_foreign_pre_tokenizers_encode_with_tokenizers(trained):
    """Another split pattern (here GPT-2's ByteLevel regex) must not use the tiktoken path."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(trained.backend.to_str())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other = Tokenizer(backend)
    assert other.fast_encoder is None
    assert other.encode("Hello  world\n\n x") == backend.encode("Hello  world\n\n x").ids


def test_compresses_real_text(trained, corpus_file):
    text = "".join(json.loads(line)["text"] for line in corpus_file.read_text().splitlines()[:50])
    assert len(text.encode("utf-8")) / len(trained.encode(text)) > 2.0  # bytes per token: merges were learned


def test_special_tokens_and_chat_template(trained):
    assert trained.eos_id is not None and trained.bos_id is not None and trained.pad_id is not None
    assert trained.token_to_id(EOS) == trained.eos_id
    assert trained.token_to_id(IM_END) in trained.stop_ids
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = trained.apply_chat_template(messages)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    ids = trained.encode(rendered)
    assert ids.count(trained.token_to_id("<|im_start|>")) == 5  # markers are single tokens


def test_saved_tokenizer_loads_in_transformers_identically(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLES[:5]:
        assert hf.encode(text, add_special_tokens=False) == trained.encode(text)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == trained.apply_chat_template(
        messages
    )


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(LmstackError, match="too small"):
        train_tokenizer(["some text"], vocab_size=100)


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        train_tokenizer_from_files([tmp_path / "nope.txt"], 1000, tmp_path / "tok")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LmstackError, match="empty"):
        train_tokenizer_from_files([empty], 1000, tmp_path / "tok")
    with pytest.raises(LmstackError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_reads_txt_jsonl_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("alpha beta gamma " * 50)
    (tmp_path / "src" / "b.md").write_text("# delta\n\nepsilon zeta " * 50)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} eta theta"}) for i in range(50)))
    pq.write_table(pa.table({"text": ["iota kappa lambda"] * 50}), tmp_path / "d.parquet")
    tok = train_tokenizer_from_files(
        [tmp_path / "src", tmp_path / "c.jsonl", tmp_path / "d.parquet"], 400, tmp_path / "t"
    )
    vocab = tok.backend.get_vocab()
    for word in ("alpha", "epsilon", "theta", "kappa"):
        assert "Ġ" + word in vocab or word in vocab  # each source contributed merges


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(LmstackError, match=r"bad.jsonl:2"):
        train_tokenizer_from_files([bad], 400, tmp_path / "t")
