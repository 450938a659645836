"""The width sweep on activations with no sparse structure: a null for "wider dictionaries reconstruct better".

FVU falls as a TopK dictionary widens at a fixed k on *any* data: more directions to choose k from fit any
point cloud better. That a real layer's FVU falls with width is therefore no evidence of features in
superposition by itself. The null here is a Gaussian with the harvested activations' mean and covariance:
the same first and second moments, so the same PCA spectrum and the same variance to explain, but no
sparse directions to find. The width sweep's recipe (TopK at the sweep's k and length, each width from its
own seed) is trained on draws from it and measured on fresh draws, so each width's FVU on the real
activations can be set beside what the same recipe gets from structureless data of the same shape.

Writes ``sae/<profile>-gaussian-null``: ``gaussian_widths.parquet`` (one row per width: ``n_features``,
``k``, ``fvu``, ``l0``, ``dead_fraction`` on the fresh draws, ``train_activations``, ``train_seconds``).

    monosemantic train-sae --profile cpu --recipe gaussian-null     # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from . import sae as sae_mod
from .config import ConfigError, StageConfig, check_positive

NAME = "gaussian-null"


@dataclasses.dataclass(frozen=True)
class GaussianNullConfig(StageConfig):
    """Which widths of the sweep get a Gaussian null, and how many rows estimate its moments and score it."""

    STAGE: ClassVar[str] = "sae"

    max_width: int = 8192  # the sweep's widths up to this (the widest cost the most and show nothing new)
    moment_rows: int = 1_000_000  # harvested rows that estimate the mean and covariance
    eval_rows: int = 200_000  # fresh Gaussian draws that measure each dictionary
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "max_width", "moment_rows", "eval_rows", integer=True)


def moments(rows: np.ndarray, n: int, chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and covariance (d, d), float64, of the first ``n`` rows of ``rows`` (N, d), in chunks."""
    n = min(n, rows.shape[0])
    d = rows.shape[1]
    total, outer = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = torch.as_tensor(np.asarray(rows[start:min(start + chunk, n)], dtype=np.float64))
        total += x.sum(0)
        outer += x.t() @ x
    mean = total / n
    cov = outer / n - torch.outer(mean, mean)
    return mean, (cov + cov.t()) / 2


class GaussianSampler:
    """Draws from N(mean, cov) as float32 rows: ``mean + z L^T`` with ``L`` a Cholesky factor of ``cov`` (a
    tiny ridge makes a rank-deficient covariance factorable)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        ridge = 1e-9 * float(torch.diagonal(cov).mean())
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        self.mean = mean.float()
        self.factor = torch.linalg.cholesky(cov + ridge * eye).float()

    def blocks(self, n: int, generator: torch.Generator, block: int = 16_384) -> Iterator[torch.Tensor]:
        """``n`` draws, ``block`` rows at a time (the stream is that of one ``draw(n)``)."""
        for start in range(0, n, block):
            z = torch.randn(min(block, n - start), self.factor.shape[0], generator=generator)
            yield torch.addmm(self.mean, z, self.factor.t())

    def draw(self, n: int, generator: torch.Generator, block: int = 16_384) -> torch.Tensor:
        """``n`` draws as one (n, d) tensor, made block by block so that no second copy of it is ever held."""
        out = torch.empty(n, self.factor.shape[0])
        for start, rows in zip(range(0, n, block), self.blocks(n, generator, block), strict=True):
            out[start:start + rows.shape[0]] = rows
        return out


def fvu_l0_dead(sae: sae_mod.SAE, rows: torch.Tensor | Iterable[torch.Tensor],
                block: int = 16_384) -> dict[str, float]:
    """FVU (squared error over the rows' total variance about their mean), mean L0 and the share of features
    that never fire, on ``rows``: one (N, d_in) tensor, or its blocks one after another (nothing is held but
    the block in hand)."""
    err, l0, n, fired = 0.0, 0.0, 0, torch.zeros(sae.cfg.n_features, dtype=torch.bool)
    total = square = 0.0
    with torch.no_grad():
        for x in (rows.split(block) if isinstance(rows, torch.Tensor) else rows):
            out = sae(x)
            err += float(((out.recon - x) ** 2).sum())
            active = out.latents > 0
            l0 += float(active.sum())
            fired |= active.any(0)
            n += x.shape[0]
            x = x.double()
            total, square = total + x.sum(0), square + (x * x).sum(0)
    var = float((square - total * total / n).sum())  # float64 sums: no cancellation at these sizes
    return {"fvu": err / var, "l0": l0 / n, "dead_fraction": 1.0 - float(fired.float().mean())}


def run(profile: str, runs: list, act_art: Any, train_rows: np.ndarray, cfg: GaussianNullConfig = GaussianNullConfig(),
        progress: bool = True, log=print) -> Path:
    """Train the width sweep's ``runs`` (``sae_train.Run``s of family "width"; those up to ``cfg.max_width``) on
    Gaussian draws with the moments of ``train_rows``, the harvest ``act_art``'s; write the artifact (see the
    module's docstring)."""
    import pandas as pd

    from . import store

    mean, cov = moments(train_rows, cfg.moment_rows)
    sampler = GaussianSampler(mean, cov)
    gen = torch.Generator().manual_seed(cfg.seed)
    runs = [r for r in runs if r.family == "width" and r.cfg.n_features <= cfg.max_width]
    if not runs:
        raise ConfigError(f"no width of the sweep is <= max_width = {cfg.max_width}")
    n_train = max(r.cfg.n_activations for r in runs)
    train = sampler.draw(n_train, gen)
    test_state = gen.get_state()  # the same fresh draws for every width, drawn again block by block

    def test() -> Iterator[torch.Tensor]:
        return sampler.blocks(cfg.eval_rows, torch.Generator().set_state(test_state))

    rows = []
    for r in runs:
        log(f"{NAME}: {r.name} on {r.cfg.n_activations / 1e6:.1f}M Gaussian draws")
        start = time.perf_counter()
        trained = sae_mod.train(r.cfg, train, progress=progress, desc=f"SAE {r.name} (Gaussian)", log=log)
        seconds = time.perf_counter() - start
        m = fvu_l0_dead(trained.sae.cpu(), test())
        rows.append({"n_features": r.cfg.n_features, "k": r.cfg.k, **m,
                     "train_activations": r.cfg.n_activations, "train_seconds": round(seconds, 1)})
        log(f"    FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}")
    table = pd.DataFrame(rows)
    with store.write("sae", profile, NAME, config=cfg, inputs=[act_art]) as w:
        table.to_parquet(w.dir / "gaussian_widths.parquet", index=False)
        w.metrics.update({"widths": [int(v) for v in table.n_features],
                          "moment_rows": int(min(cfg.moment_rows, train_rows.shape[0])),
                          "total_variance": float(torch.diagonal(cov).sum())})
    return store.artifact_path("sae", profile, NAME)
