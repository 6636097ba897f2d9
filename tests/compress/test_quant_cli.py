"""`lmstack quantize` end to end on a tiny saved model: the output is a model reference; bad input exits 2."""

from __future__ import annotations

import pytest

from lmstack.cli import main
from lmstack.compress.int4 import Int4Linear
from lmstack.hub import load_model


def test_quantize_int4_cli_writes_a_loadable_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    args = ["quantize", "--model", str(tiny_dir), "--method", "int4", "--group-size", "32", "--out", str(out)]
    assert main(args) == 0
    assert "quantized (int4)" in capsys.readouterr().err
    model, tokenizer = load_model(out)
    assert isinstance(model.layers[1].ffn.down_proj, Int4Linear) and tokenizer is not None
    assert main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "int4", "--group-size", "48"], "multiple of 32"),
        (["--method", "int4", "--group-size", "128"], "does not divide"),
        (["--method", "nf4", "--group-size", "32"], "leave --group-size out"),
        (["--method", "int8", "--calib", "x.txt"], "--calib is for the calibrated"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tmp_path, capsys, args, message):
    assert main(["quantize", "--model", str(tiny_dir), "--out", str(tmp_path / "q"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()  # refused before any work or output


def test_quantizing_a_quantized_model_is_refused(tiny_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny_dir), "--method", "int8", "--out", str(tmp_path / "a")]) == 0
    assert main(["quantize", "--model", str(tmp_path / "a"), "--method", "int4", "--out", str(tmp_path / "b")]) == 2
    assert "already quantized" in capsys.readouterr().err
