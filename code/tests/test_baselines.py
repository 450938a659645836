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


def test_dead_by_check_known_answers():
    # never firing: always dead; firing everywhere: never; p = 1/2 over 3 inputs: missed 1/8 of the time
    assert baselines.dead_by_check(np.array([0.0, 1.0]), 10) == pytest.approx(0.5)
    assert baselines.dead_by_check(np.array([0.5]), 3) == pytest.approx(0.125)
    # the anchor's check: 11 batches of 896 inputs; a feature at density 1/n is missed ~1/e of the time
    n = anchors.WARD["sae_dead_check_inputs"] // anchors.WARD["sae_batch_size"] * anchors.WARD["sae_batch_size"]
    assert n == 9856
    assert baselines.dead_by_check(np.array([1 / n]), n) == pytest.approx(np.exp(-1), abs=1e-4)
    assert baselines.dead_by_check(np.array([0.3, 0.0]), 0) == 1.0  # no inputs: nothing is seen firing
    with pytest.raises(ValueError):
        baselines.dead_by_check(np.array([0.1]), -1)


def test_chapter_percentages_keep_small_shares():
    from monosemantic import chapter

    assert chapter.pct(0.0039) == "0.4%" and chapter.pct(0.00049) == "0.05%"
    assert chapter.pct(0.0) == "0%" and chapter.pct(0.318) == "32%" and chapter.pct(0.05) == "5%"
    assert chapter.pct(0.99527, 2) == "99.53%"
    assert chapter.interval(0.5, 0.4, 0.6, "{:.1f}") == "0.5 [0.4, 0.6]"
    assert chapter.interval(0.5, float("nan"), 0.6, "{:.1f}") == "0.5"
    assert chapter.interval_pct(0.99321, 0.9921, 0.9945, 2) == "99.32% [99.21, 99.45]"


def test_bricken_facts_have_sources():
    assert set(anchors.BRICKEN_SOURCES) <= set(anchors.BRICKEN)
    assert set(anchors.WARD_SOURCES) <= set(anchors.WARD)
    b = anchors.BRICKEN
    assert b["logit_test_features"] > b["logit_test_neurons"] > b["logit_test_chance"]
    assert 0 < b["dead_a1"] < b["sae_n_features"]


def test_neuron_baselines_bracket_an_sae_by_measured_l0():
    import pandas as pd

    from monosemantic import chapter

    rows = [("topk", "l0", 24.0), ("neurons-top8", "l0", 8.0), ("neurons-top24", "l0", 21.2),
            ("neurons-top32", "l0", 25.3), ("topk", "fvu", 0.03), ("neurons-top32", "fvu", 0.025)]
    frame = pd.DataFrame([{"sae": s, "metric": m, "value": v, "low": v - 0.001, "high": v + 0.001}
                          for s, m, v in rows]).set_index(["sae", "metric"]).sort_index()
    assert [b[1] for b in chapter.neuron_baselines(frame)] == [8, 24, 32]
    lo, hi = chapter.bracket(frame, "topk")
    assert (lo[1], hi[1]) == (24, 32)  # top-24 keeps fewer than 24 on average: below the SAE's L0
    assert chapter.versus(chapter.heldout_value(frame, "topk", "fvu"),
                          chapter.heldout_value(frame, "neurons-top32", "fvu")) == "higher"
    assert chapter.versus((1.0, 0.9, 1.1), (1.05, 1.0, 1.2)) == "indistinguishable"


