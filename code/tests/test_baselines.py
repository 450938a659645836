"""Known answers for the chance baselines (monosemantic.baselines) and the anchor's logged numbers."""

import numpy as np
import pytest
import torch

from monosemantic import anchors, baselines


def test_copies_of_orthonormal_parents_score_one():
    parents = torch.linalg.qr(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))[0].t()  # (32, 64)
    children = torch.cat([parents * 3.0, parents])  # copies (scale does not matter), each twice
    assert torch.allclose(baselines.nearest_parent_cosine(children, parents), torch.ones(64), atol=1e-6)


def test_orthogonal_children_score_zero_and_sign_counts():
    eye = torch.eye(8)
    assert torch.allclose(baselines.nearest_parent_cosine(eye[4:], eye[:4]), torch.zeros(4))
    # signed, as analysis.split_table: a child opposite to its only parent scores -1, not 1
    assert baselines.nearest_parent_cosine(-eye[:1], eye[:1]).item() == pytest.approx(-1.0)


def test_chunks_do_not_change_the_answer():
    g = torch.Generator().manual_seed(1)
    c, p = torch.randn(100, 16, generator=g), torch.randn(30, 16, generator=g)
    assert torch.allclose(baselines.nearest_parent_cosine(c, p, chunk=7), baselines.nearest_parent_cosine(c, p))


def test_exact_distribution_small_cases():
    # one parent: the cosine is symmetric about 0, so its median is 0
    assert baselines.max_cosine_quantile(0.5, 512, 1) == pytest.approx(0.0, abs=1e-12)
    # d = 3: the cosine is uniform on [-1, 1] (Archimedes), so the max of n has CDF ((t + 1) / 2)^n
    for n in (1, 4, 10):
        assert baselines.max_cosine_quantile(0.5, 3, n) == pytest.approx(2 * 0.5 ** (1 / n) - 1, abs=1e-9)
    assert baselines.cosine_cdf(0.0, 512) == pytest.approx(0.5)


def test_simulation_matches_exact_distribution():
    d, n_parents = 512, 1024
    sim = baselines.random_parent_cosines(d, 4000, n_parents, seed=0)
    assert np.median(sim) == pytest.approx(baselines.max_cosine_quantile(0.5, d, n_parents), abs=0.003)
    q90 = baselines.max_cosine_quantile(0.9, d, n_parents)
    assert (sim > q90).mean() == pytest.approx(0.1, abs=0.02)
    # seeded: same seed, same values
    assert np.array_equal(sim, baselines.random_parent_cosines(d, 4000, n_parents, seed=0))


def test_splitting_baseline_grows_with_the_parent_dictionary():
    table = baselines.splitting_baseline([(256, 128), (1024, 512)], d=512, max_children=1000)
    assert list(table.parent_width) == [128, 512]
    assert (table.median_exact.diff().dropna() > 0).all()  # more parents, a closer nearest one by chance
    assert ((table.median_sim - table.median_exact).abs() < 0.005).all()
    assert (table.q_exact > table.median_exact).all()


def test_anchor_logged_ce_recovered_matches_its_printout():
    w = anchors.WARD
    recovered = (w["ce_loss_zero"] - w["ce_loss_sae"]) / (w["ce_loss_zero"] - w["ce_loss_clean"])
    assert recovered == pytest.approx(w["ce_loss_recovered_printed"], abs=1e-12)  # neuron_resampling cell 32


def test_anchor_manual_ratings_match_their_figure():
    w = anchors.WARD
    neurons, features = w["ratings_manual_neurons"], w["ratings_manual_features"]
    assert len(neurons) + len(features) == w["ratings_manual_n"]  # "Manual Interpretability Scores (N = 100)"
    assert round(float(np.mean(neurons)), 2) == 2.19 and round(float(np.mean(features)), 2) == 4.08  # legend
    assert set(neurons) | set(features) <= {1, 2, 3, 4, 5}
