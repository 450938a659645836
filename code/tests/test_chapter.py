"""The book's chapter helpers that read evaluations and seed runs (monosemantic.chapter)."""

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from monosemantic import chapter


def test_eval_set_reads_the_split_from_metrics_or_config():
    val = SimpleNamespace(metrics={"eval_tokens": 131_072, "n_documents": 170}, config={"split": "val", "seq_len": 0})
    es = chapter.eval_set(val, 128)
    assert es == chapter.EvalSet("val", 131_072, 1024, 128, 170)
    assert chapter.describe_eval_set(es) == ("131,072 tokens of the corpus's val split (1,024 windows of 128 "
                                             "predicted tokens, from 170 documents)")
    held = SimpleNamespace(metrics={"split": "heldout", "eval_tokens": 8192 * 127, "n_documents": 5000},
                           config={"split": "heldout", "seq_len": 0})
    assert chapter.eval_set(held, 128) == chapter.EvalSet("heldout", 8192 * 127, 8192, 127, 5000)


def test_seed_runs_and_spread():
    names = ["anchor", "topk-seed2", "topk", "topk-seed10", "topk-seed1", "neurons-top8", "topk-seedx"]
    assert chapter.seed_runs(names, "topk") == ["topk", "topk-seed1", "topk-seed2", "topk-seed10"]
    assert chapter.seed_runs(names, "anchor-fixed") == []
    assert chapter.seed_spread([0.03, 0.01, 0.02]) == "0.020 (0.010–0.030)"
    assert chapter.seed_spread([0.5], "{:.1f}") == "0.5 (one seed)"
    assert chapter.seed_spread_pct([0.991, 0.993]) == "99.2% (99.1–99.3)"


def test_the_relu_unit_set_is_named_for_the_run_the_analysis_measured():
    from monosemantic import chapter

    assert chapter.unit_sets({})["anchor"] == "anchor-fixed features"  # an analysis from before the record
    assert chapter.unit_sets({"anchor_set_recipe": "anchor"})["anchor"] == "literal-recipe features"
    assert chapter.unit_sets({"anchor_set_recipe": "anchor-fixed"})["topk"] == "TopK features"


def test_span_says_a_range_once_and_sorts_by_value():
    assert chapter.span(["12%", "12%"]) == "12%"
    assert chapter.span(["9%", "12%", "10%"]) == "9% to 12%"  # by value, not as strings
    assert chapter.span(["0.50", "0.49"]) == "0.49 to 0.50"
    assert chapter.span([]) == "—"


def test_direct_comparison_matches_both_ways_and_calls_a_clear_lead_better():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    dens = 10 ** rng.uniform(-4, -1, 400)
    rows = []
    for name, corr in (("a", 0.9), ("b", 0.1), ("c", 0.1)):  # a clears 0.5 everywhere, b and c nowhere
        rows.append(pd.DataFrame({"set": name, "unit": range(400), "scored": True, "density_val": dens,
                                  "sim_corr": corr, "detection": 0.5, "family_share": 0.0, "family_lift": 0.0}))
    units = pd.concat(rows, ignore_index=True)
    fa = SimpleNamespace(config={"corr_threshold": 0.5, "detection_threshold": 0.8, "specificity_threshold": 0.5,
                                 "lift_threshold": 5, "density_bin_width": 0.5, "n_boot": 200, "seed": 0})
    out = chapter.direct_comparison(fa, units, "a", "b", ("sim_corr", "detection"))
    assert out["sim_corr"]["verdict"] == "better"
    assert out["sim_corr"]["at_b"].matched == 1.0 and out["sim_corr"]["at_a"].matched == 1.0
    assert out["detection"]["verdict"] == "mixed" and out["detection"]["at_b"].matched == 0.0
    assert chapter.direct_comparison(fa, units, "b", "a", ("sim_corr",))["sim_corr"]["verdict"] == "worse"
    assert chapter.direct_comparison(fa, units, "b", "c", ("sim_corr",))["sim_corr"]["verdict"] == "mixed"


