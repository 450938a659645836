"""The PDF: every chapter in one typst document (pandoc's typst writer, our template), compiled by the
``typst`` package. The fonts are the package's own (Libertinus Serif for Latin, Greek, Cyrillic and Hebrew, New
Computer Modern for maths, DejaVu Sans Mono for code) and the Noto fonts of :data:`FONT_PACKAGES` for the
other scripts the corpus holds (Arabic, CJK, Indic, ...); typst embeds the glyphs it uses. The machine's own
fonts are never looked at, so the PDF is the same wherever it is built."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import UserError
from . import ast as A
from . import pandoc, typography

# Symbol names pandoc 3.9's typst writer still emits but the typst compiler bundled with the `typst` package
# has removed (typst 0.13 renamed them); the right-hand names are accepted by both.
RENAMED_SYMBOLS = {"dot.circle": "dot.o", "plus.circle": "plus.o", "minus.circle": "minus.o",
                   "times.circle": "times.o", "div.circle": "div.o"}

# PyPI packages (pinned in pyproject.toml) whose folders hold font files: Noto Sans for the scripts Libertinus
# lacks (Arabic, Hebrew, Devanagari, Thai, ... and symbols), Noto Sans CJK (Chinese, Japanese, Korean; static
# Regular, since typst sets a variable CJK font at its default, thinnest, instance). The template
# (assets/book.typ) names the families in its fallback lists.
FONT_PACKAGES = ("manimgx_fonts", "noto_cjk_sans_otc")

WIDE_TABLE_COLUMNS = 9  # from this many columns on, a table is set in smaller type
WIDE_TABLE_TEXT = "6.5pt"


class TypstError(UserError, RuntimeError):
    """typst could not compile the book."""


LONG_TABLE_ROWS = 12  # from this many body rows on, a table may break across pages: its last rows stay together


def fit_tables(blocks: list[A.Node]) -> list[A.Node]:
    """Lay tables out for the page. typst shrinks auto-width columns to the text width by wrapping their
    cells, which fails only for many columns of unbreakable numbers: those tables get smaller type. A table
    long enough to break across pages keeps its last two rows together (:func:`keep_last_rows`)."""

    def fit(node: A.Node):
        if node["t"] != "Table":
            return None
        if sum(len(body[3]) for body in node["c"][4]) >= LONG_TABLE_ROWS:
            node = keep_last_rows(node)
        if len(node["c"][2]) >= WIDE_TABLE_COLUMNS:
            return A.div([A.raw_block("typst", f"#set text(size: {WIDE_TABLE_TEXT})"), node], "", ["wide-table"])
        return node

    return A.walk(blocks, fit)


def keep_last_rows(table: A.Node, n: int = 2) -> A.Node:
    """``table`` with an empty last column whose cell in the last ``n`` rows is one cell spanning them. The
    template makes every cell unbreakable, and typst never splits an unbreakable cell's rows over two pages,
    so a table that breaks never leaves its last row alone on a page under a repeated header. (The column is
    empty and unruled, so it shows as a few points of margin.)"""
    attr, caption, colspecs, head, bodies, foot = table["c"]
    rows = [row for body in bodies for row in body[3]]
    if len(rows) < n:
        return table

    def cell(rowspan: int = 1) -> A.Node:
        return [A.attr(), {"t": "AlignDefault"}, rowspan, 1, []]

    colspecs.append([{"t": "AlignDefault"}, {"t": "ColWidthDefault"}])
    for row in head[1] + [r for body in bodies for r in body[2]] + foot[1]:
        row[1].append(cell())
    for i, row in enumerate(rows):
        if i < len(rows) - n:
            row[1].append(cell())
        elif i == len(rows) - n:
            row[1].append(cell(n))
    return table


def uncaptioned_tables(source: str) -> list[str]:
    """The tables of a typst source, as pandoc writes them, that are not inside a figure with a caption
    (each as its first cells, to name it). The template keeps a table's caption with the table (see
    assets/book.typ), which works only for a caption inside the table's own figure."""
    found = []
    starts = [m.start() for m in re.finditer(r"#table\(", source)] + [len(source)]
    for start, end in zip(starts, starts[1:], strict=False):
        opening = source.rfind("#figure(", 0, start)
        in_figure = opening >= 0 and re.fullmatch(r"#figure\(\s*align\(\w+\)\[", source[opening:start]) is not None
        tail = source[start:end]
        figure_end = tail.find("\n  , kind: table")
        if not in_figure or figure_end < 0 or "\n  , caption: [" not in tail[:figure_end]:
            cells = re.findall(r"^    (\[.*)$", tail, flags=re.MULTILINE)
            found.append((cells[0] if cells else tail.split("\n", 1)[0])[:80])
    return found


