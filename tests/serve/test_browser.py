"""The chat page in a real headless browser (Debian's chromium driven by Selenium): type, stream, stop."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.serve.conftest import save_tiny_model

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,800",
]


# A chat template without end-of-turn token, and a tokenizer without eos: replies never end by
# themselves, so the stop button is what ends one (a random model stops at a random point otherwise).
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def page_server(tokenizer_dir, tmp_path_factory):
    """A model with a long context whose replies only end at max_tokens or when stopped."""
    from lmstack.model.io import load_model_dir, save_model_dir
    from lmstack.serve import ServeOptions, build_app, running_server
    from lmstack.serve.generation import EngineSettings
    from lmstack.tokenizer import Tokenizer

    # a long context, so the second reply is still streaming when the test presses stop, however fast
    # the machine decodes
    model = save_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("long"), seed=2, max_seq_len=32768)
    endless = Tokenizer(
        Tokenizer.load(tokenizer_dir).backend,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        chat_template=PLAIN_TEMPLATE,
    )
    save_model_dir(load_model_dir(model)[0], model, endless)
    app = build_app(ServeOptions(models=[f"long={model}"], ab=[], engine=EngineSettings(kv_cache_mb=64)))
    with running_server(app) as url:
        yield url, app.state.lmstack.models["long"].engine


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, seconds: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_chat_page_streams_and_stops(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, engine = page_server
    browser.get(url + "/")
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)
    wait_for(lambda: find("#model").get_attribute("value") == "long", what="the model list")
    find("#system").send_keys("You are terse.")

    def set_field(css: str, value: str) -> None:
        find(css).clear()
        find(css).send_keys(value)

    # First turn: a short sampled reply that completes.
    for css, value in [("#temperature", "1"), ("#seed", "2"), ("#max_tokens", "8")]:
        set_field(css, value)
    find("#input").send_keys("Hi", Keys.ENTER)
    wait_for(lambda: find("#send").is_enabled() and len(browser.find_elements(By.CSS_SELECTOR, ".assistant")) == 1)
    first = browser.execute_script("return conversation")
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"], (first, find("#error").text)
    assert "tokens/s" in find("#stats").text and find("#error").text == ""

    # Second turn: a long reply, streamed, then stopped.
    set_field("#max_tokens", "30000")
    find("#input").send_keys("Tell me a long story", Keys.ENTER)
    reply = lambda: browser.execute_script(
        "return [...document.querySelectorAll('.assistant .content')].pop().textContent"
    )
    wait_for(lambda: len(reply()) > 20, what="streamed text")
    seen = reply()
    wait_for(lambda: len(reply()) > len(seen), what="more streamed text")  # it keeps arriving
    assert find("#stop").is_enabled() and not find("#send").is_enabled(), find("#error").text
    assert engine.has_unfinished(), engine.stats()
    find("#stop").click()
    wait_for(lambda: find("#send").is_enabled(), what="the stop to take effect")
    assert "stopped" in browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_attribute("class")
    assert "tokens/s" in find("#stats").text
    wait_for(lambda: not engine.has_unfinished(), seconds=20, what="the server to abort the request")
    stopped_text = reply()
    time.sleep(0.5)
    assert reply() == stopped_text  # nothing arrives after stop

    # The conversation kept both turns (the stopped reply included) for the next request.
    sent = browser.execute_script("return conversation.map(m => m.role)")
    assert sent == ["user", "assistant", "user", "assistant"]
    shot = tmp_path / "chat.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("LMSTACK_SCREENSHOT"):
        shutil.copy(shot, Path(os.environ["LMSTACK_SCREENSHOT"]))
