"""``monosemantic evaluate``: every committed SAE of the one-layer model on the whole held-out split, each
headline metric with a 95% interval over held-out documents.

Training evaluates each run on ``eval_windows`` windows (32,768 tokens in the cpu profile) to keep sweeps
cheap; the book's headline numbers come from here instead: all of the held-out split in consecutive windows
(each window assigned to the document it starts in), the four forward passes of
:func:`monosemantic.metrics.run_evaluation`, and a bootstrap over documents
(:func:`monosemantic.metrics.metric_intervals`).

Writes ``sae/<profile>-heldout``: ``heldout.parquet`` (one row per SAE and metric: value, low, high) and
metrics ``<sae>_<metric>``, ``<sae>_<metric>_low`` / ``_high`` for the headline metrics, plus the token and
document counts.

    monosemantic evaluate --profile cpu          # ~10 min per SAE on 2 CPU cores (fp32), seconds on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ConfigError, StageConfig, UserError, check_positive, stable_hash

DEFAULT_PROFILE = "cpu"
HEADLINE = ("fvu", "fvu_after_first", "l0", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "dead_fraction",
            "ultralow_fraction")


@dataclasses.dataclass(frozen=True)
class EvalConfig(StageConfig):
    """Which held-out tokens and how the intervals are drawn."""

    STAGE: ClassVar[str] = "sae"

    split: str = "val"
    """What is evaluated on, never seen in LM or SAE training: a token split (``val``: consecutive windows of
    it), or ``heldout``: the windows of ``heldout/<profile>-windows`` (every corpus source; each window of
    ``seq_len`` tokens gives ``seq_len - 1`` predictions, its last token being the last target)."""
    seq_len: int = 0
    """Tokens per window (0: the model's context length, 128 for the one-layer model)."""
    max_windows: int = 0
    """At most this many windows, spread evenly over the split so that every part of it is represented
    (0: every window the split holds)."""
    neuron_ks: tuple[int, ...] = (1, 2, 8, 24, 32)
    """Baselines: the layer's own neurons with all but each token's k largest set to zero (the neuron basis
    as a k-sparse dictionary of width d_in), evaluated like the SAEs: k = 1 and 2 at the ReLU + L1 runs' L0,
    24 and 32 on either side of the TopK SAE's."""
    batch_windows: int = 16
    """Windows per forward pass (the logits of a batch are batch x seq_len x 50,304 floats)."""
    n_boot: int = 1000
    """Bootstrap replicates over documents."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        check_positive(self, "batch_windows", "n_boot", integer=True)
        if any(not isinstance(k, int) or k <= 0 for k in self.neuron_ks):
            raise ConfigError(f"evaluate.neuron_ks must be positive integers, got {self.neuron_ks!r}")
        for name in ("seq_len", "max_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"evaluate.{name} must be an integer >= 0 (0: see its help), got {value!r}")


class NeuronTopK(torch.nn.Module):
    """The neuron basis as a k-sparse dictionary: each token keeps its k largest neuron activations, the rest
    set to zero. What an SAE's fidelity at L0 = k is compared with (it has width d_in and no training)."""

    def __init__(self, d_in: int, k: int):
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in, n_features=d_in, k=k)
        self.W_dec = torch.nn.Parameter(torch.eye(d_in), requires_grad=False)  # identity: neuron i is row i

    def forward(self, x):  # (N, d_in) -> an output with .recon and .latents, as SAE.forward's
        values, idx = x.topk(self.cfg.k, dim=-1)  # (N, k)
        kept = torch.zeros_like(x).scatter_(-1, idx, values.clamp_min(0))  # ReLU neurons: >= 0 anyway
        return SimpleNamespace(recon=kept, latents=kept)


