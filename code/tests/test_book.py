"""The book's preview builder on throwaway books in tmp_path: cell execution and its cache, cell
options, cross-reference numbering. Each test that runs code starts a Jupyter kernel (~1.5 s)."""

from __future__ import annotations

import base64
import json
import re
import textwrap
from pathlib import Path

import pytest

from monosemantic.book import build as build_book
from monosemantic.book import chromium
from monosemantic.book.crossref import CrossrefError
from monosemantic.book.execute import CellError
from monosemantic.book.qmd import QmdError

# a 1x1 PNG, for markdown figures
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                         "AAAABJRU5ErkJggg==")


def make_book(root: Path, chapters: dict[str, str], appendices: dict[str, str] | None = None,
              execute: str = "") -> Path:
    """A book in ``root``: ``chapters`` maps file names (under report/) to their text."""
    (root / "report").mkdir(parents=True, exist_ok=True)
    (root / "cache").mkdir(exist_ok=True)
    for name, text in {**chapters, **(appendices or {})}.items():
        (root / "report" / name).write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    (root / "report" / "references.bib").write_text(
        "@article{known2020,\n  title = {A Known Paper},\n  author = {Known, Ann},\n  journal = {J},\n"
        "  year = {2020}\n}\n", encoding="utf-8")
    lines = ["project:", "  type: book", "book:", "  title: Test Book", "  output-file: test", "  chapters:"]
    lines += [f"    - report/{n}" for n in chapters]
    if appendices:
        lines += ["  appendices:"] + [f"    - report/{n}" for n in appendices]
    lines += ["bibliography: report/references.bib", execute]
    (root / "_quarto.yml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def book_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    return tmp_path


def quiet(_: str) -> None:
    pass


# --- cross-references (no code: no kernel) ----------------------------------------------------------------

CROSSREF_BOOK = {
    "index.qmd": """
        # Preface {.unnumbered}

        See @sec-second and @fig-two; cited [@known2020].
        """,
    "01-first.qmd": """
        # First chapter {#sec-first}

        ## A section {#sec-a}

        ![One](pixel.png){#fig-one}

        ![Two](pixel.png){#fig-two}

        | a | b |
        |---|---|
        | 1 | 2 |

        : A table {#tbl-t}

        $$ E = mc^2 $$ {#eq-energy}

        As @eq-energy shows, and [-@fig-one] too.
        """,
    "02-second.qmd": """
        # Second chapter {#sec-second}

        @fig-two is in @sec-first; @tbl-t and @eq-energy too; @sec-a is a section. @sec-app, @fig-app. @Fig-one.

        ![Second chapter's first](pixel.png){#fig-three}

        ::: {#fig-div}
        ![](pixel.png)

        A figure in Quarto's div syntax.
        :::

        See @fig-div.
        """,
    "03-third.qmd": """
        ---
        title: "Titled in front matter"
        ---

        ![Third chapter's first](pixel.png){#fig-four}
        """,
}
APPENDIX = {"appendix.qmd": """
    # Extra {#sec-app}

    ![Appendix figure](pixel.png){#fig-app}
    """}


def test_cross_references_are_numbered_as_quarto_numbers_them(book_env):
    root = make_book(book_env, CROSSREF_BOOK, APPENDIX)
    (root / "report" / "pixel.png").write_bytes(PIXEL)
    report = build_book(root, pdf_book=False, log=quiet)
    assert report.executed == 0
    first = (root / "_book" / "01-first.html").read_text()
    second = (root / "_book" / "02-second.html").read_text()
    index = (root / "_book" / "index.html").read_text()
    appendix = (root / "_book" / "appendix.html").read_text()
    assert "Figure 1.1: One" in first and "Figure 1.2: Two" in first and "Table 1.1: A table" in first
    assert '<span class="header-section-number">1.1</span> A section' in first
    assert '<span class="eq-number">(1.1)</span>' in first
    assert '<a href="#eq-energy" class="quarto-xref">Equation\u00a01.1</a>' in first
    assert '<a href="#fig-one" class="quarto-xref">1.1</a>' in first  # [-@fig-one]: number only
    # across chapters: the link goes to the other page
    assert '<a href="01-first.html#fig-two" class="quarto-xref">Figure\u00a01.2</a>' in second
    assert '<a href="01-first.html#sec-first" class="quarto-xref">Chapter\u00a01</a>' in second
    assert '<a href="01-first.html#sec-a" class="quarto-xref">Section\u00a01.1</a>' in second
    assert ">Table\u00a01.1<" in second and ">Equation\u00a01.1<" in second
    assert "Figure 2.1: Second chapter" in second and '01-first.html#fig-one" class="quarto-xref">Figure' in second
    assert "Figure 2.2: A figure in Quarto" in second and ">Figure\u00a02.2</a>" in second
    third = (root / "_book" / "03-third.html").read_text()
    assert "Figure 3.1: Third" in third and '<span class="header-section-number">3</span> Titled in front' in third
    assert ">Appendix\u00a0A<" in second and ">Figure\u00a0A.1<" in second and "Figure A.1: Appendix" in appendix
    # the unnumbered index does not take chapter 1; citations go through citeproc, crossrefs do not
    assert '02-second.html#sec-second" class="quarto-xref">Chapter\u00a02<' in index
    assert "Known" in index and "?" not in index.split("<main")[1].split("Known")[0][-20:]
    assert "Known, Ann" in (root / "_book" / "references.html").read_text()
    # sidebar and prev/next
    assert 'href="02-second.html" rel="next"' in first and 'href="index.html" rel="prev"' in first
    assert all(f'href="{p}"' in appendix for p in ("index.html", "01-first.html", "02-second.html"))


def test_pdf_uses_quarto_numbers(book_env):
    root = make_book(book_env, CROSSREF_BOOK, APPENDIX)
    (root / "report" / "pixel.png").write_bytes(PIXEL)
    report = build_book(root, html_site=False, log=quiet)
    assert report.pdf == root / "_book" / "test.pdf" and report.pdf.read_bytes()[:5] == b"%PDF-"
    typ = (root / "_book" / "test.typ").read_text()
    assert "#set figure(numbering: none)" in typ
    assert "Figure 1.2: Two" in typ and "#link(<fig-two>)[Figure" in typ and "<eq-energy>" in typ
    assert "(fig-" not in typ and "#cite(<fig" not in typ


def test_unknown_reference_fails_naming_the_chapter(book_env):
    root = make_book(book_env, {"01-a.qmd": "# A {#sec-a}\n\nSee @fig-missing and [@nobody1999].\n"})
    with pytest.raises(CrossrefError, match=r"report/01-a.qmd: @fig-missing refers to no label") as err:
        build_book(root, pdf_book=False, log=quiet)
    assert "nobody1999" in str(err.value) and "\n" not in str(err.value)


def test_unknown_cell_options_are_refused(book_env):
    root = make_book(book_env, {"01-a.qmd": "# A\n\n```{python}\n#| colour: red\n1\n```\n"})
    with pytest.raises(QmdError, match="not a Quarto cell option"):
        build_book(root, pdf_book=False, log=quiet)
    (root / "report" / "01-a.qmd").write_text("# A\n\n```{python}\n#| code-fold: true\n1\n```\n")
    with pytest.raises(QmdError, match="Quarto knows but the preview builder does not honour"):
        build_book(root, pdf_book=False, log=quiet)


# --- executing cells (each build that runs code starts a kernel) --------------------------------------------

def test_a_failing_cell_fails_the_build_naming_chapter_and_cell(book_env):
    root = make_book(book_env, {"01-a.qmd": """
        # A

        ```{python}
        x = 1
        ```

        ```{python}
        #| label: broken
        y = x + 1
        raise ValueError(f"boom {y}")
        ```
        """})
    with pytest.raises(CellError) as err:
        build_book(root, pdf_book=False, log=quiet)
    message = str(err.value)
    assert "report/01-a.qmd" in message and "broken" in message and "y = x + 1" in message
    assert "ValueError: boom 2" in message and "\n" not in message


def chapter_with_cells(name: str, log: Path, extra: str = "") -> str:
    return f"""
        # Chapter {name}

        ```{{python}}
        #| echo: true
        open({str(log)!r}, "a").write("{name}-shown\\n")
        print("printed-{name}")
        ```

        ```{{python}}
        open({str(log)!r}, "a").write("{name}-hidden-code\\n")
        print("output-only-{name}")
        ```

        ```{{python}}
        #| include: false
        open({str(log)!r}, "a").write("{name}-include-false\\n")
        print("invisible-{name}")
        ```

        ```{{python}}
        #| eval: false
        #| echo: true
        open({str(log)!r}, "a").write("{name}-never\\n")
        ```
        {extra}
        """


FIGURE_CELL = """
        ```{python}
        #| label: fig-line
        #| fig-cap: "A line on [0, 1: $y = x$."
        #| fig-alt: "A rising line."
        from monosemantic import style
        fig, ax = style.figure("half")
        ax.plot([0, 1], [0, 1])
        ```

        ```{python}
        #| label: tbl-frame
        #| tbl-cap: "A frame."
        answer = 21
        import pandas as pd
        pd.DataFrame({"a": [1, 2], "b": [3.5, 4.5]}).rename_axis("row")
        ```

        ```{python}
        #| label: tbl-markdown
        #| tbl-cap: "A markdown table."
        style.table(pd.DataFrame({"name": ["`x`"], "v": [1.5]}))
        ```

        @fig-line and @tbl-frame; the answer is `{python} answer * 2`.
"""


def test_cell_options_and_selective_reexecution(book_env):
    log = book_env / "executions.log"
    root = make_book(book_env, {"01-a.qmd": chapter_with_cells("a", log, FIGURE_CELL),
                                "02-b.qmd": chapter_with_cells("b", log)}, execute="execute:\n  echo: false")

    def runs() -> list[str]:
        return log.read_text().split() if log.exists() else []

    report = build_book(root, pdf_book=False, log=quiet)
    assert sorted(runs()) == sorted(f"{c}-{w}" for c in "ab" for w in ("shown", "hidden-code", "include-false"))
    assert [r.executed for r in report.chapters] == [6, 3]  # eval: false cells never reach the kernel
    page = (root / "_book" / "01-a.html").read_text()
    assert "printed-a" in page and "a-shown" in page  # echo: true shows code and output
    assert "output-only-a" in page and "a-hidden-code" not in page  # execute: echo: false from _quarto.yml
    assert "invisible-a" not in page and "a-include-false" not in page  # include: false hides both
    assert "a-never" in page  # eval: false shows the code (echo: true) without running it
    assert "Figure 1.1: A line on [0, 1: <math" in page and 'alt="A rising line."' in page  # unbalanced [ is fine
    assert "Table 1.1: A frame." in page and "<table" in page
    assert re.search(r"<thead>\s*<tr[^>]*>\s*<th[^>]*>row</th>", page)  # pandas' index-name row merged into one
    assert "Table 1.2: A markdown table." in page and "<code>x</code>" in page  # style.table: markdown cells
    assert "@" not in page.split("A frame.")[-1].split("</main>")[0]  # the references resolved
    assert "the answer is 42." in page  # inline expressions, evaluated after the cells
    png = root / "_book" / "figures" / "01-a-fig-line-1.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and 'src="figures/01-a-fig-line-1.png"' in page
    notebook = json.loads((root / "_book" / "notebooks" / "01-a.ipynb").read_text())
    assert any("printed-a" in "".join(o.get("text", "")) for c in notebook["cells"] for o in c.get("outputs", []))
    assert 'href="notebooks/01-a.ipynb"' in page

    # unchanged: everything from the cache
    report = build_book(root, pdf_book=False, log=quiet)
    assert report.executed == 0 and all(r.cache_hit for r in report.chapters) and len(runs()) == 6

    # edit one chapter's code: only that chapter runs again; edit markdown only: nothing runs
    b = root / "report" / "02-b.qmd"
    b.write_text(b.read_text().replace('print("printed-b")', 'print("printed-b, edited")'))
    a = root / "report" / "01-a.qmd"
    a.write_text(a.read_text().replace("# Chapter a", "# Chapter a, retitled"))
    before = len(runs())
    report = build_book(root, pdf_book=False, log=quiet)
    assert [r.executed for r in report.chapters] == [0, 3]
    assert sorted(runs()[before:]) == ["b-hidden-code", "b-include-false", "b-shown"]
    assert "printed-b, edited" in (root / "_book" / "02-b.html").read_text()
    assert "Chapter a, retitled" in (root / "_book" / "01-a.html").read_text()

    # a changed artifact in the result cache re-runs the chapters (jupyter-cache cannot see data files)
    artifact = root / "cache" / "lm" / "tiny-model"
    artifact.mkdir(parents=True)
    (artifact / "manifest.json").write_text('{"stage": "lm"}')
    report = build_book(root, pdf_book=False, log=quiet)
    assert [r.executed for r in report.chapters] == [6, 3]


def test_style_sizes_and_palette(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from monosemantic import style

    assert len(set(style.PALETTE)) == 8 and style.PALETTE[-1] == "#F0E442"  # yellow last: faint in print
    fig, ax = style.figure("half")
    assert tuple(fig.get_size_inches()) == style.SIZES["half"]
    assert matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][0] == style.PALETTE[0]
    ax.plot([0, 1])
    assert style.savefig(fig, "check", folder=tmp_path) is None  # a cell ending with it prints nothing
    assert style.figure_path("check", tmp_path).read_bytes()[:4] == b"\x89PNG"
    with style.context():
        assert matplotlib.rcParams["font.size"] == style.FONT_SIZE


def test_style_table_is_markdown_with_aligned_columns():
    import pandas as pd

    from monosemantic import style

    frame = pd.DataFrame({"hook": ["`hook_embed`", "a|b"], "value": [0.123456, 2.0]}).set_index("hook")
    assert style.table(frame).data.splitlines() == [
        "| hook | value |", "|:---|---:|", "| `hook_embed` | 0.123 |", "| a\\|b | 2 |"]


def test_qmd_splitting_keeps_fenced_examples_as_text(tmp_path):
    from monosemantic.book import qmd

    text = textwrap.dedent('''
        ---
        title: T
        ---
        Value `{python} 1 + 1` here.

        ````markdown
        ```{python}
        not_a_cell()
        ```
        and `{python} not_inline` either
        ````

        ```{python}
        #| label: real
        #| echo: false
        x = 1
        ```
        ''').lstrip()
    doc = qmd.parse(tmp_path / "c.qmd", text)
    assert doc.front_matter == {"title": "T"}
    assert [(c.index, c.options, c.code) for c in doc.cells] == [(1, {"label": "real", "echo": False}, "x = 1")]
    assert doc.inline_expressions == ["1 + 1"]
    assert "not_a_cell()" in doc.parts[0] and "`{python} not_inline`" in doc.parts[0]
    assert qmd.substitute_inline(doc.parts[0], iter(["2"])).startswith("Value 2 here.")


def test_obsolete_typst_symbols_from_pandoc_are_renamed():
    from monosemantic.book.pdf import modernise_symbols

    assert modernise_symbols("a dot.circle b") == "a dot.o b"
    assert modernise_symbols("x dot.circle.big y") == "x dot.circle.big y"  # a different, longer name
    assert modernise_symbols("$(dot.circle)$") == "$(dot.o)$"


def test_apostrophes_after_a_digit_or_a_full_stop_print_as_apostrophes_and_code_keeps_its_quote(tmp_path):
    """typst's smart quotes print a prime after a digit (GPT-2′s) and an opening quote after a full stop
    (al.‘s); the builder gives typst the apostrophe itself, in text only."""
    import shutil
    import subprocess

    from monosemantic.book import pandoc, pdf, typography

    text = ("GPT-2's vocabulary, Bricken et al.'s rubric, [Table 4.1](https://example.org)'s row and "
            "`nn.Linear`'s default; the code `print(GPT-2's)` and the features' norms.\n")
    doc = pandoc.read(text, pandoc.READER, "apostrophes")
    typst_source = pandoc.write(pandoc.document(typography.typst_apostrophes(doc["blocks"])), "typst", "t")
    assert "GPT-2’s vocabulary" in typst_source and "et al.’s rubric" in typst_source
    assert "]’s row" in typst_source and "`nn.Linear`’s default" in typst_source
    assert "`print(GPT-2's)`" in typst_source  # the code span as written
    html = pandoc.write(pandoc.document(typography.apostrophes(doc["blocks"])), "html5", "h")
    assert "<code>nn.Linear</code>’s default" in html and "‘" not in html
    assert typography.apostrophes(typography.apostrophes(doc["blocks"])) == typography.apostrophes(doc["blocks"])
    cell = [{"t": "Plain", "c": [{"t": "Str", "c": "GPT-2's"}]}]  # a straight quote, as an HTML table cell has it
    assert typography.apostrophes(cell) == cell  # the HTML shows it as it is
    assert "GPT-2’s" in pandoc.write(pandoc.document(typography.typst_apostrophes(cell)), "typst", "c")
    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext) is not installed")
    out = pdf.write_pdf(doc["blocks"], {"title": pandoc.meta_string("Quotes")}, out_dir=tmp_path,
                        name="quotes.pdf", bibliography=[], api=doc["pandoc-api-version"])
    printed = " ".join(subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True,
                                      check=True).stdout.split())
    assert "GPT-2’s vocabulary" in printed and "al.’s rubric" in printed and "nn.Linear’s default" in printed
    assert "print(GPT-2's)" in printed and "′" not in printed and "‘" not in printed
    if shutil.which("pdfinfo"):  # the compiler's version, which the setup appendix lists, is the one the PDF names
        info = subprocess.run(["pdfinfo", str(out)], capture_output=True, text=True).stdout
        assert f"Typst {pdf.typst_version()}" in info, info


