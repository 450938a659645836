"""``monosemantic causal``: do the named features *do* what their labels say? Clamp and ablate them in the
running model, against random directions of the same push and against other features' directions (issue 18,
item 6).

A feature i of an SAE on the MLP's hidden layer has an activation f_i(h) and a decoder direction d_i.
Interventions edit the hidden activation h and keep everything the SAE does not explain (the "error term"),
as Templeton et al. (2024, "Scaling Monosemanticity", section "Feature steering") do; the anchor's notebook
(``generate_with_pinned_features``) instead replaces h by the SAE's reconstruction with the feature pinned
at 100, dropping the error term:

- **clamp** to a value c: h' = h + (c - f_i(h)) d_i, so that in the SAE's decomposition of h (its
  reconstruction plus the error) the feature's term becomes c d_i; c is a multiple of the largest activation
  the feature reaches on the explanation text (``clamp_multiple``, and ``dose_multiples`` for a dose series);
- **ablate**: h' = h - f_i(h) d_i, the feature's contribution removed where it fires.

**Where it is measured, and why that is exact.** The model has one layer, and its MLP comes after the
attention: the hidden activation at position t reaches the output only at t, through ``fc_out``, the final
LayerNorm and the unembedding. So an edit at every position changes each position's next-token
distribution exactly as an edit at that position alone does, and the stage caches, for a sample of held-out
positions, the hidden activation and the residual stream after the MLP, then reads each edit's next-token
distribution from those alone (:func:`~monosemantic.causal_edits.fast_shift`; the edits and the read-out
live in :mod:`monosemantic.causal_edits`, whose :func:`~monosemantic.causal_edits.edit_logits` and
:func:`~monosemantic.causal_edits.shift` are the plain form of that read-out, kept as the reference the
tests check it against, and checked themselves against the full forward pass with the edit hooked in). That
is what lets every feature meet ``n_random`` random directions.

**The controls**, each with the feature's coefficients: ``n_random`` random directions, drawn afresh for each
feature, and ``n_decoder`` decoder directions of other scored features of the SAE, each scaled so that it
moves the MLP's output as far as the feature's direction does (||W_out r|| = ||W_out d_i||), so a feature's
effect is compared with what any push of that size does where the model reads it; and two directions fitted
without the SAE, scaled the same way: the *difference of means* (the mean hidden activation where the feature
fires minus the mean over every position, on the explore half below) and the family's *best neuron* (the
neuron the analysis finds most specific to the family); each fitted control also a second time, rescaled so
that its main clamp moves the next-token distribution as far (mean KL) as the feature's does
(:func:`kl_matched_scale`; direction ``mean_difference_kl``, ``best_neuron_kl``), since an equal push in the
residual stream can still move the output more. The feature's *rank* among a control's directions is
the test: rank 1 of n + 1 has probability 1 / (n + 1) if its direction were one more of them.

**The design.** The clamp at ``clamp_multiple`` and at 1x, each on every sampled position and only where the
feature fires; the ablation where it fires, read as the model computes it and with the final LayerNorm's
scale frozen at its unedited value. Edits where the feature fires need ``min_firing_positions`` of them in
``min_firing_documents`` test-half documents. The main cells (the clamp at ``clamp_multiple`` everywhere, the
ablation) use every control; the others ``cell_random`` random directions with the rest.

**The measures**, on the next-token distribution at each sampled position: the KL divergence KL(p || p'), and
the change in log-odds of three masses, each on its own token set:

- the *family*: the vocabulary tokens that the feature's family detector marks when read alone
  (:func:`vocab_family_masks`);
- the *predicted* tokens: the ``predicted_tokens`` next tokens whose probability after the feature fires
  exceeds their overall probability most, counted on one half of the held-out documents (the *explore*
  half); every measure is then taken on the other half (the *test* half), so the prediction is fixed before
  the positions it is tested on are read. It states what the feature's firings foretell, from observation;
  every direction is measured on the feature's set, so any direction fit to the firings (a difference of
  means, a neuron) would be expected to move it too, and only such a control would make it specific to the SAE;
- each direction's *own* tokens: the ``promoted_tokens`` tokens its direct logit effect raises most, so a
  random direction is measured on what it promotes, as the feature is (the fair form of the promoted-token
  measure);
- *self*: for the feature and each other feature's decoder direction, the tokens that feature's own firings
  predict (counted on the explore half in the same scan), so that "does a direction write what its firings
  foretell?" is asked of every feature alike; ranked among the decoder directions only.

Log-odds rather than mass: a family with 0.1% of the mass that rises to 1% has moved as much as one at 10%
rising to 50%, and a raw difference of masses would rank only the second. The change in mass (percentage
points) is kept beside it.

**Which features.** For each family with enough vocabulary tokens, up to ``per_family`` features drawn at
random (seeded) from those the analysis scored specific to it that fire often enough on held-out text: not
the most specific one, which favours single-token detectors, and not one picked by hand.

**In text.** Greedy continuations of a few prompts (unedited, the feature clamped at each of
``generation_multiples``, a random direction clamped, the anchor's pinned reconstruction at the clamp value
and at ``pin_value``), and sampled ones (temperature 1), where the share of generated tokens in the
feature's family is counted for the feature and for ``sample_random`` random directions; and the anchor's
protocol (``generate_with_pinned_features``: ``pin_tokens`` tokens sampled after ``<|endoftext|>`` with the
feature pinned at ``pin_value`` in the reconstruction, the error term dropped), against the reconstruction
alone and other features pinned the same way; and that protocol again at this SAE's scale (``pinned_matched``:
the feature pinned at the clamp value, other features at the value that pushes the residual stream as hard).

Writes ``analysis/<profile>-causal``: ``causal.parquet`` (feature x cell of the design x direction: the
feature, the mean of the random directions, their paired difference and the two fitted controls, with 95%
intervals over test-half documents, and the feature's ranks), ``random_directions.parquet`` (each control
direction's own result), ``dose.parquet``, ``predicted.parquet`` (each feature's predicted tokens),
``generations.parquet`` and ``sampling.parquet``.

    monosemantic causal --profile cpu
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .analysis.families import vocab_family_masks  # noqa: F401 (the chapters read it here)
from .causal_edits import (  # noqa: F401 (RESID, Cached, cache_positions, kl_matched_scale: read here too)
    RESID,
    Cached,
    Readout,
    Shift,
    cache_positions,
    coefficients,
    edit_hook,
    fast_shift,
    kl_matched_scale,
    random_directions,
    rank_first,
    readout,
    writes,
)
from .causal_scan import Scan, predicted, sample_positions, scan  # noqa: F401 (read here too)
from .config import ConfigError, StageConfig, UserError, check_positive

DEFAULT_PROFILE = "cpu"
PROMPTS = ("The", "In 1998, the", "def main(", "The license", "Der")
MEASURES = ("family", "predicted", "own", "self")  # the token sets whose mass each edit is measured on, by its
# log-odds (columns <set>_logodds and their ranks <set>_rank; dmass_<set> its change in probability, beside the
# KL); "self" is each direction's own predicted tokens, defined for the feature and for other features' decoder
# directions only, so it is ranked among those (<set>_rank_dec)
RANDOM_MEASURES = ("family", "predicted", "own")  # the measures a random direction is ranked against
KL_MATCHED = "_kl"  # the suffix of a fitted control rescaled to the feature's KL in the main clamp
CONTROLS = ("random", "decoder", "mean_difference", "best_neuron", "mean_difference_kl", "best_neuron_kl")


@dataclasses.dataclass(frozen=True)
class CausalConfig(StageConfig):
    """Which features, how hard they are pushed, against what, on how much held-out text."""

    STAGE: ClassVar[str] = "analysis"
    VERSION: ClassVar[int] = 10  # 2: paired feature-minus-random rows; 3: output-matched control, base mass;
    # 4: 20 random directions, each one's result kept, the feature's rank among them; 5: ties of family share
    # broken by held-out firings, 8 features, the mass on the tokens each feature promotes; 6: each control
    # direction also measured on the tokens it promotes itself, other features' decoder directions, a dose
    # series; 7: read from cached positions (100 random directions, fresh per feature), log-odds, features
    # drawn at random per family, tokens predicted on one half of the held-out documents and tested on the
    # other, sampled text; 8: a difference-of-means direction and the family's best neuron as controls, other
    # features' directions measured on their own predicted tokens, clamps at 1x and 5x on all and on firing
    # positions, ablation only with enough firings (and with the LayerNorm scale frozen), the anchor's pinned
    # reconstruction, generations at several strengths, every held-out window scanned; 9: each direction's own base
    # mass, the fitted controls also rescaled to the feature's KL in the main clamp (direction "<kind>_kl"), four
    # times the sampled text, the pinned protocol also at the clamp value with push-matched controls; 10: a
    # family's vocabulary also holds the tokens that begin one of its characters (byte_aware_families),
    # greedy continuations kept with cut characters as <0xNN>, prompts after <|endoftext|> with the clamps off
    # at that first position, decoder controls drawn from other families than the tested feature's, the best
    # neuron also measured on its own predicted tokens ("self"), no predicted tokens below min_predicted_tokens

    sae: str = "topk"
    """The SAE artifact (``sae/<profile>-<sae>``) whose features are tested."""
    per_family: int = 3
    """Features drawn (at random, seeded) from each family's qualifying features."""
    n_features: int = 48
    """At most this many features in all (a seeded draw of the per-family picks when there are more)."""
    min_heldout_firings: int = 50
    """A feature qualifies only if it fires at least this often on the held-out text."""
    min_family_tokens: int = 20
    """A family is only used if at least this many vocabulary tokens belong to it when read alone."""
    byte_aware_families: bool = True
    """A token that begins a character without finishing it belongs to that character's script where its bytes
    fix the script (:func:`vocab_family_masks`): byte-level BPE splits Arabic, CJK and Greek into such pieces,
    which the family's features predict and a character-level reading misses."""
    clamp_multiple: float = 5.0
    """Clamp value = this x the feature's largest activation on the explanation text (a high value, as
    feature steering uses: the largest natural value barely moves the output of a rare feature)."""
    dose_multiples: tuple[float, ...] = (1.0, 2.0, 10.0)
    """Further clamp values (multiples of the largest activation) for the feature and ``dose_random`` random
    directions on the same positions."""
    dose_random: int = 5
    n_random: int = 100
    """Random directions per feature (fresh for each): rank 1 of ``n_random + 1`` has p = 1 / (n_random + 1)."""
    n_decoder: int = 20
    """Decoder directions of other scored features (a seeded draw per feature): does the feature's own
    direction matter, or would any direction the SAE learned do?"""
    promoted_tokens: int = 10
    """Each direction's own tokens: this many of its largest direct logit effects."""
    predicted_tokens: int = 10
    """The tokens that follow the feature's firings on the explore half more often than they follow any token."""
    min_predicted_tokens: int = 3
    """A direction with fewer predicted tokens than this has none: a measure on one or two tokens is too noisy to
    rank (its predicted-token results are left undefined, and counted)."""
    scan_windows: int = 0
    """Held-out windows scanned (spread over the set; 0: all) for each feature's firings and next tokens."""
    positions: int = 512
    """Test-half positions each edit is measured on: a seeded sample of all positions, or of the feature's firing
    positions (all of them when fewer)."""
    min_firing_positions: int = 50
    """Edits at a feature's firing positions (ablation, and the clamps there) need at least this many of them..."""
    min_firing_documents: int = 10
    """... in at least this many test-half documents (an interval over documents needs documents)."""
    cell_random: int = 20
    """Random directions in the further cells of the design (1x, firing positions, the frozen-scale ablation);
    the main clamp and ablation use all ``n_random``."""
    generation_multiples: tuple[float, ...] = (1.0, 5.0, 10.0)
    """Greedy continuations with the feature clamped at these multiples of its largest activation."""
    pin_value: float = 100.0
    """The anchor's ``pin_amount``: its notebook generates with the feature pinned at 100 in the reconstruction."""
    pin_tokens: int = 32
    """Tokens sampled after ``<|endoftext|>`` with a feature pinned (the anchor's ``max_new_tokens``)."""
    batch_windows: int = 64
    new_tokens: int = 16
    """Tokens generated per prompt, greedy and sampled."""
    samples: int = 16
    """Sampled continuations per prompt and direction (temperature 1)."""
    sample_random: int = 5
    """Random directions whose sampled text is counted beside the feature's."""
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "per_family", "n_features", "min_heldout_firings", "min_family_tokens", "n_random",
                       "positions", "batch_windows", "new_tokens", "n_boot", "promoted_tokens",
                       "predicted_tokens", "min_predicted_tokens", "n_decoder", "dose_random", "samples",
                       "sample_random",
                       "min_firing_positions", "min_firing_documents", "cell_random", "pin_tokens", integer=True)
        check_positive(self, "scan_windows", integer=True, zero=True)
        check_positive(self, "clamp_multiple", "pin_value")
        for name in ("dose_multiples", "generation_multiples"):
            if not all(isinstance(m, (int, float)) and m > 0 for m in getattr(self, name)):
                raise ConfigError(f"causal.{name} must be positive numbers, got {getattr(self, name)!r}")
        if self.min_predicted_tokens > self.predicted_tokens:
            raise ConfigError(f"causal.min_predicted_tokens ({self.min_predicted_tokens}) must be at most "
                              f"predicted_tokens ({self.predicted_tokens})")
        for name in ("dose_random", "sample_random", "cell_random"):
            if getattr(self, name) > self.n_random:
                raise ConfigError(f"causal.{name} ({getattr(self, name)}) must be at most n_random ({self.n_random})")


