"""A chapter's markdown with its cells' code and outputs put back, ready for pandoc.

Cells become the fenced divs Quarto writes (``.cell``, ``.cell-code``, ``.cell-output``), shaped by each
cell's options. Images are written as PNG/SVG files under the site's ``figures/`` folder; HTML tables
(a pandas DataFrame's display) are not markdown, so they are left as placeholders that
:func:`embed_tables` fills with the table pandoc reads from the HTML, which both the HTML and the typst
writer then lay out.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from pathlib import Path
from typing import Any

from . import ast as A
from .ast import Node
from .qmd import Cell, Qmd, effective_options, substitute_inline

_RICH = ("text/markdown", "text/html", "image/svg+xml", "image/png", "text/plain")


@dataclasses.dataclass
class Assembled:
    markdown: str
    html_tables: dict[str, str]  # placeholder id -> the HTML that holds a table
    figures: list[Path]


def _fence(text: str, classes: str) -> str:
    ticks = "`" * max(3, 1 + max((len(r) for r in text.split("\n") if r and set(r) == {"`"}), default=0))
    return f"{ticks} {{{classes}}}\n{text}\n{ticks}\n"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colours (tracebacks, progress bars)


def _join(text: Any) -> str:
    return _ANSI.sub("", "".join(text) if isinstance(text, list) else str(text))


def chapter_markdown(qmd: Qmd, outputs: dict[int, list[dict[str, Any]]], execute_defaults: list[dict[str, Any]],
                     figures_dir: Path, inline: list[str] | None = None) -> Assembled:
    """``outputs`` maps a cell's index to its notebook outputs (cells not evaluated are absent);
    ``inline`` holds the values of the inline expressions, in order (None: leave them as code)."""
    stem = qmd.path.stem
    result = Assembled("", {}, [])
    pieces: list[str] = []
    values = iter(inline or [])
    for part in qmd.parts:
        if isinstance(part, str):
            pieces.append(substitute_inline(part, values) if inline else part)
            continue
        opts = effective_options(part, *execute_defaults)
        pieces.append("\n" + _cell_markdown(stem, part, opts, outputs.get(part.index, []), figures_dir, result) + "\n")
    result.markdown = "".join(pieces)
    return result


def _cell_markdown(stem: str, cell: Cell, opts: dict[str, Any], outputs: list[dict[str, Any]], figures_dir: Path,
                   result: Assembled) -> str:
    label = str(opts["label"] or "")
    body: list[str] = []
    if opts["echo"] is not False:
        body.append(_fence(cell.code, ".python .cell-code"))
    if opts["output"] is not False:
        images = 0
        for out in outputs:
            kind = out.get("output_type")
            if kind == "stream":
                if out.get("name") == "stderr" and opts["warning"] is False:
                    continue
                text = _join(out.get("text", "")).rstrip("\n")
                if not text:
                    continue
                if opts["output"] == "asis" and out.get("name") == "stdout":
                    body.append(text + "\n")
                else:
                    body.append(f"::: {{.cell-output .cell-output-{out.get('name', 'stdout')}}}\n"
                                + _fence(text, ".output") + ":::\n")
            elif kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                mime = next((m for m in _RICH if m in data), None)
                if mime in ("image/png", "image/svg+xml"):
                    images += 1
                    suffix = "png" if mime == "image/png" else "svg"
                    name = f"{stem}-{label or f'cell{cell.index}'}-{images}.{suffix}"
                    path = figures_dir / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    payload = data[mime]
                    if suffix == "png":
                        path.write_bytes(base64.b64decode(_join(payload)))
                    else:
                        path.write_text(_join(payload), encoding="utf-8")
                    result.figures.append(path)
                    # the path is absolute until build() relocates it
                    body.append(_figure(path, label if label.startswith("fig-") else "", opts) if images == 1
                                else f"![]({path.as_posix()})\n")
                elif mime == "text/markdown":
                    body.append(_join(data[mime]) + "\n")
                elif mime == "text/html":
                    html = _join(data[mime])
                    if "<table" in html:
                        key = f"embed-{stem}-{cell.index}-{len(result.html_tables)}"
                        result.html_tables[key] = html
                        body.append(f"::: {{#{key} .embedded-table}}\n:::\n")
                    else:
                        body.append(_fence(html, "=html"))
                elif mime == "text/plain":
                    text = _join(data[mime]).rstrip("\n")
                    if opts["output"] == "asis":
                        body.append(text + "\n")
                    else:
                        body.append("::: {.cell-output .cell-output-display}\n" + _fence(text, ".output") + ":::\n")
    if label.startswith("tbl-"):
        caption = str(opts["tbl-cap"] or "")
        inner = "\n".join(body)
        cap = f"::: {{.table-caption}}\n{caption}\n:::\n" if caption else ""
        return f"::: {{#{label} .cell}}\n{inner}\n{cap}:::\n"
    ident = f"#{label} " if label and not label.startswith(("fig-", "tbl-")) else ""
    if not body:
        return ""
    return f"::: {{{ident}.cell}}\n" + "\n".join(body) + ":::\n"


def _figure(path: Path, label: str, opts: dict[str, Any]) -> str:
    """A cell's (first) image as a div that :func:`~.crossref.normalise` turns into a pandoc Figure.
    Caption and alt text are markdown blocks of their own, so that brackets or math in them cannot
    break the image syntax."""
    image = f"![]({path.as_posix()})\n"
    if not (label or opts["fig-cap"] or opts["fig-alt"]):
        return image
    parts = [image]
    if opts["fig-cap"]:
        parts.append(f"::: {{.figure-caption}}\n{opts['fig-cap']}\n:::\n")
    if opts["fig-alt"]:
        parts.append(f"::: {{.figure-alt}}\n{opts['fig-alt']}\n:::\n")
    ident = f"#{label} " if label else ""
    return f"::: {{{ident}.cell-figure}}\n" + "\n".join(parts) + ":::\n"


def embed_tables(blocks: list[Node], tables: dict[str, list[Node]]) -> list[Node]:
    """Replace each placeholder div by the blocks pandoc read from its HTML."""

    def fill(node: Node):
        if node["t"] == "Div" and node["c"][0][0] in tables:
            content = A.walk(tables[node["c"][0][0]], lambda n: _merge_index_header(n) if n["t"] == "Table" else None)
            return A.div(content, "", ["cell-output", "cell-output-display"])
        return None

    return A.walk(blocks, fill)


def _merge_index_header(table: Node) -> Node:
    """pandas writes a named index (or the levels of a MultiIndex) as a second header row holding only the
    index's names; move those names into the empty corner cells of the first row, so the table has one
    header row."""
    rows = table["c"][3][1]
    if len(rows) != 2:
        return table
    first, second = rows[0][1], rows[1][1]

    def empty(cell: Node) -> bool:
        return not A.stringify(cell[4]).strip()

    names = next((i for i, c in enumerate(second) if empty(c)), len(second))  # the index's levels, named
    if not names or len(first) < names or not all(empty(c) for c in second[names:]):
        return table
    if all(empty(c) for c in first[:names]) and all(c[3] == 1 for c in first[:names]):  # one column each
        for corner, name in zip(first[:names], second[:names], strict=True):
            corner[4] = name[4]
        del rows[1]
    return table


# a number as a cell prints it: 1,234 / 0.5 / 1e-05 / 12% / 9.5 × 10⁻⁴ (chapter.sci) / a dash for none
_NUMBER = re.compile(r"^[-+\u2212]?[\d.,]+(e[-+]?\d+| ?\u00d7 ?10[\u207b\u00b9\u00b2\u00b3\u2070\u2074-\u2079]+)?%?$"
                     r"|^(nan|inf|-inf|\u2014|-)?$", re.IGNORECASE)


def align_columns(blocks: list[Node]) -> list[Node]:
    """Give every table column without an alignment one, for both outputs: the first column and text
    columns left, columns of numbers right (typst would otherwise centre them, and HTML left-align
    the numbers)."""

    def align(node: Node):
        if node["t"] != "Table":
            return None
        colspecs, bodies = node["c"][2], node["c"][4]
        rows = [row for body in bodies for row in body[2] + body[3]]
        for j, spec in enumerate(colspecs):
            if spec[0]["t"] != "AlignDefault":
                continue
            cells = [A.stringify(row[1][j][4]).strip() for row in rows if j < len(row[1])]
            numeric = j > 0 and bool(cells) and all(_NUMBER.match(c) for c in cells)
            spec[0] = {"t": "AlignRight" if numeric else "AlignLeft"}
        return node

    return A.walk(blocks, align)


def natural_widths(blocks: list[Node]) -> list[Node]:
    """Let both outputs size the columns of a table whose widths pandoc made equal. pandoc gives a pipe table
    with a line longer than 72 characters relative widths from the dashes of its separator line, and a
    generated table (:func:`monosemantic.style.table`) has the same dashes under every column: equal widths,
    which squeeze a column of text to the width of one of numbers. Tables given unequal widths keep them."""

    def natural(node: Node):
        if node["t"] != "Table":
            return None
        widths = [spec[1] for spec in node["c"][2]]
        if len(widths) > 1 and all(w["t"] == "ColWidth" for w in widths) and len({w["c"] for w in widths}) == 1:
            for spec in node["c"][2]:
                spec[1] = {"t": "ColWidthDefault"}
            return node
        return None

    return A.walk(blocks, natural)