def test_seed_matches_split_seed_pairs_from_the_null_and_drop_features_that_never_fired(tmp_path):
    import pandas as pd

    rows = [{"run": a, "other": b, "feature": f, "cosine": 0.5, "density": 0.0 if f == 0 else 0.01}
            for a, b in (("topk", "topk-seed1"), ("topk-seed1", "topk"), ("topk", "random-model"),
                         ("random-model", "topk"), ("anchor-fixed", "anchor-fixed-seed1")) for f in range(4)]
    pd.DataFrame(rows).to_parquet(tmp_path / "universality.parquet")
    sm = chapter.seed_matches(SimpleNamespace(file=lambda rel: tmp_path / rel))
    assert sm.width == 4 and len(sm.all) == 15 and (sm.all.feature > 0).all()
    assert set(zip(sm.seeds.run, sm.seeds.other, strict=True)) == {("topk", "topk-seed1"), ("topk-seed1", "topk"),
                                                                   ("anchor-fixed", "anchor-fixed-seed1")}
    # one recipe's seeds alone: a statistic "over the TopK recipe's seeds" must not mix in another recipe's
    assert set(zip(sm.of("topk").run, sm.of("topk").other, strict=True)) == {("topk", "topk-seed1"),
                                                                             ("topk-seed1", "topk")}
    assert len(sm.of("anchor-fixed")) == 3 and sm.of("anchor").empty
    assert len(sm.null) == 6 and ((sm.null.run == "random-model") | (sm.null.other == "random-model")).all()


def test_signed_numbers_use_a_true_minus_and_no_sign_on_zero():
    assert [chapter.signed(v) for v in (6.2, -3.4, -0.3, 0.2)] == ["+6", "−3", "0", "0"]
    assert chapter.signed(-0.052, "{:+.2f}") == "−0.05"
    # a bound that would print as 0 gets one decimal, so the interval shows which side of zero it is on
    assert chapter.signed_interval(0.044, 0.001, 0.089) == "+4.4 [+0.1, +8.9]"
    assert chapter.signed_interval(-0.04, -0.10, 0.02) == "−4 [−10, +2]"
    assert chapter.signed_interval(0.5046, 0.4699, 0.5374) == "+50 [+47, +54]"


def test_a_score_counts_for_the_features_only_when_every_control_agrees(tmp_path):
    import numpy as np
    import pandas as pd

    def units_of(name, n, passing):  # n scored units at one density, the first `passing` clear sim_corr 0.5
        return pd.DataFrame({"set": name, "unit": np.arange(n), "scored": True, "density_val": 0.01,
                             "sim_corr": np.where(np.arange(n) < passing, 0.95, 0.1), "detection": 0.5,
                             "family_share": 0.0, "family_lift": 0.0})

    def artifact(topk_pass, random_model_pass, random_fraction):
        units = pd.concat([units_of("neurons", 100, 20), units_of("topk", 100, topk_pass),
                           units_of("random-model", 100, random_model_pass)], ignore_index=True)
        bins = pd.DataFrame([{"set": s, "bin": "all", **{f"{sc}_fraction{end}": f + d for sc in
                                                          ("specificity", "sim_corr", "detection")
                                                          for end, d in (("", 0), ("_low", -0.02), ("_high", 0.02))}}
                             for s, f in (("topk", topk_pass / 100), ("random", random_fraction))])
        bins.to_parquet(tmp_path / "density_bins.parquet")
        cfg = {"corr_threshold": 0.5, "detection_threshold": 0.8, "specificity_threshold": 0.5, "lift_threshold": 5,
               "density_bin_width": 0.5, "n_boot": 200, "seed": 0}
        return SimpleNamespace(file=lambda name: tmp_path / name, config=cfg), units

    fa, units = artifact(topk_pass=90, random_model_pass=10, random_fraction=0.05)
    v = chapter.verdicts(fa, units, scores=("sim_corr",))["sim_corr"]
    assert v.vs_neurons.matched == pytest.approx(0.7) and v.vs_random == "above" and v.counts
    # the same features, but the random model's SAE passes as often: the score does not count for them
    fa, units = artifact(topk_pass=90, random_model_pass=95, random_fraction=0.05)
    assert not chapter.verdicts(fa, units, scores=("sim_corr",))["sim_corr"].counts


