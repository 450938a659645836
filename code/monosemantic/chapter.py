"""Small helpers the book's chapters share: number formatting, artifacts that may not be in the cache yet,
and the tables of ``sae/<profile>-heldout`` and ``analysis/<profile>-features`` read into one shape.

Chapters only read the cache; these helpers compute nothing that a stage does not already store.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import store
from .chapter_causal import (  # noqa: F401 (the chapters read them here)
    CONTROL_RANKS,
    LEADER_MEASURES,
    FamilyTest,
    FittedTest,
    RankTest,
    causal_cell,
    causal_cells,
    causal_family_test,
    causal_fitted,
    causal_main,
    causal_rank_table,
    causal_rank_tests,
    holm,
    holm_jointly,
    mean_rank_test,
)
from .comparisons import MIN_BIN_UNITS  # noqa: F401 (the chapters read it here)
from .config import UserError

# The unit sets of analysis/<profile>-features as the chapters name them, in the order they show them.
UNIT_SETS: dict[str, str] = {"neurons": "neurons", "topk": "TopK features", "anchor": "anchor-fixed features",
                             "random": "random dictionary", "random-model": "SAE on a random LM"}


def unit_sets(analysis_metrics: dict[str, Any]) -> dict[str, str]:
    """:data:`UNIT_SETS` with the ReLU + L1 set named for the run it is: the analysis records which recipe
    (``anchor_set_recipe``: the literal ``anchor`` when it has been run, else ``anchor-fixed``)."""
    recipe = analysis_metrics.get("anchor_set_recipe", "anchor-fixed")
    return {**UNIT_SETS, "anchor": "literal-recipe features" if recipe == "anchor" else f"{recipe} features"}


SCORE_NAMES: dict[str, str] = {"specificity": "specific", "sim_corr": "simulation", "detection": "detection",
                               "explain_corr": "all-token correlation"}  # as table columns
SCORE_PROSE: dict[str, str] = {"specificity": "specificity", "sim_corr": "simulation", "detection": "detection",
                               "explain_corr": "the all-token correlation"}  # "by ..." in a sentence


def pass_table(bins_t, names: dict[str, str], scores=("specificity", "sim_corr", "detection", "explain_corr")):
    """Each unit set of a ``density_bins`` table by every score, over all densities: units, scored, too rare
    (after a +, those that fire often enough held out but too rarely on the explanation text to have an
    explanation), and each score's pass fraction with its interval; one row per set of ``names`` present,
    labelled by it."""
    import pandas as pd

    allbin = bins_t[bins_t.bin == "all"].set_index("set")
    rows = []
    for s, label in names.items():
        if s not in allbin.index:
            continue
        r = allbin.loc[s]
        unexplained = int(r.units - r.scored - r.too_rare)
        row = {"units": label, "count": f"{int(r.units):,}", "scored": f"{int(r.scored):,}",
               "too rare": f"{int(r.too_rare):,}" + (f" + {unexplained}" if unexplained else "")}
        for sc in scores:
            row[SCORE_NAMES[sc]] = interval(r[f"{sc}_fraction"], r[f"{sc}_fraction_low"], r[f"{sc}_fraction_high"],
                                            fmt=pct)
        rows.append(row)
    return pd.DataFrame(rows).set_index("units")


def md(text: str) -> None:
    """Show ``text`` as Markdown in a chapter's output (the chapters' prose cells)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def pct(v: float, digits: int | None = None, significant: int | None = None) -> str:
    """``v`` as a percentage. With ``digits`` None: no decimals, except for a small non-zero share, which
    keeps one or two significant digits rather than printing as 0% (0.0039 -> 0.4%); ``significant``: that
    many significant digits whatever the size (3.2e-6 -> 0.00032%)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if significant is not None:
        return f"{100 * v:.{significant}g}%"
    if digits is None:
        p = abs(100 * v)
        digits = 0 if p == 0 or p >= 1 else 1 if p >= 0.1 else 2
    return f"{100 * v:.{digits}f}%"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def sci(v: float, digits: int = 2) -> str:
    """A number in scientific notation as prose prints it, never as Python does (``9.5e-04``): ``digits``
    significant digits times a power of ten in superscript, ``9.5 × 10⁻⁴``; between 0.01 and 10,000 the plain
    number (``0.031``); 0 as ``0``; None or nan as ``—``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if v == 0:
        return "0"
    if 0.01 <= abs(v) < 1:
        return f"{v:.{digits}g}"
    if 1 <= abs(v) < 10_000:  # whole digits are kept: 1234 -> 1,234, never 1.23e+03
        return f"{v:,.{max(digits - len(str(int(abs(v)))), 0)}f}".replace("-", "−")
    mantissa, exponent = f"{v:.{digits - 1}e}".split("e")
    mantissa = mantissa.replace("-", "−")
    return f"{mantissa} × 10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def span(formatted: list[str]) -> str:
    """The range of already formatted numbers as prose: "0.49 to 0.50", or "0.49" when they print alike
    (smallest and largest by numeric value of the digits, so "12%" sorts as 12)."""
    def key(t: str) -> float:
        try:
            return float(t.rstrip("%").replace(",", ""))
        except ValueError:
            return math.nan

    vals = sorted(set(formatted), key=key)
    if not vals:
        return "—"
    return vals[0] if len(vals) == 1 else f"{vals[0]} to {vals[-1]}"


