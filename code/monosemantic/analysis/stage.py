"""``monosemantic analyze``: the unit sets of a profile (neurons, the SAEs, the controls) analysed alike and
written as ``analysis/<profile>-features``."""


from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..comparisons import density_bins, interpretable_fraction, matched_differences
from ..config import UserError
from ..harvest import spread_windows
from ..lm import random_lm
from .families import FAMILY_NAMES
from .measure import analyze, split_table, token_profiles
from .passes import INTERVAL_SAMPLING, LM_FORWARD, AnalysisConfig, Stopwatch, mlp_batches
from .units import UnitSet

DEFAULT_PROFILE = "cpu"

# --- the stage ---------------------------------------------------------------------------------------

MEASURE_DTYPE = "float32"  # the LM's forward pass here: the numbers do not change with the machine's bf16 units
MAIN_SAE = "topk"  # the SAE whose features the chapter shows (the better recipe)
RANDOM_DICTIONARY = "random"  # the set of random directions with the TopK SAE's encoding
RANDOM_MODEL = "random-model"  # the set (and sae/<profile>-random-model artifact) of an SAE on a random LM
NEURON_TOPK = "neuron-topk"  # the half-neurons of a two-signed layer, k per token (UnitSet.neuron_topk)
TABLES = ("units", "contexts", "top_tokens", "logits", "histograms", "vocab", "families", "neighbours")
CONTROL_TABLES = ("density_bins", "density_matched")
LABELS = {"neurons": "neurons", MAIN_SAE: "features", "anchor": "anchor_features",
          RANDOM_DICTIONARY: "random_dictionary", RANDOM_MODEL: "random_model_features",
          NEURON_TOPK: "neuron_topk"}  # manifest names
_NO_CONTEXTS = ("anchor", RANDOM_DICTIONARY, RANDOM_MODEL, NEURON_TOPK)  # sets whose dashboards are not kept


def control_tables(units, cfg: AnalysisConfig) -> dict[str, Any]:
    """The tables of :data:`CONTROL_TABLES` for an analysis's ``units``: every score's pass fraction per set
    and density bin, and each set's density-matched difference from the neurons."""
    return {"density_bins": density_bins(units, cfg), "density_matched": matched_differences(units, cfg)}


def drop_control_contexts(result: dict[str, Any]) -> None:
    """Drop the dashboards of the sets in ``_NO_CONTEXTS`` from an :func:`analyze` result: they only served
    those sets' explanations; their scores are kept, their contexts would multiply the committed size."""
    result["contexts"] = result["contexts"][~result["contexts"]["set"].isin(_NO_CONTEXTS)]


