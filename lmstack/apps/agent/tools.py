"""Tools an agent may call, declared in OpenAI's function format (name, description, JSON-schema parameters).

Built-ins: `calculator` (arithmetic parsed with `ast` and evaluated node by node, never `eval`),
`rag_search` (an index built by `lmstack rag index`), `read_file` (only inside one directory, symlinks
resolved before the check), `http_fetch` (only hosts on an allow-list) and `run_python` (a sandboxed
child process, `lmstack.apps.agent.sandbox`). A tool returns text; a
problem with its arguments raises `ToolError`, whose message goes back to the model.
"""

from __future__ import annotations

import ast
import math
import operator
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError, require

MAX_RESULT_CHARS = 4000  # a tool result longer than this is cut (it has to fit the model's context)


class ToolError(Exception):
    """A tool could not do what was asked; the message is returned to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    run: Callable[[dict[str, Any]], str]

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required}


def _string_arg(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"argument {name!r} must be a non-empty string")
    return value


# --- calculator --------------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "min": min, "max": max,
}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000  # 10 ** 10 ** 10 would take the host down; refuse huge powers instead


def calculate(expression: str) -> float | int:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, math functions."""
    expression = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (limit {MAX_EXPONENT})")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ToolError(f"{node.func.id}() takes positional arguments only")
        try:
            return _FUNCTIONS[node.func.id](*(_evaluate(a) for a in node.args))
        except (ValueError, TypeError) as exc:
            raise ToolError(f"{node.func.id}: {exc}") from None
    raise ToolError(f"unsupported element {ast.dump(node)[:60]!r}: only numbers, arithmetic and math functions")


# The pattern matters under `--tool-choice required`: decoding is constrained to the schema, and a plain
# string lets a small model close the quotes at once (`{"expression": ""}`); starting with a digit, a sign, a
# parenthesis or a function name makes it write the arithmetic. The evaluator stays the real check.
EXPRESSION_SCHEMA = {
    "type": "string",
    "description": "the arithmetic expression",
    "pattern": r"^[-(0-9a-z][-+*/%^(). 0-9a-z_,]*$",
}


def calculator_tool() -> Tool:
    def run(args: dict[str, Any]) -> str:
        value = calculate(_string_arg(args, "expression"))
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        return str(value)

    return Tool(
        "calculator",
        "Evaluate an arithmetic expression exactly, e.g. '(17 + 25) * 3' or 'sqrt(2) / 2'.",
        _object({"expression": EXPRESSION_SCHEMA}, ["expression"]),
        run,
    )


# --- retrieval, files, web -------------------------------------------------------------------------------


def rag_tool(index_dir: str | Path, k: int = 3) -> Tool:
    from lmstack.apps.rag.index import RagIndex
    from lmstack.apps.rag.retrieve import Retriever
    from lmstack.hub import load_encoder

    index = RagIndex.open(index_dir)
    retriever = Retriever(index, load_encoder(index.embed_model), "hybrid")

    def run(args: dict[str, Any]) -> str:
        hits = retriever.search(_string_arg(args, "query"), k)
        if not hits:
            return "no matching documents"
        return "\n\n".join(f"[{n}] {h.chunk.citation()}\n{h.chunk.embed_text}" for n, h in enumerate(hits, 1))

    return Tool(
        "search_documents",
        f"Search the document index {Path(index_dir).name!r} and return the most relevant passages with sources.",
        _object({"query": {"type": "string", "description": "what to look for", "minLength": 1}}, ["query"]),
        run,
    )


def file_tool(root: str | Path) -> Tool:
    base = Path(root).resolve()
    require(base.is_dir(), f"files:{root}: the directory does not exist")

    def run(args: dict[str, Any]) -> str:
        target = (base / _string_arg(args, "path")).resolve()  # resolves '..' and symlinks before the check
        if not target.is_relative_to(base):
            raise ToolError(f"{args['path']!r} is outside the readable directory")
        if not target.is_file():
            inside = (p for p in base.rglob("*") if p.is_file() and p.resolve().is_relative_to(base))
            names = sorted(p.relative_to(base).as_posix() for p in inside)[:50]
            raise ToolError(f"no file {args['path']!r}; files: {', '.join(names)}")
        try:
            return target.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{args['path']!r} is not UTF-8 text") from None

    return Tool(
        "read_file",
        "Read a UTF-8 text file (path relative to the shared directory).",
        _object({"path": {"type": "string", "description": "relative path of the file"}}, ["path"]),
        run,
    )


