"""Calling pandoc (3.9, shipped by the ``pypandoc-binary`` wheel) on text and on JSON ASTs."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path
from typing import Any

from ..config import UserError

READER = "markdown"  # pandoc's own markdown: Quarto's dialect minus executable cells, which qmd.py removes


class PandocError(UserError, RuntimeError):
    """pandoc failed; the message carries its first error line."""


@functools.cache
def executable() -> str:
    import pypandoc

    return pypandoc.get_pandoc_path()


def run(args: list[str], stdin: str, what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([executable(), *args], input=stdin.encode(), capture_output=True, cwd=cwd)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.decode(errors="replace").split())[:400]
        raise PandocError(f"pandoc failed on {what}: {message}")
    return proc.stdout.decode()


def read(text: str, fmt: str, what: str) -> dict[str, Any]:
    """Text in ``fmt`` (markdown, html) -> pandoc's JSON AST as a dict."""
    return json.loads(run(["-f", fmt, "-t", "json"], text, what))


def write(doc: dict[str, Any], fmt: str, what: str, args: list[str] | None = None, cwd: Path | None = None) -> str:
    """A JSON AST -> ``fmt`` (html5, typst); ``args`` e.g. ``--citeproc``."""
    return run(["-f", "json", "-t", fmt, *(args or [])], json.dumps(doc), what, cwd=cwd)


def document(blocks: list[dict[str, Any]], meta: dict[str, Any] | None = None,
             api: list[int] | None = None) -> dict[str, Any]:
    return {"pandoc-api-version": api or [1, 23, 1, 1], "meta": meta or {}, "blocks": blocks}


def meta_string(value: str) -> dict[str, Any]:
    return {"t": "MetaString", "c": value}


def meta_bool(value: bool) -> dict[str, Any]:
    return {"t": "MetaBool", "c": value}


@functools.cache
def highlighting_css() -> str:
    """The CSS pandoc writes for its syntax highlighting (it is left out of HTML fragments)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "css.html"
        template.write_text("$highlighting-css$\n", encoding="utf-8")
        return run(["-s", f"--template={template}", "-t", "html5"], "```python\nx = 1\n```\n", "highlighting CSS")
