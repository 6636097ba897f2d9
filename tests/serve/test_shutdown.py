"""SIGTERM: in-flight requests finish within the grace period, or end cleanly after it; exit code 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest


def start_server(model_dir: str, grace: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", f"tiny={model_dir}", "--port", "0"]
    cmd += ["--shutdown-timeout", str(grace), "--kv-cache-mb", "8"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        found = re.search(r"on (http://[\d.]+:\d+)", line)
        if found:
            break
        assert time.monotonic() < deadline and proc.poll() is None, line
    else:
        pytest.fail(f"server exited: {proc.wait()}")
    url = found.group(1)
    while True:  # the socket is bound before the models load; uvicorn listens once they have
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.ConnectError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)


def stream_events(url: str, max_tokens: int, events: list, first: threading.Event) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    body |= {"ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                events.append(line)
                first.set()


def run_and_terminate(model_dir: str, grace: float, max_tokens: int) -> tuple[list[str], int, str]:
    proc, url = start_server(model_dir, grace)
    events: list[str] = []
    first = threading.Event()
    client = threading.Thread(target=stream_events, args=(url, max_tokens, events, first))
    client.start()
    assert first.wait(60)
    proc.send_signal(signal.SIGTERM)
    client.join(timeout=120)
    code = proc.wait(timeout=60)
    return events, code, proc.stderr.read()


@pytest.mark.slow
def test_sigterm_lets_inflight_requests_finish(tiny_a):
    events, code, log = run_and_terminate(tiny_a, grace=30, max_tokens=40)
    assert events[-1] == "data: [DONE]"
    finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] == "length"  # the whole answer, not a cut one
    assert code == 0 and "server stopped" in log


@pytest.mark.slow
def test_sigterm_ends_overlong_requests_cleanly(tokenizer_dir, tmp_path):
    from tests.serve.conftest import save_tiny_model

    model = save_tiny_model(tokenizer_dir, tmp_path / "long", seed=0, max_seq_len=8192)
    started = time.monotonic()
    events, code, log = run_and_terminate(model, grace=1, max_tokens=8000)  # far more than 1 s of work
    assert time.monotonic() - started < 60
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
    assert code == 0 and "server stopped" in log
