"""``monosemantic causal``: do the named features *do* what their labels say? Clamp and ablate them in the
running model, against random directions of the same norm (issue 18, item 6).

A feature i of an SAE on the MLP's hidden layer has an activation f_i(h) and a unit decoder direction d_i.
Interventions edit the hidden activation h at every position and keep everything the SAE does not
explain (the "error term"), as Templeton et al. (2024, "Scaling Monosemanticity", section "Feature
steering") do; the anchor's notebook (``generate_with_pinned_features``) instead replaces h by the SAE's
reconstruction with the feature pinned at 100, dropping the error term:

- **clamp** to a value c: h' = h + (c - f_i(h)) d_i, so that in the SAE's decomposition of h (its
  reconstruction plus the error) the feature's term becomes c d_i at every position (re-encoding h' need not
  give c: the encoder is not the decoder's inverse, and TopK may drop the feature); c is a multiple of the
  largest activation the feature reaches on the explanation text (``clamp_multiple``);
- **ablate**: h' = h - f_i(h) d_i, the feature's contribution removed where it fires.

The control replaces d_i by a random direction r with the same coefficients, scaled so that it moves the
MLP's output as far as d_i does (||W_out r|| = ||W_out d_i||: two unit directions of the hidden layer do
not), so a feature's effect is compared with what any push of that size does where the model reads it.
Measured on held-out windows (those of ``heldout/<profile>-windows`` when it is in the cache, the
analysis's held-out set; else the val split): the KL divergence KL(p || p') of the next-token distribution
(nats per token; for ablation over the positions where the feature fires), the family's mass before the
edit, and the change of the probability mass on the feature's family (the vocabulary tokens that family's
detector marks when the token is read alone, :func:`monosemantic.analysis.token_families`), each with a
95% interval over held-out documents, and the feature's minus the random directions' (a paired interval:
both measured on the same windows, the documents resampled together); and greedy continuations of a few
prompts.

The family's mass suits a feature that makes the model write its family; for a feature that detects one
token (a comma, a line break) the next token is rarely of the same family, so the change of the mass on the
tokens the feature's decoder direction promotes most (its top direct logit effects, the analysis's
``logits.parquet``) is measured beside it. Those tokens favour a clamped feature, whose direction picked
them, so each control direction is also measured on the tokens *it* promotes most (the "fair" promoted
measure). The control is ranked one direction at a time: the feature's rank among ``n_random`` random
directions is a permutation-style test. A second control asks whether any direction the SAE learned would
do as well: ``n_decoder`` other features' decoder directions, with the tested feature's coefficients and
the same scaling. And the clamp is repeated at ``dose_multiples`` of the largest activation, for the feature
and a few random directions, to show how the effect grows with the push.

Writes ``analysis/<profile>-causal``: ``causal.parquet`` (feature x intervention x direction, with the
feature's ranks among each control), ``random_directions.parquet`` (each control direction's own result:
``control`` "random" or "decoder"), ``dose.parquet`` (the clamp at each strength) and ``generations.parquet``.

    monosemantic causal --profile cpu --windows 32   # ~70 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ConfigError, StageConfig, UserError, check_positive
from .hardware import trimmed

DEFAULT_PROFILE = "cpu"
PROMPTS = ("The", "In 1998, the", "def main(", "The license", "Der")


@dataclasses.dataclass(frozen=True)
class CausalConfig(StageConfig):
    """Which features, how hard they are pushed, on how much held-out text."""

    STAGE: ClassVar[str] = "analysis"
    VERSION: ClassVar[int] = 6  # 2: paired feature-minus-random rows; 3: output-matched control, base mass;
    # 4: 20 random directions, each one's result kept, the feature's rank among them; 5: ties of family share
    # broken by held-out firings, 8 features, the mass on the tokens each feature promotes; 6: each control
    # direction also measured on the tokens it promotes itself, other features' decoder directions as a second
    # control, and the clamp at several strengths

    sae: str = "topk"
    """The SAE artifact (``sae/<profile>-<sae>``) whose features are tested."""
    n_features: int = 8
    """Features tested: the most specific scored feature of each of this many families (see :func:`pick`)."""
    promoted_tokens: int = 10
    """The tokens whose next-token mass the "promoted" measure reads: this many of the feature's largest direct
    logit effects (at most the analysis's ``logit_tokens``)."""
    min_heldout_firings: int = 50
    """A feature is only picked if it fires at least this often on the held-out text."""
    min_family_tokens: int = 20
    """A family is only used if at least this many vocabulary tokens belong to it when read alone."""
    clamp_multiple: float = 5.0
    """Clamp value = this x the feature's largest activation on the explanation text (a high value, as
    feature steering uses: the largest natural value barely moves the output of a rare feature)."""
    n_random: int = 20
    """Random directions per feature for the control: their mean is the paired control, and the feature's
    rank among them a permutation-style test (rank 1 of ``n_random + 1``: p = 1 / (n_random + 1))."""
    n_decoder: int = 20
    """A second control: the decoder directions of this many other scored features of the SAE (seeded draw,
    the tested features left out), each with the tested feature's coefficients and scaled as the random
    directions are. Does the feature's own direction matter, or would any direction the SAE learned do?"""
    dose_multiples: tuple[float, ...] = (1.0, 2.0, 10.0)
    """Further clamp values (multiples of the feature's largest activation, beside ``clamp_multiple``): the
    feature and the first ``dose_random`` random directions clamped at each, on the same windows."""
    dose_random: int = 5
    eval_windows: int = 128
    """Held-out windows (of the model's context) the distributions are measured on: for clamping, spread
    evenly over the held-out split; for ablation, those where the feature fires most often."""
    batch_windows: int = 16
    new_tokens: int = 16
    """Greedy tokens generated per prompt."""
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "n_features", "min_heldout_firings", "min_family_tokens", "n_random", "eval_windows",
                       "batch_windows", "new_tokens", "n_boot", "promoted_tokens", "n_decoder", "dose_random",
                       integer=True)
        check_positive(self, "clamp_multiple")
        if not all(isinstance(m, (int, float)) and m > 0 for m in self.dose_multiples):
            raise ConfigError(f"causal.dose_multiples must be positive numbers, got {self.dose_multiples!r}")
        if self.dose_random > self.n_random:
            raise ConfigError(f"causal.dose_random ({self.dose_random}) must be at most n_random ({self.n_random})")


