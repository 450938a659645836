"""Which option names Quarto documents, and a check that the book uses only those.

The names come from Quarto's own schema files (``src/resources/schema/`` in quarto-cli); the derived
list is committed as ``data/quarto_options.json`` (see ``data/README.md`` for its source and licence).
Regenerate it with::

    python -m monosemantic.book.quarto_options /path/to/quarto-cli/src/resources/schema

:func:`check_book` checks ``_quarto.yml``, every chapter's front matter and ``#|`` cell options against
that list, and that every ``@fig-/@tbl-/@sec-/@eq-`` reference and citation key resolves.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DATA = "quarto_options.json"
SOURCE = ("quarto-dev/quarto-cli, src/resources/schema/, commit 5d1da592d (2026-07-24); "
          "Copyright (c) 2020-2026 Posit Software, PBC; MIT licence")

# Keys Quarto's front-matter schema adds in its TypeScript code (src/core/schema/front-matter.ts and
# project-config.ts) rather than in the yml files: they hold other options, so they are not in the list.
STRUCTURAL = {"format": "output formats and their options", "execute": "execution options",
              "profile": "project profiles", "metadata-files": "project metadata files",
              "quarto-required": "required Quarto version (document-options.yml)"}


def _props(schema: Any) -> list[str]:
    """Property names of an ``object`` schema (following ``schema:`` / ``object:`` nesting)."""
    if not isinstance(schema, dict):
        return []
    if "schema" in schema:
        return _props(schema["schema"])
    obj = schema.get("object")
    if isinstance(obj, dict):
        return list((obj.get("properties") or {}).keys())
    return []


def _entry(item: dict[str, Any]) -> dict[str, Any]:
    tags = item.get("tags") or {}
    entry: dict[str, Any] = {}
    for key in ("formats", "engine", "contexts"):
        if key in tags:
            entry[key] = tags[key]
    if item.get("alias"):
        entry["alias"] = item["alias"]
    return entry


def regenerate(schema_dir: Path) -> dict[str, Any]:
    """The option lists, derived from Quarto's schema folder."""
    schema_dir = Path(schema_dir)

    def names(pattern: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(schema_dir.glob(pattern)):
            for item in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
                entry = _entry(item) | {"file": path.name}
                out[item["name"]] = entry
                if item.get("alias"):
                    out[item["alias"]] = entry
        return out

    project_items = yaml.safe_load((schema_dir / "project.yml").read_text(encoding="utf-8"))
    project_top = {i["name"]: _entry(i) for i in project_items if not i.get("hidden")}
    project_keys = next(_props(i) for i in project_items if i["name"] == "project")
    definitions = {d["id"]: d for d in yaml.safe_load((schema_dir / "definitions.yml").read_text(encoding="utf-8"))}
    # project.yml's `book` is book-schema (itself extending base-website) plus the shared CSL item fields
    book = (_props(definitions["book-schema"]) + list(definitions["base-website"]["object"]["properties"])
            + _props(definitions["csl-item-shared"]))
    aliases = yaml.safe_load((schema_dir / "format-aliases.yml").read_text(encoding="utf-8"))["aliases"]
    cell = names("cell-*.yml")
    document = names("document-*.yml")
    execute = {k: v for k, v in {**document, **cell}.items()
               if v.get("file") in ("document-execute.yml", "cell-codeoutput.yml", "cell-textoutput.yml",
                                    "cell-include.yml", "cell-cache.yml")}
    return {
        "source": SOURCE,
        "regenerate": "python -m monosemantic.book.quarto_options <quarto-cli>/src/resources/schema",
        "cell": cell,
        "document": document,
        "execute": sorted(execute),
        "project_top": sorted(project_top),
        "project": sorted(project_keys),
        "book": sorted(set(book)),
        "format_aliases": aliases,
        "structural": STRUCTURAL,
    }


@functools.cache
def load() -> dict[str, Any]:
    return json.loads(resources.files("monosemantic.book").joinpath("data", DATA).read_text(encoding="utf-8"))


def _expand(names: list[str], aliases: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for n in names:
        if n.startswith("$"):
            out |= _expand(aliases.get(n[1:], []), aliases)
        else:
            out.add(n)
    return out


def applies_to(option: str, fmt: str, data: dict[str, Any] | None = None) -> bool:
    """Whether document option ``option`` is documented for output format ``fmt``."""
    data = data or load()
    entry = data["document"].get(option)
    if entry is None:
        return False
    formats = entry.get("formats")
    if not formats:
        return True
    aliases = data["format_aliases"]
    positive = [f for f in formats if not f.startswith("!")]
    negative = _expand([f[1:] for f in formats if f.startswith("!")], aliases)
    if fmt in negative:
        return False
    return not positive or fmt in _expand(positive, aliases)


def known_formats(data: dict[str, Any] | None = None) -> set[str]:
    data = data or load()
    return _expand(["$pandoc-all", "$html-all"], data["format_aliases"]) | {"typst", "dashboard", "revealjs",
                                                                               "pdf", "email"}


# --- the check ------------------------------------------------------------------------------------------------

def check_config(config: dict[str, Any], where: str = "_quarto.yml") -> list[str]:
    """Problems with the keys of ``_quarto.yml`` (an empty list when all are documented)."""
    data = load()
    problems = []
    top = set(data["project_top"]) | set(data["document"]) | set(STRUCTURAL)
    for key, value in config.items():
        if key not in top:
            problems.append(f"{where}: `{key}` is not a Quarto project or document option")
        elif key == "project":
            problems += [f"{where}: `project: {k}` is not a Quarto project option"
                         for k in (value or {}) if k not in data["project"]]
        elif key == "book":
            problems += [f"{where}: `book: {k}` is not a Quarto book option"
                         for k in (value or {}) if k not in data["book"]]
        elif key == "execute":
            problems += [f"{where}: `execute: {k}` is not a Quarto execute option"
                         for k in (value or {}) if k not in data["execute"]]
        elif key == "format":
            problems += check_formats(value, where)
    return problems


def check_formats(formats: Any, where: str) -> list[str]:
    data = load()
    problems = []
    if isinstance(formats, str):
        formats = {formats: "default"}
    for fmt, options in (formats or {}).items():
        if fmt not in known_formats(data):
            problems.append(f"{where}: format `{fmt}` is not an output format Quarto knows")
            continue
        for k in options if isinstance(options, dict) else {}:
            if k in STRUCTURAL or k in data["execute"] or k in data["cell"]:
                continue
            if k not in data["document"]:
                problems.append(f"{where}: `format: {fmt}: {k}` is not a Quarto option")
            elif not applies_to(k, fmt, data):
                problems.append(f"{where}: `{k}` is not documented for format {fmt}")
    return problems


def check_front_matter(meta: dict[str, Any], where: str) -> list[str]:
    data = load()
    problems = []
    for key, value in meta.items():
        if key in ("execute",):
            problems += [f"{where}: `execute: {k}` is not a Quarto execute option"
                         for k in (value or {}) if k not in data["execute"]]
        elif key == "format":
            problems += check_formats(value, where)
        elif key not in data["document"] and key not in STRUCTURAL:
            problems.append(f"{where}: front matter key `{key}` is not a Quarto document option")
    return problems


def check_book(root: Path) -> list[str]:
    """Every problem that would make the book invalid Quarto or leave a reference dangling."""
    from . import crossref, pandoc, project, qmd
    from .ast import preorder

    proj = project.load(root)
    problems = check_config(proj.config)
    for bib in proj.bibliography:
        if not bib.is_file():
            problems.append(f"_quarto.yml: bibliography {bib.relative_to(root)} does not exist")
    bib_keys: set[str] = set()
    for bib in proj.bibliography:
        if bib.is_file():
            bib_keys |= set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", bib.read_text(encoding="utf-8")))
    cell_names = set(load()["cell"])
    labels: set[str] = set()
    refs: list[tuple[str, str]] = []
    cites: list[tuple[str, str]] = []
    for ch in proj.chapters:
        doc = qmd.parse(ch.path)
        problems += check_front_matter(doc.front_matter, ch.source)
        for cell in doc.cells:
            problems += [f"{ch.source}:{cell.line}: `#| {k}` is not a Quarto cell option"
                         for k in cell.options if k not in cell_names]
            label = cell.options.get("label")
            if label:
                labels.add(str(label))
        text = "".join(p for p in doc.parts if isinstance(p, str))
        blocks = crossref.normalise(pandoc.read(text, pandoc.READER, ch.source)["blocks"])
        for node in preorder(blocks):
            if node["t"] in ("Header", "Figure", "Table", "Div") and node["c"][0 if node["t"] != "Header" else 1][0]:
                labels.add(node["c"][0 if node["t"] != "Header" else 1][0])
        refs += [(ch.source, r) for r in crossref.referenced_labels(blocks)]
        cites += [(ch.source, k) for k in crossref.cited_keys(blocks)]
    problems += [f"{src}: @{r} refers to no label in the book" for src, r in sorted(refs) if r not in labels]
    problems += [f"{src}: citation @{k} is not in the bibliography" for src, k in sorted(cites) if k not in bib_keys]
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    data = regenerate(Path(argv[0]))
    target = Path(__file__).parent / "data" / DATA
    target.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {target}: {len(data['cell'])} cell, {len(data['document'])} document, "
          f"{len(data['project'])} project and {len(data['book'])} book options")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
