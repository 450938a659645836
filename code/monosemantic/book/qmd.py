"""Reading a chapter's ``.qmd``: YAML front matter, markdown, and ```` ```{python} ```` cells.

Pandoc does not know Quarto's executable fences, so cells are split out here, before pandoc sees the
text. A cell's options are its leading ``#| key: value`` lines, read as YAML, exactly as Quarto reads
them; the options a cell ends up with are Quarto's defaults, then the project's ``execute:``, then the
chapter's ``execute:``, then the cell's own lines.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..config import UserError


class QmdError(UserError, ValueError):
    """A chapter that Quarto (or this builder) would not accept; the message names file and line."""


# The cell options this builder honours, with Quarto's default for each. Every other option Quarto
# documents is refused with a message (so a chapter never silently renders differently here).
CELL_DEFAULTS: dict[str, Any] = {
    "label": None,
    "fig-cap": None,
    "fig-alt": None,
    "tbl-cap": None,
    "echo": True,
    "eval": True,
    "output": True,
    "include": True,
    "warning": True,
}
# cell defaults a chapter may also set at the top level of its front matter (Quarto accepts both places)
DOCUMENT_EXECUTE_KEYS = ("echo", "eval", "output", "include", "warning")

_CELL_OPEN = re.compile(r"^```+\s*\{python\}\s*$")
_FENCE = re.compile(r"^(`{3,}|~{3,})")
_OPTION = re.compile(r"^#\|\s?(.*)$")
_INLINE = re.compile(r"`\{python\}\s+([^`]+?)\s*`")


@dataclasses.dataclass
class Cell:
    """One ```` ```{python} ```` cell: its code (option lines removed) and its own options."""

    index: int  # 1-based among the chapter's cells
    line: int  # 1-based line of the opening fence in the .qmd
    code: str
    options: dict[str, Any]
    source: str = ""  # the cell as written, `#|` lines included

    @property
    def name(self) -> str:
        """How messages name the cell: its label, else its index, with its first line of code."""
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        first = first if len(first) <= 60 else first[:57] + "..."
        label = self.options.get("label")
        return f"{label if label else f'cell {self.index}'} (line {self.line}: `{first}`)"


@dataclasses.dataclass
class Qmd:
    """A parsed chapter: its front matter and its body as alternating markdown strings and cells."""

    path: Path
    front_matter: dict[str, Any]
    parts: list[str | Cell]

    @property
    def cells(self) -> list[Cell]:
        return [p for p in self.parts if isinstance(p, Cell)]

    @property
    def inline_expressions(self) -> list[str]:
        """The chapter's inline expressions (`` `{python} expr` ``), in reading order."""
        return [m.group(1) for part in self.parts if isinstance(part, str)
                for text in _outside_fences(part) for m in _INLINE.finditer(text)]


def substitute_inline(markdown: str, values: Iterator[str]) -> str:
    """``markdown`` with each inline expression replaced by the next of ``values`` (markdown text)."""
    it = values
    pieces = []
    for text, fenced in _segments(markdown):
        pieces.append(text if fenced else _INLINE.sub(lambda _: next(it), text))
    return "".join(pieces)


def _segments(markdown: str) -> list[tuple[str, bool]]:
    """``markdown`` cut into (text, inside a fenced block) runs."""
    out: list[tuple[str, bool]] = []
    current: list[str] = []
    marker = None
    for line in markdown.splitlines(keepends=True):
        m = _FENCE.match(line)
        if marker is None and m:
            out.append(("".join(current), False))
            current, marker = [line], m.group(1)
        elif marker is not None:
            current.append(line)
            if _closes(line, marker):
                out.append(("".join(current), True))
                current, marker = [], None
        else:
            current.append(line)
    out.append(("".join(current), marker is not None))
    return out


def _closes(line: str, marker: str) -> bool:
    """Whether ``line`` closes a fenced block opened with ``marker`` (at least as many of its character)."""
    closing = line.rstrip()
    return closing.startswith(marker[0] * len(marker)) and not closing.strip(marker[0])


def _outside_fences(markdown: str) -> list[str]:
    return [text for text, fenced in _segments(markdown) if not fenced]