def test_text_in_angle_brackets_that_would_vanish_as_an_html_tag_is_found():
    from monosemantic.book import pandoc, typography

    doc = pandoc.read("stored as gpucheck/tiny-<gpu>, a <span>span</span>, `code <gpu>` and \\<tmp>\n",
                      pandoc.READER, "tags")
    assert typography.stray_tags(doc["blocks"]) == ["<gpu>"]


def test_the_build_reports_what_each_chapter_reads_and_refuses_an_artifact_that_rotted(book_env):
    """A chapter that loaded an artifact is listed with it; when that artifact's file is later damaged
    without its manifest changing (so the execution cache would hit), the build stops, naming both."""
    from monosemantic import store
    from monosemantic.config import StageConfig

    with store.write("toy", "tiny", "numbers", config=StageConfig()) as w:
        (w.dir / "values.txt").write_text("1 2 3\n")
        w.metrics["total"] = 6
    root = make_book(book_env, {"01-a.qmd": """
        # A

        ```{python}
        from monosemantic import store
        art = store.load("toy", "tiny", "numbers")
        print(art.metrics["total"])
        ```
        """, "02-b.qmd": "# B\n\nNo code.\n"})
    report = build_book(root, pdf_book=False, log=quiet)
    reads = {c.source: c.reads for c in report.chapters}
    assert list(reads["report/01-a.qmd"]) == ["toy/tiny-numbers"] and reads["report/02-b.qmd"] == {}
    assert json.loads((root / "_book" / "artifacts.json").read_text())["report/01-a.qmd"] == ["toy/tiny-numbers"]
    (store.artifact_path("toy", "tiny", "numbers") / "values.txt").write_text("1 2 4\n")
    with pytest.raises(store.CacheError) as err:
        build_book(root, pdf_book=False, log=quiet)
    message = str(err.value)
    assert "report/01-a.qmd reads toy/tiny-numbers" in message and "corrupt" in message and "\n" not in message


