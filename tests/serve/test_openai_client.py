"""The official `openai` client against a live server on loopback (tiny random models)."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "Hello there"}]


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-a", "tiny-b", "exp"]
    assert client.models.retrieve("tiny-a").id == "tiny-a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny-a"
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_stream_matches_blocking_and_reports_usage(client):
    kwargs = dict(model="tiny-a", messages=HELLO, max_tokens=20, temperature=0.9, seed=11)
    blocking = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == blocking.choices[0].message.content  # same seed, same tokens, batched or not
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [blocking.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == blocking.usage.completion_tokens


def test_stream_ends_with_done(server):
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_seed_and_stop(client):
    r = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=16, n=3, seed=5, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # the choices draw from seed, seed+1, seed+2
    same = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=16, n=3, seed=5, temperature=1.0)
    assert [c.message.content for c in same.choices] == texts
    full = texts[0]
    cut = next((full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip()), None)
    if cut is not None:
        stopped = client.chat.completions.create(
            model="tiny-a", messages=HELLO, max_tokens=16, seed=5, temperature=1.0, stop=[cut]
        )
        assert stopped.choices[0].message.content == full[: full.index(cut)]
        assert stopped.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(
        model="tiny-a", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the top token
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_text_completions(client):
    r = client.completions.create(model="tiny-b", prompt=["The cat", "A dog"], max_tokens=4, n=2, logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("The cat") and r.choices[2].text.startswith("A dog")
    assert len(r.choices[0].logprobs.tokens) == len(r.choices[0].logprobs.top_logprobs)
    ids = client.completions.create(model="tiny-b", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].finish_reason in ("stop", "length")
    streamed = list(
        client.completions.create(model="tiny-b", prompt="The cat", max_tokens=4, stream=True, temperature=0)
    )
    blocking = client.completions.create(model="tiny-b", prompt="The cat", max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == blocking.choices[0].text


def test_json_schema_output_parses_and_matches(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Describe a person as JSON"}],
        max_tokens=120,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and isinstance(value["name"], str)
    # JSON mode: a random model rarely closes an unconstrained object in time, so only its start is
    # checked here; test_smollm2.py checks a complete object from a real model.
    obj = client.chat.completions.create(
        model="tiny-a", messages=HELLO, max_tokens=8, seed=4, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message.content.lstrip().startswith("{")


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_forced_tool_call(client):
    r = client.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        seed=1,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    stream = client.chat.completions.create(
        model="tiny-a",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        seed=1,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The result goes back as a tool message; the follow-up request renders it.
    follow = client.chat.completions.create(
        model="tiny-a",
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "4 C, cloudy"},
        ],
        tools=[WEATHER],
        max_tokens=5,
    )
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_embeddings(client):
    r = client.embeddings.create(model="tiny-a", input=["hello world", "hello world", "something else entirely"])
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 3 and len(vectors[0]) == 64
    norm = sum(x * x for x in vectors[0]) ** 0.5
    assert norm == pytest.approx(1.0, abs=1e-4)
    assert vectors[0] == pytest.approx(vectors[1]) and vectors[0] != pytest.approx(vectors[2])
    assert r.usage.prompt_tokens > 0


def test_ab_split_counts_and_stickiness(server, client):
    served = Counter()
    for i in range(120):
        raw = client.chat.completions.with_raw_response.create(
            model="exp", messages=HELLO, max_tokens=1, user=f"user-{i}"
        )
        served[raw.headers["x-lmstack-model"]] += 1
        assert raw.parse().model == raw.headers["x-lmstack-model"]
    assert served["tiny-a"] + served["tiny-b"] == 120
    assert 0.6 < served["tiny-a"] / 120 < 0.9  # 75% expected; the hash split is fixed, so this is stable
    models = {
        client.chat.completions.create(model="exp", messages=HELLO, max_tokens=1, user="alice").model for _ in range(5)
    }
    assert len(models) == 1
    metrics = httpx.get(server[0] + "/metrics").text
    per_variant = {
        m: sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("lmstack_requests_total{")
            and 'experiment="exp"' in line
            and f'model="{m}"' in line
            and 'status="200"' in line
        )
        for m in ("tiny-a", "tiny-b")
    }
    assert per_variant["tiny-a"] >= served["tiny-a"] and per_variant["tiny-b"] >= served["tiny-b"]
    for name in ("lmstack_time_to_first_token_seconds_bucket", "lmstack_kv_cache_usage_ratio", "lmstack_queue_length"):
        assert name in metrics


def test_health_and_page(server):
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and "exp" in health["models"]
    page = httpx.get(server[0] + "/")
    assert page.status_code == 200 and "<title>lmstack chat</title>" in page.text
    assert "readEvents" in httpx.get(server[0] + "/static/chat.js").text
