"""Specificity and sensitivity of single units, one family at a time: Bricken et al.'s Arabic and base64 plots.

Bricken et al. (2023, "Towards Monosemanticity") judge a feature against a detector of its concept that is
defined without the feature: for the Arabic feature, a token is Arabic when its characters are in the Arabic
Unicode block. Two curves then say how far the feature *is* that detector:

- **specificity** at activation level a: P(family | the unit's activation is in level a), the share of the
  held-out tokens at that level that the detector marks (their "Arabic feature" plot: nearly all of the
  high-activation tokens are Arabic, and some of the low ones are not);
- **sensitivity**: P(the unit fires | a family token), the share of the family's held-out tokens on which the
  unit is active at all (a unit can be perfectly specific and cover a tenth of its family).

Here the detectors are :data:`monosemantic.analysis.FAMILIES` (Unicode blocks, LaTeX markup, code punctuation,
URLs, digits, ...). For each family, the unit of each set compared (neurons and the TopK SAE's features by
default) is *chosen on the explanation text* (the largest share of its activation mass in that family there,
among units firing on at least ``min_firings`` explanation tokens) and *measured on held-out text*, so a curve
is not selected on what it shows. Levels are fractions of the unit's largest activation on the explanation
text: ``LEVELS`` equal bins of (0, 1] and one bin above 1. Every count is per held-out window, so sensitivity
and overall specificity get 95% bootstrap intervals over windows (:mod:`monosemantic.intervals`). A family is
claimed about only when the held-out text has at least ``min_family_tokens`` of its tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import intervals

LEVELS = 10
"""Equal-width activation bins of (0, max]; an eleventh holds activations above the explanation text's max."""


def level_edges(levels: int = LEVELS) -> np.ndarray:
    """(levels + 2,) edges of the activation bins as fractions of a unit's max: 0, 1/levels, ..., 1, inf."""
    return np.concatenate([np.linspace(0.0, 1.0, levels + 1), [np.inf]])


def choose_units(share_explain: np.ndarray, fired_explain: np.ndarray, min_firings: int) -> np.ndarray:
    """(F,) per family, the unit (index) with the largest share of its explanation-text activation mass in that
    family, among units that fired on at least ``min_firings`` explanation tokens; -1 where none did.
    ``share_explain`` (n_units, F): each unit's mass share per family; ``fired_explain`` (n_units,)."""
    share = np.where((fired_explain >= min_firings)[:, None], share_explain, -1.0)  # (n, F)
    best = share.argmax(0)
    return np.where(share.max(0) > 0, best, -1)


