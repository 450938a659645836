"""How long the book takes to build: a cold build from a fresh copy of the checkout, then the rebuild after
an edit to the code of its slowest chapter (the longest one-chapter rebuild). ``monosemantic book --time``
measures both and writes them to :data:`RESULT` (``cache/book/build-times.json``, committed), which the
setup appendix reads.

The fresh copy holds what a clone would: the files git tracks, and those it would track (not ignored), so
no ``_book/``, ``.jupyter_cache/``, ``cache/work/`` (where the feature browsers' data are kept between
builds) or ``report/browser*/``. The builds run in new processes with the package imported from the copy,
with this interpreter (the same installed dependencies, so nothing is reinstalled).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT = Path("cache") / "book" / "build-times.json"

def slowest_chapter(chapters: list[dict[str, Any]]) -> str:
    """The chapter whose cells took longest in a cold build (``build.json``'s chapters): the edit that
    :func:`measure` times is to its code, the slowest one-chapter rebuild there is."""
    return max(chapters, key=lambda c: (c["executed"] > 0, c["seconds"]))["source"]

EDIT_MARK = "# monosemantic book --time: an edit to this chapter's code\n"


def fresh_copy(root: Path, dest: Path) -> Path:
    """Copy the files of the checkout at ``root`` that a clone of it would hold into ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = root / rel
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _build(copy: Path, log: Path) -> dict[str, Any]:
    """``monosemantic book`` in ``copy`` (a new process); its wall time and its own report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONOSEMANTIC_")}
    env.update({"MONOSEMANTIC_ROOT": str(copy),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(copy / "code"), env.get("PYTHONPATH")]))})
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "monosemantic", "book"], cwd=copy, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"the book did not build in {copy} (exit {proc.returncode}); see {log}")
    report = json.loads((copy / "_book" / "build.json").read_text(encoding="utf-8"))
    return {"seconds": round(seconds, 1), "chapters": report["chapters"]}


def edit_chapter(path: Path) -> None:
    """Change ``path``'s code: a comment line at the top of its first python cell (its output is unchanged,
    but jupyter-cache keys a chapter on its code, so the chapter runs again)."""
    text = path.read_text(encoding="utf-8")
    fence = "```{python}\n"
    i = text.index(fence) + len(fence)
    while text.startswith("#|", i):  # after the cell's options
        i = text.index("\n", i) + 1
    path.write_text(text[:i] + EDIT_MARK + text[i:], encoding="utf-8")


def measure(root: Path, keep: Path | None = None) -> dict[str, Any]:
    """Time a cold build of a fresh copy of ``root`` and the rebuild after :func:`edit_chapter` on its
    :func:`slowest_chapter`; write them to ``root/``:data:`RESULT` and return them. ``keep``: build there (left
    in place) instead of a temporary folder."""
    from .. import hardware, store

    work = Path(tempfile.mkdtemp(prefix="book-time-")) if keep is None else keep
    copy = work / "fresh"
    if copy.exists():
        shutil.rmtree(copy)
    log = work / "build.log"
    log.unlink(missing_ok=True)
    try:
        fresh_copy(root, copy)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        cold = _build(copy, log)
        edited = slowest_chapter(cold["chapters"])
        edit_chapter(copy / edited)
        edit = _build(copy, log)
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    hw = hardware.describe()
    result = {
        "command": "monosemantic book --time",
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": store.git_commit(),
        "machine": {"cpu": hw["cpu"], "cpu_cores": hw["cpu_cores"], "load_average_at_start": load},
        "cold": cold,
        "edit": {"chapter": edited, **edit},
    }
    out = root / RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a reader wants from :func:`measure`'s result: both wall times, which chapters the edit
    re-ran and how many cells, the slowest chapters of the cold build."""
    cold, edit = result["cold"], result["edit"]
    rerun = [c for c in edit["chapters"] if c["executed"]]
    return {"cold_s": cold["seconds"], "edit_s": edit["seconds"], "edited": edit["chapter"],
            "rerun": [c["source"] for c in rerun], "rerun_cells": sum(c["executed"] for c in rerun),
            "slowest": sorted(cold["chapters"], key=lambda c: -c["seconds"])[:3],
            "machine": result["machine"], "measured": result["measured"]}
