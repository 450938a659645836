"""The site's fonts for the scripts a reader's machine may lack (Arabic, Hebrew, Indic, CJK, ...): the same
Noto fonts the PDF embeds (:data:`monosemantic.book.pdf.FONT_PACKAGES`), cut down to the characters the
site's pages and resources hold, written to ``_book/fonts/`` and named in ``@font-face`` rules appended to
the stylesheet. Each rule carries the ``unicode-range`` of its font's characters, so a browser fetches a font
only for a page that shows one of them, and the stylesheet's font stacks end with them
(``var(--script-fonts)``) before the generic family: a character the reader's own fonts have is set in those.

Cutting a 19 MB CJK collection down takes a while, so the fonts are kept between builds: ``fonts.json``
records the characters and font files they were made from, and an unchanged site reuses them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

FOLDER = "fonts"
MANIFEST = "fonts.json"
FAMILY_PREFIX = "monosemantic "  # our copies are never confused with a font of the reader's machine
FIRST = 0x0250  # below: Latin and Latin-1/Extended-A/B, which every font stack has
_NON_ASCII = re.compile(rb"[\x80-\xff]+")
# Fonts of the packages left out: Latin italics (the stack's own italics serve) and the emoji font (2 MB;
# every system has emoji, and no chapter needs them).
_SKIPPED = re.compile(r"Italic|Emoji", re.IGNORECASE)
CJK_FAMILY = "Noto Sans CJK SC"  # the collection's member the PDF uses (assets/book.typ)


class Source(NamedTuple):
    """A font the site may use: its family name, file and number in a collection (0 for a single font)."""

    family: str
    path: Path
    number: int


class WebFont(NamedTuple):
    family: str  # as the stylesheet names it (FAMILY_PREFIX + the font's own family)
    file: str  # relative to the site
    codepoints: list[int]


def characters(paths: Iterable[Path]) -> set[int]:
    """Code points from :data:`FIRST` on in the UTF-8 files ``paths`` (their non-ASCII bytes, read as bytes:
    faster than decoding tens of MB of feature-browser data)."""
    found: set[str] = set()
    for path in paths:
        found.update(b" ".join(_NON_ASCII.findall(path.read_bytes())).decode("utf-8", errors="replace"))
    return {ord(c) for c in found if ord(c) >= FIRST} - {0xFFFD}


def _stamp(paths: list[Path], root: Path) -> str:
    """Names, sizes and modification times of ``paths``: the resource folders are copied with their times, so
    an unchanged feature browser keeps its stamp and is not read again."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def sources(folders: Iterable[str | Path]) -> list[Source]:
    """The fonts of ``folders`` (the font packages), in the order the site prefers them: Noto Sans first
    (Greek, Cyrillic, Latin extensions), the script fonts by name, symbols, and CJK last (it also covers
    Latin, Greek and punctuation, which the fonts before it set)."""
    out: list[Source] = []
    for folder in map(Path, folders):
        for path in sorted(folder.glob("*.tt[fc]")) + sorted(folder.glob("*.ot[fc]")):
            if _SKIPPED.search(path.name):
                continue
            if path.suffix in (".ttc", ".otc"):
                out.append(Source(CJK_FAMILY, path, _member(path, CJK_FAMILY)))
            else:
                out.append(Source(_family(path), path, 0))

    def rank(s: Source) -> tuple[int, str]:
        return (0 if s.family == "Noto Sans" else 3 if "CJK" in s.family else 2 if "Symbols" in s.family else 1,
                s.family)

    return sorted(out, key=rank)


def _family(path: Path, number: int = 0) -> str:
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=number, lazy=True) as font:
        return font["name"].getBestFamilyName()


def _member(path: Path, family: str) -> int:
    """The number of ``family`` in the collection at ``path``."""
    from fontTools.ttLib import TTCollection

    with TTCollection(path, lazy=True) as collection:
        for i, font in enumerate(collection.fonts):
            if font["name"].getBestFamilyName() == family:
                return i
    raise ValueError(f"{path} holds no font of the family {family}")


