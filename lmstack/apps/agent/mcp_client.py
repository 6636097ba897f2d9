"""Tools from any MCP server, through the official `mcp` client: list its tools, call them.

`--mcp "COMMAND"` starts the server as a child over stdio; `--mcp http://HOST:PORT/mcp` (or https) connects
to a running server over streamable HTTP.

The agent loop is synchronous; the MCP session is asynchronous. The session lives in its own event loop
on a background thread, and each call is submitted to that loop with a deadline, so a hanging server
costs one timeout, not the agent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shlex
import threading
from typing import Any

from lmstack.apps.agent.tools import Tool, ToolError
from lmstack.errors import LmstackError, require

START_TIMEOUT = 60.0


class McpServerTools:
    def __init__(self, command: str, call_timeout: float = 30.0):
        self.url = command.strip() if command.strip().startswith(("http://", "https://")) else None
        self.argv = [] if self.url else shlex.split(command)
        require(bool(self.url or self.argv), "--mcp needs the command that starts the server, or its http:// URL")
        self.command, self.call_timeout = command, call_timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp-client", daemon=True)
        self.thread.start()
        self.session: Any = None
        self._listed: concurrent.futures.Future = concurrent.futures.Future()
        self._closing = asyncio.Event()
        self._main = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        try:
            self.listed = self._listed.result(timeout=START_TIMEOUT)
        except Exception as exc:
            self.close()
            what = "could not be reached" if self.url else "did not start"
            raise LmstackError(f"MCP server {command!r} {what}: {_reason(exc)}") from None

    def _transport(self) -> contextlib.AbstractAsyncContextManager:
        if self.url:
            from mcp.client.streamable_http import streamable_http_client

            return streamable_http_client(self.url)
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        return stdio_client(StdioServerParameters(command=self.argv[0], args=self.argv[1:]))

    async def _serve(self) -> None:
        from mcp import ClientSession

        try:
            async with self._transport() as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                self.session = session
                self._listed.set_result(listed.tools)
                await self._closing.wait()
        except BaseException as exc:  # surfaces in __init__ when the server never came up
            if not self._listed.done():
                self._listed.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def tools(self) -> list[Tool]:
        return [
            Tool(t.name, t.description or "", t.input_schema or {"type": "object"}, self._caller(t.name))
            for t in self.listed
        ]

    def _caller(self, name: str):
        def run(args: dict[str, Any]) -> str:
            return self.call(name, args)

        return run

    def call(self, name: str, args: dict[str, Any]) -> str:
        future = asyncio.run_coroutine_threadsafe(
            self.session.call_tool(name, args, read_timeout_seconds=self.call_timeout), self.loop
        )
        try:
            result = future.result(timeout=self.call_timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(f"MCP tool {name!r} timed out after {self.call_timeout:g} s") from None
        except Exception as exc:
            raise ToolError(f"MCP tool {name!r} failed: {exc}") from None
        text = "\n".join(getattr(block, "text", f"[{block.type} content]") for block in result.content)
        if result.is_error:
            raise ToolError(text or f"MCP tool {name!r} reported an error")
        return text

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self._closing.set)
            with contextlib.suppress(Exception):  # the server may already be gone; closing must not raise
                self._main.result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def _reason(exc: BaseException) -> str:
    """The innermost message of an exception (anyio wraps transport failures in exception groups)."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and exc.exceptions:  # a (Base)ExceptionGroup
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
