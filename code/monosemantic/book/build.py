"""Building the book: execute each chapter (through jupyter-cache), convert with pandoc, number and
resolve cross-references, write the HTML site and the PDF.

The pipeline, per chapter: ``.qmd`` -> cells and markdown (:mod:`.qmd`) -> executed outputs
(:mod:`.execute`) -> markdown with outputs (:mod:`.assemble`) -> pandoc JSON AST -> numbered
(:mod:`.crossref`); then, with every chapter's labels known, each chapter is resolved and written
as an HTML page (:mod:`.html`), and all of them together as one typst document (:mod:`.pdf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbformat

from ..config import project_root
from . import ast as A
from . import crossref, execute, html, linkcheck, pandoc, pdf, project, qmd, quarto_options, typography, webfonts
from .assemble import align_columns, chapter_markdown, embed_tables, natural_widths
from .crossref import CrossrefError

FIGURES = "figures"  # cell outputs, under the output folder
IMAGES = "images"  # images the markdown itself refers to, copied in
NOTEBOOKS = "notebooks"
REFERENCES_PAGE = "references.html"


@dataclasses.dataclass
class ChapterReport:
    source: str
    cells: int  # evaluated cells
    executed: int  # of which run in a kernel this build
    cache_hit: bool
    seconds: float
    reads: dict[str, str] = dataclasses.field(default_factory=dict)  # artifact key -> content hash


@dataclasses.dataclass
class BuildReport:
    chapters: list[ChapterReport]
    site: Path | None
    pdf: Path | None
    seconds: float

    @property
    def executed(self) -> int:
        return sum(c.executed for c in self.chapters)


@dataclasses.dataclass
class _Chapter:
    file: project.ChapterFile
    doc: qmd.Qmd
    blocks: list[A.Node]
    api: list[int]  # pandoc's AST version, handed back to it with the blocks
    number: str | None = None
    title: str = ""
    notebook: str | None = None


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every chapter's execution shares."""

    root: Path
    jupyter_cache: Path
    setup: str  # the hidden first cell (keys the cache on the result cache's manifests and the profile)
    env: dict[str, str]
    documented_cells: frozenset[str]


def default_jobs() -> int:
    """Chapters executed at once: one kernel per core, at most :data:`MAX_JOBS` (each kernel holds the package
    and its data in memory)."""
    return max(1, min(MAX_JOBS, os.cpu_count() or 1))


MAX_JOBS = 4


