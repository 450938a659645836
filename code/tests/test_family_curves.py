"""Per-family specificity and sensitivity curves on synthetic units with known answers."""

from __future__ import annotations

import numpy as np
import torch

from monosemantic import family_curves as fc


def _setup(seed: int = 0, W: int = 40, T: int = 16):
    """Family 0 marks ~20% of tokens; unit 0 fires (value 1) exactly on them; unit 1 fires on every second
    family token only, at value 0.5; unit 2 fires at random on 30% of tokens, whatever they are."""
    g = np.random.default_rng(seed)
    fam = g.random((W, T)) < 0.2
    labels = np.stack([fam, ~fam], axis=-1).astype(np.float32)  # (W, T, 2): the family and its complement
    a = np.zeros((W * T, 3), dtype=np.float32)
    flat = fam.reshape(-1)
    a[flat, 0] = 1.0
    idx = np.flatnonzero(flat)
    a[idx[::2], 1] = 0.5
    a[g.random(W * T) < 0.3, 2] = 1.0
    return torch.from_numpy(a), labels, fam


def _counts(a, labels, pairs, skip=0, T=16):
    W = labels.shape[0]
    counts = fc.CurveCounts(pairs, torch.ones(3), W)
    fc.measure([(0, torch.zeros(W * T, 1))], [lambda h: a], [counts], labels, T, skip)
    return counts


def test_a_perfect_detector_a_half_detector_and_a_random_unit():
    a, labels, fam = _setup()
    counts = _counts(a, labels, [(0, 0), (0, 1), (0, 2)])
    curves, summary = fc.tables(counts, ["s", "s", "s"], ["fam", "rest"], fam.size, labels.sum((0, 1)),
                                min_family_tokens=10, n_boot=200)
    s = summary.set_index("unit")
    assert s.loc[0, "sensitivity"] == 1.0 and s.loc[0, "specificity"] == 1.0  # fires exactly on the family
    n_fam = int(fam.sum())
    assert s.loc[1, "sensitivity"] == (n_fam + 1) // 2 / n_fam and s.loc[1, "specificity"] == 1.0
    assert s.loc[1, "sensitivity_low"] < s.loc[1, "sensitivity"] < s.loc[1, "sensitivity_high"]
    # a unit blind to the family: its specificity is the base rate, within its interval
    assert abs(s.loc[2, "specificity"] - fam.mean()) < 0.06
    assert s.loc[2, "specificity_low"] <= fam.mean() <= s.loc[2, "specificity_high"]
    assert (summary.base_rate == fam.mean()).all() and summary.enough.all()
    # the levels: unit 0 fires at its max (level 9: (0.9, 1]), unit 1 at half its max (level 4: (0.4, 0.5])
    c0 = curves[curves.unit == 0].set_index("level")
    assert c0.loc[9, "tokens"] == n_fam and c0.tokens.sum() == n_fam and c0.loc[9, "specificity"] == 1.0
    c1 = curves[curves.unit == 1].set_index("level")
    assert c1.loc[4, "tokens"] == (n_fam + 1) // 2 and c1.tokens.sum() == c1.loc[4, "tokens"]


def test_skipped_positions_and_activations_above_the_max():
    a, labels, fam = _setup(seed=1)
    counts = _counts(a * 2.0, labels, [(0, 0)], skip=1)  # twice the explanation max: the top bin
    curves, summary = fc.tables(counts, ["s"], ["fam", "rest"], fam[:, 1:].size, labels[:, 1:].sum((0, 1)),
                                n_boot=100)
    measured_fam = int(fam[:, 1:].sum())
    assert summary.loc[0, "firings"] == measured_fam  # position 0 of every window does not count
    top = curves.set_index("level").loc[fc.LEVELS]
    assert top.level_low == 1.0 and np.isinf(top.level_high) and top.tokens == measured_fam


def test_units_are_chosen_on_the_explanation_text_and_need_enough_firings():
    share = np.array([[0.9, 0.1], [0.95, 0.05], [0.2, 0.8]])
    fired = np.array([100, 3, 100])
    assert fc.choose_units(share, fired, min_firings=10).tolist() == [0, 2]  # unit 1 is too rare
    assert fc.choose_units(share, np.zeros(3), min_firings=10).tolist() == [-1, -1]