SITE_BOOK = {
    "index.qmd": """
        # Preface {.unnumbered}

        See @sec-one and @fig-dots; [the first chapter](01-one.qmd).
        """,
    "01-one.qmd": """
        # One {#sec-one}

        ```{python}
        #| label: fig-dots
        #| fig-cap: "Dots."
        import matplotlib.pyplot as plt
        plt.plot([1, 2, 3], "o")
        ```

        ![A pixel](pixel.png){#fig-pixel}

        Back to @fig-dots, and an external [link](https://example.org).
        """,
}


def test_every_page_of_the_site_loads_without_console_errors_or_broken_links(book_env):
    import shutil
    import subprocess

    from monosemantic.book import linkcheck

    root = make_book(book_env, SITE_BOOK)
    (root / "report" / "pixel.png").write_bytes(PIXEL)
    report = build_book(root, log=quiet)  # with the PDF, which every page links to (a fresh folder: no old one)
    assert report.pdf.is_file()
    pages, refs, problems = linkcheck.check_site(report.site.parent if report.site.is_file() else report.site)
    assert pages == 2 and refs >= 5 and problems == [], problems
    if shutil.which("chromium"):
        for page in sorted((root / "_book").glob("*.html")):
            res = subprocess.run(chromium.command("--enable-logging=stderr", "--v=0", "--virtual-time-budget=3000",
                                                  "--dump-dom", page.as_uri()), capture_output=True, text=True,
                                 timeout=120)
            assert "<body" in res.stdout, page.name
            errors = [line for line in res.stderr.splitlines() if "CONSOLE" in line
                      or "ERR_FILE_NOT_FOUND" in line]
            assert not errors, f"{page.name}: {errors[:3]}"
    # a broken image is refused, naming the page and the reference
    (root / "report" / "02-two.qmd").write_text("# Two\n\n![Gone](missing.png)\n", encoding="utf-8")
    (root / "_quarto.yml").write_text((root / "_quarto.yml").read_text().replace(
        "    - report/01-one.qmd\n", "    - report/01-one.qmd\n    - report/02-two.qmd\n"), encoding="utf-8")
    with pytest.raises(Exception) as err:
        build_book(root, pdf_book=False, log=quiet)
    assert "missing.png" in str(err.value) and "\n" not in str(err.value)


