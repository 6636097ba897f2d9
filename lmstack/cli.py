"""`lmstack <command>`: the one entry point. Thin: parse arguments, call the library.

Every command is a library function first; this file only maps flags to its arguments. A user
error (`LmstackError`) prints one line to stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmstack.errors import LmstackError


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lmstack.tokenizer import train_tokenizer_from_files

    tok = train_tokenizer_from_files(args.input, args.vocab_size, args.out, args.min_frequency, args.text_field)
    print(f"tokenizer: {tok.vocab_size} tokens -> {args.out}/tokenizer.json", file=sys.stderr)


def _data_tokenize(args: argparse.Namespace) -> None:
    from lmstack.data.tokenize import tokenize_corpus

    meta = tokenize_corpus(
        args.input, args.tokenizer, args.out, args.val_fraction, args.workers, args.seed, args.text_field
    )
    s = meta["splits"]
    print(
        f"tokenized: train {s['train']['tokens']:,} tokens / {s['train']['documents']:,} docs, "
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} docs -> {args.out}",
        file=sys.stderr,
    )


def _data_prepare(args: argparse.Namespace) -> None:
    from lmstack.data.curate.pipeline import prepare

    prepare(args.recipe, args.out, workers=args.workers, overrides=args.set)


def _train(args: argparse.Namespace) -> None:
    from lmstack.config import load_train_config

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    if args.data:
        overrides.append(f"data={args.data}")
    cfg = load_train_config(args.recipe, overrides)  # config errors surface before the heavy imports

    from lmstack.train.distributed import launch_local, under_launcher
    from lmstack.train.pretrain import preflight, pretrain

    if args.nproc_per_node < 1:
        raise LmstackError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.nproc_per_node > 1:
        if under_launcher():
            raise LmstackError("--nproc-per-node is for a plain `lmstack train`; under torchrun leave it out")
        preflight(cfg, args.resume, args.nproc_per_node)  # fail once, here, not in every process
        cli_args = ["train", *(["--recipe", args.recipe] if args.recipe else [])]
        cli_args += [arg for item in overrides for arg in ("--set", item)]
        cli_args += ["--resume"] if args.resume else []
        status = launch_local(args.nproc_per_node, cli_args)
        if status:
            raise SystemExit(status)
        return
    pretrain(cfg, resume=args.resume)


def _generate(args: argparse.Namespace) -> None:
    from lmstack.engine.generate import generate_cli

    generate_cli(args)


def _chat(args: argparse.Namespace) -> None:
    from lmstack.engine.chat import chat_cli

    chat_cli(args)


def _quickstart(args: argparse.Namespace) -> None:
    from lmstack.quickstart import quickstart

    quickstart(args.out, minutes=args.minutes, threads=args.threads)


def _convert(args: argparse.Namespace) -> None:
    from lmstack.convert import convert

    convert(args.model, args.to, args.out, dtype=args.dtype)


def _inspect(args: argparse.Namespace) -> None:
    from lmstack.convert.inspect import inspect_model

    inspect_model(args.model)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="lmstack dir, run dir, HF dir, .gguf file or alias")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one PyTorch codebase.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    # tokenizer
    tok = sub.add_parser("tokenizer", help="train byte-level BPE tokenizers").add_subparsers(
        dest="tokenizer_command", required=True, metavar="SUBCOMMAND"
    )
    p = command("train", _tokenizer_train, "train a byte-level BPE tokenizer on text files", tok)
    p.add_argument("--input", nargs="+", required=True, help=".txt/.md/.jsonl/.parquet files or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--text-field", default="text", help="field/column holding text in .jsonl/.parquet")

    # data
    data = sub.add_parser("data", help="curate raw data and tokenize it into shards").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    p = command("tokenize", _data_tokenize, "encode documents into uint16/uint32 token shards + meta.json", data)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0: up to 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p = command("prepare", _data_prepare, "run a curation pipeline recipe: read, clean, filter, dedup, write", data)
    p.add_argument("--recipe", required=True, help="data recipe YAML (see docs/data.md)")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")

    # train
    p = command("train", _train, "pretrain a model from a recipe (runs under torchrun for DDP/FSDP)")
    p.add_argument("--recipe", help="YAML recipe, e.g. recipes/tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="run directory (same as --set out=DIR)")
    p.add_argument("--data", help="token shard directory (same as --set data=DIR)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (DDP, or FSDP2 with --set parallel=fsdp) via torchrun; "
        "checks the data and config once before starting them",
    )

    # generate / chat
    p = command("generate", _generate, "generate text from a prompt (streams to stdout)")
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p = command("chat", _chat, "chat in the terminal using the model's chat template")
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")

    # quickstart
    p = command("quickstart", _quickstart, "train a tokenizer and a tiny model on built-in text, then sample")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--minutes", type=float, default=4.0, help="pretraining time budget")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")

    # convert / inspect
    p = command("convert", _convert, "export a model to Hugging Face safetensors or GGUF")
    p.add_argument("--model", required=True)
    p.add_argument("--to", required=True, choices=["hf", "gguf", "lmstack"])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="hf: float32|bfloat16|float16; gguf: f32|f16|q8_0")
    p = command("inspect", _inspect, "show a model's architecture, size, dtypes, tokenizer and template")
    p.add_argument("--model", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmstackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