class CurveCounts:
    """Per chosen (family, unit): counts per held-out window of tokens at each activation level, and of those
    in the family; of the family's tokens; of the family's tokens on which the unit fires."""

    def __init__(self, pairs: Sequence[tuple[int, int]], maxima: Tensor, n_windows: int, levels: int = LEVELS):
        self.pairs = list(pairs)  # (family index, unit index)
        self.units = torch.as_tensor([u for _, u in self.pairs], dtype=torch.long)
        self.families = torch.as_tensor([f for f, _ in self.pairs], dtype=torch.long)
        self.maxima = maxima[self.units].clamp_min(1e-12) if len(self.pairs) else torch.zeros(0)
        self.edges = torch.as_tensor(level_edges(levels)[1:-1], dtype=torch.float32)  # inner edges, for bucketize
        n_bins, P = levels + 1, len(self.pairs)
        self.at_level = np.zeros((n_windows, P, n_bins), dtype=np.int64)
        self.family_at_level = np.zeros((n_windows, P, n_bins), dtype=np.int64)
        self.family_tokens = np.zeros((n_windows, P), dtype=np.int64)
        self.family_fired = np.zeros((n_windows, P), dtype=np.int64)

    def add(self, a: Tensor, labels: Tensor, first_window: int, T: int, measured: Tensor) -> None:
        """``a`` (B*T, n_units) non-negative activations of B windows starting at ``first_window``, ``labels``
        (B*T, F) 0/1 family labels, ``measured`` (B*T,) bool: positions that count."""
        if not self.pairs:
            return
        B = a.shape[0] // T
        x = a[:, self.units] / self.maxima  # (B*T, P): activation as a fraction of the unit's max
        fam = labels[:, self.families] > 0  # (B*T, P)
        on = (x > 0) & measured[:, None]
        fam = fam & measured[:, None]
        level = torch.bucketize(x, self.edges, right=False)  # 0..levels: (0, 1/L] -> 0, ..., > 1 -> levels
        window = (torch.arange(a.shape[0]) // T)[:, None].expand_as(x)  # (B*T, P)
        col = torch.arange(len(self.pairs))[None, :].expand_as(x)
        n_bins = self.at_level.shape[2]
        flat = (window * len(self.pairs) + col) * n_bins + level  # index into (B, P, n_bins)
        size = B * len(self.pairs) * n_bins
        both = torch.bincount(flat[on], minlength=size).view(B, len(self.pairs), n_bins)
        fam_on = torch.bincount(flat[on & fam], minlength=size).view(B, len(self.pairs), n_bins)
        w = slice(first_window, first_window + B)
        self.at_level[w] += both.numpy()
        self.family_at_level[w] += fam_on.numpy()
        self.family_tokens[w] += fam.view(B, T, -1).sum(1).numpy()
        self.family_fired[w] += (fam & on).view(B, T, -1).sum(1).numpy()


def tables(counts: CurveCounts, sets_of_pairs: Sequence[str], family_names: Sequence[str], measured_tokens: int,
           family_tokens_total: np.ndarray, groups: np.ndarray | None = None, min_family_tokens: int = 1000,
           n_boot: int = 1000, seed: int = 0) -> tuple[Any, Any]:
    """``(curves, summary)`` pandas tables from the counts.

    curves: one row per (family, set, unit, level): ``level_low``, ``level_high`` (fractions of the unit's max;
    inf for the top bin), ``tokens`` at that level, ``family_tokens`` of them, ``specificity`` = their ratio.
    summary: one row per (family, set, unit): held-out ``family_tokens`` and ``base_rate`` (the family's share
    of measured tokens), the unit's ``firings``, ``sensitivity`` = P(fires | family token) and
    ``specificity`` = P(family | fires) with 95% bootstrap intervals over ``groups`` (documents, or windows
    when None), and ``enough``: the family has at least ``min_family_tokens`` held-out tokens."""
    import pandas as pd

    edges = level_edges(counts.at_level.shape[2] - 1)
    n_windows = counts.at_level.shape[0]
    groups = np.arange(n_windows) if groups is None else np.asarray(groups)
    curve_rows, rows = [], []
    for p, ((f, u), set_name) in enumerate(zip(counts.pairs, sets_of_pairs, strict=True)):
        at, fam_at = counts.at_level[:, p].sum(0), counts.family_at_level[:, p].sum(0)
        for j in range(len(at)):
            curve_rows.append({"family": family_names[f], "set": set_name, "unit": u, "level": j,
                               "level_low": edges[j], "level_high": edges[j + 1], "tokens": int(at[j]),
                               "family_tokens": int(fam_at[j]),
                               "specificity": fam_at[j] / at[j] if at[j] else float("nan")})
        per_window = {"fired": counts.at_level[:, p].sum(1), "fired_family": counts.family_at_level[:, p].sum(1),
                      "family": counts.family_tokens[:, p], "family_fired": counts.family_fired[:, p]}
        sums, _ = intervals.group_sums(per_window, groups)
        ratio = _ratio_interval(sums, "family_fired", "family", n_boot, seed)
        spec = _ratio_interval(sums, "fired_family", "fired", n_boot, seed)
        rows.append({"family": family_names[f], "set": set_name, "unit": u,
                     "family_tokens": int(family_tokens_total[f]),
                     "base_rate": float(family_tokens_total[f] / max(measured_tokens, 1)),
                     "firings": int(per_window["fired"].sum()),
                     "sensitivity": ratio.value, "sensitivity_low": ratio.low, "sensitivity_high": ratio.high,
                     "specificity": spec.value, "specificity_low": spec.low, "specificity_high": spec.high,
                     "enough": bool(family_tokens_total[f] >= min_family_tokens)})
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


def _ratio_interval(sums: dict[str, np.ndarray], num: str, den: str, n_boot: int, seed: int) -> intervals.Interval:
    """sum(num) / sum(den) with its bootstrap interval; NaN (no interval) when the denominator is 0."""
    if sums[den].sum() <= 0:
        return intervals.Interval(float("nan"), float("nan"), float("nan"), len(sums[den]), 0)
    return intervals.bootstrap({k: sums[k] for k in (num, den)},
                               lambda s: s[num] / np.maximum(s[den], 1e-300), n_boot=n_boot, seed=seed)


def measure(batches: Iterable[tuple[int, Tensor]], encoders: Sequence[Callable[[Tensor], Tensor]],
            counts: Sequence[CurveCounts], labels: np.ndarray, T: int, skip: int,
            timers: Sequence[Callable[[], contextlib.AbstractContextManager[Any]]] | None = None) -> None:
    """Stream held-out activations into ``counts``: ``batches`` yields (first window, (B*T, d) MLP activations)
    as :func:`monosemantic.analysis.mlp_batches` does; ``encoders[i]`` maps them to set i's non-negative
    (oriented) unit activations; ``labels`` (W, T, F) the family labels of the windows; the first ``skip``
    positions of each window do not count; ``timers[i]()`` (optional) times set i's work."""
    for b, h in batches:
        B = h.shape[0] // T
        lab = torch.as_tensor(labels[b:b + B].reshape(B * T, -1), dtype=torch.float32)
        measured = torch.arange(B * T) % T >= skip
        for i, (encode, c) in enumerate(zip(encoders, counts, strict=True)):
            if c.pairs:
                with torch.no_grad(), (timers[i]() if timers else contextlib.nullcontext()):
                    c.add(encode(h), lab, b, T, measured)