def test_a_table_cell_starting_with_an_equals_sign_is_text_not_a_heading(tmp_path):
    """A context such as '= &cpu_data' in a table cell: pandoc writes ``[= ...]``, which typst reads as a
    heading, and the book's heading rule (a page break) cannot run inside a table."""
    import typst

    from monosemantic.book.pdf import escape_cell_headings

    src = "#show heading.where(level: 1): it => { pagebreak(weak: true); it }\n#table(columns: 2, [a], [= b &c])\n"
    bad, good = tmp_path / "bad.typ", tmp_path / "good.typ"
    bad.write_text(src)
    good.write_text(escape_cell_headings(src))
    with pytest.raises(Exception, match="pagebreak"):
        typst.compile(str(bad), output=str(tmp_path / "bad.pdf"))
    typst.compile(str(good), output=str(tmp_path / "good.pdf"))
    assert escape_cell_headings("[a = b], [=x]") == "[a = b], [=x]"  # only a heading's opening


# --- scripts in the PDF, and content for one format ---------------------------------------------------------

SCRIPTS_TABLE = """
| script | text |
|---|---|
| Arabic | السلام |
| CJK | 中文字符 日本語 한국어 |
| Greek, Cyrillic, accents | αβγ Привет ĉŝ ñ ő |
| GPT-2 token | {fragment} |
| code | `السلام 中文` |

: Scripts {{#tbl-scripts}}
"""


