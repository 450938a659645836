"""The feature browser driven as a reader drives it, in headless Chromium through its DevTools protocol (over
``--remote-debugging-pipe``: the standard library only): the real page of the book (its stylesheet,
sidebar and "On this page" panel) around the browser's files for the committed one-layer analysis. A search
lists each unit once, of the selected set only, the strongest holders of the token first; clicking a hit
brings the unit into view; so does following a nearest-feature link from lower down; switching the set
re-runs the search on the other set. Skipped without Chromium (.ci/run installs it) or without the
committed analysis artifact."""

from __future__ import annotations

import json

import pytest

from monosemantic import browser, store
from monosemantic.book import html
from monosemantic.book.chromium import Chromium, executable

CHROMIUM = executable()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
WIDTH, HEIGHT = 1400, 1000  # the window a referee found the "On this page" panel clipped in


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
    chrome = Chromium(WIDTH, HEIGHT)
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
