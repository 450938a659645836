"""The feature browser driven as a reader drives it, in headless Chromium through its DevTools protocol (over
``--remote-debugging-pipe``: the standard library only): the real page of the book (its stylesheet,
sidebar and "On this page" panel) around the browser's files for the committed one-layer analysis. A search
lists each unit once, of the selected set only, the strongest holders of the token first; clicking a hit
brings the unit into view; so does following a nearest-feature link from lower down; switching the set
re-runs the search on the other set. Skipped without Chromium (.ci/run installs it) or without the
committed analysis artifact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from monosemantic import browser, store
from monosemantic.book import html

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
WIDTH, HEIGHT = 1400, 1000  # the window a referee found the "On this page" panel clipped in


class Chromium:
    """A headless Chromium and one page of it, driven with DevTools protocol commands over a pipe."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT):
        to_chrome_r, self._to_chrome = os.pipe()  # Chromium reads commands on its fd 3 ...
        self._from_chrome, from_chrome_w = os.pipe()  # ... and writes answers and events on its fd 4

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--window-size={width},{height}", "--hide-scrollbars", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id = 0
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime"):
            self.send(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, session: bool = False, timeout: float = 60, **params: Any) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._id in self._answers, timeout):
                raise TimeoutError(f"Chromium did not answer {method}")
            answer = self._answers.pop(self._id)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60) -> Any:
        """Until ``expression`` is truthy in the page (the page loads shards asynchronously)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if value := self.js(expression):
                return value
            time.sleep(0.1)
        raise TimeoutError(f"never true in the page: {expression}")

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait("document.readyState === 'complete' && !!document.querySelector('#mono-view')")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector``, scrolled to first as
        a reader scrolls to what they click."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                      "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.js(f"document.querySelector({json.dumps(selector)}).select()")  # typing replaces what was there
        self.send("Input.insertText", session=True, text=text)
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", session=True, type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)

    def unit_in_view(self) -> dict:
        """Where the open unit's heading is in the window (its top in CSS pixels from the window's top)."""
        return self.js("(() => { const h = document.querySelector('#mono-view h3');"
                       "return {title: h ? h.textContent : '', top: h ? h.getBoundingClientRect().top : null,"
                       "height: innerHeight}; })()")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._to_chrome)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    try:
        art = store.find("analysis", "features")
    except store.CacheError:
        pytest.skip("the committed cache has no analysis artifact")
    site = tmp_path_factory.mktemp("site")
    written = browser.write(art, site / "browser", reuse=False)
    (site / html.CSS_NAME).write_text(html.stylesheet(), encoding="utf-8")
    body = ('<h1>Feature browser</h1><p>' + "An introduction as long as the book's. " * 40 + '</p>'
            '<link rel="stylesheet" href="browser/browser.css"><div id="mono-browser"></div>'
            '<script src="browser/index.js"></script><script src="browser/browser.js"></script>')
    toc = [html.TocEntry(2, f"s{i}", f"3.{i}", "A section with a title as long as the book's longest")
           for i in range(1, 12)]
    (site / "browser.html").write_text(html.page(
        book_title="Book", title="Feature browser", body=body, nav=[html.NavEntry("browser.html", "B", "Feature "
                                                                                  "browser", True)],
        current="browser.html", pdf=None, notebook=None, generator="test", toc=toc), encoding="utf-8")
    index = json.loads((site / "browser" / "index.js").read_text(encoding="utf-8").split("=", 1)[1].rstrip(";\n"))
    chrome = Chromium()
    chrome.open((site / "browser.html").as_uri())
    yield chrome, index, site, written
    chrome.close()


def shown_hits(chrome: Chromium) -> list[str]:
    return chrome.js("[...document.querySelectorAll('#mono-results a')].map((a) => a.getAttribute('href'))")


def test_search_lists_each_unit_once_of_the_selected_set_strongest_holders_first(page):
    chrome, index, _, _ = page
    chrome.type("#mono-search", "the")
    chrome.wait("document.querySelectorAll('#mono-results a').length > 0")
    hits = shown_hits(chrome)
    assert len(hits) == len(set(hits)), hits  # ' the', 'the' and 'The' are one text: a unit is listed once
    assert all(h.startswith("#topk/") for h in hits), hits  # the selected set only
    # the order rank_hits gives the index's entries: the token's share of each unit's activation, units that
    # hold under 1% of the largest activation on it (near-dead ones) after the rest
    expected = [f"#topk/{h[1]}" for h in browser.rank_hits([h for h in index["tokens"]["the"] if h[0] == 0])][:30]
    assert hits == expected
    top = {h[1]: h for h in index["tokens"]["the"] if h[0] == 0}
    first, largest = top[int(hits[0].split("/")[1])], max(h[3] for h in top.values())
    assert first[3] >= browser.RANK_MASS * largest


def test_clicking_a_hit_brings_the_unit_into_view_and_a_nearest_feature_link_too(page):
    chrome, _, _, _ = page
    if not chrome.js("document.querySelectorAll('#mono-results a').length"):
        chrome.type("#mono-search", "the")
        chrome.wait("document.querySelectorAll('#mono-results a').length > 0")
    second = shown_hits(chrome)[1]
    chrome.click(f"#mono-results a[href='{second}']")
    unit = second.split("/")[1]
    chrome.wait(f"(document.querySelector('#mono-view h3')?.textContent || '')"
                f".startsWith('SAE features (TopK) #{unit}')")
    seen = chrome.unit_in_view()
    assert 0 <= seen["top"] < seen["height"] / 3, seen  # below 30 results it would open off screen

    chrome.js("window.scrollBy(0, 700)")  # reading down the unit, then to its nearest features
    link = chrome.js("document.querySelector('.mono-side ul a')?.getAttribute('href')")
    assert link and link.startswith("#topk/"), link
    chrome.click(f".mono-side ul a[href='{link}']")
    chrome.wait(f"(document.querySelector('#mono-view h3')?.textContent || '')"
                f".startsWith('SAE features (TopK) #{link.split('/')[1]}')")
    seen = chrome.unit_in_view()
    assert 0 <= seen["top"] < seen["height"] / 3, seen  # not left scrolled down the middle of the new unit


def test_switching_the_set_searches_the_other_set(page):
    chrome, index, _, _ = page
    chrome.type("#mono-search", "the")
    chrome.wait("document.querySelectorAll('#mono-results a').length > 0")
    chrome.js("(() => { const s = document.querySelector('#mono-set'); s.value = 'neurons';"
              "s.dispatchEvent(new Event('change')); })()")
    chrome.wait("[...document.querySelectorAll('#mono-results a')].every((a) => "
                "a.getAttribute('href').startsWith('#neurons/'))")
    hits = shown_hits(chrome)
    assert hits and len(hits) == len(set(hits)) and len(hits) == min(30, sum(h[0] == 1 for h in index["tokens"]["the"]))
    chrome.js("(() => { const s = document.querySelector('#mono-set'); s.value = 'topk';"
              "s.dispatchEvent(new Event('change')); })()")
    chrome.wait("[...document.querySelectorAll('#mono-results a')].every((a) => "
                "a.getAttribute('href').startsWith('#topk/'))")


def test_on_this_page_fits_the_window_and_byte_fragments_show_as_bytes(page):
    chrome, _, site, _ = page
    box = chrome.js("(() => { const r = document.querySelector('nav.page-toc').getBoundingClientRect();"
                    "return {left: r.left, right: r.right, bottom: r.bottom, width: innerWidth, height: innerHeight,"
                    "shown: getComputedStyle(document.querySelector('nav.page-toc')).display}; })()")
    assert box["shown"] != "none" and box["right"] <= box["width"] and box["bottom"] <= box["height"], box
    # a token holding part of a character shows its bytes as <0xNN>, as everywhere in the book; U+FFFD only
    # where the text itself holds one (a token whose bytes are the character U+FFFD)
    import pandas as pd

    from monosemantic.tokenizer import vocab_text

    vocab = pd.read_parquet(store.find("analysis", "features").file("vocab.parquet"))
    literal = {t for t in vocab_text(vocab).values() if "\ufffd" in t}
    written = "".join(p.read_text(encoding="utf-8") for p in (site / "browser").glob("*.js"))
    for t in sorted(literal, key=len, reverse=True):
        written = written.replace(json.dumps(t, ensure_ascii=False), "")
    assert "\ufffd" not in written and "<0x" in written