def test_a_neuron_code_beats_an_sae_at_equal_sparsity_only_when_level_and_ahead_on_both():
    import pandas as pd

    from monosemantic import chapter

    def frame(l0_32, ce_32, fvu_32):
        rows = [("topk", "l0", 24.0), ("topk", "ce_loss_recovered", 0.993), ("topk", "fvu", 0.028),
                ("neurons-top24", "l0", 20.5), ("neurons-top24", "ce_loss_recovered", 0.990),
                ("neurons-top24", "fvu", 0.046), ("neurons-top32", "l0", l0_32),
                ("neurons-top32", "ce_loss_recovered", ce_32), ("neurons-top32", "fvu", fvu_32)]
        return pd.DataFrame([{"sae": s, "metric": m, "value": v, "low": v - 0.0002, "high": v + 0.0002}
                             for s, m, v in rows]).set_index(["sae", "metric"]).sort_index()

    assert chapter.beaten_at_equal_sparsity(frame(24.1, 0.996, 0.020), "topk")[1] == 32
    assert chapter.beaten_at_equal_sparsity(frame(25.3, 0.996, 0.020), "topk") is None  # 5% denser: not level
    assert chapter.beaten_at_equal_sparsity(frame(24.1, 0.996, 0.030), "topk") is None  # more variance left
    assert chapter.beaten_at_equal_sparsity(frame(24.1, 0.9931, 0.020), "topk") is None  # loss within intervals


def test_seed_matches_finds_a_permuted_copy_and_random_stays_at_the_floor():
    gen = torch.Generator().manual_seed(3)
    a = baselines.random_unit_vectors(300, 64, gen)
    perm = torch.randperm(300, generator=gen)
    b = a[perm] * 2.5  # the same directions, reordered and rescaled
    c = baselines.random_unit_vectors(300, 64, gen)
    dens = {k: np.full(300, 0.01) for k in "abc"}
    t = baselines.seed_matches({"a": a, "b": b, "c": c}, dens, [("a", "b"), ("b", "a"), ("a", "c")])
    ab = t[(t.run == "a") & (t.other == "b")].sort_values("feature")
    assert np.allclose(ab.cosine, 1.0, atol=1e-5)
    assert (perm[ab.match.to_numpy()].numpy() == np.arange(300)).all()  # b[match[i]] is a[i]
    ba = t[(t.run == "b") & (t.other == "a")].sort_values("feature")
    assert (ba.match.to_numpy() == perm.numpy()).all()
    ac = t[(t.run == "a") & (t.other == "c")].cosine
    q50 = baselines.max_cosine_quantile(0.5, 64, 300)
    assert abs(float(np.median(ac)) - q50) < 0.03  # the exact random floor
    assert (ac < 0.9).all()


def test_seed_matches_leave_out_a_shared_start_and_measure_neurons_and_init():
    gen = torch.Generator().manual_seed(4)
    start = baselines.random_unit_vectors(200, 32, gen)
    other_start = baselines.random_unit_vectors(200, 32, gen)
    a = start.clone()
    a[:10] = torch.eye(32)[:10] * 3.0  # ten features moved onto neurons 0..9, the rest left at their start
    b = start + 0.01 * baselines.random_unit_vectors(200, 32, gen)  # another run from the same start
    c = baselines.random_unit_vectors(200, 32, gen)  # a run from another start
    dens = {k: np.full(200, 0.01) for k in "abc"}
    t = baselines.seed_matches({"a": a, "b": b, "c": c}, dens, [("a", "b"), ("a", "c")],
                               inits={"a": start, "b": start, "c": other_start})
    ab, ac = (t[t.other == k].sort_values("feature") for k in "bc")
    assert ab.same_start.all() and not ac.same_start.any()
    assert (ab.match.to_numpy() != np.arange(200)).all()  # the shared start is never a feature's match
    assert (ab.cosine < 0.9).all()  # with it left out, nothing near a copy remains
    assert np.allclose(ab.neuron_cosine.iloc[:10], 1.0) and (ab.neuron_cosine.iloc[10:] < 0.9).all()
    assert np.allclose(ab.init_cosine.iloc[10:], 1.0, atol=1e-5) and (ab.init_cosine.iloc[:10] < 0.9).all()
    assert t.init_cosine.notna().all()
    assert baselines.seed_matches({"a": a, "c": c}, dens, [("a", "c")]).init_cosine.isna().all()


def test_the_anchors_dead_shares_agree_with_its_peak():
    w = anchors.WARD
    checks = w["sae_dead_per_check"]
    assert len(checks) == 94 and all(0 < v < 1 for v in checks)
    assert max(checks) == w["sae_dead_peak"]
    assert (checks.index(max(checks)) + 1) * w["sae_resample_every"] == w["sae_dead_peak_step"]