def interval(value: float, low: float, high: float, fmt: str = "{:.3f}") -> str:
    """``value [low, high]`` in one format (``fmt``: a str.format pattern or a callable)."""
    f = fmt if callable(fmt) else fmt.format
    if low is None or high is None or any(isinstance(x, float) and math.isnan(x) for x in (low, high)):
        return f(value)
    return f"{f(value)} [{f(low)}, {f(high)}]"


def interval_pct(value: float, low: float, high: float, digits: int = 1) -> str:
    """A share and its interval as percentages, the unit written once: ``99.3% [99.2, 99.4]``."""
    if any(x is None or (isinstance(x, float) and math.isnan(x)) for x in (low, high)):
        return f"{100 * value:.{digits}f}%"
    return f"{100 * value:.{digits}f}% [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


class Optional(NamedTuple):
    """An artifact a chapter can do without: the artifact (None when it cannot be read) and one sentence
    saying why it is absent or how it was read ("" when it was read normally)."""

    art: Any
    note: str


def optional(stage: str, profile: str, name: str, command: str | None = None, **kwargs: Any) -> Optional:
    """:func:`store.load` for an artifact that may not be in the cache yet. Missing or corrupt: ``art`` None
    and a sentence naming the command that makes it (``command``, else the stage's). Stale only because an
    upstream artifact has changed since: read anyway (its own files verified), with a sentence naming the
    upstream artifacts that differ, so that the chapter can say what the numbers were made from."""
    try:
        return Optional(store.load(stage, profile, name, **kwargs), "")
    except store.CacheError as e:
        message = str(e)
        if "was made from a different" not in message:
            key = store.artifact_key(stage, profile, name)
            command = command or store.regenerate_command(stage, profile)
            return Optional(None, f"`{key}` is not in this cache yet (made by `{command}`), so this part is "
                                  "left out.")
    art = store.load(stage, profile, name, check_inputs=False, **kwargs)
    changed = ", ".join(f"`{k}`" for k in changed_inputs(art))
    return Optional(art, f"`{art.key}` was made from earlier versions of {changed}.")


def changed_inputs(art) -> list[str]:
    """The upstream artifacts of ``art`` whose content in the cache now differs from what it was made from
    (absent upstream artifacts are not counted)."""
    out = []
    for key, content_hash in art.manifest.get("inputs", {}).items():
        stage, rest = key.split("/", 1)
        profile, name = rest.split("-", 1)
        try:
            up = store.load(stage, profile, name, verify=False, check_inputs=False)
        except store.CacheError:
            continue
        if up.content_hash != content_hash:
            out.append(key)
    return out


def heldout_frame(art) -> Any:
    """``sae/<profile>-heldout``'s ``heldout.parquet`` as one row per (sae, metric) with value, low and high,
    indexed by (sae, metric)."""
    import pandas as pd

    return pd.read_parquet(art.file("heldout.parquet")).set_index(["sae", "metric"]).sort_index()


def has_controls(analysis_art) -> bool:
    """Whether an ``analysis/<profile>-features`` artifact holds the controls (its tables ``density_bins``
    and ``density_matched``, and the simulation and detection scores): analysis version 2 and later."""
    return "density_bins.parquet" in analysis_art.manifest.get("files", {})