# --- choosing the features and what they predict ---------------------------------------------------------------

def qualifying(units, family: str, cfg: CausalConfig, heldout_tokens: int, specificity: float, lift: float):
    """The rows of ``units`` (one set of the analysis's table) scored specific to ``family`` (share at least
    ``specificity`` at a lift of at least ``lift``) that fire at least ``min_heldout_firings`` times held out."""
    return units[units["scored"] & (units["family"] == family) & (units["family_share"] >= specificity)
                 & (units["family_lift"] >= lift) & (units["density_val"] * heldout_tokens >= cfg.min_heldout_firings)]


def pick(units, families: list[str], family_sizes: dict[str, int], cfg: CausalConfig, heldout_tokens: int,
         specificity: float, lift: float):
    """The features to test: for each family with at least ``min_family_tokens`` vocabulary tokens, up to
    ``per_family`` drawn at random (seeded by ``seed`` and the family) from its :func:`qualifying` features; at
    most ``n_features`` in all (a seeded draw when there are more). Rows of ``units``, by family then unit."""
    import zlib

    rows = []
    for fam in families:
        if family_sizes.get(fam, 0) < cfg.min_family_tokens:
            continue
        cand = qualifying(units, fam, cfg, heldout_tokens, specificity, lift).sort_values("unit")
        rng = np.random.default_rng([cfg.seed, zlib.crc32(fam.encode())])
        take = np.sort(rng.choice(len(cand), min(cfg.per_family, len(cand)), replace=False))
        rows.extend(cand.iloc[i] for i in take)
    if len(rows) > cfg.n_features:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(rows), cfg.n_features, replace=False))
        rows = [rows[i] for i in keep]
    return rows