def _random_model_set(profile: str, lm_art, log: Callable[[str], None]):
    """(random LM, its SAE's unit set, the artifact) from ``sae/<profile>-random-model``, or None (said in
    one line) when that artifact is absent. The artifact is an SAE folder (:func:`monosemantic.sae.load`)
    trained on the MLP activations of :func:`random_lm` with the seed its config records as ``model_seed``
    (0 if none), or of the model whose weights it holds as ``model.safetensors``."""
    from .. import sae as sae_mod
    from .. import store
    from ..lm import WEIGHTS_FILE, LMConfig, load_weights

    if not store.artifact_path("sae", profile, RANDOM_MODEL).is_dir():
        log(f"analyze: sae/{profile}-{RANDOM_MODEL} (an SAE on a randomly initialised copy of the LM) is not in "
            "the cache: that control is left out")
        return None
    art = store.load("sae", profile, RANDOM_MODEL)  # present but stale or corrupt: an error that says so
    weights = art.path / WEIGHTS_FILE
    lm_cfg = LMConfig(**lm_art.config)
    model = (load_weights(weights, lm_cfg) if weights.is_file()
             else random_lm(lm_cfg, int(art.config.get("model_seed", 0))))
    model.arithmetic = model.arithmetic.replace(dtype=MEASURE_DTYPE)
    return model, UnitSet.from_sae(RANDOM_MODEL, sae_mod.load(art.path)), art


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The tables of two analyses of the same text (of different models) as one."""
    import pandas as pd

    out = dict(a)
    for name in TABLES:
        if name == "families":
            continue  # the same text: the same token shares
        frame = pd.concat([a[name], b[name]], ignore_index=True)
        out[name] = frame.drop_duplicates("token", ignore_index=True) if name == "vocab" else frame
    return out


def _carried_splitting(profile: str, sweep, missing: list[str]) -> dict:
    """The splitting tables of the analysis artifact in the cache, when it was made from the same width-sweep
    artifact as ``sweep`` (whose weights are not on this machine); else a one-line error saying what to run."""
    import pandas as pd

    from .. import store

    command = f"`monosemantic train-sae --profile {profile} --recipe sweep`"
    try:
        old = store.load("analysis", profile, "features", check_inputs=False)
    except store.CacheError:
        raise UserError(f"{sweep.key}: the weights of {', '.join(missing)} are not on this machine (they live in "
                        f"cache/work/); remake them with {command}") from None
    if old.manifest.get("inputs", {}).get(sweep.key) != sweep.content_hash:
        raise UserError(f"{sweep.key}: the weights of {', '.join(missing)} are not on this machine, and the cached "
                        f"{old.key} was made from another sweep; remake them with {command}")
    return {"splitting": pd.read_parquet(old.file("splitting.parquet")),
            "width_top_tokens": pd.read_parquet(old.file("width_top_tokens.parquet")), "from": old.key,
            "note": (f"splitting.parquet and width_top_tokens.parquet copied from {old.key} (content "
                     f"{old.content_hash}, made {old.manifest.get('created')}) from the same {sweep.key} "
                     f"(content {sweep.content_hash}), whose width SAEs' weights were not on this machine; "
                     "those two tables still measure every position of a window, the first included")}


def run_stage(profile: str, cfg: AnalysisConfig, stage, progress: bool = True,
              log: Callable[[str], None] = print):
    """``analysis/<profile>-features``: neurons, the TopK SAE, the anchor-recipe SAE and the controls (a
    random dictionary; an SAE on a random LM when ``sae/<profile>-random-model`` exists), analysed alike,
    compared within density bins; plus feature splitting across the width sweep's dictionaries. ``stage``:
    the profile's ``SAEStageConfig``, whose SAE artifacts are analysed."""
    import time

    import pandas as pd

    from .. import sae as sae_mod
    from .. import sae_train, store
    from ..data import TokenDataset
    from ..lm import load_pretrained
    from ..tokenizer import load as load_tokenizer

    start = time.perf_counter()
    clock = Stopwatch()
    model = load_pretrained(profile, dtype=MEASURE_DTYPE)
    model.eval()
    tokenizer = load_tokenizer()
    lm_art = store.load("lm", profile, "model")
    saes, inputs = {}, [lm_art]
    for recipe in sae_train.RECIPES:
        try:
            art = store.load("sae", profile, recipe, config=stage)
        except store.CacheError as e:
            if recipe == MAIN_SAE:
                raise
            log(f"{recipe} SAE not analysed: {e}")
            continue
        saes[recipe] = sae_mod.load(art.path)
        inputs.append(art)
    sweep = store.load("sae", profile, "sweep", config=stage)
    inputs.append(sweep)
    # the set called "anchor" is the ReLU + L1 SAE: the literal recipe when it has been run, else anchor-fixed
    relu = "anchor" if "anchor" in saes else "anchor-fixed"
    if relu not in saes:
        raise UserError(f"no ReLU + L1 SAE (sae/{profile}-anchor or -anchor-fixed) in the cache; train one with "
                        f"`monosemantic train-sae --profile {profile} --recipe anchor-fixed`")
    sets = [UnitSet.neurons(model.config.d_mlp), UnitSet.from_sae(MAIN_SAE, saes[MAIN_SAE]),
            UnitSet.from_sae("anchor", saes[relu])]
    main = saes[MAIN_SAE]
    if cfg.random_dictionary:  # the TopK SAE's width, k and centre, random directions
        sets.append(UnitSet.random_dictionary(RANDOM_DICTIONARY, main.cfg.d_in, main.cfg.n_features, main.cfg.k,
                                              seed=cfg.seed, centre=main.b_dec))
    train_tokens = TokenDataset.open(profile, "train").tokens
    held_out, held_docs, held_sources, held_art = _held_out_text(profile, cfg, model.config.context_length, log)
    if held_art is not None:
        inputs.append(held_art)
    result = analyze(model, tokenizer, sets, train_tokens, held_out, cfg, progress, log, clock)
    curves, curve_summary = _family_curves(model, result, held_out, held_docs, cfg, progress, log, clock)
    random_model = _random_model_set(profile, lm_art, log)
    if random_model is not None:
        rm_model, rm_set, rm_art = random_model
        inputs.append(rm_art)
        result = _merge(result, analyze(rm_model, tokenizer, [rm_set], train_tokens, held_out, cfg, progress, log,
                                        clock.part(RANDOM_MODEL)))

    # feature splitting: the width sweep's dictionaries (weights in cache/work), nearest parents by cosine
    widths: dict[int, Any] = {}
    missing = []
    for run in sae_train.plan(stage):
        if run.family != "width":
            continue
        folder = sweep.work_path / run.name
        if folder.is_dir():
            widths[run.cfg.n_features] = sae_mod.load(folder)
        else:
            missing.append(run.name)
    carried = None
    if missing:  # the sweep's weights live in cache/work: reuse the last splitting tables if made from this sweep
        carried = _carried_splitting(profile, sweep, missing)
        splits, width_tokens = carried["splitting"], carried["width_top_tokens"]
        log(f"width sweep weights not on this machine ({', '.join(missing)}): splitting tables carried over from "
            f"{carried['from']}, made from the same {sweep.key}")
    else:
        with clock("width sweep"):
            splits = split_table({n: s.W_dec.detach() for n, s in widths.items()})
            width_sets = [UnitSet.from_sae(f"width-{n}", s, contexts=False) for n, s in sorted(widths.items())]
            width_tokens = token_profiles(model, width_sets, train_tokens, min(cfg.explain_tokens, 500_000),
                                          progress=progress, skip_first_positions=cfg.skip_first_positions)

    units = result["units"]
    with clock("controls"):
        controls = control_tables(units, cfg)
    with store.write("analysis", profile, "features", config=cfg, inputs=inputs) as w:
        drop_control_contexts(result)
        for name in TABLES:
            result[name].to_parquet(w.dir / f"{name}.parquet", index=False)
        for name, frame in controls.items():
            frame.to_parquet(w.dir / f"{name}.parquet", index=False)
        splits.to_parquet(w.dir / "splitting.parquet", index=False)
        curves.to_parquet(w.dir / "family_curves.parquet", index=False)
        curve_summary.to_parquet(w.dir / "family_units.parquet", index=False)
        T = model.config.context_length
        source_table = (pd.DataFrame({"source": held_sources}).groupby("source").size().rename("windows")
                        .reset_index().assign(tokens=lambda t: t.windows * (T - cfg.skip_first_positions)))
        source_table.to_parquet(w.dir / "heldout_sources.parquet", index=False)
        w.metrics["held_out_set"] = held_art.key if held_art is not None else f"tokens/{profile}: the val split"
        w.metrics["held_out_sources"] = int(len(source_table))
        w.metrics["held_out_min_source_tokens"] = int(source_table.tokens.min())
        width_tokens.to_parquet(w.dir / "width_top_tokens.parquet", index=False)
        w.wall_time_s = round(time.perf_counter() - start, 1)  # the whole stage, not just this write
        w.info["lm_forward_dtype"] = (f"{MEASURE_DTYPE}: the LM's forward passes, whatever the machine (the SAEs "
                                      "encode in float32 too)")
        w.info["seconds"] = stage_seconds(clock.seconds, w.wall_time_s)
        # the main SAE's share: the forward passes and labels every set needs, and its own timed work; a run of
        # it alone would add some of `other` (reading inputs, the tables' assembly, the writes)
        w.metrics["seconds_main_sae"] = round(sum(clock.seconds.get(k, 0.0) for k in (LM_FORWARD, "labels",
                                                                                        MAIN_SAE)), 1)
        w.info["interval_sampling"] = INTERVAL_SAMPLING
        w.metrics.update(summary_metrics(units, cfg))
        w.metrics.update(control_metrics(controls["density_matched"]))
        w.metrics["random_model"] = ("measured" if random_model is not None else
                                     f"absent: no sae/{profile}-{RANDOM_MODEL} in the cache")
        w.metrics["explainer"] = result["explainer"]
        w.metrics["anchor_set_recipe"] = relu
        if carried is not None:
            w.info["splitting_carried_from"] = carried["note"]
        w.metrics["explain_tokens"] = result["tokens"]["explain"]
        w.metrics["held_out_tokens"] = result["tokens"]["held_out"]
        w.metrics["mlp_mean_sq_norm"] = round(result["mlp_mean_sq_norm"], 4)
        w.info["score"] = ("explain_corr: Pearson correlation, over every measured held-out (val) token, between a "
                           "unit's activation and the prediction of a token table learned from its dashboard only")
        w.info["sim_corr"] = (f"simulation: correlation of the explanation's predicted and the true activations over "
                              f"the tokens of a unit's {cfg.score_top} top, {cfg.score_per_interval} per activation "
                              f"interval and {cfg.score_random} random held-out contexts of {cfg.score_context} "
                              "tokens (Bills et al. 2023)")
        w.info["detection"] = (f"balanced accuracy at telling the top and interval contexts from {cfg.score_negatives} "
                               "random held-out contexts where the unit does not fire, a context predicted to fire "
                               f"when the simulation reaches {cfg.predict_fraction:g} of the explanation's largest "
                               "value on one of its tokens (EleutherAI delphi)")
        w.info["specificity"] = ("family_share: share of a unit's held-out activation mass inside the family it "
                                 "was assigned on the explanation text; family_lift: that share over the "
                                 "family's share of held-out tokens")
        w.info["controls"] = ("density_bins: every score's pass fraction and median per set and half-decade of "
                              "held-out density; density_matched: each set's pass fraction minus the neurons', raw "
                              "and averaged over density bins with the neurons' distribution as weights; "
                              "intervals: 95% bootstrap over units")
    return store.artifact_path("analysis", profile, "features")