def heldout_value(frame, sae: str, metric: str) -> tuple[float, float, float]:
    """(value, low, high) of one metric of one SAE (or neuron baseline) of :func:`heldout_frame`."""
    r = frame.loc[(sae, metric)]
    return float(r.value), float(r.low), float(r.high)


def neuron_baselines(frame) -> list[tuple[str, int, float]]:
    """The neuron top-k baselines of a held-out evaluation as (name, k, measured L0), by L0. A baseline's L0
    is at most k: where fewer than k neurons fire on a token, it keeps fewer."""
    names = [s for s in frame.index.get_level_values(0).unique() if s.startswith("neurons-top")]
    return sorted(((s, int(s.removeprefix("neurons-top")), heldout_value(frame, s, "l0")[0]) for s in names),
                  key=lambda t: t[2])


def bracket(frame, sae: str | float) -> tuple[Any, Any]:
    """The neuron baselines just below and just above ``sae``'s L0 (or an L0 given as a number): entries of
    :func:`neuron_baselines`, None where there is none; the fair comparison at equal sparsity."""
    l0 = float(sae) if isinstance(sae, (int, float)) else heldout_value(frame, sae, "l0")[0]
    base = neuron_baselines(frame)
    below = [b for b in base if b[2] <= l0]
    above = [b for b in base if b[2] > l0]
    return (below[-1] if below else None), (above[0] if above else None)


def beaten_at_equal_sparsity(frame, sae: str) -> Any:
    """The neuron baseline that beats ``sae`` at the same sparsity, or None: the one just above its L0, if
    within 2% of it (a comparison at equal mean L0 in all but name), that recovers more of the loss and leaves
    less of the variance, both with intervals that do not overlap (:func:`versus`)."""
    above = bracket(frame, sae)[1]
    if above is None or above[2] > 1.02 * heldout_value(frame, sae, "l0")[0]:
        return None
    wins = (versus(heldout_value(frame, sae, "ce_loss_recovered"),
                   heldout_value(frame, above[0], "ce_loss_recovered")) == "lower"
            and versus(heldout_value(frame, sae, "fvu"), heldout_value(frame, above[0], "fvu")) == "higher")
    return above if wins else None


def versus(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """'lower' or 'higher' when interval ``a`` (value, low, high) lies wholly below or above ``b``, else
    'indistinguishable'."""
    return "lower" if a[2] < b[1] else "higher" if a[1] > b[2] else "indistinguishable"


class EvalSet(NamedTuple):
    """What one ``sae/<profile>-heldout`` evaluation read, from its manifest."""

    split: str  # "val": consecutive windows of the corpus's val split; "heldout": heldout/<profile>-windows
    tokens: int  # predicted tokens evaluated
    windows: int
    per_window: int  # predicted tokens per window (a held-out window's last token is only a target)
    documents: int


def eval_set(art, context_length: int) -> EvalSet:
    """The evaluation set of a ``sae/<profile>-heldout`` artifact; ``context_length`` is the LM's (the window
    length when the evaluation's config leaves it at 0). Evaluations made before the split was recorded in
    the metrics read it from the config (they were all on ``val``)."""
    m, c = art.metrics, art.config
    split = str(m.get("split") or c.get("split") or "val")
    seq_len = int(c.get("seq_len") or context_length)
    per_window = seq_len - 1 if split == "heldout" else seq_len
    tokens = int(m["eval_tokens"])
    return EvalSet(split, tokens, tokens // per_window, per_window, int(m["n_documents"]))


def describe_eval_set(es: EvalSet) -> str:
    """``es`` in words, for a sentence: "131,072 tokens of the corpus's val split (1,024 windows of 128
    predicted tokens, from 170 documents)"."""
    where = "the held-out set" if es.split == "heldout" else f"the corpus's {es.split} split"
    return (f"{es.tokens:,} tokens of {where} ({es.windows:,} windows of {es.per_window} predicted tokens, from "
            f"{es.documents:,} documents)")


def seed_runs(names, recipe: str) -> list[str]:
    """The runs of ``recipe`` among ``names`` (e.g. the SAEs of a held-out evaluation): the recipe's own
    artifact (seed 0) first, then ``<recipe>-seed<n>`` by n."""
    import re

    names = list(names)
    pattern = re.compile(rf"{re.escape(recipe)}-seed(\d+)")
    others = sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))
    return ([recipe] if recipe in names else []) + [n for _, n in others]