def unicode_range(codepoints: Iterable[int]) -> str:
    """CSS ``unicode-range`` of ``codepoints``: runs of consecutive ones as ranges.

    >>> unicode_range([0x41, 0x42, 0x43, 0x4E00])
    'U+41-43, U+4E00'
    """
    runs: list[list[int]] = []
    for c in sorted(set(codepoints)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ", ".join(f"U+{a:X}" if a == b else f"U+{a:X}-{b:X}" for a, b in runs)


def stylesheet(fonts: list[WebFont]) -> str:
    """The ``@font-face`` rules of ``fonts`` and the ``--script-fonts`` list the site's font stacks end with."""
    rules = []
    for f in fonts:
        fmt = "opentype" if f.file.endswith(".otf") else "truetype"
        rules.append(f'@font-face {{ font-family: "{f.family}"; src: url("{f.file}") format("{fmt}"); '
                     f"font-weight: 100 900; font-display: swap; unicode-range: {unicode_range(f.codepoints)}; }}")
    families = ", ".join(f'"{f.family}"' for f in fonts)
    return ("/* fonts for the scripts a reader's machine may lack, cut down to the site's characters "
            "(monosemantic.book.webfonts) */\n" + "\n".join(rules)
            + (f"\n:root {{ --script-fonts: {families}; }}\n" if fonts else "\n"))


def _key(characters: set[int], fonts: list[Source]) -> str:
    from fontTools import version as fonttools_version

    h = hashlib.sha256(fonttools_version.encode())
    for s in fonts:
        h.update(f"{s.family}\0{s.path.name}\0{s.number}\0{s.path.stat().st_size}\n".encode())
    h.update(",".join(map(str, sorted(characters))).encode())
    return h.hexdigest()


def _subset(source: Source, codepoints: list[int], dest: Path) -> None:
    from fontTools import subset
    from fontTools.ttLib import TTFont

    options = subset.Options()
    options.layout_features = ["*"]  # every shaping feature: Arabic joining, Indic reordering, CJK forms
    options.hinting = False  # browsers hint outlines themselves; hinting would double the size
    options.notdef_outline = True
    with TTFont(source.path, fontNumber=source.number) as font:
        subsetter = subset.Subsetter(options)
        subsetter.populate(unicodes=codepoints)
        subsetter.subset(font)
        font.save(dest)


def write(site: Path, folders: Iterable[str | Path]) -> tuple[str, bool]:
    """Cut the fonts of ``folders`` down to the characters of ``site`` (a written site) into ``site/fonts/``;
    returns the stylesheet rules for them and whether they were reused from the last build. The characters
    are those of the pages (``*.html``) and of the scripts in the resource folders (``*/*.js``: the feature
    browsers' data)."""
    folder = site / FOLDER
    manifest = folder / MANIFEST
    kept = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
    resources = sorted(site.glob("*/*.js"))
    stamp = _stamp(resources, site)
    in_resources = (set(kept["resource_characters"]) if kept.get("resource_stamp") == stamp
                    else characters(resources))
    found = characters(site.glob("*.html")) | in_resources
    fonts = sources(folders)
    key = _key(found, fonts)
    if kept.get("key") == key and all((site / f["file"]).is_file() for f in kept["fonts"]):
        if kept.get("resource_stamp") != stamp:  # the same characters in rewritten files: note their stamp
            manifest.write_text(json.dumps({**kept, "resource_stamp": stamp,
                                            "resource_characters": sorted(in_resources)}) + "\n", encoding="utf-8")
        return stylesheet([WebFont(**f) for f in kept["fonts"]]), True
    from fontTools.ttLib import TTFont

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    left = set(found)
    written: list[WebFont] = []
    for source in fonts:
        if not left:
            break
        with TTFont(source.path, fontNumber=source.number, lazy=True) as font:
            mine = sorted(left & set(font.getBestCmap()))
            cff = "CFF " in font
        if not mine:
            continue
        name = re.sub(r"[^A-Za-z0-9]+", "", source.family) + (".otf" if cff else ".ttf")
        _subset(source, mine, folder / name)
        written.append(WebFont(FAMILY_PREFIX + source.family, f"{FOLDER}/{name}", mine))
        left -= set(mine)
    manifest.write_text(json.dumps({"key": key, "fonts": [f._asdict() for f in written], "uncovered": sorted(left),
                                    "resource_stamp": stamp, "resource_characters": sorted(in_resources)})
                        + "\n", encoding="utf-8")
    return stylesheet(written), False
