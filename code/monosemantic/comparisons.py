"""Comparing kinds of unit (neurons, SAE features, controls) by their scores, so that sparsity alone does not win.

A unit passes a score at a threshold (:func:`passes`); pass fractions and median scores are compared between kinds
of unit within bins of held-out density (:func:`density_bins`), and a difference from the neurons is averaged over
those bins with the neurons' distribution as weights (:func:`matched_differences`), so that a set of sparser units
does not win by sparsity alone. Intervals are 95% percentile bootstraps over units (a fraction's by binomial draws,
which is what resampling its units amounts to). The scores themselves (specificity from the family tables,
simulation and detection from :mod:`monosemantic.explain`) are columns of the analysis's ``units.parquet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

SCORES = ("specificity", "sim_corr", "detection", "explain_corr")
SCORE_VALUES = {"specificity": "family_share", "sim_corr": "sim_corr", "detection": "detection",
                "explain_corr": "explain_corr"}  # the per-unit number each score thresholds


def passes(units, score: str, cfg) -> np.ndarray:
    """(len(units),) bool: scored units that pass ``score`` (one of :data:`SCORES`): a specificity of at least
    ``specificity_threshold`` with a lift of ``lift_threshold``; a correlation (``sim_corr``, the mixed-context
    simulation; ``explain_corr``, the all-token one) of ``corr_threshold``; a detection balanced accuracy of
    ``detection_threshold``."""
    def col(name: str) -> np.ndarray:
        return units[name].to_numpy(dtype=np.float64) if name in units else np.full(len(units), np.nan)

    if score == "specificity":
        ok = (col("family_share") >= cfg.specificity_threshold) & (col("family_lift") >= cfg.lift_threshold)
    elif score in ("sim_corr", "explain_corr"):
        ok = col(score) >= cfg.corr_threshold
    elif score == "detection":
        ok = col("detection") >= cfg.detection_threshold
    else:
        raise ValueError(f"unknown score {score!r}; one of {', '.join(SCORES)}")
    return ok & units["scored"].to_numpy(dtype=bool)


def interpretable_fraction(units, score: str, cfg) -> float:
    """Share of the scored units of a set that pass ``score`` (:func:`passes`); NaN when none is scored."""
    scored = units["scored"].to_numpy(dtype=bool)
    return float(passes(units, score, cfg)[scored].mean()) if scored.any() else float("nan")


def density_bin(density: np.ndarray, width: float) -> np.ndarray:
    """Each unit's held-out density bin k: log10(density) in (k width, (k + 1) width] (bins of ``width``
    decades, closed above so that a unit firing on every token is in the bin below 10^0; NaN for a unit
    that never fired)."""
    d = np.asarray(density, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(d > 0, np.ceil(np.log10(np.where(d > 0, d, 1.0)) / width) - 1, np.nan)


def _fraction_interval(hits: np.ndarray, n: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, ...) bootstrap replicates of fractions ``hits / n`` (arrays of counts): resampling ``n`` units
    with replacement from a group with ``hits`` passing draws Binomial(n, hits / n) passing, so a unit
    bootstrap of a fraction needs no resampled indices. NaN where ``n`` is 0."""
    n = np.asarray(n, dtype=np.int64)
    p = np.where(n > 0, np.asarray(hits) / np.maximum(n, 1), 0.0)
    draws = rng.binomial(np.broadcast_to(n, (n_boot, *n.shape)), np.broadcast_to(p, (n_boot, *n.shape)))
    return np.where(n > 0, draws / np.maximum(n, 1), np.nan)


