"""Request validation, tool-call parsing, A/B routing and metrics, without a server."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from pydantic import ValidationError

from lmstack.errors import LmstackError
from lmstack.serve.errors import from_validation_error
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest
from lmstack.serve.router import Router, parse_ab_arg, parse_model_arg
from lmstack.serve.tools import ToolCallStream, forced_call_schema, parse_tool_calls, render_messages

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def error_for(cls, body: bytes) -> dict:
    with pytest.raises(ValidationError) as info:
        cls.model_validate_json(body)
    return from_validation_error(info.value).body()["error"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b'{"model": "m", "messages": [', None, "could not parse the JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', None, "valid UTF-8"),
        (json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature", "valid number"),
        (json.dumps({**CHAT, "max_tokens": -5}).encode(), "max_tokens", "greater than or equal to 1"),
        (json.dumps({**CHAT, "frobnicate": 1}).encode(), "frobnicate", "Unrecognized request argument"),
        (json.dumps({"model": "m"}).encode(), "messages", "Missing required parameter"),
        (json.dumps({**CHAT, "messages": [{"role": "robot", "content": "x"}]}).encode(), "messages[0].role", "robot"),
        (json.dumps({**CHAT, "stop": 3}).encode(), "stop", "expected one of str, list[str]"),
        (b"[1, 2]", None, "JSON object"),
    ],
)
def test_bad_bodies_name_the_problem(body, param, words):
    error = error_for(ChatCompletionRequest, body)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_completion_prompt_forms():
    assert CompletionRequest.model_validate_json(b'{"model": "m", "prompt": "a"}').prompts() == ["a"]
    assert CompletionRequest.model_validate_json(b'{"model": "m", "prompt": [1, 2]}').prompts() == [[1, 2]]
    assert CompletionRequest.model_validate_json(b'{"model": "m", "prompt": [[1], [2]]}').prompts() == [[1], [2]]
    error = error_for(CompletionRequest, b'{"model": "m", "prompt": [1, "a"]}')
    assert error["param"] == "prompt" and "list[list[int]]" in error["message"]


def test_semantic_checks():
    from lmstack.serve.errors import APIError

    def check(**extra):
        req = ChatCompletionRequest.model_validate_json(json.dumps({**CHAT, **extra}))
        req.check()
        return req

    with pytest.raises(APIError, match="tool_choice needs 'tools'"):
        check(tool_choice="required")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(APIError, match="not among the tools"):
        check(tools=[tool], tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(APIError, match="top_logprobs needs"):
        check(top_logprobs=2)
    with pytest.raises(APIError, match="logit_bias is not supported"):
        check(logit_bias={"5": 1})
    with pytest.raises(APIError, match="at most 4"):
        check(stop=["a", "b", "c", "d", "e"]).stop_list()


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def tool_request(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({**CHAT, "tools": TOOLS, **extra}))


def test_tools_are_described_in_the_system_prompt_for_templates_without_tools():
    req = tool_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        ]
    )
    messages, template_tools = render_messages(req.messages, req.tools, "auto", "{{ messages }}")
    assert template_tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tool_call>" in messages[0]["content"]
    assert (
        messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert messages[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}
    # A template that renders tools itself gets them as its `tools` variable.
    native, template_tools = render_messages(req.messages, req.tools, "auto", "{% if tools %}{{ tools }}{% endif %}")
    assert template_tools[0]["function"]["name"] == "get_weather" and native[3]["role"] == "tool"
    # tool_choice "none": the model is not told about tools.
    plain, none_tools = render_messages(req.messages, req.tools, "none", "{{ messages }}")
    assert none_tools is None and "<tools>" not in plain[0]["content"]


def test_tool_call_parsing():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    two = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": "{}"}</tool_call>'
    assert [c.name for c in parse_tool_calls(two)[1]] == ["a", "b"]
    # Cut off before the closing tag still parses; malformed JSON stays visible as content.
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {"x": 1}}')[1][0].arguments == '{"x": 1}'
    assert parse_tool_calls("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])
    forced = parse_tool_calls('{"name": "get_time", "arguments": {}}', forced=True)[1]
    assert forced[0].name == "get_time" and forced[0].id.startswith("call_")


def test_tool_call_stream_holds_back_calls():
    stream = ToolCallStream(forced=False)
    pieces = [
        stream.feed(p) for p in ["Sure", ". <tool", '_call>{"name": "get_time", ', '"arguments": {}}</tool_call>']
    ]
    assert "".join(pieces) == "Sure. "
    rest, calls = stream.finish()
    assert rest == "" and calls[0].name == "get_time"
    plain = ToolCallStream(forced=False)
    assert plain.feed("a <to") == "a " and plain.feed("p") == "<top"
    assert plain.finish() == ("", [])


def test_forced_call_schema():
    req = tool_request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = forced_call_schema(req.tools, req.tool_choice)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"]["required"] == ["city"]
    assert len(forced_call_schema(req.tools, "required")["anyOf"]) == 2
    assert forced_call_schema(req.tools, "auto") is None


def test_model_and_ab_arguments():
    assert parse_model_arg("a=runs/x") == ("a", "runs/x")
    assert parse_model_arg("runs/my-model") == ("my-model", "runs/my-model")
    assert parse_model_arg("/m/SmolLM2.Q4_1.gguf") == ("SmolLM2.Q4_1", "/m/SmolLM2.Q4_1.gguf")
    split = parse_ab_arg("exp=a:90,b:10", {"a", "b"})
    assert [(v.model, v.weight) for v in split.variants] == [("a", 90.0), ("b", 10.0)]
    for bad, words in [
        ("exp=a:90", "at least two"),
        ("exp=a:90,c:10", "not a served model"),
        ("exp=a:x,b:1", "not a number"),
        ("exp=a:0,b:1", "must be > 0"),
        ("a=a:1,b:1", "already a model's name"),
        ("nonsense", "should look like"),
    ]:
        with pytest.raises(LmstackError, match=words):
            parse_ab_arg(bad, {"a", "b"})


def test_ab_split_is_weighted_and_sticky():
    router = Router(["a", "b"], [parse_ab_arg("exp=a:90,b:10", {"a", "b"})], seed=0)
    counts = Counter(router.route("exp", f"user-{i}")[0] for i in range(5000))
    assert 0.87 < counts["a"] / 5000 < 0.93
    assert all(router.route("exp", "alice") == router.route("exp", "alice") for _ in range(20))
    random_counts = Counter(router.route("exp", None)[0] for _ in range(5000))
    assert 0.87 < random_counts["a"] / 5000 < 0.93
    assert router.route("a", None) == ("a", None) and router.route("nope", None) is None


def test_metrics_render_engine_and_request_figures():
    stats = {"queue_length": 3, "running": 2, "kv_usage": 0.25, "prefix_hit_rate": 0.5}
    metrics = ServerMetrics({"a": lambda: stats})
    metrics.request("a", "exp", "chat", 200)
    metrics.progress("a", 10)
    metrics.finished("a", "exp", prompt_tokens=7, completion_tokens=10, ttft=0.2, elapsed=1.1)
    text = metrics.render().decode()
    for line in [
        'lmstack_requests_total{endpoint="chat",experiment="exp",model="a",status="200"} 1.0',
        'lmstack_queue_length{model="a"} 3.0',
        'lmstack_running_batch_size{model="a"} 2.0',
        'lmstack_kv_cache_usage_ratio{model="a"} 0.25',
        'lmstack_prefix_cache_hit_rate{model="a"} 0.5',
        'lmstack_generation_tokens_per_second{model="a"} 1.0',
        'lmstack_time_to_first_token_seconds_count{experiment="exp",model="a"} 1.0',
        'lmstack_time_per_output_token_seconds_sum{experiment="exp",model="a"} 0.1',
        'lmstack_generation_tokens_total{experiment="exp",model="a"} 10.0',
    ]:
        assert line in text, line


def test_token_rate_keeps_only_its_window_when_nobody_scrapes(monkeypatch):
    from lmstack.serve import metrics

    clock = [0.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    rate = metrics._TokenRate()
    for step in range(10_000):  # 100 events a second for 100 s, /metrics never read
        clock[0] = step * 0.01
        rate.add(2)
    assert len(rate._events) <= 100 * metrics.RATE_WINDOW_S + 1
    assert rate.rate() == pytest.approx(200, rel=0.02)
