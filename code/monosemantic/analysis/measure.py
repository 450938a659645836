"""The whole analysis of some unit sets on some text (:func:`analyze`), and feature splitting across dictionary
sizes."""


from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import explain
from ..explain import fit_token_tables
from ..harvest import held_out_windows, spread_windows
from ..tokenizer import EOT_ID, N_VOCAB, TokenTable  # GPT-2's; the chapters and the causal stage read them here too
from .families import FAMILIES, FAMILY_NAMES, window_families
from .passes import (
    _HIST_EDGES,
    AnalysisConfig,
    Stopwatch,
    _context_acts,
    _first_pass,
    _held_out_pass,
    _interval_pass,
    _top_tokens_frame,
    first_position_share,
    pearson,
)
from .units import UnitSet, logit_extremes

# --- the whole analysis -----------------------------------------------------------------------------

def analyze(model, tokenizer: TokenTable, sets: list[UnitSet], explain_tokens: np.ndarray, val_tokens: np.ndarray,
            cfg: AnalysisConfig, progress: bool = True, log: Callable[[str], None] = print,
            clock: Stopwatch | None = None) -> dict[str, Any]:
    """Run every pass; returns pandas tables: ``units`` (one row per unit of every set), ``contexts``,
    ``top_tokens``, ``logits``, ``histograms``, ``families`` and a ``vocab`` of the token strings used.
    Every unit that fires on at least ``min_heldout_firings`` held-out tokens is explained and scored by the
    explainer ``cfg.explainer`` names (:mod:`monosemantic.explain`).

    ``model``: the one-layer LM, or any object with its interface (``config.context_length``, ``d_mlp``,
    ``vocab_size``; ``run_with_cache(ids, [HOOK])``), a ``logit_effects(directions)`` and ``n_vocab`` (real
    tokens) of its own, as :class:`monosemantic.llama_eval.LayerModel` has for SmolLM2 or Stheno.
    ``tokenizer``: ``token_bytes``, ``token_strings`` and ``eot_id`` (the document separator).

    ``explain_tokens``: a 1-D token array, read in ``cfg.explain_tokens`` tokens of windows of the model's
    context T spread evenly over it (:func:`spread_windows`). ``val_tokens``, the held-out text: a 1-D token
    array, read whole in windows spread evenly over it, or (W, T) windows read as they are (windows taken
    from many places, each a text of its own). ``clock``: a :class:`Stopwatch` that gets the seconds of the
    model's forward passes and of each set's own work."""
    import pandas as pd

    clock = clock or Stopwatch()
    T = model.config.context_length
    windows, starts = spread_windows(explain_tokens, T, cfg.explain_tokens)
    val_windows = held_out_windows(val_tokens, T)
    log(f"analyze: {windows.size:,} explanation tokens, {val_windows.size:,} held-out tokens, "
        + ", ".join(f"{s.n_units:,} {s.name}" for s in sets))
    with clock("labels"):
        labels = window_families(tokenizer, windows)
        val_labels = window_families(tokenizer, val_windows)
    stats = _first_pass(model, sets, windows, labels, cfg, progress, clock)
    # from here on every set is read through its units' polarities: oriented activations max(p a, 0)
    sets = [dataclasses.replace(s, polarity=st.polarity) for s, st in zip(sets, stats, strict=True)]
    maxima = [st.max for st in stats]

    eots = np.flatnonzero(np.asarray(explain_tokens) == getattr(tokenizer, "eot_id", EOT_ID))

    def document(g: np.ndarray) -> np.ndarray:  # the document of global index g (window * T + t)
        return np.searchsorted(eots, starts[g // T] + g % T)

    examples: list[list[tuple[int, int]]] = []  # per set: (unit, global index), the top ones first
    example_meta: list[list[dict[str, Any]]] = []
    for s, st in zip(sets, stats, strict=True):
        with clock(s.name):
            exs, meta = [], []
            if s.contexts:
                docs = document(st.best_i.numpy())  # (pool, n)
                bv = st.best_v.numpy()
                for u in range(s.n_units):
                    seen: set[int] = set()
                    for r in range(st.pool):
                        if bv[r, u] <= 0 or len(seen) == cfg.top_contexts:
                            break
                        if docs[r, u] in seen:
                            continue
                        seen.add(int(docs[r, u]))
                        exs.append((u, int(st.best_i[r, u])))
                        meta.append({"unit": u, "kind": "top", "interval": -1, "rank": len(seen) - 1,
                                     "activation": float(bv[r, u]), "document": int(docs[r, u])})
            examples.append(exs)
            example_meta.append(meta)
    intervals = _interval_pass(model, sets, windows, maxima, examples, cfg, progress, clock)
    context_acts = [[_context_acts(span, g % T, T, cfg) for (_, g), span in zip(exs, sm.top_contexts, strict=True)]
                    for exs, sm in zip(examples, intervals, strict=True)]
    for s, exs, meta, acts, sm in zip(sets, examples, example_meta, context_acts, intervals, strict=True):
        with clock(s.name):
            if s.contexts:
                ivv, iii, ivc = sm.values.numpy(), sm.index.numpy(), sm.contexts.numpy()
                for j in range(cfg.intervals):
                    for r in range(cfg.interval_samples):
                        for u in np.flatnonzero(ivv[j, r] > 0):
                            g = int(iii[j, r, u])
                            exs.append((int(u), g))
                            meta.append({"unit": int(u), "kind": "interval", "interval": j, "rank": r,
                                         "activation": float(ivv[j, r, u]),
                                         "document": int(document(np.array([g]))[0])})
                            acts.append(_context_acts(ivc[j, r, u], g % T, T, cfg))

    skip = cfg.skip_first_positions
    tables, shown_by_set, context_rows = [], [], []
    for s, exs, meta, acts in zip(sets, examples, example_meta, context_acts, strict=True):
        with clock(s.name):
            shown: list[tuple[int, np.ndarray, np.ndarray]] = []
            for (u, g), m, a in zip(exs, meta, acts, strict=True):
                t = g % T
                lo = max(0, t - cfg.before)
                ids = windows[g // T, lo:lo + len(a)]
                measured = lo + np.arange(len(a)) >= skip
                shown.append((u, ids[measured], a[measured]))
                context_rows.append({"set": s.name, **m, "center": t - lo, "tokens": ids.astype(np.int32),
                                     "acts": a.astype(np.float16)})
            tables.append(fit_token_tables(s.n_units, shown, model.config.vocab_size))
            shown_by_set.append(shown)
    held, pools = _held_out_pass(model, sets, val_windows, val_labels, tables, maxima, cfg, progress, clock)

    measured_explain = labels[:, skip:].reshape(-1, labels.shape[-1])
    base_explain = torch.as_tensor(measured_explain.mean(0), dtype=torch.float64)
    n_explain = len(measured_explain)
    scored_by_set = [(st.fired.numpy() >= cfg.min_firings) & (h["fired"].numpy() >= cfg.min_heldout_firings)
                     for st, h in zip(stats, held, strict=True)]
    explainer = explain.make_explainer(cfg.explainer, tokenizer.token_strings, n_tokens=cfg.explanation_tokens,
                                       predict_fraction=cfg.predict_fraction)
    log(f"analyze: explaining and scoring {sum(int(x.sum()) for x in scored_by_set):,} units with {explainer.name}"
        f" ({sum(int((h['fired'] < cfg.min_heldout_firings).sum()) for h in held):,} fire on fewer than "
        f"{cfg.min_heldout_firings} held-out tokens: too rare to score)")
    scores = []
    for s, shown, pool, scored in zip(sets, shown_by_set, pools, scored_by_set, strict=True):
        with clock(s.name):
            scores.append(explain.explain_and_score(explainer, shown, pool, scored, val_windows, skip, progress,
                                                    s.name))
    if hasattr(explainer.simulate, "failures") and explainer.simulate.failures:
        log(f"analyze: {explainer.simulate.failures:,} simulations could not be read (predicted as zeros)")

    unit_rows, token_rows, logit_rows, hist_rows = [], [], [], []
    for s, st, h, mx, iv, scored_s, sc in zip(sets, stats, held, maxima, intervals, scored_by_set, scores,
                                             strict=True):
        with clock(s.name):
            corr = pearson(h).numpy()
            maxima_s = mx.numpy()
            first_share = first_position_share(st.best_v, st.best_i, iv.first, cfg.top_contexts, T, skip)
            heldout_fired = h["fired"].numpy().astype(np.int64)
            # best family: the largest share of the unit's mass on the explanation text, among families with a
            # lift of at least 2 there (a unit is not "about" whitespace because whitespace is everywhere)
            share_e = (st.family_mass / st.total.clamp_min(1e-12)[:, None]).numpy()
            lift_e = share_e / np.maximum(base_explain.numpy(), 1e-12)
            choice = np.where(lift_e >= 2, share_e, -1.0)
            best = choice.argmax(1)
            has_family = choice.max(1) > 0
            # a share of a non-negative mass: in [0, 1] but for float32 rounding of the family sums
            share_v = np.clip((h["family_mass"] / h["a"].clamp_min(1e-12)[:, None]).numpy(), 0.0, 1.0)
            base_v = (h["family_tokens"] / h["n"]).numpy()
            hist = st.hist.numpy()
            q = _quantiles(hist, (0.5, 0.9, 0.99))
            up_v, up_i, down_v, down_i = logit_extremes(model, s.directions, st.polarity, cfg.logit_tokens)
            polarity, other = st.polarity.numpy(), st.other.numpy()
            absolute = st.total.numpy() + other  # the unit's |a| mass on the explanation text
            fired_e = st.fired.numpy()
            for u in range(s.n_units):
                fam = FAMILY_NAMES[best[u]] if has_family[u] else ""
                scored = bool(scored_s[u])
                sv = float(share_v[u, best[u]]) if has_family[u] else float("nan")
                bv_ = float(base_v[best[u]]) if has_family[u] else float("nan")
                unit_rows.append({
                    "set": s.name, "unit": u, "density": fired_e[u] / n_explain,
                    "density_val": float(h["fired"][u] / h["n"]), "mean": float(st.total[u] / n_explain),
                    "max": float(maxima_s[u]),
                    "q50": q[u, 0], "q90": q[u, 1], "q99": q[u, 2], "scored": bool(scored),
                    "explain_corr": float(corr[u]) if scored else float("nan"),
                    "family": fam, "family_share": sv if scored else float("nan"),
                    "family_base": bv_, "family_lift": sv / bv_ if scored and bv_ > 0 else float("nan"),
                    "polarity": int(polarity[u]),
                    "other_sign_share": float(other[u] / absolute[u]) if absolute[u] > 0 else 0.0,
                    "heldout_firings": int(heldout_fired[u]),
                    "too_rare": bool(heldout_fired[u] < cfg.min_heldout_firings),
                    **sc.get(u, explain.UNSCORED), "first_pos_top_share": float(first_share[u])})
                for j, (v, i) in enumerate(zip(up_v[u].tolist(), up_i[u].tolist(), strict=True)):
                    logit_rows.append({"set": s.name, "unit": u, "sign": 1, "rank": j, "token": i, "effect": v})
                for j, (v, i) in enumerate(zip(down_v[u].tolist(), down_i[u].tolist(), strict=True)):
                    logit_rows.append({"set": s.name, "unit": u, "sign": -1, "rank": j, "token": i, "effect": -v})
            hist_rows.append(pd.DataFrame({"set": s.name, "unit": np.arange(s.n_units),
                                           "counts": list(hist.astype(np.int32))}))
            frame = _top_tokens_frame(s.name, st, cfg.top_tokens)
            if len(frame):
                token_rows.append(frame)
    neighbour_rows = []
    for s in sets:
        with clock(s.name):
            if s.name == "neurons":
                continue  # the standard basis: every pair is orthogonal
            d = torch.nn.functional.normalize(s.directions.float() * s.polarity[:, None], dim=1)
            cos = d @ d.t()
            cos.fill_diagonal_(-2.0)
            v, i = cos.topk(min(cfg.neighbours, s.n_units - 1), dim=1)
            neighbour_rows.append(pd.DataFrame({
                "set": s.name, "unit": np.repeat(np.arange(s.n_units), v.shape[1]),
                "rank": np.tile(np.arange(v.shape[1]), s.n_units), "other": i.reshape(-1).numpy(),
                "cosine": v.reshape(-1).numpy()}))
    units_df = pd.DataFrame(unit_rows)
    contexts_df = pd.DataFrame(context_rows)
    top_tokens_df = pd.concat(token_rows, ignore_index=True) if token_rows else pd.DataFrame()
    logits_df = pd.DataFrame(logit_rows)
    used = set(top_tokens_df["token"].tolist() if len(top_tokens_df) else [])
    used |= set(logits_df["token"].tolist())
    if explainer.name == explain.TOKEN_TABLE:  # an explanation's tokens, so that the browser can show them
        for text in units_df["explanation"]:
            used |= set(explain.parse_token_table(text)[0].tolist())
    for ids in contexts_df.get("tokens", []):
        used |= set(ids.tolist())
    used_ids = np.array(sorted(used), dtype=np.int64)
    special = (used_ids == getattr(tokenizer, "eot_id", EOT_ID)) | (used_ids >= getattr(tokenizer, "n_vocab", N_VOCAB))
    real = tokenizer.token_bytes(used_ids[~special])
    pieces = [b""] * len(used_ids)
    for j, piece in zip(np.flatnonzero(~special), real, strict=True):
        pieces[j] = piece
    # bytes too, so that the browser shows any model's tokens without its tokenizer
    vocab = pd.DataFrame({"token": used_ids, "text": tokenizer.token_strings(used_ids), "bytes": pieces,
                          "special": special | np.array([not p for p in pieces], dtype=bool)})
    families = pd.DataFrame({"family": list(FAMILY_NAMES), "description": [FAMILIES[f] for f in FAMILY_NAMES],
                             "token_share_explain": base_explain.numpy(),
                             "token_share_val": (held[0]["family_tokens"] / held[0]["n"]).numpy()})
    # E|h|^2 of the MLP's activations on held-out text (the neurons' sum of squares): the scale an L1
    # coefficient is relative to
    mean_sq = {s.name: float(h["raw_aa"].sum() / val_windows.size) for s, h in zip(sets, held, strict=True)
               if s.name == "neurons"}  # every position: what an SAE trains on
    return {"mlp_mean_sq_norm": mean_sq.get("neurons"), "explainer": explainer.name,
            "units": units_df, "contexts": contexts_df, "top_tokens": top_tokens_df, "logits": logits_df,
            "histograms": pd.concat(hist_rows, ignore_index=True), "vocab": vocab, "families": families,
            "neighbours": pd.concat(neighbour_rows, ignore_index=True) if neighbour_rows else pd.DataFrame(
                columns=["set", "unit", "rank", "other", "cosine"]),
            "tokens": {"explain": n_explain, "held_out": int(held[0]["n"]) if held else 0},
            # for per-family curves (:mod:`monosemantic.family_curves`): the sets with their polarities, and each
            # unit's explanation-text share of activation mass per family and firings there
            "oriented_sets": sets,
            "family_share_explain": {s.name: (st.family_mass / st.total.clamp_min(1e-12)[:, None]).numpy()
                                     for s, st in zip(sets, stats, strict=True)},
            "fired_explain": {s.name: st.fired.numpy() for s, st in zip(sets, stats, strict=True)},
            "held_out_labels": val_labels}  # (W, T, F) family labels of the held-out windows


def _quantiles(hist: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """(n, len(qs)) quantiles of each unit's non-zero activations from its log-binned histogram (bin
    geometric centres; NaN for a unit that never fired)."""
    edges = _HIST_EDGES.copy()
    edges[0] = 1e-3 / 10 ** 0.1
    centres = np.sqrt(edges[:-1] * edges[1:])
    cum = np.cumsum(hist, axis=1)
    total = cum[:, -1:]
    out = np.full((hist.shape[0], len(qs)), np.nan)
    for j, q in enumerate(qs):
        idx = (cum < q * np.maximum(total, 1)).sum(1)
        out[:, j] = np.where(total[:, 0] > 0, centres[np.minimum(idx, len(centres) - 1)], np.nan)
    return out


# --- feature splitting ------------------------------------------------------------------------------

def split_table(decoders: dict[int, Tensor]) -> Any:
    """For each dictionary size but the smallest, each feature's nearest feature (decoder cosine) in the
    next smaller dictionary: rows (width, feature, parent_width, parent, cosine)."""
    import pandas as pd

    widths = sorted(decoders)
    rows = []
    for small, large in zip(widths, widths[1:], strict=False):
        a = torch.nn.functional.normalize(decoders[small].float(), dim=1)
        b = torch.nn.functional.normalize(decoders[large].float(), dim=1)
        cos = b @ a.t()  # (large, small)
        v, i = cos.max(1)
        rows.append(pd.DataFrame({"width": large, "feature": np.arange(len(b)), "parent_width": small,
                                  "parent": i.numpy(), "cosine": v.numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["width", "feature", "parent_width", "parent", "cosine"])


def token_profiles(model, sets: list[UnitSet], tokens: np.ndarray, n_tokens: int, top: int = 5,
                   batch_windows: int = 64, progress: bool = True, skip_first_positions: int = 1) -> Any:
    """The ``top`` tokens of each unit by activation mass over ``n_tokens`` of ``tokens`` (no dashboards):
    rows (set, unit, rank, token, mass, count, share), plus each unit's density as rank -1 rows' ``share``."""
    import pandas as pd

    cfg = AnalysisConfig(explain_tokens=n_tokens, batch_windows=batch_windows,
                         skip_first_positions=skip_first_positions)
    windows, _ = spread_windows(tokens, model.config.context_length, n_tokens)
    labels = np.zeros((*windows.shape, len(FAMILY_NAMES)), dtype=bool)  # families are not needed here
    stats = _first_pass(model, sets, windows, labels, cfg, progress)
    frames = []
    for s, st in zip(sets, stats, strict=True):
        frames.append(_top_tokens_frame(s.name, st, top))
        measured = len(windows) * (windows.shape[1] - cfg.skip_first_positions)
        dens = pd.DataFrame({"set": s.name, "unit": np.arange(s.n_units), "token": -1, "mass": st.total.numpy(),
                             "count": st.fired.numpy(), "rank": -1, "share": st.fired.numpy() / measured})
        frames.append(dens)
    return pd.concat(frames, ignore_index=True)