def test_holm_multiplies_the_smallest_p_by_the_number_of_tests_and_steps_down():
    assert chapter.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert chapter.holm([0.5, 0.9]).tolist() == pytest.approx([1.0, 1.0])  # capped at 1, and monotone


def test_the_mean_rank_test_knows_uniform_ranks_from_ranks_that_lead():
    import numpy as np

    mean, p = chapter.mean_rank_test(np.tile(np.arange(1, 102), 3), 100)  # exactly uniform on 1..101
    assert mean == pytest.approx(51) and p == pytest.approx(1.0)
    mean, p = chapter.mean_rank_test(np.ones(30), 100)  # 30 features first among 101: far from chance
    assert mean == 1 and p < 1e-10


def test_the_rank_tests_cover_each_cell_and_measure_and_leave_undefined_ranks_out():
    import pandas as pd

    cfg = {"clamp_multiple": 5.0}
    rows = []
    for f in range(10):
        for key in chapter.causal_cells(cfg):
            mode, mult, where, frozen = key
            rows.append({"feature": f, "direction": "feature", "mode": mode, "multiple": mult, "where": where,
                         "frozen_scale": frozen, "n_random": 100 if mult in (0.0, 5.0) and not frozen else 20,
                         "family_rank": 1, "predicted_rank": 0 if f < 4 else 11,
                         "own_rank": 101 if mode == "ablate" else 51})
    table = pd.DataFrame(rows)
    tests = chapter.causal_rank_tests(table, cfg)
    assert len(tests) == 6 * 3
    main = ("clamp", 5.0, "all", False)
    assert tests[(main, "family")].mean == 1 and tests[(main, "family")].p_holm < 1e-6
    assert tests[(main, "predicted")].features == 6  # four predicted nothing
    assert tests[(("clamp", 1.0, "all", False), "predicted")].chance == 11  # 20 random directions in that cell
    assert tests[(main, "own")].p == pytest.approx(1.0)
    assert all(t.p_holm >= t.p for t in tests.values())
    # the ends: every feature first on the family tokens; ablated, every feature last on its own tokens, a result
    # the mean rank also sees; a split, half first and half last, which it does not
    assert (tests[(main, "family")].first, tests[(main, "family")].last) == (10, 0)
    ablate = ("ablate", 0.0, "firing", False)
    assert tests[(ablate, "own")].last == 10 and tests[(ablate, "own")].p_ends_holm < 1e-6
    split = table.assign(family_rank=[1 if f % 2 else 101 for f in table.feature])
    t = chapter.causal_rank_tests(split, cfg, cells=[main])[(main, "family")]
    assert t.mean == pytest.approx(51) and t.p == pytest.approx(1.0) and t.p_ends < 1e-10
    # among other features' decoder directions, from the _dec columns and the decoder count
    dec = table.assign(n_decoder=20, family_rank_dec=21, predicted_rank_dec=1, own_rank_dec=11, self_rank_dec=1)
    d = chapter.causal_rank_tests(dec, cfg, control="decoder", cells=[main], measures=("predicted", "self"))
    assert set(d) == {(main, "predicted"), (main, "self")} and d[(main, "self")].chance == 11
    assert d[(main, "predicted")].first == 10
    # the table the chapter shows: both, adjusted as one family (26 tests: 18 among random, 8 among decoders)
    r_all, d_all = chapter.causal_rank_table(dec, cfg)
    assert len(r_all) == 18 and set(d_all) == {(k, m) for k in (main, ablate) for m in ("family", "predicted",
                                                                                          "own", "self")}
    assert all(r_all[k].p_holm >= tests[k].p_holm for k in r_all)  # more tests in the family: never smaller


