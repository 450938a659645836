"""Apostrophes, for both outputs.

pandoc's reader (with its ``smart`` extension) turns a ``'`` inside a word into ’, but it reads a ``'`` right
after inline code or a citation (```nn.Linear`'s``) as an opening quote, and the HTML tables it reads from
cell outputs keep their straight quotes. Its typst writer then writes every ’ back as ``'`` for typst's smart
quotes, which print a prime after a digit (``GPT-2's`` -> GPT-2′s) and an opening quote after a full stop
(``et al.'s`` -> al.‘s). :func:`apostrophes` mends the text (both outputs); :func:`typst_apostrophes` hands
each ’ of the text to typst as a literal character."""

from __future__ import annotations

import re

from . import ast as A

APOSTROPHE = "\u2019"
_BREAKS = frozenset({"Space", "SoftBreak", "LineBreak"})
# a quote between a word character (or the full stop of "et al.") and a letter is an apostrophe
_INNER = {False: re.compile(r"(?<=[\w.])\u2018(?=[^\W\d_])"), True: re.compile(r"(?<=[\w.])['\u2018](?=[^\W\d_])")}
# a quote that opens a text glued to the inline before it (code, a citation, a link): `x`'s
_LEADING = {False: re.compile(r"^[\u2018\u2019](?=[^\W\d_])"), True: re.compile(r"^['\u2018\u2019](?=[^\W\d_])")}


def _inline_lists(node: A.Node) -> list[list[A.Node]]:
    """The lists of inlines directly in ``node`` (a paragraph's, an emphasis's, a link's text, ...)."""
    c = node.get("c")
    if not isinstance(c, list):
        return []
    return [v for v in [c, *(x for x in c if isinstance(x, list))]
            if v and all(isinstance(x, dict) and "t" in x for x in v)
            and any(x["t"] in ("Str", "Quoted") for x in v)]


def _glued(inlines: list[A.Node], i: int) -> bool:
    """Whether ``inlines[i]`` follows another inline with no space between."""
    return i > 0 and inlines[i - 1].get("t") not in _BREAKS


def _starts_with_letter(inlines: list[A.Node]) -> bool:
    return bool(inlines) and inlines[0].get("t") == "Str" and re.match(r"[^\W\d_]", inlines[0]["c"]) is not None


def apostrophes(blocks: list[A.Node], *, straight: bool = False) -> list[A.Node]:
    """``blocks`` with the apostrophes of their text as ’ (code, maths and raw output are left alone):

    * a ‘ between a word character or ``.`` and a letter, and with ``straight`` a ``'`` too (``GPT-2's``,
      ``al.'s`` in a table cell read from HTML, or escaped in markdown: the HTML shows a straight quote as it
      is, but typst would guess at it);
    * a quote (with ``straight``, a ``'`` too) that opens a text glued to the inline before it
      (``[Table 4.1](#x)'s``);
    * a single-quoted span that opens glued to the inline before it and with a letter: pandoc paired the
      apostrophe of ```nn.Linear`'s`` with a later quote (``features'``), so it is unwrapped into its text
      between two ’ (a word in it that opens with a quote, as in ``'a'``, gets an opening ‘)."""

    def fix(node: A.Node):
        for inlines in _inline_lists(node):
            out: list[A.Node] = []
            for i, item in enumerate(inlines):
                if (item["t"] == "Quoted" and item["c"][0]["t"] == "SingleQuote" and _glued(inlines, i)
                        and _starts_with_letter(item["c"][1])):
                    inner = [{"t": "Str", "c": APOSTROPHE + item["c"][1][0]["c"]}, *item["c"][1][1:]]
                    for j in range(1, len(inner)):  # a word opening with ’ in it opened a quote: 'quoted'
                        if (inner[j]["t"] == "Str" and not _glued(inner, j)
                                and _LEADING[False].match(inner[j]["c"])):
                            inner[j] = {"t": "Str", "c": "\u2018" + inner[j]["c"][1:]}
                    out += [*inner, {"t": "Str", "c": APOSTROPHE}]
                    continue
                if item["t"] == "Str":
                    text = _INNER[straight].sub(APOSTROPHE, item["c"])
                    if _glued(inlines, i):
                        text = _LEADING[straight].sub(APOSTROPHE, text)
                    item = {"t": "Str", "c": text}
                out.append(item)
            inlines[:] = _merge_text(out)
        return node

    return A.walk(blocks, fix)


def _merge_text(inlines: list[A.Node]) -> list[A.Node]:
    """Adjacent ``Str`` nodes joined (as pandoc writes them)."""
    out: list[A.Node] = []
    for item in inlines:
        if item["t"] == "Str" and out and out[-1]["t"] == "Str":
            out[-1] = {"t": "Str", "c": out[-1]["c"] + item["c"]}
        else:
            out.append(item)
    return out


def typst_apostrophes(blocks: list[A.Node]) -> list[A.Node]:
    """:func:`apostrophes` (straight quotes included), then each ’ of the text as raw typst, so that pandoc's
    typst writer keeps the character instead of writing a ``'`` for typst's smart quotes to guess at."""

    def raw(node: A.Node):
        if node["t"] != "Str" or APOSTROPHE not in node["c"]:
            return None
        out: list[A.Node] = []
        for j, part in enumerate(node["c"].split(APOSTROPHE)):
            if j:
                out.append({"t": "RawInline", "c": ["typst", APOSTROPHE]})
            if part:
                out.append({"t": "Str", "c": part})
        return out

    return A.walk(apostrophes(blocks, straight=True), raw)


# HTML's elements (and the comment): a raw HTML inline with another name is text that lost its brackets
HTML_ELEMENTS = frozenset("""a abbr address area article aside audio b bdi bdo blockquote body br button canvas
caption cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption
figure font footer form h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd label legend li
link main map mark math menu meta meter nav noscript object ol optgroup option output p param picture pre
progress q rp rt ruby s samp script search section select slot small source span strong style sub summary sup
svg table tbody td template textarea tfoot th thead time title tr track u ul var video wbr""".split())


def stray_tags(blocks: list[A.Node]) -> list[str]:
    """The raw HTML inlines of ``blocks`` that are no HTML element, such as ``<gpu>`` in ``tiny-<gpu>``:
    pandoc's markdown reader takes text in angle brackets for a tag, which the PDF drops and a browser
    hides, so the text vanishes from both outputs."""
    found = []
    for node in A.preorder(blocks):
        if node["t"] == "RawInline" and node["c"][0] == "html":
            m = re.match(r"</?([A-Za-z][\w-]*)", node["c"][1])
            if m and m.group(1).lower() not in HTML_ELEMENTS:
                found.append(node["c"][1])
    return found
