"""The interactive feature browser: static files for one page of the HTML book.

:func:`write` turns an analysis artifact (``analysis/<profile>-features``) into a folder the page loads
with plain ``<script>`` tags, so it works from a web server and from ``file://`` alike (no ``fetch``):

- ``index.js``: the sets (SAE features, neurons), one summary row per unit (density, score, family, top
  tokens, polarity) and the search index from token text to the units that fire on it most;
- ``<set>-<k>.js``: the dashboards of units ``k*SHARD .. (k+1)*SHARD - 1`` of a set (top contexts with
  every token's activation, interval samples, top tokens, logit effects, histogram, nearest features),
  loaded only when one of them is opened;
- ``browser.js`` and ``browser.css``: the page's code (package data, ``book/assets/``).

Every number and example is of a unit's stronger half, max(p a, 0) with its polarity p = +1 or -1
(:mod:`monosemantic.analysis`); a unit read negated (p = -1) says so, with the share of its activation mass
on the other sign that the page leaves out. Tables written before polarity existed read as p = +1. A unit's
page shows its explanation and both held-out scores of it (simulation and detection, beside the older
all-token correlation), or says it fired too rarely held out to be scored; and how many of its top
activations would have been at a window's first position, which is not measured. Older tables without
these columns show none of it.

Nothing is served at read time and nothing is computed in the reader's browser beyond drawing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import tokenizer as _tokenizer  # noqa: F401 (registers the codec error handler below)
from .config import work_dir

HEX_BYTES = "monosemantic.hexbytes"  # bytes that are no whole character as <0xNN> (tokenizer.display_bytes)

SHARD = 64
SETS = (("topk", "SAE features (TopK)"), ("neurons", "MLP neurons"))
ASSETS = ("browser.js", "browser.css")


def _round(x: float, digits: int = 3) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return float(f"{float(x):.{digits}g}")


def _round_all(values, digits: int = 2, _seen: dict = {}) -> list[float | None]:  # noqa: B006 (a cache)
    """:func:`_round` of every value of an array (a context's activations: float16, so few distinct values;
    each is rounded once per process)."""
    out = []
    for v in np.asarray(values, dtype=np.float32).tolist():
        key = (v, digits)
        r = _seen.get(key, _seen)
        if r is _seen:
            r = _seen[key] = _round(v, digits)
        out.append(r)
    return out


def display_tokens(tokenizer, ids) -> list[str]:
    """Each token's text for display, decoded in sequence: a character whose UTF-8 bytes are split over
    several byte-level tokens is shown whole on the token that completes it (the others show nothing),
    instead of a U+FFFD on each part; bytes that complete no character (a context cut inside one) show as
    ``<0xNN>``, as everywhere in the book (:func:`monosemantic.tokenizer.display_bytes`).
    Special tokens (the document separator, ids past the real vocabulary, tokens without bytes) show their
    names. ``tokenizer``: GPT-2's, or any with ``token_bytes``,
    ``token_strings`` and ``eot_id`` (as :class:`VocabPieces` reads them from an analysis's vocab table)."""
    import codecs

    from .analysis import EOT_ID, N_VOCAB

    eot, n_vocab = getattr(tokenizer, "eot_id", EOT_ID), getattr(tokenizer, "n_vocab", N_VOCAB)
    ids = [int(i) for i in ids]
    real = [i for i in ids if i != eot and i < n_vocab]
    pieces = iter(tokenizer.token_bytes(real) if real else [])  # one call per context, not per token
    pieces = [b"" if i == eot or i >= n_vocab else next(pieces) for i in ids]
    if all(pieces):
        try:  # the common case: every token is whole characters
            return [p.decode("utf-8") for p in pieces]
        except UnicodeDecodeError:
            pass
    decoder = codecs.getincrementaldecoder("utf-8")(errors=HEX_BYTES)
    out = []
    for i, piece in zip(ids, pieces, strict=True):
        if not piece:  # special: its name, never bytes
            out.append(decoder.decode(b"", final=True) + tokenizer.token_strings([i])[0])
            continue
        out.append(decoder.decode(piece))
    if out:
        out[-1] += decoder.decode(b"", final=True)  # a character cut off by the context's end
    return out


class VocabPieces:
    """The tokens an analysis used, read from its ``vocab`` table (token, text, bytes, special), so the
    browser needs no tokenizer: any model's tables display the same way."""

    def __init__(self, vocab):
        self.text = dict(zip(vocab["token"].tolist(), vocab["text"].tolist(), strict=True))
        self.bytes = {t: (b"" if sp else bytes(b)) for t, b, sp in
                      zip(vocab["token"].tolist(), vocab["bytes"].tolist(), vocab["special"].tolist(), strict=True)}
        self.eot_id, self.n_vocab = -1, 1 << 62

    def token_bytes(self, ids) -> list[bytes]:
        return [self.bytes[int(i)] for i in ids]

    def token_strings(self, ids) -> list[str]:
        return [self.text[int(i)] for i in ids]


_TOKEN_TABLE = re.compile(r"^\d+:[-+.\deE]+( \d+:[-+.\deE]+)*$")


def explanation_text(explanation: str, text: dict[int, str]) -> str:
    """An explanation for reading: a token table's ``id:value`` pairs as the tokens' texts with their
    values (``' {' 1.8 · '{' 1.2``); any other explanation (a chat model's sentence) as it is."""
    if not explanation or not _TOKEN_TABLE.match(explanation):
        return explanation or ""
    pairs = (p.split(":") for p in explanation.split())
    return " · ".join(f"{text.get(int(i), f'#{i}')!r} {float(v):.3g}" for i, v in pairs)


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def write(art, out: Path, sets: tuple[tuple[str, str], ...] = SETS, *, reuse: bool = True) -> dict[str, int]:
    """Write the browser's files for ``art`` into ``out`` (replaced). Returns counts for the page's text.

    The files are a product of the artifact alone, so they are kept in the ignored ``cache/work/browser/``
    under a key of the artifact's content hash, the sets and this module's code (:func:`cache_key`): a book
    build whose chapter re-runs copies them from there instead of writing them again (``reuse=False``
    always writes). The page's code (``browser.js``, ``browser.css``) is copied fresh every time."""
    out = Path(out)
    stored = work_dir() / "browser" / f"{art.stage}-{art.profile}-{art.name}" / cache_key(art, sets)
    counts_file = stored / COUNTS
    if reuse and counts_file.is_file():
        counts = json.loads(counts_file.read_text(encoding="utf-8"))
        _copy_tree(stored, out, skip=(COUNTS,))
    else:
        counts = _write_data(art, out, sets)
        if reuse:
            _keep(out, stored, counts)
    for asset in ASSETS:
        (out / asset).write_text(resources.files("monosemantic.book").joinpath("assets", asset).read_text(
            encoding="utf-8"), encoding="utf-8")
    return {**counts, "bytes": sum(p.stat().st_size for p in out.iterdir())}


COUNTS = "counts.json"  # beside a kept copy: what write() returns for it


def cache_key(art, sets: tuple[tuple[str, str], ...] = SETS) -> str:
    """What the browser's data depend on: the artifact's files, the sets, and the code that writes them
    (this module and the tokenizer's display of bytes)."""
    import hashlib

    h = hashlib.sha256(json.dumps([art.content_hash, [list(s) for s in sets]]).encode())
    for module in (__file__, Path(__file__).with_name("tokenizer.py")):
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:20]