def _cell_rows(rows):
    import pandas as pd

    base = {"mode": "clamp", "multiple": 5.0, "where": "all", "frozen_scale": False, "n_random": 100}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_a_feature_is_compared_with_each_fitted_control_by_a_sign_test_the_way_its_edit_should_go():
    rows = []
    for f, (feat, md) in enumerate([(2.0, 1.0), (3.0, 1.0), (0.5, 1.0), (1.0, 1.0), (4.0, None)]):
        rows.append({"feature": f, "direction": "feature", "predicted_logodds": feat, "kl": 1.0})
        if md is not None:  # feature 4 has no fitted control (no best neuron, say)
            # the control moves the whole distribution 16 times as much: per square root of KL it falls behind
            rows.append({"feature": f, "direction": "mean_difference", "predicted_logodds": md, "kl": 16.0})
    t = chapter.causal_fitted(_cell_rows(rows), ("clamp", 5.0, "all", False), "predicted", "mean_difference")
    assert (t.features, t.wins) == (4, 2)  # a tie (feature 3) is neither a win nor a loss
    assert t.p == pytest.approx(1.0) and t.control_median == 1.0 and t.feature_median == pytest.approx(1.5)
    assert t.wins_per_kl == 4 and (t.feature_kl, t.control_kl) == (1.0, 16.0)  # 0.5 / 1 beats 1 / 4
    # ablated, the edit should lower the tokens: the lower value wins
    abl = _cell_rows(rows).assign(mode="ablate", multiple=0.0, where="firing")
    t = chapter.causal_fitted(abl, ("ablate", 0.0, "firing", False), "predicted", "mean_difference")
    assert t.wins == 1
    # another cell's rows are not read
    assert chapter.causal_fitted(abl, ("clamp", 5.0, "all", False), "predicted", "mean_difference").features == 0


def test_the_family_test_averages_sibling_features_before_counting_families():
    rows = [{"feature": i, "family": fam, "direction": "feature", "predicted_rank": r}
            for i, (fam, r) in enumerate([("greek", 1), ("greek", 1), ("greek", 1), ("code", 90), ("code", 2),
                                          ("legal", 80), ("html", 0)])]  # html: undefined rank, left out
    t = chapter.causal_family_test(_cell_rows(rows), ("clamp", 5.0, "all", False), "predicted")
    # greek (mean 1) ahead, code (mean 46 < 51) ahead, legal (80) behind
    assert t == (3, 2, 1, pytest.approx(1.0))


def test_the_main_causal_cells_are_the_5x_clamp_everywhere_and_the_ablation_where_the_feature_fires():
    import pandas as pd

    ct = pd.DataFrame({"mode": ["clamp", "clamp", "clamp", "ablate", "ablate"], "multiple": [5.0, 1.0, 5.0, 0.0, 0.0],
                       "where": ["all", "all", "firing", "firing", "firing"],
                       "frozen_scale": [False, False, False, False, True], "feature": [1, 1, 1, 1, 1]})
    main = chapter.causal_main(ct, {"clamp_multiple": 5.0})
    assert main[["mode", "multiple", "where"]].values.tolist() == [["clamp", 5.0, "all"], ["ablate", 0.0, "firing"]]
    assert len(chapter.causal_main(ct, {"clamp_multiple": 1.0})) == 2  # the 1x clamp is then the main one
    old = ct[["mode", "feature"]]  # a table made before version 8: all of it
    assert chapter.causal_main(old).equals(old)
    sampled = pd.DataFrame({"protocol": ["clamp", "pinned"], "direction": ["feature", "feature"]})
    assert chapter.causal_main(sampled)["protocol"].tolist() == ["clamp"]


def test_counts_are_written_as_prose():
    assert chapter.count_words(1, "cell") == "one cell"
    assert chapter.count_words(0, "feature") == "no features"
    assert chapter.count_words(2, "cell") == "two cells"
    assert chapter.count_words(1234, "token") == "1,234 tokens"


