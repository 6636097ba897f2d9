"""Serving under load: N concurrent streaming clients vs the same requests served one at a time.

Run:  python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--clients 16] [--requests 32]
                                     [--max-tokens 48] [--temperature 0] [--rounds 1] [--soak 0]
                                     [--gguf-weights packed]

Starts `lmstack serve` in a subprocess on loopback and sends chat requests through the streaming
API (SSE, `stream_options.include_usage`) with httpx. Every request generates exactly --max-tokens
tokens (`ignore_eos`), so both phases do the same work:
  - serial:      the --requests requests one after another (one client),
  - concurrent:  the same requests from --clients clients at once (each client sends its next request
                 as soon as the previous one ends).
Figures per phase: aggregate generated tokens/s (all tokens / wall time), time to first token p50/p99,
time per output token (mean over requests), failures (non-200, an error event or no `[DONE]`). The
last line is the concurrent/serial throughput ratio, the median over --rounds rounds.

--soak S runs the concurrent clients for S more seconds, sampling the server's resident memory
(RSS) every 5 s, and prints first/last/peak RSS and the failures: memory should stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOPICS = [
    "why the sky is blue",
    "how a bicycle stays upright",
    "the history of the printing press",
    "what makes bread rise",
    "how vaccines train the immune system",
    "why leaves change colour in autumn",
    "how a refrigerator works",
    "the life cycle of a star",
]


def prompt(i: int) -> str:
    """Prompts of varied length, so prefill and decode mix in the batch as they do in real traffic."""
    detail = " Mention one surprising fact and one common misconception." * (i % 4)
    return f"Explain {TOPICS[i % len(TOPICS)]} to a curious twelve-year-old.{detail}"


@dataclass
class Result:
    ok: bool
    tokens: int = 0
    ttft: float = 0.0
    tpot: float = 0.0
    error: str = ""


@dataclass
class Phase:
    name: str
    wall: float
    results: list[Result] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results if r.ok) / self.wall

    @property
    def failures(self) -> int:
        return sum(not r.ok for r in self.results)

    def line(self) -> str:
        ok = [r for r in self.results if r.ok]
        ttfts = sorted(r.ttft for r in ok) or [float("nan")]
        p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
        tpot = statistics.mean(r.tpot for r in ok) if ok else float("nan")
        return (
            f"{self.name:<11} {len(self.results):>4} req  {self.wall:7.1f} s  {self.tokens_per_s:8.1f} tok/s  "
            f"TTFT p50 {statistics.median(ttfts) * 1000:7.0f} ms  p99 {p99 * 1000:7.0f} ms  "
            f"TPOT {tpot * 1000:6.1f} ms  failures {self.failures}"
        )


async def one_request(http: httpx.AsyncClient, model: str, text: str, max_tokens: int, temperature: float) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return Result(False, error=f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, error=event["error"]["message"])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif first is None and any(c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter()
    except httpx.HTTPError as exc:
        return Result(False, error=type(exc).__name__)
    end = time.perf_counter()
    if not done or first is None:
        return Result(False, error="stream ended without [DONE]")
    return Result(True, tokens, first - start, (end - first) / max(tokens - 1, 1))


async def run_phase(
    url: str, model: str, name: str, prompts: list[str], clients: int, max_tokens: int, temperature: float
) -> Phase:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[Result] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one_request(http, model, queue.get_nowait(), max_tokens, temperature))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return Phase(name, wall, results)


async def soak(
    url: str, model: str, clients: int, max_tokens: int, temperature: float, seconds: float, pid: int
) -> None:
    stop_at = time.monotonic() + seconds
    results: list[Result] = []
    rss: list[float] = []

    async def client(http: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            results.append(await one_request(http, model, prompt(i), max_tokens, temperature))
            i += clients

    async def sample() -> None:
        while time.monotonic() < stop_at:
            rss.append(rss_mb(pid))
            await asyncio.sleep(5)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(sample(), *(client(http, k) for k in range(clients)))
        wall = time.perf_counter() - start
    rss.append(rss_mb(pid))
    tokens = sum(r.tokens for r in results if r.ok)
    print(
        f"soak {wall:.0f} s: {len(results)} requests, {tokens / wall:.1f} tok/s, failures "
        f"{sum(not r.ok for r in results)}; server RSS first {rss[0]:.0f} MB, last {rss[-1]:.0f} MB, "
        f"peak {max(rss):.0f} MB; samples {' '.join(f'{x:.0f}' for x in rss)}"
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lmstack.cli", "serve", "--model", f"bench={args.model}", "--port", "0"]
    cmd += ["--max-num-seqs", str(max(args.clients, 1)), "--max-batch-tokens", str(args.max_batch_tokens)]
    cmd += ["--max-queue", str(max(args.requests, 256)), "--gguf-weights", args.gguf_weights]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        sys.stderr.write(line)
        found = re.search(r"on (http://[\d.]+:\d+)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        sys.exit(f"the server exited with code {proc.wait()}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.ConnectError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become healthy in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per phase (the same in both)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampled requests")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--gguf-weights",
        choices=("packed", "float"),
        default="packed",
        help="a GGUF model's weights as they are (packed) or dequantized to fp32 (float), as `lmstack serve` takes it",
    )
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of extra concurrent load with RSS samples")
    args = parser.parse_args()
    if min(args.clients, args.requests, args.max_tokens, args.rounds) < 1:
        parser.error("--clients, --requests, --max-tokens and --rounds must be >= 1")
    proc, url = start_server(args)
    try:
        prompts = [prompt(i) for i in range(args.requests)]
        # Warm-up: one request alone, then one per client at once, so that the decode steps of both
        # batch sizes are captured (docs/engine.md) and both phases meet the same prefix cache before
        # either is timed; otherwise the first concurrent phase pays the 16-row capture.
        asyncio.run(run_phase(url, "bench", "warm-up", prompts[:1], 1, 4, args.temperature))
        asyncio.run(run_phase(url, "bench", "warm-up", prompts[: args.clients], args.clients, 4, args.temperature))
        ratios = []
        for r in range(args.rounds):
            serial = asyncio.run(run_phase(url, "bench", "serial", prompts, 1, args.max_tokens, args.temperature))
            concurrent = asyncio.run(
                run_phase(
                    url, "bench", f"{args.clients} clients", prompts, args.clients, args.max_tokens, args.temperature
                )
            )
            print(f"round {r + 1}:\n  {serial.line()}\n  {concurrent.line()}")
            for phase in (serial, concurrent):
                for res in phase.results:
                    if not res.ok:
                        print(f"  failure in {phase.name}: {res.error}")
            ratios.append(concurrent.tokens_per_s / serial.tokens_per_s)
        print(
            f"concurrent/serial aggregate tokens/s at {args.clients} clients: {statistics.median(ratios):.2f}x "
            f"(median of {args.rounds} round(s): {', '.join(f'{x:.2f}' for x in ratios)})"
        )
        if args.soak > 0:
            asyncio.run(soak(url, "bench", args.clients, args.max_tokens, args.temperature, args.soak, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
