"""The book's chapter helpers that read evaluations and seed runs (monosemantic.chapter)."""

from types import SimpleNamespace

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
