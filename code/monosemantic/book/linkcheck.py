"""Broken links and images in the built site: every local ``href`` and ``src`` of every HTML page must
name a file that exists, and a ``#fragment`` must name an ``id`` on the page it points to. The build runs
it on ``_book/`` after writing the site; a test also loads every page in headless Chromium for console
errors."""

from __future__ import annotations

import html.parser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..config import UserError


class LinkError(UserError, ValueError):
    """The built site has links or images that lead nowhere."""


class _Refs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str]] = []  # (attribute, value)
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)
            elif name in ("href", "src") and not (tag == "link" and value.startswith("data:")):
                self.refs.append((name, value))


def _parse(page: Path) -> _Refs:
    p = _Refs()
    p.feed(page.read_text(encoding="utf-8", errors="replace"))
    return p


def check_site(site: Path) -> tuple[int, int, list[str]]:
    """(pages, local references checked, problems) for the HTML site in ``site``."""
    pages = sorted(site.rglob("*.html"))
    parsed = {p.resolve(): _parse(p) for p in pages}
    problems: list[str] = []
    checked = 0
    for page, refs in parsed.items():
        for attr, value in refs.refs:
            url = urlsplit(value)
            if url.scheme or url.netloc or value.startswith(("mailto:", "javascript:", "data:")):
                continue  # external: not checked offline
            checked += 1
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            where = f"{page.relative_to(site.resolve())}: {attr}={value!r}"
            if not target.exists():
                problems.append(f"{where} points to a missing file")
                continue
            if url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(url.fragment) not in ids and url.fragment not in ("", "top"):
                    problems.append(f"{where}: no id {url.fragment!r} in {target.name}")
    return len(pages), checked, problems
