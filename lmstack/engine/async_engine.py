"""`AsyncEngine`: the server's view of `LLMEngine` (asyncio streams over one stepping thread).

    async for out in AsyncEngine(engine).stream(prompt_ids, params): ...

One background task calls `engine.step()` in a worker thread while requests are pending and hands
each output to its request's queue, so the event loop never blocks on the model. Bad input and a
full queue raise at once from `stream`/`generate` (before any output). Leaving a stream early (client
disconnect, task cancelled) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmstack.engine.engine import EngineStats, LLMEngine, RequestOutput
from lmstack.engine.sampling import SamplingParams

T = TypeVar("T")

# One thread runs every torch call of a serving process: model loading, engine steps, embeddings.
# torch's CPU thread pool is OpenMP, which gives every thread that starts parallel work a team of its
# own; with a second team there are more pool threads than cores, libgomp stops spinning between
# parallel loops, and each loop waits for a sleeping thread to wake. Measured on 2 cores: a decode step
# took 6.5 ms when loading and stepping shared one thread, 12.5 ms (single stream) once a second
# thread had run torch work, and a 16-row step ~2x as long.
_thread = threading.local()  # `is_torch` set on the torch thread as it starts
TORCH_THREAD = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="lmstack-torch", initializer=lambda: setattr(_thread, "is_torch", True)
)


def on_torch_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) run on the process's torch thread (called from it, run in place); blocks."""
    if getattr(_thread, "is_torch", False):
        return fn(*args, **kwargs)
    return TORCH_THREAD.submit(fn, *args, **kwargs).result()


async def run_on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await fn(*args) on the process's torch thread without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(TORCH_THREAD, functools.partial(fn, *args))


class AsyncEngine:
    """Every engine call runs on the process's torch thread (`TORCH_THREAD`, shared by all engines), so
    calls never race and the event loop never waits on a lock while a step runs."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    async def _call(self, fn, *args):
        return await run_on_torch_thread(fn, *args)

    async def submit(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        """Queue the request now and return its output stream. Bad input and a full queue raise here,
        before any token, so a server can answer with an error status instead of a started response."""
        request_id = await self._call(self.engine.add_request, prompt, params, request_id)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self._ensure_loop()
        return RequestStream(self, request_id, queue)

    async def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them; the last one has `finished=True`."""
        outputs = await self.submit(prompt, params, request_id)
        try:
            async for item in outputs:
                yield item
        finally:
            await outputs.aclose()

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestOutput:
        """The finished output of one request."""
        last = None
        async for out in self.stream(prompt, params, request_id):
            last = out
        if last is None:
            raise RuntimeError("the engine ended a request without a final output")
        return last

    def abort(self, request_id: str) -> None:
        """Abort on the engine thread (never blocks the caller; the blocks are freed before the next step)."""
        TORCH_THREAD.submit(self.engine.abort, request_id)

    def stats(self) -> EngineStats:
        """A snapshot for metrics (counters read without waiting for the running step)."""
        return self.engine.stats()

    async def shutdown(self) -> None:
        """Abort everything still running, end the streams and stop the stepping task."""
        outputs = await self._call(lambda: [self.engine.abort(r) for r in list(self.engine.requests)])
        for out in outputs:
            queue = self._queues.get(out.request_id) if out is not None else None
            if queue is not None:
                queue.put_nowait(out)
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._loop_task = None

    # -- the stepping loop --------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> list[RequestOutput] | None:
        return self.engine.step() if self.engine.has_unfinished() else None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                outputs = await self._call(self._step)
            except Exception as error:  # a failing step fails the requests in flight, not the server
                await self._call(lambda: [self.engine.abort(r) for r in list(self.engine.requests)])
                for queue in self._queues.values():
                    queue.put_nowait(error)
                continue
            if outputs is None:  # idle until a request arrives
                self._wake.clear()
                if not self.engine.has_unfinished():  # one may have arrived since the step looked
                    await self._wake.wait()
                continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)


class RequestStream:
    """One queued request's outputs (an async iterator); `aclose()` before the last output aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[RequestOutput | BaseException]):
        self.request_id = request_id
        self._engine, self._queue = engine, queue
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        if item.finished:
            self._done = True
            self._engine._queues.pop(self.request_id, None)
        return item

    async def aclose(self) -> None:
        self._engine._queues.pop(self.request_id, None)
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)
