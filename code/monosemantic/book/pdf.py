"""The PDF: every chapter in one typst document (pandoc's typst writer, our template), compiled by the
``typst`` package, which bundles and embeds its own fonts."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import UserError
from . import ast as A
from . import pandoc

# Symbol names pandoc 3.9's typst writer still emits but the typst compiler bundled with the `typst` package
# has removed (typst 0.13 renamed them); the right-hand names are accepted by both.
RENAMED_SYMBOLS = {"dot.circle": "dot.o", "plus.circle": "plus.o", "minus.circle": "minus.o",
                   "times.circle": "times.o", "div.circle": "div.o"}

WIDE_TABLE_COLUMNS = 9  # from this many columns on, a table is set in smaller type
WIDE_TABLE_TEXT = "6.5pt"


class TypstError(UserError, RuntimeError):
    """typst could not compile the book."""


def fit_tables(blocks: list[A.Node]) -> list[A.Node]:
    """Lay tables out for the page. typst shrinks auto-width columns to the text width by wrapping their
    cells, which fails only for many columns of unbreakable numbers: those tables get smaller type."""

    def fit(node: A.Node):
        if node["t"] == "Table" and len(node["c"][2]) >= WIDE_TABLE_COLUMNS:
            return A.div([A.raw_block("typst", f"#set text(size: {WIDE_TABLE_TEXT})"), node], "", ["wide-table"])
        return None

    return A.walk(blocks, fit)


def modernise_symbols(source: str) -> str:
    """Rename the typst symbols of :data:`RENAMED_SYMBOLS` (only whole names, e.g. not ``dot.circle.big``)."""
    for old, new in RENAMED_SYMBOLS.items():
        source = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w.])", new, source)
    return source


def escape_cell_headings(source: str) -> str:
    """Escape an ``=`` that opens a content block (``[= x]``, as pandoc writes a table cell whose text starts
    with ``= ``): typst reads it as a heading, and a heading inside a table is an error."""
    return re.sub(r"(?<=\[)(=+)(?= )", lambda m: "\\=" * len(m.group(1)), source)


def write_pdf(blocks: list[A.Node], meta: dict[str, Any], *, out_dir: Path, name: str,
              bibliography: list[Path], api: list[int] | None = None) -> Path:
    """Typeset ``blocks`` (all chapters, references resolved for typst) to ``out_dir/name``."""
    import typst

    template = resources.files("monosemantic.book").joinpath("assets", "book.typ")
    args = ["--template", str(template), "--wrap=preserve"]
    if bibliography:
        args += ["--citeproc", *[f"--bibliography={b}" for b in bibliography],
                 "-M", "reference-section-title=References", "-M", "link-citations=true"]
    source = pandoc.write(pandoc.document(fit_tables(blocks), meta, api), "typst", "the book (typst)", args)
    source = escape_cell_headings(modernise_symbols(source))
    typ = out_dir / (Path(name).stem + ".typ")
    typ.write_text(source, encoding="utf-8")
    pdf = out_dir / name
    try:
        typst.compile(str(typ), output=str(pdf), root=str(out_dir))
    except Exception as e:  # typst raises its own TypstError with a multi-line report
        diagnostic = getattr(e, "diagnostic", None) or str(e)  # includes the line and column
        first = " ".join(str(diagnostic).split())[:500]
        raise TypstError(f"typst could not compile {typ.name}: {first}") from e
    return pdf
