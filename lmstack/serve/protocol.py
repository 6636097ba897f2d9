"""Request bodies of the OpenAI API, validated strictly (wrong types and unknown fields are 400s).

The models follow OpenAI's documented parameters and ranges. A parameter OpenAI has but lmstack
cannot honour (images, audio, `logit_bias`, `suffix`) is rejected with a message saying so rather
than silently ignored. `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are the extensions
vLLM accepts too, so clients written for it work unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmstack.serve.errors import bad_request

MAX_N = 16  # choices per request: each is a sequence in the batch
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self) -> None:
        """Rules across fields that the types cannot express; raises a 400 `APIError`."""


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts other than text are refused (the models here read text only)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text":
                raise bad_request(
                    f"messages[{index}].content[{j}] has type {part.get('type')!r}; this server's models read "
                    "text only, so send content as a string or as parts of type 'text'",
                    param=f"messages[{index}].content",
                )
            if not isinstance(part.get("text"), str):
                raise bad_request(
                    f'messages[{index}].content[{j}] needs a string \'text\': {{"type": "text", "text": "..."}}',
                    param=f"messages[{index}].content",
                )
            pieces.append(part["text"])
        return "".join(pieces)


class FunctionDefinition(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class StreamOptions(Strict):
    include_usage: bool = False


Number = float  # strict float fields accept JSON integers too


class SamplingFields(Strict):
    """Parameters shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch.Generator accepts
    user: str | None = None
    logit_bias: dict[str, Number] | None = None
    # Extensions (vLLM's names).
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None
    ignore_eos: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
        return [s for s in stops if s]

    def check_common(self) -> None:
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server; leave it out", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when 'stream' is true", param="stream_options")


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        self.check_common()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs 'logprobs': true", param="top_logprobs")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("tool_choice needs 'tools'; pass the functions the model may call", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise bad_request(
                    f"tool_choice names function {self.tool_choice.function.name!r}, which is not among the "
                    f"tools ({', '.join(names)})",
                    param="tool_choice",
                )
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise bad_request("tools must have distinct function names", param="tools")


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    def check(self) -> None:
        self.check_common()
        if self.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported by this server's models", param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request(
                "max_tokens 0 generates nothing; to score the prompt send 'echo': true with it "
                "(and 'logprobs' for the prompt tokens' log-probabilities)",
                param="max_tokens",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported; leave it out", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return list(p)


class EmbeddingRequest(Strict):
    model: str
    input: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and isinstance(x[0], int):
            return [x]
        return list(x)
