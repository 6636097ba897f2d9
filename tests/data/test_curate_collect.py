"""Web collector against a local site on 127.0.0.1 (never the internet): robots.txt, domain, rate limit,
User-Agent, timeouts with retries, and resuming an interrupted crawl."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmstack.data.curate.collect import WebConfig, collect

PAGE = "<html><body><h1>{title}</h1><p>{body}</p>{links}</body></html>"


def page(title: str, links: list[str]) -> str:
    anchors = "".join(f'<a href="{href}">{href}</a>' for href in links)
    return PAGE.format(title=title, body=f"This is the page called {title}.", links=anchors)


@pytest.fixture()
def site(tmp_path):
    root = tmp_path / "site"
    (root / "private").mkdir(parents=True)
    (root / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    (root / "index.html").write_text(
        page("home", ["/a.html", "b.html", "/private/secret.html", "http://example.invalid/x.html", "#top"])
    )
    (root / "a.html").write_text(page("a", ["/c.html", "/index.html"]))
    (root / "b.html").write_text(page("b", ["/c.html"]))
    (root / "c.html").write_text(page("c", ["/d.html"]))
    (root / "d.html").write_text(page("d", []))
    (root / "private" / "secret.html").write_text(page("secret", []))
    log: list[tuple[float, str, str]] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            log.append((time.monotonic(), self.path, self.headers.get("User-Agent", "")))
            if self.path == "/slow":
                time.sleep(1.0)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", log
    server.shutdown()
    server.server_close()


def fetched_paths(log) -> list[str]:
    return [path for _, path, _ in log]


def test_crawl_respects_robots_domain_and_user_agent(site, tmp_path):
    base, log = site
    cfg = WebConfig(seeds=[f"{base}/index.html"], rate_limit=200, user_agent="lmstack-test/1.0", max_pages=50)
    result = collect(cfg, tmp_path / "crawl", progress=False)
    pages = [json.loads(line) for line in result.pages_file.read_text().splitlines()]
    urls = sorted(p["url"].removeprefix(base) for p in pages)
    assert urls == ["/a.html", "/b.html", "/c.html", "/d.html", "/index.html"]
    assert "/private/secret.html" not in fetched_paths(log)  # refused before any request
    assert fetched_paths(log)[0] == "/robots.txt"
    assert {ua for _, _, ua in log} == {"lmstack-test/1.0"}
    assert result.errors == [{"url": f"{base}/private/secret.html", "error": "disallowed by robots.txt"}]


def test_rate_limit_spaces_requests(site, tmp_path):
    base, log = site
    cfg = WebConfig(urls=[f"{base}/a.html", f"{base}/b.html", f"{base}/c.html"], rate_limit=10)
    collect(cfg, tmp_path / "rate", progress=False)
    times = [t for t, path, _ in log if path != "/robots.txt"]
    assert len(times) == 3
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.09


def test_timeout_is_reported_and_the_run_continues(site, tmp_path):
    base, log = site
    cfg = WebConfig(
        urls=[f"{base}/slow", f"{base}/a.html", f"{base}/missing.html"],
        timeout=0.2,
        retries=1,
        backoff=0.01,
        rate_limit=100,
    )
    result = collect(cfg, tmp_path / "timeout", progress=False)
    assert result.fetched == 1
    errors = {e["url"].removeprefix(base): e["error"] for e in result.errors}
    assert errors == {"/slow": "fetch failed: timed out", "/missing.html": "HTTP 404"}
    assert fetched_paths(log).count("/slow") == 2  # first try + one retry


def test_interrupted_crawl_resumes_without_refetching(site, tmp_path):
    base, log = site
    state = tmp_path / "resume"
    first = collect(WebConfig(seeds=[f"{base}/index.html"], max_pages=2, rate_limit=200), state, progress=False)
    assert first.fetched == 2
    # a crash mid-write leaves half a line; the rerun must cut it and carry on
    with open(first.pages_file, "ab") as f:
        f.write(b'{"url": "half a rec')
    before = list(fetched_paths(log))
    second = collect(WebConfig(seeds=[f"{base}/index.html"], max_pages=50, rate_limit=200), state, progress=False)
    refetched = fetched_paths(log)[len(before) :]
    assert second.fetched == 5 and second.new == 3
    assert "/index.html" not in refetched
    lines = second.pages_file.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["html"] for line in lines)


def test_bad_web_config_is_a_clear_error():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="urls"):
        WebConfig()
    with pytest.raises(LmstackError, match="not an http"):
        WebConfig(urls=["ftp://127.0.0.1/x"])