def _held_out_text(profile: str, cfg: AnalysisConfig, seq_len: int, log: Callable[[str], None]):
    """The held-out text units are scored on: ``(windows (W, T), document of each window (W,), source of each
    window (W,), the heldout artifact)``, the windows of ``heldout/<profile>-windows`` (never-seen text of
    every corpus source) when it exists, else the val split's windows (said in one line; artifact None)."""
    from .. import heldout, store
    from ..data import TokenDataset
    from ..intervals import window_documents

    if store.artifact_path("heldout", profile, "windows").is_dir():
        held = heldout.load_windows(profile, explain_tokens=cfg.explain_tokens)
        return held.windows, held.documents, held.sources, store.load("heldout", profile, "windows")
    log(f"analyze: no heldout/{profile}-windows: scoring on the val split instead (`monosemantic heldout "
        f"--profile {profile}` makes the held-out set of every source)")
    data = TokenDataset.open(profile, "val")
    windows, starts = spread_windows(data.tokens, seq_len, len(data.tokens))
    docs = window_documents(data.tokens, starts, data.eot_id)
    return windows, docs, np.array(["val"] * len(windows)), None


def stage_seconds(parts: dict[str, float], whole: float) -> dict[str, float]:
    """The manifest's ``seconds``: the :class:`Stopwatch` parts (the main LM's forward passes, the family labels,
    each set's own work (its passes, dashboards, explanations and scores, table rows); the random model's
    forward passes and set, the width sweep with its own forward passes, the control tables), ``other`` (the
    rest: reading inputs, assembling and writing the tables; negative only if parts overlapped) and
    ``whole``, rounded to 0.1 s."""
    out = {name: round(s, 1) for name, s in sorted(parts.items(), key=lambda kv: -kv[1])}
    out["other"] = round(whole - sum(parts.values()), 1)
    out["whole"] = round(whole, 1)
    return out


