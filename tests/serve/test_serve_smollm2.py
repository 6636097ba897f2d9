"""One real check: SmolLM2-135M-Instruct behind the server answers, fills a schema, calls a tool; MiniLM embeds."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    from lmstack.serve import ServeOptions, build_app, running_server
    from lmstack.serve.generation import EngineSettings

    # Float weights: the shipped Q4_1 file run as it is (packed, the default, and llama.cpp alike) greedily
    # answers "What is the capital of France?" with "L'Étoile, la ..."; the dequantized model says Paris.
    float_weights = EngineSettings(gguf_weights="float")
    app = build_app(ServeOptions(models=[MODEL], ab=[], embedding_model="all-minilm-l6-v2", engine=float_weights))
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kw
    ).choices[0]


def test_real_answer_and_stream(smol):
    answer = ask(smol, "What is the capital of France?", max_tokens=20)
    assert "Paris" in answer.message.content and answer.finish_reason == "stop"
    stream = smol.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer.message.content


def test_real_json_schema_and_tool_call(smol):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}}
    filled = ask(smol, "Name the capital of France and its country as JSON.", max_tokens=40, response_format=fmt)
    value = json.loads(filled.message.content)
    assert value["city"] == "Paris" and value["country"].lower() == "france"
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 30}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    called = ask(
        smol, "What's the weather like in Paris today?", max_tokens=40, tools=[weather], tool_choice="required"
    )
    assert called.finish_reason == "tool_calls"
    call = called.message.tool_calls[0].function
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_encoder_embeddings(smol):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    data = smol.embeddings.create(model="all-minilm-l6-v2", input=texts).data
    v = np.array([d.embedding for d in data])
    sim = v @ v.T
    assert v.shape == (3, 384) and sim[0, 1] > 0.5 > sim[0, 2] + 0.3
