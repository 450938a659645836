"""Running a chapter's cells in a Jupyter kernel, through jupyter-cache.

Each chapter becomes one notebook: a hidden first cell, then the chapter's cells that are evaluated
(``eval: false`` cells never reach the kernel). jupyter-cache keys a notebook on its code cells' text,
so a chapter whose code is unchanged is a cache hit and never re-runs, and editing one chapter re-runs
only that chapter. It does not see the data files cells read, so the hidden first cell carries the
sha256 of every ``manifest.json`` in the result cache (and the profile): a changed artifact changes the
key and re-runs the chapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat

from ..config import UserError
from .qmd import Cell

KERNEL = "python3"
_CACHE_LOCK = threading.Lock()  # one thread at a time reads or writes the cache's database (sqlite)
CELL_TIMEOUT_S = 1800


class CellError(UserError, RuntimeError):
    """A chapter's cell raised; the message names the chapter, the cell and the error, in one line."""


@dataclasses.dataclass
class ExecutedChapter:
    """A chapter's notebook after execution (or as merged from the cache) and how it was obtained."""

    notebook: nbformat.NotebookNode
    outputs: dict[int, list[dict[str, Any]]]  # cell index -> its outputs (only evaluated cells)
    inline: list[str]  # the values of the chapter's inline expressions, as markdown
    executed: int  # cells that ran in a kernel this time (0 on a cache hit)
    cache_hit: bool
    seconds: float
    reads: dict[str, str] = dataclasses.field(default_factory=dict)  # artifact key -> content hash


def artifacts_key(cache: Path) -> str:
    """sha256 over the path and content of every ``manifest.json`` under ``cache`` (``cache/work/`` excluded)
    and of the book's own measurements, ``cache/book/*.json`` (its build times: not an artifact of the
    pipeline, but read by a chapter all the same)."""
    h = hashlib.sha256()
    if cache.is_dir():
        for path in sorted([*cache.rglob("manifest.json"), *cache.glob("book/*.json")]):
            rel = path.relative_to(cache).as_posix()
            if rel.startswith("work/") or "/.tmp-" in f"/{rel}":
                continue
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def setup_source(artifacts: str, profile: str | None) -> str:
    """The hidden first cell: the cache key of the data, and the kernel's display settings."""
    return "\n".join([
        "# monosemantic book: hidden setup cell (its text keys the execution cache)",
        f"# artifacts sha256: {artifacts}",
        f"# profile: {profile or 'default'}",
        "%config InlineBackend.figure_formats = ['png']",
        "%config InlineBackend.rc = {'figure.dpi': 150, 'savefig.dpi': 150}",
    ])


INLINE_MARK = "monosemantic-inline-values:"
READS_MARK = "monosemantic-artifacts-read:"
READS_SOURCE = "\n".join([
    "# monosemantic book: hidden cell listing the artifacts this chapter's cells loaded",
    "import json as __monosemantic_json, sys as __monosemantic_sys",
    "__monosemantic_store = __monosemantic_sys.modules.get('monosemantic.store')",
    f"print({READS_MARK!r} + __monosemantic_json.dumps(getattr(__monosemantic_store, 'READS', {{}})))",
])


def inline_source(expressions: list[str]) -> str:
    """The hidden last cell: evaluates the chapter's inline expressions once every cell has run (as
    Quarto does) and prints their values, as markdown, on one marked line."""
    return "\n".join([
        "# monosemantic book: hidden cell evaluating the inline expressions",
        "def __monosemantic_inline(value):",
        "    markdown = getattr(value, '_repr_markdown_', None)",
        "    return markdown() if callable(markdown) else str(value)",
        "import json as __monosemantic_json",
        f"print({INLINE_MARK!r} + __monosemantic_json.dumps([",
        *[f"    __monosemantic_inline({e}),  # {json.dumps(e)}" for e in expressions],
        "]))",
    ])