def build(root: Path | None = None, *, profile: str | None = None, html_site: bool = True, pdf_book: bool = True,
          log: Callable[[str], None] = print, jobs: int | None = None) -> BuildReport:
    """Build the book in ``root`` (default: the checkout) into its ``_book/``; returns what was done.

    Chapters that must run execute ``jobs`` at a time (default :func:`default_jobs`), each in its own kernel;
    they are read, numbered and reported in book order all the same. The site's pages and the PDF are
    written at the same time too.

    Raises a :class:`~monosemantic.config.UserError` (one line) for invalid sources, a failing cell or an
    unresolved reference."""
    start = time.perf_counter()
    root = (root or project_root()).resolve()
    proj = project.load(root)
    out = proj.output_dir
    out.mkdir(parents=True, exist_ok=True)
    for sub in (FIGURES, IMAGES, NOTEBOOKS):
        shutil.rmtree(out / sub, ignore_errors=True)
    cache = Path(os.environ.get("MONOSEMANTIC_CACHE") or root / "cache")
    package_parent = str(Path(__file__).resolve().parents[2])  # so the kernel imports this very package
    env = {"MONOSEMANTIC_ROOT": str(root), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    if profile:
        env["MONOSEMANTIC_PROFILE"] = profile
    run = _Run(root, root / ".jupyter_cache", execute.setup_source(execute.artifacts_key(cache), profile), env,
               frozenset(quarto_options.load()["cell"]))
    docs = [qmd.parse(f.path) for f in proj.chapters]
    invalid = quarto_options.check_config(proj.config)
    for file, doc in zip(proj.chapters, docs, strict=True):
        invalid += quarto_options.check_front_matter(doc.front_matter, file.source)
    if invalid:
        raise project.ProjectError("not valid Quarto: " + "; ".join(invalid))
    log(f"book: {len(proj.chapters)} files from {root / '_quarto.yml'}")

    reports: list[ChapterReport] = []
    chapters: list[_Chapter] = []
    numbering = crossref.Numbering()
    # the kernels inherit this process's environment: set once for all of them (they run at the same time)
    with execute.environment(run.env), ThreadPoolExecutor(max_workers=jobs or default_jobs()) as pool:
        runs = [pool.submit(_execute_chapter, proj, file, doc, run) for file, doc in zip(proj.chapters, docs,
                                                                                          strict=True)]
        try:
            for file, doc, ran in zip(proj.chapters, docs, runs, strict=True):
                chapter, report = _prepare_chapter(proj, file, doc, ran.result(), numbering)
                chapters.append(chapter)
                reports.append(report)
                status = ("no code" if report.cells == 0 and not report.executed and not report.cache_hit
                          else "cache hit" if report.cache_hit else f"executed {report.executed} cells")
                log(f"  {file.source:<32} {status:<20} {report.seconds:5.1f} s"
                    + (f"  reads {', '.join(sorted(report.reads))}" if report.reads else ""))
        except BaseException:
            for ran in runs:  # a failing chapter stops the build: chapters not started yet never start
                ran.cancel()
            raise
    _check_reads(reports)

    # every reference resolved for both outputs before anything is written
    problems: list[str] = []
    bib_keys = _bibliography_keys(proj.bibliography)
    for ch in chapters:
        problems += [f"{ch.file.source}: citation @{key} is not in the bibliography"
                     for key in sorted(crossref.cited_keys(ch.blocks) - bib_keys)]
    resolved: dict[str, dict[str, list[A.Node]]] = {"html": {}, "typst": {}}
    for target, found in (("html", problems), ("typst", [])):  # each problem is reported once
        for ch in chapters:
            resolved[target][ch.file.page] = crossref.resolve(
                json.loads(json.dumps(ch.blocks)), numbering.labels, page=ch.file.page, target=target,
                where=ch.file.source, problems=found)
    if problems:
        raise CrossrefError(f"{len(problems)} unresolved reference(s): " + "; ".join(dict.fromkeys(problems)))

    api = chapters[0].api
    if html_site or pdf_book:  # which chapter read which artifact (and its content hash), for the record
        proj.output_dir.mkdir(parents=True, exist_ok=True)
        (proj.output_dir / "artifacts.json").write_text(
            json.dumps({r.source: sorted(r.reads) for r in reports}, indent=1) + "\n")
    with ThreadPoolExecutor(max_workers=1) as pdf_thread:  # the PDF typesets while the site's pages are written
        typeset = pdf_thread.submit(_write_book_pdf, proj, chapters, resolved["typst"], api) if pdf_book else None
        site = _write_site(proj, chapters, resolved["html"], api, with_pdf=pdf_book,
                           jobs=jobs or default_jobs()) if html_site else None
        pdf_path = typeset.result() if typeset is not None else None
    if site is not None:  # every local link and image of every page resolves (the PDF's too, written above)
        n_pages, n_refs, broken = linkcheck.check_site(proj.output_dir)
        if broken:
            raise linkcheck.LinkError(f"{len(broken)} broken link(s) or image(s) in the site: "
                                      + "; ".join(broken[:3]) + ("; ..." if len(broken) > 3 else ""))
        log(f"book: site checked: {n_pages} pages, {n_refs} local links and images, all resolve")
    seconds = time.perf_counter() - start
    # what this build did, for the record and for `monosemantic book --time` (book/timing.py)
    (proj.output_dir / "build.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "chapters": [
            {"source": r.source, "cells": r.cells, "executed": r.executed, "cache_hit": r.cache_hit,
             "seconds": round(r.seconds, 1)} for r in reports]}, indent=1) + "\n")
    done = ", ".join(str(p.relative_to(root)) for p in (site, pdf_path) if p)
    log(f"book: {done or 'checked'} in {seconds:.1f} s "
        f"({sum(r.executed for r in reports)} cells executed, {sum(r.cache_hit for r in reports)} chapters from cache)")
    return BuildReport(reports, site, pdf_path, seconds)


def _execution_defaults(proj: project.Project, doc: qmd.Qmd) -> list[dict[str, Any]]:
    """Execution options: _quarto.yml's execute:, the chapter's execute:, its top-level echo: and the like."""
    front = doc.front_matter
    return [proj.execute, front.get("execute") or {},
            {k: v for k, v in front.items() if k in qmd.DOCUMENT_EXECUTE_KEYS}]