def committed_saes(profile: str) -> list[str]:
    """Names of the SAE artifacts of ``profile`` whose weights are committed (``sae/<profile>-<name>`` with its
    cfg.json and weights; not those that keep their weights in ``cache/work/``, such as the literal runs at full
    length) and that read this LM (not ``random-model``), in a stable order: the recipes first, then the rest
    alphabetically."""
    from . import store
    from .sae import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
    from .sae_train import RANDOM_MODEL

    root = store.artifact_path("sae", profile, "x").parent
    names = sorted(p.name.removeprefix(f"{profile}-") for p in root.glob(f"{profile}-*")
                   if (p / SAE_CFG_FILENAME).is_file() and (p / SAE_WEIGHTS_FILENAME).is_file())
    names = [n for n in names if n != RANDOM_MODEL]  # it reads another model's activations
    order = {"anchor": 0, "anchor-fixed": 1, "topk": 2}
    return sorted(names, key=lambda n: (order.get(n, 9), n))


HELDOUT = "heldout"


def _heldout_windows(profile: str):
    """([the heldout artifact], x, y, document of each window) from ``heldout/<profile>-windows``: x and y the
    (W, T - 1) inputs and next-token targets of its (W, T) windows; documents labelled within their split."""
    from . import heldout, store

    held = heldout.load_windows(profile)
    w = torch.from_numpy(held.windows.astype(np.int64))
    return [store.load(HELDOUT, profile, "windows")], w[:, :-1], w[:, 1:], held.documents


def seed_saes(profile: str) -> dict[str, tuple]:
    """{run name: (the ``sae/<profile>-seeds`` artifact, its folder)} for the seed runs whose weights are on
    this machine (they live in the artifact's work folder, not in the committed cache); {} without it."""
    from . import store
    from .sae_train import SEEDS

    if not store.artifact_path("sae", profile, SEEDS).is_dir():
        return {}
    art = store.load("sae", profile, SEEDS)
    root = art.work_path
    return {p.name: (art, p) for p in sorted(root.glob("*")) if (p / "cfg.json").is_file()} if root.is_dir() else {}


