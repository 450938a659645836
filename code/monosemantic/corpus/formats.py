"""Cleaning text and reading each file format into documents (roff, HTML, gettext catalogues, and the
source-specific layouts)."""

from __future__ import annotations

import gzip
import html
import html.parser
import io
import json
import re

from .sources import CorpusError, Source

# --- cleaning ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_JUNK_LINE = re.compile(r"^\s*(?:[A-Za-z0-9+/]{60,}={0,2}|(?:0x[0-9A-Fa-f]{2,},?\s*){8,}|[0-9A-Fa-f\s,]{100,})\s*$",
                        re.M)
_REG_DEFINE = re.compile(r"^#define\s+\w+\s+\(?(?:0x[0-9A-Fa-f]+|\d+)[uUlL]*\)?\s*$", re.M)
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING = re.compile(r"[ \t]+\n")


def decode(data: bytes, encodings: tuple[str, ...] = ("utf-8",)) -> tuple[str | None, str]:
    """Bytes to text: (text, "") or (None, reason). Binary (NUL bytes) is dropped; text that is not
    valid in any of ``encodings`` is decoded as UTF-8 with replacement and kept only if at most 0.1% of
    its characters were replaced (those are then removed)."""
    if data.startswith((b"\xef\xbb\xbf",)):
        data = data[3:]
    if b"\x00" in data[:65536]:
        return None, "binary"
    for enc in encodings:
        try:
            return data.decode(enc), ""
        except (UnicodeDecodeError, LookupError):
            continue
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > 0.001 * len(text):
        return None, "not-utf8"
    return text.replace("\ufffd", ""), ""


def _comment_block_end(lines: list[str], i: int) -> int | None:
    """End (exclusive) of the comment block starting at line ``i``, or None if no comment starts there."""
    first = lines[i].lstrip()
    if first.startswith("/*"):
        for j in range(i, min(len(lines), i + 400)):
            if "*/" in lines[j]:
                return j + 1
        return None
    prefix = next((p for p in ("//", "#", "--", ";", "%") if first.startswith(p)), None)
    directives = ("#include", "#define", "#if", "#!", "#pragma", "#import")
    if not prefix or first.startswith(directives):
        return None
    j = i
    while j < len(lines) and lines[j].lstrip().startswith(prefix) and not lines[j].lstrip().startswith(directives):
        j += 1
    return j


_LICENCE_WORDS = re.compile(r"licen[cs]e|copyright|warranty|spdx-license|redistribut|permission is hereby")


def strip_licence_header(text: str) -> str:
    """Cut the leading comment blocks that are licence or copyright notices (the boilerplate every source
    file of a project repeats), keeping a shebang line and other leading comments (e.g. test directives)."""
    lines = text.split("\n")
    keep = lines[:1] if lines and lines[0].startswith("#!") else []
    i, changed = len(keep), False
    for _ in range(4):  # e.g. an SPDX line, then a copyright block, then the licence itself
        while i < len(lines) and not lines[i].strip():
            keep.append(lines[i])
            i += 1
        if i >= len(lines):
            break
        end = _comment_block_end(lines, i)
        if end is None:
            break
        if _LICENCE_WORDS.search("\n".join(lines[i:end]).lower()):
            changed = True
        else:
            keep.extend(lines[i:end])
        i = end
    if not changed:
        return text
    return "\n".join(keep + lines[i:]).lstrip("\n")


