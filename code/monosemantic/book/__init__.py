"""The book's preview builder: the same sources as ``quarto render``, built without the Quarto CLI.

``monosemantic book`` executes each chapter's python cells in a Jupyter kernel through jupyter-cache
(a chapter whose code and cache artifacts are unchanged is not re-run), numbers and resolves the
cross-references the way Quarto does, and writes the HTML site and one PDF to ``_book/`` with pandoc
and typst. ``make report`` uses Quarto when it is installed and this otherwise.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "build", "run"]

# No default: without --profile the chapters show the largest profile present in the cache (DESIGN.md);
# with it, the kernel gets MONOSEMANTIC_PROFILE and the profile becomes part of the execution cache key.
DEFAULT_PROFILE = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    for action in p._actions:  # the CLI's shared --profile option: say what no profile means here
        if action.dest == "profile":
            action.help = "pass this profile to the chapters (MONOSEMANTIC_PROFILE); default: each chapter " \
                          "shows the largest profile in the cache"
    p.add_argument("--no-pdf", action="store_true", help="write the HTML site only (faster)")
    p.add_argument("--no-html", action="store_true", help="write the PDF only")
    p.add_argument("--check", action="store_true",
                   help="only check that the sources are valid Quarto and every reference resolves")
    p.add_argument("--time", action="store_true",
                   help="measure a cold build of a fresh copy of this checkout and the rebuild after an edit to "
                        "its slowest chapter (minutes); writes cache/book/build-times.json, which the setup "
                        "appendix reads")


def run(args: argparse.Namespace) -> int:
    from ..config import project_root

    if args.check:
        from .quarto_options import check_book

        problems = check_book(project_root())
        for line in problems:
            print(line)
        print(f"book sources: {len(problems)} problem(s)")
        return 1 if problems else 0
    if args.time:
        from .timing import RESULT, measure, summary

        s = summary(measure(project_root()))
        print(f"book: cold build {s['cold_s']:.0f} s; after an edit to {s['edited']}: {s['edit_s']:.0f} s, "
              f"re-running {', '.join(s['rerun']) or 'nothing'} ({s['rerun_cells']} cells); written to {RESULT}")
        return 0
    from .build import build

    build(profile=getattr(args, "profile", None), html_site=not args.no_html, pdf_book=not args.no_pdf)
    return 0


def build(*args: Any, **kwargs: Any):
    """:func:`monosemantic.book.build.build` (imported on first use, so the CLI's --help stays fast)."""
    from .build import build as _build

    return _build(*args, **kwargs)
