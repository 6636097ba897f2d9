"""Load time and peak memory: SmolLM2-135M-Instruct from its GGUF, lmstack vs transformers.

    python benchmarks/load_time.py [--repeats 3] [--threads 2]

Each load runs in a fresh subprocess (cold Python, warm OS file cache) and reports wall time from
process start (imports included, the way a user waits for `lmstack generate`) and peak RSS. Both
load the model dequantized to fp32 plus its tokenizer:
  lmstack       lmstack.hub.load_model("smollm2-135m-instruct")
  transformers  AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) + AutoTokenizer (same file);
                this child never imports lmstack (the parent resolves the GGUF path and passes it)
Goal for lmstack: under 3 s and under 2x the fp32 weight size in peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()


def child(which: str, gguf: str) -> None:
    if which == "lmstack":
        from lmstack.hub import load_model

        model, tokenizer = load_model("smollm2-135m-instruct")
    else:  # transformers alone: the GGUF path comes from the parent, so lmstack is never imported here
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        path = Path(gguf)
        logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if any(name == "lmstack" or name.startswith("lmstack.") for name in sys.modules):
            raise SystemExit("the transformers child imported lmstack: its time would include ours")
    seconds = time.perf_counter() - START
    n_params = sum(p.numel() for p in model.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "params": n_params, "tok": tokenizer is not None}))


def run(which: str, gguf: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", which, "--gguf", str(gguf)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["lmstack", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.gguf)
        return
    from lmstack.hub import resolve

    _, gguf = resolve("smollm2-135m-instruct")
    results = {}
    for which in ("lmstack", "transformers"):
        runs = [run(which, gguf, args.threads) for _ in range(args.repeats)]
        results[which] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "params": runs[0]["params"],
        }
        print(
            f"{which:13s} load {results[which]['seconds']:6.2f} s   "
            f"peak RSS {results[which]['peak_rss_mb']:7.0f} MB"
            f"   (median of {args.repeats})",
            flush=True,
        )
    fp32_mb = results["lmstack"]["params"] * 4 / 2**20
    ours, theirs = results["lmstack"], results["transformers"]
    print(f"fp32 weights  {fp32_mb:.0f} MB")
    print(
        f"lmstack/transformers: time {ours['seconds'] / theirs['seconds']:.2f}x, "
        f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x; "
        f"lmstack peak RSS = {ours['peak_rss_mb'] / fp32_mb:.2f}x the fp32 weights"
    )


if __name__ == "__main__":
    main()