def clean(text: str, kind: str, min_chars: int) -> tuple[str | None, str]:
    """Normalise one document; (text, "") or (None, why it was dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    n_control = len(_CONTROL.findall(text))
    if n_control > 0.01 * max(len(text), 1):
        return None, "binary"
    if n_control:
        text = _CONTROL.sub("", text)
    if kind == "code":
        text = strip_licence_header(text)
        n_lines = text.count("\n") + 1
        if len(_REG_DEFINE.findall(text)) > 0.5 * n_lines and n_lines > 50:
            return None, "register-table"
    junk = sum(len(m.group(0)) for m in _JUNK_LINE.finditer(text))
    if junk > 0.2 * len(text):
        return None, "base64-or-hex"
    lines = text.split("\n")
    if kind == "code" and (max(len(line) for line in lines) > 5_000 or len(text) / len(lines) > 200):
        return None, "long-lines"
    text = _TRAILING.sub("\n", text)
    text = _BLANKS.sub("\n\n", text).strip("\n")
    if len(text.strip()) < min_chars:
        return None, "too-short"
    return text, ""


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long document at paragraph (else line) boundaries into pieces of at most ~max_chars."""
    if len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = start + max_chars
        if end >= len(text):
            out.append(text[start:])
            break
        cut = text.rfind("\n\n", start + max_chars // 2, end)
        if cut < 0:
            cut = text.rfind("\n", start + max_chars // 2, end)
        if cut < 0:
            cut = end
        out.append(text[start:cut])
        start = cut
    return [p.strip("\n") for p in out if p.strip()]


# --- formats: a file's bytes -> (suffix, text) documents ------------------------------------------------

_ROFF_ESCAPES = [(r"\\f[BIRPCW1-4]|\\f\(..|\\f\[[^\]]*\]", ""), (r"\\-", "-"), (r"\\\(em|\\\[em\]", "\u2014"),
                 (r"\\\(en|\\\[en\]", "\u2013"), (r"\\\(bu|\\\[bu\]", "\u2022"), (r"\\\(co", "\u00a9"),
                 (r"\\\(aq|\\\[aq\]", "'"), (r"\\\(dq|\\\[dq\]", '"'), (r"\\\(lq|\\\(rq", '"'),
                 (r"\\\(oq|\\\(cq", "'"), (r"\\&|\\:|\\/|\\,|\\%|\\\^|\\\|", ""), (r"\\ ", " "), (r"\\e", r"\\"),
                 (r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.", ""), (r"\\s[+-]?\d+", ""), (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""),
                 (r"\\[cdu]", "")]
_ROFF_RE = [(re.compile(a), b) for a, b in _ROFF_ESCAPES]


def strip_roff(text: str) -> str:
    """man page source (roff) to plain text: requests become line breaks or headings, font escapes go."""
    out = []
    for line in text.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')) or line.startswith("\\\""):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\w+)\s*(.*)$", line)
            if not m:
                continue
            req, arg = m.group(1), m.group(2)
            if req in ("SH", "SS"):
                out.append("\n" + arg.strip('"'))
            elif req in ("B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI", "TP", "IP", "TQ", "Nm",
                         "Nd", "Ar", "Fl", "Op", "Pa", "Em", "Sy", "Xr", "Dq", "Ql", "Va", "Ev", "It"):
                if req in ("BI", "BR", "IB", "IR", "RB", "RI"):
                    arg = "".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', arg))
                else:
                    arg = arg.strip('"') if req not in ("IP", "TP") else re.sub(r'^"([^"]*)".*', r"\1", arg)
                if arg:
                    out.append(arg)
            elif req in ("PP", "LP", "P", "sp", "br", "Pp"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for rx, rep in _ROFF_RE:
        text = rx.sub(rep, text)
    return text


class _HTMLText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head", "nav", "noscript", "svg", "math", "button", "select"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "section",
              "blockquote", "dd", "dt", "article", "ul", "ol", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "pre", "table", "section") else "\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    p = _HTMLText()
    p.feed(text)
    p.close()
    out = "".join(p.parts)
    out = re.sub(r"[ \t\u00a0]+", " ", out)
    out = re.sub(r" *\n *", "\n", out)
    return out


def _po_unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    return s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")


def po_translations(text: str) -> str:
    """The translated strings (msgstr) of a gettext .po file, one paragraph each; the English msgids
    are dropped (they repeat across languages) and so is the header."""
    out, cur, in_str = [], [], False
    for line in text.split("\n"):
        if line.startswith("msgstr"):
            in_str, cur = True, [_po_unquote(line.split(" ", 1)[1] if " " in line else '""')]
        elif in_str and line.startswith('"'):
            cur.append(_po_unquote(line))
        else:
            if in_str:
                s = "".join(cur).strip()
                if s and "Content-Type:" not in s and "Project-Id-Version" not in s:
                    out.append(s)
            in_str = False
    if in_str:
        s = "".join(cur).strip()
        if s:
            out.append(s)
    return "\n\n".join(re.sub(r"%[-+ #0-9.]*[hlLqjzt]*[diouxXeEfgGcsp%]|%<\w+>", "", s) for s in out)


def mo_translations(data: bytes) -> str:
    """The translated strings of a compiled gettext catalogue (.mo), in catalogue order, one per line
    (plural forms each on their own line); the header entry is skipped."""
    import gettext

    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog  # {msgid or (msgid, n): msgstr}
    out = []
    for key, value in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if msgid and value and value.strip():
            value = re.sub(r"_(?=\w)|~", "", value)  # keyboard mnemonics: "_Open", "~Open"
            out.append(re.sub(r"%[-+ #0-9.]*[hlL]*[diouxXeEfgGcs%]|\$\(ARG\d\)|%\w+%?", "", value).strip())
    return "\n".join(dict.fromkeys(x for x in out if x))


def _brown(text: str) -> str:
    """Brown corpus lines ``The/at jury/nn`` to plain sentences."""
    out = []
    for line in text.split("\n"):
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if not words:
            out.append("")
            continue
        s = " ".join(words)
        s = re.sub(r" ([,.;:?!)'])", r"\1", s).replace("( ", "(").replace("`` ", '"').replace(" ''", '"')
        s = s.replace("``", '"').replace("''", '"')
        out.append(s)
    return re.sub(r"\n{2,}", "\n\n", "\n".join(out).replace("\n\n", "\x00").replace("\n", " ")
                  .replace("\x00", "\n\n")).strip()


def _poetry(text: str) -> list[str]:
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    docs = []
    for it in items:
        if not isinstance(it, dict):
            continue
        body = it.get("paragraphs") or it.get("content") or it.get("para") or []
        if isinstance(body, str):
            body = [body]
        if not isinstance(body, list) or not body:
            continue
        head = "\n".join(str(x) for x in (it.get("title") or it.get("rhythmic") or it.get("chapter"),
                                           it.get("author")) if x)
        lines = [str(x) for x in body if isinstance(x, str)]
        docs.append((head + "\n" if head else "") + "\n".join(lines))
    return ["\n\n".join(docs)] if docs else []


def _quran(text: str) -> list[str]:
    return [f"{ch['name']}\n\n" + "\n".join(v["text"] for v in ch["verses"]) for ch in json.loads(text)]


def _dictd(data: bytes) -> str:
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return text  # bytes; decoded by the caller


def _licence(text: str) -> str:
    if text.startswith("---\n"):  # ScanCode puts YAML metadata first in newer versions
        end = text.find("\n---\n", 4)
        if end > 0:
            text = text[end + 5:]
    return text


def _fortune(text: str, size: int = 6000) -> list[str]:
    items = [t.strip("\n") for t in re.split(r"\n%\n", text) if t.strip()]
    out, cur, n = [], [], 0
    for it in items:
        cur.append(it)
        n += len(it)
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def file_documents(src: Source, path: str, data: bytes) -> tuple[list[tuple[str, str]], str]:
    """A file's documents as [(id suffix, raw text)], or ([], reason) when the file is unusable."""
    if src.fmt == "mo":
        try:
            return [("", mo_translations(data))], ""
        except (OSError, UnicodeDecodeError):
            return [], "unparsable"
    if path.endswith(".gz") or path.endswith(".dz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return [], "bad-gzip"
    text, why = decode(data, src.encodings)
    if text is None:
        return [], why
    fmt = src.fmt
    try:
        if fmt in ("text", "code"):
            return [("", text)], ""
        if fmt == "dictd":
            # one document per ~8k characters of consecutive entries (a "page" of the dictionary)
            text = text.replace("{", "").replace("}", "")
            return [(f"#{i}", t) for i, t in enumerate(split_long(text, 8000))], ""
        if fmt == "roff":
            return [("", strip_roff(text))], ""
        if fmt == "html":
            return [("", strip_html(text))], ""
        if fmt == "po":
            return [("", po_translations(text))], ""
        if fmt == "brown":
            return [("", _brown(text))], ""
        if fmt == "poetry":
            return [(f"#{i}", t) for i, t in enumerate(split_long("\n\n".join(_poetry(text)), 6000))], ""
        if fmt == "quran":
            return [(f"#{i}", t) for i, t in enumerate(_quran(text))], ""
        if fmt == "licence":
            return [("", _licence(text))], ""
        if fmt == "spdx":
            return [("", json.loads(text).get("licenseText") or "")], ""
        if fmt == "fortune":
            return [(f"#{i}", t) for i, t in enumerate(_fortune(text))], ""
    except (ValueError, KeyError, TypeError):
        return [], "unparsable"
    raise CorpusError(f"source {src.name}: unknown format {fmt!r}")