def modernise_symbols(source: str) -> str:
    """Rename the typst symbols of :data:`RENAMED_SYMBOLS` (only whole names, e.g. not ``dot.circle.big``)."""
    for old, new in RENAMED_SYMBOLS.items():
        source = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w.])", new, source)
    return source


def escape_cell_headings(source: str) -> str:
    """Escape an ``=`` that opens a content block (``[= x]``, as pandoc writes a table cell whose text starts
    with ``= ``): typst reads it as a heading, and a heading inside a table is an error."""
    return re.sub(r"(?<=\[)(=+)(?= )", lambda m: "\\=" * len(m.group(1)), source)


def font_paths() -> list[str]:
    """The folders of :data:`FONT_PACKAGES`, for typst's ``font_paths``."""
    from importlib import util

    missing = [p for p in FONT_PACKAGES if util.find_spec(p) is None]
    if missing:
        raise TypstError(f"the font package(s) {', '.join(missing)} are not installed, so the PDF would show "
                         f"empty boxes for Arabic and CJK text: run `make setup` (or `.venv/bin/pip install -e .`)")
    return [str(resources.files(p)) for p in FONT_PACKAGES]


def typst_version() -> str:
    """The version of the typst compiler that typesets the PDF (the one the PDF names as its creator), which
    is not the version of the ``typst`` Python package that bundles it (0.15.2 bundles typst 0.15.1)."""
    import json
    import tempfile

    import typst

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "version.typ"
        empty.write_text("", encoding="utf-8")
        return json.loads(typst.eval(str(empty), "str(sys.version)"))


def compile_typst(typ: Path, pdf: Path, root: Path) -> Path:
    """Compile ``typ`` to ``pdf`` with the book's fonts only (see the module's docstring)."""
    import typst

    fonts = font_paths()
    try:
        typst.compile(str(typ), output=str(pdf), root=str(root), font_paths=fonts, ignore_system_fonts=True)
    except Exception as e:  # typst raises its own TypstError with a multi-line report
        diagnostic = getattr(e, "diagnostic", None) or str(e)  # includes the line and column
        first = " ".join(str(diagnostic).split())[:500]
        raise TypstError(f"typst could not compile {typ.name}: {first}") from e
    return pdf


def write_pdf(blocks: list[A.Node], meta: dict[str, Any], *, out_dir: Path, name: str,
              bibliography: list[Path], api: list[int] | None = None) -> Path:
    """Typeset ``blocks`` (all chapters, references resolved for typst) to ``out_dir/name``."""
    template = resources.files("monosemantic.book").joinpath("assets", "book.typ")
    args = ["--template", str(template), "--wrap=preserve"]
    if bibliography:
        args += ["--citeproc", *[f"--bibliography={b}" for b in bibliography],
                 "-M", "reference-section-title=References", "-M", "link-citations=true"]
    blocks = fit_tables(typography.typst_apostrophes(blocks))
    source = pandoc.write(pandoc.document(blocks, meta, api), "typst", "the book (typst)", args)
    source = escape_cell_headings(modernise_symbols(source))
    typ = out_dir / (Path(name).stem + ".typ")
    typ.write_text(source, encoding="utf-8")
    if missing := uncaptioned_tables(source):
        raise TypstError(f"{len(missing)} table(s) without a caption in {typ.name} (give each one a label and a "
                         f"caption, `#| label: tbl-...` and `#| tbl-cap: ...`); the first starts {missing[0]}")
    return compile_typst(typ, out_dir / name, out_dir)
