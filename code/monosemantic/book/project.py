"""The book as ``_quarto.yml`` describes it: title, chapter files in order, bibliography, execute defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from ..config import UserError


class ProjectError(UserError, ValueError):
    """``_quarto.yml`` is missing or does not describe a book this builder can build."""


@dataclasses.dataclass(frozen=True)
class ChapterFile:
    """One file of the book, in reading order."""

    path: Path  # absolute
    source: str  # as written in _quarto.yml, e.g. report/01-activations.qmd
    appendix: bool

    @property
    def stem(self) -> str:
        return self.path.stem

    @property
    def page(self) -> str:
        """The chapter's HTML page in the site (flat: index.html, 01-activations.html, ...)."""
        return f"{self.stem}.html"


@dataclasses.dataclass(frozen=True)
class Project:
    root: Path
    config: dict[str, Any]
    chapters: tuple[ChapterFile, ...]

    @property
    def book(self) -> dict[str, Any]:
        return self.config.get("book") or {}

    @property
    def title(self) -> str:
        return str(self.book.get("title") or self.config.get("title") or "Book")

    @property
    def output_dir(self) -> Path:
        return self.root / ((self.config.get("project") or {}).get("output-dir") or "_book")

    @property
    def pdf_name(self) -> str:
        """``book: output-file`` if set, else the title made into a file name (as Quarto does)."""
        name = self.book.get("output-file") or re.sub(r"[^A-Za-z0-9]+", "-", self.title).strip("-")
        return f"{name}.pdf"

    @property
    def bibliography(self) -> list[Path]:
        bib = self.config.get("bibliography") or []
        return [self.root / b for b in ([bib] if isinstance(bib, str) else bib)]

    @property
    def execute(self) -> dict[str, Any]:
        return self.config.get("execute") or {}

    def format_options(self, fmt: str) -> dict[str, Any]:
        value = (self.config.get("format") or {}).get(fmt)
        return value if isinstance(value, dict) else {}


def _chapter_sources(items: list[Any], where: str) -> list[str]:
    out = []
    for item in items or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and "part" in item:  # a part: its own file (if any) and its chapters
            if str(item["part"]).endswith(".qmd"):
                out.append(item["part"])
            out.extend(_chapter_sources(item.get("chapters") or [], where))
        elif isinstance(item, dict) and "href" in item:
            out.append(item["href"])
        else:
            raise ProjectError(f"_quarto.yml: book {where} entry {item!r} is neither a file nor a part")
    return out


def load(root: Path) -> Project:
    path = root / "_quarto.yml"
    if not path.is_file():
        raise ProjectError(f"no _quarto.yml in {root}: run from the repository root (or set MONOSEMANTIC_ROOT)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ProjectError(f"_quarto.yml is not valid YAML: {' '.join(str(e).split())}") from e
    if (config.get("project") or {}).get("type") != "book":
        raise ProjectError("_quarto.yml: project: type must be book")
    book = config.get("book") or {}
    files = [(s, False) for s in _chapter_sources(book.get("chapters"), "chapters")]
    files += [(s, True) for s in _chapter_sources(book.get("appendices"), "appendices")]
    if not files:
        raise ProjectError("_quarto.yml: book: chapters lists no files")
    chapters = []
    for source, appendix in files:
        p = root / source
        if not p.is_file():
            raise ProjectError(f"_quarto.yml lists {source}, which does not exist")
        chapters.append(ChapterFile(path=p, source=source, appendix=appendix))
    stems = [c.stem for c in chapters]
    if len(set(stems)) != len(stems):
        raise ProjectError("_quarto.yml: two chapter files share a name; the site needs unique names")
    return Project(root=root, config=config, chapters=tuple(chapters))
