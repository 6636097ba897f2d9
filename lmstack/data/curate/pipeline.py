"""`lmstack data prepare`: recipe YAML -> blocks -> sharded, resumable run -> corpus + report.

Stages (each shard-parallel stage writes a completion marker per shard, last and atomically, so a rerun
skips finished work and a crash loses at most the shards in flight):
  0. collect   web sources are fetched into OUT/work/web/<source>/ (resumable on its own)
  1. process   per input file: read -> [html_extract] -> pipeline blocks -> documents + dedup keys
  2. dedup     global, in the driver: exact and MinHash/LSH clusters, optional line dedup, mixing ratios
  3. write     per input file: keep/drop from stage 2, mix copies -> OUT/data/*.jsonl|parquet
  4. tokenize  optional: OUT/tokens (meta.json + .bin shards) via lmstack.data.tokenize
  5. report    OUT/report.html, OUT/report.json, OUT/plots/*.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmstack.data.curate.base import Block
from lmstack.data.curate.collect import WebConfig, collect
from lmstack.data.curate.decontam import DecontamConfig
from lmstack.data.curate.dedup import DedupConfig, LineDeduper, MinHasher, decide, exact_key
from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.filters import (
    BadWordsConfig,
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    LengthConfig,
)
from lmstack.data.curate.mix import MixConfig, copies, estimate_tokens, sampling_ratios
from lmstack.data.curate.normalize import HtmlExtractConfig, NormalizeConfig
from lmstack.data.curate.pii import PiiConfig
from lmstack.data.curate.ray_executor import map_tasks_on_ray
from lmstack.data.curate.readers import ReadTask, SourceConfig, make_tasks, read_task
from lmstack.data.curate.report import build_summary, write_report
from lmstack.data.curate.writers import ShardWriter, read_jsonl_documents, write_jsonl_documents
from lmstack.data.tokenize import tokenize_corpus
from lmstack.errors import LmstackError, require
from lmstack.utils.config_loader import build_dataclass, load_yaml, merge, parse_overrides, unknown_key_message
from lmstack.utils.io import atomic_path, atomic_write_text

BLOCK_CONFIGS: dict[str, type] = {
    "html_extract": HtmlExtractConfig,
    "normalize": NormalizeConfig,
    "language": LanguageConfig,
    "gopher_repetition": GopherRepetitionConfig,
    "gopher_quality": GopherQualityConfig,
    "c4": C4Config,
    "badwords": BadWordsConfig,
    "fineweb": FineWebConfig,
    "length": LengthConfig,
    "pii": PiiConfig,
    "decontaminate": DecontamConfig,
}
# FineWeb's order, minus C4's line rules (opt in with `- c4`), plus PII scrubbing.
DEFAULT_PIPELINE = ["normalize", "language", "gopher_repetition", "gopher_quality", "fineweb", "pii"]
HTML_TYPES = ("html", "warc", "web")
LENGTH_BINS = np.linspace(0, 7, 57)  # log10(characters): 8 bins per decade up to 10 M characters


@dataclass
class OutputConfig:
    format: str = "jsonl"
    docs_per_shard: int = 100_000
    tokenizer: str = ""  # a tokenizer directory: also tokenize the corpus into OUT/tokens
    val_fraction: float = 0.01


@dataclass
class ExecutorConfig:
    kind: str = "local"  # local (process pool) | ray
    address: str = ""  # ray: cluster address such as "auto" or "ray://head:10001"; empty starts a local Ray

    def __post_init__(self) -> None:
        require(self.kind in ("local", "ray"), f"executor.kind must be local or ray, got {self.kind!r}")


@dataclass
class Recipe:
    sources: list[SourceConfig]
    pipeline: list[tuple[str, Any]]  # (block name, its config)
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    base_dir: str = "."  # relative paths in the recipe are relative to the recipe file


# --- Recipe parsing -------------------------------------------------------------------------------

_TOP_KEYS = ("sources", "pipeline", "dedup", "mix", "output", "executor")


def parse_recipe(values: dict[str, Any], base_dir: str | Path = ".") -> Recipe:
    """A recipe mapping -> `Recipe`; every unknown key is an error that names it."""
    for key in values:
        if key not in _TOP_KEYS:
            raise LmstackError(unknown_key_message(key, list(_TOP_KEYS), "recipe"))
    raw_sources = values.get("sources")
    require(
        isinstance(raw_sources, list) and raw_sources,
        "recipe needs `sources:`, a list of inputs (see docs/data.md)",
    )
    sources = [_parse_source(s, i) for i, s in enumerate(raw_sources)]
    names = [s.name for s in sources]
    require(len(set(names)) == len(names), f"source names must be unique, got {names}")
    dedup_values = values.get("dedup", {})
    return Recipe(
        sources=sources,
        pipeline=[_parse_block(item, i) for i, item in enumerate(values.get("pipeline", DEFAULT_PIPELINE))],
        dedup=None if dedup_values is False else build_dataclass(DedupConfig, _mapping(dedup_values, "dedup"), "dedup"),
        mix=build_dataclass(MixConfig, _mapping(values.get("mix", {}), "mix"), "mix"),
        output=build_dataclass(OutputConfig, _mapping(values.get("output", {}), "output"), "output"),
        executor=build_dataclass(ExecutorConfig, _mapping(values.get("executor", {}), "executor"), "executor"),
        base_dir=str(base_dir),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    require(isinstance(value, dict), f"{where} must be a mapping of keys to values, got {value!r}")
    return value


def _parse_source(value: Any, index: int) -> SourceConfig:
    values = dict(_mapping(value, f"sources[{index}]"))
    where = f"sources[{index}]"
    values.setdefault("name", f"source{index}")
    if isinstance(values.get("paths"), str):
        values["paths"] = [values["paths"]]
    if "web" in values:
        web = dict(_mapping(values["web"], f"{where}.web"))
        for key in ("urls", "seeds"):
            if isinstance(web.get(key), str):
                web[key] = [web[key]]
        values["web"] = build_dataclass(WebConfig, web, f"{where}.web")
        values.setdefault("type", "web")
    return build_dataclass(SourceConfig, values, where)


def _parse_block(item: Any, index: int) -> tuple[str, Any]:
    if isinstance(item, str):
        name, values = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, values = next(iter(item.items()))
        values = _mapping(values, f"pipeline[{index}].{name}")
    else:
        raise LmstackError(f"pipeline[{index}] must be a block name or `- name: {{options}}`, got {item!r}")
    if name not in BLOCK_CONFIGS:
        raise LmstackError(
            unknown_key_message(name, list(BLOCK_CONFIGS), f"pipeline[{index}]").replace(
                "unknown config key", "unknown block"
            )
        )
    return name, build_dataclass(BLOCK_CONFIGS[name], values, name)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    values = merge(load_yaml(path), parse_overrides(overrides or []))
    return parse_recipe(values, Path(path).resolve().parent)


def recipe_fingerprint(recipe: Recipe) -> str:
    """What decides the outputs; a rerun into the same OUT must match it to reuse finished shards."""
    decisive = dataclasses.asdict(recipe)
    decisive.pop("executor")
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_blocks(recipe: Recipe, with_html: bool) -> list[Block]:
    blocks = []
    names = [name for name, _ in recipe.pipeline]
    if with_html and "html_extract" not in names:
        blocks.append(HtmlExtractConfig().build())
    for name, cfg in recipe.pipeline:
        reads_files = name in ("decontaminate", "badwords")  # their file paths are relative to the recipe
        blocks.append(cfg.build(Path(recipe.base_dir)) if reads_files else cfg.build())
    return blocks


# --- Shared run context and per-process block cache -----------------------------------------------


@dataclass
class RunContext:
    recipe: Recipe
    out_dir: str
    fingerprint: str
    with_html: bool

    @property
    def work(self) -> Path:
        return Path(self.out_dir) / "work"


_BLOCKS: dict[str, list[Block]] = {}  # per worker process: blocks are built once (decontam indexes, models)


def _blocks(ctx: RunContext) -> list[Block]:
    if ctx.fingerprint not in _BLOCKS:
        _BLOCKS[ctx.fingerprint] = build_blocks(ctx.recipe, ctx.with_html)
    return _BLOCKS[ctx.fingerprint]


def _length_histogram(lengths: list[int]) -> list[int]:
    values = np.log10(np.maximum(np.asarray(lengths, dtype=np.float64), 1.0))
    return np.histogram(values, bins=LENGTH_BINS)[0].tolist()


def _observe(docs: Iterator[Document], lengths: list[int]) -> Iterator[Document]:
    for doc in docs:
        lengths.append(len(doc.text))
        yield doc


# --- Stage 1: read, clean, filter; dedup keys ------------------------------------------------------


def process_task(ctx: RunContext, task: ReadTask) -> dict[str, Any]:
    """Stage 1 for one input file. Writes documents, dedup keys and, last, the marker with the stats."""
    read_stats = BlockStats("read")
    input_lengths: list[int] = []
    docs: Iterator[Document] = _observe(read_task(task, read_stats), input_lengths)
    block_stats = [read_stats]
    for block in _blocks(ctx):
        stats = BlockStats(block.name)
        block_stats.append(stats)
        docs = block.run(docs, stats)
    kept = list(docs)
    stage = ctx.work / "stage1"
    write_jsonl_documents(stage / f"{task.task_id}.jsonl", kept)
    dedup = ctx.recipe.dedup
    keys = {"tokens": np.array([estimate_tokens(d.text) for d in kept], dtype=np.int64)}
    if dedup and dedup.exact:
        keys["exact"] = np.array([exact_key(d.text) for d in kept], dtype=np.uint64)
    if dedup and dedup.minhash:
        hasher = MinHasher(dedup.num_perm, dedup.ngram, dedup.unit, dedup.seed)
        keys["signatures"] = hasher.signatures([d.text for d in kept])
    with atomic_path(stage / f"{task.task_id}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **keys)
    marker = {
        "task": dataclasses.asdict(task),
        "documents": len(kept),
        "stats": [s.to_dict() for s in block_stats],
        "input_lengths": _length_histogram(input_lengths),
        "languages": dict(Counter(d.metadata.get("language", "unknown") for d in kept)),
    }
    atomic_write_text(stage / f"{task.task_id}.json", json.dumps(marker))
    return marker


# --- Stage 2: global dedup, line dedup, mixing ratios ----------------------------------------------


def dedup_stage(ctx: RunContext, tasks: list[ReadTask], markers: list[dict[str, Any]]) -> dict[str, Any]:
    marker_path = ctx.work / "dedup.json"
    if marker_path.is_file():
        return json.loads(marker_path.read_text())
    recipe, stage1 = ctx.recipe, ctx.work / "stage1"
    arrays = [np.load(stage1 / f"{t.task_id}.npz") for t in tasks]
    counts = [m["documents"] for m in markers]
    n = sum(counts)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    tokens = np.concatenate([a["tokens"] for a in arrays]) if n else np.zeros(0, np.int64)
    dedup = recipe.dedup
    stats = BlockStats("dedup", seen=n)
    keep = np.ones(n, dtype=bool)
    clusters: list[list[str]] = []
    if dedup and n:
        exact = np.concatenate([a["exact"] for a in arrays]) if dedup.exact else None
        sig = np.concatenate([a["signatures"] for a in arrays]) if dedup.minhash else None
        source = _stage1_shingle_source(stage1, tasks, offsets, dedup)
        result = decide(n, exact, sig, dedup, source)
        keep = result.keep
        stats.dropped.update(r for r in result.reason if r)
        if result.chains:
            # components of the similarity graph kept as several clusters: union-find would have chained them
            stats.edits["chains_split"] += result.chains
        clusters = _cluster_examples(result.cluster, keep, offsets, tasks, stage1, dedup.cluster_examples)
    stats.kept = int(keep.sum())
    line_removals, line_stats = _line_dedup(ctx, tasks, keep, offsets)
    source_of_doc = np.repeat([t.source for t in tasks], counts) if n else np.zeros(0, dtype=str)
    available = {s.name: int(tokens[keep & (source_of_doc == s.name)].sum()) for s in recipe.sources}
    ratios = sampling_ratios(
        available,
        {s.name: s.weight for s in recipe.sources},
        {s.name: s.target_tokens for s in recipe.sources},
        recipe.mix,
    )
    for i, task in enumerate(tasks):
        decision = {"keep": keep[offsets[i] : offsets[i + 1]].tolist(), "lines": line_removals.get(i, {})}
        atomic_write_text(ctx.work / "dedup" / f"{task.task_id}.json", json.dumps(decision))
    summary = {
        "stats": [stats.to_dict()] + ([line_stats.to_dict()] if line_stats else []),
        "clusters": clusters,
        "available_tokens": available,
        "ratios": ratios,
    }
    atomic_write_text(marker_path, json.dumps(summary))
    return summary


def _stage1_shingle_source(
    stage1: Path, tasks: list[ReadTask], offsets: np.ndarray, dedup: DedupConfig
) -> Callable[[np.ndarray], dict[int, np.ndarray]]:
    """Shingle sets of candidate documents for the exact Jaccard check, re-read from stage 1's output.

    Only the files that hold candidates are read, and only candidates are shingled, so the driver never
    holds the shingles of the whole corpus (signatures are all it keeps for every document)."""
    hasher = MinHasher(dedup.num_perm, dedup.ngram, dedup.unit, dedup.seed)

    def source(index: np.ndarray) -> dict[int, np.ndarray]:
        task_of = np.searchsorted(offsets, index, side="right") - 1
        out: dict[int, np.ndarray] = {}
        for t in np.unique(task_of):
            docs = read_jsonl_documents(stage1 / f"{tasks[t].task_id}.jsonl")
            wanted = index[task_of == t]
            sets = hasher.shingle_sets([docs[i - offsets[t]].text for i in wanted])
            out.update(zip(wanted.tolist(), sets, strict=True))
        return out

    return source


def _cluster_examples(
    cluster: np.ndarray,
    keep: np.ndarray,
    offsets: np.ndarray,
    tasks: list[ReadTask],
    stage1: Path,
    limit: int,
) -> list[list[str]]:
    """Snippets of the largest near-duplicate clusters, the kept member first."""
    labels, sizes = np.unique(cluster, return_counts=True)
    biggest = labels[np.argsort(-sizes, kind="stable")][:limit]
    chosen = [np.flatnonzero(cluster == label)[:3] for label in biggest if (cluster == label).sum() > 1]
    needed = {int(np.searchsorted(offsets, i, side="right") - 1) for members in chosen for i in members}
    docs = {t: read_jsonl_documents(stage1 / f"{tasks[t].task_id}.jsonl") for t in needed}
    out = []
    for members in chosen:
        examples = []
        for i in members:
            t = int(np.searchsorted(offsets, i, side="right") - 1)
            doc = docs[t][i - offsets[t]]
            examples.append(f"{'kept' if keep[i] else 'dropped'} [{doc.id}] {doc.text[:300]}")
        out.append(examples)
    return out


def _line_dedup(
    ctx: RunContext, tasks: list[ReadTask], keep: np.ndarray, offsets: np.ndarray
) -> tuple[dict[int, dict[str, list[int]]], BlockStats | None]:
    dedup = ctx.recipe.dedup
    if not (dedup and dedup.lines):
        return {}, None
    deduper, stats, removals = LineDeduper(dedup.min_line_chars), BlockStats("line_dedup"), {}
    for t, task in enumerate(tasks):
        docs = read_jsonl_documents(ctx.work / "stage1" / f"{task.task_id}.jsonl")
        for j, doc in enumerate(docs):
            if keep[offsets[t] + j]:
                repeated = deduper.repeated_lines(doc.text)
                if repeated:
                    removals.setdefault(t, {})[str(j)] = repeated
                    stats.edits["lines_removed"] += len(repeated)
    return removals, stats


# --- Stage 3: apply decisions, mix, write ----------------------------------------------------------


def write_task(ctx: RunContext, task: ReadTask) -> dict[str, Any]:
    recipe = ctx.recipe
    decision = json.loads((ctx.work / "dedup" / f"{task.task_id}.json").read_text())
    ratio = json.loads((ctx.work / "dedup.json").read_text())["ratios"][task.source]
    docs = read_jsonl_documents(ctx.work / "stage1" / f"{task.task_id}.jsonl")
    line_stats, mix_stats = BlockStats("line_dedup"), BlockStats("mix")
    writer = ShardWriter(Path(ctx.out_dir) / "data", task.task_id, recipe.output.format, recipe.output.docs_per_shard)
    lengths, languages, tokens = [], Counter(), 0
    for j, doc in enumerate(docs):
        if not decision["keep"][j]:
            continue
        removed = decision["lines"].get(str(j))
        if removed:
            line_stats.seen += 1
            drop = set(removed)
            doc.text = "\n".join(line for k, line in enumerate(doc.text.split("\n")) if k not in drop).strip()
            if not doc.text:
                line_stats.drop(doc, "empty_after_line_dedup")
                continue
            line_stats.kept += 1
        mix_stats.seen += 1
        n_copies = copies(doc.id, ratio, recipe.mix.seed)
        if n_copies == 0:
            mix_stats.drop(doc, "downsampled")
            continue
        mix_stats.kept += 1
        mix_stats.edits["extra_copies"] += n_copies - 1
        for k in range(n_copies):
            copy = doc if k == 0 else Document(doc.text, f"{doc.id}#{k}", {**doc.metadata, "copy": k})
            writer.write(copy)
            lengths.append(len(doc.text))
            languages[doc.metadata.get("language", "unknown")] += 1
            tokens += estimate_tokens(doc.text)
    files = writer.close()
    marker = {
        "files": [str(p.relative_to(ctx.out_dir)) for p in files],
        "documents": writer.documents,
        "tokens": tokens,
        "stats": [s.to_dict() for s in (line_stats, mix_stats) if s.seen],
        "output_lengths": _length_histogram(lengths),
        "languages": dict(languages),
    }
    atomic_write_text(ctx.work / "stage3" / f"{task.task_id}.json", json.dumps(marker))
    return marker


# --- Executors -------------------------------------------------------------------------------------


def _run_sharded(
    fn: Callable[[RunContext, ReadTask], dict],
    ctx: RunContext,
    tasks: list[ReadTask],
    stage: str,
    workers: int,
    desc: str,
) -> list[dict[str, Any]]:
    """Results for every task: finished ones from their markers, the rest computed (in parallel)."""
    markers = [ctx.work / stage / f"{t.task_id}.json" for t in tasks]
    todo = [i for i, m in enumerate(markers) if not m.is_file()]
    if todo:
        if ctx.recipe.executor.kind == "ray":
            map_tasks_on_ray(fn, ctx, [tasks[i] for i in todo], ctx.recipe.executor.address, workers, desc)
        elif workers <= 1 or len(todo) == 1:
            for i in tqdm(todo, desc=desc, unit="shard", file=sys.stderr):
                fn(ctx, tasks[i])
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
                futures = [pool.submit(fn, ctx, tasks[i]) for i in todo]
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="shard", file=sys.stderr):
                    future.result()
    return [json.loads(m.read_text()) for m in markers]


# --- The whole run ---------------------------------------------------------------------------------


def prepare(recipe_path: str, out_dir: str, workers: int = 0, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run a data recipe into `out_dir`; resumes an interrupted run of the same recipe. Returns a summary."""
    return run_recipe(load_recipe(recipe_path, overrides), out_dir, workers)