def test_pct_keeps_small_shares_visible():
    assert chapter.pct(0.25) == "25%" and chapter.pct(0.0039) == "0.4%" and chapter.pct(0.00039) == "0.04%"
    assert chapter.pct(0.1234, 1) == "12.3%" and chapter.pct(float("nan")) == "—"
    assert chapter.pct(3.2e-6, significant=2) == "0.00032%" and chapter.pct(0.059, significant=2) == "5.9%"


def test_holm_over_two_tables_of_rank_tests_is_one_adjustment():
    t = chapter.RankTest(10, 3.0, 6.0, 0.01, 0.01, 2, 0, 0.02, 0.02)
    a, b = {"x": t, "y": t._replace(p=0.04, p_ends=0.5)}, {"z": t._replace(p=0.03, p_ends=0.01)}
    ja, jb = chapter.holm_jointly(a, b)
    assert ja["x"].p_holm == pytest.approx(0.03) and jb["z"].p_holm == pytest.approx(0.06)  # 3 x 0.01, 2 x 0.03
    assert ja["y"].p_holm == pytest.approx(0.06) and jb["z"].p_ends_holm == pytest.approx(0.03)
    assert ja["x"].mean == 3.0 and set(ja) == {"x", "y"} and set(jb) == {"z"}


def test_resampling_checks_read_each_check_from_the_logged_interval_holding_it():
    import pandas as pd

    from monosemantic import chapter

    class Art:  # a literal-recipe artifact: 3,500 steps, a check after steps 1,001, 2,001 and 3,001
        config = {"anchor": {"resample_every": 1000, "n_steps": 3500, "n_features": 100}}

    curve = pd.DataFrame({"step": range(100, 3600, 100), "resampled": 0})
    curve.loc[curve.step == 1100, "resampled"] = 10  # the interval (1000, 1100] holds the check after step 1,001
    curve.loc[curve.step == 3100, "resampled"] = 40
    steps, shares = chapter.resampling_checks(Art(), curve)
    assert steps.tolist() == [1001, 2001, 3001] and shares.tolist() == [0.1, 0.0, 0.4]


def test_and_join_and_loglog_crossing():
    assert chapter.and_join(["2"]) == "2" and chapter.and_join(["2", "5"]) == "2 and 5"
    assert chapter.and_join(["2", "5", "6"]) == "2, 5 and 6" and chapter.and_join([]) == ""
    # y = x^2 through (1, 1) and (10, 100): 25 is reached at 5; outside the two points, no answer
    assert chapter.loglog_crossing(1, 1, 10, 100, 25) == pytest.approx(5.0)
    assert chapter.loglog_crossing(1, 100, 10, 1, 4) == pytest.approx(5.0)  # decreasing: y = 100 / x^2
    assert chapter.loglog_crossing(1, 1, 10, 100, 400) is None


