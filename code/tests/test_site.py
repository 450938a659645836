"""The real book's HTML site, built from the committed cache into a scratch copy of the project: every page
loads in headless Chromium with no console error and does not scroll sideways in an 820 px window, and every
local link and image resolves. About a minute (the chapters execute); skipped without Chromium (.ci/run
installs it) or without the cache's artifacts."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from monosemantic import store
from monosemantic.book import build as build_book
from monosemantic.book import chromium, linkcheck
from monosemantic.config import project_root


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_every_page_of_the_real_site_loads_cleanly(tmp_path, monkeypatch):
    root = project_root()
    try:
        store.find("lm", "model")
    except store.CacheError:
        pytest.skip("the committed cache has no trained model")
    copy = tmp_path / "book"
    copy.mkdir()
    shutil.copytree(root / "report", copy / "report", ignore=shutil.ignore_patterns("browser", "browser-llama"))
    shutil.copy(root / "_quarto.yml", copy / "_quarto.yml")
    (copy / "cache").symlink_to(root / "cache")  # read only: chapters load, never write
    # the committed figures the chapters show (the browsers' screenshots); figures the chapters save for the
    # README land in this copy, not in the checkout
    shutil.copytree(root / "figures", copy / "figures")
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(root / "cache"))
    monkeypatch.setenv("MONOSEMANTIC_ROOT", str(copy))
    report = build_book(copy, pdf_book=False, log=lambda _: None)
    site = copy / "_book"
    pages, refs, problems = linkcheck.check_site(site)
    assert problems == [] and pages >= 9 and refs > 100, problems[:5]
    for page in sorted(site.glob("*.html")):
        res = subprocess.run(chromium.command("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                                              "--dump-dom", page.as_uri()), capture_output=True, text=True,
                             timeout=120)
        assert "</main>" in res.stdout or "<body" in res.stdout, page.name
        errors = [line for line in res.stderr.splitlines()
                  if re.search(r"CONSOLE.*(Uncaught|Error|error)|ERR_FILE_NOT_FOUND|Failed to load", line)]
        assert not errors, f"{page.name}: {errors[:3]}"
    # in a narrow desktop window (820 px, just above the one-column layout) no page scrolls sideways: a long
    # URL, an equation or a table too wide for the column wraps or scrolls inside its own box (a reference's
    # URL once pushed three pages 9 px wide, the browser's search box two)
    chrome = chromium.Chromium(820, 1200)
    try:
        for page in sorted(site.glob("*.html")):
            chrome.send("Page.navigate", session=True, url=page.as_uri())
            chrome.wait("document.readyState === 'complete' && "
                        "!document.documentElement.classList.contains('fonts-loading')")
            widths = chrome.js("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert widths[0] <= widths[1], f"{page.name} is {widths[0] - widths[1]} px wider than an 820 px window"
    finally:
        chrome.close()
    assert report.site is not None