def run_recipe(recipe: Recipe, out_dir: str | Path, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    out = Path(out_dir)
    workers = workers or os.cpu_count() or 1
    fingerprint = recipe_fingerprint(recipe)
    _claim_output_dir(out, fingerprint)
    collect_stats = _collect_web_sources(recipe, out / "work" / "web", progress)
    tasks = _list_tasks(recipe, out / "work" / "web")
    ctx = RunContext(recipe, str(out), fingerprint, any(t.type in HTML_TYPES for t in tasks))
    stage1 = _run_sharded(process_task, ctx, tasks, "stage1", workers, "process")
    _check_not_empty(recipe, stage1)
    dedup = dedup_stage(ctx, tasks, stage1)
    stage3 = _run_sharded(write_task, ctx, tasks, "stage3", workers, "write")
    files = [out / f for m in stage3 for f in m["files"]]
    tokens_meta = _tokenize(recipe, out, files, workers)
    edges = (10**LENGTH_BINS).tolist()
    summary = build_summary(recipe, tasks, collect_stats, stage1, dedup, stage3, tokens_meta, str(out), edges)
    write_report(out, summary)
    print(summary["line"], file=sys.stderr)
    return summary


def _claim_output_dir(out: Path, fingerprint: str) -> None:
    stamp = out / "work" / "recipe.json"
    if stamp.is_file():
        previous = json.loads(stamp.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise LmstackError(
                f"{out} holds a run of a different recipe; pass a new --out, or delete {out / 'work'} to start over"
            )
    else:
        atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint}))


