"""The run report: what was kept, what was removed and why, as JSON, PNG plots and one HTML page."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from lmstack.data.curate.document import merge_stats
from lmstack.utils.io import atomic_path, atomic_write_text

_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>lmstack data report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 6px; white-space: pre-wrap; font-size: 12px;
      max-height: 8em; overflow: auto; }
.warn { color: #a40; } img { max-width: 100%; }
</style></head><body>
<h1>Data curation report</h1>
<p><b>{{ s.line }}</b></p>
{% for w in s.warnings %}<p class="warn">⚠ {{ w }}</p>{% endfor %}
<h2>Blocks</h2>
<table><tr><th>block</th><th>seen</th><th>kept</th><th>dropped (reason: count)</th><th>edits</th></tr>
{% for b in s.blocks %}<tr><td>{{ b.name }}</td><td class="n">{{ b.seen }}</td><td class="n">{{ b.kept }}</td>
<td>{% for r, c in b.dropped.items() %}{{ r }}: {{ c }}<br>{% endfor %}</td>
<td>{% for r, c in b.edits.items() %}{{ r }}: {{ c }}<br>{% endfor %}</td></tr>{% endfor %}
</table>
<img src="plots/funnel.png" alt="documents after each block">
<h2>Sources</h2>
<table><tr><th>source</th><th>files</th><th>read</th><th>after filters</th><th>written</th>
<th>~tokens written</th><th>sampling ratio</th></tr>
{% for name, r in s.sources.items() %}<tr><td>{{ name }}</td><td class="n">{{ r.files }}</td>
<td class="n">{{ r.read }}</td>
<td class="n">{{ r.curated }}</td><td class="n">{{ r.written }}</td><td class="n">{{ r.tokens }}</td>
<td class="n">{{ "%.3f"|format(r.ratio) }}</td></tr>{% endfor %}
</table>
<h2>Lengths and languages</h2>
<img src="plots/lengths.png" alt="length histograms"> <img src="plots/languages.png" alt="languages">
<table><tr><th>language</th><th>documents written</th></tr>
{% for lang, c in s.languages.items() %}<tr><td>{{ lang }}</td><td class="n">{{ c }}</td></tr>
{% endfor %}</table>
<h2>PII replaced</h2>
<table><tr><th>type</th><th>count</th></tr>
{% for k, c in s.pii.items() %}<tr><td>{{ k }}</td><td class="n">{{ c }}</td></tr>
{% else %}<tr><td colspan=2>none</td></tr>{% endfor %}
</table>
<h2>Duplicate clusters (largest first)</h2>
{% for cluster in s.clusters %}<h3>cluster {{ loop.index }}</h3>
{% for m in cluster %}<pre>{{ m }}</pre>{% endfor %}
{% else %}<p>no near-duplicate clusters</p>{% endfor %}
<h2>Dropped examples</h2>
{% for b in s.blocks %}{% for reason, docs in b.examples.items() %}<h3>{{ b.name }}: {{ reason }}</h3>
{% for d in docs %}<pre>{{ d }}</pre>{% endfor %}{% endfor %}{% endfor %}
<h2>Input problems ({{ s.error_count }})</h2>
{% for b in s.blocks %}{% for e in b.errors %}<pre>{{ b.name }}: {{ e }}</pre>{% endfor %}{% endfor %}
{% if s.tokens %}<h2>Token shards</h2><pre>{{ s.tokens | tojson(indent=2) }}</pre>{% endif %}
</body></html>
"""


def build_summary(
    recipe, tasks, collect_stats, stage1, dedup, stage3, tokens_meta, out_dir, length_bin_edges: list[float]
) -> dict[str, Any]:
    """Everything report.json and report.html show. `length_bin_edges`: the document-length histogram's
    bin edges in characters (the histograms in stage1/stage3 were counted with them)."""
    per_shard = [collect_stats] + [m["stats"] for m in stage1] + [dedup["stats"]] + [m["stats"] for m in stage3]
    blocks = [b.to_dict() for b in merge_stats(per_shard)]
    sources: dict[str, dict[str, Any]] = {
        s.name: {
            "files": 0,
            "read": 0,
            "curated": 0,
            "written": 0,
            "tokens": 0,
            "ratio": dedup["ratios"][s.name],
        }
        for s in recipe.sources
    }
    for task, m1, m3 in zip(tasks, stage1, stage3, strict=True):
        row = sources[task.source]
        row["files"] += 1
        row["read"] += m1["stats"][0]["kept"]
        row["curated"] += m1["documents"]
        row["written"] += m3["documents"]
        row["tokens"] += m3["tokens"]
    warnings = [f"source {name!r} produced no documents" for name, r in sources.items() if r["read"] == 0]
    warnings += [
        f"source {name!r}: every document was filtered out"
        for name, r in sources.items()
        if r["read"] and not r["written"]
    ]
    pii = {k: v for b in blocks if b["name"] == "pii" for k, v in b["edits"].items() if k != "documents_changed"}
    languages = sum((Counter(m["languages"]) for m in stage3), Counter())
    read = sum(r["read"] for r in sources.values())
    written = sum(r["written"] for r in sources.values())
    tokens = sum(r["tokens"] for r in sources.values())
    files = [f for m in stage3 for f in m["files"]]
    error_count = sum(b["error_count"] for b in blocks)
    line = (
        f"prepared: {read:,} documents read from {len(sources)} sources -> {written:,} written "
        f"({100 * written / max(1, read):.1f}%) in {len(files)} shards, ~{tokens:,} tokens; "
        f"{error_count} input problems; report: {Path(out_dir) / 'report.html'}"
    )
    return {
        "line": line,
        "out": str(out_dir),
        "documents_read": read,
        "documents_written": written,
        "tokens_estimated": tokens,
        "files": files,
        "blocks": blocks,
        "sources": sources,
        "languages": dict(languages.most_common()),
        "pii": pii,
        "clusters": dedup["clusters"],
        "length_bin_edges": length_bin_edges,
        "input_lengths": np.sum([m["input_lengths"] for m in stage1], axis=0).tolist(),
        "output_lengths": np.sum([m["output_lengths"] for m in stage3], axis=0).tolist(),
        "error_count": error_count,
        "warnings": warnings,
        "tokens": tokens_meta,
    }


def write_report(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    out = Path(out_dir)
    _plots(out / "plots", summary)
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, ensure_ascii=False))
    html = jinja2.Environment(autoescape=True).from_string(_TEMPLATE).render(s=summary)
    atomic_write_text(out / "report.html", html)
    return out / "report.html"


def _plots(plot_dir: Path, summary: dict[str, Any]) -> None:
    import matplotlib  # ~1.4 s to import; only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("input_lengths", "read"), ("output_lengths", "written")):
        ax.stairs(summary[key], summary["length_bin_edges"], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("document length (characters)")
    ax.set_ylabel("documents")
    ax.legend()
    _save(fig, plot_dir / "lengths.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    langs = list(summary["languages"].items())[:20]
    ax.bar([k for k, _ in langs], [v for _, v in langs])
    ax.set_ylabel("documents written")
    ax.set_title("languages")
    _save(fig, plot_dir / "languages.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [b["name"] for b in summary["blocks"]]
    ax.barh(names[::-1], [b["kept"] for b in summary["blocks"]][::-1])
    ax.set_xlabel("documents kept after the block")
    _save(fig, plot_dir / "funnel.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