def _copy_tree(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=lambda _d, names: [n for n in names if n in skip])


def _keep(out: Path, stored: Path, counts: dict[str, int]) -> None:
    """Keep a copy of ``out`` as ``stored`` (written beside it, then renamed: a build that stops halfway or
    runs at the same time never leaves a partial copy), replacing older copies for the same artifact."""
    import os

    tmp = stored.parent / f".tmp-{stored.name}-{os.getpid()}"
    try:
        _copy_tree(out, tmp, skip=ASSETS)
        (tmp / COUNTS).write_text(json.dumps(counts), encoding="utf-8")
        for old in stored.parent.iterdir():
            if old.name != tmp.name and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
        tmp.rename(stored)
    except OSError:  # another build kept the same files first, or the disk is read-only: nothing is lost
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _by_unit(frame, order: tuple[str, ...] = ()) -> dict[int, dict[str, Any]]:
    """``frame``'s rows grouped by unit, sorted by ``order`` within a unit, each group as a dict of column
    arrays (one sort for the whole table instead of a pandas selection per unit)."""
    if not len(frame):
        return {}
    units = frame["unit"].to_numpy()
    idx = np.lexsort([frame[c].to_numpy() for c in reversed(order)] + [units])
    units = units[idx]
    columns = {c: frame[c].to_numpy()[idx] for c in frame.columns if c not in ("set", "unit")}
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    ends = np.r_[starts[1:], len(units)]
    return {int(units[s]): {c: v[s:e] for c, v in columns.items()} for s, e in zip(starts, ends, strict=True)}


