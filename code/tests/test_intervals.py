"""Intervals with known answers: the bootstrap of a mean, of a ratio, of clustered data; seed summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monosemantic.intervals import (
    IntervalError,
    bootstrap,
    group_sums,
    seed_summary,
    window_documents,
)


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    # 2,000 groups of N(3, 2^2): the 95% interval of the mean is 3 +- 1.96 * 2 / sqrt(2000) = +- 0.0877
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, 2000)
    ci = bootstrap({"x": x, "n": np.ones_like(x)}, lambda s: s["x"] / s["n"], n_boot=2000, seed=0)
    assert ci.value == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.1)
    assert ci.low < x.mean() < ci.high
    assert ci.n_groups == 2000 and ci.n_boot == 2000


def test_the_interval_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        x = rng.exponential(1.0, 200)  # skewed, true mean 1
        ci = bootstrap({"x": x, "n": np.ones_like(x)}, lambda s: s["x"] / s["n"], n_boot=400, seed=trial)
        covered += ci.low <= 1.0 <= ci.high
    assert 0.88 <= covered / 200 <= 0.99  # percentile intervals run a little narrow on skewed data


def test_a_ratio_of_sums_is_resampled_as_a_ratio():
    # FVU-like: residual / variance, both summed over documents of unequal length
    rng = np.random.default_rng(2)
    tokens = rng.integers(10, 500, 300).astype(float)
    var = tokens * 5.0
    resid = var * 0.2 + rng.normal(0, 1, 300) * np.sqrt(tokens)
    ci = bootstrap({"r": resid, "v": var}, lambda s: s["r"] / s["v"], n_boot=1000)
    assert ci.value == pytest.approx(resid.sum() / var.sum())
    assert ci.low < 0.2 < ci.high and ci.high - ci.low < 0.01


def test_documents_not_windows_are_resampled():
    # 50 documents of 40 identical windows each: as far as the data can tell there are 50 draws, not 2,000,
    # so the interval over documents must be as wide as that of 50 values, ~sqrt(40) times the naive one
    rng = np.random.default_rng(3)
    doc_values = rng.normal(0.0, 1.0, 50)
    windows = np.repeat(doc_values, 40)
    docs = np.repeat(np.arange(50), 40)
    sums, labels = group_sums({"x": windows, "n": np.ones_like(windows)}, docs)
    assert list(labels) == list(range(50)) and sums["n"].tolist() == [40.0] * 50
    by_doc = bootstrap(sums, lambda s: s["x"] / s["n"], n_boot=2000)
    naive = bootstrap({"x": windows, "n": np.ones_like(windows)}, lambda s: s["x"] / s["n"], n_boot=2000)
    assert (by_doc.high - by_doc.low) / (naive.high - naive.low) == pytest.approx(math.sqrt(40), rel=0.15)
    assert by_doc.value == pytest.approx(naive.value)


def test_vector_statistics_such_as_a_dead_fraction():
    # fires per document for 4 features: feature 3 fires in one document only, so in some replicates it is dead
    fires = np.zeros((100, 4))
    fires[:, 0] = 5
    fires[::2, 1] = 1
    fires[7, 3] = 1
    ci = bootstrap({"f": fires}, lambda s: (s["f"] == 0).mean(-1), n_boot=1000, seed=0)
    assert ci.value == 0.25  # feature 2 never fires
    assert ci.low == 0.25 and ci.high == 0.5  # feature 3 is missed in ~37% of replicates


def test_seed_summary_known_answer():
    s = seed_summary([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == 1.0 and (s.min, s.max, s.n_seeds) == (1.0, 3.0, 3)
    # t(0.975, 2) = 4.3027: half width 4.3027 * 1 / sqrt(3)
    assert s.high - s.mean == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    one = seed_summary([0.5])
    assert one == (0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 1)


def test_window_documents_counts_end_of_text_tokens():
    eot = 9
    tokens = np.array([1, 2, eot, 3, 4, 5, eot, 6, 7, 8])
    assert window_documents(tokens, np.array([0, 1, 3, 6, 7]), eot).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: bootstrap({"x": np.ones(1)}, lambda s: s["x"]), "at least 2 groups"),
    (lambda: bootstrap({"x": np.ones(3), "y": np.ones(4)}, lambda s: s["x"]), "row counts"),
    (lambda: seed_summary([1.0, float("nan")]), "finite"),
    (lambda: group_sums({"x": np.ones(3)}, np.zeros(4)), "one group per item"),
    (lambda: window_documents(np.ones(5), np.array([7]), 0), "window starts"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(IntervalError, match=message):
        call()
