"""compress-report: variants built and measured in their own processes; table, CSV and PNG written."""

from __future__ import annotations

import csv

import pytest

from lmstack.cli import main
from lmstack.compress.report import COLUMNS, parse_methods
from lmstack.errors import LmstackError
from lmstack.model.io import save_model_dir
from tests.eval.tiny import tiny_model, tiny_tokenizer


@pytest.mark.nightly  # builds and measures every variant of a model in fresh processes
def test_report_builds_measures_and_writes_table_csv_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMSTACK_KERNELS", "torch")  # no kernel build inside the test's subprocesses
    tok = tiny_tokenizer()
    save_model_dir(tiny_model(vocab_size=tok.vocab_size, max_seq_len=512), tmp_path / "m", tok)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(["The harbour town woke slowly on winter mornings."] * 800), encoding="utf-8")
    out = tmp_path / "rep"
    argv = ["compress-report", "--model", str(tmp_path / "m"), "--methods", "fp32,int8,pruned", "--out", str(out)]
    assert main([*argv, "--calib", str(calib), "--limit", "2", "--decode-tokens", "4"]) == 0
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["variant"] for r in rows] == ["fp32", "int8", "pruned"]
    assert float(rows[1]["size_mb"]) < 0.5 * float(rows[0]["size_mb"])  # int8 stores a quarter of fp32's bytes
    assert float(rows[0]["agreement"]) == 1.0  # fp32 against its own continuations
    assert all(float(r["decode_tps"]) > 0 and float(r["peak_ram_mb"]) > 0 for r in rows)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "report.md").read_text()
    assert table.splitlines()[0].count("|") == len(COLUMNS) + 1 and "| pruned |" in table
    assert "| int8 |" in capsys.readouterr().out


def test_unknown_method_is_a_clear_error():
    with pytest.raises(LmstackError, match="unknown compress-report method"):
        parse_methods("fp32,int3")
    assert main(["compress-report", "--model", "nowhere", "--methods", "fp32", "--out", "/tmp/x"]) == 2


def test_peak_rss_counts_this_process_only(tmp_path):
    # A child started by a parent holding ~800 MB must not report the parent's memory as its own
    # (ru_maxrss does on Linux: the fork copies the parent's high-water mark).
    import subprocess
    import sys

    code = (
        "import subprocess, sys, torch; held = torch.ones(200_000_000); "
        "print(subprocess.run([sys.executable, '-c', 'from lmstack.compress.report import peak_rss_mb; "
        "print(peak_rss_mb())'], capture_output=True, text=True, check=True).stdout)"
    )
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 10 < child_mb < 700  # torch alone is ~300 MB; with the parent's it would be over 1000
