"""The chat page at `/`, driven in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
a message typed, tokens streamed in, a reply stopped midway, model output and user input shown as text, a new
chat, the API key asked for. With `SCRATCHGPT_SCREENSHOT=PATH` (e.g. docs/serve-chat.png) a screenshot of a chat
is saved there."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

import httpx  # noqa: E402
from conftest import cycling_model, live_server  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from scratchgpt.serve import create_app  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 <>/&\"'!?.,=()\n"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,760")


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scratchgpt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def reply_text(driver) -> str:
    return driver.execute_script("const r = document.querySelectorAll('#messages .msg.assistant .text');"
                                 "return r.length ? r[r.length - 1].textContent : '';")


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def set_field(driver, field: str, value: str) -> None:
    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def test_chat_streams_stops_and_shows_everything_as_text(browser):
    # a model whose every reply is "<script><script>..." for ever: markup in the output, and a reply to stop
    model, tok, config = cycling_model("<script>", ALPHABET)
    app = create_app(model, tok, config, max_tokens_limit=200_000)
    with live_server(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model").text or
                                         "model:" in d.find_element(By.ID, "model").text)
        set_field(browser, "max-tokens", "200000")
        set_field(browser, "system", "Be <b>brief</b>.")
        send(browser, "hi <img src=x onerror=alert(1)> & bye")
        WebDriverWait(browser, 20).until(lambda d: len(reply_text(d)) >= 16)
        seen = [len(reply_text(browser))]
        for _ in range(3):  # tokens keep arriving: the reply grows while we watch
            time.sleep(0.3)
            seen.append(len(reply_text(browser)))
        assert seen == sorted(seen) and seen[-1] > seen[0], seen
        assert reply_text(browser).startswith("<script><script>")
        user = browser.execute_script("return document.querySelector('#messages .msg.user .text').textContent")
        assert user == "hi <img src=x onerror=alert(1)> & bye"
        assert not browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages img, #messages b")
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "status").text == "stopped")
        stopped = reply_text(browser)
        time.sleep(0.5)
        assert reply_text(browser) == stopped and not browser.find_element(By.ID, "send").get_attribute("disabled")
        # the server let go of the model: a new request is answered at once
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "<", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.json()["choices"][0]["text"] == "scr" and time.monotonic() - t0 < 2
        browser.find_element(By.ID, "new-chat").click()
        assert not browser.find_elements(By.CSS_SELECTOR, "#messages .msg")


def test_the_page_asks_for_the_api_key_and_sends_it(browser):
    model, tok, config = cycling_model("abc", ALPHABET)
    app = create_app(model, tok, config, api_key="s3cret-key")
    with live_server(app) as url:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.get(url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "key-box").is_displayed())
        set_field(browser, "api-key", "s3cret-key")
        browser.find_element(By.ID, "save-key").click()
        WebDriverWait(browser, 20).until(lambda d: "model:" in d.find_element(By.ID, "model").text)
        set_field(browser, "max-tokens", "5")
        set_field(browser, "temperature", "0")
        send(browser, "hello")
        WebDriverWait(browser, 20).until(lambda d: reply_text(d) == "abcab")
        assert browser.execute_script("return localStorage.getItem('scratchgpt.apiKey')") == "s3cret-key"


REPLY = ("Hello! I am a tiny GPT, trained from scratch and served by scratchgpt. My replies stream in word after "
         "word; Stop ends one early, New chat starts over.").split(" ")


def test_screenshot_of_a_chat(browser):
    path = os.environ.get("SCRATCHGPT_SCREENSHOT")
    if not path:
        pytest.skip("set SCRATCHGPT_SCREENSHOT=PATH to save a screenshot of the page")
    words = [REPLY[0]] + [" " + w for w in REPLY[1:]] + [" \u200b"]  # (a last zero-width word: the cycle's seam)
    model, tok, config = cycling_model(words)
    with live_server(create_app(model, tok, config, name="tiny-gpt")) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 20).until(lambda d: "tiny-gpt" in d.find_element(By.ID, "model").text)
        set_field(browser, "system", "You are a helpful assistant.")
        set_field(browser, "temperature", "0")
        set_field(browser, "max-tokens", str(len(words) - 1))
        send(browser, "Who are you?")
        WebDriverWait(browser, 20).until(lambda d: reply_text(d).endswith("starts over.")
                                         and d.find_element(By.ID, "status").text == "")
        browser.save_screenshot(path)