def split_front_matter(text: str, path: Path) -> tuple[dict[str, Any], str, int]:
    """(front matter, rest of the text, number of lines the front matter took)."""
    if not text.startswith("---"):
        return {}, text, 0
    lines = text.splitlines(keepends=True)
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            try:
                meta = yaml.safe_load("".join(lines[1:i])) or {}
            except yaml.YAMLError as e:
                raise QmdError(f"{path}: front matter is not valid YAML: {_one_line(e)}") from e
            if not isinstance(meta, dict):
                raise QmdError(f"{path}: front matter must be a YAML mapping")
            return meta, "".join(lines[i + 1:]), i + 1
    raise QmdError(f"{path}: front matter opened with --- on line 1 is never closed")


def parse(path: Path, text: str | None = None) -> Qmd:
    text = path.read_text(encoding="utf-8") if text is None else text
    meta, body, offset = split_front_matter(text, path)
    parts: list[str | Cell] = []
    md: list[str] = []
    lines = body.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if _CELL_OPEN.match(line.rstrip()):
            ticks = len(line) - len(line.lstrip("`"))
            start = i
            i += 1
            code: list[str] = []
            while i < len(lines) and not re.match(rf"^`{{{ticks},}}\s*$", lines[i].rstrip()):
                code.append(lines[i])
                i += 1
            if i == len(lines):
                raise QmdError(f"{path}:{start + offset + 1}: the python cell opened here is never closed")
            if md:
                parts.append("".join(md))
                md = []
            n = sum(isinstance(p, Cell) for p in parts) + 1
            parts.append(_make_cell(path, n, start + offset + 1, code))
            i += 1
            continue
        fence_match = _FENCE.match(line)
        if fence_match:  # an ordinary fenced block: copy it whole, so a ```{python} inside stays text
            marker = fence_match.group(1)
            md.append(line)
            i += 1
            while i < len(lines):
                md.append(lines[i])
                i += 1
                if _closes(md[-1], marker):
                    break
            continue
        md.append(line)
        i += 1
    if md:
        parts.append("".join(md))
    return Qmd(path=path, front_matter=meta, parts=parts)


def _make_cell(path: Path, index: int, line: int, lines: list[str]) -> Cell:
    source = "".join(lines).rstrip("\n")
    option_lines = []
    while lines and (m := _OPTION.match(lines[0].rstrip("\n"))):
        option_lines.append(m.group(1))
        lines = lines[1:]
    options: dict[str, Any] = {}
    if option_lines:
        try:
            options = yaml.safe_load("\n".join(option_lines)) or {}
        except yaml.YAMLError as e:
            raise QmdError(f"{path}:{line}: the #| options of cell {index} are not valid YAML: "
                           f"{_one_line(e)}") from e
        if not isinstance(options, dict):
            raise QmdError(f"{path}:{line}: the #| lines of cell {index} must be `key: value` pairs")
    return Cell(index=index, line=line, code="".join(lines).rstrip("\n"), options=options, source=source)


def check_cell_options(path: Path, cell: Cell, documented: set[str]) -> None:
    """Refuse an option Quarto does not document, or one Quarto knows that this builder would ignore."""
    for key in cell.options:
        if key in CELL_DEFAULTS:
            continue
        if key in documented:
            raise QmdError(f"{path}:{cell.line}: cell {cell.index} uses `#| {key}`, which Quarto knows but the "
                           f"preview builder does not honour (it supports {', '.join(CELL_DEFAULTS)}); "
                           "drop it or add support in monosemantic.book")
        raise QmdError(f"{path}:{cell.line}: cell {cell.index} uses `#| {key}`, which is not a Quarto cell "
                       "option (see quarto.org/docs/reference/cells/cells-jupyter.html)")


def effective_options(cell: Cell, *defaults: dict[str, Any]) -> dict[str, Any]:
    """Quarto's defaults, overridden by each ``execute:`` mapping in turn, then by the cell's own options."""
    out = dict(CELL_DEFAULTS)
    for d in defaults:
        out.update({k: v for k, v in (d or {}).items() if k in CELL_DEFAULTS})
    out.update(cell.options)
    if out["include"] is False:
        out["echo"] = out["output"] = False
    return out


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
