"""The FastAPI application: OpenAI-compatible endpoints, metrics, health and the chat page.

    app = create_app({"smol": served_model}, Router(["smol"], []), api_key=None)

Request bodies are read and validated here (not by FastAPI's dependency machinery) so that every
bad body, invalid UTF-8 and malformed JSON included, gets an OpenAI-style 400 rather than a 422.
Generation goes through `lmstack.engine` via `ServedModel`; a request whose client disconnects is
aborted in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lmstack.errors import LmstackError
from lmstack.serve.errors import APIError, bad_request, error_body, from_validation_error
from lmstack.serve.generation import Delta, DeltaStream, Embedder, ServedModel, Shutdown, engine_error
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from lmstack.serve.responses import (
    FINGERPRINT,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    new_id,
    now,
    sse,
    usage,
)
from lmstack.serve.router import Router
from lmstack.serve.tools import ToolCallStream, forced_call_schema, parse_tool_calls, render_messages, tools_active

log = logging.getLogger("lmstack.serve")
STATIC = Path(__file__).parent / "static"
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body larger than this is refused before parsing


class ServerState:
    def __init__(
        self,
        models: dict[str, ServedModel],
        router: Router,
        api_key: str | None,
        embedder: Embedder | None,
    ):
        self.models, self.router, self.api_key, self.embedder = models, router, api_key, embedder
        self.metrics = ServerMetrics({name: m.stats for name, m in models.items()})
        self.text_of = {name: TokenText(m.tokenizer) for name, m in models.items()}
        self.created = now()
        self.shutting_down = False


def create_app(
    models: dict[str, ServedModel],
    router: Router,
    api_key: str | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    state = ServerState(models, router, api_key, embedder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has stopped accepting connections and waited for in-flight requests (up to its
        # graceful-shutdown timeout); whatever still runs is aborted so its blocks are freed.
        state.shutting_down = True
        for model in models.values():
            await model.stop()

    app = FastAPI(title="lmstack", version=FINGERPRINT, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.lmstack = state
    _install_error_handlers(app)
    _install_auth(app, state)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "models": state.router.names()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, name) for name in state.router.names()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name not in state.router.names():
            raise _unknown_model(name)
        return _model_card(state, name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatCompletionRequest)
        return await _chat(state, request, body)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        return await _completion(state, request, body)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await _parse(request, EmbeddingRequest)
        return await _embeddings(state, body)

    return app


# -- plumbing -------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = "Unknown path; the API lives under /v1 (e.g. POST /v1/chat/completions)"
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}"), status_code=500)


def _install_auth(app: FastAPI, state: ServerState) -> None:
    if state.api_key:
        app.add_middleware(_RequireKey, expected=f"Bearer {state.api_key}".encode())


class _RequireKey:
    """Bearer-key check for /v1 as plain ASGI middleware (Starlette's BaseHTTPMiddleware wraps `receive`
    in a way that can end a streaming response early, which would abort its generation)."""

    def __init__(self, app: ASGIApp, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization")
            error = None
            if not given:
                error = APIError(
                    401,
                    "You didn't provide an API key. Send it as the header `Authorization: Bearer YOUR_KEY`.",
                    code="missing_api_key",
                )
            elif not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _parse(request: Request, model: type[M]) -> M:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is {size} bytes; the limit is {MAX_BODY_BYTES}.", code="body_too_large")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body exceeds {MAX_BODY_BYTES} bytes.", code="body_too_large")
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    parsed.check()
    return parsed


def _unknown_model(name: str) -> APIError:
    return APIError(
        404, f"The model `{name}` does not exist. GET /v1/models lists the served models.", "model", "model_not_found"
    )


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": state.created, "owned_by": "lmstack"}
    if name in state.models:
        card["max_model_len"] = state.models[name].context
    else:
        card["ab_variants"] = [{"model": v.model, "weight": v.weight} for v in state.router.splits[name].variants]
    return card


def _route(state: ServerState, requested: str, user: str | None) -> tuple[ServedModel, str | None]:
    if state.shutting_down:
        raise engine_error(Shutdown())
    routed = state.router.route(requested, user)
    if routed is None:
        raise _unknown_model(requested)
    name, experiment = routed
    return state.models[name], experiment


def _check_context(model: ServedModel, prompt_len: int, max_tokens: int | None, where: str) -> int:
    """How many tokens may be generated; 413 when the prompt alone does not fit, 400 when prompt + max_tokens."""
    if prompt_len == 0:
        raise bad_request(f"{where} is empty; send some text", param=where)
    room = model.context - prompt_len
    if room <= 0:
        raise APIError(
            413,
            f"This model's maximum context length is {model.context} tokens, but the prompt has {prompt_len} "
            "tokens. Shorten the messages or the prompt.",
            where,
            "context_length_exceeded",
        )
    if max_tokens is not None and max_tokens > room:
        raise bad_request(
            f"This model's maximum context length is {model.context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            "Reduce the length of the prompt or max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    return room if max_tokens is None else max_tokens


def _sampling_kwargs(body: ChatCompletionRequest | CompletionRequest, max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": max(body.top_k or 0, 0),  # vLLM's -1 and 0 both mean off
        "min_p": body.min_p or 0.0,
        "repetition_penalty": body.repetition_penalty or 1.0,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "seed": body.seed,
        "stop": body.stop_list(),
        "ignore_eos": body.ignore_eos,
        "n": body.n,
    }


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client disconnects first, cancel it (the engine aborts the request) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    return task.result()


def _stream_error(exc: Exception) -> APIError:
    """An error after the response started: reported in the stream (OpenAI's way), never a dropped connection."""
    if isinstance(exc, APIError | LmstackError | Shutdown):
        return engine_error(exc)
    log.exception("internal error while streaming")
    return APIError(500, f"internal server error: {type(exc).__name__}")


class _Choice:
    """One choice being assembled from engine deltas."""

    def __init__(self, index: int, tool_stream: ToolCallStream | None):
        self.index = index
        self.text = ""
        self.tokens = 0
        self.logprobs: list[Any] = []
        self.prompt_logprobs: list[Any] | None = None  # echo with logprobs: the prompt's scores
        self.finish_reason: str | None = None
        self.tool_stream = tool_stream

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.tokens += len(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class _Run:
    """Bookkeeping shared by chat and text completions: timing, token counts, metrics."""

    def __init__(
        self, state: ServerState, model: ServedModel, experiment: str | None, endpoint: str, prompt_tokens: int
    ):
        self.state, self.model, self.experiment, self.endpoint = state, model, experiment, endpoint
        self.prompt_tokens = prompt_tokens
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.recorded = False

    def saw(self, delta: Delta) -> None:
        if delta.token_ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.completion_tokens += len(delta.token_ids)
        self.state.metrics.progress(self.model.name, len(delta.token_ids))

    def done(self, status: int) -> None:
        """Record the request's outcome once (a stream's cleanup may report it again)."""
        if self.recorded:
            return
        self.recorded = True
        ttft = None if self.first_token_at is None else self.first_token_at - self.start
        m = self.state.metrics
        m.request(self.model.name, self.experiment, self.endpoint, status)
        if status == 200:
            elapsed = time.perf_counter() - self.start
            m.finished(self.model.name, self.experiment, self.prompt_tokens, self.completion_tokens, ttft, elapsed)

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


class _EventStream(StreamingResponse):
    """An SSE response that always releases its engine requests when it ends, however it ends: a client
    that disconnects before the first byte never starts the body generator, whose own cleanup would then
    never run."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], Awaitable[None]], headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


def _headers(model: ServedModel, experiment: str | None) -> dict[str, str]:
    return {"x-lmstack-model": model.name, **({"x-lmstack-experiment": experiment} if experiment else {})}


# -- chat completions -----------------------------------------------------------------------------


async def _chat(state: ServerState, request: Request, body: ChatCompletionRequest) -> Response:
    model, experiment = _route(state, body.model, body.user)
    messages, template_tools = render_messages(
        body.messages, body.tools, body.tool_choice, model.tokenizer.chat_template
    )
    if not model.tokenizer.chat_template:
        raise bad_request(f"model {model.name!r} has no chat template; use /v1/completions with a plain prompt")
    try:
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=template_tools)
    except LmstackError as exc:
        raise bad_request(str(exc), param="messages") from None
    prompt_ids = model.tokenizer.encode(prompt)
    max_new = _check_context(model, len(prompt_ids), body.token_limit(), "messages")
    kwargs = _sampling_kwargs(body, max_new)
    if body.logprobs:
        kwargs["logprobs"] = body.top_logprobs or 0
    call_schema = forced_call_schema(body.tools or [], body.tool_choice)
    use_tools = tools_active(body.tools, body.tool_choice)
    if call_schema is not None:
        kwargs["json_schema"] = call_schema
    elif body.response_format is not None and body.response_format.type == "json_object":
        kwargs["json_object"] = True
    elif body.response_format is not None and body.response_format.type == "json_schema":
        kwargs["json_schema"] = body.response_format.json_schema.schema_ or {"type": "object"}
    params = model.sampling_params(kwargs)
    run = _Run(state, model, experiment, "chat", len(prompt_ids))
    try:
        deltas = await model.submit(prompt_ids, params)
    except APIError as exc:
        run.done(exc.status)
        raise

    def new_choice(i: int) -> _Choice:
        return _Choice(i, ToolCallStream(forced=call_schema is not None) if use_tools else None)

    choices = [new_choice(i) for i in range(body.n)]
    rid, created = new_id("chatcmpl"), now()
    if body.stream:

        async def close() -> None:
            await deltas.aclose()
            run.done(499)  # a no-op when the stream recorded its own outcome

        body_iter = _chat_stream(state, body, run, deltas, choices, rid, created)
        return _EventStream(body_iter, close, _headers(model, experiment))

    async def collect() -> None:
        async for delta in deltas:
            run.saw(delta)
            choices[delta.index].add(delta)

    try:
        finished = await _until_disconnect(request, collect())
    except (APIError, LmstackError, Shutdown) as exc:
        run.done(engine_error(exc).status)
        raise engine_error(exc) from None
    finally:
        await deltas.aclose()  # aborts the request if the client left (a no-op once it finished)
    if finished is None and any(c.finish_reason is None for c in choices):
        run.done(499)
        return Response(status_code=499)
    run.done(200)
    out = []
    for c in choices:
        message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
        finish = c.finish_reason
        if c.tool_stream is not None:
            content, calls = parse_tool_calls(c.text, forced=c.tool_stream.forced)
            if calls:
                message = {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "tool_calls": [x.as_openai() for x in calls],
                }
                finish = "tool_calls"
        logprobs = chat_logprobs(c.logprobs, state.text_of[model.name]) if body.logprobs else None
        out.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    payload = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": FINGERPRINT,
        "choices": out,
        "usage": run.usage(),
    }
    return JSONResponse(payload, headers=_headers(model, experiment))


async def _chat_stream(
    state: ServerState,
    body: ChatCompletionRequest,
    run: _Run,
    deltas: DeltaStream,
    choices: list[_Choice],
    rid: str,
    created: int,
) -> AsyncIterator[bytes]:
    model = run.model
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model.name,
        "system_fingerprint": FINGERPRINT,
    }
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    status = 200
    try:
        for c in choices:
            yield chunk(c.index, {"role": "assistant", "content": ""})
        async for delta in deltas:
            run.saw(delta)
            c = choices[delta.index]
            c.add(delta)
            text = c.tool_stream.feed(delta.text) if c.tool_stream is not None else delta.text
            logprobs = (
                chat_logprobs(delta.logprobs, state.text_of[model.name]) if body.logprobs and delta.logprobs else None
            )
            if text or logprobs:
                yield chunk(c.index, {"content": text}, logprobs=logprobs)
            if delta.finish_reason is None:
                continue
            finish = delta.finish_reason
            if c.tool_stream is not None:
                rest, calls = c.tool_stream.finish()
                if rest:
                    yield chunk(c.index, {"content": rest})
                if calls:
                    yield chunk(c.index, {"tool_calls": [x.as_openai(i) for i, x in enumerate(calls)]})
                    finish = "tool_calls"
            yield chunk(c.index, {}, finish)
        if include_usage:
            yield sse({**base, "choices": [], "usage": run.usage()})
        yield sse("[DONE]")
    except asyncio.CancelledError:
        status = 499  # the client went away; the engine request was aborted by `deltas`' cleanup
        raise
    except Exception as exc:  # headers are sent: report the error in the stream, as OpenAI does
        err = _stream_error(exc)
        status = err.status
        yield sse(err.body())
        yield sse("[DONE]")
    finally:
        run.done(status)


# -- text completions -----------------------------------------------------------------------------


async def _completion(state: ServerState, request: Request, body: CompletionRequest) -> Response:
    model, experiment = _route(state, body.model, body.user)
    prompts = body.prompts()
    if len(prompts) * body.n > 64:
        raise bad_request("at most 64 completions (prompts x n) per request", param="prompt")
    encoded: list[list[int]] = []
    vocab = model.vocab_size
    for p in prompts:
        ids = model.tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} in the prompt is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        encoded.append(ids)
    limits = [_check_context(model, len(ids), body.max_tokens, "prompt") for ids in encoded]
    runs = []
    streams = []
    for ids, limit in zip(encoded, limits, strict=True):
        kwargs = _sampling_kwargs(body, 16 if body.max_tokens is None else limit)  # OpenAI's default: 16
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], limit)
        if body.logprobs is not None:
            kwargs["logprobs"] = body.logprobs
            if body.echo:  # the echoed prompt's tokens are scored too (prompt scoring, lm-eval's loglikelihood)
                kwargs["prompt_logprobs"] = body.logprobs
        params = model.sampling_params(kwargs)
        run = _Run(state, model, experiment, "completions", len(ids))
        try:
            streams.append(await model.submit(ids, params))
        except APIError as exc:
            for stream in streams:
                await stream.aclose()
            run.done(exc.status)
            raise
        runs.append(run)
    prompt_texts = [p if isinstance(p, str) else model.tokenizer.decode(p) for p in prompts]
    rid, created = new_id("cmpl"), now()
    merged = _merge_streams(streams)
    if body.stream:

        async def close() -> None:
            for stream in streams:
                await stream.aclose()
            for r in runs:
                r.done(499)  # no-ops when the stream recorded its own outcome

        body_iter = _completion_stream(state, body, runs, merged, prompt_texts, encoded, rid, created)
        return _EventStream(body_iter, close, _headers(model, experiment))
    choices = [_Choice(i, None) for i in range(len(prompts) * body.n)]

    async def collect() -> None:
        async for prompt_index, delta in merged:
            runs[prompt_index].saw(delta)
            choices[prompt_index * body.n + delta.index].add(delta)

    try:
        finished = await _until_disconnect(request, collect())
    except (APIError, LmstackError, Shutdown) as exc:
        for r in runs:
            r.done(engine_error(exc).status)
        raise engine_error(exc) from None
    finally:
        for stream in streams:
            await stream.aclose()
    if finished is None and any(c.finish_reason is None for c in choices):
        for r in runs:
            r.done(499)
        return Response(status_code=499)
    for r in runs:
        r.done(200)
    text_of = state.text_of[model.name]
    out = []
    for c in choices:
        prefix = prompt_texts[c.index // body.n] if body.echo else ""
        logprobs = completion_logprobs(c.logprobs, text_of, len(prefix)) if body.logprobs is not None else None
        if logprobs is not None and body.echo:
            logprobs = echo_logprobs(encoded[c.index // body.n], c.prompt_logprobs, logprobs, text_of)
        out.append({"index": c.index, "text": prefix + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    total = usage(sum(r.prompt_tokens for r in runs), sum(r.completion_tokens for r in runs))
    payload = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": FINGERPRINT,
        "choices": out,
        "usage": total,
    }
    return JSONResponse(payload, headers=_headers(model, experiment))


async def _merge_streams(streams: list[DeltaStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleave several prompts' delta streams as they arrive: (prompt index, delta)."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None | BaseException]] = asyncio.Queue()

    async def pump(i: int, stream: DeltaStream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
            await queue.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _completion_stream(
    state: ServerState,
    body: CompletionRequest,
    runs: list[_Run],
    merged: AsyncIterator[tuple[int, Delta]],
    prompt_texts: list[str],
    prompt_ids: list[list[int]],
    rid: str,
    created: int,
) -> AsyncIterator[bytes]:
    model = runs[0].model
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": FINGERPRINT,
    }
    extra = {"usage": None} if include_usage else {}
    text_of = state.text_of[model.name]
    offsets = [len(prompt_texts[i // body.n]) if body.echo else 0 for i in range(len(prompt_texts) * body.n)]

    def chunk(index: int, text: str, finish: str | None, logprobs: Any) -> bytes:
        return sse(
            {
                **base,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                **extra,
            }
        )

    # Echoed prompts go first; with logprobs, each choice's echo waits for its first delta, which carries
    # the prompt's scores from the prefill.
    echo_due = set(range(len(offsets))) if body.echo and body.logprobs is not None else set()
    status = 200
    try:
        if body.echo and not echo_due:
            for i in range(len(offsets)):
                yield chunk(i, prompt_texts[i // body.n], None, None)
        async for prompt_index, delta in merged:
            runs[prompt_index].saw(delta)
            index = prompt_index * body.n + delta.index
            if index in echo_due:
                echo_due.discard(index)
                scores = completion_logprobs(delta.prompt_logprobs, text_of, 0, prompt_ids[prompt_index])
                yield chunk(index, prompt_texts[prompt_index], None, scores)
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(delta.logprobs, text_of, offsets[index])
            offsets[index] += len(delta.text)
            if delta.text or delta.finish_reason is not None:
                yield chunk(index, delta.text, delta.finish_reason, logprobs)
        if include_usage:
            total = usage(sum(r.prompt_tokens for r in runs), sum(r.completion_tokens for r in runs))
            yield sse({**base, "choices": [], "usage": total})
        yield sse("[DONE]")
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception as exc:
        err = _stream_error(exc)
        status = err.status
        yield sse(err.body())
        yield sse("[DONE]")
    finally:
        for r in runs:
            r.done(status)


# -- embeddings -----------------------------------------------------------------------------------


async def _embeddings(state: ServerState, body: EmbeddingRequest) -> Response:
    inputs = body.inputs()
    if state.embedder is not None and body.model == state.embedder.name:
        embedder = state.embedder
        experiment = None
    else:
        model, experiment = _route(state, body.model, body.user)
        embedder = model.embedder
    try:
        vectors, tokens = await embedder.embed(inputs)
    except LmstackError as exc:
        status = 413 if "context" in str(exc) else 400
        raise APIError(status, str(exc), "input", "context_length_exceeded" if status == 413 else None) from None
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            raise bad_request(
                f"dimensions {body.dimensions} exceeds the model's {vectors.shape[1]}", param="dimensions"
            )
        vectors = vectors[:, : body.dimensions]
        vectors = vectors / (vectors.norm(dim=1, keepdim=True) + 1e-12)
    state.metrics.request(embedder.name, experiment, "embeddings", 200)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _encode_vector(vector: Any, encoding: str) -> list[float] | str:
    if encoding == "base64":
        import base64

        return base64.b64encode(vector.float().numpy().tobytes()).decode()
    return vector.float().tolist()
