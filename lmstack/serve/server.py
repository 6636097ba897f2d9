"""`lmstack serve`: load the models, build the app, run uvicorn until SIGTERM/SIGINT.

    lmstack serve --model smollm2-135m-instruct
    lmstack serve --model a=runs/v1 --model b=runs/v2 --ab chat=a:90,b:10 --api-key KEY

Shutdown: on SIGTERM or Ctrl-C uvicorn stops accepting connections and gives in-flight requests
`--shutdown-timeout` seconds to finish; what still runs then is cancelled, the engines abort those
requests (freeing their KV blocks) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from lmstack.errors import LmstackError, require
from lmstack.serve.app import create_app
from lmstack.serve.generation import EngineSettings, ServedModel, load_embedder
from lmstack.serve.router import Router, parse_ab_arg, parse_model_arg


@dataclass
class ServeOptions:
    models: list[str]
    ab: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    embedding_model: str | None = None
    device: str = "auto"
    dtype: str | None = None
    engine: EngineSettings | None = None
    shutdown_timeout: float = 30.0


def build_app(options: ServeOptions) -> FastAPI:
    """Load every model and return the app (no socket yet): the library entry point tests use too."""
    require(bool(options.models), "pass at least one --model REF (or NAME=REF)")
    named = [parse_model_arg(arg) for arg in options.models]
    names = [n for n, _ in named]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    require(duplicate is None, f"two models are named {duplicate!r}; name them apart: --model NAME=REF")
    splits = [parse_ab_arg(arg, set(names)) for arg in options.ab]
    settings = options.engine or EngineSettings()
    models = {}
    for name, ref in named:
        started = time.perf_counter()
        models[name] = ServedModel.load(name, ref, settings, options.device, options.dtype)
        print(f"loaded {name} ({ref}) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    embedder = None
    if options.embedding_model:
        emb_name, emb_ref = parse_model_arg(options.embedding_model)
        require(emb_name not in names, f"--embedding-model name {emb_name!r} is already a model's; name it apart")
        embedder = load_embedder(emb_name, emb_ref, options.device)
    return create_app(models, Router(names, splits), options.api_key, embedder)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LmstackError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn, plus a clean end for requests that outlive the grace period.

    On SIGTERM/SIGINT uvicorn stops accepting connections and waits for open ones. `/health` turns
    503 at once (load balancers stop routing here). After `grace` seconds the engines abort what
    still runs: each stream ends with an error event and `[DONE]`, each blocking request gets a 503,
    and their KV blocks are freed, so uvicorn never has to cut a connection mid-response.
    """

    def __init__(self, app: FastAPI, grace: float, log_level: str = "info"):
        config = uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=round(grace) + 10,  # a backstop: the drain below ends requests first
            timeout_keep_alive=30,
            access_log=False,
        )
        super().__init__(config)
        self.app_state = app.state.lmstack
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.app_state.shutting_down = True
        drain = asyncio.ensure_future(self._end_requests_after(self.grace))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    async def _end_requests_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        for model in self.app_state.models.values():
            await model.stop()


def serve(options: ServeOptions) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C."""
    require(0 <= options.port <= 65535, f"--port must be in 0..65535, got {options.port}")
    require(options.shutdown_timeout >= 0, f"--shutdown-timeout must be >= 0, got {options.shutdown_timeout}")
    options.api_key = options.api_key or os.environ.get("LMSTACK_API_KEY") or None
    sock = _bind(options.host, options.port)  # fail on a taken port before spending time loading models
    app = build_app(options)
    host, port = sock.getsockname()[:2]
    print(
        f"serving {', '.join(app.state.lmstack.router.names())} on http://{host}:{port} (chat page at /)",
        file=sys.stderr,
    )
    # uvicorn re-raises the signal it handled once it has shut down; a no-op handler lets us exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    DrainingServer(app, options.shutdown_timeout).run(sockets=[sock])
    print("server stopped", file=sys.stderr)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", shutdown_timeout: float = 5.0) -> Iterator[str]:
    """Serve `app` from a background thread on a free port; yields the base URL (tests, benchmarks)."""
    sock = _bind(host, 0)
    server = DrainingServer(app, shutdown_timeout, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        require(thread.is_alive() and time.monotonic() < deadline, "the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_timeout + 30)
        sock.close()