def search_key(text: str) -> str:
    """What a search matches a token by: its text without surrounding whitespace, lower case (so ' the',
    'the' and 'The' are one entry, and a unit that fires on several of them is listed once)."""
    return text.strip().lower()


def rank_hits(hits: list[list]) -> list[list]:
    """Search hits ``[set, unit, share, mass, count]`` (one per unit: the share of the unit's activation that
    the matching tokens hold, the activation they hold, how often it fired on them) in the order the page
    lists them: by share, except that a unit holding less than :data:`RANK_MASS` of the largest activation
    on the token comes after every unit that holds more (a unit that fired a few dozen times at 1/30 of
    its peers' size, with all of it on ' the', is not what a reader searching 'the' is looking for)."""
    top = max((h[3] for h in hits), default=0.0)
    return sorted(hits, key=lambda h: (h[3] < RANK_MASS * top, -h[2], -h[3], h[0], h[1]))


MIN_SHARE = 0.02  # a unit is found under a token only if the token holds at least this share of its activation
RANK_MASS = 0.01  # see rank_hits
HITS = 30  # search hits kept per token and set


def _specific(units, spec_min: float, lift_min: float):
    """Per unit, whether its best family holds at least ``spec_min`` of its activation at a lift of at least
    ``lift_min`` (every unit, for tables written before the shares were recorded)."""
    if not {"family_share", "family_lift"} <= set(units.columns):
        return [True] * len(units)
    return ((units["family_share"].fillna(0) >= spec_min) & (units["family_lift"].fillna(0) >= lift_min)).tolist()