def build_notebook(cells: list[Cell], setup: str, inline: list[str] | None = None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(setup)] + [nbformat.v4.new_code_cell(c.code) for c in cells]
    if inline:
        nb.cells.append(nbformat.v4.new_code_cell(inline_source(inline)))
    nb.cells.append(nbformat.v4.new_code_cell(READS_SOURCE))
    for cell in nb.cells:  # ids are not part of the cache key; fixed ones keep the .ipynb files stable
        cell.pop("id", None)
    nb.nbformat_minor = 4
    return nb


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables for the kernels (they inherit this process's environment). Set it once around
    every execution of a build: chapters execute in several threads at once, and a variable set and
    restored by one of them would change another's."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_chapter(source: str, cells: list[Cell], *, jupyter_cache: Path, cwd: Path, setup: str,
                    inline: list[str] | None = None, env: dict[str, str] | None = None) -> ExecutedChapter:
    """Execute ``cells`` (the chapter's evaluated cells, in order) and then its ``inline`` expressions, or
    take all of it from the cache.

    ``source`` names the chapter in messages. Raises :class:`CellError` when a cell fails.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.executors.utils import single_nb_execution

    start = time.perf_counter()
    nb = build_notebook(cells, setup, inline)
    try:
        with _CACHE_LOCK:
            cache = get_cache(str(jupyter_cache))
            _, merged = cache.merge_match_into_notebook(nb)
        return ExecutedChapter(merged, _outputs(merged, cells), _inline_values(merged, inline), 0, True,
                               time.perf_counter() - start, _marked(merged, READS_MARK) or {})
    except KeyError:
        pass
    with environment(env) if env else contextlib.nullcontext():
        try:
            # --log-level=ERROR: the kernel's warning about its loopback TCP transport is noise in the log
            result = single_nb_execution(nb, cwd=str(cwd), timeout=CELL_TIMEOUT_S, allow_errors=False,
                                         extra_arguments=["--log-level=ERROR"])
        except Exception as e:  # the kernel died or could not start (cell errors are returned, not raised)
            raise CellError(f"{source}: the Jupyter kernel failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}") from e
    if result.err is not None:
        raise CellError(_describe_failure(source, result.nb, cells, result.err))
    values = _inline_values(result.nb, inline)  # before caching: a malformed result must not be kept
    with _CACHE_LOCK:
        cache.cache_notebook_bundle(CacheBundleIn(result.nb, source), check_validity=False, overwrite=True)
    return ExecutedChapter(result.nb, _outputs(result.nb, cells), values, len(cells), False,
                           time.perf_counter() - start, _marked(result.nb, READS_MARK) or {})


def _outputs(nb: nbformat.NotebookNode, cells: list[Cell]) -> dict[int, list[dict[str, Any]]]:
    code = [c for c in nb.cells if c.cell_type == "code"][1:]  # skip the setup cell
    return {cell.index: list(nb_cell.get("outputs", [])) for cell, nb_cell in zip(cells, code, strict=False)}


def _marked(nb: nbformat.NotebookNode, mark: str) -> Any:
    """The JSON a hidden cell printed after ``mark`` (searched from the last cell back), or None."""
    for cell in reversed([c for c in nb.cells if c.cell_type == "code"]):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith(mark):
                    return json.loads(line[len(mark):])
    return None


def _inline_values(nb: nbformat.NotebookNode, inline: list[str] | None) -> list[str]:
    if not inline:
        return []
    values = _marked(nb, INLINE_MARK)
    if values is None:
        raise CellError("the inline expressions' values are missing from the executed notebook")
    return values


def _describe_failure(source: str, nb: nbformat.NotebookNode, cells: list[Cell], err: Exception) -> str:
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, nb_cell in enumerate(code):
        for out in nb_cell.get("outputs", []):
            if out.get("output_type") == "error":
                what = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}".strip()
                if i == 0:
                    where = "the hidden setup cell"
                elif i > len(cells):
                    where = "an inline `{python} ...` expression"
                else:
                    where = f"cell {cells[i - 1].name}"
                return f"{source}: {where} failed: {' '.join(what.split())}"
    return f"{source}: execution failed: {' '.join(str(err).split())[:300]}"