def seed_spread(values, fmt: str = "{:.3f}") -> str:
    """The mean over seeds with the range of the seeds: ``0.031 (0.029–0.033)``; one value: ``0.031 (one
    seed)``. ``fmt``: a str.format pattern or a callable."""
    from .intervals import seed_summary

    f = fmt if callable(fmt) else fmt.format
    s = seed_summary(values)
    if s.n_seeds == 1:
        return f"{f(s.mean)} (one seed)"
    return f"{f(s.mean)} ({f(s.min)}–{f(s.max)})"


def seed_spread_pct(values, digits: int = 1) -> str:
    """:func:`seed_spread` of shares as percentages, the unit written once: ``99.3% (99.2–99.4)``."""
    from .intervals import seed_summary

    s = seed_summary(values)
    if s.n_seeds == 1:
        return f"{100 * s.mean:.{digits}f}% (one seed)"
    return f"{100 * s.mean:.{digits}f}% ({100 * s.min:.{digits}f}–{100 * s.max:.{digits}f})"


def decoder_norms(art) -> Any:
    """(n_features,) the length of each feature's decoder direction in a ``sae/<profile>-<recipe>`` artifact's
    weights (SAELens layout, ``W_dec`` (n_features, d_in)): 1 for every feature of a recipe that keeps them
    unit-norm, free under the anchor's normalisation along the input axis."""
    import numpy as np
    from safetensors.numpy import load_file

    from .sae import SAE_WEIGHTS_FILENAME

    w_dec = load_file(str(art.file(SAE_WEIGHTS_FILENAME)))["W_dec"].astype(np.float32)  # (n_features, d_in)
    return np.linalg.norm(w_dec, axis=1)


def resampling_checks(art, curve=None):
    """(steps, shares) of a literal-recipe SAE artifact: each resampling check (after step 1,000 i + 1, as the
    anchor counts) and the share of features it found dead and resampled, from the logged interval holding it
    (``curve``: its training curve, read from the artifact when None)."""
    import numpy as np
    import pandas as pd

    curve = pd.read_parquet(art.file("training_curve.parquet")) if curve is None else curve
    c = art.config["anchor"]
    steps = np.arange(c["resample_every"], c["n_steps"], c["resample_every"]) + 1
    ends = curve.step.to_numpy()
    shares = [int(curve.resampled.iloc[int(np.argmax(ends >= s))]) / c["n_features"] for s in steps]
    return steps, np.array(shares)


def and_join(items) -> str:
    """``["2", "5", "6"]`` -> ``"2, 5 and 6"``; two items joined by "and", one as it is."""
    items = list(items)
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


LATE_CHECK = 10
"""A literal run's "late" checks are those after step 1,000 * LATE_CHECK: past the anchor's early peak of dead
features (73% at step 8,000; "30-40% dead through most of training" after it)."""


def late_dead_share(art, curve=None) -> float:
    """The median share of features found dead and resampled at a literal run's checks after
    :data:`LATE_CHECK`."""
    import numpy as np

    return float(np.median(resampling_checks(art, curve)[1][LATE_CHECK:]))


def training_variance(art, curve=None) -> float:
    """The per-coordinate variance of a literal run's training batches in the units of our activations as they
    are: the median over its logged intervals of MSE / FVU, over the square of its input factor."""
    import pandas as pd

    curve = pd.read_parquet(art.file("training_curve.parquet")) if curve is None else curve
    return float((curve.mse / curve.fvu).median()) / art.metrics.get("input_scale", 1.0) ** 2


def loglog_crossing(x0: float, y0: float, x1: float, y1: float, target: float) -> float | None:
    """Where the straight line through (x0, y0) and (x1, y1) in log-log coordinates reaches ``target``; None
    unless ``target`` lies between y0 and y1 (an interpolation, never an extrapolation)."""
    if not min(y0, y1) <= target <= max(y0, y1) or y0 == y1:
        return None
    t = math.log(target / y0) / math.log(y1 / y0)
    return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))


