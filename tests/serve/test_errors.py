"""Bad input gets a clear OpenAI-style error and never a 500; the server keeps serving the others."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "Hello there"}]


def post(url: str, body: bytes | dict, path: str = "/v1/chat/completions", key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(url + path, json=body, headers=headers, timeout=60)
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json", **headers}, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"model": "tiny-a", "messages": [', "could not parse the JSON"),
        (b'{"model": "tiny-a", "messages": [{"role": "user", "content": "caf\xe9"}]}', "valid UTF-8"),
        (b'{"model": "tiny-a", "messages": [{"role": "user", "content": "\\ud800"}]}', "could not parse"),
        (b"", "could not parse"),
        ({"model": "tiny-a", "messages": HELLO, "max_tokens": -1}, "greater than or equal to 1"),
        ({"model": "tiny-a", "messages": HELLO, "temperature": "warm"}, "valid number"),
        ({"model": "tiny-a", "messages": HELLO, "n": 1.5}, "valid integer"),
        ({"model": "tiny-a", "messages": HELLO, "best_of": 2}, "Unrecognized request argument supplied: best_of"),
        ({"model": "tiny-a", "messages": "hi"}, "messages"),
        ({"model": "tiny-a", "messages": []}, "at least 1 item"),
        ({"model": "tiny-a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
        ({"model": "tiny-a", "messages": HELLO, "top_p": 0}, "greater than 0"),
        ({"model": "tiny-a", "messages": HELLO, "seed": 10**30}, "seed"),
        ({"model": "tiny-a", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "needs a string 'text'"),
    ],
)
def test_bad_chat_bodies(server, body, words):
    error = error_of(post(server[0], body), 400)
    assert error["type"] == "invalid_request_error" and words in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", {"prompt": [1, 10**9]}, "outside the vocabulary"),
        ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "send 'echo': true"),
        ("/v1/completions", {"prompt": ""}, "empty"),
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": [""]}, "empty"),
        ("/v1/embeddings", {"input": ["a"], "dimensions": 1000}, "exceeds"),
    ],
)
def test_bad_completion_and_embedding_bodies(server, path, body, words):
    assert words in error_of(post(server[0], {"model": "tiny-a", **body}, path), 400)["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert info.value.code == "model_not_found" and "GET /v1/models" in info.value.message


def test_prompt_over_context(server, client):
    long_text = "word " * 3000
    error = error_of(post(server[0], {"model": "tiny-a", "messages": [{"role": "user", "content": long_text}]}), 413)
    assert error["code"] == "context_length_exceeded" and "1024" in error["message"]
    error = error_of(post(server[0], {"model": "tiny-a", "prompt": long_text}, "/v1/completions"), 413)
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="Reduce the length"):
        client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=5000)


def test_malformed_json_schema(client):
    with pytest.raises(openai.BadRequestError, match="json_schema could not be compiled"):
        client.chat.completions.create(
            model="tiny-a",
            messages=HELLO,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="tiny-a", messages=HELLO, response_format={"type": "json_schema"})


def test_unknown_paths_and_methods(server):
    assert error_of(httpx.get(server[0] + "/v2/nothing"), 404)["type"] == "not_found_error"
    assert httpx.get(server[0] + "/v1/chat/completions").status_code == 405


@pytest.mark.slow
def test_thousand_requests_at_once(server, client):
    """1,000 simultaneous requests: each is served or told 429 (queue full); nothing else, and the server lives."""

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server[0], limits=limits, timeout=300) as http:
            body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 2}
            responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(1000)))
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        return [r.status_code for r in responses]

    statuses = Counter(asyncio.run(burst()))
    assert set(statuses) <= {200, 429} and statuses[200] >= 64 and statuses[429] > 0, statuses
    assert client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=3).usage.completion_tokens > 0
    engine = server[1].state.lmstack.models["tiny-a"].engine
    assert not engine.has_unfinished()


def wait_until_idle(engine, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while (engine.has_unfinished() or engine.stats().kv_usage > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished() and engine.stats().kv_usage == 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    engine = server[1].state.lmstack.models["tiny-b"].engine
    # n=8 x 1000 tokens: far more work than the test's few seconds, however fast the machine.
    body = {"model": "tiny-b", "messages": HELLO, "max_tokens": 1000, "n": 8, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 20
        while engine.stats().kv_usage == 0 and time.monotonic() < deadline:  # scheduled: holds KV blocks
            time.sleep(0.02)
        assert engine.has_unfinished() and engine.stats().kv_usage > 0
    wait_until_idle(engine)  # the stream was closed after one chunk: the request was aborted
    # The same for a blocking request whose client gives up.
    body = {"model": "tiny-b", "messages": HELLO, "max_tokens": 1000, "n": 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=0.5)
    wait_until_idle(engine)
    metrics = httpx.get(server[0] + "/metrics").text
    assert 'lmstack_requests_total{endpoint="chat",experiment="none",model="tiny-b",status="499"}' in metrics


@pytest.fixture(scope="module")
def keyed_server(tiny_a):
    """A key-protected server that runs one sequence at a time and queues one more."""
    from lmstack.serve import ServeOptions, build_app, running_server
    from lmstack.serve.generation import EngineSettings

    engine = EngineSettings(kv_cache_mb=4, max_num_seqs=1, max_queue=1)
    app = build_app(ServeOptions(models=[f"tiny={tiny_a}"], ab=[], api_key="s3cret", engine=engine))
    with running_server(app) as url:
        yield url


def test_queue_full_is_429(keyed_server):
    url = keyed_server
    auth = {"Authorization": "Bearer s3cret"}
    # n=2 on a server that runs one sequence at a time: one completion runs, the other waits in the
    # queue, which holds one request, so the queue stays full for as long as the first completion runs.
    long = {"model": "tiny", "messages": HELLO, "max_tokens": 1000, "n": 2, "ignore_eos": True, "stream": True}
    short = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
    with httpx.stream("POST", url + "/v1/chat/completions", json=long, headers=auth, timeout=60) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the stream (and abort it)
        next(lines)
        error = error_of(post(url, short, key="s3cret"), 429)
        assert error["type"] == "rate_limit_error" and "queue is full" in error["message"]
    assert post(url, short, key="s3cret").status_code == 200  # closing the stream aborted it; serving again


def test_api_key(keyed_server):
    url = keyed_server
    assert error_of(httpx.get(url + "/v1/models"), 401)["code"] == "missing_api_key"
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices[0].message.role == "assistant"
    # Bad input behind the key is still a 400, not a 401 or 500.
    bad = post(url, b"{", key="s3cret")
    assert json.loads(bad.text)["error"]["code"] == "invalid_json"


CHAT_FIELDS = sorted(
    ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream"]
    + ["stream_options", "stop", "presence_penalty", "frequency_penalty", "seed", "user", "logit_bias", "top_k"]
    + ["min_p", "repetition_penalty", "ignore_eos", "logprobs", "top_logprobs", "tools", "tool_choice"]
    + ["response_format", "parallel_tool_calls", "metadata", "store"]
)


def test_no_value_of_any_field_gives_a_500(server):
    """Any JSON value in any chat field is served or refused with a 4xx, never a server error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([2**70, -(2**70), 1e308, -0.5, 0.5])
    scalars |= st.text(max_size=12)
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6,
    )

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(CHAT_FIELDS), value=values)
    def check(field, value):
        body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 2, field: value}
        if field in ("max_tokens", "max_completion_tokens") and isinstance(value, int) and 0 < value < 2**63:
            body[field] = min(value, 8)  # valid sizes: keep the generation short
        response = post(server[0], body)
        assert response.status_code in (200, 400, 404, 413), (field, value, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["message"]

    check()
