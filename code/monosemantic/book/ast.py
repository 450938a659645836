"""Small helpers for pandoc's JSON AST (``pandoc -t json``): building and walking nodes.

A node is a dict ``{"t": type, "c": content}``; an attribute is ``[id, [classes], [[key, value]]]``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Node = dict[str, Any]


def attr(id_: str = "", classes: list[str] | None = None, kv: dict[str, str] | None = None) -> list[Any]:
    return [id_, list(classes or []), [[k, v] for k, v in (kv or {}).items()]]


def text(s: str) -> list[Node]:
    """Inlines for a plain string (words and spaces)."""
    out: list[Node] = []
    for i, word in enumerate(s.split(" ")):
        if i:
            out.append({"t": "Space"})
        if word:
            out.append({"t": "Str", "c": word})
    return out


def span(inlines: list[Node], id_: str = "", classes: list[str] | None = None) -> Node:
    return {"t": "Span", "c": [attr(id_, classes), inlines]}


def link(inlines: list[Node], target: str, classes: list[str] | None = None) -> Node:
    return {"t": "Link", "c": [attr("", classes), inlines, [target, ""]]}


def para(inlines: list[Node]) -> Node:
    return {"t": "Para", "c": inlines}


def div(blocks: list[Node], id_: str = "", classes: list[str] | None = None) -> Node:
    return {"t": "Div", "c": [attr(id_, classes), blocks]}


def raw_block(fmt: str, content: str) -> Node:
    return {"t": "RawBlock", "c": [fmt, content]}


def stringify(node: Any) -> str:
    """The plain text of a node or a list of nodes."""
    if isinstance(node, list):
        return "".join(stringify(n) for n in node)
    if not isinstance(node, dict):
        return ""
    t, c = node.get("t"), node.get("c")
    if t == "Str":
        return c
    if t in ("Space", "SoftBreak", "LineBreak"):
        return " "
    if t in ("Code", "Math"):
        return c[1]
    if t in ("Link", "Image"):
        return stringify(c[1])
    if t in ("Span", "Div", "Quoted", "Cite"):
        return stringify(c[-1])
    if t in ("Emph", "Strong", "Underline", "Strikeout", "SmallCaps", "Superscript", "Subscript",
             "Para", "Plain"):
        return stringify(c)
    return stringify(c) if isinstance(c, list) else ""


def walk(node: Any, fn: Callable[[Node], Any]) -> Any:
    """Rebuild ``node`` bottom-up; ``fn(n)`` may return a node, a list of nodes (spliced into the parent
    list) or None (keep ``n``)."""
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            new = walk(item, fn)
            if isinstance(item, dict) and "t" in item and isinstance(new, list):
                out.extend(new)
            else:
                out.append(new)
        return out
    if isinstance(node, dict):
        kind = node.get("t")
        if kind in _LEAVES:  # no node inside: copy it without visiting its content (the walk's hot path)
            node = {k: (v if isinstance(v, str) else copy.deepcopy(v)) for k, v in node.items()}
        else:
            node = {k: walk(v, fn) for k, v in node.items()}
        if kind is not None:
            result = fn(node)
            return node if result is None else result
        return node
    return node


# node types whose content holds no other node (text, attributes, a format name): most of a document
_LEAVES = frozenset({"Str", "Space", "SoftBreak", "LineBreak", "Code", "Math", "RawInline", "RawBlock",
                     "CodeBlock", "HorizontalRule"})


def preorder(node: Any) -> list[Node]:
    """Every node under ``node`` (a node or a list), in reading order (parents before children)."""
    out: list[Node] = []

    def rec(n: Any) -> None:
        if isinstance(n, list):
            for x in n:
                rec(x)
        elif isinstance(n, dict):
            if "t" in n:
                out.append(n)
            for v in n.values():
                rec(v)

    rec(node)
    return out