class ScaleEstimate(NamedTuple):
    """What the anchor's logged end state says about its input scale c relative to our activations, supposing its
    run were the literal algorithm on our activations multiplied by c (see :func:`anchor_scale`)."""

    variance: float  # per coordinate, of the training batches, in the units of our activations as they are
    fvu_end: float  # the rescaled run's FVU on its last training batches
    lower: float  # from FVU < 1 alone: c >= sqrt(MSE_anchor / variance)
    upper: float  # the c at which the rescaled run's end FVU would give the anchor's MSE
    crossings: dict[str, float | None]  # metric -> the c where the log-log line through our two runs meets it
    # ({} without a run on our activations as they are)


def anchor_scale(unscaled, scaled, anchor: dict) -> ScaleEstimate:
    """:class:`ScaleEstimate` from two full-length literal runs (artifacts; ``scaled`` with metric ``input_scale``;
    ``unscaled`` None for the bounds alone) and the anchor's logged numbers (``anchors.WARD``), all in training
    units: the MSE and the L1 term at the end of training (per coordinate; x c^2 and x c for a run at scale c), L0
    and the median share dead at the late checks. ``upper`` is an upper bound, not a central estimate: a run trained
    at a smaller scale than ``scaled`` ends with a higher FVU than its, so it reaches the anchor's MSE below that c.
    The crossings assume each metric is a straight line in log-log coordinates between the two runs (two points:
    crude)."""
    import numpy as np

    var = training_variance(scaled)
    c1 = scaled.metrics["input_scale"]
    fvu_end = scaled.metrics["train_mse_end"] / (var * c1 ** 2)
    crossings: dict[str, float | None] = {}
    if unscaled is not None:
        c0 = unscaled.metrics.get("input_scale", 1.0)
        values = {"MSE": ("train_mse_end", anchor["sae_mse"]), "L1 term": ("train_l1_term_end", anchor["sae_l1"]),
                  "L0": ("l0", anchor["sae_l0_mean"])}
        crossings = {k: loglog_crossing(c0, unscaled.metrics[m], c1, scaled.metrics[m], target)
                     for k, (m, target) in values.items()}
        crossings["late dead share"] = loglog_crossing(c0, late_dead_share(unscaled), c1, late_dead_share(scaled),
                                                       float(np.median(anchor["sae_dead_per_check"][LATE_CHECK:])))
    return ScaleEstimate(variance=var, fvu_end=fvu_end, lower=float(np.sqrt(anchor["sae_mse"] / var)),
                         upper=float(np.sqrt(anchor["sae_mse"] / (var * fvu_end))), crossings=crossings)


def sae_compute_dtype(art, c: dict | None = None) -> str:
    """The dtype an SAE artifact's matmuls ran in: the recorded choice, else what ``dtype: auto`` picks on the
    machine its manifest records (bfloat16 on a GPU or a CPU with bf16 units, float32 otherwise)."""
    h = art.manifest["hardware"]
    rec = h.get("compute_dtype", {}).get("sae", {}).get("dtype")
    if rec:
        return str(rec)
    want = (c or {}).get("dtype", "auto")
    if want != "auto":
        return str(want)
    return "bfloat16" if h.get("gpu") or h.get("cpu_bf16") else "float32"


def harvest_dtype(hardware: dict) -> str:
    """The LM's precision in a harvest, from a manifest's hardware record."""
    rec = hardware.get("compute_dtype", {}).get("lm", {}).get("dtype")
    if rec:
        return str(rec)
    return "bfloat16" if hardware.get("gpu") or hardware.get("cpu_bf16") else "float32"


def analysis_dtype(art) -> str:
    """The LM's precision in an analysis artifact's passes: float32 since the stage fixed it
    (``info.lm_forward_dtype``), else what the machine that made it chose (its hardware record)."""
    pinned = art.manifest.get("info", {}).get("lm_forward_dtype")
    return pinned.split(":")[0] if pinned else harvest_dtype(art.manifest.get("hardware", {}))


def keyed_sampling(art) -> bool:
    """Whether an analysis artifact's dashboard interval samples are keyed by (seed, set, token, unit), the same
    on every machine (``info.interval_sampling``); else they came from a random stream, one draw per non-zero,
    which a re-run on another machine does not reproduce."""
    return str(art.manifest.get("info", {}).get("interval_sampling", "")).startswith("keyed")