# --- the interventions ------------------------------------------------------------------------------------

def edit_hook(sae, feature: int, mode: str, direction: Tensor | None = None, value: float = 0.0
              ) -> Callable[[Tensor, str], Tensor]:
    """A hook ``fn(h, name) -> h'`` on the SAE's hook point: ``mode`` "clamp" sets feature ``feature`` to
    ``value`` (h + (value - f) d), "ablate" removes it (h - f d). ``direction`` (d_in,) replaces the
    feature's decoder direction d (the random-direction control); the coefficients are the feature's own."""
    if mode not in ("clamp", "ablate"):
        raise UserError(f"mode must be 'clamp' or 'ablate', got {mode!r}")
    d = (sae.W_dec[feature] if direction is None else direction).detach().float()  # (d_in,)

    def fn(h: Tensor, name: str) -> Tensor:
        flat = h.reshape(-1, h.shape[-1]).float()  # (N, d_in)
        with torch.no_grad():
            f = sae.encode(flat)[:, feature]  # (N,)
        coeff = (value - f) if mode == "clamp" else -f
        return (flat + coeff[:, None] * d.to(flat.device)).to(h.dtype).reshape(h.shape)
    return fn


def output_push(model, vectors: Tensor) -> Tensor:
    """(n,) how far each (n, d_in) hidden-layer vector moves the MLP's output: ||W_out v||. Two unit directions
    edited with the same coefficient push the residual stream by different amounts, so the random control
    is of equal size in the hidden layer only."""
    w_out = model.blocks[0].mlp.fc_out.weight.detach().float()  # (d_model, d_mlp)
    return (vectors.float() @ w_out.t()).norm(dim=1)


