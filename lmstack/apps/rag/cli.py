"""`lmstack rag index | search | ask | eval`: flags -> library calls."""

from __future__ import annotations

import argparse
import json
import sys

from lmstack.utils.io import atomic_write_text


def _encoder(ref: str, device: str = "cpu"):
    from lmstack.hub import load_encoder
    from lmstack.utils.device import resolve_device

    return load_encoder(ref, device=resolve_device(device))


def _retriever(args: argparse.Namespace):
    from lmstack.apps.rag.index import RagIndex
    from lmstack.apps.rag.retrieve import Retriever

    index = RagIndex.open(args.index)
    encoder = None if args.mode == "bm25" else _encoder(args.embed_model or index.embed_model)
    reranker = _encoder(args.reranker) if args.reranker else None
    return Retriever(index, encoder, args.mode, reranker)


def _params(args: argparse.Namespace):
    from lmstack.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def rag_cli(args: argparse.Namespace) -> None:
    command = args.rag_command
    if command == "index":
        from lmstack.apps.rag.index import build_index

        build_index(args.docs, args.index, _encoder(args.embed_model), args.chunk_tokens, args.overlap, args.batch_size)
    elif command == "search":
        for n, hit in enumerate(_retriever(args).search(args.question, args.k), 1):
            print(f"[{n}] {hit.chunk.citation()}  (score {hit.score:.4f})\n{hit.chunk.embed_text}\n")
    elif command == "ask":
        from lmstack.apps.llm import ChatModel
        from lmstack.apps.rag.answer import answer_questions

        retriever = _retriever(args)
        chat = ChatModel.from_ref(args.model, args.device)
        (answer,) = answer_questions(chat, retriever, [args.question], args.k, _params(args))
        print(answer.render())
    elif command == "eval":
        _eval(args)
    elif command == "pairs":
        from lmstack.apps.rag.pairs import write_pairs

        n = write_pairs(args.index, args.out, args.seed, args.qa, not args.no_cloze, args.exclude)
        print(f"{n} (query, positive) pairs -> {args.out}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> None:
    from lmstack.apps.rag.evaluate import evaluate, format_table
    from lmstack.apps.rag.index import RagIndex

    index = RagIndex.open(args.index)
    encoder = _encoder(args.embed_model or index.embed_model)
    chat = None
    if args.model:
        from lmstack.apps.llm import ChatModel

        chat = ChatModel.from_ref(args.model, args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    reranker = _encoder(args.reranker) if args.reranker else None
    results = evaluate(args.index, args.qa, encoder, modes, args.k, chat, _params(args), reranker)
    print(format_table(results))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2))
        print(f"scores -> {args.out}", file=sys.stderr)