def seed_precision(seeds_art, seed0_art) -> dict:
    """How the extra seeds of ``sae/<profile>-seeds`` differ from seed 0 beyond the seed, from the manifests:
    the activations artifact each read (``harvest``, ``harvest0``), the LM's precision in those harvests
    (``lm_dtype``, ``lm_dtype0``) and the SAE's compute precision (``sae_dtype``, ``sae_dtype0``);
    ``differs`` is True when any of them does; ``cpu``/``cpu0`` and ``commit``/``commit0`` (the code's version)
    of each run, ``setup_differs`` when either does."""
    from . import store

    def harvest_of(art):
        keys = [k for k in art.manifest["inputs"] if k.startswith("activations/")]
        return keys[0] if keys else None

    def lm_dtype_of(key):
        if key is None:
            return None
        kind, name = key.split("/", 1)
        profile, _, tail = name.partition("-")
        try:
            return harvest_dtype(store.load(kind, profile, tail, verify=False).manifest["hardware"])
        except Exception:  # noqa: BLE001 (a harvest not in this checkout: unknown)
            return None

    h, h0 = harvest_of(seeds_art), harvest_of(seed0_art)
    s_dtype = sae_compute_dtype(seeds_art, seeds_art.config.get("topk"))
    s_dtype0 = sae_compute_dtype(seed0_art, seed0_art.config.get("topk"))
    lm_d, lm_d0 = lm_dtype_of(h), lm_dtype_of(h0)
    cpu, cpu0 = (a.manifest.get("hardware", {}).get("cpu") for a in (seeds_art, seed0_art))
    commit, commit0 = (str(a.manifest.get("git_commit") or "").removesuffix("+dirty")[:7] or None
                       for a in (seeds_art, seed0_art))
    return {"harvest": h, "harvest0": h0, "lm_dtype": lm_d, "lm_dtype0": lm_d0, "sae_dtype": s_dtype,
            "sae_dtype0": s_dtype0, "differs": h != h0 or s_dtype != s_dtype0 or lm_d != lm_d0,
            "cpu": cpu, "cpu0": cpu0, "commit": commit, "commit0": commit0,
            "setup_differs": cpu != cpu0 or commit != commit0}


def seed_precision_words(sp: dict, n_seeds: int) -> str:
    """A clause for :func:`seed_precision`: what besides the seed separates seeds 1.. from seed 0."""
    last = f"seeds 1–{n_seeds - 1}" if n_seeds > 2 else "seed 1"
    setup = ([f"on another CPU ({sp['cpu']} against {sp['cpu0']})"] if sp.get("cpu") != sp.get("cpu0") else []) + (
        [f"with a later version of the code (commit {sp['commit']} against {sp['commit0']})"]
        if sp.get("commit") != sp.get("commit0") else [])
    if not sp["differs"]:
        if not setup:
            return "the other seeds differ from seed 0 in the seed alone"
        return (f"{last} share seed 0's activations and precision but were trained {' and '.join(setup)}, so "
                "their spread bounds seed, kernel and code-version variation together, not the seed's alone")
    return (f"{last} also differ from seed 0 in precision: they were trained on `{sp['harvest']}`, a re-harvest "
            f"of the same windows with the LM in {sp['lm_dtype'] or 'another precision'}, with the SAE's matmuls "
            f"in {sp['sae_dtype']}, where seed 0 read `{sp['harvest0']}` (the LM in "
            f"{sp['lm_dtype0'] or 'another precision'}) with its matmuls in {sp['sae_dtype0']}; their spread "
            f"bounds seed and precision variation together, not the seed's alone")


def score_config(fa, **changes: Any) -> Any:
    """The thresholds, density-bin width and bootstrap settings an analysis artifact ``fa`` scored with, as
    :func:`monosemantic.comparisons.passes` and ``matched_difference`` read them; ``changes`` override some (a
    threshold swept in a chapter)."""
    from types import SimpleNamespace

    keys = ("corr_threshold", "detection_threshold", "specificity_threshold", "lift_threshold",
            "density_bin_width", "n_boot", "seed")
    # an analysis artifact's config is the analysis's; a Llama run keeps the analysis's beside its own
    config = fa.config if "corr_threshold" in fa.config else fa.manifest.get("info", {}).get("analysis_config")
    if config is None:
        raise UserError(f"{fa.key} records no analysis thresholds; regenerate it with `{fa.command}`")
    return SimpleNamespace(**{**{k: config[k] for k in keys}, **changes})


