"""A short sweep of a Llama run's SAE training settings (length, AuxK weight, dead window): each setting trained
on the run's harvest (reused from ``cache/work`` when a run with the same training fields finished), measured
on held-out text, and written to ``llama/<profile>-sweep-<run>-x<expansion>``, so the settings the run uses are chosen
from measurements. Per setting: FVU, L0 and the fraction of latents that never fire on the held-out
activations (the dead fraction the issue's bar is set on), and the evaluation's CE loss recovered with its
interval over held-out documents.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .llama import LlamaConfig
from .llama_data import Shards, run_dir
from .llama_eval import evaluate_many, heldout_windows, layer_model
from .llama_train import trained
from .metrics import paired_difference

# the package's default AuxK (Gao et al.'s weight 1/32; a latent counts as dead after 100k activations without
# firing, our window: theirs is 10M tokens) and a stronger AuxK (1/8, dead after 25k), each over the profile's
# length: the settings are absolute, so the sweep means the same whatever the profile now uses (the cpu
# profile took the second). A 1.5-pass run at 2x takes 10-13 min on a 2-core AVX2 machine in fp32 and 4-9 min
# on a 2-core AMX one in bf16 (the sweep's manifest records each row's time).
DEFAULT_AUXK = {"aux_coeff": 1 / 32, "dead_window": 100_000}
STRONG_AUXK = {"aux_coeff": 1 / 8, "dead_window": 25_000}
VARIANTS: tuple[dict[str, Any], ...] = (
    DEFAULT_AUXK,
    STRONG_AUXK,
    # the two knobs apart: the default weight with the short window, and AuxK off
    {"aux_coeff": 1 / 32, "dead_window": 25_000},
    {"aux_coeff": 0.0, "dead_window": 25_000},
    # the length: two thirds of the profile's passes (1 of 1.5 on the cpu profile) with the stronger AuxK
    {**STRONG_AUXK, "sae_epochs_scale": 2 / 3},
    # seeds: the two AuxK settings each trained twice more
    {**DEFAULT_AUXK, "seed": 1}, {**DEFAULT_AUXK, "seed": 2},
    {**STRONG_AUXK, "seed": 1}, {**STRONG_AUXK, "seed": 2},
)
"""Each setting a change to the run's config (``sae_epochs_scale`` multiplies its ``sae_epochs``); the first is
the reference the others are compared with, paired."""
CE_TOKENS = 32_768
"""The sweep splices each SAE into the model on at most this many held-out tokens, in windows spread over
documents as the evaluation's are (the cpu profile's evaluation reads as many, and the same windows; a larger
profile's reads more), and the interval says how precisely."""


def sweep_name(cfg: LlamaConfig) -> str:
    return f"sweep-{cfg.run_name}-x{cfg.expansion}"


@torch.no_grad()
def heldout_activations(cfg: LlamaConfig, source, held) -> torch.Tensor:
    """(N, d) float16 activations of the run's hook on the held-out windows the analysis reads
    (:meth:`~monosemantic.llama_eval.HeldOut.spread` of ``heldout_tokens``), each window's first position left
    out as the analysis leaves it out."""
    model = layer_model(cfg, source)
    x = held.spread(cfg.heldout_tokens).x
    # each window's first position left out, as the analysis leaves it out, so the two count the same positions
    out = [model.run_with_cache(x[i:i + cfg.batch_size], [model.hook])[model.hook][:, 1:]
           .reshape(-1, model.config.d_mlp).half() for i in range(0, len(x), cfg.batch_size)]
    return torch.cat(out)