def run_stage(profile: str, cfg: EvalConfig, names: list[str] | None = None, progress: bool = True,
              log=print, device: str | torch.device = "cpu") -> None:
    import pandas as pd

    from . import sae as sae_mod
    from . import store
    from .data import TokenDataset
    from .harvest import split_windows, spread_rows, window_batches
    from .intervals import window_documents
    from .lm import load_pretrained
    from .metrics import metric_intervals, run_evaluations

    committed = committed_saes(profile)
    # the seed runs are looked up only when asked for, or for a default run (a stale seeds artifact is an error
    # that says how to remake it)
    seeds = seed_saes(profile) if not names or set(names) - set(committed) else {}
    names = names or committed + sorted(seeds)
    if not names:
        raise UserError(f"no SAE with weights in cache/sae/{profile}-*; train them with "
                        f"`monosemantic train-sae --profile {profile}`")
    model = load_pretrained(profile).to(device).eval()
    lm_art = store.load("lm", profile, "model")
    if cfg.split == HELDOUT:
        inputs_extra, x_all, y_all, all_docs = _heldout_windows(profile)
        seq_len = x_all.shape[1]
        rows_at = spread_rows(len(x_all), cfg.max_windows)
        docs = all_docs[rows_at]
    else:
        data = TokenDataset.open(profile, cfg.split)
        tokens = data.tokens
        seq_len = cfg.seq_len or model.config.context_length
        x_all, y_all = split_windows(tokens, seq_len)  # (n_all, seq_len) each
        inputs_extra = []
        rows_at = spread_rows(len(x_all), cfg.max_windows)
        docs = window_documents(tokens, rows_at * seq_len, data.eot_id)
    if len(x_all) < 2:
        raise UserError(f"{cfg.split} holds {len(x_all)} windows of {seq_len} tokens: too few for an interval")
    n_windows = len(rows_at)
    windows = window_batches(x_all, y_all, rows_at, cfg.batch_windows)
    arts, saes = [], []
    for name in names:
        art = seeds[name][0] if name in seeds else store.load("sae", profile, name)
        if art not in arts:
            arts.append(art)
        saes.append(sae_mod.load(seeds[name][1] if name in seeds else art.path, device=device).eval())
    d_in = saes[0].cfg.d_in
    names = names + [f"neurons-top{k}" for k in cfg.neuron_ks]
    saes = saes + [NeuronTopK(d_in, k).to(device) for k in cfg.neuron_ks]
    start = time.perf_counter()
    log(f"{len(names)} SAEs ({', '.join(names)}) on {n_windows:,} windows ({n_windows * seq_len:,} tokens, "
        f"{len(np.unique(docs)):,} documents): 3 + {len(names)} forward passes per window")
    inputs = [lm_art, *arts, *inputs_extra]
    # an interrupted run resumes from its last saved batch; the key names everything the sums depend on
    key = stable_hash({"config": cfg.config_hash(), "names": names, "rows": stable_hash(rows_at.tolist()),
                       "inputs": [a.content_hash for a in inputs]})
    ckpt = store.work_path("sae", profile, "heldout") / "evaluate.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        evals = run_evaluations(model, saes, windows, checkpoint=ckpt, checkpoint_key=key,
                                log=log if progress else None)
    rows, metrics = [], {}
    for name, ev in zip(names, evals, strict=True):
        cis = metric_intervals(ev, docs, n_boot=cfg.n_boot, seed=cfg.seed)
        for metric, ci in cis.items():
            rows.append({"sae": name, "metric": metric, "value": ci.value, "low": ci.low, "high": ci.high})
        metrics.update(headline_metrics(cis, f"{_key(name)}_"))
        log(f"    {name}: CE loss recovered {cis['ce_loss_recovered'].value:.4f} "
            f"[{cis['ce_loss_recovered'].low:.4f}, {cis['ce_loss_recovered'].high:.4f}], "
            f"FVU {cis['fvu'].value:.4f}, L0 {cis['l0'].value:.1f}")
    log(f"    ({time.perf_counter() - start:.0f} s)")
    with store.write("sae", profile, "heldout", config=cfg, inputs=inputs) as w:
        pd.DataFrame(rows).to_parquet(w.dir / "heldout.parquet", index=False)
        w.metrics.update({"split": cfg.split, "eval_tokens": n_windows * seq_len,
                          "n_documents": int(len(np.unique(docs))),
                          "n_boot": cfg.n_boot, "saes": len(names), **metrics})


def _key(name: str) -> str:
    return name.replace("-", "_")


def headline_metrics(cis: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A manifest's keys for :func:`monosemantic.metrics.metric_intervals`' result: ``<prefix><metric>`` for
    each :data:`HEADLINE` metric and, where the bootstrap gives an interval, ``..._low`` and ``..._high``
    (dead and ultra-low fractions have none)."""
    out: dict[str, float] = {}
    for metric in HEADLINE:
        ci = cis[metric]
        out[f"{prefix}{metric}"] = ci.value
        if np.isfinite(ci.low):
            out.update({f"{prefix}{metric}_low": ci.low, f"{prefix}{metric}_high": ci.high})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", action="append", dest="saes", metavar="NAME",
                   help="evaluate only sae/<profile>-NAME (repeatable; default: every SAE with weights)")
    p.add_argument("--max-windows", type=int, default=None, help="at most this many windows (default: all)")
    p.add_argument("--split", choices=("val", HELDOUT), default="val",
                   help="val (default): the val split's consecutive windows; heldout: the windows of "
                        "heldout/<profile>-windows, never-seen text of every corpus source")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    cfg = EvalConfig(split=args.split)
    if args.max_windows is not None:
        cfg = cfg.replace(max_windows=args.max_windows)
    run_stage(args.profile, cfg, names=args.saes, progress=not args.no_progress,
              log=(lambda *a, **k: None) if args.no_progress else print)
    return 0