def direct_comparison(fa, units, a: str, b: str, scores=("specificity", "sim_corr", "detection"), *,
                      cfg: Any = None, min_units: int = 1) -> dict:
    """Unit set ``a`` against set ``b`` of an analysis artifact ``fa`` (its ``units`` table), score by score:
    ``{score: {"at_b": a minus b matched to b's densities, "at_a": the same matched to a's densities,
    "verdict": "better" | "worse" | "mixed"}}`` (each a :class:`monosemantic.comparisons.Matched`, intervals
    included; "better" when a leads under both weightings with intervals above zero). ``cfg``: thresholds
    other than the artifact's (:func:`score_config`); ``min_units``: as for ``matched_difference``."""
    from . import comparisons

    cfg = cfg or score_config(fa)
    ua, ub = units[(units.set == a) & units.scored], units[(units.set == b) & units.scored]
    out = {}
    for sc in scores:
        pa, pb = comparisons.passes(ua, sc, cfg), comparisons.passes(ub, sc, cfg)
        at_b = comparisons.matched_difference(ua.density_val.to_numpy(), pa, ub.density_val.to_numpy(), pb,
                                          cfg.density_bin_width, cfg.n_boot, cfg.seed, min_units=min_units)
        rev = comparisons.matched_difference(ub.density_val.to_numpy(), pb, ua.density_val.to_numpy(), pa,
                                         cfg.density_bin_width, cfg.n_boot, cfg.seed, min_units=min_units)
        at_a = rev._replace(matched=-rev.matched, matched_low=-rev.matched_high, matched_high=-rev.matched_low,
                            raw=-rev.raw, raw_low=-rev.raw_high, raw_high=-rev.raw_low)
        up = at_b.matched_low > 0 and at_a.matched_low > 0
        down = at_b.matched_high < 0 and at_a.matched_high < 0
        out[sc] = {"at_b": at_b, "at_a": at_a, "verdict": "better" if up else "worse" if down else "mixed"}
    return out


# Other thresholds each score's verdict is checked at (the analysis's own are the first): a verdict that flips
# between them is the thresholds', not the units'
THRESHOLD_SWEEPS: dict[str, tuple[tuple[str, dict[str, float]], ...]] = {
    "specificity": (("lift 2", {"lift_threshold": 2.0}), ("lift 10", {"lift_threshold": 10.0}),
                    ("share 30%", {"specificity_threshold": 0.3}), ("share 70%", {"specificity_threshold": 0.7})),
    "sim_corr": (("0.3", {"corr_threshold": 0.3}), ("0.7", {"corr_threshold": 0.7})),
    "detection": (("0.7", {"detection_threshold": 0.7}), ("0.9", {"detection_threshold": 0.9})),
}


class Verdict(NamedTuple):
    """Whether the TopK features beat the neurons by one score, against every control (:func:`verdicts`)."""

    score: str
    vs_neurons: Any  # comparisons.Matched: TopK minus neurons at the neurons' densities
    vs_random: str | None  # the pass fractions over all densities: "above", "below", "not distinguishable from"
    vs_random_model: Any  # comparisons.Matched: TopK minus the random model's SAE at the neurons' densities, or None
    sweep: list[tuple[str, Any]]  # (threshold label, TopK minus neurons at the neurons' densities there)
    counts: bool  # every one of the above in the features' favour, interval clear of zero

    @property
    def robust(self) -> bool:
        return all(m.matched_low > 0 for _, m in self.sweep)