def test_the_pdf_embeds_fonts_for_every_script_and_keeps_table_cells_as_text(tmp_path):
    """Arabic and CJK table cells come out as those characters, set in embedded Noto fonts (not as empty
    boxes), and a token holding part of a character as its bytes, through the builder's own PDF path."""
    import shutil
    import subprocess

    from monosemantic.book import pandoc, pdf
    from monosemantic.tokenizer import load as load_tokenizer

    if not (shutil.which("pdffonts") and shutil.which("pdftotext")):
        pytest.skip("poppler-utils (pdffonts, pdftotext) is not installed")
    fragment = load_tokenizer().token_strings(load_tokenizer().encode("日"))[0]  # 日 is 2 GPT-2 tokens
    assert fragment == "<0xE6><0x97>"
    doc = pandoc.read(SCRIPTS_TABLE.format(fragment=fragment), pandoc.READER, "scripts")
    out = pdf.write_pdf(doc["blocks"], {"title": pandoc.meta_string("Scripts")}, out_dir=tmp_path,
                        name="scripts.pdf", bibliography=[], api=doc["pandoc-api-version"])
    fonts = subprocess.run(["pdffonts", str(out)], capture_output=True, text=True, check=True).stdout
    for family in ("NotoSansArabic", "NotoSansCJK", "LibertinusSerif"):
        assert family in fonts, fonts
    assert re.search(r"NotoSansCJK\S* .* yes yes yes", fonts), fonts  # embedded, subset, with a ToUnicode map
    text = subprocess.run(["pdftotext", str(out), "-"], capture_output=True, text=True, check=True).stdout
    text = re.sub("[\u200e\u200f\u202a-\u202e\u2066-\u2069]", "", text)  # bidi marks pdftotext adds
    for cell in ("السلام", "中文字符 日本語 한국어", "αβγ Привет ĉŝ ñ ő", "<0xE6><0x97>"):
        assert cell in text, (cell, text)
    assert "\ufffd" not in text