@dataclasses.dataclass
class _Executed:
    """A chapter's cells after execution (or from the cache)."""

    cells: int  # evaluated cells (an inline expression counts as one when there is no cell)
    outputs: dict[int, list[dict[str, Any]]]
    values: list[str]  # the inline expressions' values
    executed: int
    cache_hit: bool
    reads: dict[str, str]
    seconds: float
    blocks: list[A.Node] = dataclasses.field(default_factory=list)  # the chapter read, before numbering
    api: list[int] = dataclasses.field(default_factory=list)


def _execute_chapter(proj: project.Project, file: project.ChapterFile, doc: qmd.Qmd, run: _Run) -> _Executed:
    """Execute one chapter's cells (or take them from the cache) and read it with its outputs into pandoc's
    AST; runs in a worker thread, several chapters at once (numbering, which needs book order, comes after)."""
    ran = _run_cells(proj, file, doc, run)
    t0 = time.perf_counter()
    parsed = _read_chapter(file, doc, ran.outputs, ran.values, _execution_defaults(proj, doc), proj.output_dir)
    blocks = natural_widths(align_columns(crossref.normalise(_relocate_images(parsed["blocks"], file,
                                                                               proj.output_dir))))
    blocks = typography.apostrophes(blocks)
    if stray := typography.stray_tags(blocks):
        raise project.ProjectError(f"{file.source}: {', '.join(stray[:3])} would vanish from the book: pandoc "
                                   f"reads text in angle brackets as an HTML tag; put it in backticks or write \\<")
    title = doc.front_matter.get("title")
    if title and not any(b["t"] == "Header" and b["c"][0] == 1 for b in blocks):
        # a chapter titled in its front matter (Quarto allows either); its heading is made from it
        title_blocks = pandoc.read(str(title), pandoc.READER, f"{file.source} (title)")["blocks"]
        inlines = title_blocks[0]["c"] if title_blocks else A.text(str(title))
        blocks.insert(0, {"t": "Header", "c": [1, A.attr(), inlines]})
    return dataclasses.replace(ran, blocks=blocks, api=parsed["pandoc-api-version"],
                               seconds=ran.seconds + time.perf_counter() - t0)


def _run_cells(proj: project.Project, file: project.ChapterFile, doc: qmd.Qmd, run: _Run) -> _Executed:
    t0 = time.perf_counter()
    defaults = _execution_defaults(proj, doc)
    for cell in doc.cells:
        qmd.check_cell_options(file.path.relative_to(proj.root), cell, run.documented_cells)
    evaluated = [c for c in doc.cells if qmd.effective_options(c, *defaults)["eval"] is not False]
    chapter_eval = {k: v for d in defaults for k, v in d.items()}.get("eval", True) is not False
    inline = doc.inline_expressions if chapter_eval else []
    cells = len(evaluated) + (1 if inline and not evaluated else 0)
    if not (evaluated or inline):
        return _Executed(cells, {}, [], 0, False, {}, time.perf_counter() - t0)
    ran = execute.execute_chapter(file.source, evaluated, jupyter_cache=run.jupyter_cache, cwd=run.root,
                                  setup=run.setup, inline=inline)
    return _Executed(cells, ran.outputs, ran.inline, ran.executed, ran.cache_hit, ran.reads,
                     time.perf_counter() - t0)


def _prepare_chapter(proj: project.Project, file: project.ChapterFile, doc: qmd.Qmd, ran: _Executed,
                     numbering: crossref.Numbering) -> tuple[_Chapter, ChapterReport]:
    """Number one executed and read chapter (in book order) and write its notebook."""
    t0 = time.perf_counter()
    chapter = _Chapter(file, doc, ran.blocks, api=ran.api)
    chapter.number, chapter.title = numbering.number_chapter(ran.blocks, file.page, file.appendix, file.source)
    chapter.notebook = _write_notebook(doc, ran.outputs, proj.output_dir, file.stem)
    return chapter, ChapterReport(file.source, ran.cells, ran.executed, ran.cache_hit,
                                  ran.seconds + time.perf_counter() - t0, ran.reads)