def test_anchor_scale_on_runs_that_are_one_power_law():
    """Two literal runs whose MSE grows as c^2 x 0.5 FVU x variance and whose L0 and L1 term follow powers of the
    input factor c: the crossings land where the anchor's numbers put them, and the bounds follow the formulas."""
    import numpy as np
    import pandas as pd

    var = 0.01  # per coordinate, in our units

    class Run:
        def __init__(self, c, fvu, l0, l1, dead):
            self.metrics = {"input_scale": c, "train_mse_end": c ** 2 * var * fvu, "train_l1_term_end": l1,
                            "l0": l0}
            steps = np.arange(100, 100_100, 100)
            self.curve = pd.DataFrame({"step": steps, "mse": c ** 2 * var * fvu, "fvu": fvu, "resampled": 0})
            # every check (after steps 1,001, 2,001, ...) sits in the interval ending at 1,100, 2,100, ...
            self.curve.loc[self.curve.step % 1000 == 100, "resampled"] = int(dead * 100)
            self.config = {"anchor": {"resample_every": 1000, "n_steps": 100_000, "n_features": 100}}

        def file(self, name):
            path = Path(tempfile.mkdtemp()) / name
            self.curve.to_parquet(path)
            return path

    u, s = Run(1.0, 0.8, 2.0, 0.001, 0.6), Run(8.0, 0.2, 32.0, 0.1, 0.1)
    anchor = {"sae_mse": 16 * var * 0.4, "sae_l1": 0.01, "sae_l0_mean": 8.0, "sae_dead_per_check": [0.3] * 94}
    est = chapter.anchor_scale(u, s, anchor)
    assert est.lower == pytest.approx(np.sqrt(16 * 0.4))  # FVU < 1: c >= sqrt(MSE / var)
    assert est.upper == pytest.approx(np.sqrt(16 * 0.4 / 0.2))  # the rescaled run's FVU giving the anchor's MSE
    assert est.crossings["L0"] == pytest.approx(4 ** 0.75)  # L0 = 2 c^(4/3): 8 at c = 4^(3/4)
    # the L1 term: 0.001 c^(log 100 / log 8), 0.01 at c = 8^(1/2)
    assert est.crossings["L1 term"] == pytest.approx(np.sqrt(8.0))
    # the late dead share: 0.6 c^(-log 6 / log 8), half of 0.6 at c = 8^(log 2 / log 6)
    assert est.crossings["late dead share"] == pytest.approx(8 ** (np.log(2) / np.log(6)))
    assert est.crossings["MSE"] is not None and est.upper > est.crossings["MSE"]


def test_sci_prints_powers_of_ten_as_prose():
    assert chapter.sci(9.5e-4) == "9.5 × 10⁻⁴" and chapter.sci(1.2e-14) == "1.2 × 10⁻¹⁴"
    assert chapter.sci(-8.351e-06, 3) == "−8.35 × 10⁻⁶" and chapter.sci(2.5e7) == "2.5 × 10⁷"
    assert chapter.sci(0.031) == "0.031" and chapter.sci(0.0) == "0" and chapter.sci(float("nan")) == "—"
    assert chapter.sci(1234.5, 3) == "1,234" and chapter.sci(2.5) == "2.5" and chapter.sci(-12.0, 3) == "−12.0"


def test_seed_words_name_every_difference_besides_the_seed():
    same = {"differs": False, "cpu": "AMD EPYC", "cpu0": "AMD EPYC", "commit": "abc1234", "commit0": "abc1234"}
    assert chapter.seed_precision_words(same, 3) == "the other seeds differ from seed 0 in the seed alone"
    moved = {**same, "cpu": "Intel Xeon", "commit": "def5678"}
    words = chapter.seed_precision_words(moved, 3)
    assert "seeds 1–2" in words and "Intel Xeon against AMD EPYC" in words and "def5678 against abc1234" in words
    assert "not the seed's alone" in words


def test_the_analysis_precision_is_the_pinned_one_else_what_the_machine_chose():
    pinned = SimpleNamespace(manifest={"info": {"lm_forward_dtype": "float32: whatever the machine"},
                                       "hardware": {"cpu_bf16": "avx512_bf16"}})
    older_bf16 = SimpleNamespace(manifest={"hardware": {"compute_dtype": {"lm": {"dtype": "bfloat16"}}}})
    older_avx2 = SimpleNamespace(manifest={"hardware": {"cpu_flags": ["avx2"]}})
    assert [chapter.analysis_dtype(a) for a in (pinned, older_bf16, older_avx2)] == ["float32", "bfloat16",
                                                                                      "float32"]


def test_keyed_sampling_is_read_from_the_manifest():
    keyed = SimpleNamespace(manifest={"info": {"interval_sampling": "keyed: splitmix64 of (seed, set, token, unit)"}})
    assert chapter.keyed_sampling(keyed) and not chapter.keyed_sampling(SimpleNamespace(manifest={}))