def test_content_for_one_format_is_kept_for_that_target_only():
    from monosemantic.book import ast as A
    from monosemantic.book import crossref, pandoc

    doc = pandoc.read(textwrap.dedent("""
        Both.

        ::: {.content-visible when-format="typst"}
        PDF only.
        :::

        ::: {.content-visible when-format="html"}
        HTML only.
        :::

        ::: {.content-hidden when-format="typst"}
        Not in the PDF.
        :::

        ::: {.content-visible unless-format="html"}
        Not in HTML.
        :::

        ::: {.content-visible when-format="pdf"}
        LaTeX only, as in Quarto.
        :::

        A span [for the PDF]{.content-visible when-format="typst"}.
        """), pandoc.READER, "conditional")
    shown = {t: " ".join(A.stringify(b) for b in crossref.conditional_content(doc["blocks"], t))
             for t in ("html", "typst")}
    assert shown["html"].split() == "Both. HTML only. Not in the PDF. A span .".split()
    assert shown["typst"].split() == "Both. PDF only. Not in HTML. A span for the PDF.".split()


# --- tables and figures as a reader meets them (issue 21) -----------------------------------------------------

def _long_table(rows: int, caption: str, label: str) -> str:
    body = "\n".join(f"| row {i} | value {i} |" for i in range(rows))
    return f"| name | value |\n|---|---|\n{body}\n\n: {caption} {{#{label}}}\n"