def _percentiles(reps: np.ndarray) -> tuple[float, float]:
    from .intervals import LEVEL

    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return float("nan"), float("nan")
    low, high = np.quantile(reps, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def _median_interval(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """The median of ``values`` and its percentile bootstrap interval (units resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan"), float("nan")
    reps = np.concatenate([np.median(v[rng.integers(0, len(v), (min(100, n_boot - i), len(v)))], axis=1)
                           for i in range(0, n_boot, 100)])  # 100 replicates at a time: bounded memory
    return (float(np.median(v)), *_percentiles(reps))


def density_bins(units, cfg, scores: Sequence[str] = SCORES) -> Any:
    """Per set and held-out density bin (``density_bin_width`` decades of ``density_val``, log10 in
    (low, high]: :func:`density_bin`; bin ``all``: every unit of the set), the units, scored units and units
    too rare to score, and for each score the fraction of scored units that pass it and the median of its
    number over them, each with a 95% bootstrap interval over the bin's units: columns ``<score>_fraction``,
    ``<score>_fraction_low``, ``_high``, ``<score>_median``, ``<score>_median_low``, ``_high``."""
    import pandas as pd

    rng = np.random.default_rng(cfg.seed)
    w = cfg.density_bin_width
    rows = []
    for set_name, part in units.groupby("set", sort=False):
        bins = density_bin(part["density_val"].to_numpy(), w)
        groups = [("all", float("nan"), float("nan"), np.ones(len(part), dtype=bool))]
        groups += [(f"10^{k * w:g}..10^{(k + 1) * w:g}", k * w, (k + 1) * w, bins == k)
                   for k in np.unique(bins[np.isfinite(bins)])]
        ok = {score: passes(part, score, cfg) for score in scores}
        scored_all = part["scored"].to_numpy(dtype=bool)
        for label, lo, hi, m in groups:
            scored = scored_all & m
            row: dict[str, Any] = {"set": set_name, "bin": label, "log10_low": lo, "log10_high": hi,
                                   "units": int(m.sum()), "scored": int(scored.sum()),
                                   "too_rare": int(part["too_rare"].to_numpy(dtype=bool)[m].sum())
                                   if "too_rare" in part else 0}
            for score in scores:
                hits, n = int(ok[score][scored].sum()), int(scored.sum())
                reps = _fraction_interval(np.array(hits), np.array(n), cfg.n_boot, rng)
                row[f"{score}_fraction"] = hits / n if n else float("nan")
                row[f"{score}_fraction_low"], row[f"{score}_fraction_high"] = _percentiles(reps)
                values = part[SCORE_VALUES[score]].to_numpy(dtype=np.float64)[scored] \
                    if SCORE_VALUES[score] in part else np.zeros(0)
                (row[f"{score}_median"], row[f"{score}_median_low"],
                 row[f"{score}_median_high"]) = _median_interval(values, cfg.n_boot, rng)
            rows.append(row)
    return pd.DataFrame(rows)


class Matched(NamedTuple):
    """A difference of pass fractions, set - baseline: raw, and density-matched (module docstring)."""

    raw: float
    raw_low: float
    raw_high: float
    matched: float  # sum over bins of w_b (f_set(b) - f_base(b)) / sum of w_b, over the bins both have
    matched_low: float
    matched_high: float
    coverage: float  # the baseline's weight in those bins (1: every baseline unit's bin is matched)
    bins: int


def matched_difference(density: np.ndarray, ok: np.ndarray, base_density: np.ndarray, base_ok: np.ndarray,
                       width: float, n_boot: int = 1000, seed: int = 0, *, min_units: int = 1,
                       weight_density: np.ndarray | None = None) -> Matched:
    """The fraction passing among units of density ``density`` (n,) passing ``ok`` (n,) minus that of the
    baseline's units, raw and averaged over density bins weighted by the baseline's distribution over them
    (w_b: the share of baseline units in bin b; of the units of ``weight_density`` instead, when given), each
    with a percentile bootstrap interval (units resampled within each set and bin; the weights fixed). A bin
    is compared only where both sets have at least ``min_units`` units in it (a bin of one unit has a
    bootstrap of zero width); ``coverage`` is the weight of the bins compared."""
    rng = np.random.default_rng(seed)
    b_a, b_b = density_bin(density, width), density_bin(base_density, width)
    ok, base_ok = np.asarray(ok, dtype=bool), np.asarray(base_ok, dtype=bool)
    a_in, b_in = np.isfinite(b_a), np.isfinite(b_b)
    nan = float("nan")
    if not a_in.any() or not b_in.any():
        return Matched(nan, nan, nan, nan, nan, nan, 0.0, 0)
    raw = ok[a_in].mean() - base_ok[b_in].mean()
    raw_reps = (_fraction_interval(np.array(ok[a_in].sum()), np.array(a_in.sum()), n_boot, rng)
                - _fraction_interval(np.array(base_ok[b_in].sum()), np.array(b_in.sum()), n_boot, rng))
    bins = np.unique(np.concatenate([b_a[a_in], b_b[b_in]]))
    n_a = np.array([(b_a == k).sum() for k in bins])
    h_a = np.array([ok[b_a == k].sum() for k in bins])
    n_b = np.array([(b_b == k).sum() for k in bins])
    h_b = np.array([base_ok[b_b == k].sum() for k in bins])
    both = (n_a >= max(min_units, 1)) & (n_b >= max(min_units, 1))
    if weight_density is None:
        weights = n_b / n_b.sum()
    else:
        b_w = density_bin(np.asarray(weight_density), width)
        n_w = np.array([(b_w == k).sum() for k in bins])
        weights = n_w / max(int(np.isfinite(b_w).sum()), 1)
    if not both.any() or weights[both].sum() == 0:
        return Matched(float(raw), *_percentiles(raw_reps), nan, nan, nan, 0.0, 0)
    w = weights[both] / weights[both].sum()
    matched = float((w * (h_a[both] / n_a[both] - h_b[both] / n_b[both])).sum())
    reps = (_fraction_interval(h_a[both], n_a[both], n_boot, rng)
            - _fraction_interval(h_b[both], n_b[both], n_boot, rng)) @ w  # (n_boot,)
    return Matched(float(raw), *_percentiles(raw_reps), matched, *_percentiles(reps),
                   float(weights[both].sum()), int(both.sum()))


MIN_BIN_UNITS = 20
"""A density bin is compared only where both sets have this many scored units in it: a bin of one or a few
units has a bootstrap interval of no width, which would make a matched difference look exact."""


def matched_differences(units, cfg, baseline: str = "neurons", scores: Sequence[str] = SCORES,
                        min_units: int = MIN_BIN_UNITS) -> Any:
    """:func:`matched_difference` of every set against ``baseline`` by every score, over scored units: rows
    (set, baseline, score, raw, raw_low, raw_high, matched, matched_low, matched_high, coverage, bins); bins
    with fewer than ``min_units`` units of either set left out."""
    import pandas as pd

    rows = []
    base = units[(units["set"] == baseline) & units["scored"]]
    for set_name in units["set"].unique():
        if set_name == baseline or not len(base):
            continue
        part = units[(units["set"] == set_name) & units["scored"]]
        for i, score in enumerate(scores):
            m = matched_difference(part["density_val"].to_numpy(), passes(part, score, cfg),
                                   base["density_val"].to_numpy(), passes(base, score, cfg),
                                   cfg.density_bin_width, cfg.n_boot, cfg.seed + i, min_units=min_units)
            rows.append({"set": set_name, "baseline": baseline, "score": score, **m._asdict()})
    return pd.DataFrame(rows, columns=["set", "baseline", "score", *Matched._fields])