def _collect_web_sources(recipe: Recipe, web_dir: Path, progress: bool) -> list[dict[str, Any]]:
    out = []
    for source in recipe.sources:
        if source.type != "web":
            continue
        result = collect(source.web, web_dir / source.name, progress=progress)
        stats = BlockStats(f"collect:{source.name}", seen=result.fetched + len(result.errors), kept=result.fetched)
        for e in result.errors:
            reason = "robots_disallowed" if "robots" in e["error"] else "fetch_failed"
            stats.error(f"{e['url']}: {e['error']}", reason)
        out.append(stats.to_dict())
    return out


def _list_tasks(recipe: Recipe, web_dir: Path) -> list[ReadTask]:
    tasks = []
    for i, source in enumerate(recipe.sources):
        if source.type == "web":
            pages = web_dir / source.name / "pages.jsonl"
            tasks.append(ReadTask(f"{i:02d}-{source.name}-00000", source.name, "web", str(pages)))
        else:
            tasks.extend(make_tasks(i, source, Path(recipe.base_dir)))
    return tasks


def _check_not_empty(recipe: Recipe, stage1: list[dict[str, Any]]) -> None:
    read = Counter()
    for marker in stage1:
        read[marker["task"]["source"]] += marker["stats"][0]["kept"]
    if not any(read.values()):
        names = ", ".join(s.name for s in recipe.sources)
        raise LmstackError(f"no documents could be read from any source ({names}); check the paths and text_field")


def _tokenize(recipe: Recipe, out: Path, files: list[Path], workers: int) -> dict[str, Any] | None:
    if not recipe.output.tokenizer:
        return None
    meta_path = out / "tokens" / "meta.json"
    marker = out / "work" / "tokenize.done"
    if marker.is_file() and meta_path.is_file():
        return json.loads(meta_path.read_text())
    tokenizer = Path(recipe.output.tokenizer)
    if not tokenizer.is_absolute():
        tokenizer = Path(recipe.base_dir) / tokenizer
    meta = tokenize_corpus(
        files, tokenizer, out / "tokens", val_fraction=recipe.output.val_fraction, workers=min(workers, 4)
    )
    atomic_write_text(marker, "done\n")
    return meta