def _check_reads(reports: list[ChapterReport]) -> None:
    """Refuse to publish a chapter whose numbers came from an artifact that has changed since, or that no
    longer verifies (tampered, truncated, stale against its config or upstream): one line naming both."""
    from .. import store

    for r in reports:
        for key, content_hash in sorted(r.reads.items()):
            stage, rest = key.split("/", 1)
            profile, name = rest.split("-", 1)
            try:
                art = store.load(stage, profile, name)
            except store.CacheError as e:
                raise store.CacheError(f"{r.source} reads {key}, which no longer verifies: {e}") from None
            if art.content_hash != content_hash:
                raise store.CacheError(f"{r.source} was executed with a different {key} than the cache holds "
                                       f"now; rebuild with `make clean-book report`")


def _read_chapter(file: project.ChapterFile, doc: qmd.Qmd, outputs: dict[int, list[dict[str, Any]]],
                  inline: list[str], defaults: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The chapter, its outputs in place, as pandoc's JSON AST (table outputs read from their HTML)."""
    assembled = chapter_markdown(doc, outputs, defaults, out / FIGURES, inline)
    parsed = pandoc.read(assembled.markdown, pandoc.READER, file.source)
    if assembled.html_tables:
        wrapped = "".join(f'<div id="{k}">{v}</div>' for k, v in assembled.html_tables.items())
        tables_doc = pandoc.read(wrapped, "html", f"{file.source} (table outputs)")
        # keep the tables, drop the <style> pandas puts before them (raw HTML the PDF cannot use)
        tables = {b["c"][0][0]: [x for x in b["c"][1] if x["t"] != "RawBlock"]
                  for b in tables_doc["blocks"] if b["t"] == "Div"}
        parsed["blocks"] = embed_tables(parsed["blocks"], tables)
    return parsed


def _relocate_images(blocks: list[A.Node], file: project.ChapterFile, out: Path) -> list[A.Node]:
    """Cell outputs (absolute paths under the output folder) become relative; images the markdown refers
    to (relative to the chapter) are copied into ``images/``."""

    def fix(node: A.Node):
        if node["t"] != "Image":
            return None
        target = node["c"][2][0]
        if "://" in target or target.startswith("data:"):
            return None
        path = Path(target)
        if path.is_absolute() and path.is_relative_to(out):
            node["c"][2][0] = path.relative_to(out).as_posix()
            return node
        source = (file.path.parent / path).resolve()
        if not source.is_file():
            raise CrossrefError(f"{file.source}: image {target} does not exist ({source})")
        dest = out / IMAGES / source.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        node["c"][2][0] = f"{IMAGES}/{source.name}"
        return node

    return A.walk(blocks, fix)


def _write_notebook(doc: qmd.Qmd, outputs: dict[int, list[dict[str, Any]]], out: Path, stem: str) -> str:
    """The chapter as a notebook a reader can run: its markdown and its cells, with their outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": execute.KERNEL, "display_name": "Python 3", "language": "python"}
    for part in doc.parts:
        if isinstance(part, str):
            if part.strip():
                nb.cells.append(nbformat.v4.new_markdown_cell(part.strip("\n")))
        else:
            cell = nbformat.v4.new_code_cell(part.source)
            cell.outputs = [nbformat.from_dict(o) for o in outputs.get(part.index, [])]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{stem}-{i}"
    path = out / NOTEBOOKS / f"{stem}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return f"{NOTEBOOKS}/{stem}.ipynb"


def _bibliography_keys(paths: list[Path]) -> set[str]:
    import re

    keys: set[str] = set()
    for p in paths:
        if p.is_file():
            keys |= set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", p.read_text(encoding="utf-8")))
    return keys


def _citeproc_args(proj: project.Project) -> list[str]:
    bibs = [b for b in proj.bibliography if b.is_file()]
    if not bibs:
        return []
    return ["--citeproc", *[f"--bibliography={b}" for b in bibs], "-M", "link-citations=true"]


def _nav(chapters: list[_Chapter]) -> list[html.NavEntry]:
    return [html.NavEntry(c.file.page, c.number, c.title, c.file.appendix) for c in chapters]


def _write_site(proj: project.Project, chapters: list[_Chapter], resolved: dict[str, list[A.Node]],
                api: list[int], with_pdf: bool, jobs: int = 1) -> Path:
    out = proj.output_dir
    authors = proj.book.get("author") or []
    authors = [authors] if isinstance(authors, str) else [str(a) for a in authors]
    header = html.title_block(proj.title, proj.book.get("subtitle"), authors)
    cite_args = _citeproc_args(proj)
    version = pandoc.run(["--version"], "", "pandoc --version").split("\n")[0]
    pdf_name = proj.pdf_name if with_pdf else None
    all_keys = set().union(*(crossref.cited_keys(b) for b in resolved.values()))
    nav = _nav(chapters)
    if all_keys and cite_args:
        nav.append(html.NavEntry(REFERENCES_PAGE, None, "References", False))

    def write_page(ch: _Chapter) -> None:
        blocks = resolved[ch.file.page]
        args = ["--mathml", "--wrap=none"]
        if crossref.cited_keys(blocks) and cite_args:
            args += cite_args + ["-M", "reference-section-title=References"]
        body = pandoc.write(pandoc.document(blocks, api=api), "html5", ch.file.source, args)
        (out / ch.file.page).write_text(
            html.page(book_title=proj.title, title=ch.title, body=body, nav=nav, current=ch.file.page,
                      pdf=pdf_name, notebook=ch.notebook, generator=version, toc=html.page_toc(blocks),
                      header=header if ch is chapters[0] else ""),
            encoding="utf-8")

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # one pandoc process per page
        list(pool.map(write_page, chapters))
    if all_keys and cite_args:
        # every work cited anywhere in the book, on one page (each chapter also lists its own at its end)
        text = ("---\nnocite: |\n  " + ", ".join(f"@{k}" for k in sorted(all_keys)) + "\n---\n\n"
                "# References {.unnumbered}\n\n::: {#refs}\n:::\n")
        body = pandoc.run(["-f", "markdown", "-t", "html5", "--mathml", "--wrap=none", *cite_args], text,
                          "the references page")
        (out / REFERENCES_PAGE).write_text(
            html.page(book_title=proj.title, title="References", body=body, nav=nav,
                      current=REFERENCES_PAGE, pdf=pdf_name, notebook=None, generator=version), encoding="utf-8")
    _copy_resources(proj, chapters, out)
    written = {ch.file.page for ch in chapters} | ({REFERENCES_PAGE} if all_keys and cite_args else set())
    for stale in out.glob("*.html"):  # pages of chapters no longer in _quarto.yml
        if stale.name not in written:
            stale.unlink()
    # last: the fonts are cut down to the characters of the pages and resources written above
    fonts_css, _ = webfonts.write(out, pdf.font_paths())
    (out / html.CSS_NAME).write_text(html.stylesheet(pandoc.highlighting_css()) + "\n" + fonts_css, encoding="utf-8")
    return out / chapters[0].file.page


def _copy_resources(proj: project.Project, chapters: list[_Chapter], out: Path) -> None:
    """``project: resources:`` (files or folders, relative to the root) copied into the site. The pages are
    flat here (``report/browser.qmd`` -> ``browser.html``), so a resource under the chapters' folder moves
    with them: ``report/browser/`` -> ``browser/``, the same place relative to the page as under Quarto,
    which keeps the folders."""
    entries = (proj.config.get("project") or {}).get("resources") or []
    entries = [entries] if isinstance(entries, str) else entries
    chapter_dirs = {ch.file.path.parent for ch in chapters}
    for entry in entries:
        source = (proj.root / str(entry).rstrip("/")).resolve()
        if not source.exists():
            raise project.ProjectError(f"_quarto.yml lists the resource {entry}, which does not exist: the cell "
                                       f"that writes it did not run (delete .jupyter_cache and build again)")
        home = next((d for d in chapter_dirs if source.is_relative_to(d)), proj.root)
        dest = out / source.relative_to(home)
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copyfile(source, dest)


def _write_book_pdf(proj: project.Project, chapters: list[_Chapter], resolved: dict[str, list[A.Node]],
                    api: list[int]) -> Path:
    blocks = [b for ch in chapters for b in resolved[ch.file.page]]
    meta: dict[str, Any] = {"title": pandoc.meta_string(proj.title)}
    for key in ("subtitle", "date"):
        if proj.book.get(key):
            meta[key] = pandoc.meta_string(str(proj.book[key]))
    authors = proj.book.get("author") or []
    if authors:
        authors = [authors] if isinstance(authors, str) else authors
        meta["author"] = {"t": "MetaList", "c": [pandoc.meta_string(str(a)) for a in authors]}
    bibs = [b for b in proj.bibliography if b.is_file()]
    return pdf.write_pdf(blocks, meta, out_dir=proj.output_dir, name=proj.pdf_name, bibliography=bibs, api=api)