def test_every_table_of_the_pdf_keeps_its_caption_with_it_and_short_tables_whole(book_env):
    """Each table is inside a figure with its caption (the builder refuses one without); a short table is set
    whole on one page, a long one breaks with its caption and first rows together, wherever the page ends."""
    import shutil
    import subprocess

    from monosemantic.book.pdf import TypstError, uncaptioned_tables

    if not shutil.which("pdftotext"):
        pytest.skip("poppler-utils (pdftotext) is not installed")
    filler = "\n\n".join(["A paragraph of prose that fills the page, line after line, as chapters do. " * 6] * 7)
    text = (f"# Tables {{#sec-tables}}\n\n{filler}\n\n{_long_table(12, 'A short table.', 'tbl-short')}\n\n"
            f"{filler}\n\n{_long_table(90, 'A long table.', 'tbl-long')}\n\nSee @tbl-short and @tbl-long.\n")
    root = make_book(book_env, {"01-tables.qmd": text})
    report = build_book(root, html_site=False, log=quiet)
    typ = (root / "_book" / "test.typ").read_text()
    assert uncaptioned_tables(typ) == [] and typ.count("#table(") == 2
    pages = subprocess.run(["pdftotext", "-layout", str(report.pdf), "-"], capture_output=True, text=True,
                           check=True).stdout.split("\f")

    def page_of(needle: str) -> int:
        return next(i for i, p in enumerate(pages) if needle in p)

    assert page_of("Table 1.1: A short table.") == page_of("row 0 ") == page_of("row 11 ")  # whole
    first = page_of("Table 1.2: A long table.")
    assert first == page_of("value 0\n") or first == page_of("value 0 ")  # the caption with its first rows
    assert all(f"row {i} " in pages[first] or f"row {i}\n" in pages[first] for i in range(3))
    assert page_of("row 89") > first and pages[page_of("row 89")].count("name") >= 1  # the header repeated
    assert page_of("row 88 ") == page_of("row 89")  # the last row never alone on a page

    # a table without a caption is refused, naming it
    root2 = make_book(book_env / "other", {"01-a.qmd": "# A\n\n| a | b |\n|---|---|\n| x1 | y |\n"})
    with pytest.raises(TypstError, match=r"1 table\(s\) without a caption.*x1"):
        build_book(root2, html_site=False, log=quiet)


def test_tables_made_equal_by_pandoc_get_natural_widths_and_literal_columns_stay_text():
    import pandas as pd

    from monosemantic import style
    from monosemantic.book import pandoc
    from monosemantic.book.assemble import natural_widths

    frame = pd.DataFrame({"name": ["`code` and $x^2$"], "token": ["' $5 `x` *y*'"],
                          "long": ["a cell long enough to make pandoc size the columns of the table " * 2]})
    markdown = style.table(frame, index=False, literal=["token"]).data
    table = next(b for b in pandoc.read(markdown, pandoc.READER, "t")["blocks"] if b["t"] == "Table")
    assert len({str(spec[1]) for spec in table["c"][2]}) == 1 and table["c"][2][0][1]["t"] == "ColWidth"
    table = natural_widths([table])[0]
    assert all(spec[1] == {"t": "ColWidthDefault"} for spec in table["c"][2])
    typ = pandoc.write(pandoc.document([table]), "typst", "t")
    assert "`code`" in typ and "$x^2$" in typ  # markdown in a markdown column renders (code, maths) ...
    assert "\\$5 \\`x\\` \\*y\\*" in typ  # ... and a literal column's characters are text


def test_one_meaning_per_colour_and_chapters_pick_colours_by_meaning():
    from monosemantic import style
    from monosemantic.config import project_root

    assert len(set(style.COLORS.values())) == len(style.COLORS)  # each colour means one thing
    assert {"ours", "anchor", "neurons", "random"} <= set(style.COLORS)
    assert not set(style.sequence(5)) & set(style.COLORS.values())
    chapters = sorted((project_root() / "report").glob("*.qmd"))
    assert chapters
    for path in chapters:
        text = path.read_text(encoding="utf-8")
        assert "PALETTE[" not in text, f"{path.name}: a colour picked by position, not by meaning"
        assert not re.search(r"colou?rs?=\s*['\"](#[0-9A-Fa-f]{6}|black|C\d|tab:\w+|red|blue|orange|green|grey|gray)",
                             text), f"{path.name}: a colour literal instead of style.COLORS"


