"""`lmstack compress-report`: one table and one plot comparing compressed variants of one model.

    lmstack compress-report --model smollm2-135m-instruct --methods fp32,bf16,int8,int4,nf4,gptq,awq,pruned --out rep/

For each method a variant directory is written under `OUT/variants/` (each one a model reference), then
measured in a fresh Python process of its own, so peak memory is that variant's alone:
  file size      bytes of the variant directory's weights (model.safetensors);
  peak RAM       the process's maximum resident set after loading and generating (`peak_rss_mb`);
  decode tok/s   greedy single-stream generation of `--decode-tokens` tokens (median of 3 runs);
  prefill tok/s  one forward pass over a 256-token prompt (median of 3);
  quality        perplexity and bits per byte on the built-in held-out text, greedy agreement with the
                 fp32 model (its continuations computed once, `lmstack.eval.agreement`), and the
                 built-in multiple-choice tasks (`--limit` items each), via `lmstack.eval.evaluate`.
Variants: fp32, bf16 (float copies), int8 / int4 / nf4 (round-to-nearest, `lmstack.compress.quantize`),
gptq / awq (int4 group 32, asymmetric, calibrated), w8a8 (SmoothQuant), pruned (2:4 Wanda, weights
zeroed, stored dense). OUT/report.md, report.csv, report.json and report.png are each written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmstack.errors import LmstackError, require
from lmstack.utils.io import atomic_path, atomic_write_text

METHODS = ("fp32", "bf16", "int8", "int4", "nf4", "gptq", "awq", "w8a8", "pruned")
COLUMNS = (
    ("variant", "variant", "{}"),
    ("size_mb", "file MB", "{:.1f}"),
    ("peak_ram_mb", "peak RAM MB", "{:.0f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"),
    ("prefill_tps", "prefill tok/s", "{:.0f}"),
    ("ppl", "ppl", "{:.3f}"),
    ("bpb", "bits/byte", "{:.4f}"),
    ("agreement", "greedy agree", "{:.3f}"),
    ("mc_acc", "MC acc", "{:.3f}"),
    ("mc_acc_norm", "MC acc_norm", "{:.3f}"),
)
PREFILL_TOKENS = 256


def parse_methods(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    require(not unknown, f"unknown compress-report method(s) {unknown}; choose from {', '.join(METHODS)}")
    require(bool(names), "--methods is empty; pass e.g. fp32,int8,int4")
    return list(dict.fromkeys(names))


# -- building variants ----------------------------------------------------------------------------------


def build_variant(model_ref: str, method: str, out: Path, calib: str | None) -> None:
    """Write the `method` variant of `model_ref` to `out` (a model directory)."""
    from lmstack.compress.quantize import quantize

    if method in ("fp32", "bf16", "pruned"):
        from lmstack.hub import load_model
        from lmstack.model.io import save_model_dir

        model, tokenizer = load_model(model_ref, dtype=torch.float32)
        if method == "pruned":
            from lmstack.compress.calib import calibration_texts, calibration_tokens
            from lmstack.compress.prune import prune_model

            tokens = calibration_tokens(tokenizer, calibration_texts(calib), 16, 256, source=calib or "built-in text")
            model, _ = prune_model(model, "2:4", 0.5, tokens)
        save_model_dir(model.to(torch.bfloat16) if method == "bf16" else model, out, tokenizer)
    elif method in ("gptq", "awq"):
        quantize(model_ref, method, out, group_size=32, symmetric=False, bits=4, calib=calib)
    elif method == "w8a8":
        quantize(model_ref, method, out, calib=calib)
    else:
        quantize(model_ref, method, out)


# -- measuring one variant (in its own process) ---------------------------------------------------------


def _median_seconds(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM (the high-water mark of the memory image
    the process runs now). `ru_maxrss` is not used there: it also counts the parent's resident set at
    the fork that started this process, so every variant measured after a large one seemed as large
    (the report's parent holds the models it builds)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux and the BSDs


def measure_variant(directory: Path, reference_file: Path, limit: int, decode_tokens: int) -> dict[str, Any]:
    """Speed, memory and quality of one variant; run in a fresh process (`python -m lmstack.compress.report`)."""
    from lmstack.engine.generate import SamplingParams, generate_tokens, load_for_inference
    from lmstack.eval import evaluate
    from lmstack.eval.agreement import ReferenceContinuations

    saved_dtype = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("dtype")
    # A bf16 variant runs in bf16; everything else in float32 activations (quantized weights stay packed).
    model, tokenizer = load_for_inference(str(directory), "cpu", "bfloat16" if saved_dtype == "bfloat16" else None)
    prompt = tokenizer.encode("The harbour town woke slowly on winter mornings.")
    params = SamplingParams(max_new_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
    list(generate_tokens(model, prompt, params))  # warm-up: kernels built, caches allocated
    decode_s = _median_seconds(lambda: list(generate_tokens(model, prompt, params)))
    prefill_ids = torch.randint(
        100, model.cfg.vocab_size, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        prefill_s = _median_seconds(lambda: model(prefill_ids, last_logits_only=True))
    peak_mb = peak_rss_mb()
    raw = json.loads(reference_file.read_text(encoding="utf-8"))
    reference = ReferenceContinuations(raw["prompts"], raw["continuations"], raw["vocab_size"])
    results = evaluate(model, ["ppl", "agreement", "mc"], tokenizer=tokenizer, reference=reference, limit=limit)
    return {
        "size_mb": (directory / "model.safetensors").stat().st_size / 1e6,
        "peak_ram_mb": peak_mb,
        "decode_tps": decode_tokens / decode_s,
        "prefill_tps": PREFILL_TOKENS / prefill_s,
        "ppl": results["ppl"]["ppl"],
        "bpb": results["ppl"]["bpb"],
        "agreement": results["agreement"]["token_agreement"],
        "mc_acc": results["mc_average"]["acc"],
        "mc_acc_norm": results["mc_average"]["acc_norm"],
        "tasks": {k: v for k, v in results.items() if k not in ("ppl", "agreement", "mc_average")},
    }


def _measure_in_subprocess(directory: Path, reference_file: Path, limit: int, decode_tokens: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "lmstack.compress.report",
        str(directory),
        str(reference_file),
        str(limit),
        str(decode_tokens),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LmstackError(f"measuring {directory.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the report -----------------------------------------------------------------------------------------


def write_reference(model_ref: str, path: Path, decode_tokens: int) -> None:
    """The fp32 model's greedy continuations of the built-in prompts, for every variant's agreement."""
    from lmstack.eval.agreement import ReferenceContinuations, default_prompts
    from lmstack.hub import load_model

    model, tokenizer = load_model(model_ref, dtype=torch.float32)
    ref = ReferenceContinuations.generate(model, tokenizer, default_prompts(), decode_tokens)
    atomic_write_text(
        path, json.dumps({"prompts": ref.prompts, "continuations": ref.continuations, "vocab_size": ref.vocab_size})
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow([row[key] for key, _, _ in COLUMNS])
    return buffer.getvalue()


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in COLUMNS[1:] if c[0] not in ("bpb", "mc_acc")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    names = [r["variant"] for r in rows]
    for ax, (key, label, _) in zip(axes.flat, panels, strict=False):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
        if key == "ppl":
            base = rows[0]["ppl"]
            ax.set_ylim(base * 0.9, max(r["ppl"] for r in rows) * 1.05)
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def compress_report(
    model_ref: str,
    methods: list[str],
    out: str | Path,
    calib: str | None = None,
    limit: int = 40,
    decode_tokens: int = 32,
) -> list[dict[str, Any]]:
    """Build, measure and tabulate every variant; returns the rows (also written to `out`)."""
    require(limit > 0 and decode_tokens > 0, "--limit and --decode-tokens must be positive")
    if calib is not None:
        require(Path(calib).is_file(), f"calibration file {calib!r} not found")
    from lmstack.hub import resolve

    resolve(model_ref)  # a bad reference fails here, before any variant is built
    out = Path(out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    reference_file = out / "reference.json"
    write_reference(model_ref, reference_file, decode_tokens)
    rows = []
    for method in methods:
        directory = out / "variants" / method
        print(f"[compress-report] {method}: building", file=sys.stderr, flush=True)
        build_variant(model_ref, method, directory, calib)
        print(f"[compress-report] {method}: measuring", file=sys.stderr, flush=True)
        rows.append({"variant": method, **_measure_in_subprocess(directory, reference_file, limit, decode_tokens)})
        _write_outputs(rows, out, model_ref)  # partial results survive an interrupted run
    return rows


def _write_outputs(rows: list[dict[str, Any]], out: Path, model_ref: str) -> None:
    atomic_write_text(out / "report.md", markdown_table(rows) + "\n")
    atomic_write_text(out / "report.csv", csv_text(rows))
    atomic_write_text(out / "report.json", json.dumps({"model": model_ref, "rows": rows}, indent=2))
    plot(rows, out / "report.png", f"compression report: {model_ref}")


def report_cli(args) -> None:
    rows = compress_report(
        args.model, parse_methods(args.methods), args.out, args.calib, args.limit, args.decode_tokens
    )
    print(markdown_table(rows))
    print(f"report -> {args.out}/report.md, report.csv, report.png", file=sys.stderr)


if __name__ == "__main__":  # one variant's measurement, in its own process (see _measure_in_subprocess)
    directory, reference, limit, decode = sys.argv[1:5]
    print(json.dumps(measure_variant(Path(directory), Path(reference), int(limit), int(decode))))
