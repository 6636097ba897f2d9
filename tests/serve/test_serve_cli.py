"""`lmstack serve` refuses bad arguments with one line and exit code 2, before serving anything."""

from __future__ import annotations

import socket

import pytest

from lmstack.cli import main


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "a={m}", "--ab", "x=a:1,b:2"], "--ab variant 'b' is not a served model"),
        (["--model", "a={m}", "--ab", "x=a:1"], "at least two variants"),
        (["--model", "a={m}", "--model", "a={m}"], "two models are named 'a'"),
        (["--model", "nope/none"], "not found"),
        (["--model", "a={m}", "--port", "70000"], "--port must be in 0..65535"),
        (["--model", "a={m}", "--embedding-model", "{m}"], "not an encoder"),
    ],
)
def test_bad_arguments(tiny_a, capsys, args, words):
    assert main(["serve", *(a.format(m=tiny_a) for a in args)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_port_in_use(tiny_a, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", tiny_a, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