def effects(ro: Readout, pushes: Tensor, coeff: Tensor, sets: list[list[Tensor]], frozen: bool = False
            ) -> list[Shift]:
    """The :class:`Shift` of each edit at the positions of ``ro``: direction j writes ``pushes[j]`` (d_model,)
    per unit of ``coeff`` (N,), and is measured on the token sets ``sets[j]`` (token-id tensors)."""
    return [fast_shift(ro, push, coeff, s_, frozen) for push, s_ in zip(pushes, sets, strict=True)]


def self_logodds(summary: dict, who: str, special_at: dict[str, int]) -> float:
    """The change in log-odds of a direction's own predicted tokens in one cell's ``summary`` (from
    :func:`_summaries`): the feature's (position 0), or a fitted control's at its position ``special_at[who]``;
    nan for the random directions' mean and the difference, which have no predicted tokens of their own."""
    at = 0 if who == "feature" else special_at.get(who)
    return float(summary["self_logodds"][at]) if at is not None else float("nan")


def _summaries(shifts: list[Shift], sets: list[list[Tensor]] | None = None) -> dict[str, np.ndarray]:
    """Each edit's mean over positions: ``kl`` and, per token set (:data:`MEASURES`), the change of its log-odds
    (``family_logodds``, ...), of its mass in probability (``dmass_family``, ...) and its mass before the edit
    (``base_mass_family``, ...: each direction's own set differs, and so does its base); arrays over edits, NaN
    where an edit's token set (``sets``, when given) is empty."""
    out = {"kl": np.array([float(s.kl.mean()) for s in shifts])}
    for j, name in enumerate(MEASURES[: shifts[0].dlogodds.shape[1]] if shifts else MEASURES):
        empty = np.array([sets is not None and len(sets[i][j]) == 0 for i in range(len(shifts))])
        for key, field in ((f"{name}_logodds", "dlogodds"), (f"dmass_{name}", "dmass"),
                           (f"base_mass_{name}", "mass")):
            out[key] = np.where(empty, np.nan, [float(getattr(s, field)[:, j].mean()) for s in shifts])
    return out