def _write_data(art, out: Path, sets: tuple[tuple[str, str], ...]) -> dict[str, int]:
    import pandas as pd

    from .tokenizer import vocab_text

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tables = {name: pd.read_parquet(art.file(f"{name}.parquet")) for name in
              ("units", "contexts", "top_tokens", "logits", "histograms", "vocab", "families", "neighbours")}
    text = vocab_text(tables["vocab"])  # byte fragments as <0xNN>, as everywhere in the book
    tokenizer = _pieces(tables["vocab"], tables["contexts"])
    names = [s for s, _ in sets]
    index: dict[str, Any] = {"sets": [], "families": dict(zip(tables["families"].family,
                                                              tables["families"].description, strict=True)),
                             "shard": SHARD, "units": {}, "tokens": {}, "profile": art.profile}
    search: dict[str, dict[tuple[int, int], list]] = {}  # key -> (set, unit) -> [set, unit, share, mass, count]
    spec_min = float(art.config.get("specificity_threshold", 0.5))
    lift_min = float(art.config.get("lift_threshold", 5.0))
    n_shards = 0
    for set_name, label in sets:
        units = tables["units"][tables["units"]["set"] == set_name].set_index("unit").sort_index()
        if not len(units):
            continue
        n = len(units)
        if "polarity" not in units.columns:  # tables written before polarity existed: every unit as read
            units = units.assign(polarity=1, other_sign_share=float("nan"))
        scores = "sim_corr" in units.columns  # tables written before the held-out scores of issue 18 have none
        rows = {int(u): r for u, r in zip(units.index, units.to_dict("records"), strict=True)}
        by = {name: t[t["set"] == set_name] for name, t in tables.items() if "set" in t.columns}
        top_tokens = _by_unit(by["top_tokens"], ("rank",))
        contexts = _by_unit(by["contexts"], ("interval", "rank"))
        logits = _by_unit(by["logits"], ("sign", "rank"))
        hists = dict(zip(by["histograms"].unit.tolist(), by["histograms"].counts, strict=True))
        near = _by_unit(by["neighbours"], ("rank",))
        labels = [" ".join(repr(text[int(t)]).strip("'") for t in top_tokens[u]["token"][:3]) if u in top_tokens
                  else "" for u in range(n)]
        index["sets"].append({"name": set_name, "label": label, "n": n})
        index["units"][set_name] = {
            "density": [_round(v) for v in units["density"]], "corr": [_round(v, 2) for v in units["explain_corr"]],
            # a family named in the list only where the unit is specific to it (the analysis's own thresholds)
            "family": [f if specific else "" for f, specific in
                       zip(units["family"].fillna(""), _specific(units, spec_min, lift_min), strict=True)],
            "label": labels,
            "polarity": [int(p) for p in units["polarity"]],
            **({"sim": [_round(v, 2) for v in units["sim_corr"]], "det": [_round(v, 2) for v in units["detection"]]}
               if scores else {})}
        s_index = names.index(set_name)
        for u, g in top_tokens.items():
            for t, share, mass, count in zip(g["token"], g["share"], g["mass"], g["count"], strict=True):
                key = search_key(text[int(t)])
                if share < MIN_SHARE or not key:
                    continue
                hit = search.setdefault(key, {}).setdefault((s_index, u), [s_index, u, 0.0, 0.0, 0])
                hit[2] += float(share)
                hit[3] += float(mass)
                hit[4] += int(count)
        for k in range(-(-n // SHARD)):
            shard = {}
            for u in range(k * SHARD, min(n, (k + 1) * SHARD)):
                row = rows[u]
                examples: dict[str, list] = {"top": [], "intervals": []}
                ctx = contexts.get(u)
                if ctx is not None:
                    for kind in dict.fromkeys(ctx["interval"].tolist()):
                        sel = ctx["interval"] == kind
                        items = [{"a": _round(a), "c": int(c), "t": display_tokens(tokenizer, toks),
                                  "v": _round_all(acts)}
                                 for a, c, toks, acts in zip(ctx["activation"][sel], ctx["center"][sel],
                                                             ctx["tokens"][sel], ctx["acts"][sel], strict=True)]
                        if kind == -1:
                            examples["top"] = items
                        else:
                            examples["intervals"].append({"interval": int(kind), "items": items})
                lg = logits.get(u)
                tt = top_tokens.get(u)
                nb = near.get(u)
                shard[u] = {
                    "density": _round(row["density"]), "density_val": _round(row["density_val"]),
                    "max": _round(row["max"]), "q": [_round(row[q]) for q in ("q50", "q90", "q99")],
                    "corr": _round(row["explain_corr"], 3),
                    "family": row["family"] if isinstance(row["family"], str) and row["family"] else None,
                    "family_share": _round(row["family_share"]), "family_lift": _round(row["family_lift"]),
                    "polarity": int(row["polarity"]), "other_sign_share": _round(row["other_sign_share"]),
                    **({"sim": _round(row["sim_corr"], 3), "det": _round(row["detection"], 3),
                        "explanation": explanation_text(row["explanation"], text),
                        "too_rare": bool(row["too_rare"]), "heldout_firings": int(row["heldout_firings"]),
                        "first_pos": _round(row["first_pos_top_share"])} if scores else {}),
                    "hist": [int(c) for c in hists.get(u, [])], **examples,
                    "tokens": [] if tt is None else [[text[int(t)], _round(s), int(c)] for t, s, c in
                                                     zip(tt["token"], tt["share"], tt["count"], strict=True)],
                    "up": [] if lg is None else [[text[int(t)], _round(e)] for t, e, sg in
                                                 zip(lg["token"], lg["effect"], lg["sign"], strict=True) if sg == 1],
                    "down": [] if lg is None else [[text[int(t)], _round(e)] for t, e, sg in
                                                   zip(lg["token"], lg["effect"], lg["sign"], strict=True) if sg == -1],
                    "near": [] if nb is None else [[int(o), _round(c)] for o, c in zip(nb["other"], nb["cosine"],
                                                                                       strict=True)]}
            (out / f"{set_name}-{k}.js").write_text(f"MonoBrowser.shard({_json(f'{set_name}-{k}')},{_json(shard)});\n",
                                                    encoding="utf-8")
            n_shards += 1
    for key, hits in search.items():
        ranked = rank_hits([[s, u, _round(share), _round(mass), count] for s, u, share, mass, count in hits.values()])
        index["tokens"][key] = [h for s in range(len(names)) for h in [h for h in ranked if h[0] == s][:HITS]]
    edges = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)[1:]])
    index["hist_edges"] = [_round(e) for e in edges]
    index["intervals"] = int(art.config.get("intervals", 4))
    index["rank_mass"] = RANK_MASS  # the page ranks a prefix search's hits as rank_hits does
    (out / "index.js").write_text(f"window.MONO_BROWSER_INDEX = {_json(index)};\n", encoding="utf-8")
    return {"units": sum(s["n"] for s in index["sets"]), "shards": n_shards, "tokens": len(index["tokens"])}