def random_directions(d_in: int, n: int, seed: int) -> Tensor:
    """(n, d_in) random unit vectors (uniform on the sphere), seeded."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d_in, generator=g)
    return r / r.norm(dim=1, keepdim=True)


@torch.no_grad()
def distribution_shift(model, hook: str, windows, edit: Callable, family_mask: Tensor, sae=None,
                       feature: int | None = None, own_tokens: Tensor | None = None) -> dict[str, np.ndarray]:
    """Per-window sums of the next-token shift an edit causes: ``kl`` (sum over tokens of KL(p || p')),
    ``dmass`` (sum of p'(family) - p(family)), ``tokens``, ``mass`` (sum of p(family), before the edit); and
    the same restricted to the positions where ``feature`` fires (``kl_fire``, ``dmass_fire``, ``fire``,
    ``mass_fire``), when an SAE and feature are given. ``family_mask`` (V,) or (V, M): with M masks, the
    second and later give ``dmass2``, ``mass2``, ``dmass2_fire``, ``mass2_fire`` (and 3, ...). ``own_tokens``
    (P,) token ids of the edit's own: ``dmass_own``, ``mass_own`` (and ``_fire``) on those."""
    return distribution_shifts(model, hook, windows, [edit], family_mask, sae, feature,
                               None if own_tokens is None else [own_tokens])[0]


@torch.no_grad()  # without it every accumulated sum keeps its batch's graph, logits included (GBs per batch)
def distribution_shifts(model, hook: str, windows, edits: list[Callable], family_mask: Tensor, sae=None,
                        feature: int | None = None, own_tokens: list[Tensor] | None = None
                        ) -> list[dict[str, np.ndarray]]:
    """:func:`distribution_shift` for several edits of the same windows: the unedited pass is shared.
    ``own_tokens``: one (P,) tensor of token ids per edit (each control direction's own promoted tokens)."""
    masks = family_mask.float().reshape(len(family_mask), -1)  # (V, M); padded to the model's vocabulary below
    tags = [""] + [str(m + 1) for m in range(1, masks.shape[1])]  # "dmass", "dmass2", ...
    if own_tokens is not None and len(own_tokens) != len(edits):
        raise UserError(f"own_tokens gives {len(own_tokens)} token sets for {len(edits)} edits")
    suffixes = [*tags, "_own"] if own_tokens is not None else tags  # "dmass_own": on each edit's own tokens
    keys = ("kl", "tokens", "kl_fire", "fire", *(f"{k}{t}{f}" for t in suffixes
                                                 for k in ("dmass", "mass") for f in ("", "_fire")))
    out: list[dict[str, list[Tensor]]] = [{k: [] for k in keys} for _ in edits]
    mask = masks
    for x, _ in trimmed(windows):
        B, T = x.shape
        logp = F.log_softmax(model(x).logits.float(), dim=-1)  # (B, T, V)
        p = logp.exp()
        if len(mask) < logp.shape[-1]:
            mask = F.pad(mask, (0, 0, 0, logp.shape[-1] - len(mask)))
        base_mass = (p @ mask[: logp.shape[-1]]).double()  # (B, T, M)
        if sae is not None and feature is not None:
            h = model.run_with_cache(x, [hook])[hook]  # (B, T, d_in)
            fires = (sae.encode(h.reshape(-1, h.shape[-1]).float())[:, feature] > 0).reshape(B, T).double()
        else:
            fires = torch.zeros(B, T, dtype=torch.float64)
        for e, (edit, acc) in enumerate(zip(edits, out, strict=True)):
            with model.hooks({hook: edit}):
                logq = F.log_softmax(model(x).logits.float(), dim=-1)
            kl = (p * (logp - logq)).sum(-1).double()  # (B, T)
            q = logq.exp()
            dmass = (q @ mask[: logp.shape[-1]]).double() - base_mass  # (B, T, M)
            if own_tokens is not None:  # the mass on this edit's own tokens, before and after
                idx = torch.as_tensor(own_tokens[e], dtype=torch.long)
                own_base = p[..., idx].sum(-1).double()  # (B, T)
                own_d = q[..., idx].sum(-1).double() - own_base
                for k, v in (("dmass_own", own_d), ("mass_own", own_base)):
                    acc[k].append(v.sum(1))
                    acc[f"{k}_fire"].append((v * fires).sum(1))
            del logq, q
            acc["kl"].append(kl.sum(1))
            acc["tokens"].append(torch.full((B,), float(T), dtype=torch.float64))
            acc["kl_fire"].append((kl * fires).sum(1))
            acc["fire"].append(fires.sum(1))
            for m, t in enumerate(tags):
                acc[f"dmass{t}"].append(dmass[..., m].sum(1))
                acc[f"dmass{t}_fire"].append((dmass[..., m] * fires).sum(1))
                acc[f"mass{t}"].append(base_mass[..., m].sum(1))  # the mass before the edit
                acc[f"mass{t}_fire"].append((base_mass[..., m] * fires).sum(1))
    return [{k: torch.cat(v).numpy() for k, v in acc.items()} for acc in out]


@torch.no_grad()
def firing_counts(model, sae, hook: str, inputs: Tensor, features: list[int], batch: int) -> np.ndarray:
    """(n_windows, len(features)) how many positions of each window (rows of ``inputs``) each feature fires on."""
    out = np.zeros((len(inputs), len(features)), dtype=np.int64)  # filled in place: see hardware.trimmed
    idx = torch.as_tensor(features, dtype=torch.long)
    for i in trimmed(range(0, len(inputs), batch)):
        h = model.run_with_cache(inputs[i:i + batch], [hook])[hook]  # (B, T, d_in)
        z = sae.encode(h.reshape(-1, h.shape[-1]).float())[:, idx]  # (B*T, F)
        out[i:i + len(h)] = (z > 0).reshape(h.shape[0], h.shape[1], -1).sum(1).numpy()
    return out


def rank_among(kl: np.ndarray, dmass: np.ndarray, mode: str) -> dict[str, int]:
    """Where the feature's edit (element 0) ranks among the random directions' (the rest): ``kl_rank`` = 1 +
    how many random directions move the distribution at least as far; ``dmass_rank`` = 1 + how many change the
    family's mass at least as much the way the edit should (up when clamped, down when ablated). Rank 1 of
    n + 1 is the feature beating every random direction: p = 1 / (n + 1) under the null that its direction is
    one more random one."""
    sign = 1.0 if mode == "clamp" else -1.0
    return {"kl_rank": int(1 + (kl[1:] >= kl[0]).sum()),
            "dmass_rank": int(1 + (sign * dmass[1:] >= sign * dmass[0]).sum())}


def control_ranks(kl: np.ndarray, dmass: np.ndarray, promoted: np.ndarray, fair: np.ndarray, sel: list[int],
                  mode: str, suffix: str = "") -> dict[str, int]:
    """The feature's (element 0) ranks among the control directions ``sel`` (indices into the arrays, 0 first)
    on each measure, as :func:`rank_among` ranks them: ``kl_rank``, ``dmass_rank`` (the family's mass),
    ``promoted_rank`` (the feature's promoted tokens) and ``promoted_fair_rank`` (each direction's own), with
    ``suffix`` appended to the names."""
    def one(values: np.ndarray) -> int:
        return rank_among(kl[sel], values[sel], mode)["dmass_rank"]

    return {f"kl_rank{suffix}": rank_among(kl[sel], dmass[sel], mode)["kl_rank"], f"dmass_rank{suffix}": one(dmass),
            f"promoted_rank{suffix}": one(promoted), f"promoted_fair_rank{suffix}": one(fair)}


def vocab_family_masks(token_bytes: list[bytes]) -> np.ndarray:
    """(V, n_families) bool: the families each vocabulary token belongs to when read alone."""
    from .analysis import token_families

    return np.concatenate([token_families([b]) for b in token_bytes]) if token_bytes else np.zeros((0, 0), bool)


def pick(units, families: list[str], family_sizes: dict[str, int], cfg: CausalConfig, heldout_tokens: int):
    """The features to test: for each family with enough vocabulary tokens, of the scored features of ``units``
    (the analysis's table for one set) labelled with it that fire at least ``min_heldout_firings`` times on
    the held-out text, the one with the highest family share (ties within a point: the most firings); the
    ``n_features`` best of those, by share and then firings."""
    ok = units[units["scored"] & (units["density_val"] * heldout_tokens >= cfg.min_heldout_firings)]
    rows = []
    for fam in families:
        if family_sizes.get(fam, 0) < cfg.min_family_tokens:
            continue
        cand = ok[ok["family"] == fam]
        if len(cand):
            # many features share the top family share (often 100%): of those within a point of it, the one
            # that fires most on held-out text, so the pick is no accident of the table's order
            top = cand[cand["family_share"] >= cand["family_share"].max() - 0.01]
            rows.append(top.sort_values(["density_val", "unit"], ascending=[False, True]).iloc[0])
    rows.sort(key=lambda r: (-round(float(r["family_share"]), 2), -float(r["density_val"])))
    return rows[: cfg.n_features]


# --- the stage ----------------------------------------------------------------------------------------------

@torch.no_grad()
def run_stage(profile: str, cfg: CausalConfig, log=print) -> None:
    import pandas as pd

    from . import sae as sae_mod
    from . import store, tokenizer
    from .analysis import FAMILY_NAMES, N_VOCAB, logit_effects
    from .data import TokenDataset
    from .harvest import HOOK, split_windows, spread_rows, window_batches
    from .intervals import bootstrap, group_sums, window_documents
    from .lm import load_pretrained

    model = load_pretrained(profile).eval()
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
    heldout_tokens = int(an.metrics.get("held_out_tokens", 0))
    logits = pd.read_parquet(an.file("logits.parquet"))
    promoted = logits[(logits["set"] == set_name) & (logits["sign"] == 1) & (logits["rank"] < cfg.promoted_tokens)]
    tok = tokenizer.load()
    masks = vocab_family_masks(tok.token_bytes(list(range(N_VOCAB))))  # (V, F)
    sizes = {f: int(masks[:, j].sum()) for j, f in enumerate(FAMILY_NAMES)}
    picks = pick(units, list(FAMILY_NAMES), sizes, cfg, heldout_tokens)
    if not picks:
        raise UserError("no feature qualifies (scored, specific to a family with vocabulary tokens, firing "
                        f">= {cfg.min_heldout_firings} times held out); lower min_heldout_firings")

    inputs = [lm_art, sae_art, an]
    if (store.artifact_path("heldout", profile, "windows") / store.MANIFEST).is_file():
        # the held-out set the analysis scored on (text no LM, SAE or explanation read), documents as groups
        from . import heldout

        held = heldout.load_windows(profile)
        w_all = torch.from_numpy(held.windows.astype(np.int64))
        inputs_all, targets_all, docs_all = w_all[:, :-1], w_all[:, 1:], held.documents
        inputs.append(store.load("heldout", profile, "windows"))
        seq = inputs_all.shape[1]
    else:  # the val split, in whole windows from its start
        data = TokenDataset.open(profile, "val")
        seq = model.config.context_length
        inputs_all, targets_all = split_windows(data.tokens, seq)  # (n_all, seq) each
        docs_all = window_documents(data.tokens, np.arange(len(inputs_all)) * seq, data.eot_id)
    n_all = len(inputs_all)
    fires_all = firing_counts(model, sae, HOOK, inputs_all, [int(u["unit"]) for u in picks], cfg.batch_windows)

    def batches(rows: np.ndarray):
        rows = np.sort(rows)
        return window_batches(inputs_all, targets_all, rows, cfg.batch_windows), docs_all[rows]

    spread = spread_rows(n_all, cfg.eval_windows)
    windows, docs = batches(spread)
    n_windows = len(spread)
    randoms = random_directions(sae.cfg.d_in, cfg.n_random, cfg.seed)
    # a unit of coefficient along each random direction moves the MLP's output this far (equal in the hidden
    # layer, the directions would not push the output equally): each feature's control is scaled by it below
    push_r = output_push(model, randoms)  # (n_random,)
    # the second control: other features' decoder directions (scored, not tested here), drawn once for all
    picked = {int(u["unit"]) for u in picks}
    pool = np.sort(units[units["scored"] & ~units["unit"].isin(picked)]["unit"].to_numpy().astype(np.int64))
    dec_ids = np.sort(np.random.default_rng(cfg.seed).choice(pool, min(cfg.n_decoder, len(pool)), replace=False))
    decoders = sae.W_dec[torch.as_tensor(dec_ids, dtype=torch.long)].detach().float()  # (n_decoder, d_in)
    decoders = decoders / decoders.norm(dim=1, keepdim=True)
    dec_family = dict(zip(units["unit"].astype(int), units["family"].fillna("").astype(str), strict=True))
    push_d = output_push(model, decoders)

    def promoted_of(directions: Tensor) -> Tensor:  # (n, P) the tokens each direction's direct effect raises most
        return logit_effects(model, directions.float())[:, :N_VOCAB].topk(cfg.promoted_tokens, dim=1).indices

    own_r, own_d = promoted_of(randoms), promoted_of(decoders)  # a direction's own tokens do not depend on its scale
    rows, gens, singles, dose = [], [], [], []
    prompts = [torch.tensor([tok.encode(p)]) for p in PROMPTS]

    def greedy(edit) -> list[str]:
        texts = []
        for ids in prompts:
            with model.hooks({HOOK: edit} if edit else {}):
                out = model.generate(ids, cfg.new_tokens, temperature=0)
            texts.append(tok.decode(out[0, ids.shape[1]:].tolist()))
        return texts

    base_text = greedy(None)
    for n, unit in enumerate(picks, 1):
        feature, family = int(unit["unit"]), str(unit["family"])
        fam_mask = torch.as_tensor(masks[:, FAMILY_NAMES.index(family)])
        up_mask = torch.zeros(len(fam_mask), dtype=torch.bool)  # the tokens its decoder direction promotes most
        up_mask[torch.tensor(promoted[promoted["unit"] == feature]["token"].to_numpy(), dtype=torch.long)] = True
        both_masks = torch.stack([fam_mask, up_mask], dim=1)  # (V, 2): "dmass" and "dmass2" below
        value = cfg.clamp_multiple * float(unit["max"])
        log(f"[{n}/{len(picks)}] feature {feature} ({family}, share {unit['family_share']:.2f}): clamp to "
            f"{value:.2f}, ablate; {cfg.n_random} random directions")
        firing = fires_all[:, n - 1]  # (n_all,) how often the feature fires in each held-out window
        top = np.argsort(-firing, kind="stable")[: cfg.eval_windows]
        fire_windows = batches(top[firing[top] > 0])
        # this feature's controls: random directions and other features' decoder directions, each scaled to
        # move the MLP's output as far as its own direction does
        push_f = output_push(model, sae.W_dec[feature:feature + 1])
        matched, matched_dec = randoms * (push_f / push_r)[:, None], decoders * (push_f / push_d)[:, None]
        own = [promoted_of(sae.W_dec[feature:feature + 1].detach())[0], *own_r, *own_d]
        n_r, n_d = len(matched), len(matched_dec)
        unit_dir = sae.W_dec[feature].detach().float()
        cosines = torch.cat([randoms, decoders]) @ (unit_dir / unit_dir.norm())  # each control's cosine with it
        for mode in ("clamp", "ablate"):
            w, d = (windows, docs) if mode == "clamp" else fire_windows
            if len(d) == 0:
                continue  # never fires held out (pick() requires firings, so only on a tiny split)
            edits = [edit_hook(sae, feature, mode, None, value)] + [edit_hook(sae, feature, mode, r, value)
                                                                     for r in (*matched, *matched_dec)]
            shifts = distribution_shifts(model, HOOK, w, edits, both_masks, sae, feature, own)
            # the feature's edit and the random directions' (averaged) on the same windows, summed per
            # document; "difference" is feature minus random with both resampled together (a paired interval)
            per_dir = {"feature": shifts[:1], "random": shifts[1:1 + n_r]}
            means = {direction: {k: np.mean([r[k] for r in results], axis=0) for k in results[0]}
                     for direction, results in per_dir.items()}
            sums, _ = group_sums({f"{direction}_{k}": v for direction, m in means.items() for k, v in m.items()}, d)
            if len(sums["feature_tokens"]) < 2:
                continue  # one document: no interval over documents
            where = (("kl", "dmass", "tokens", "mass", "dmass2", "mass2") if mode == "clamp" else
                     ("kl_fire", "dmass_fire", "fire", "mass_fire", "dmass2_fire", "mass2_fire"))

            def ratio(direction: str, num: str, w=where):
                if direction == "difference":
                    return lambda s: ratio("feature", num)(s) - ratio("random", num)(s)
                return lambda s: s[f"{direction}_{num}"] / s[f"{direction}_{w[2]}"]

            # each control direction alone, over all the windows: where the feature's edit ranks among them.
            # "promoted": every direction on the feature's promoted tokens (favours a clamped feature, whose
            # direction picked them); "fair": each direction on the tokens it promotes itself
            own_key = "dmass_own" if mode == "clamp" else "dmass_own_fire"
            single = {k: np.array([r[k].sum() / r[where[2]].sum() for r in shifts])
                      for k in (*where[:2], where[4], own_key)}

            measures = (single[where[0]], single[where[1]], single[where[4]], single[own_key])
            ranks = control_ranks(*measures, [0, *range(1, 1 + n_r)], mode)
            ranks.update(control_ranks(*measures, [0, *range(1 + n_r, 1 + n_r + n_d)], mode, "_dec") if n_d else {})
            for i in range(n_r + n_d):
                control, j = ("random", i) if i < n_r else ("decoder", i - n_r)
                singles.append({"feature": feature, "family": family, "mode": mode, "control": control,
                                "index": j, "source_feature": -1 if control == "random" else int(dec_ids[j]),
                                "source_family": "" if control == "random" else dec_family.get(int(dec_ids[j]), ""),
                                "cosine": float(cosines[i]),
                                "kl": float(single[where[0]][i + 1]), "dmass": float(single[where[1]][i + 1]),
                                "promoted_dmass": float(single[where[4]][i + 1]),
                                "own_promoted_dmass": float(single[own_key][i + 1])})
            if mode == "clamp":  # the strength the edit is made at: the main value and the others, feature and
                # the first dose_random random directions on the same windows
                at = {cfg.clamp_multiple: shifts[:1 + cfg.dose_random]}
                for m in cfg.dose_multiples:
                    if m != cfg.clamp_multiple:
                        at[m] = distribution_shifts(
                            model, HOOK, w, [edit_hook(sae, feature, "clamp", dr, m * float(unit["max"]))
                                             for dr in (None, *matched[:cfg.dose_random])],
                            both_masks, sae, feature, own[:1 + cfg.dose_random])
                for m, res in sorted(at.items()):
                    for i, r in enumerate(res):
                        dose.append({"feature": feature, "family": family, "multiple": float(m),
                                     "value": m * float(unit["max"]), "direction": "feature" if i == 0 else "random",
                                     "index": i - 1, **{c: float(r[k].sum() / r["tokens"].sum()) for c, k in
                                                        (("kl", "kl"), ("dmass", "dmass"), ("promoted_dmass", "dmass2"),
                                                         ("own_promoted_dmass", "dmass_own"))}})
            for direction in ("feature", "random", "difference"):
                kl = bootstrap(sums, ratio(direction, where[0]), n_boot=cfg.n_boot, seed=cfg.seed)
                dm = bootstrap(sums, ratio(direction, where[1]), n_boot=cfg.n_boot, seed=cfg.seed)
                pm = bootstrap(sums, ratio(direction, where[4]), n_boot=cfg.n_boot, seed=cfg.seed)
                rows.append({"feature": feature, "family": family, "family_share": float(unit["family_share"]),
                             "mode": mode, "direction": direction, "value": value if mode == "clamp" else 0.0,
                             "positions": float(sums[f"feature_{where[2]}"].sum()),
                             "documents": int(len(sums[f"feature_{where[2]}"])),
                             "base_mass": float(sums[f"feature_{where[3]}"].sum() / sums[f"feature_{where[2]}"].sum()),
                             "kl": kl.value,
                             "kl_low": kl.low, "kl_high": kl.high, "dmass": dm.value, "dmass_low": dm.low,
                             "dmass_high": dm.high, "promoted_dmass": pm.value, "promoted_dmass_low": pm.low,
                             "promoted_dmass_high": pm.high,
                             "promoted_base_mass": float(sums[f"feature_{where[5]}"].sum()
                                                         / sums[f"feature_{where[2]}"].sum()),
                             "n_random": n_r, "n_decoder": n_d,
                             **(ranks if direction == "feature" else dict.fromkeys(ranks, 0))})
        clamped = greedy(edit_hook(sae, feature, "clamp", None, value))
        rand = greedy(edit_hook(sae, feature, "clamp", matched[0], value))
        for p, b, c, r in zip(PROMPTS, base_text, clamped, rand, strict=True):
            gens.append({"feature": feature, "family": family, "prompt": p, "as_is": b, "clamped": c,
                         "random_direction": r})
    table = pd.DataFrame(rows)
    clamp = table[table["mode"] == "clamp"].pivot(index="feature", columns="direction", values="dmass")
    ablate = table[table["mode"] == "ablate"].pivot(index="feature", columns="direction", values="kl")
    with store.write("analysis", profile, "causal", config=cfg, inputs=inputs) as w:
        table.to_parquet(w.dir / "causal.parquet", index=False)
        pd.DataFrame(singles).to_parquet(w.dir / "random_directions.parquet", index=False)
        pd.DataFrame(dose).to_parquet(w.dir / "dose.parquet", index=False)
        pd.DataFrame(gens).to_parquet(w.dir / "generations.parquet", index=False)
        def finite(v) -> float | None:
            return float(v) if np.isfinite(v) else None

        w.metrics.update({
            "features": len(picks), "eval_tokens": n_windows * seq, "n_documents": int(len(np.unique(docs))),
            "clamp_dmass_feature_median": finite(clamp["feature"].median()),
            "clamp_dmass_random_median": finite(clamp["random"].median()),
            "clamp_family_up_fraction": finite((clamp["feature"] > clamp["random"]).mean()),
            "ablate_kl_feature_median": finite(ablate["feature"].median()),
            "ablate_kl_random_median": finite(ablate["random"].median()),
            **{f"{mode}_{col}_{side}_features": int(((diff[f"{col}_low"] > 0) if side == "above"
                                                     else (diff[f"{col}_high"] < 0)).sum())
               for mode, diff in (("clamp", table[(table["mode"] == "clamp") & (table.direction == "difference")]),
                                  ("ablate", table[(table["mode"] == "ablate") & (table.direction == "difference")]))
               for col in ("kl", "dmass") for side in ("above", "below")},
            # features whose edit beats every one of the random directions (rank 1: p = 1 / (n_random + 1))
            **{f"{mode}_{col}_rank1{suffix}_features":
               int((table[(table["mode"] == mode) & (table.direction == "feature")][f"{col}_rank{suffix}"] == 1).sum())
               for mode in ("clamp", "ablate") for col in ("kl", "dmass", "promoted", "promoted_fair")
               for suffix in ("", "_dec") if f"{col}_rank{suffix}" in table},
            "decoder_features": [int(f) for f in dec_ids],
        })


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", default="topk", help="which SAE's features (default: topk)")
    p.add_argument("--windows", type=int, default=None, help="held-out windows to measure on (default 128)")


def run(args: argparse.Namespace) -> int:
    cfg = CausalConfig(sae=args.sae)
    if args.windows:
        cfg = cfg.replace(eval_windows=args.windows)
    run_stage(args.profile, cfg)
    return 0