def _family_curves(model, result: dict[str, Any], windows: np.ndarray, docs: np.ndarray,
                   cfg: AnalysisConfig, progress: bool, log: Callable[[str], None], clock: Stopwatch):
    """Per family, the best neuron and the best feature of the main SAE (chosen on the explanation text)
    measured on the held-out ``windows``: :func:`monosemantic.family_curves.tables`' (curves, summary)."""
    import pandas as pd

    from .. import family_curves as fc

    T = model.config.context_length
    units = result["units"]
    chosen = [s for s in result["oriented_sets"] if s.name in ("neurons", MAIN_SAE)]
    counts, names = [], []
    for s in chosen:
        best = fc.choose_units(result["family_share_explain"][s.name], result["fired_explain"][s.name],
                               cfg.min_firings)
        pairs = [(f, int(u)) for f, u in enumerate(best) if u >= 0]
        mine = units[units.set == s.name].sort_values("unit")
        maxima = torch.as_tensor(mine["max"].to_numpy().copy(), dtype=torch.float32)
        counts.append(fc.CurveCounts(pairs, maxima, len(windows)))
        names.append(s.name)
    labels = result["held_out_labels"]  # (W, T, F), labelled once by analyze
    log(f"analyze: per-family curves of {sum(len(c.pairs) for c in counts)} units on {windows.size:,} held-out tokens")
    batches = mlp_batches(model, windows, cfg.batch_windows, clock)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(windows) // cfg.batch_windows), desc="analyze: family curves")
    fc.measure(batches, [s.activations for s in chosen], counts, labels, T, cfg.skip_first_positions,
               timers=[functools.partial(clock, name) for name in names])
    measured = labels[:, cfg.skip_first_positions:].reshape(-1, labels.shape[-1])
    family_tokens = measured.sum(0)
    tabs = [fc.tables(c, [name] * len(c.pairs), FAMILY_NAMES, len(measured), family_tokens, groups=docs,
                      n_boot=cfg.n_boot, seed=cfg.seed) for c, name in zip(counts, names, strict=True)]
    return (pd.concat([t[0] for t in tabs], ignore_index=True), pd.concat([t[1] for t in tabs], ignore_index=True))


