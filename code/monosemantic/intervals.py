"""Uncertainty on every headline number: bootstrap intervals over held-out documents, and seed spreads.

Evaluation metrics are ratios of sums over tokens (FVU = sum of squared residuals / sum of squared
deviations; CE loss recovered = (L_zero - L_sae) / (L_zero - L_orig), each L a sum of token losses over the
token count). Tokens of one document are not independent draws, so the interval resamples whole documents
with replacement (a cluster bootstrap, Efron & Tibshirani 1993, section 6.7) and recomputes each ratio from
the resampled sums; the 95% interval is the 2.5th to 97.5th percentile of the replicates (the percentile
method). Seeds are summarised apart: the mean, the spread (min, max, standard deviation) and a t interval of
the mean, which says how much of a difference between two recipes a new seed could undo.

>>> sums = {"resid": r, "var": v}  # (n_groups,) per document
>>> bootstrap(sums, lambda s: s["resid"] / s["var"], n_boot=1000)
Interval(value=0.21, low=0.19, high=0.23, n_groups=412, n_boot=1000)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .config import UserError

LEVEL = 0.95


class IntervalError(UserError, ValueError):
    """Inputs an interval cannot be computed from; the message is one line."""


class Interval(NamedTuple):
    value: float  # the statistic on the data as they are
    low: float  # percentile bootstrap interval at ``LEVEL``
    high: float
    n_groups: int  # documents (or whatever was resampled)
    n_boot: int


class SeedSummary(NamedTuple):
    mean: float
    std: float  # sample standard deviation (ddof 1); 0 for one seed
    low: float  # t interval of the mean at ``LEVEL`` (the single value for one seed)
    high: float
    min: float
    max: float
    n_seeds: int


def group_sums(values: Mapping[str, np.ndarray], groups: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-item sums (e.g. per evaluation window) added up per group (e.g. per document).

    ``values[name]`` is (n_items,) or (n_items, ...); ``groups`` (n_items,) any labels. Returns the sums per
    group, (n_groups,) or (n_groups, ...), in the order of ``np.unique(groups)``, and those labels."""
    groups = np.asarray(groups)
    labels, index = np.unique(groups, return_inverse=True)
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        if len(v) != len(groups):
            raise IntervalError(f"{name} has {len(v)} items but groups has {len(groups)}; give one group per item")
        summed = np.zeros((len(labels), *v.shape[1:]))
        np.add.at(summed, index, v)
        out[name] = summed
    return out, labels


def bootstrap(sums: Mapping[str, np.ndarray], statistic: Callable[[Mapping[str, np.ndarray]], np.ndarray | float],
              *, n_boot: int = 1000, seed: int = 0, level: float = LEVEL) -> Interval:
    """Percentile interval of ``statistic`` when the groups (rows of every array in ``sums``) are resampled
    with replacement. ``statistic`` gets a dict of the summed arrays and must work on a leading replicate
    axis too: it is called once with the data's totals (shape ``(...)``) and once with all replicates'
    totals (shape ``(n_boot, ...)``), so write it with ``[..., i]``-style indexing and numpy ufuncs."""
    if not sums:
        raise IntervalError("no sums given")
    n = {len(v) for v in sums.values()}
    if len(n) != 1:
        raise IntervalError(f"every array needs one row per group; got row counts {sorted(n)}")
    (n_groups,) = n
    if n_groups < 2:
        raise IntervalError(f"a bootstrap needs at least 2 groups, got {n_groups}")
    if n_boot < 10 or not 0 < level < 1:
        raise IntervalError(f"n_boot must be >= 10 and level in (0, 1), got {n_boot} and {level}")
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}
    value = float(statistic({k: v.sum(0) for k, v in arrays.items()}))
    rng = np.random.default_rng(seed)
    # each replicate as counts of how often each group is drawn: totals are then one matrix product
    counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot).astype(np.float64)  # (B, G)
    totals = {k: np.tensordot(counts, v, axes=(1, 0)) for k, v in arrays.items()}  # (B, ...)
    reps = np.asarray(statistic(totals), dtype=np.float64).reshape(n_boot)
    reps = reps[np.isfinite(reps)]
    if len(reps) < n_boot // 2:
        return Interval(value, math.nan, math.nan, n_groups, n_boot)
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return Interval(value, float(low), float(high), n_groups, n_boot)


def seed_summary(values: Sequence[float], level: float = LEVEL) -> SeedSummary:
    """Mean over seeds with the spread and a Student-t interval of the mean (n - 1 degrees of freedom)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if len(v) == 0 or not np.isfinite(v).all():
        raise IntervalError(f"seed values must be finite numbers, got {list(values)!r}")
    mean = float(v.mean())
    if len(v) == 1:
        return SeedSummary(mean, 0.0, mean, mean, mean, mean, 1)
    from scipy import stats

    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(1 - (1 - level) / 2, len(v) - 1)) * std / math.sqrt(len(v))
    return SeedSummary(mean, std, mean - half, mean + half, float(v.min()), float(v.max()), len(v))


def window_documents(tokens: np.ndarray, starts: np.ndarray, eot_id: int) -> np.ndarray:
    """The document each window starts in: the number of end-of-text tokens before its first token.
    ``tokens`` the 1-D token stream (documents separated by ``eot_id``), ``starts`` (n_windows,) offsets."""
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() >= len(tokens)):
        raise IntervalError(f"window starts must lie in [0, {len(tokens)}), got {starts.min()}..{starts.max()}")
    eot_before = np.concatenate([[0], np.cumsum(np.asarray(tokens) == eot_id)])  # (T + 1,)
    return eot_before[starts]
