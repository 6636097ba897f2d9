"""Web collector: fetch a URL list, or crawl from seed URLs inside one domain.

Polite by construction: robots.txt is read and obeyed (including Crawl-delay), requests to a host are
spaced by `rate_limit`, failures are retried with exponential backoff, every request names itself with a
User-Agent. Resumable: fetched pages are appended to `pages.jsonl` and the crawl state (frontier,
failures) is written atomically after every page, so a rerun after a crash or Ctrl-C picks up where it
stopped and never refetches a stored page. Only the standard library is used (urllib, html.parser).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import urllib.robotparser
from collections import deque
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

from tqdm import tqdm

from lmstack.errors import require
from lmstack.utils.io import atomic_write_text

RETRY_STATUS = {429, 500, 502, 503, 504}
KEPT_CONTENT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


@dataclass
class WebConfig:
    urls: list[str] = field(default_factory=list)  # fetched as given, links not followed
    seeds: list[str] = field(default_factory=list)  # crawled: links followed inside `domain`
    domain: str = ""  # host to stay in (subdomains included); default: the first seed's host
    max_pages: int = 100
    max_depth: int = 3
    rate_limit: float = 1.0  # requests per second per host
    timeout: float = 10.0  # seconds per request
    retries: int = 3
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    user_agent: str = "lmstack-collector/0.1"
    respect_robots: bool = True

    def __post_init__(self) -> None:
        require(bool(self.urls or self.seeds), "web source needs `urls:` (a list to fetch) or `seeds:` (to crawl)")
        require(self.rate_limit > 0, f"web.rate_limit must be > 0 requests/s, got {self.rate_limit}")
        require(self.max_pages > 0, f"web.max_pages must be > 0, got {self.max_pages}")
        for url in [*self.urls, *self.seeds]:
            require(urlsplit(url).scheme in ("http", "https"), f"web: {url!r} is not an http(s) URL")


@dataclass
class CollectResult:
    pages_file: Path
    fetched: int  # pages stored in total (this run and earlier ones)
    new: int  # pages fetched by this run
    errors: list[dict[str, str]]  # {"url", "error"}: failed after retries, or refused by robots.txt


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def extract_links(html: str, base_url: str) -> list[str]:
    parser = _LinkParser()
    parser.feed(html)
    links = []
    for href in parser.links:
        url = urldefrag(urljoin(base_url, href))[0]
        if urlsplit(url).scheme in ("http", "https"):
            links.append(url)
    return links


class _Fetcher:
    """HTTP GET with a User-Agent, per-host spacing and retries with backoff."""

    def __init__(self, cfg: WebConfig):
        self.cfg = cfg
        self.last_request: dict[str, float] = {}
        self.min_interval: dict[str, float] = {}

    def wait_turn(self, host: str) -> None:
        interval = max(1.0 / self.cfg.rate_limit, self.min_interval.get(host, 0.0))
        delay = self.last_request.get(host, -1e9) + interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.last_request[host] = time.monotonic()

    def get(self, url: str) -> tuple[int, str, bytes]:
        """(status, content type, body). Raises OSError-family errors after the last retry."""
        host = urlsplit(url).netloc
        for attempt in range(self.cfg.retries + 1):
            self.wait_turn(host)
            request = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent})
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                    return response.status, response.headers.get("Content-Type", ""), response.read()
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS or attempt == self.cfg.retries:
                    return exc.code, exc.headers.get("Content-Type", "") if exc.headers else "", b""
            except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
                if attempt == self.cfg.retries:
                    raise OSError(_describe(exc)) from None
            time.sleep(self.cfg.backoff * 2**attempt)
        raise AssertionError("unreachable")


def _describe(exc: Exception) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, socket.timeout | TimeoutError) or "timed out" in str(reason):
        return "timed out"
    return str(reason)


class _Robots:
    """robots.txt per host, fetched once through the same polite fetcher."""

    def __init__(self, fetcher: _Fetcher, user_agent: str):
        self.fetcher, self.user_agent = fetcher, user_agent
        self.parsers: dict[str, urllib.robotparser.RobotFileParser | None] = {}

    def allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        host = parts.netloc
        if host not in self.parsers:
            self.parsers[host] = self._load(f"{parts.scheme}://{host}/robots.txt", host)
        parser = self.parsers[host]
        return parser is None or parser.can_fetch(self.user_agent, url)

    def _load(self, robots_url: str, host: str) -> urllib.robotparser.RobotFileParser | None:
        try:
            status, _, body = self.fetcher.get(robots_url)
        except OSError:
            return None  # unreachable robots.txt: the page fetch will report the real problem
        if status >= 400:
            return None  # no robots.txt: everything is allowed
        parser = urllib.robotparser.RobotFileParser(robots_url)
        parser.parse(body.decode("utf-8", errors="replace").splitlines())
        delay = parser.crawl_delay(self.user_agent)
        if delay:
            self.fetcher.min_interval[host] = float(delay)
        return parser


def _in_domain(url: str, domain: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == domain or host.endswith("." + domain)


def collect(cfg: WebConfig, state_dir: str | Path, progress: bool = True) -> CollectResult:
    """Fetch `cfg.urls` and crawl `cfg.seeds` into `state_dir/pages.jsonl`; resumes a previous run."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    pages_file, state_file = state_dir / "pages.jsonl", state_dir / "state.json"
    _drop_partial_last_line(pages_file)
    stored = _stored_urls(pages_file)
    state = _load_state(state_file, cfg)
    queued = {url for url, _ in state["frontier"]}
    failed = {e["url"] for e in state["errors"]}
    domain = cfg.domain or (urlsplit(cfg.seeds[0]).hostname if cfg.seeds else "")
    fetcher = _Fetcher(cfg)
    robots = _Robots(fetcher, cfg.user_agent) if cfg.respect_robots else None
    frontier = deque(state["frontier"])
    new = 0
    bar = tqdm(
        total=cfg.max_pages,
        initial=len(stored),
        desc="collect",
        unit="page",
        file=sys.stderr,
        disable=not progress,
    )
    with open(pages_file, "ab") as out:
        while frontier and len(stored) < cfg.max_pages:
            url, depth = frontier.popleft()
            if url in stored or url in failed:
                continue
            page, error, links = _visit(url, fetcher, robots)
            if error:
                state["errors"].append({"url": url, "error": error})
                failed.add(url)
            elif page is not None:
                line = json.dumps({"url": url, "html": page, "fetched_at": time.time()}, ensure_ascii=False)
                out.write(line.encode("utf-8") + b"\n")
                out.flush()
                os.fsync(out.fileno())
                stored.add(url)
                new += 1
                bar.update(1)
                if depth is not None and depth < cfg.max_depth:
                    for link in links:
                        if _in_domain(link, domain) and link not in stored and link not in queued:
                            frontier.append((link, depth + 1))
                            queued.add(link)
            state["frontier"] = list(frontier)
            atomic_write_text(state_file, json.dumps(state))
    bar.close()
    return CollectResult(pages_file, len(stored), new, state["errors"])


