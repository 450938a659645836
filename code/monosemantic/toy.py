"""Synthetic experiments with known answers: superposition in toy models, and dictionary recovery by SAEs.

Two questions of chapter 2, each answered where the truth is known:

1. **Superposition** (Elhage et al. 2022, "Toy Models of Superposition"). ``n`` features with decreasing
   importance are squeezed through ``m < n`` hidden dimensions by ``h = W x`` and read back by
   ``x_hat = ReLU(W^T h + b)``. Dense features: the model keeps the ``m`` most important ones and drops the
   rest. Sparse features: it packs many more than ``m`` into the same ``m`` dimensions, at the price of
   interference. Many sparsities and seeds train at once as one batched model (:func:`train_toy_models`).
2. **Dictionary recovery** (:func:`run_recovery`). Activations ``x = sum_i a_i f_i (+ noise)`` are built
   from ``K`` known unit directions ``f_i`` in ``d < K`` dimensions with sparse, non-negative, power-law
   distributed coefficients. SAEs of widths ``0.5 d .. 16 d`` (L1 at several penalties, TopK at several
   ``k``), a plain autoencoder and PCA are scored on how many ``f_i`` they find, and at what cost.

``monosemantic toy --profile cpu`` writes both to the cache (``cache/toy/<profile>-superposition`` and
``cache/toy/<profile>-recovery``), which chapter 2 reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import sae as sae_lib
from .config import ConfigError, StageConfig, check_positive

DEFAULT_PROFILE = "cpu"
REPRESENTED_NORM = 0.5  # a feature counts as represented when ||W_i|| exceeds this (Elhage et al. use ~0.5)


# --- 1. superposition in toy models ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SuperpositionConfig(StageConfig):
    """Toy models of superposition trained across feature densities (1 - sparsity)."""

    STAGE: ClassVar[str] = "toy"

    n_features: int = 20
    """Input features n (Elhage et al.'s main example: 20)."""
    n_hidden: int = 5
    """Hidden dimensions m < n (Elhage et al.: 5)."""
    importance_decay: float = 0.9
    """Feature i has importance decay**i in the loss, so the model must choose which features to keep."""
    densities: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)
    """Probability that a feature is non-zero (sparsity S = 1 - density), one model per value and seed."""
    n_seeds: int = 3
    """Independent initialisations per density (all trained in the same batched run)."""
    batch_size: int = 1024
    n_steps: int = 10_000
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "n_features", "n_hidden", "n_seeds", "batch_size", "n_steps", "lr")
        if self.n_hidden >= self.n_features:
            raise ConfigError(f"SuperpositionConfig: n_hidden ({self.n_hidden}) must be below n_features "
                              f"({self.n_features}) for superposition to be a question")
        if not self.densities or not all(0 < p <= 1 for p in self.densities):
            raise ConfigError(f"SuperpositionConfig: densities must be in (0, 1], got {self.densities}")
        if not 0 < self.importance_decay <= 1:
            raise ConfigError(f"SuperpositionConfig: importance_decay must be in (0, 1], got {self.importance_decay}")


class ToyModels(torch.nn.Module):
    """``n_instances`` independent toy models in one module: W (I, m, n), b (I, n)."""

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, generator: torch.Generator):
        super().__init__()
        w = torch.randn(n_instances, n_hidden, n_features, generator=generator)
        w *= math.sqrt(2 / (n_hidden + n_features))  # Xavier normal, as in the paper's colab
        self.W = torch.nn.Parameter(w)
        self.b = torch.nn.Parameter(torch.zeros(n_instances, n_features))

    def forward(self, x: Tensor) -> Tensor:
        """x: (I, B, n) -> x_hat (I, B, n) = ReLU(W^T W x + b)."""
        h = torch.einsum("imn,ibn->ibm", self.W, x)  # (I, B, m)
        return F.relu(torch.einsum("imn,ibm->ibn", self.W, h) + self.b[:, None, :])