@torch.no_grad()
def fidelity(sae, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """FVU, L0 and the never-fired fraction of ``sae`` on ``acts`` (N, d): the sums over all rows."""
    sae = sae.cpu().float().eval()
    fired = torch.zeros(sae.cfg.n_features, dtype=torch.bool)
    err = total = l0 = 0.0
    mean = acts.float().mean(0)
    for i in range(0, len(acts), batch):
        x = acts[i:i + batch].float()
        z = sae.encode(x)
        err += float(((sae.decode(z) - x) ** 2).sum())
        total += float(((x - mean) ** 2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    return {"fvu": err / total, "l0": l0 / len(acts), "never_fired_fraction": 1 - float(fired.float().mean())}


def chosen_settings(spec: str | None, n: int) -> list[int]:
    """The settings a sweep runs, numbered from 1 as in :data:`VARIANTS`: ``spec`` "all" (or None) or a comma
    list of numbers and ranges ("1,2,5-7"). Setting 1, the reference every row is paired with, is always run."""
    from .config import UserError

    if spec in (None, "", "all"):
        return list(range(1, n + 1))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out |= set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--settings takes numbers and ranges like 1,2,5-7 (or all), got {spec!r}") from None
    if not out or min(out) < 1 or max(out) > n:
        raise UserError(f"--settings: the sweep has settings 1 to {n}, got {spec!r}")
    return sorted(out | {1})


def run_sweep(cfg: LlamaConfig, profile: str, variants=VARIANTS, *, settings: list[int] | None = None, source=None,
              texts=None, progress: bool = True, log=print):
    """Train and measure each of ``variants`` (changes to ``cfg``) on the run's harvest; write the artifact.
    ``settings`` (numbered from 1; :func:`chosen_settings`) runs only those, keeping their numbers. ``texts``: as
    for :func:`~monosemantic.llama_eval.train_and_store` (held-out text after the harvest's)."""
    import pandas as pd

    from . import store
    from .llama import load_model

    numbers = settings or list(range(1, len(variants) + 1))
    shards = Shards(run_dir(profile, cfg) / "acts")  # raises with the command when there is no harvest
    source = source or load_model(cfg.model, dtype=cfg.dtype)
    held = heldout_windows(cfg, source, profile, texts() if texts else None)
    acts = heldout_activations(cfg, source, held)
    log(f"llama sweep: {len(acts):,} held-out activations; {len(numbers)} settings on {shards.rows:,} harvested")
    rows, saes = [], []
    start = time.perf_counter()
    for n in numbers:
        change = dict(variants[n - 1])
        scale = change.pop("sae_epochs_scale", 1.0)
        vcfg = cfg.replace(**change, sae_epochs=round(cfg.sae_epochs * scale, 6))
        log(f"[{n}/{len(variants)}] {change or 'the profile settings'}")
        out = trained(vcfg, profile, progress=progress)
        saes.append(out.sae)
        rows.append({"setting": n, "seed": vcfg.seed, "sae_epochs": vcfg.sae_epochs, "aux_coeff": vcfg.aux_coeff,
                     "dead_window": vcfg.dead_window, "k": vcfg.k, "n_features": out.sae.cfg.n_features,
                     "train_activations": out.sae.cfg.n_steps * vcfg.sae_batch, "train_seconds": out.seconds,
                     "train_dead_fraction": float(out.history[-1]["dead_fraction"]) if out.history else np.nan,
                     **{f"heldout_{k}": v for k, v in fidelity(out.sae, acts).items()}})
    # every setting spliced in on the same held-out windows (shared clean and ablated passes), so each can be
    # compared with the first by a paired difference over the same documents
    ce_held = held.spread(min(cfg.eval_tokens, CE_TOKENS))
    evs = evaluate_many(cfg, source, saes, ce_held)
    for row, ev in zip(rows, evs, strict=True):
        row.update({k: ev.metrics[k] for k in ("ce_loss_recovered", "ce_loss_recovered_low", "ce_loss_recovered_high",
                                               "dead_fraction", "eval_tokens", "n_documents") if k in ev.metrics})
        if len(np.unique(ce_held.documents)) > 1:
            d = paired_difference(evs[0].evaluation, ev.evaluation, ce_held.documents, n_boot=cfg.n_boot,
                                  seed=cfg.seed)
            row.update({"ce_recovered_minus_first": d.value, "ce_recovered_minus_first_low": d.low,
                        "ce_recovered_minus_first_high": d.high})
        log(f"[{row['setting']}] " + ", ".join(f"{k}={row[k]:.4g}" for k in (
            "heldout_fvu", "heldout_l0", "heldout_never_fired_fraction", "ce_loss_recovered")))
    table = pd.DataFrame(rows)
    with store.write("llama", profile, sweep_name(cfg), config=cfg) as w:
        w.wall_time_s = time.perf_counter() - start
        table.to_parquet(w.dir / "sweep.parquet", index=False)
        w.metrics.update({"settings": len(rows), "heldout_tokens": len(acts), "harvest_tokens": shards.rows,
                          "n_features": int(table.n_features.iloc[0])})
        w.info["variants"] = [dict(v) for v in variants]
        w.info["settings"] = numbers  # the variants run, numbered from 1
    return store.load("llama", profile, sweep_name(cfg))