def _pieces(vocab, contexts) -> VocabPieces:
    """The tokens' bytes for :func:`display_tokens`, looked up in a table: the vocab table's own bytes (any
    tokenizer), or, for tables written before it kept them, GPT-2's bytes of every token the tables hold."""
    import pandas as pd

    if "bytes" in vocab.columns:
        return VocabPieces(vocab)
    from .tokenizer import load as load_tokenizer

    tok = load_tokenizer()
    ids = sorted(set(vocab["token"].tolist()) | set(np.unique(np.concatenate(contexts["tokens"].tolist())).tolist())
                 if len(contexts) else set(vocab["token"].tolist()))
    pieces = tok.token_strings_or_bytes(ids)
    return VocabPieces(pd.DataFrame({"token": ids, "text": [p if isinstance(p, str) else "" for p in pieces],
                                     "bytes": [b"" if isinstance(p, str) else p for p in pieces],
                                     "special": [isinstance(p, str) for p in pieces]}))


# --- the picture of the browser in the PDF -----------------------------------------------------------------

FIGURE_DENSITY = (1e-3, 1e-2)  # held-out density of the unit shown: common enough to have full dashboards


def figure_unit(units, top_tokens=None, text: dict[int, str] | None = None) -> int:
    """The SAE feature the PDF's picture shows: of the scored TopK features firing on 0.1% to 1% of held-out
    tokens, the one whose explanation predicts it best on held-out text (simulation score; the all-token
    correlation for a table without it); given the ``top_tokens`` table and the vocabulary's ``text``, only
    those whose top token is a whole token (not a byte fragment) holding most of their activation, so the
    picture shows readable contexts."""
    score = "sim_corr" if "sim_corr" in units.columns else "explain_corr"
    cand = units[(units["set"] == "topk") & units["scored"]
                 & units["density_val"].between(*FIGURE_DENSITY)].dropna(subset=[score])
    if top_tokens is not None and text is not None:
        first = top_tokens[(top_tokens["set"] == "topk") & (top_tokens["rank"] == 0)].set_index("unit")
        explained = {int(r.unit): str(r.explanation).split(":")[0] for r in cand.itertuples()
                     if isinstance(getattr(r, "explanation", None), str)}
        # the top token holds most of the activation, is whole, and is also the token its explanation puts
        # first (the highest mean activation: what the top contexts show)
        readable = {int(u) for u, r in first.iterrows()
                    if r["share"] >= 0.5 and "<0x" not in text.get(int(r["token"]), "<0x")
                    and explained.get(int(u), str(int(r["token"]))) == str(int(r["token"]))}
        if cand["unit"].isin(readable).any():
            cand = cand[cand["unit"].isin(readable)]
    if cand.empty:
        cand = units[(units["set"] == "topk") & units["scored"]].dropna(subset=[score])
    if cand.empty:
        raise ValueError("no scored TopK feature to show")
    return int(cand.sort_values([score, "unit"], ascending=[False, True]).iloc[0]["unit"])