def sample_sparse_features(density: Tensor, batch: int, n: int, generator: torch.Generator) -> Tensor:
    """(I, B, n) features: uniform on [0, 1] with probability density[i], else 0 (Elhage et al. sec. 2)."""
    n_inst = density.shape[0]
    on = torch.rand(n_inst, batch, n, generator=generator) < density[:, None, None]
    return on * torch.rand(n_inst, batch, n, generator=generator)


def train_toy_models(cfg: SuperpositionConfig, progress: bool = True) -> tuple[ToyModels, Tensor, list[dict]]:
    """Train one toy model per (density, seed), all at once. Returns the models, the density of each
    instance (I,) and the loss curve (rows of step and per-instance loss)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    density = torch.tensor(cfg.densities, dtype=torch.float32).repeat_interleave(cfg.n_seeds)  # (I,)
    models = ToyModels(len(density), cfg.n_features, cfg.n_hidden, gen)
    importance = cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32)  # (n,)
    opt = torch.optim.Adam(models.parameters(), lr=cfg.lr)
    curve = []
    for step in tqdm(range(cfg.n_steps), desc="toy models", disable=not progress, mininterval=1.0, leave=False):
        x = sample_sparse_features(density, cfg.batch_size, cfg.n_features, gen)
        per_instance = (importance * (models(x) - x).pow(2)).mean(1).sum(-1)  # (I,)
        opt.zero_grad(set_to_none=True)
        per_instance.sum().backward()  # instances share no parameters: one backward trains them all
        opt.step()
        if (step + 1) % max(1, cfg.n_steps // 50) == 0:
            curve.append({"step": step + 1, "loss": per_instance.detach().tolist()})
    return models, density, curve


@torch.no_grad()
def superposition_metrics(W: Tensor) -> dict[str, Tensor]:
    """Per-instance geometry of W (I, m, n), after Elhage et al.:

    - ``norm`` (I, n): ||W_i||, about 1 for a represented feature, 0 for a dropped one;
    - ``interference`` (I, n): sum over j != i of (W_i_hat . W_j)^2, how much other features leak into i's
      direction (0 when i has a dimension to itself);
    - ``dimensionality`` (I, n): ||W_i||^2 / sum_j (W_i_hat . W_j)^2, the fraction of a dimension feature i
      gets (1: its own dimension, 1/2: an antipodal pair, 0: not represented);
    - ``dims_per_feature`` (I,): m / ||W||_F^2, hidden dimensions per (norm-weighted) represented feature;
    - ``represented`` (I,): features with ||W_i|| > 0.5.
    """
    m = W.shape[1]
    norms = W.norm(dim=1)  # (I, n)
    unit = W / norms.clamp_min(1e-6)[:, None, :]
    dots = torch.einsum("imn,imk->ink", unit, W)  # (I, n, n): W_i_hat . W_j
    sq = dots.pow(2)
    interference = sq.sum(-1) - sq.diagonal(dim1=1, dim2=2)
    dimensionality = norms.pow(2) / sq.sum(-1).clamp_min(1e-12)
    dimensionality = torch.where(norms > 1e-3, dimensionality, torch.zeros_like(dimensionality))
    return {"norm": norms, "interference": interference, "dimensionality": dimensionality,
            "dims_per_feature": m / W.pow(2).sum((1, 2)),
            "represented": (norms > REPRESENTED_NORM).sum(-1).float()}


# --- 2. dictionary recovery with ground truth ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecoveryConfig(StageConfig):
    """SAEs (and references) trained on synthetic activations whose true dictionary is known."""

    STAGE: ClassVar[str] = "toy"

    d: int = 64
    """Activation width."""
    n_true: int = 512
    """True features K (K > d: the data is in superposition)."""
    mean_active: float = 6.0
    """Expected number of true features active per sample (the data's L0)."""
    zipf_exponent: float = 1.0
    """Firing probability of the i-th most common feature ~ (i+1)^-exponent: a few common, most rare."""
    max_probability: float = 0.5
    """Cap on any one feature's firing probability."""
    coef_sigma: float = 0.5
    """Active coefficients are log-normal: exp(N(0, sigma^2)), so non-negative with a spread of sizes."""
    correlation: float = 0.0
    """Features come in pairs (2j, 2j+1); when 2j fires, 2j+1 also fires with this probability."""
    noise_std: float = 0.01
    """Isotropic Gaussian noise added to every coordinate."""
    n_train: int = 262_144
    n_eval: int = 16_384
    widths: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16)
    """SAE widths as multiples of d."""
    l1_coeffs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    """L1 penalties of the ReLU SAEs (loss = MSE per element + l1_coeff * sum |f|, as the anchor)."""
    ks: tuple[int, ...] = (4, 8, 16)
    """k of the TopK SAEs."""
    n_steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    resample_every: int = 500
    dead_window: int = 65_536
    recovered_cos: float = 0.9
    """A true feature counts as recovered when some decoder row has cosine >= this with it."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "d", "n_true", "mean_active", "n_train", "n_eval", "n_steps", "batch_size", "lr",
                  "dead_window")
        if not self.widths or min(self.widths) * self.d < 1:
            raise ConfigError(f"RecoveryConfig: widths must give at least one latent, got {self.widths}")
        if not 0 <= self.correlation <= 1:
            raise ConfigError(f"RecoveryConfig: correlation must be in [0, 1], got {self.correlation}")
        if self.mean_active > self.n_true * self.max_probability:
            raise ConfigError(f"RecoveryConfig: mean_active {self.mean_active} cannot be reached with "
                              f"{self.n_true} features capped at probability {self.max_probability}")

    def width_list(self) -> list[int]:
        return [max(1, round(w * self.d)) for w in self.widths]


@dataclasses.dataclass(frozen=True)
class ToyConfig(StageConfig):
    """Chapter 2's two synthetic experiments."""

    STAGE: ClassVar[str] = "toy"

    superposition: SuperpositionConfig = SuperpositionConfig()
    recovery: RecoveryConfig = RecoveryConfig()


def firing_probabilities(cfg: RecoveryConfig) -> Tensor:
    """(K,) power-law firing probabilities scaled so that they sum to ``mean_active`` (capped)."""
    raw = torch.arange(1, cfg.n_true + 1, dtype=torch.float64).pow(-cfg.zipf_exponent)
    p = raw / raw.sum() * cfg.mean_active
    for _ in range(50):  # re-spread the mass the cap removes
        capped = p.clamp(max=cfg.max_probability)
        if capped.sum() >= cfg.mean_active - 1e-9:
            break
        free = capped < cfg.max_probability
        p = capped.clone()
        p[free] *= (cfg.mean_active - capped[~free].sum()) / capped[free].sum()
    return p.clamp(max=cfg.max_probability).float()


class SyntheticData:
    """The ground truth: K unit directions in d dims, their firing probabilities, and samples."""

    def __init__(self, cfg: RecoveryConfig):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.features = F.normalize(torch.randn(cfg.n_true, cfg.d, generator=gen), dim=1)  # (K, d)
        self.probability = firing_probabilities(cfg)  # (K,)
        self._gen = gen

    def sample(self, n: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """n samples: x (n, d) and the true coefficients a (n, K), stored sparse (torch.sparse_coo)."""
        cfg, gen = self.cfg, self._gen
        xs, coefs = [], []
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            on = torch.rand(b, cfg.n_true, generator=gen) < self.probability
            if cfg.correlation > 0:
                follow = torch.rand(b, cfg.n_true // 2, generator=gen) < cfg.correlation
                on[:, 1::2] |= on[:, 0::2] & follow
            size = torch.exp(cfg.coef_sigma * torch.randn(b, cfg.n_true, generator=gen))
            a = on * size  # (b, K)
            x = a @ self.features + cfg.noise_std * torch.randn(b, cfg.d, generator=gen)
            xs.append(x)
            coefs.append(a.to_sparse())
        return torch.cat(xs), torch.cat(coefs)


@torch.no_grad()
def _dictionary_scores(directions: Tensor, truth: Tensor, threshold: float, signed: bool = True) -> dict:
    """Match true features (K, d) to learned directions (W, d): per-feature best cosine and index,
    recovered fraction, and duplicated learned directions (cosine >= threshold with another one)."""
    unit = F.normalize(directions.float(), dim=1)
    cos = truth @ unit.T  # (K, W)
    if not signed:
        cos = cos.abs()
    best, index = cos.max(1)
    self_cos = unit @ unit.T
    if not signed:
        self_cos = self_cos.abs()
    self_cos.fill_diagonal_(-1)
    duplicated = (self_cos.max(1).values >= threshold).float().mean() if unit.shape[0] > 1 else torch.tensor(0.)
    matched = float((cos.max(0).values >= threshold).float().mean())  # latents that are some true feature
    return {"best_cos": best, "best_index": index, "recovered": float((best >= threshold).float().mean()),
            "mean_max_cos": float(best.mean()), "duplicate_fraction": float(duplicated), "matched_latents": matched}


@torch.no_grad()
def _shrinkage(recon: Tensor, x: Tensor, coefs: Tensor, features: Tensor) -> float:
    """How much of the input's length along its active true features the reconstruction keeps: the
    least-squares slope of (x_hat . f_i) against (x . f_i) over every (sample, active feature i) pair.
    1 = unbiased; below 1 = shrunk towards zero (what an L1 penalty does). x, recon: (N, d); coefs (N, K)."""
    active = coefs.to_dense() > 0  # (N, K)
    along_x = (x @ features.T)[active]  # x . f_i on the active pairs
    along_recon = (recon @ features.T)[active]
    return float((along_x * along_recon).sum() / along_x.pow(2).sum().clamp_min(1e-12))


def _score_sae(sae: sae_lib.SAE, data: SyntheticData, x: Tensor, coefs: Tensor, threshold: float) -> dict:
    ev = sae_lib.evaluate(sae, x)
    scores = _dictionary_scores(sae.W_dec.detach(), data.features, threshold)
    recon = sae(x).recon.detach()
    return {
        "recovered": scores["recovered"], "mean_max_cos": scores["mean_max_cos"],
        "duplicate_fraction": scores["duplicate_fraction"], "matched_latents": scores["matched_latents"],
        "fvu": ev["fvu"], "l0": ev["l0"], "dead_fraction": ev["dead_fraction"],
        "coef_ratio": _shrinkage(recon, x, coefs, data.features),
        "norm_ratio": float(recon.norm(dim=1).mean() / x.norm(dim=1).mean()),
        "best_cos": scores["best_cos"],
    }


@torch.no_grad()
def _score_pca(x_train: Tensor, width: int, data: SyntheticData, x: Tensor, coefs: Tensor,
               threshold: float) -> dict:
    mean = x_train.mean(0)
    cov = torch.cov((x_train - mean).T.double())
    _, vecs = torch.linalg.eigh(cov)  # ascending
    comps = vecs[:, -min(width, x.shape[1]):].T.float()  # (w, d)
    xc = x - mean
    recon = (xc @ comps.T) @ comps
    fvu = float((recon - xc).pow(2).sum() / xc.pow(2).sum())
    scores = _dictionary_scores(comps, data.features, threshold, signed=False)
    return {"recovered": scores["recovered"], "mean_max_cos": scores["mean_max_cos"],
            "duplicate_fraction": scores["duplicate_fraction"], "matched_latents": scores["matched_latents"],
            "fvu": fvu, "l0": float(comps.shape[0]),
            "dead_fraction": 0.0, "coef_ratio": _shrinkage(recon + mean, x, coefs, data.features),
            "norm_ratio": float((recon + mean).norm(dim=1).mean() / x.norm(dim=1).mean()),
            "best_cos": scores["best_cos"]}


def recovery_runs(cfg: RecoveryConfig) -> list[dict]:
    """Every (method, parameter, width) of the sweep, with its SAEConfig (None for PCA)."""
    def sae_cfg(width: int, **kw) -> sae_lib.SAEConfig:
        base = dict(d_in=cfg.d, n_features=width, lr=cfg.lr, batch_size=cfg.batch_size, n_steps=cfg.n_steps,
                    resample_every=cfg.resample_every, dead_window=cfg.dead_window,
                    aux_k=max(1, min(width // 2, 256)), seed=cfg.seed, log_every=max(1, cfg.n_steps // 20),
                    b_dec_init="geometric_median")
        return sae_lib.SAEConfig(**{**base, **kw})

    runs = []
    for width in cfg.width_list():
        for lam in cfg.l1_coeffs:
            runs.append({"method": "l1", "param": lam, "width": width, "sae": sae_cfg(width, l1_coeff=lam)})
        for k in cfg.ks:
            if k <= width:
                runs.append({"method": "topk", "param": float(k), "width": width,
                             "sae": sae_cfg(width, architecture="topk", k=k, resample_every=0)})
        runs.append({"method": "ae", "param": 0.0, "width": width, "sae": sae_cfg(width, l1_coeff=0.0)})
        runs.append({"method": "pca", "param": 0.0, "width": width, "sae": None})
    return runs


def run_recovery(cfg: RecoveryConfig, progress: bool = True) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The recovery sweep. Returns (result rows, training-curve rows, per-feature arrays)."""
    from tqdm.auto import tqdm

    data = SyntheticData(cfg)
    x_train, _ = data.sample(cfg.n_train)
    x_eval, a_eval = data.sample(cfg.n_eval)
    rows, curves, best_cos = [], [], {}
    runs = recovery_runs(cfg)
    for i, run in enumerate(tqdm(runs, desc="recovery sweep", disable=not progress)):
        if run["sae"] is None:
            scores = _score_pca(x_train, run["width"], data, x_eval, a_eval, cfg.recovered_cos)
            seconds = 0.0
        else:
            sae, history = sae_lib.train(run["sae"], x_train, device="cpu", progress=False)
            scores = _score_sae(sae, data, x_eval, a_eval, cfg.recovered_cos)
            seconds = history[-1]["seconds"]
            for h in history:
                curves.append({"run": i, "method": run["method"], "param": run["param"], "width": run["width"],
                               **{k: h[k] for k in ("step", "loss", "mse", "l1", "l0", "fvu", "dead_fraction")}})
        best_cos[f"run{i}"] = scores.pop("best_cos").numpy().astype(np.float16)
        rows.append({"run": i, "method": run["method"], "param": run["param"], "width": run["width"],
                     "width_over_d": run["width"] / cfg.d, **scores, "seconds": seconds})
    extra = {"probability": data.probability.numpy(), **best_cos}
    return rows, curves, extra


# --- the command -----------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=("all", "superposition", "recovery"), default="all",
                   help="which experiment to run (default: both)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _superposition_artifact(profile: str, cfg: SuperpositionConfig, progress: bool) -> dict:
    import pandas as pd

    from . import store

    with store.write("toy", profile, "superposition", config=cfg) as w:
        models, density, curve = train_toy_models(cfg, progress=progress)
        W = models.W.detach()
        m = superposition_metrics(W)
        seeds = torch.arange(cfg.n_seeds).repeat(len(cfg.densities))
        final_loss = curve[-1]["loss"] if curve else [float("nan")] * len(density)
        inst = pd.DataFrame({"instance": range(len(density)), "density": density.numpy(),
                             "sparsity": 1 - density.numpy(), "seed": seeds.numpy(),
                             "represented": m["represented"].numpy(),
                             "dims_per_feature": m["dims_per_feature"].numpy(), "loss": final_loss})
        n = cfg.n_features
        feats = pd.DataFrame({
            "instance": np.repeat(np.arange(len(density)), n), "density": np.repeat(density.numpy(), n),
            "seed": np.repeat(seeds.numpy(), n), "feature": np.tile(np.arange(n), len(density)),
            "importance": np.tile(cfg.importance_decay ** np.arange(n), len(density)),
            "norm": m["norm"].reshape(-1).numpy(), "interference": m["interference"].reshape(-1).numpy(),
            "dimensionality": m["dimensionality"].reshape(-1).numpy(),
            "bias": models.b.detach().reshape(-1).numpy()})
        inst.to_parquet(w.dir / "instances.parquet", index=False)
        feats.to_parquet(w.dir / "features.parquet", index=False)
        np.savez_compressed(w.dir / "weights.npz", W=W.numpy().astype(np.float32), b=models.b.detach().numpy(),
                            density=density.numpy())
        by_density = inst.groupby("density")["represented"].mean()
        w.metrics.update({
            "n_features": cfg.n_features, "n_hidden": cfg.n_hidden,
            "features_represented_dense": float(by_density[by_density.index.max()]),
            "features_represented_high_sparsity": float(by_density[by_density.index.min()]),
            "dims_per_feature_dense": float(inst[inst.density == inst.density.max()].dims_per_feature.mean()),
            "dims_per_feature_high_sparsity": float(inst[inst.density == inst.density.min()]
                                                    .dims_per_feature.mean()),
            "final_loss_mean": float(np.mean(final_loss)),
        })
        metrics = dict(w.metrics)
    return metrics


def _recovery_artifact(profile: str, cfg: RecoveryConfig, progress: bool) -> dict:
    import pandas as pd

    from . import store

    with store.write("toy", profile, "recovery", config=cfg) as w:
        rows, curves, extra = run_recovery(cfg, progress=progress)
        res = pd.DataFrame(rows)
        res.to_parquet(w.dir / "results.parquet", index=False)
        pd.DataFrame(curves).to_parquet(w.dir / "curves.parquet", index=False)
        np.savez_compressed(w.dir / "features.npz", **extra)
        K = cfg.n_true
        at_k = res[res.width == K]

        def best(method: str, frame=at_k) -> float:
            sub = frame[frame.method == method]
            return float(sub.recovered.max()) if len(sub) else float("nan")

        sparse = res[res.method.isin(["l1", "topk"])]
        below = sparse[sparse.width <= cfg.d]
        w.metrics.update({
            "d": cfg.d, "n_true": K,
            "recovery_at_width_K": max(best("l1"), best("topk")),
            "recovery_at_width_K_l1": best("l1"), "recovery_at_width_K_topk": best("topk"),
            "recovery_at_width_K_ae": best("ae"), "recovery_pca_best": float(res[res.method == "pca"].recovered.max()),
            "recovery_at_width_d_best": float(below.recovered.max()) if len(below) else float("nan"),
            "recovery_best": float(sparse.recovered.max()),
            "coef_ratio_l1_at_width_K": float(at_k[at_k.method == "l1"].coef_ratio.median()),
            "coef_ratio_topk_at_width_K": float(at_k[at_k.method == "topk"].coef_ratio.median()),
        })
        w.metrics = {k: (v if not (isinstance(v, float) and math.isnan(v)) else None) for k, v in w.metrics.items()}
        metrics = dict(w.metrics)
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg: ToyConfig = args.profile_config.toy
    progress = not args.no_progress
    if args.part in ("all", "superposition"):
        m = _superposition_artifact(args.profile, cfg.superposition, progress)
        print(f"toy/{args.profile}-superposition: features represented {m['features_represented_dense']:.1f} "
              f"(dense) -> {m['features_represented_high_sparsity']:.1f} (sparsest) of {m['n_features']}, "
              f"with {m['n_hidden']} dimensions")
    if args.part in ("all", "recovery"):
        m = _recovery_artifact(args.profile, cfg.recovery, progress)
        print(f"toy/{args.profile}-recovery: at width K={m['n_true']} the best SAE recovers "
              f"{m['recovery_at_width_K']:.0%} of the true features (L1 {m['recovery_at_width_K_l1']:.0%}, "
              f"TopK {m['recovery_at_width_K_topk']:.0%}, plain AE {m['recovery_at_width_K_ae']:.0%}); "
              f"PCA at best {m['recovery_pca_best']:.0%}")
    return 0
