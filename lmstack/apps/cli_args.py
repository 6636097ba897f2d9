"""Argument parsers of `lmstack rag`, `lmstack agent` and `lmstack mcp` (kept here so cli.py stays thin)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

DEFAULT_ENCODER = "all-minilm-l6-v2"


def _generation_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument("--model", required=model_required, help="chat model: lmstack dir, HF dir, .gguf or alias")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_rag_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    rag = sub.add_parser("rag", help="retrieval-augmented generation over a folder of documents")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True, metavar="SUBCOMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = rag_sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("index", "build or update an index (changed files only; deleted files are removed)")
    p.add_argument("--docs", required=True, help="folder of .txt/.md/.html/.jsonl/.json/.csv/.parquet documents")
    p.add_argument("--index", required=True, help="index directory (created if missing)")
    p.add_argument("--embed-model", default=DEFAULT_ENCODER, help="encoder used for the chunks")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by neighbouring chunks")
    p.add_argument("--batch-size", type=int, default=32)
    for name, help in (
        ("search", "show the chunks retrieved for a query"),
        ("ask", "answer a question from the index, citing its sources"),
    ):
        p = command(name, help)
        p.add_argument("question")
        p.add_argument("--index", required=True)
        _retrieval_args(p)
        if name == "ask":
            _generation_args(p, model_required=True)
    p = command("pairs", "make (query, positive) pairs from an index for `lmstack finetune --task embed`")
    p.add_argument("--index", required=True)
    p.add_argument("--out", required=True, help="JSONL of query/positive pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qa", default=None, help="labelled questions (question, answer, source JSONL) to add as pairs")
    p.add_argument("--exclude", default=None, help="evaluation QA set: refuse --qa questions that also appear there")
    p.add_argument("--no-cloze", action="store_true", help="only the --qa pairs, no inverse-cloze pairs")
    p = command("eval", "retrieval (recall@k, MRR) and answer (containment, F1, faithfulness) scores on a QA set")
    p.add_argument("--index", required=True)
    p.add_argument("--qa", required=True, help="JSONL with question, answer, source (path relative to --docs)")
    p.add_argument("--modes", default="dense,bm25,hybrid", help="retrieval modes to compare")
    p.add_argument("--out", help="write the scores as JSON here")
    _retrieval_args(p)
    _generation_args(p, model_required=False)


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, default=4, help="chunks to retrieve")
    p.add_argument("--mode", default="hybrid", choices=["dense", "bm25", "hybrid"])
    p.add_argument("--embed-model", default=None, help="query encoder (default: the one the index was built with)")
    p.add_argument("--reranker", default=None, help="cross-encoder checkpoint (BERT sequence classification)")


def add_agent_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    p = sub.add_parser("agent", help="run a tool-calling agent on a task", description="run a tool-calling agent")
    p.set_defaults(func=func)
    p.add_argument("task", nargs="?", help="the task (omit with --eval)")
    _generation_args(p, model_required=True)
    p.add_argument(
        "--tools",
        default="calculator",
        help="comma list: calculator, rag:INDEX, files:DIR, http:HOST[+HOST...], python (sandboxed code)",
    )
    p.add_argument(
        "--mcp",
        action="append",
        default=[],
        help='MCP server: the command that starts it ("python -m srv") or its streamable-HTTP URL (http://H:P/mcp)',
    )
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--tool-timeout", type=float, default=10.0, help="seconds before a tool call is abandoned")
    p.add_argument(
        "--tool-choice",
        default="auto",
        choices=["auto", "required"],
        help="required: the first step must be a tool call (constrained decoding; helps small models)",
    )
    p.add_argument("--eval", metavar="TASKS.jsonl", help="score a task set with and without tools")


def add_mcp_parser(sub: argparse._SubParsersAction, func: Callable) -> None:
    mcp = sub.add_parser("mcp", help="Model Context Protocol")
    mcp_sub = mcp.add_subparsers(dest="mcp_command", required=True, metavar="SUBCOMMAND")
    p = mcp_sub.add_parser("serve", help="expose generate, embed, rag search and data stats as an MCP server")
    p.set_defaults(func=func)
    p.add_argument("--http", type=int, metavar="PORT", help="streamable HTTP on this port (default: stdio)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default=None, help="chat model for the generate tool (loaded on first use)")
    p.add_argument("--embed-model", default=DEFAULT_ENCODER)
    p.add_argument("--index", action="append", default=[], help="RAG index the search tool may use (repeatable)")
    p.add_argument("--root", default=".", help="data_stats may only read under this directory")