def _figure_css() -> str:
    """The site's stylesheet with the book's Noto fonts named from their files (the site cuts them down to
    its characters; a picture of one unit does not need that), so the picture shows what a reader sees."""
    from .book import html as book_html
    from .book import pdf as book_pdf
    from .book import webfonts

    fonts = webfonts.sources(book_pdf.font_paths())
    faces = "\n".join(f'@font-face {{ font-family: "{f.family}"; src: url("{f.path.as_uri()}"); }}' for f in fonts)
    families = ", ".join(f'"{f.family}"' for f in fonts)
    return f"{faces}\n:root {{ --script-fonts: {families}; }}\n{book_html.stylesheet()}"


def figure(art, folder: Path, png: Path, *, width: int = 1000, height: int = 660, scale: float = 1.5) -> dict[str, Any]:
    """The PDF's picture of the browser whose files :func:`write` put in ``folder``: the page opened on
    :func:`figure_unit`'s feature, ``width`` x ``height`` CSS pixels from its top (search box, then the
    unit; each column ends at its last whole row), written to ``png`` beside ``png.with_suffix('.json')``,
    which says what it shows (the unit, its top token, its scores) and what it was made from
    (:func:`cache_key`). Made again only when that key changed and Chromium is installed; otherwise the
    description of the picture already there is returned (an empty dict when there is none)."""
    import hashlib

    import pandas as pd

    from .book.chromium import WHOLE_ROWS, Chromium, executable

    meta_file = png.with_suffix(".json")
    old = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    # the picture depends on the data (cache_key), the page's code, where the picture is cut and its size
    assets = hashlib.sha256(("".join(resources.files("monosemantic.book").joinpath("assets", a).read_text(
        encoding="utf-8") for a in ASSETS) + WHOLE_ROWS).encode()).hexdigest()[:12]
    key = f"{cache_key(art)}-{assets}-{width}x{height}@{scale}"
    if (old.get("key") == key and png.is_file()) or executable() is None:
        return old if png.is_file() else {}
    from .tokenizer import vocab_text

    units = pd.read_parquet(art.file("units.parquet"))
    top_all = pd.read_parquet(art.file("top_tokens.parquet"))
    text = vocab_text(pd.read_parquet(art.file("vocab.parquet")))  # a byte fragment as <0xNN>
    unit = figure_unit(units, top_all, text)
    row = units[(units["set"] == "topk") & (units["unit"] == unit)].iloc[0]
    top = top_all[(top_all["set"] == "topk") & (top_all["unit"] == unit)].sort_values("rank")
    page = Path(folder).resolve().parent / f".figure-{Path(folder).name}.html"
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8"><style>{_figure_css()}</style>'
                    f'<link rel="stylesheet" href="{Path(folder).name}/browser.css"></head>'
                    f'<body style="margin:12px;background:#fff"><div id="mono-browser"></div>'
                    f'<script src="{Path(folder).name}/index.js"></script>'
                    f'<script src="{Path(folder).name}/browser.js"></script></body></html>', encoding="utf-8")
    chrome = Chromium(width + 24, height + 200)
    try:
        chrome.send("Page.navigate", session=True, url=f"{page.as_uri()}#topk/{unit}")
        chrome.wait(f"(() => {{ const h = document.querySelector('#mono-view h3'); return !!h && "
                    f"h.textContent.includes('#{unit}') && "
                    f"document.querySelectorAll('#mono-view tr').length > 3; }})()")
        chrome.wait("document.fonts.ready.then(() => document.fonts.status === 'loaded')")
        chrome.screenshot("#mono-browser", png, max_height=height, scale=scale)
    finally:
        chrome.close()
        page.unlink(missing_ok=True)
    meta = {"key": key, "analysis": art.key, "unit": unit, "page": f"#topk/{unit}",
            "top_token": text.get(int(top["token"].iloc[0]), "") if len(top) else "",
            "top_token_share": float(top["share"].iloc[0]) if len(top) else None,
            "density_val": float(row["density_val"]), "family": row["family"] or None,
            **{k: (None if pd.isna(row[k]) else float(row[k])) for k in ("sim_corr", "detection") if k in row}}
    meta_file.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta
