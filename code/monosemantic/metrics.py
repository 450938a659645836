"""How good is an SAE? Reconstruction, sparsity, feature density, and the language model's loss with the
SAE spliced in, all on held-out tokens (the val split) that training never saw.

The measures (Bricken et al. 2023, "Towards Monosemanticity", section "Sparse autoencoder evaluation"):

- ``mse``: mean over tokens and ``d_in`` of (x_hat - x)^2, the training loss's reconstruction term.
- ``fvu``: fraction of variance unexplained, sum (x_hat - x)^2 / sum (x - mean x)^2 (0 is perfect).
- ``l0``: features active per token (mean).
- ``dead_fraction``: features that never fire on the eval tokens.
- ``ultralow_fraction``: features with density (fraction of tokens they fire on) < 1e-5, dead included;
  it only differs from ``dead_fraction`` when there are more than 1e5 eval tokens.
- ``ce_loss_orig``, ``ce_loss_sae``, ``ce_loss_zero``, ``ce_loss_mean``: the model's next-token loss
  (nats) as it is, with the MLP hidden activations (``blocks.0.mlp.hook_post``, before the
  down-projection, as the anchor's ``forward_ablated``) replaced by the SAE's reconstruction, by zeros,
  and by their mean over the eval tokens.
- ``ce_loss_recovered`` = (L_zero - L_sae) / (L_zero - L_orig): 1 when the SAE loses nothing, 0 when it
  is as bad as deleting the MLP's hidden layer; ``ce_loss_recovered_mean_ablation`` takes the
  mean-ablated loss as the baseline instead, a stricter one (Anthropic report both).

>>> windows = harvest.sequential_windows(TokenDataset.open("cpu", "val").tokens, 128, n_windows=256)
>>> evaluate(model, sae, windows)
{'mse': ..., 'fvu': ..., 'l0': ..., 'ce_loss_recovered': ..., ...}
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import checkpoint as checkpoint_io
from .config import UserError
from .hardware import trimmed
from .harvest import HOOK, ForwardDtype, forward_dtype, resolve_dtype
from .intervals import Interval, bootstrap, group_sums
from .sae import SAE

ULTRALOW_DENSITY = 1e-5
"""Density under which a feature counts as ultra-low (Bricken et al.'s "ultralow density cluster")."""

METRIC_NAMES = ("mse", "fvu", "l0", "dead_fraction", "ultralow_fraction", "ce_loss_recovered",
                "ce_loss_recovered_mean_ablation", "ce_loss_orig", "ce_loss_sae", "ce_loss_zero", "ce_loss_mean",
                "n_features", "eval_tokens")


class MetricsError(UserError, ValueError):
    """An SAE that does not fit the activations, or activations that are not numbers; one line."""


class DensityHistogram(NamedTuple):
    """Histogram of log10(feature density) over the live features; dead ones (log10 0 = -inf) counted apart."""

    edges: Tensor  # (bins + 1,) log10 density bin edges
    counts: Tensor  # (bins,) int64 live features per bin
    n_dead: int  # features that never fired


class Evaluation(NamedTuple):
    metrics: dict[str, float]  # exactly METRIC_NAMES
    density: Tensor  # (n_features,) fraction of eval tokens each feature fires on
    histogram: DensityHistogram
    per_window: dict[str, np.ndarray]  # WINDOW_SUMS -> (n_windows,) float64 sums over each window's tokens
    window_fires: np.ndarray | None  # (n_windows, n_features) int32 firings per window, when asked for
    d_in: int  # width of the activations (mse is a mean over tokens and d_in)


# What run_evaluation sums per window, so that every metric can be recomputed on resampled documents:
# tokens, squared residual, squared deviation from the eval mean, active latents, and the four token losses;
# and the squared residual and deviation at the window's first position alone (which has nothing to attend
# to but itself and carries outlier activations), so that the reconstruction can be measured without it
WINDOW_SUMS = ("tokens", "resid", "centred", "active", "loss_orig", "loss_sae", "loss_zero", "loss_mean",
               "resid_first", "centred_first")


def density_histogram(density: Tensor, bins: int = 50, low: float = -10.0) -> DensityHistogram:
    """log10 of the live features' densities in ``bins`` equal bins from ``low`` to 0 (lower values are
    clipped into the first bin); dead features are counted in ``n_dead``."""
    live = density[density > 0].double()
    logd = live.log10().clamp(low, 0.0)
    counts = torch.histc(logd, bins=bins, min=low, max=0.0).long() if live.numel() else torch.zeros(bins).long()
    return DensityHistogram(torch.linspace(low, 0.0, bins + 1), counts, int((density == 0).sum()))


# feature_fires encodes in blocks of about this many bytes of pre-activations (4,096 rows at 4,096 features,
# 512 at 32,768): large enough for the encoder product to run near its peak, small enough to stay in memory
FIRES_BLOCK_BYTES = 64 * 2**20


@torch.no_grad()
def feature_fires(sae: SAE, rows: np.ndarray | Tensor, block_rows: int | None = None) -> Tensor:
    """(n_features,) int64: on how many of ``rows`` (N, d_in; a numpy array or memmap, or a tensor) each
    feature fires (> 0). The density is this over N.

    Costs one fp32 encoder product per row and nothing over the (rows, n_features) latents that it can avoid:
    rows are encoded in blocks into one reused buffer; a TopK SAE counts its k indices (``bincount``) instead
    of testing a dense latent tensor; a ReLU SAE counts ``pre > 0`` per column (:func:`torch.sign` of the
    ReLU, summed by a matrix-vector product). The encoder product is float32 whatever the machine, so that the
    counts are the same everywhere: a bfloat16 product would be ~3x faster with bf16 units, but pre-activations
    within its rounding of 0 would change sides."""
    n, dev = sae.cfg.n_features, sae.W_dec.device
    block = block_rows or max(1, FIRES_BLOCK_BYTES // (4 * n))
    w_enc, b_enc, b_dec = sae.W_enc.float(), sae.b_enc.float(), sae.b_dec.float()
    counts = torch.zeros(n, dtype=torch.int64, device=dev)
    buf = torch.empty(min(block, max(1, rows.shape[0])), n, device=dev)  # (block, n) pre-activations
    ones = torch.ones(1, buf.shape[0], device=dev)
    for start in range(0, rows.shape[0], block):
        part = rows[start:start + block]
        x = part if isinstance(part, Tensor) else torch.from_numpy(np.asarray(part, dtype=np.float32))
        x = x.to(dev, torch.float32)  # (b, d_in)
        pre = torch.addmm(b_enc, x - b_dec, w_enc, out=buf[:x.shape[0]])  # (b, n)
        if sae.cfg.architecture == "topk":
            values, indices = pre.topk(sae.cfg.k, dim=1, sorted=False)  # (b, k)
            counts += torch.bincount(indices[values > 0], minlength=n)
        else:  # 1 where pre > 0, else 0, in place, summed by a product with ones: exact (whole numbers
            # far below 2^24), and 4.5x faster on a CPU than summing the bool mask ``(pre > 0).sum(0)``
            counts += (ones[:, :x.shape[0]] @ pre.clamp_(min=0).sign_())[0].long()
    return counts


def feature_density(sae: SAE, rows: np.ndarray | Tensor, block_rows: int | None = None) -> Tensor:
    """(n_features,) float64: the fraction of ``rows`` (N, d_in) on which each feature fires (> 0);
    :func:`feature_fires` over N."""
    return feature_fires(sae, rows, block_rows).cpu().double() / max(1, rows.shape[0])


def _recovered(l_baseline: float, l_sae: float, l_orig: float) -> float:
    gap = l_baseline - l_orig
    return (l_baseline - l_sae) / gap if gap != 0 else float("nan")


@torch.no_grad()
def run_evaluation(model: torch.nn.Module, sae: SAE, windows: Sequence[tuple[Tensor, Tensor]], *,
                   hook: str = HOOK, dtype: ForwardDtype = "float32", bins: int = 50,
                   keep_fires: bool = False) -> Evaluation:
    """Evaluate ``sae`` (trained on ``hook`` of ``model``) on ``windows``, a list of ``(x, y)`` token batches
    (B, T) with next-token targets (:func:`monosemantic.harvest.sequential_windows` of the val split).

    Two passes: the first reads the activations (stopping at the hook), checks they are finite and fit the
    SAE and takes their mean; the second runs four forward passes per batch (as is, SAE-spliced, zeroed,
    mean-ablated), measuring the reconstruction on the way. The SAE runs in float32; ``dtype`` is the
    model's autocast (float32 by default, so that the losses differ only by what the splice changes).
    Every sum is also kept per window (``per_window``; with ``keep_fires`` the firings per window and
    feature too), for intervals over documents: :func:`metric_intervals`.
    """
    return run_evaluations(model, [sae], windows, hook=hook, dtype=dtype, bins=bins, keep_fires=keep_fires)[0]


@torch.no_grad()
def run_evaluations(model: torch.nn.Module, saes: Sequence[SAE], windows: Sequence[tuple[Tensor, Tensor]], *,
                    hook: str = HOOK, dtype: ForwardDtype = "float32", bins: int = 50,
                    keep_fires: bool = False, checkpoint: Path | None = None, checkpoint_key: str = "",
                    checkpoint_every: int = 32, log: Callable[[str], None] | None = None) -> list[Evaluation]:
    """:func:`run_evaluation` for several SAEs of the same hook at once: the clean, zeroed and mean-ablated
    passes are shared, so n SAEs cost 3 + n forward passes per batch instead of 4 n.

    With ``checkpoint`` (a file path), the second pass saves what it has summed every ``checkpoint_every``
    batches, and a later call with the same ``checkpoint_key`` (name what the result depends on: model, SAEs,
    windows) resumes after the last saved batch, giving the same result as an uninterrupted run; the file is
    removed at the end. ``log`` gets a progress line at each save."""
    windows = list(windows)
    saes = list(saes)
    if not windows:
        raise MetricsError("no eval windows given; pass at least one (x, y) batch of held-out tokens")
    if not saes:
        raise MetricsError("no SAE given")
    device = next(model.parameters()).device
    cast = resolve_dtype(dtype, device, model)

    # pass 1: the activations' width, finiteness, mean and total variance (float64 sums, kept per window too:
    # each window's squared deviation from the mean follows from them once the mean is known)
    n_tok, total, sq = 0, None, None
    win_sum: list[Tensor] = []  # (B, d) per batch: each window's sum of activations
    win_sq: list[Tensor] = []  # (B,) per batch: each window's sum of squared norms
    with forward_dtype(model, cast):
        for x, _ in trimmed(windows):
            acts = model.run_with_cache(x.to(device), [hook])[hook]  # (B, T, d)
            for sae in saes:
                if acts.shape[-1] != sae.cfg.d_in:
                    raise MetricsError(f"the SAE reads {sae.cfg.d_in} numbers (d_in) but {hook} has "
                                       f"{acts.shape[-1]}; evaluate it on the hook it was trained on")
            if not torch.isfinite(acts).all():
                raise MetricsError(f"activations at {hook} contain NaN or inf; check the model's weights")
            windowed = acts.double()  # (B, T, d)
            win_sum.append(windowed.sum(1).cpu())
            win_sq.append(windowed.pow(2).sum((1, 2)).cpu())
            total = win_sum[-1].sum(0) if total is None else total + win_sum[-1].sum(0)
            sq = win_sq[-1].sum() if sq is None else sq + win_sq[-1].sum()
            n_tok += acts.shape[0] * acts.shape[1]
    mean = total / n_tok  # (d,)
    variance_sum = float(sq - n_tok * mean.pow(2).sum())  # sum over tokens of |x - mean|^2
    mean_act = mean.float().to(device)

    # pass 2: the losses, and each SAE's reconstruction measured inside its spliced forward pass, per window
    shared: dict[str, list[Tensor]] = {name: [] for name in ("tokens", "centred", "loss_orig", "loss_zero",
                                                              "loss_mean")}
    own: list[dict[str, list[Tensor]]] = [{name: [] for name in ("resid", "active", "loss_sae", "resid_first",
                                                                  "centred_first")} for _ in saes]
    fires = [torch.zeros(sae.cfg.n_features, dtype=torch.long, device=sae.W_dec.device) for sae in saes]
    window_fires: list[list[Tensor]] = [[] for _ in saes]
    done = 0  # batches of pass 2 already summed (by an earlier, interrupted call)
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state.get("key") == checkpoint_key and state["n_saes"] == len(saes):
            done, shared, own, window_fires = state["done"], state["shared"], state["own"], state["window_fires"]
            fires = [f.to(sae.W_dec.device) for f, sae in zip(state["fires"], saes, strict=True)]
            if log:
                log(f"    resuming after {done} of {len(windows)} batches ({checkpoint})")

    def save(n_done: int) -> None:
        checkpoint_io.save(Path(checkpoint), {"key": checkpoint_key, "n_saes": len(saes), "done": n_done,
                                              "shared": shared, "own": own, "fires": [f.cpu() for f in fires],
                                              "window_fires": window_fires})

    def splice_with(j: int):
        sae = saes[j]
        sae_device = sae.W_dec.device

        def splice(h: Tensor, name: str) -> Tensor:
            B, T = h.shape[0], h.shape[1]
            flat = h.reshape(-1, h.shape[-1]).to(sae_device, torch.float32)  # (B*T, d)
            with torch.autocast(sae_device.type, enabled=False):
                out = sae(flat)
            recon = out.recon.float()
            if not torch.isfinite(recon).all():
                raise MetricsError("the SAE's reconstruction contains NaN or inf; check its weights")
            sq = (recon - flat).double().pow(2).reshape(B, T, -1)  # (B, T, d)
            own[j]["resid"].append(sq.sum((1, 2)).cpu())  # (B,)
            own[j]["resid_first"].append(sq[:, 0].sum(1).cpu())  # (B,) the first position alone
            own[j]["centred_first"].append((flat.reshape(B, T, -1)[:, 0] - mean_act.to(sae_device)).double()
                                           .pow(2).sum(1).cpu())
            active = out.latents > 0  # (B*T, n_features)
            own[j]["active"].append(active.reshape(B, -1).sum(1).double().cpu())  # (B,)
            fires[j].add_(active.sum(0))
            if keep_fires:
                window_fires[j].append(active.reshape(B, T, -1).sum(1, dtype=torch.int32).cpu())  # (B, n)
            return recon.to(h.device, h.dtype).reshape(h.shape)
        return splice

    def token_losses(x: Tensor, y: Tensor) -> Tensor:
        logits = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        return loss.double().reshape(x.shape).sum(1).cpu()  # (B,)

    ablations = {"zero": lambda h, name: torch.zeros_like(h),
                 "mean": lambda h, name: mean_act.to(h.dtype).expand_as(h)}
    splices = [splice_with(j) for j in range(len(saes))]
    start = time.perf_counter()
    with forward_dtype(model, cast):
        for b, ((x, y), s, q) in enumerate(trimmed(zip(windows, win_sum, win_sq, strict=True))):
            if b < done:
                continue
            if checkpoint is not None and b > done and b % checkpoint_every == 0:
                save(b)
                if log:
                    rate = (b - done) / (time.perf_counter() - start)
                    log(f"    {b}/{len(windows)} batches, {rate * 60:.1f} a minute, about "
                        f"{(len(windows) - b) / rate / 60:.0f} min left")
            x, y = x.to(device), y.to(device)
            T = x.shape[1]
            shared["tokens"].append(torch.full((x.shape[0],), float(T), dtype=torch.float64))
            # sum over a window's tokens of |x - mean|^2 = sum |x|^2 - 2 mean . sum x + T |mean|^2
            shared["centred"].append(q - 2 * (s @ mean.cpu()) + T * mean.pow(2).sum().cpu())
            shared["loss_orig"].append(token_losses(x, y))
            for key, fn in ablations.items():
                with model.hooks({hook: fn}):
                    shared[f"loss_{key}"].append(token_losses(x, y))
            for j, fn in enumerate(splices):
                with model.hooks({hook: fn}):
                    own[j]["loss_sae"].append(token_losses(x, y))

    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    common = {k: torch.cat(v).numpy() for k, v in shared.items()}
    results = []
    for j, sae in enumerate(saes):
        per_window = {**common, **{k: torch.cat(v).numpy() for k, v in own[j].items()}}
        per_window = {k: per_window[k] for k in WINDOW_SUMS}
        losses = {k: float(per_window[f"loss_{k}"].sum()) / n_tok for k in ("orig", "sae", "zero", "mean")}
        resid, active = float(per_window["resid"].sum()), float(per_window["active"].sum())
        density = (fires[j].double() / n_tok).cpu()
        metrics = {
            "mse": resid / (n_tok * sae.cfg.d_in),
            "fvu": resid / variance_sum if variance_sum > 0 else float("nan"),
            "l0": active / n_tok,
            "dead_fraction": float((fires[j] == 0).double().mean()),
            "ultralow_fraction": float((density < ULTRALOW_DENSITY).double().mean()),
            "ce_loss_recovered": _recovered(losses["zero"], losses["sae"], losses["orig"]),
            "ce_loss_recovered_mean_ablation": _recovered(losses["mean"], losses["sae"], losses["orig"]),
            "ce_loss_orig": losses["orig"],
            "ce_loss_sae": losses["sae"],
            "ce_loss_zero": losses["zero"],
            "ce_loss_mean": losses["mean"],
            "n_features": sae.cfg.n_features,
            "eval_tokens": n_tok,
        }
        assert tuple(metrics) == METRIC_NAMES
        wf = torch.cat(window_fires[j]).numpy() if keep_fires else None
        results.append(Evaluation(metrics, density, density_histogram(density, bins=bins), per_window, wf,
                                  sae.cfg.d_in))
    return results


# the metrics an interval is given for, as functions of the summed per-window quantities (any leading axes)
def _ratio(num: str, den: str, scale: float = 1.0):
    return lambda s: s[num] / (s[den] * scale)


def _recovered_of(baseline: str):
    return lambda s: (s[baseline] - s["loss_sae"]) / (s[baseline] - s["loss_orig"])


def _interval_stats(d_in: int) -> dict[str, Callable[[Any], Any]]:
    """The metrics an interval is given for, as functions of an evaluation's summed per-window quantities."""
    return {
        "fvu": _ratio("resid", "centred"),
        "mse": _ratio("resid", "tokens", float(d_in)),
        "l0": _ratio("active", "tokens"),
        "ce_loss_recovered": _recovered_of("loss_zero"),
        "ce_loss_recovered_mean_ablation": _recovered_of("loss_mean"),
        # the FVU over every position but each window's first; the rest's spread is taken around the mean of all
        # positions (the first included), which is a little larger than around their own mean
        "fvu_after_first": lambda s: (s["resid"] - s["resid_first"]) / (s["centred"] - s["centred_first"]),
        **{f"ce_loss_{k}": _ratio(f"loss_{k}", "tokens") for k in ("orig", "sae", "zero", "mean")},
    }


def metric_intervals(ev: Evaluation, groups: np.ndarray, *, n_boot: int = 1000, seed: int = 0
                     ) -> dict[str, Interval]:
    """95% intervals of the evaluation's metrics when the ``groups`` (one label per eval window: its document,
    :func:`monosemantic.intervals.window_documents`) are resampled with replacement. Dead and ultra-low
    fractions come with their value only (low and high NaN): see the comment at the end."""
    sums, _ = group_sums(ev.per_window, groups)
    out = {name: bootstrap(sums, fn, n_boot=n_boot, seed=seed) for name, fn in _interval_stats(ev.d_in).items()}
    # Dead and ultra-low fractions get their value and no interval: "never fires in the sample" only grows when
    # documents are dropped, and a bootstrap replicate drops about a third of them, so its percentile interval
    # lies above the estimate (on the cpu SAE: 20.6% dead, replicates 23.9-29.4%) and covers nothing.
    n_groups = len(np.unique(groups))
    out["dead_fraction"] = Interval(ev.metrics["dead_fraction"], math.nan, math.nan, n_groups, 0)
    out["ultralow_fraction"] = Interval(ev.metrics["ultralow_fraction"], math.nan, math.nan, n_groups, 0)
    return out


def paired_difference(a: Evaluation, b: Evaluation, groups: np.ndarray, metric: str = "ce_loss_recovered", *,
                      n_boot: int = 1000, seed: int = 0) -> Interval:
    """``metric`` of ``b`` minus that of ``a``, two evaluations of the same windows (e.g. two SAEs in one
    :func:`run_evaluations`), with a 95% interval from resampling the ``groups`` (documents) of both together:
    the paired comparison, whose interval is narrower than the two metrics' own when their errors move
    together across documents."""
    if not all(np.array_equal(np.asarray(a.per_window[k]), np.asarray(b.per_window[k]))
               for k in ("tokens", "loss_orig")):
        raise MetricsError("the two evaluations read different windows; evaluate both on the same ones "
                           "(run_evaluations) to compare them")
    stat = _interval_stats(a.d_in).get(metric)
    if stat is None or a.d_in != b.d_in:
        raise MetricsError(f"no paired difference of {metric!r} between SAEs of widths {a.d_in} and {b.d_in}; "
                           f"choose one of {sorted(_interval_stats(a.d_in))} for SAEs of one hook")
    sa, _ = group_sums(a.per_window, groups)
    sb, _ = group_sums(b.per_window, groups)
    sums = {**{f"a/{k}": v for k, v in sa.items()}, **{f"b/{k}": v for k, v in sb.items()}}

    def diff(s):
        return (stat({k[2:]: v for k, v in s.items() if k.startswith("b/")})
                - stat({k[2:]: v for k, v in s.items() if k.startswith("a/")}))

    return bootstrap(sums, diff, n_boot=n_boot, seed=seed)


def evaluate(model: torch.nn.Module, sae: SAE, windows: Sequence[tuple[Tensor, Tensor]], *, hook: str = HOOK,
             dtype: ForwardDtype = "float32") -> dict[str, float]:
    """The metrics dict of :func:`run_evaluation` (keys :data:`METRIC_NAMES`)."""
    return run_evaluation(model, sae, windows, hook=hook, dtype=dtype).metrics