def _finite(x: float, digits: int = 4) -> float | None:
    """``x`` rounded, or None where it is NaN (a manifest holds no NaN)."""
    return round(float(x), digits) if np.isfinite(x) else None


def summary_metrics(units, cfg: AnalysisConfig) -> dict[str, Any]:
    """The manifest's headline numbers for every set: the pass fraction and median of every score, the
    units scored and too rare to score, and the mean share of top activations at a window's first position."""
    out: dict[str, Any] = {"interpretable_score": "explain_corr", "interpretable_threshold": cfg.corr_threshold,
                           "specificity_threshold": cfg.specificity_threshold, "lift_threshold": cfg.lift_threshold,
                           "detection_threshold": cfg.detection_threshold,
                           "min_heldout_firings": cfg.min_heldout_firings}
    for set_name, label in LABELS.items():
        part = units[units["set"] == set_name]
        if not len(part):
            continue
        scored = part[part["scored"]]
        out[f"interpretable_fraction_{label}"] = _finite(interpretable_fraction(part, "explain_corr", cfg))
        out[f"specific_fraction_{label}"] = _finite(interpretable_fraction(part, "specificity", cfg))
        out[f"median_explain_corr_{label}"] = _finite(scored["explain_corr"].median())
        out[f"scored_{label}"] = int(part["scored"].sum())
        # on the explanation text: units that never fire there, and how often a live one fires
        out[f"never_fired_fraction_{label}"] = _finite(float((part["density"] == 0).mean()))
        out[f"median_density_{label}"] = _finite(float(part.loc[part["density"] > 0, "density"].median()), 8)
        if "density_val" in part:  # and on the held-out text: the dead fraction an SAE's bar is set on
            out[f"heldout_never_fired_fraction_{label}"] = _finite(float((part["density_val"] == 0).mean()))
        if "sim_corr" not in part:
            continue
        out[f"simulation_fraction_{label}"] = _finite(interpretable_fraction(part, "sim_corr", cfg))
        out[f"detection_fraction_{label}"] = _finite(interpretable_fraction(part, "detection", cfg))
        out[f"median_sim_corr_{label}"] = _finite(scored["sim_corr"].median())
        out[f"median_detection_{label}"] = _finite(scored["detection"].median())
        out[f"too_rare_{label}"] = int(part["too_rare"].sum())
        out[f"first_pos_top_share_{label}"] = _finite(part["first_pos_top_share"].mean())
    return out


def control_metrics(matched) -> dict[str, Any]:
    """The density-matched headline: ``matched_<score>_<label>_minus_neurons`` (and ``_low``, ``_high``,
    ``raw_...``) for the specificity, simulation and detection scores."""
    out: dict[str, Any] = {}
    for row in matched.itertuples():
        if row.score == "explain_corr" or row.set not in LABELS:
            continue
        key = f"{row.score}_{LABELS[row.set]}_minus_{row.baseline}"
        for kind in ("matched", "raw"):
            out[f"{kind}_{key}"] = _finite(getattr(row, kind))
            out[f"{kind}_{key}_low"] = _finite(getattr(row, f"{kind}_low"))
            out[f"{kind}_{key}_high"] = _finite(getattr(row, f"{kind}_high"))
        out[f"matched_{key}_coverage"] = _finite(row.coverage)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--explainer", default=None,
                   help="who explains and simulates: token-table (the offline default), "
                        "openai:<model>@<base_url> (an OpenAI-compatible endpoint; key from $MONOSEMANTIC_API_KEY "
                        "or $OPENAI_API_KEY) or hf:<model folder or hub id> (a local chat model)")


def run(args: argparse.Namespace) -> int:
    """``monosemantic analyze``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = args.profile_config.analysis
    if getattr(args, "explainer", None):
        cfg = cfg.replace(explainer=args.explainer)
    path = run_stage(args.profile, cfg, args.profile_config.sae, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0