def verdicts(fa, units, scores=("specificity", "sim_corr", "detection")) -> dict[str, Verdict]:
    """For each score: does the TopK SAE beat the neurons once density is matched (weights: the neurons'
    densities), beat the random dictionary, beat the SAE of the randomly initialised model at those same
    densities, and keep beating the neurons at the other thresholds of :data:`THRESHOLD_SWEEPS`? A score
    counts in the features' favour only when all of these hold. Bins with fewer than :data:`MIN_BIN_UNITS`
    units of either set are left out (their bootstrap has no width)."""
    import pandas as pd

    from . import comparisons

    bins_t = pd.read_parquet(fa.file("density_bins.parquet"))
    allbin = bins_t[bins_t.bin == "all"].set_index("set")
    sets = {k: units[(units.set == k) & units.scored] for k in ("neurons", "topk", "random-model")}
    nd = sets["neurons"].density_val.to_numpy()
    out = {}
    for i, sc in enumerate(scores):
        def vs(a: str, b: str, cfg, weight=nd, sc=sc, i=i):
            return comparisons.matched_difference(
                sets[a].density_val.to_numpy(), comparisons.passes(sets[a], sc, cfg), sets[b].density_val.to_numpy(),
                comparisons.passes(sets[b], sc, cfg), cfg.density_bin_width, cfg.n_boot, cfg.seed + i,
                min_units=MIN_BIN_UNITS, weight_density=weight)

        cfg = score_config(fa)
        neurons = vs("topk", "neurons", cfg)
        vr = None
        if "random" in allbin.index:
            t, r = allbin.loc["topk"], allbin.loc["random"]
            vr = ("above" if t[f"{sc}_fraction_low"] > r[f"{sc}_fraction_high"] else
                  "below" if t[f"{sc}_fraction_high"] < r[f"{sc}_fraction_low"] else "not distinguishable from")
        rm = vs("topk", "random-model", cfg) if len(sets["random-model"]) else None
        sweep = [(label, vs("topk", "neurons", score_config(fa, **change))) for label, change in
                 THRESHOLD_SWEEPS.get(sc, ())]
        counts = (neurons.matched_low > 0 and vr in (None, "above")
                  and (rm is None or rm.matched_low > 0) and all(m.matched_low > 0 for _, m in sweep))
        out[sc] = Verdict(sc, neurons, vr, rm, sweep, bool(counts))
    return out



NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def count_words(n: int, noun: str) -> str:
    """A count and its noun as prose: "one cell", "two cells", "12 cells" (words up to ten, as style guides ask)."""
    return f"{NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else f'{n:,}'} {noun}{'' if n == 1 else 's'}"


def signed(v: float, fmt: str = "{:+.0f}") -> str:
    """A signed number with a true minus sign, and no sign on a value that rounds to zero: ``+6``, ``−3``, ``0``."""
    text = fmt.format(v)
    return text.lstrip("+-") if float(text) == 0 else text.replace("-", "−")


def signed_interval(value: float, low: float, high: float, scale: float = 100) -> str:
    """A signed difference and its interval, scaled (to percentage points by default): ``+6 [+2, +10]``; with
    one decimal where a bound would round to 0, so that its side of zero shows: ``+4.4 [+0.1, +8.9]``."""
    values = [scale * value, scale * low, scale * high]
    fmt = "{:+.1f}" if any(round(v) == 0 for v in values[1:]) else "{:+.0f}"
    v, lo, hi = (signed(x, fmt) for x in values)
    return f"{v} [{lo}, {hi}]"


def points(m) -> str:
    """A matched difference in percentage points with its interval: ``+6 [+2, +10]`` (:func:`signed_interval`)."""
    return signed_interval(m.matched, m.matched_low, m.matched_high)


class SeedMatches(NamedTuple):
    """``universality.parquet`` of ``sae/<profile>-universality``, as the book reads it."""

    all: Any  # DataFrame: every match of a feature that fired on the density sample (a dead one has no direction)
    seeds: Any  # DataFrame: the matches between seeds of one recipe
    null: Any  # DataFrame: the matches to or from the SAE of the randomly initialised model (a shape-only null)
    width: int  # the dictionaries' width (every run matched has the same)

    def of(self, recipe: str) -> Any:
        """The matches between seeds of ``recipe`` alone (runs ``<recipe>`` and ``<recipe>-seed<n>``)."""
        return self.seeds[self.seeds.run.str.split("-seed").str[0] == recipe]


def seed_matches(art) -> SeedMatches:
    """The seed-to-seed and null matches of a universality artifact (:class:`SeedMatches`)."""
    import pandas as pd

    from .sae_train import RANDOM_MODEL

    table = pd.read_parquet(art.file("universality.parquet"))
    width = int(table.feature.max()) + 1
    fired = table[table.density > 0]
    is_null = (fired.run == RANDOM_MODEL) | (fired.other == RANDOM_MODEL)
    return SeedMatches(fired, fired[~is_null], fired[is_null], width)