def http_tool(allowed_hosts: list[str], timeout: float = 10.0, max_bytes: int = 1_000_000) -> Tool:
    hosts = {h.lower() for h in allowed_hosts if h}
    require(bool(hosts), "http: give the allowed hosts, e.g. http:docs.python.org+example.com")

    def run(args: dict[str, Any]) -> str:
        from lmstack.apps.rag.loaders import html_to_text

        url = _string_arg(args, "url")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ToolError(f"only http and https URLs may be fetched, not {parts.scheme or 'a bare path'!r}")
        host = (parts.hostname or "").lower()
        allowed = host in hosts or (parts.port and f"{host}:{parts.port}" in hosts)
        if not allowed:
            raise ToolError(f"host {host!r} is not on the allow-list ({', '.join(sorted(hosts))})")
        opener = urllib.request.build_opener(_NoRedirect)  # a redirect could leave the allow-list
        try:
            with opener.open(url, timeout=timeout) as response:
                body = response.read(max_bytes + 1)
                kind = response.headers.get("Content-Type", "")
        except OSError as exc:
            raise ToolError(f"fetching {url} failed: {exc}") from None
        text = body[:max_bytes].decode("utf-8", errors="replace")
        return html_to_text(text) if "html" in kind else text

    return Tool(
        "http_fetch",
        f"Fetch a web page or text over HTTP(S) from one of these hosts: {', '.join(sorted(hosts))}.",
        _object({"url": {"type": "string", "description": "the URL to fetch"}}, ["url"]),
        run,
    )


def python_tool(timeout: float = 10.0) -> Tool:
    """`run_python(code)` in the sandbox of `lmstack.apps.agent.sandbox`; refused where it cannot be built."""
    from lmstack.apps.agent.sandbox import SANDBOX_FAILED, SandboxLimits, run_python, sandbox_check

    reason = sandbox_check()
    require(
        reason is None,
        f"the python tool is not offered on this machine: its sandbox (user + network namespace, Landlock) "
        f"cannot be created ({reason}); leave python out of --tools",
    )
    limits = SandboxLimits(timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)))

    def run(args: dict[str, Any]) -> str:
        result = run_python(_string_arg(args, "code"), limits)
        if result.exit_code == SANDBOX_FAILED and result.output.startswith("sandbox: "):
            raise ToolError(f"the sandbox could not be set up, so the code did not run ({result.output.strip()})")
        return result.report(limits)

    return Tool(
        "run_python",
        "Run a Python 3 program in a sandbox (no network, no files outside its scratch directory, "
        f"{limits.memory_mb} MB, {limits.timeout:g} s) and return what it prints. Use print() for results.",
        _object({"code": {"type": "string", "description": "the complete program"}}, ["code"]),
        run,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        raise ToolError(f"the server redirected to {newurl}; redirects are not followed")


def build_tools(spec: str, tool_timeout: float = 10.0) -> list[Tool]:
    """`calculator,rag:INDEX,files:DIR,http:HOST+HOST,python` -> tools.

    The python tool's own deadline is a second under the agent's `tool_timeout`, so the code is killed
    and its partial output reported before the loop would abandon the call.
    """
    tools: list[Tool] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, value = item.partition(":")
        if kind == "calculator":
            tools.append(calculator_tool())
        elif kind == "rag" and value:
            tools.append(rag_tool(value))
        elif kind == "files" and value:
            tools.append(file_tool(value))
        elif kind == "http" and value:
            tools.append(http_tool(value.split("+")))
        elif kind in ("python", "code") and not value:
            tools.append(python_tool(timeout=max(0.5, tool_timeout - 1)))
        else:
            raise LmstackError(
                f"unknown tool {item!r}; use calculator, rag:INDEX, files:DIR, http:HOST[+HOST...] or python"
            )
    names = [t.name for t in tools]
    require(len(names) == len(set(names)), f"each tool may be given once, got {names}")
    return tools
