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
on the other sign that the page leaves out. Tables written before polarity existed read as p = +1.

Nothing is served at read time and nothing is computed in the reader's browser beyond drawing.
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SHARD = 64
SETS = (("topk", "SAE features (TopK)"), ("neurons", "MLP neurons"))
ASSETS = ("browser.js", "browser.css")


def _round(x: float, digits: int = 3) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return float(f"{float(x):.{digits}g}")


def display_tokens(tokenizer, ids) -> list[str]:
    """Each token's text for display, decoded in sequence: a character whose UTF-8 bytes are split over
    several byte-level tokens is shown whole on the token that completes it (the others show nothing),
    instead of a U+FFFD on each part. Special tokens (the document separator, ids past the real vocabulary,
    tokens without bytes) show their names. ``tokenizer``: GPT-2's, or any with ``token_bytes``,
    ``token_strings`` and ``eot_id`` (as :class:`VocabPieces` reads them from an analysis's vocab table)."""
    import codecs

    from .analysis import EOT_ID, N_VOCAB

    eot, n_vocab = getattr(tokenizer, "eot_id", EOT_ID), getattr(tokenizer, "n_vocab", N_VOCAB)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for i in ids:
        i = int(i)
        piece = b"" if i == eot or i >= n_vocab else tokenizer.token_bytes([i])[0]
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


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def write(art, out: Path, sets: tuple[tuple[str, str], ...] = SETS) -> dict[str, int]:
    """Write the browser's files for ``art`` into ``out`` (replaced). Returns counts for the page's text."""
    import pandas as pd

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tables = {name: pd.read_parquet(art.file(f"{name}.parquet")) for name in
              ("units", "contexts", "top_tokens", "logits", "histograms", "vocab", "families", "neighbours")}
    if "bytes" in tables["vocab"].columns:
        tokenizer = VocabPieces(tables["vocab"])
    else:  # tables written before the vocab table kept bytes: the one-layer model's GPT-2 tokenizer
        from .tokenizer import load as load_tokenizer

        tokenizer = load_tokenizer()
    text = dict(zip(tables["vocab"].token.tolist(), tables["vocab"].text.tolist(), strict=True))
    names = [s for s, _ in sets]
    index: dict[str, Any] = {"sets": [], "families": dict(zip(tables["families"].family,
                                                              tables["families"].description, strict=True)),
                             "shard": SHARD, "units": {}, "tokens": {}, "profile": art.profile}
    search: dict[str, list[tuple[float, int, int]]] = {}
    n_shards = 0
    for set_name, label in sets:
        units = tables["units"][tables["units"]["set"] == set_name].set_index("unit").sort_index()
        if not len(units):
            continue
        n = len(units)
        if "polarity" not in units.columns:  # tables written before polarity existed: every unit as read
            units = units.assign(polarity=1, other_sign_share=float("nan"))
        by = {name: t[t["set"] == set_name] for name, t in tables.items() if "set" in t.columns}
        top_tokens = {u: g.sort_values("rank") for u, g in by["top_tokens"].groupby("unit")}
        contexts = {u: g for u, g in by["contexts"].groupby("unit")}
        logits = {u: g for u, g in by["logits"].groupby("unit")}
        hists = dict(zip(by["histograms"].unit, by["histograms"].counts, strict=True))
        near = {u: g.sort_values("rank") for u, g in by["neighbours"].groupby("unit")}
        labels = [" ".join(repr(text[t]).strip("'") for t in top_tokens[u].token.head(3)) if u in top_tokens else ""
                  for u in range(n)]
        index["sets"].append({"name": set_name, "label": label, "n": n})
        index["units"][set_name] = {
            "density": [_round(v) for v in units["density"]], "corr": [_round(v, 2) for v in units["explain_corr"]],
            "family": units["family"].fillna("").tolist(), "label": labels,
            "polarity": [int(p) for p in units["polarity"]]}
        for u, g in top_tokens.items():
            for t, share in zip(g.token, g["share"], strict=True):
                if share >= 0.02:
                    key = text[t].strip().lower()
                    if key:
                        search.setdefault(key, []).append((float(share), names.index(set_name), int(u)))
        for k in range(-(-n // SHARD)):
            shard = {}
            for u in range(k * SHARD, min(n, (k + 1) * SHARD)):
                row = units.loc[u]
                ctx = contexts.get(u)
                examples: dict[str, list] = {"top": [], "intervals": []}
                if ctx is not None:
                    for kind, g in ctx.sort_values(["interval", "rank"]).groupby("interval"):
                        items = [{"a": _round(a), "c": int(c), "t": display_tokens(tokenizer, toks),
                                  "v": [_round(v, 2) for v in acts.astype(np.float32)]}
                                 for a, c, toks, acts in zip(g.activation, g.center, g.tokens, g.acts, strict=True)]
                        if kind == -1:
                            examples["top"] = items
                        else:
                            examples["intervals"].append({"interval": int(kind), "items": items})
                lg = logits.get(u)
                up = lg[lg.sign == 1].sort_values("rank") if lg is not None else None
                down = lg[lg.sign == -1].sort_values("rank") if lg is not None else None
                tt = top_tokens.get(u)
                shard[u] = {
                    "density": _round(row["density"]), "density_val": _round(row["density_val"]),
                    "max": _round(row["max"]), "q": [_round(row[q]) for q in ("q50", "q90", "q99")],
                    "corr": _round(row["explain_corr"], 3), "family": row["family"] or None,
                    "family_share": _round(row["family_share"]), "family_lift": _round(row["family_lift"]),
                    "polarity": int(row["polarity"]), "other_sign_share": _round(row["other_sign_share"]),
                    "hist": [int(c) for c in hists.get(u, [])], **examples,
                    "tokens": [] if tt is None else [[text[int(t)], _round(s), int(c)] for t, s, c in
                                                     zip(tt.token, tt["share"], tt["count"], strict=True)],
                    "up": [] if up is None else [[text[int(t)], _round(e)] for t, e in zip(up.token, up.effect,
                                                                                           strict=True)],
                    "down": [] if down is None else [[text[int(t)], _round(e)] for t, e in
                                                     zip(down.token, down.effect, strict=True)],
                    "near": [] if u not in near else [[int(o), _round(c)] for o, c in zip(near[u].other,
                                                                                         near[u].cosine,
                                                                                         strict=True)]}
            (out / f"{set_name}-{k}.js").write_text(f"MonoBrowser.shard({_json(f'{set_name}-{k}')},{_json(shard)});\n",
                                                    encoding="utf-8")
            n_shards += 1
    for key, hits in search.items():
        index["tokens"][key] = [[s, u] for _, s, u in sorted(hits, reverse=True)[:30]]
    edges = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)[1:]])
    index["hist_edges"] = [_round(e) for e in edges]
    index["intervals"] = int(art.config.get("intervals", 4))
    (out / "index.js").write_text(f"window.MONO_BROWSER_INDEX = {_json(index)};\n", encoding="utf-8")
    for asset in ASSETS:
        (out / asset).write_text(resources.files("monosemantic.book").joinpath("assets", asset).read_text(
            encoding="utf-8"), encoding="utf-8")
    return {"units": sum(s["n"] for s in index["sets"]), "shards": n_shards, "tokens": len(index["tokens"]),
            "bytes": sum(p.stat().st_size for p in out.iterdir())}
