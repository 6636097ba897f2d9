"""`lmstack mcp serve`: lmstack's capabilities as a Model Context Protocol server (official `mcp` SDK).

Tools: `generate` (the chat model through the engine), `embed` (the encoder), `rag_search` (indexes given
with --index), `data_stats` (documents, characters and words of a folder or file, or the summary of a
token-shard directory). Transport: stdio by default, streamable HTTP with --http PORT (path /mcp).
Models load on first use, so listing tools is instant.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError, require


def build_server(
    model: str | None = None,
    embed_model: str = "all-minilm-l6-v2",
    indexes: list[str] | None = None,
    root: str | Path = ".",
) -> Any:
    from mcp.server.mcpserver import MCPServer

    indexes = {Path(i).name: i for i in indexes or []}
    base = Path(root).resolve()
    server = MCPServer("lmstack", instructions="Generation, embeddings, document search and data statistics.")
    tool = lambda fn: server.tool()(_user_errors(fn))

    @functools.cache
    def chat():
        from lmstack.apps.llm import ChatModel

        require(model is not None, "this server was started without --model; the generate tool needs one")
        return ChatModel.from_ref(model)

    @functools.cache
    def encoder():
        from lmstack.hub import load_encoder

        return load_encoder(embed_model)

    @functools.cache
    def retriever(name: str):
        from lmstack.apps.rag.index import RagIndex
        from lmstack.apps.rag.retrieve import Retriever
        from lmstack.hub import load_encoder

        index = RagIndex.open(indexes[name])
        query_encoder = encoder() if index.embed_model == embed_model else load_encoder(index.embed_model)
        return Retriever(index, query_encoder, "hybrid")

    @tool
    def generate(prompt: str, max_new_tokens: int = 128, temperature: float = 0.0) -> str:
        """Answer a prompt with the server's chat model."""
        from lmstack.engine import SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        return chat().chat([{"role": "user", "content": prompt}], params)

    @tool
    def embed(texts: list[str]) -> list[list[float]]:
        """Embed texts with the server's encoder (L2-normalised vectors, one per text)."""
        require(len(texts) <= 1024, f"embed at most 1024 texts per call, got {len(texts)}")
        return encoder().embed(texts).tolist()

    @tool
    def rag_search(query: str, index: str = "", k: int = 4) -> list[dict[str, Any]]:
        """Search a document index (hybrid dense + BM25) and return passages with their sources."""
        require(bool(indexes), "this server has no index; start it with --index DIR")
        name = index or next(iter(indexes))
        require(name in indexes, f"unknown index {name!r}; indexes: {', '.join(indexes)}")
        hits = retriever(name).search(query, k)
        return [{"source": h.chunk.citation(), "score": h.score, "text": h.chunk.embed_text} for h in hits]

    @tool
    def data_stats(path: str) -> dict[str, Any]:
        """Statistics of a document folder or file (documents, characters, words) or a token-shard directory."""
        return collect_stats(base, path)

    return server


def _user_errors(fn):
    """Report an `LmstackError` (bad input) to the client with its message; MCP hides other exceptions' text."""
    from mcp.server.mcpserver.exceptions import ToolError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LmstackError as exc:
            raise ToolError(str(exc)) from None

    return wrapper


def collect_stats(base: Path, path: str) -> dict[str, Any]:
    from lmstack.apps.rag.loaders import list_documents, read_source

    target = (base / path).resolve()
    require(target.is_relative_to(base), f"{path!r} is outside the directory this server may read")
    require(target.exists(), f"{path!r} does not exist")
    if (target / "meta.json").is_file():  # a token-shard directory written by `lmstack data tokenize`
        return {"kind": "token shards", **json.loads((target / "meta.json").read_text(encoding="utf-8"))}
    root, files = (target, list_documents(target)) if target.is_dir() else (target.parent, {target.name: target})
    texts = [t.text for rel in files for t in read_source(root, rel)]
    cjk = sum(1 for t in texts for ch in t if "\u3400" <= ch <= "\u9fff")
    return {
        "kind": "documents",
        "files": len(files),
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "words": sum(len(t.split()) for t in texts),
        "cjk_characters": cjk,
    }


def serve_mcp(args: argparse.Namespace) -> None:
    for index in args.index:
        require((Path(index) / "index.json").is_file(), f"--index {index!r} is not a RAG index (no index.json)")
    server = build_server(args.model, args.embed_model, args.index, args.root)
    if args.http is None:
        server.run("stdio")
        return
    if not 0 < args.http < 65536:
        raise LmstackError(f"--http needs a port number, got {args.http}")
    server.run("streamable-http", host=args.host, port=args.http)