def _visit(url: str, fetcher: _Fetcher, robots: _Robots | None) -> tuple[str | None, str, list[str]]:
    """(html or None, error message or "", links). Non-HTML responses are skipped silently."""
    if robots is not None and not robots.allowed(url):
        return None, "disallowed by robots.txt", []
    try:
        status, content_type, body = fetcher.get(url)
    except OSError as exc:
        return None, f"fetch failed: {exc}", []
    if status >= 400:
        return None, f"HTTP {status}", []
    if not content_type.startswith(KEPT_CONTENT_TYPES):
        return None, "", []
    try:
        html = body.decode(_charset(content_type))
    except (UnicodeDecodeError, LookupError):
        return None, "undecodable bytes", []
    return html, "", extract_links(html, url)


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"')
    return "utf-8"


def _drop_partial_last_line(pages_file: Path) -> None:
    """A crash mid-write leaves a line without its newline; cut it so the next append starts clean."""
    if not pages_file.is_file() or pages_file.stat().st_size == 0:
        return
    data = pages_file.read_bytes()
    if not data.endswith(b"\n"):
        with open(pages_file, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _stored_urls(pages_file: Path) -> set[str]:
    urls: set[str] = set()
    if pages_file.is_file():
        with open(pages_file, "rb") as f:
            for raw in f:
                try:
                    urls.add(json.loads(raw)["url"])
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by a crash
    return urls


def _load_state(state_file: Path, cfg: WebConfig) -> dict[str, Any]:
    if state_file.is_file():
        return json.loads(state_file.read_text(encoding="utf-8"))
    frontier: list[tuple[str, int | None]] = [(url, None) for url in cfg.urls]  # depth None: do not follow
    frontier += [(url, 0) for url in cfg.seeds]
    return {"frontier": frontier, "errors": []}