def test_point_labels_do_not_collide_and_legends_sit_above_the_data(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from monosemantic import style

    fig, ax = style.figure("half")
    xs, ys = [8, 16, 24, 32, 64], [0.89, 0.94, 0.95, 0.96, 0.97]  # crowded points, as figure 3.1's TopK runs
    ax.plot(xs, ys, "o-", label="TopK")
    ax.plot([24], [1.0], "*", ms=11, label="main run")
    ax.set_xscale("log")
    legend = style.legend_above(ax)
    labels = style.label_points(ax, xs, ys, [str(x) for x in xs])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame, box = ax.get_window_extent(renderer), legend.get_window_extent(renderer)
    assert box.y0 >= frame.y1 - 1  # the legend is above the plotting area, over no data
    assert frame.x0 - 2 <= box.x0 and box.x1 <= frame.x1 + 2  # and no wider than it (no other panel's label)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 for b in boxes)


def test_the_site_ships_cut_down_fonts_for_every_script_and_a_browser_sets_them(book_env):
    """The site carries the PDF's Noto fonts, cut down to its characters, with the unicode-range of each; a
    second build reuses them; and headless Chromium sets the table's CJK cell in ours (the page loads it: on a
    machine without a CJK font of its own, the cell would otherwise show empty boxes)."""
    import shutil

    from monosemantic.book import pdf, webfonts
    from monosemantic.tokenizer import display_bytes

    table = SCRIPTS_TABLE.format(fragment=display_bytes("日".encode()[:2]))
    root = make_book(book_env, {"01-scripts.qmd": f"# Scripts {{#sec-scripts}}\n\nSee @tbl-scripts.\n\n{table}"})
    report = build_book(root, pdf_book=False, log=quiet)
    site = report.site.parent
    kept = json.loads((site / webfonts.FOLDER / webfonts.MANIFEST).read_text(encoding="utf-8"))
    fonts = {f["family"]: f for f in kept["fonts"]}
    cjk, arabic = (webfonts.FAMILY_PREFIX + "Noto Sans CJK SC", webfonts.FAMILY_PREFIX + "Noto Sans Arabic")
    assert {ord(c) for c in "中文字符日本語한국어"} <= set(fonts[cjk]["codepoints"])
    assert {ord(c) for c in "السلام"} <= set(fonts[arabic]["codepoints"])
    assert (site / fonts[cjk]["file"]).stat().st_size < 200_000  # a few glyphs, not the 19 MB collection
    css = (site / "book.css").read_text(encoding="utf-8")
    assert f'font-family: "{cjk}"; src: url("{fonts[cjk]["file"]}")' in css and "--script-fonts:" in css
    assert "unicode-range: U+" in css
    assert webfonts.write(site, pdf.font_paths())[1]  # unchanged characters: the fonts are reused

    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from test_browser_ui import Chromium

    chrome = Chromium()
    try:
        chrome.send("Page.navigate", session=True, url=(site / "01-scripts.html").as_uri())
        chrome.wait("document.readyState === 'complete'")
        # the layout asks for the fonts its characters need (and no other: Arabic may come from the machine's
        # fonts earlier in the stack); this machine has no CJK font, so the page must load ours
        chrome.wait(f"[...document.fonts].some((f) => f.family === {json.dumps(cjk)} && f.status === 'loaded')",
                    timeout=30)
        chrome.wait("!document.documentElement.classList.contains('fonts-loading')")  # shown once they are in
        for domain in ("DOM", "CSS"):
            chrome.send(f"{domain}.enable", session=True)
        document = chrome.send("DOM.getDocument", session=True)["root"]["nodeId"]
        cells = chrome.send("DOM.querySelectorAll", session=True, nodeId=document, selector="td")["nodeIds"]
        used = {}
        for node in cells:
            text = chrome.send("DOM.getOuterHTML", session=True, nodeId=node)["outerHTML"]
            fonts_used = chrome.send("CSS.getPlatformFontsForNode", session=True, nodeId=node)["fonts"]
            used[re.sub("<[^>]+>", "", text).strip()] = {f["familyName"] for f in fonts_used if f["isCustomFont"]}
    finally:
        chrome.close()
    assert any("CJK" in name for name in used["中文字符 日本語 한국어"]), used  # set in our font, not as boxes


def test_a_named_index_and_a_multiindex_give_tables_one_header_row():
    """pandas writes the names of a table's index levels as a second header row; the builder moves them into
    the first row's empty corner cells (one header row, as in a markdown table)."""
    import pandas as pd

    from monosemantic.book import ast as A
    from monosemantic.book import pandoc
    from monosemantic.book.assemble import embed_tables

    def header(frame) -> list[list[str]]:
        tables = pandoc.read(f'<div id="k">{frame.to_html()}</div>', "html", "t")["blocks"][0]["c"][1]
        blocks = embed_tables(pandoc.read("::: {#k}\n:::\n", pandoc.READER, "m")["blocks"], {"k": tables})
        table = next(n for n in A.preorder(blocks) if n["t"] == "Table")
        return [[A.stringify(c[4]) for c in row[1]] for row in table["c"][3][1]]

    rows = pd.DataFrame({"neuron": [136, 136], "kind": ["strongest", "random"], "activation": [1.6, 0.2]})
    assert header(rows.set_index(["neuron", "kind"])) == [["neuron", "kind", "activation"]]
    assert header(rows.set_index("neuron")) == [["neuron", "kind", "activation"]]
    assert header(rows.set_index("neuron").rename_axis(None)) == [["", "kind", "activation"]]  # nothing to move


def test_the_timed_edit_is_to_the_chapter_that_took_longest_to_execute():
    from monosemantic.book import timing

    chapters = [{"source": "report/index.qmd", "executed": 9, "seconds": 12.0},
                {"source": "report/03-reproduction.qmd", "executed": 56, "seconds": 35.5},
                {"source": "report/browser.qmd", "executed": 0, "seconds": 40.0}]  # a cache hit: not executed
    assert timing.slowest_chapter(chapters) == "report/03-reproduction.qmd"