def _ranks(summary: dict[str, np.ndarray], sel: list[int], mode: str, suffix: str,
           measures: tuple[str, ...] = RANDOM_MEASURES) -> dict[str, int]:
    """The feature's (index 0) rank among the edits ``sel`` on the KL and on each measure's log-odds (controls
    where a measure is undefined left out; 0 where the feature's is)."""
    sign = 1.0 if mode == "clamp" else -1.0

    def rank(values: np.ndarray, sgn: float) -> int:  # 0: undefined (the feature's own token set is empty)
        v = values[sel]
        return 0 if np.isnan(v[0]) else rank_first(v[~np.isnan(v)], sgn)

    return {f"kl_rank{suffix}": rank(summary["kl"], 1.0),
            **{f"{m}_rank{suffix}": rank(summary[f"{m}_logodds"], sign) for m in measures}}


def best_neuron(neurons, family: str):
    """The neuron the analysis found most specific to ``family`` (the highest share among scored neurons whose
    best family it is; more held-out firings break ties), or None."""
    cand = neurons[neurons["scored"] & (neurons["family"] == family)]
    if cand.empty:
        return None
    return cand.sort_values(["family_share", "density_val", "unit"], ascending=[False, False, True]).iloc[0]


@torch.no_grad()
def run_stage(profile: str, cfg: CausalConfig, log=print) -> None:
    import zlib

    import pandas as pd

    from . import heldout, store, tokenizer
    from . import sae as sae_mod
    from .analysis import FAMILY_NAMES, N_VOCAB, logit_effects
    from .analysis.stage import MEASURE_DTYPE
    from .harvest import HOOK, spread_rows
    from .intervals import bootstrap, group_sums
    from .lm import load_pretrained

    model = load_pretrained(profile, dtype=MEASURE_DTYPE).eval()  # measured alike on every machine
    lm_art = store.load("lm", profile, "model")
    sae_art = store.load("sae", profile, cfg.sae)
    sae = sae_mod.load(sae_art.path).eval()
    an = store.load("analysis", profile, "features")
    units_all = pd.read_parquet(an.file("units.parquet"))
    set_name = cfg.sae if cfg.sae in set(units_all["set"]) else "topk"
    units = units_all[units_all["set"] == set_name]
    if units.empty:
        raise UserError(f"analysis/{profile}-features has no units of set {set_name!r}; "
                        f"run `monosemantic analyze --profile {profile}`")
    if not (store.artifact_path("heldout", profile, "windows") / store.MANIFEST).is_file():
        raise UserError(f"the causal test reads the held-out set; make it with `monosemantic heldout --profile "
                        f"{profile}`")
    heldout_tokens = int(an.metrics.get("held_out_tokens", 0))
    tok = tokenizer.load()
    masks = torch.as_tensor(vocab_family_masks(tok.token_bytes(list(range(N_VOCAB))),
                                               byte_aware=cfg.byte_aware_families))  # (V, F)
    sizes = {f: int(masks[:, j].sum()) for j, f in enumerate(FAMILY_NAMES)}
    picks = pick(units, list(FAMILY_NAMES), sizes, cfg, heldout_tokens, float(an.config["specificity_threshold"]),
                 float(an.config["lift_threshold"]))
    if not picks:
        raise UserError("no feature qualifies (scored specific to a family with vocabulary tokens, firing "
                        f">= {cfg.min_heldout_firings} times held out); lower min_heldout_firings")
    features = [int(u["unit"]) for u in picks]
    inputs = [lm_art, sae_art, an, store.load("heldout", profile, "windows")]

    # the held-out set, its documents in two halves: what a feature's firings foretell is counted on one, every
    # edit measured on the other
    held = heldout.load_windows(profile)
    w_all = torch.from_numpy(held.windows.astype(np.int64))
    inputs_all, targets_all, docs_all = w_all[:, :-1], w_all[:, 1:], held.documents
    names = np.unique(docs_all)
    explore_docs = names[np.random.default_rng(cfg.seed).permutation(len(names))[: len(names) // 2]]
    explore = np.isin(docs_all, explore_docs)
    rows = spread_rows(len(inputs_all), cfg.scan_windows)
    # the other features whose decoder directions are controls, drawn per tested feature before the scan, which
    # counts what their firings predict too (each is measured on its own predicted tokens)
    # (from another family than the tested feature's: a sibling would write the family too)
    family_of = dict(zip(units["unit"].astype(int), units["family"].fillna("").astype(str), strict=True))
    pool = np.sort(units[units["scored"] & ~units["unit"].isin(features)]["unit"].to_numpy().astype(np.int64))
    pool_family = np.array([family_of[int(u)] for u in pool])
    dec_ids_of = {}
    for f in features:
        cand = pool[pool_family != family_of[f]]
        dec_ids_of[f] = np.sort(np.random.default_rng([cfg.seed, f, 1]).choice(cand, min(cfg.n_decoder, len(cand)),
                                                                                replace=False))
    extra = sorted({int(d) for ids in dec_ids_of.values() for d in ids})
    # each family's best neuron is a fitted control; the scan counts what its firings predict too, so that it can
    # also be measured on its own predicted tokens, as each feature is
    neurons = units_all[units_all["set"] == "neurons"]
    best = {fam: best_neuron(neurons, fam) for fam in {str(u["family"]) for u in picks}}
    best_ids = sorted({int(b["unit"]) for b in best.values() if b is not None})
    log(f"causal: {len(features)} features from {len({str(u['family']) for u in picks})} families; scanning "
        f"{len(rows):,} held-out windows ({int(explore[rows].sum()):,} in the explore half), counting next tokens "
        f"for {len(extra)} control features too")
    found = scan(model, sae, HOOK, inputs_all, targets_all, rows, explore, features, cfg.batch_windows, N_VOCAB,
                 extra=extra, neurons=best_ids)
    extra_row = {f: len(features) + i for i, f in enumerate(extra)}
    neuron_row = {u: len(features) + len(extra) + i for i, u in enumerate(best_ids)}
    clamp_at = cache_positions(model, HOOK, inputs_all, sample_positions(found.positions, cfg.positions, cfg.seed),
                               docs_all, cfg.batch_windows)
    clamp_ro = readout(model, clamp_at.resid, N_VOCAB)

    def own_tokens(directions: Tensor) -> Tensor:  # (n, P) the tokens each direction's direct effect raises most
        return logit_effects(model, directions.float())[:, :N_VOCAB].topk(cfg.promoted_tokens, dim=1).indices

    def predicted_of(row: int) -> Tensor:  # none when fewer than min_predicted_tokens qualify
        p_ = predicted(found.next_counts[row], found.all_counts, cfg.predicted_tokens)
        return torch.as_tensor(p_ if len(p_) >= cfg.min_predicted_tokens else p_[:0])

    # each prompt after <|endoftext|>, as every training document starts; the clamps leave that position alone
    prompts = [torch.tensor([[tokenizer.EOT_ID, *tok.encode(p)]]) for p in PROMPTS]
    eot_prompt = torch.tensor([[tokenizer.EOT_ID]])
    fam_rows, singles, dose, gens, sampled, preds = [], [], [], [], [], []
    skipped_firing = 0

    def greedy(edit) -> list[str]:
        texts = []
        for ids in prompts:
            with model.hooks({HOOK: edit} if edit else {}):
                out = model.generate(ids, cfg.new_tokens, temperature=0)
            texts.append(tok.display(out[0, ids.shape[1]:].tolist()))  # cut characters as <0xNN>
        return texts

    def family_share(edit, fam: Tensor, seed: int, starts: list[Tensor], n_new: int) -> tuple[float, int]:
        """The share of sampled continuation tokens (each prompt of ``starts``, ``samples`` each) in the family."""
        g = torch.Generator().manual_seed(seed)
        hits = total = 0
        for ids in starts:
            with model.hooks({HOOK: edit} if edit else {}):
                out = model.generate(ids.repeat(cfg.samples, 1), n_new, temperature=1.0, generator=g)
            new = out[:, ids.shape[1]:].reshape(-1)
            hits += int(fam[new].sum())
            total += len(new)
        return hits / total, total

    base_text = greedy(None)
    for n, unit in enumerate(picks):
        feature, family = int(unit["unit"]), str(unit["family"])
        top = float(unit["max"])
        value = cfg.clamp_multiple * top
        fam = masks[:, FAMILY_NAMES.index(family)]
        pred = predicted_of(n)
        preds.extend({"feature": feature, "family": family, "rank": i, "token": int(t),
                      "after_firing": float(found.next_counts[n, t] / max(found.next_counts[n].sum(), 1)),
                      "overall": float(found.all_counts[t] / max(found.all_counts.sum(), 1))}
                     for i, t in enumerate(pred.tolist()))
        # the directions: the feature's, then the controls (fresh random ones, other features' decoder directions,
        # the difference of the mean hidden activation where the feature fires and everywhere, the family's best
        # neuron), each scaled to push the residual stream as far as the feature's
        d_f = sae.W_dec[feature].detach().float()
        push_f = writes(model, d_f[None])[0]
        seed_f = [cfg.seed, feature]
        randoms = random_directions(sae.cfg.d_in, cfg.n_random, int(np.random.default_rng(seed_f).integers(2**62)))
        dec_ids = dec_ids_of[feature]
        decoders = sae.W_dec[torch.as_tensor(dec_ids, dtype=torch.long)].detach().float()
        kinds = ["feature"] + ["random"] * len(randoms) + ["decoder"] * len(decoders)
        index = [-1, *range(len(randoms)), *range(len(decoders))]
        source = [-1] * (1 + len(randoms)) + [int(d) for d in dec_ids]
        specials = []
        md = found.h_firing[n] - found.h_all
        if np.isfinite(md).all() and np.linalg.norm(md) > 0:
            specials.append(("mean_difference", torch.as_tensor(md, dtype=torch.float32), -1))
        bn = best[family]
        if bn is not None:
            e = torch.zeros(sae.cfg.d_in)
            e[int(bn["unit"])] = 1.0
            specials.append(("best_neuron", e, int(bn["unit"])))
        # each fitted control again, rescaled to move the next-token distribution as far (by KL) as the feature's
        # main clamp does: pushed as hard in the residual stream, a direction can still move the output more
        specials += [(f"{kind}{KL_MATCHED}", v, src) for kind, v, src in list(specials)]
        for kind, _, src in specials:
            kinds.append(kind)
            index.append(0)
            source.append(src)
        controls = torch.cat([randoms, decoders, *(v[None] for _, v, _ in specials)])
        push_c = writes(model, controls)
        pushes = torch.cat([push_f[None], push_c * (push_f.norm() / push_c.norm(dim=1))[:, None]])
        own = [own_tokens(d_f[None])[0], *own_tokens(controls)]  # a direction's own tokens: its scale is irrelevant
        empty = torch.zeros(0, dtype=torch.long)
        selfs = [pred, *([empty] * len(randoms)), *(predicted_of(extra_row[int(d)]) for d in dec_ids),
                 *(pred if kind.startswith("mean_difference") else predicted_of(neuron_row[src])
                   for kind, _, src in specials)]
        main_coeff = coefficients(sae.encode(clamp_at.h)[:, feature], "clamp", value)
        for i, k in enumerate(kinds):
            if k.endswith(KL_MATCHED):
                pushes[i] *= kl_matched_scale(clamp_ro, pushes[0], pushes[i], main_coeff)
        fam_ids = torch.nonzero(fam).flatten()
        sets = [[fam_ids, pred, o, sf] for o, sf in zip(own, selfs, strict=True)]
        cosines = torch.cat([torch.ones(1), controls @ (d_f / d_f.norm()) / controls.norm(dim=1)])
        n_r, n_d = len(randoms), len(decoders)
        rand_i = [i for i, k in enumerate(kinds) if k == "random"]
        dec_i = [i for i, k in enumerate(kinds) if k == "decoder"]
        spec_i = [i for i, k in enumerate(kinds) if k.removesuffix(KL_MATCHED) in ("mean_difference", "best_neuron")]
        full = list(range(len(kinds)))
        small = [0, *rand_i[: cfg.cell_random], *dec_i, *spec_i]
        firing = found.firings[n]
        fire_pos = sample_positions(firing, cfg.positions, cfg.seed + 1)
        enough = (len(firing) >= cfg.min_firing_positions
                  and len(np.unique(docs_all[firing[:, 0]])) >= cfg.min_firing_documents)
        fire_at = cache_positions(model, HOOK, inputs_all, fire_pos, docs_all, cfg.batch_windows) if enough else None
        fire_ro = readout(model, fire_at.resid, N_VOCAB) if enough else None
        skipped_firing += not enough
        log(f"[{n + 1}/{len(picks)}] feature {feature} ({family}, share {unit['family_share']:.2f}): "
            f"{n_r} random, {n_d} decoder and {len(specials)} fitted control directions; {len(firing):,} test-half "
            f"firings" + ("" if enough else " (too few for the edits at firing positions)") + "; predicted "
            + " ".join(repr(tok.decode([int(t)])) for t in pred[:5].tolist()))
        # the design: (mode, multiple, positions, LayerNorm scale frozen, directions)
        cells = [("clamp", cfg.clamp_multiple, "all", False, full), ("ablate", 0.0, "firing", False, full),
                 ("ablate", 0.0, "firing", True, small), ("clamp", 1.0, "all", False, small),
                 ("clamp", 1.0, "firing", False, small), ("clamp", cfg.clamp_multiple, "firing", False, small)]
        for mode, mult, where, frozen, sel in cells:
            at, ro = (clamp_at, clamp_ro) if where == "all" else (fire_at, fire_ro)
            if at is None:
                continue
            coeff = coefficients(sae.encode(at.h)[:, feature], mode, mult * top)
            shifts = effects(ro, pushes[sel], coeff, [sets[i] for i in sel], frozen)
            summary = _summaries(shifts, [sets[i] for i in sel])
            pos_of = {i: j for j, i in enumerate(sel)}
            in_r = [0, *(pos_of[i] for i in rand_i if i in pos_of)]
            in_d = [0, *(pos_of[i] for i in dec_i)]
            ranks = {**_ranks(summary, in_r, mode, ""), **_ranks(summary, in_d, mode, "_dec", MEASURES)}
            cell = {"mode": mode, "multiple": float(mult), "where": where, "frozen_scale": frozen}
            for j, i in enumerate(sel[1:], start=1):
                singles.append({"feature": feature, "family": family, **cell, "control": kinds[i], "index": index[i],
                                "source_feature": source[i],
                                "source_family": family_of.get(source[i], "") if kinds[i] == "decoder" else "",
                                "cosine": float(cosines[i]), **{k: float(v[j]) for k, v in summary.items()}})
            # per document: the feature's effects, the random directions' mean and the fitted controls, for
            # intervals (differences resampled with both sides together: paired intervals)
            mean_r = Shift(*(torch.stack([getattr(shifts[j], k) for j in in_r[1:]]).mean(0) for k in Shift._fields))
            who_shift = [("feature", shifts[0]), ("random", mean_r),
                         *((kinds[i], shifts[pos_of[i]]) for i in spec_i)]
            per_pos = {"n": torch.ones(len(coeff), dtype=torch.float64)}
            for who, s_ in who_shift:
                per_pos[f"{who}_kl"] = s_.kl
                for j, m in enumerate(MEASURES):
                    per_pos[f"{who}_{m}_logodds"] = s_.dlogodds[:, j]
                    per_pos[f"{who}_dmass_{m}"] = s_.dmass[:, j]
                    per_pos[f"{who}_mass_{m}"] = s_.mass[:, j]
            sums, _ = group_sums({k: v.numpy() for k, v in per_pos.items()}, at.docs)

            def mean_of(who: str, key: str):
                if who == "difference":
                    return lambda s: s[f"feature_{key}"] / s["n"] - s[f"random_{key}"] / s["n"]
                return lambda s: s[f"{who}_{key}"] / s["n"]

            keys = ("kl", *(f"{m}_logodds" for m in RANDOM_MEASURES), *(f"dmass_{m}" for m in RANDOM_MEASURES))
            for who in ("feature", "random", "difference", *(kinds[i] for i in spec_i)):
                row = {"feature": feature, "family": family, "family_share": float(unit["family_share"]), **cell,
                       "direction": who, "value": mult * top if mode == "clamp" else 0.0,
                       "positions": len(coeff), "documents": int(len(sums["n"])), "n_random": len(in_r) - 1,
                       "n_decoder": n_d, "predicted_tokens": len(pred),
                       # the direction's own base mass (its own tokens differ; the random directions' mean)
                       **{f"base_mass_{m}": float(sums[f"{'feature' if who == 'difference' else who}_mass_{m}"].sum()
                                                  / sums["n"].sum()) for m in RANDOM_MEASURES}}
                for k in keys:
                    ci = bootstrap(sums, mean_of(who, k), n_boot=cfg.n_boot, seed=cfg.seed)
                    row.update({k: ci.value, f"{k}_low": ci.low, f"{k}_high": ci.high})
                if len(pred) == 0:  # nothing predicted: the measure is undefined, not zero
                    row.update({k: np.nan for k in row if k.startswith(("predicted_logodds", "dmass_predicted"))})
                row["self_logodds"] = self_logodds(summary, who, {kinds[i]: pos_of[i] for i in spec_i})
                row.update(ranks if who == "feature" else dict.fromkeys(ranks, 0))
                fam_rows.append(row)
            if mode == "clamp" and where == "all" and mult == cfg.clamp_multiple:
                # the dose series: the feature and the first random directions at each strength
                f_ = sae.encode(at.h)[:, feature]
                first = [0, *rand_i[: cfg.dose_random]]
                for m in sorted({cfg.clamp_multiple, *cfg.dose_multiples}):
                    res = ([shifts[i] for i in first] if m == cfg.clamp_multiple else
                           effects(ro, pushes[first], coefficients(f_, "clamp", m * top), [sets[i] for i in first]))
                    sm = _summaries(res, [sets[i] for i in first])
                    for i in range(len(res)):
                        dose.append({"feature": feature, "family": family, "multiple": float(m), "value": m * top,
                                     "direction": "feature" if i == 0 else "random", "index": i - 1,
                                     **{k: float(v[i]) for k, v in sm.items()}})
        # in text: greedy continuations at several strengths, the anchor's pinned reconstruction, and a random
        # direction; the family's share of sampled continuations, for the feature against random directions
        clamped = edit_hook(sae, feature, "clamp", None, value, skip_first=True)
        scaled = [randoms[i] * float(push_f.norm() / writes(model, randoms[i:i + 1]).norm())
                  for i in range(cfg.sample_random)]
        texts = {"as_is": base_text, "clamped": greedy(clamped),
                 "random_direction": greedy(edit_hook(sae, feature, "clamp", scaled[0], value, skip_first=True)),
                 "pinned": greedy(edit_hook(sae, feature, "pin", value=value)),
                 "pinned_anchor": greedy(edit_hook(sae, feature, "pin", value=cfg.pin_value))}
        for m in cfg.generation_multiples:
            if m != cfg.clamp_multiple:
                texts[f"clamped_{m:g}x"] = greedy(edit_hook(sae, feature, "clamp", None, m * top, skip_first=True))
        for i, p_ in enumerate(PROMPTS):
            gens.append({"feature": feature, "family": family, "prompt": p_, **{k: v[i] for k, v in texts.items()}})
        seed_s = int(zlib.crc32(f"{cfg.seed}:{feature}".encode()))
        runs = [("clamp", "none", -1, None), ("clamp", "feature", -1, clamped),
                *(("clamp", "random", i, edit_hook(sae, feature, "clamp", scaled[i], value, skip_first=True))
                  for i in range(cfg.sample_random)),
                # the anchor's protocol: sampled after <|endoftext|> with the feature pinned in the reconstruction,
                # against the reconstruction alone and other features pinned the same way
                ("pinned", "none", -1, edit_hook(sae, None, "pin")),
                ("pinned", "feature", -1, edit_hook(sae, feature, "pin", value=cfg.pin_value)),
                *(("pinned", "decoder", i, edit_hook(sae, int(dec_ids[i]), "pin", value=cfg.pin_value))
                  for i in range(min(cfg.sample_random, len(dec_ids)))),
                # the same protocol at this SAE's scale: the feature pinned at the clamp value, other features at
                # the value that pushes the residual stream as hard (the anchor's 100 is in its own SAE's units)
                ("pinned_matched", "feature", -1, edit_hook(sae, feature, "pin", value=value)),
                *(("pinned_matched", "decoder", i,
                   edit_hook(sae, int(dec_ids[i]), "pin", value=value * float(
                       push_f.norm() / writes(model, sae.W_dec[int(dec_ids[i])].detach()[None]).norm())))
                  for i in range(min(cfg.sample_random, len(dec_ids))))]
        for protocol, who, i, edit in runs:
            starts, n_new = (prompts, cfg.new_tokens) if protocol == "clamp" else ([eot_prompt], cfg.pin_tokens)
            share, total = family_share(edit, fam, seed_s, starts, n_new)
            sampled.append({"feature": feature, "family": family, "protocol": protocol, "direction": who, "index": i,
                            "source_feature": int(dec_ids[i]) if who == "decoder" else -1,
                            "family_share": share, "tokens": total})
    table = pd.DataFrame(fam_rows)
    with store.write("analysis", profile, "causal", config=cfg, inputs=inputs) as w:
        table.to_parquet(w.dir / "causal.parquet", index=False)
        pd.DataFrame(singles).to_parquet(w.dir / "random_directions.parquet", index=False)
        pd.DataFrame(dose).to_parquet(w.dir / "dose.parquet", index=False)
        pd.DataFrame(preds).to_parquet(w.dir / "predicted.parquet", index=False)
        pd.DataFrame(gens).to_parquet(w.dir / "generations.parquet", index=False)
        pd.DataFrame(sampled).to_parquet(w.dir / "sampling.parquet", index=False)
        feats = table[(table.direction == "feature") & ~table.frozen_scale
                      & (table["multiple"].isin([0.0, cfg.clamp_multiple]))
                      & (table["where"] == table["mode"].map({"clamp": "all", "ablate": "firing"}))]
        w.metrics.update({
            "features": len(picks), "families": len({str(u["family"]) for u in picks}),
            "clamp_positions": int(len(clamp_at.docs)), "clamp_documents": int(len(np.unique(clamp_at.docs))),
            "scanned_windows": int(len(rows)), "explore_documents": int(len(explore_docs)),
            "features_without_firing_edits": int(skipped_firing),
            # features whose edit beats every control direction on a measure (rank 1: p = 1 / (n + 1))
            **{f"{mode}_{m}_rank1{sfx}_features": int((feats[feats["mode"] == mode][f"{m}_rank{sfx}"] == 1).sum())
               for mode in ("clamp", "ablate") for sfx in ("", "_dec")
               for m in ("kl", *(MEASURES if sfx else RANDOM_MEASURES))},
        })
        w.info["features"] = features


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", default="topk", help="which SAE's features (default: topk)")
    p.add_argument("--positions", type=int, default=None, help="held-out positions per edit (default 512)")
    p.add_argument("--random", type=int, default=None, dest="n_random",
                   help="random directions per feature (default 100)")


def run(args: argparse.Namespace) -> int:
    cfg = CausalConfig(sae=args.sae)
    changes = {k: v for k, v in (("positions", args.positions), ("n_random", args.n_random)) if v}
    run_stage(args.profile, cfg.replace(**changes) if changes else cfg)
    return 0
