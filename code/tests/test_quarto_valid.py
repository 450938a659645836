"""The book's sources stay valid Quarto: documented option names only, and every reference resolves.

The option names come from Quarto's own schemas (committed as monosemantic/book/data/quarto_options.json);
these tests run over the real book in the checkout and over small broken books in tmp_path.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import pytest

from monosemantic.book import quarto_options
from monosemantic.config import project_root

# Quarto's own schema files sit in shared/ beside the repository (or where QUARTO_SCHEMA_DIR says)
SCHEMA = Path(os.environ.get("QUARTO_SCHEMA_DIR") or project_root().parent / "shared" / "quarto-schema")


def test_the_real_book_uses_only_documented_options_and_resolves_every_reference():
    root = project_root()
    assert (root / "_quarto.yml").is_file()
    assert quarto_options.check_book(root) == []


def test_the_check_reports_each_kind_of_problem(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "refs.bib").write_text("@misc{real2020,\n  title = {Real},\n  year = {2020}\n}\n")
    (tmp_path / "_quarto.yml").write_text(
        "project:\n  type: book\n  output-directory: _out\n"
        "book:\n  title: T\n  chapterz: []\n  chapters:\n    - report/a.qmd\n"
        "bibliography: report/refs.bib\n"
        "execute:\n  freez: auto\n"
        "format:\n  html:\n    papersize: a4\n  typst:\n    toc: true\n    theme: cosmo\n"
        "colour: blue\n")
    (tmp_path / "report" / "a.qmd").write_text(
        "---\ntitle: A\nfig-colour: red\n---\n\n# A {#sec-a}\n\n"
        "```{python}\n#| label: fig-ok\n#| lable: typo\n1\n```\n\n"
        "@fig-ok, @sec-a, @real2020; @fig-gone, @tbl-gone, [@nobody1999].\n")
    problems = "\n".join(quarto_options.check_book(tmp_path))
    for expected in ("`project: output-directory`", "`book: chapterz`", "`execute: freez`",
                     "`papersize` is not documented for format html", "`theme` is not documented for format typst",
                     "`colour` is not a Quarto", "front matter key `fig-colour`", "`#| lable`",
                     "@fig-gone refers to no label", "@tbl-gone refers to no label", "citation @nobody1999"):
        assert expected in problems, expected
    for fine in ("fig-ok", "sec-a", "real2020", "`toc`"):
        assert fine not in problems, fine


def test_option_formats_follow_the_schema():
    assert quarto_options.applies_to("papersize", "typst")
    assert not quarto_options.applies_to("papersize", "html")
    assert quarto_options.applies_to("toc", "html") and quarto_options.applies_to("toc", "typst")
    assert quarto_options.applies_to("bibliography", "typst")  # no formats tag: every format
    data = quarto_options.load()
    assert {"label", "fig-cap", "tbl-cap", "echo", "eval", "output", "include", "warning"} <= set(data["cell"])
    assert {"type", "output-dir"} <= set(data["project"]) and {"chapters", "appendices"} <= set(data["book"])
    assert "5d1da592d" in data["source"] and "MIT" in data["source"]


@pytest.mark.skipif(not (SCHEMA / "project.yml").is_file(), reason="Quarto's schema folder is not on this machine")
def test_the_committed_list_is_what_the_schema_gives():
    committed = json.loads(resources.files("monosemantic.book").joinpath("data", quarto_options.DATA).read_text())
    assert quarto_options.regenerate(SCHEMA) == committed
