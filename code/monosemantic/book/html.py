"""The HTML site: one page per chapter with a sidebar of all chapters, prev/next links, the chapter's
notebook and the PDF to download, and a combined References page."""

from __future__ import annotations

import dataclasses
import html
from importlib import resources

from .webfonts import FAMILY_PREFIX

CSS_NAME = "book.css"
# Opened from disk (file://), Chromium reads a web font while it lays out the first text that needs it and
# leaves that text in the fallback font (empty boxes for CJK) for good. So from disk the page loads the
# book's fonts (.webfonts) first and lays nothing out until they are in (book.css: html.fonts-loading), then
# goes to the address's section, which it could not while hidden. Over http a page loads only the fonts its
# characters need, when it needs them (their unicode-range), and nothing waits.
FONT_LOADER = f"""if (location.protocol === "file:") {{
  const faces = [...document.fonts].filter((f) => f.family.startsWith("{FAMILY_PREFIX}"));
  const root = document.documentElement;
  const show = () => {{
    if (!root.classList.contains("fonts-loading")) return;
    root.classList.remove("fonts-loading");
    if (location.hash) document.getElementById(decodeURIComponent(location.hash.slice(1)))?.scrollIntoView();
  }};
  if (faces.length) {{
    root.classList.add("fonts-loading");
    Promise.allSettled(faces.map((f) => f.load())).then(show);
    setTimeout(show, 3000);  // a font that never loads must not hide the page
  }}
}}"""


@dataclasses.dataclass(frozen=True)
class NavEntry:
    page: str
    number: str | None
    title: str
    appendix: bool


@dataclasses.dataclass(frozen=True)
class TocEntry:
    level: int
    id: str
    number: str | None
    title: str


def stylesheet(highlighting_css: str = "") -> str:
    """The site's stylesheet, with pandoc's code-highlighting rules appended."""
    css = resources.files("monosemantic.book").joinpath("assets", CSS_NAME).read_text(encoding="utf-8")
    return css + ("\n/* code highlighting, written by pandoc */\n" + highlighting_css if highlighting_css else "")


def page_toc(blocks: list[dict], depth: int = 3) -> list[TocEntry]:
    """The page's sections (levels 2..depth) for its "On this page" list, from the resolved AST."""
    from .ast import stringify

    out = []
    for b in blocks:
        if b["t"] != "Header" or not 2 <= b["c"][0] <= depth or not b["c"][1][0]:
            continue
        inlines = b["c"][2]
        number = None
        if inlines and inlines[0]["t"] == "Span" and "header-section-number" in inlines[0]["c"][0][1]:
            number, inlines = stringify(inlines[0]), inlines[1:]
        out.append(TocEntry(b["c"][0], b["c"][1][0], number, stringify(inlines).strip()))
    return out


def _toc(entries: list[TocEntry]) -> str:
    if not entries:
        return ""
    items = "".join(
        f'<li class="toc-level-{e.level}"><a href="#{html.escape(e.id)}">'
        + (f'<span class="toc-number">{html.escape(e.number)}</span> ' if e.number else "")
        + f"{html.escape(e.title)}</a></li>" for e in entries)
    return f'<nav class="page-toc" aria-label="On this page"><p>On this page</p><ul>{items}</ul></nav>'


def title_block(title: str, subtitle: str | None, authors: list[str]) -> str:
    """The book's title, shown at the top of its first page."""
    parts = [f'<h1 class="title">{html.escape(title)}</h1>']
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    if authors:
        parts.append(f'<p class="author">{html.escape(", ".join(authors))}</p>')
    return f'<header class="title-block">{"".join(parts)}</header>'


def _entry_text(e: NavEntry) -> str:
    num = f'<span class="chapter-number">{html.escape(e.number)}</span>&nbsp; ' if e.number else ""
    return f'{num}<span class="chapter-title">{html.escape(e.title)}</span>'


def sidebar(book_title: str, nav: list[NavEntry], current: str, pdf: str | None) -> str:
    items = []
    in_appendix = False
    for e in nav:
        if e.appendix and not in_appendix:
            items.append('<li class="sidebar-part">Appendices</li>')
            in_appendix = True
        active = ' class="active" aria-current="page"' if e.page == current else ""
        items.append(f'<li><a href="{e.page}"{active}>{_entry_text(e)}</a></li>')
    downloads = f'<p class="downloads"><a href="{html.escape(pdf)}">Download PDF</a></p>' if pdf else ""
    home = nav[0].page if nav else "index.html"  # the book's first page (index.html in a Quarto book)
    return (f'<nav class="sidebar" aria-label="Chapters"><p class="book-title"><a href="{home}">'
            f'{html.escape(book_title)}</a></p><ol>{"".join(items)}</ol>{downloads}</nav>')


def page(*, book_title: str, title: str, body: str, nav: list[NavEntry], current: str, pdf: str | None,
         notebook: str | None, generator: str, toc: list[TocEntry] | None = None, header: str = "") -> str:
    index = next((i for i, e in enumerate(nav) if e.page == current), None)
    prev_link = next_link = ""
    if index is not None and index > 0:
        p = nav[index - 1]
        prev_link = f'<a class="prev" href="{p.page}" rel="prev">&larr; {_entry_text(p)}</a>'
    if index is not None and index + 1 < len(nav):
        n = nav[index + 1]
        next_link = f'<a class="next" href="{n.page}" rel="next">{_entry_text(n)} &rarr;</a>'
    tools = f'<p class="page-tools"><a href="{html.escape(notebook)}" download>Download notebook</a></p>' \
        if notebook else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="monosemantic book (preview builder; {html.escape(generator)})">
<title>{html.escape(title)} – {html.escape(book_title)}</title>
<link rel="stylesheet" href="{CSS_NAME}">
<script>
{FONT_LOADER}
</script>
</head>
<body>
{sidebar(book_title, nav, current, pdf)}
{_toc(toc or [])}
<main class="content">
{header}
{tools}
{body}
<nav class="page-navigation" aria-label="Previous and next">{prev_link}{next_link}</nav>
</main>
</body>
</html>
"""
