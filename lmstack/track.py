"""Run logging: `metrics.jsonl`, TensorBoard, a loss-curve PNG and an HTML report in the run folder.

Everything a run records goes through `RunTracker.log(record)`: one JSON object per line in
`metrics.jsonl` (train log events carry `loss`, eval events `val_loss`, samples ride on eval events),
the same scalars to TensorBoard under `tb/` when `tensorboard` is importable. The PNG and the HTML
report are rebuilt from `metrics.jsonl` alone, so a resumed run's report covers the whole run.
Only rank 0 of a distributed run writes; other ranks get a tracker that does nothing.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lmstack.utils.io import atomic_path, atomic_write_text


@functools.lru_cache(maxsize=8)
def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 0) -> float:
    """Achievable matmul FLOP/s on `device` in `dtype`: the denominator of MFU, measured, not looked up.

    Measured once per process and device/dtype (about half a second on a 2-core CPU). On CPU the
    fp32 rate is the reference whatever the autocast dtype: CPUs without native bf16/fp16 matmul
    emulate them many times slower (a 1536^3 bf16 matmul takes seconds here), which would both stall
    start-up and report MFU above 100%."""
    if device.type == "cpu":
        dtype = torch.float32
    size = size or (1536 if device.type == "cpu" else 8192)
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG (dropout) untouched
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    reps = 3 if device.type == "cpu" else 10
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * size**3 / best


class RunTracker:
    """Writes the run folder's logs. `enabled=False` (non-zero ranks) makes every method a no-op."""

    def __init__(
        self,
        out_dir: str | Path,
        config: dict[str, Any],
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.out = Path(out_dir)
        self.enabled = enabled
        self.config = config
        self.writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        # A resumed run continues the log from its checkpoint; events after it (from the part of the
        # interrupted run that was not checkpointed) are dropped so no step appears twice.
        keep = [r for r in self.records() if resume_step is not None and r.get("step", 0) <= resume_step]
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # ~1.2 s to import; only with tensorboard on
            except ImportError:  # tensorboard not installed: JSONL and PNG still record everything
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(self.out / "tb"), purge_step=resume_step)
        self._file = self.metrics_path.open("a", encoding="utf-8")

    def records(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        return out

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key in ("step", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(_tb_tag(key), value, step)
                elif key == "sample" and isinstance(value, str):
                    self.writer.add_text("sample", html.escape(value), step)
                elif key == "expert_load" and isinstance(value, list):
                    for layer, loads in enumerate(value):
                        for expert, frac in enumerate(loads):
                            self.writer.add_scalar(f"moe/layer{layer}/expert{expert}", frac, step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Flush logs and write `loss.png` and `report.html`."""
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        records = self.records()
        png = self.out / "loss.png"
        write_loss_plot(records, png)
        write_report(self.out / "report.html", self.config, records, summary or {}, png)


def _tb_tag(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def write_loss_plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # ~1.4 s to import; only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(
    path: Path, config: dict[str, Any], records: list[dict[str, Any]], summary: dict[str, Any], png: Path
) -> None:
    """A single self-contained HTML page: summary, loss curve (embedded), samples, MoE load, config."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lmstack run report</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}</style></head><body>",
        f"<h1>lmstack run: {esc(str(config.get('out', '')))}</h1>",
        "<h2>Summary</h2><table>",
    ]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"<tr><th>{esc(key)}</th><td>{esc(shown)}</td></tr>")
    parts.append("</table>")
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<h2>Loss</h2><img alt='loss curve' src='data:image/png;base64,{data}'>")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        parts.append(
            "<h2>Validation</h2><table><tr><th>step</th><th>tokens</th><th>val loss</th>"
            "<th>perplexity</th><th>bits/byte</th></tr>"
        )
        for r in evals:
            parts.append(
                f"<tr><td>{r['step']}</td><td>{r.get('tokens', 0):,}</td><td>{r['val_loss']:.4f}</td>"
                f"<td>{r.get('val_ppl', math.nan):.2f}</td><td>{r.get('val_bpb', math.nan):.4f}</td></tr>"
            )
        parts.append("</table>")
    samples = [r for r in records if r.get("sample")]
    if samples:
        parts.append("<h2>Samples</h2>")
        for r in samples[-5:]:
            parts.append(f"<p>step {r['step']}:</p><pre><b>{esc(r.get('prompt', ''))}</b>{esc(r['sample'])}</pre>")
    loads = [r for r in records if r.get("expert_load")]
    if loads:
        last = loads[-1]
        parts.append(
            f"<h2>MoE expert load (step {last['step']})</h2><table><tr><th>layer</th>"
            + "".join(f"<th>expert {e}</th>" for e in range(len(last["expert_load"][0])))
            + "</tr>"
        )
        for layer, row in enumerate(last["expert_load"]):
            parts.append(f"<tr><td>{layer}</td>" + "".join(f"<td>{v:.3f}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    parts.append(f"<h2>Config</h2><pre>{esc(yaml.safe_dump(config, sort_keys=False))}</pre></body></html>")
    atomic_write_text(path, "\n".join(parts))
