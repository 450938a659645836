"""Chapter 3's pipeline on the tiny profile: harvest to disk, train the recipes and sweeps, export to SAELens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from monosemantic import cli, harvest, metrics, profiles, sae_train, store
from monosemantic import sae as sae_mod
from monosemantic.data import TokenDataset
from monosemantic.harvest import HOOK, ArraySource, HarvestError, harvest_to_disk, open_rows
from monosemantic.lm import LMConfig, Transformer, load_pretrained


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_pipeline):
    """A cache with the tiny corpus, LM, harvest and every SAE of the tiny profile."""
    return tiny_pipeline("sae", tmp_path_factory.mktemp("sae_train") / "cache")


@pytest.fixture
def in_tiny_cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tiny_cache))
    return tiny_cache


def test_artifacts_carry_the_issue_metric_names_and_the_sweep_table(in_tiny_cache):
    import pandas as pd

    stage = profiles.get("tiny").sae
    for recipe in sae_train.RECIPES:  # anchor (literal), anchor-fixed, topk
        art = store.load("sae", "tiny", recipe, config=stage)
        names = set(metrics.METRIC_NAMES) | {"train_activations", "density_tokens", "resampled_total"}
        assert names <= set(art.metrics)
        assert art.metrics["n_features"] == 512 and art.metrics["train_activations"] > 0
        assert 0 <= art.metrics["dead_fraction"] <= art.metrics["ultralow_fraction"] <= 1
        curve = pd.read_parquet(art.file("training_curve.parquet"))
        assert curve["resampled"].sum() == art.metrics["resampled_total"]  # per interval, and in total
    assert store.load("sae", "tiny", "anchor").config["anchor"]["resample_rule"] == "anchor"
    sweep = store.load("sae", "tiny", "sweep", config=stage)

    table = pd.read_parquet(sweep.file("sweep.parquet"))
    names = [r.name for r in sae_train.plan(stage)]
    assert list(table["run"]) == names
    assert set(table["family"]) == {"main", "l1", "k", "width"}
    topk = table[table["architecture"] == "topk"]
    assert np.allclose(topk["l0"], topk["k"], atol=0.5)  # TopK fires exactly k (or fewer, if some are <= 0)
    curves = pd.read_parquet(sweep.file("training_curves.parquet"))
    assert set(curves["run"]) == set(names)


def test_the_random_model_control_is_the_topk_recipe_on_a_random_lm(in_tiny_cache):
    from monosemantic.analysis import random_lm

    stage = profiles.get("tiny").sae
    art = store.load("sae", "tiny", sae_train.RANDOM_MODEL, config=stage)
    topk = store.load("sae", "tiny", "topk", config=stage)
    assert art.metrics["model_seed"] == sae_train.RANDOM_MODEL_SEED
    assert art.metrics["train_activations"] == topk.metrics["train_activations"]  # the same length of training
    control, ours = sae_mod.load(art.path), sae_mod.load(topk.path)
    assert control.cfg.config_hash() == ours.cfg.config_hash()  # the same recipe ...
    assert not torch.equal(control.W_dec, ours.W_dec)  # ... on other activations
    assert json.loads(art.file(sae_mod.SAE_CFG_FILENAME).read_text())["metadata"]["model_name"].endswith("random-init")
    # the harvested rows are the random LM's: re-run the first window through it
    lm_art = store.load("lm", "tiny", "model")
    model = random_lm(LMConfig(**lm_art.config), sae_train.RANDOM_MODEL_SEED)
    rows = open_rows(sae_train._staging("tiny", f"{sae_train.RANDOM_MODEL}-harvest") / "train.f16",
                     model.config.d_mlp, stage.harvest.train_activations)
    ids, _ = next(harvest.random_windows(TokenDataset.open("tiny", "train").tokens, stage.harvest.seq_len,
                                         seed=stage.harvest.seed, batch=64))
    with torch.no_grad():
        first = model.run_with_cache(ids[:1], [HOOK])[HOOK].reshape(-1, model.config.d_mlp)
    stored = torch.from_numpy(np.asarray(rows[:len(first)], dtype=np.float32))
    assert torch.allclose(stored, first, atol=2e-2, rtol=1e-2)


def test_seeds_retrain_the_recipes_with_other_seeds_and_evaluate_measures_them(in_tiny_cache):
    import pandas as pd

    from monosemantic import evaluation

    stage = profiles.get("tiny").sae
    art = store.load("sae", "tiny", sae_train.SEEDS)
    table = pd.read_parquet(art.file("seeds.parquet"))
    cfg = sae_train.SeedsConfig()
    expected = sorted((r, s) for r in cfg.recipes for s in (0, *cfg.seeds))
    assert sorted(zip(table.recipe, table.seed, strict=True)) == expected
    own = store.load("sae", "tiny", "topk", config=stage).metrics["fvu"]
    assert table.set_index("run").loc["topk", "fvu"] == own  # seed 0 is the recipe's own artifact
    found = evaluation.seed_saes("tiny")
    assert sorted(found) == sorted(f"{r}-seed{s}" for r in cfg.recipes for s in cfg.seeds)
    seed1 = sae_mod.load(found["topk-seed1"][1])
    assert seed1.cfg.seed == 1 and seed1.cfg.replace(seed=0).config_hash() == stage.topk.config_hash()
    assert not torch.equal(seed1.W_dec, sae_mod.load(store.load("sae", "tiny", "topk").path).W_dec)
    assert "random-model" not in evaluation.committed_saes("tiny")  # it reads another model
    assert cli.main(["evaluate", "--profile", "tiny", "--sae", "topk-seed1", "--no-progress"]) == 0
    held = pd.read_parquet(store.load("sae", "tiny", "heldout").file("heldout.parquet"))
    assert "topk-seed1" in set(held.sae)


def test_evaluate_on_the_heldout_windows_of_every_source(in_tiny_cache):
    import pandas as pd

    from monosemantic import heldout
    from monosemantic.harvest import spread_rows

    assert cli.main(["heldout", "--profile", "tiny"]) == 0
    # 64 windows spread over the set (every source has some): the same code path as all of them, at an eighth
    # of the cost
    assert cli.main(["evaluate", "--profile", "tiny", "--sae", "topk", "--split", "heldout", "--max-windows", "64",
                     "--no-progress"]) == 0
    art = store.load("sae", "tiny", "heldout")
    held = heldout.load_windows("tiny")
    rows, T = spread_rows(len(held.windows), 64), held.windows.shape[1]
    assert len(rows) == 64 < len(held.windows)
    assert art.metrics["split"] == "heldout" and art.metrics["eval_tokens"] == len(rows) * (T - 1)
    assert "heldout/tiny-windows" in art.manifest["inputs"]
    table = pd.read_parquet(art.file("heldout.parquet")).set_index(["sae", "metric"])["value"]
    # the point estimate is the direct evaluation on those windows
    w = torch.from_numpy(held.windows[rows].astype(np.int64))
    model = load_pretrained("tiny").eval()
    direct = metrics.evaluate(model, sae_mod.load(store.load("sae", "tiny", "topk").path).eval(),
                              [(w[i:i + 16, :-1], w[i:i + 16, 1:]) for i in range(0, len(w), 16)])
    assert table[("topk", "fvu")] == pytest.approx(direct["fvu"], rel=1e-4)


def test_rerun_reuses_staged_runs_and_a_fresh_run_is_bit_identical(tiny_cache, tmp_path, monkeypatch):

    # a copy: the fresh run rewrites sae/tiny-topk (new timings, so a new content hash), which would
    # make every artifact made from it stale for the tests that run after this one
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(cache))
    before = store.load("sae", "tiny", "topk").file(sae_mod.SAE_WEIGHTS_FILENAME).read_bytes()
    assert cli.main(["train-sae", "--profile", "tiny", "--recipe", "topk", "--no-progress"]) == 0
    again = store.load("sae", "tiny", "topk").file(sae_mod.SAE_WEIGHTS_FILENAME).read_bytes()
    assert again == before
    assert cli.main(["train-sae", "--profile", "tiny", "--recipe", "topk", "--no-progress", "--fresh"]) == 0
    fresh = store.load("sae", "tiny", "topk").file(sae_mod.SAE_WEIGHTS_FILENAME).read_bytes()
    assert fresh == before  # same seed, same activations: the same SAE


def test_export_round_trips_and_the_saelens_formula_reproduces_our_encoder(in_tiny_cache, tmp_path):
    for recipe in ("anchor", "topk"):
        out = tmp_path / recipe
        assert cli.main(["export-sae", "--profile", "tiny", "--recipe", recipe, "--out", str(out)]) == 0
        cfg = json.loads((out / "cfg.json").read_text())
        assert {"d_in", "d_sae", "architecture", "dtype", "apply_b_dec_to_input", "normalize_activations"} <= set(cfg)
        assert cfg["metadata"]["hook_name"] == HOOK
        assert cfg["metadata"]["sae_lens_version"] >= "6"  # else SAELens 6 reads it as a pre-6 config, dropping these
        w = {k: v.float() for k, v in load_file(str(out / "sae_weights.safetensors")).items()}
        assert w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"]) and w["W_dec"].shape == (cfg["d_sae"], cfg["d_in"])
        ours = sae_mod.load(out)
        x = torch.randn(64, cfg["d_in"]).relu()
        # SAELens: hidden_pre = (x - b_dec) @ W_enc + b_enc (apply_b_dec_to_input); standard: ReLU;
        # topk: keep the k largest of hidden_pre, ReLU them; decode: f @ W_dec + b_dec
        pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        if cfg["architecture"] == "standard":
            f = pre.relu()
        else:
            assert cfg["architecture"] == "topk"
            vals, idx = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(x).recon, f @ w["W_dec"] + w["b_dec"], rtol=1e-4, atol=1e-4)
    assert cli.main(["export-sae", "--profile", "tiny", "--recipe", "topk", "--out", str(tmp_path / "topk")]) == 2


def test_training_without_a_harvest_is_one_line_naming_the_command(tmp_cache, capsys):
    assert cli.main(["train-sae", "--profile", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "monosemantic" in err


# --- harvesting to disk and the indexed source (no cache needed) -------------------------------------

def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(LMConfig(vocab_size=97, context_length=16, d_model=32, n_heads=4, d_mlp=64, compile=False,
                                dtype="float32")).eval()


def test_harvested_rows_are_the_models_activations_and_an_interrupted_harvest_resumes(tmp_path):
    model = _model()
    toks = np.random.default_rng(0).integers(0, 97, size=5000).astype(np.uint16)
    rows = harvest_to_disk(model, toks, 1000, tmp_path / "a.f16", seq_len=16, batch=8, progress=False)
    ids, _ = next(harvest.random_windows(toks, 16, seed=0, batch=8))
    expected = model.run_with_cache(ids, [HOOK])[HOOK].reshape(-1, 64)  # the first 128 rows
    np.testing.assert_allclose(rows[:128].astype(np.float32), expected.numpy(), rtol=1e-3, atol=1e-3)
    full = (tmp_path / "a.f16").read_bytes()
    with open(tmp_path / "b.f16", "wb") as f:  # an interrupted run: the first 3 batches of windows, then junk
        f.write(full[:3 * 128 * 64 * 2] + b"\x00" * 100)
    harvest_to_disk(model, toks, 1000, tmp_path / "b.f16", seq_len=16, batch=8, progress=False)
    assert (tmp_path / "b.f16").read_bytes() == full
    with pytest.raises(HarvestError, match="monosemantic harvest"):
        open_rows(tmp_path / "a.f16", d_in=64, n_rows=999)


def test_array_source_batches_are_a_function_of_the_step_and_each_epoch_is_a_permutation():
    rows = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    src = ArraySource(rows, batch_size=8, seed=3)
    first = [src.batch(s)[:, 0] for s in range(10)]  # 80 rows = 2 epochs
    epoch0 = torch.cat(first[:5]).sort().values
    assert torch.equal(epoch0, torch.arange(40, dtype=torch.float32))
    assert torch.equal(ArraySource(rows, 8, seed=3).batch(7), src.batch(7))  # pure in the step
    assert not torch.equal(torch.cat(first[:5]), torch.cat(first[5:]))  # a new shuffle each epoch
    odd = ArraySource(rows, batch_size=12, seed=0)  # batches straddle the epoch boundary
    assert torch.cat([odd.batch(s)[:, 0] for s in range(10)]).shape == (120,)
    with pytest.raises(HarvestError):
        ArraySource(rows[:4], batch_size=8)


def test_analyze_measures_neurons_and_both_saes_alike_and_tracks_splitting(in_tiny_cache, monkeypatch):
    import pandas as pd

    from monosemantic import hardware, lm

    # a machine where auto picks bf16: the analysis still runs the LM in float32, as on any other machine
    monkeypatch.setattr(hardware, "auto_dtype", lambda *a, **k: torch.bfloat16)
    seen, forward = [], lm.Transformer.forward
    monkeypatch.setattr(lm.Transformer, "forward", lambda self, *a, **k: (
        seen.append(self.arithmetic.compute_dtype(self.config)), forward(self, *a, **k))[1])
    assert cli.main(["analyze", "--profile", "tiny", "--no-progress"]) == 0
    assert seen and set(seen) == {torch.float32}
    art = store.load("analysis", "tiny", "features", config=profiles.get("tiny").analysis)
    m = art.metrics
    seconds = art.manifest["info"]["seconds"]  # where the time went: the forward passes and each set's own work
    assert {"lm forward", "labels", "neurons", "topk", "anchor", "random", "random-model: lm forward",
            "other"} <= set(seconds)
    assert sum(v for k, v in seconds.items() if k != "whole") == pytest.approx(seconds["whole"], abs=0.5)
    assert seconds["other"] > -0.5  # the parts do not overlap
    assert m["seconds_main_sae"] == pytest.approx(seconds["lm forward"] + seconds["labels"] + seconds["topk"],
                                                  abs=0.2)
    assert art.manifest["info"]["interval_sampling"].startswith("keyed")
    assert art.manifest["info"]["lm_forward_dtype"].startswith("float32")
    for label in ("features", "neurons", "anchor_features"):
        assert 0 <= m[f"interpretable_fraction_{label}"] <= 1 and m[f"scored_{label}"] > 0
    assert m["interpretable_score"] == "explain_corr" and 0 < m["interpretable_threshold"] < 1
    units = pd.read_parquet(art.file("units.parquet"))
    assert units.groupby("set").size().to_dict() == {"neurons": 128, "topk": 512, "anchor": 512, "random": 512,
                                                     "random-model": 512}  # the two controls measured alike
    assert m["random_model"] == "measured"
    contexts = pd.read_parquet(art.file("contexts.parquet"))
    assert {"top", "interval"} <= set(contexts.kind) and (contexts.tokens.map(len) == contexts.acts.map(len)).all()
    vocab = set(pd.read_parquet(art.file("vocab.parquet")).token)
    assert all(set(t) <= vocab for t in contexts.tokens)  # every shown token can be displayed
    split = pd.read_parquet(art.file("splitting.parquet"))
    widths = profiles.get("tiny").sae.widths
    assert sorted(set(split.width)) == sorted(widths)[1:] and len(split) == sum(sorted(widths)[1:])


def test_the_causal_stage_ranks_each_feature_among_its_controls_on_the_test_half(in_tiny_cache):
    import pandas as pd

    from monosemantic import causal, chapter

    if not store.artifact_path("analysis", "tiny", "features").is_dir():
        assert cli.main(["analyze", "--profile", "tiny", "--no-progress"]) == 0
    if not (store.artifact_path("heldout", "tiny", "windows") / store.MANIFEST).is_file():
        assert cli.main(["heldout", "--profile", "tiny"]) == 0
    cfg = causal.CausalConfig(min_heldout_firings=1, min_family_tokens=1, per_family=1, n_features=3, n_random=3,
                              n_decoder=2, dose_multiples=(1.0, 10.0), dose_random=1, new_tokens=2, samples=1,
                              sample_random=1, positions=64, n_boot=50, cell_random=2, min_firing_positions=2,
                              min_firing_documents=2, pin_tokens=3)
    causal.run_stage("tiny", cfg, log=lambda *a: None)
    art = store.load("analysis", "tiny", "causal", config=cfg)
    table = pd.read_parquet(art.file("causal.parquet"))
    assert len(table) and {"feature", "random", "difference"} <= set(table.direction)
    assert set(table.direction) <= {"feature", "random", "difference", *causal.CONTROLS[2:]}
    # a fitted control rescaled to the feature's KL in the main clamp moves the distribution as far there
    main = chapter.causal_cell(table, ("clamp", cfg.clamp_multiple, "all", False)).set_index(["feature", "direction"])
    for f in table.feature.unique():
        for kind in ("mean_difference_kl", "best_neuron_kl"):
            if (f, kind) in main.index:
                assert main.loc[(f, kind), "kl"] == pytest.approx(main.loc[(f, "feature"), "kl"], rel=1e-3, abs=1e-7)
    assert table.family.map(type).eq(str).all()  # the family's name, not a measure of it
    cells = ["feature", "mode", "multiple", "where", "frozen_scale"]
    assert {tuple(k) for k in table[cells[1:]].drop_duplicates().values} <= set(chapter.causal_cells(cfg.to_dict()))
    for _, part in table.groupby(cells):
        by = part.set_index("direction")
        for col in ("kl", "family_logodds", "dmass_family"):  # the difference: the feature's minus the random mean
            assert by.loc["difference", col] == pytest.approx(by.loc["feature", col] - by.loc["random", col],
                                                              abs=1e-9)
            assert by.loc["difference", f"{col}_low"] <= by.loc["difference", col] <= \
                by.loc["difference", f"{col}_high"] + 1e-12
        assert part.base_mass_family.nunique() == 1 and part.base_mass_family.between(0, 1).all()
        # each direction's own tokens differ, and so does their mass before the edit
        assert part.base_mass_own.between(0, 1).all()
        assert by.loc["difference", "base_mass_own"] == by.loc["feature", "base_mass_own"]
    assert (table[table.direction == "feature"].kl > -1e-6).all() and (table.documents >= 2).all()
    assert (table[table["where"] == "firing"].positions <= cfg.positions).all()
    assert (table[table["mode"] == "ablate"]["where"] == "firing").all()
    m = art.metrics
    assert m["features"] == len(art.manifest["info"]["features"]) <= cfg.n_features
    singles = pd.read_parquet(art.file("random_directions.parquet"))
    for key, part in singles.groupby(cells):
        rnd, dec = part[part.control == "random"], part[part.control == "decoder"]
        main = (key[1], key[2], key[3], key[4]) in (("clamp", cfg.clamp_multiple, "all", False),
                                                     ("ablate", 0.0, "firing", False))
        assert sorted(rnd["index"]) == list(range(cfg.n_random if main else cfg.cell_random))
        assert len(dec) == cfg.n_decoder and key[0] not in set(dec.source_feature) and dec.cosine.between(-1, 1).all()
        assert part.base_mass_own.between(0, 1).all()  # each control's own tokens, before the edit
        frow = table.set_index(cells[:]).loc[key]
        frow = frow[frow.direction == "feature"].iloc[0]
        sign = 1.0 if key[1] == "clamp" else -1.0
        # the rank among the random directions, on each measure's log-odds, counts those at least as good
        for measure in causal.RANDOM_MEASURES:
            col = f"{measure}_logodds"
            if frow[f"{measure}_rank"] == 0:  # undefined: nothing predicted
                assert np.isnan(frow[col]) and measure == "predicted"
                continue
            assert frow[f"{measure}_rank"] == 1 + (sign * rnd[col] >= sign * frow[col] - 1e-12).sum()
        assert frow.kl_rank == 1 + (rnd.kl >= frow.kl - 1e-12).sum() and 1 <= frow.kl_rank_dec <= cfg.n_decoder + 1
    # each test feature's random directions are its own (drawn afresh per feature)
    rnd_all = singles[(singles.control == "random") & (singles["mode"] == "clamp")
                      & (singles["multiple"] == cfg.clamp_multiple) & (singles["where"] == "all")]
    if rnd_all.feature.nunique() > 1:
        firsts = rnd_all[rnd_all["index"] == 0].cosine
        assert firsts.nunique() == len(firsts)
    main_clamp = chapter.causal_main(table, cfg.to_dict())
    main_clamp = main_clamp[(main_clamp["mode"] == "clamp") & (main_clamp.direction == "feature")]
    assert m["clamp_kl_rank1_features"] == int((main_clamp.kl_rank == 1).sum())
    dose = pd.read_parquet(art.file("dose.parquet"))
    assert sorted(dose.multiple.unique()) == sorted({*cfg.dose_multiples, cfg.clamp_multiple})
    at5 = dose[(dose.multiple == cfg.clamp_multiple) & (dose.direction == "feature")].set_index("feature")
    clamp_f = main_clamp.set_index("feature")
    for f in at5.index:  # the main clamp's own numbers
        assert at5.loc[f, "family_logodds"] == pytest.approx(clamp_f.loc[f, "family_logodds"], abs=1e-9)
    sampled = pd.read_parquet(art.file("sampling.parquet"))
    assert set(sampled.protocol) == {"clamp", "pinned", "pinned_matched"} and sampled.family_share.between(0, 1).all()
    matched = sampled[sampled.protocol == "pinned_matched"]
    assert set(matched.direction) <= {"feature", "decoder"} and (matched.tokens == cfg.samples * cfg.pin_tokens).all()
    clamp_s, pinned_s = sampled[sampled.protocol == "clamp"], sampled[sampled.protocol == "pinned"]
    assert set(clamp_s.direction) == {"none", "feature", "random"} and set(pinned_s.direction) <= {"none", "feature",
                                                                                                  "decoder"}
    assert (clamp_s.tokens == len(causal.PROMPTS) * cfg.samples * cfg.new_tokens).all()
    assert (pinned_s.tokens == cfg.samples * cfg.pin_tokens).all()  # the anchor's: after <|endoftext|> alone
    gens = pd.read_parquet(art.file("generations.parquet"))
    assert {"as_is", "clamped", "random_direction", "pinned", "pinned_anchor", "clamped_1x", "clamped_10x"} <= \
        set(gens.columns)
    pred = pd.read_parquet(art.file("predicted.parquet"))
    assert (pred.after_firing > pred.overall).all() and (pred.groupby("feature").size() <= cfg.predicted_tokens).all()


def _chromium(url: str, *extra: str) -> tuple[str, str]:
    import subprocess

    from monosemantic.book import chromium

    res = subprocess.run(chromium.command("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra,
                                          url), capture_output=True, text=True, timeout=120)
    return res.stdout, res.stderr


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed "
                    "(.ci/run installs it)")
def test_feature_browser_loads_finds_a_feature_by_token_and_highlights_its_contexts(in_tiny_cache, tmp_path):
    import re

    from monosemantic import browser
    from monosemantic.config import project_root

    if not store.artifact_path("analysis", "tiny", "features").is_dir():
        assert cli.main(["analyze", "--profile", "tiny", "--no-progress"]) == 0
    art = store.load("analysis", "tiny", "features")
    written = browser.write(art, tmp_path / "browser")
    assert written["units"] == 128 + 512 and written["shards"] == 2 + 8
    page = tmp_path / "page.html"
    page.write_text('<!doctype html><meta charset="utf-8"><link rel="stylesheet" href="browser/browser.css">'
                    '<div id="mono-browser"></div><script src="browser/index.js"></script>'
                    '<script src="browser/browser.js"></script>', encoding="utf-8")
    index = json.loads((tmp_path / "browser" / "index.js").read_text().split("=", 1)[1].rstrip(";\n"))
    token, hits = max(index["tokens"].items(), key=lambda kv: len(kv[1]))  # the token most units fire on
    dom, log = _chromium(f"{page.as_uri()}#q={token}", "--dump-dom")
    found = re.findall(r'href="#(topk|neurons)/(\d+)"', dom)
    hits = [h for h in hits if h[0] == 0]  # the page lists the selected set's units (the first set's)
    assert len(found) == len(hits) and not re.search(r"CONSOLE.*(Uncaught|Error)", log), log[-2000:]
    set_name, unit = found[0]
    dom, log = _chromium(f"{page.as_uri()}#{set_name}/{unit}", "--dump-dom")
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", log), log[-2000:]
    assert f"#{unit}" in dom and "Top activations" in dom
    assert dom.count("data-act=") >= 1 and "mono-centre" in dom  # highlighted tokens, the example's token marked
    # the PDF's picture of it: the unit figure_unit picks, taken once, described beside it, kept while unchanged
    png = tmp_path / "figures" / "browser.png"
    meta = browser.figure(art, tmp_path / "browser", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(png.with_suffix(".json").read_text()) == meta and meta["analysis"] == art.key
    assert meta["page"] == f"#topk/{meta['unit']}" and 0 < meta["top_token_share"] <= 1
    stamp = png.stat().st_mtime_ns
    assert browser.figure(art, tmp_path / "browser", png) == meta and png.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".figure-*.html"))  # the page it was taken from is gone
    shot = project_root() / "_test_artifacts" / "browser.png"
    shot.parent.mkdir(exist_ok=True)
    shutil.copy(png, shot)


def test_evaluate_gives_every_committed_sae_intervals_over_heldout_documents(in_tiny_cache):
    import pandas as pd

    from monosemantic import evaluation

    assert evaluation.committed_saes("tiny")[:3] == ["anchor", "anchor-fixed", "topk"]
    # an artifact whose weights live in cache/work/ (a literal run at full length) is not one of them
    moved = store.artifact_path("sae", "tiny", "anchor-moved")
    shutil.copytree(store.artifact_path("sae", "tiny", "anchor"), moved)
    (moved / "sae_weights.safetensors").unlink()
    assert "anchor-moved" not in evaluation.committed_saes("tiny")
    shutil.rmtree(moved)
    assert cli.main(["evaluate", "--profile", "tiny", "--sae", "topk", "--max-windows", "64", "--no-progress"]) == 0
    art = store.load("sae", "tiny", "heldout")
    table = pd.read_parquet(art.file("heldout.parquet"))
    assert set(table["sae"]) == {"topk", *(f"neurons-top{k}" for k in evaluation.EvalConfig().neuron_ks)}
    l0 = table[table["metric"] == "l0"].set_index("sae")["value"]
    assert l0["neurons-top1"] <= 1 and l0["neurons-top8"] <= 8 and l0["neurons-top24"] <= 24  # at most k
    assert set(evaluation.HEADLINE) <= set(table["metric"])
    has = table["low"].notna()  # dead and ultra-low fractions: a value, no interval
    assert set(table.loc[~has, "metric"]) == {"dead_fraction", "ultralow_fraction"}
    assert (table.loc[has, "low"] <= table.loc[has, "value"] + 1e-12).all()
    assert (table.loc[has, "value"] <= table.loc[has, "high"] + 1e-12).all()
    assert art.metrics["n_documents"] >= 2 and art.metrics["eval_tokens"] % 32 == 0
    # the same numbers as evaluating the SAE directly on those windows (the point estimate is no bootstrap)
    topk_ce = table.set_index("metric").loc[lambda t: t["sae"] == "topk", "value"]["ce_loss_recovered"]
    assert art.metrics["topk_ce_loss_recovered"] == pytest.approx(topk_ce)


def test_universality_matches_every_seed_of_a_recipe_both_ways(in_tiny_cache):
    import itertools

    import pandas as pd

    art = store.load("sae", "tiny", sae_train.UNIVERSALITY)
    table = pd.read_parquet(art.file("universality.parquet"))
    cfg = sae_train.SeedsConfig()
    for recipe in cfg.recipes:
        names = [recipe, *(f"{recipe}-seed{s}" for s in cfg.seeds)]
        for a, b in itertools.permutations(names, 2):
            part = table[(table.run == a) & (table.other == b)]
            assert len(part) == 512 and part.feature.tolist() == list(range(512))
    assert set(table.run) >= {"topk", sae_train.RANDOM_MODEL}  # the random model's SAE as a shape-only null
    assert ((table.cosine >= -1 - 1e-5) & (table.cosine <= 1 + 1e-5)).all()
    # the recorded match is the argmax: recompute one pair from the weights
    seeds = store.load("sae", "tiny", sae_train.SEEDS)
    a = sae_mod.load(store.load("sae", "tiny", "topk").path).W_dec.detach()
    b = sae_mod.load(seeds.file(f"topk-seed1/{sae_mod.SAE_WEIGHTS_FILENAME}").parent).W_dec.detach()
    cos = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()
    part = table[(table.run == "topk") & (table.other == "topk-seed1")].sort_values("feature")
    assert np.allclose(part.cosine, cos.max(1).values.numpy(), atol=1e-5)


def test_the_gaussian_null_trains_the_width_recipe_on_structureless_data(in_tiny_cache):
    import pandas as pd

    from monosemantic import gaussian_null

    stage = profiles.get("tiny").sae
    art = store.load("sae", "tiny", gaussian_null.NAME)
    table = pd.read_parquet(art.file("gaussian_widths.parquet"))
    widths = [r.cfg.n_features for r in sae_train.plan(stage) if r.family == "width"]
    assert table.n_features.tolist() == [w for w in widths if w <= gaussian_null.GaussianNullConfig().max_width]
    assert (table.k == stage.topk.k).all() and np.allclose(table.l0, table.k, atol=0.5)
    assert ((table.fvu > 0) & (table.fvu < 2)).all()
    assert art.manifest["inputs"].keys() == {"activations/tiny-mlp"}
