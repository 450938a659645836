"""Cross-references numbered the way Quarto numbers a book, resolved on pandoc's JSON AST.

Quarto's rules, as this module applies them:

- Chapters are numbered 1, 2, ... in the order ``_quarto.yml`` lists them, except a chapter whose
  title is ``{.unnumbered}`` (the index, usually); appendices are lettered A, B, ...
- Sections are numbered within their chapter (3.1, 3.1.2, A.1); headings marked ``{.unnumbered}`` and
  the sections of an unnumbered chapter are not.
- Figures (``#fig-``), tables (``#tbl-``) and equations (``#eq-``) are numbered per chapter: the second
  figure of chapter 3 is Figure 3.2; in an unnumbered chapter they are numbered 1, 2, ...
- ``@fig-x`` reads "Figure 3.2", ``@tbl-x`` "Table 3.1", ``@eq-x`` "Equation 3.1", ``@sec-x``
  "Section 3.2", or "Chapter 3" / "Appendix A" for a chapter's own heading; ``[-@fig-x]`` is the number
  alone.

This must run before ``--citeproc``: pandoc reads ``@fig-x`` as a citation.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Any, Literal

from ..config import UserError
from . import ast as A
from .ast import Node

KINDS = ("fig", "tbl", "sec", "eq")
PREFIX = {"fig": "Figure", "tbl": "Table", "eq": "Equation", "sec": "Section"}
_EQ_LABEL = re.compile(r"^\{#(eq-[A-Za-z0-9_:.-]+)\}$")

Target = Literal["html", "typst"]


class CrossrefError(UserError, ValueError):
    """A reference to a label that does not exist, or a label defined twice."""


@dataclasses.dataclass(frozen=True)
class Label:
    id: str
    kind: str  # fig, tbl, sec, eq
    number: str  # "3.2", "A", "1"
    page: str  # the HTML page that holds it
    prefix: str  # "Figure", "Chapter", "Appendix", "Section", ...


def kind_of(identifier: str) -> str | None:
    """``fig`` for ``fig-x`` (and for ``Fig-x``, Quarto's capitalised form), None for a citation key."""
    head = identifier.split("-", 1)[0].lower()
    return head if head in KINDS and "-" in identifier else None


def label_id(identifier: str) -> str:
    """The label a reference points at: ``@Fig-x`` points at ``fig-x``."""
    head, _, rest = identifier.partition("-")
    return f"{head.lower()}-{rest}"


# --- normalising what markdown and cell outputs give us -------------------------------------------------

def normalise(blocks: list[Node]) -> list[Node]:
    """Put every numbered thing into one shape: a Figure for each cell figure div, a Table carrying its
    id and caption (from a ``::: {#tbl-x}`` cell div), and an ``eq-`` Div around each labelled display
    equation."""

    def table_divs(node: Node):
        if node["t"] != "Div":
            return None
        (id_, classes, kv), content = node["c"]
        if not id_.startswith("tbl-"):
            return None
        caption: list[Node] = []
        rest = []
        for b in content:
            if b["t"] == "Div" and "table-caption" in b["c"][0][1]:
                caption = b["c"][1]
            else:
                rest.append(b)
        if not caption and "cell" not in classes and len(rest) > 1 and rest[-1]["t"] == "Para":
            caption = [rest.pop()]  # Quarto's div syntax: the last paragraph is the caption
        table = next((n for n in A.preorder(rest) if n["t"] == "Table"), None)
        if table is None:
            return None  # a tbl- div holding no table (Quarto would complain); left as it is
        table["c"][0][0] = id_
        if caption:
            table["c"][1] = [None, caption]
        node["c"][0][0] = ""
        node["c"][1] = rest
        return node

    def figure_divs(node: Node):
        if node["t"] != "Div":
            return None
        if "cell-figure" not in node["c"][0][1]:
            return markdown_figure_div(node)
        id_ = node["c"][0][0]
        caption: list[Node] = []
        alt: list[Node] = []
        image: Node | None = None
        for b in node["c"][1]:
            classes = b["c"][0][1] if b["t"] == "Div" else []
            if "figure-caption" in classes:
                caption = b["c"][1]
            elif "figure-alt" in classes:
                alt = A.text(A.stringify(b["c"][1]).strip())
            elif b["t"] in ("Para", "Plain") and len(b["c"]) == 1 and b["c"][0]["t"] == "Image":
                image = b["c"][0]
        if image is None:
            return None
        image["c"][1] = alt
        return {"t": "Figure", "c": [A.attr(id_), [None, caption], [{"t": "Plain", "c": [image]}]]}

    def markdown_figure_div(node: Node):
        """Quarto's ``::: {#fig-x}`` figure: its content, and its last paragraph as the caption."""
        (id_, classes, kv), content = node["c"]
        if not id_.startswith("fig-") or len(content) < 2 or content[-1]["t"] != "Para":
            return None
        return {"t": "Figure", "c": [A.attr(id_, classes), [None, [content[-1]]], content[:-1]]}

    def equations(node: Node):
        if node["t"] != "Para":
            return None
        inlines = node["c"]
        out: list[Node] = []
        current: list[Node] = []
        changed = False
        i = 0
        while i < len(inlines):
            n = inlines[i]
            if n["t"] == "Math" and n["c"][0]["t"] == "DisplayMath":
                j = i + 1
                while j < len(inlines) and inlines[j]["t"] in ("Space", "SoftBreak"):
                    j += 1
                if j < len(inlines) and inlines[j]["t"] == "Str" and (m := _EQ_LABEL.match(inlines[j]["c"])):
                    if _strip(current):
                        out.append(A.para(_strip(current)))
                    current = []
                    out.append(A.div([A.para([n])], m.group(1), ["quarto-equation"]))
                    changed = True
                    i = j + 1
                    continue
            current.append(n)
            i += 1
        if not changed:
            return None
        if _strip(current):
            out.append(A.para(_strip(current)))
        return out

    return A.walk(A.walk(A.walk(blocks, figure_divs), table_divs), equations)


def _strip(inlines: list[Node]) -> list[Node]:
    while inlines and inlines[0]["t"] in ("Space", "SoftBreak"):
        inlines = inlines[1:]
    while inlines and inlines[-1]["t"] in ("Space", "SoftBreak"):
        inlines = inlines[:-1]
    return inlines


# --- numbering -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Numbering:
    """Numbers chapters in book order; :meth:`number_chapter` is called once per chapter, in order."""

    chapters: int = 0
    appendices: int = 0
    labels: dict[str, Label] = dataclasses.field(default_factory=dict)
    chapter_titles: dict[str, tuple[str | None, str]] = dataclasses.field(default_factory=dict)

    def _add(self, label: Label, where: str) -> None:
        if label.id in self.labels:
            raise CrossrefError(f"{where}: label {label.id!r} is defined twice "
                                f"(also on {self.labels[label.id].page})")
        self.labels[label.id] = label

    def number_chapter(self, blocks: list[Node], page: str, appendix: bool, where: str) -> tuple[str | None, str]:
        """Number the chapter's headings, figures, tables and equations in place; returns the chapter's
        (number, title) for the navigation."""
        first = next((b for b in blocks if b["t"] == "Header" and b["c"][0] == 1), None)
        if first is None:
            raise CrossrefError(f"{where}: the chapter has no title: start it with `# Title` or set `title:` "
                                "in its front matter")
        unnumbered = _is_unnumbered(first)
        if unnumbered:
            chapter = None
        elif appendix:
            self.appendices += 1
            chapter = string.ascii_uppercase[self.appendices - 1]
        else:
            self.chapters += 1
            chapter = str(self.chapters)
        title = A.stringify(first["c"][2])
        counters = {"fig": 0, "tbl": 0, "eq": 0}
        sections = [0] * 7

        def num(kind: str) -> str:
            counters[kind] += 1
            return f"{chapter}.{counters[kind]}" if chapter else str(counters[kind])

        def visit(node: Node):
            t = node["t"]
            if t == "Header":
                level, (id_, classes, kv), inlines = node["c"]
                if node is first:
                    number = chapter
                    prefix = "Appendix" if appendix else "Chapter"
                elif level == 1:
                    raise CrossrefError(f"{where}: a chapter has one level-1 heading; "
                                        f"`# {A.stringify(inlines)}` is a second one (use ##)")
                elif chapter and not _is_unnumbered(node):
                    sections[level] += 1
                    for deeper in range(level + 1, len(sections)):
                        sections[deeper] = 0
                    number = ".".join([chapter] + [str(sections[lv]) for lv in range(2, level + 1)])
                    prefix = "Section"
                else:
                    number, prefix = None, "Section"
                if number:
                    node["c"][2] = [A.span(A.text(number), classes=["header-section-number"]), {"t": "Space"},
                                    *inlines]
                if id_.startswith("sec-"):
                    if number is None:
                        raise CrossrefError(f"{where}: {id_} is on an unnumbered heading, so @{id_} has no number")
                    self._add(Label(id_, "sec", number, page, prefix), where)
            elif t == "Figure" and node["c"][0][0].startswith("fig-"):
                id_ = node["c"][0][0]
                number = num("fig")
                _prefix_caption(node["c"][1], f"Figure {number}: ")
                self._add(Label(id_, "fig", number, page, "Figure"), where)
            elif t == "Table" and node["c"][0][0].startswith("tbl-"):
                id_ = node["c"][0][0]
                number = num("tbl")
                _prefix_caption(node["c"][1], f"Table {number}: ")
                self._add(Label(id_, "tbl", number, page, "Table"), where)
            elif t == "Div" and node["c"][0][0].startswith("eq-") and "quarto-equation" in node["c"][0][1]:
                number = num("eq")
                node["c"][0][2] = [["number", number]]
                self._add(Label(node["c"][0][0], "eq", number, page, "Equation"), where)
            return None

        # pre-order, so numbers follow reading order (walk() is post-order: collect the nodes first)
        for node in A.preorder(blocks):
            visit(node)
        self.chapter_titles[page] = (chapter, title)
        return chapter, title


def _is_unnumbered(header: Node) -> bool:
    return "unnumbered" in header["c"][1][1]


def _prefix_caption(caption: list[Any], prefix: str) -> None:
    blocks = caption[1]
    if not blocks:
        caption[1] = [{"t": "Plain", "c": A.text(prefix.rstrip(": "))}]
        return
    first = blocks[0]
    if first["t"] in ("Plain", "Para"):
        first["c"] = A.text(prefix.rstrip()) + [{"t": "Space"}] + first["c"]
    else:
        blocks.insert(0, {"t": "Plain", "c": A.text(prefix.rstrip())})


# --- resolving references ----------------------------------------------------------------------------------

# Quarto's format names that match each target in ``when-format`` / ``unless-format`` (its ``isFormat``: "html"
# is any HTML output; typst only by its own name, since Quarto's "pdf" means LaTeX).
FORMAT_NAMES: dict[str, frozenset[str]] = {"html": frozenset({"html", "html4", "html5", "html:js"}),
                                           "typst": frozenset({"typst"})}


def conditional_content(blocks: list[Node], target: Target) -> list[Node]:
    """Quarto's conditional content for ``target``: a div or span of class ``content-visible`` is kept (without
    its wrapper) when its ``when-format`` matches and its ``unless-format`` does not, one of class
    ``content-hidden`` the other way round; the rest is dropped."""
    names = FORMAT_NAMES[target]

    def select(node: Node):
        if node["t"] not in ("Div", "Span"):
            return None
        _, classes, kv = node["c"][0]
        if "content-visible" not in classes and "content-hidden" not in classes:
            return None
        options = dict(kv)
        matches = (("when-format" not in options or options["when-format"] in names)
                   and ("unless-format" not in options or options["unless-format"] not in names))
        keep = matches if "content-visible" in classes else not matches
        return node["c"][1] if keep else []

    return A.walk(blocks, select)


def resolve(blocks: list[Node], labels: dict[str, Label], *, page: str, target: Target, where: str,
            problems: list[str]) -> list[Node]:
    """Keep the content meant for ``target`` (:func:`conditional_content`), replace ``@fig-x`` style
    citations by links, and lay out numbered equations for ``target``. Unknown labels are appended to
    ``problems`` (the caller raises once, listing all of them)."""

    def cites(node: Node):
        if node["t"] != "Cite":
            return None
        citations, _ = node["c"]
        if not any(kind_of(c["citationId"]) for c in citations):
            return None
        out: list[Node] = []
        rest: list[dict[str, Any]] = []
        for c in citations:
            ident = c["citationId"]
            if not kind_of(ident):
                rest.append(c)
                continue
            label = labels.get(label_id(ident))
            if label is None:
                problems.append(f"{where}: @{ident} refers to no label in the book")
                inlines = A.text(f"?@{ident}")
            else:
                words = label.number if c["citationMode"]["t"] == "SuppressAuthor" else \
                    f"{label.prefix}\u00a0{label.number}"
                href = f"#{label.id}" if target == "typst" or label.page == page else f"{label.page}#{label.id}"
                inlines = [A.link([{"t": "Str", "c": words}], href, ["quarto-xref"])]
            if out:
                out.append({"t": "Str", "c": ","})
                out.append({"t": "Space"})
            out.extend(c["citationPrefix"] + ([{"t": "Space"}] if c["citationPrefix"] else []))
            out.extend(inlines)
            out.extend(c["citationSuffix"])
        if rest:
            if out:
                out.append({"t": "Space"})
            out.append({"t": "Cite", "c": [rest, A.text(" ".join("@" + c["citationId"] for c in rest))]})
        return out

    def equations(node: Node):
        if node["t"] != "Div" or "quarto-equation" not in node["c"][0][1]:
            return None
        id_, classes, kv = node["c"][0]
        number = dict(kv).get("number", "?")
        math = node["c"][1]
        if target == "html":
            para = math[0]
            para["c"] = para["c"] + [A.span(A.text(f"({number})"), classes=["eq-number"])]
            return A.div([para], id_, classes)
        setup = f'#set math.equation(numbering: _ => "({number})", number-align: end + horizon)'
        return A.div([A.raw_block("typst", setup), *math], id_, classes)

    def qmd_links(node: Node):  # [text](01-x.qmd#sec) -> the chapter's page, as Quarto rewrites it
        if node["t"] != "Link":
            return None
        url, title = node["c"][2]
        path, _, fragment = url.partition("#")
        if "://" in path or not path.endswith(".qmd"):
            return None
        if target == "typst":  # one PDF: the link text stays, the link to a page goes
            return node["c"][1]
        href = path.rsplit("/", 1)[-1][:-len(".qmd")] + ".html" + (f"#{fragment}" if fragment else "")
        return {"t": "Link", "c": [node["c"][0], node["c"][1], [href, title]]}

    return A.walk(A.walk(A.walk(conditional_content(blocks, target), cites), equations), qmd_links)


def referenced_labels(blocks: list[Node]) -> set[str]:
    """Every ``@fig-/@tbl-/@sec-/@eq-`` label referred to in ``blocks``."""
    return {label_id(c["citationId"]) for n in A.preorder(blocks) if n["t"] == "Cite" for c in n["c"][0]
            if kind_of(c["citationId"])}


def cited_keys(blocks: list[Node]) -> set[str]:
    """Every bibliography key cited in ``blocks`` (citations that are not cross-references)."""
    return {c["citationId"] for n in A.preorder(blocks) if n["t"] == "Cite" for c in n["c"][0]
            if not kind_of(c["citationId"])}
