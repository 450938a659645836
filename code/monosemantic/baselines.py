"""Baselines that need no training: what a statistic of learned dictionaries would be by chance.

Feature splitting (Bricken et al. 2023) is read off the cosine between each feature of a larger dictionary
and its nearest feature (its *parent*) in a smaller one (``analysis.split_table``). Cosines between random
directions are not zero: in 512 dimensions the largest of thousands of them is well above 0.1. The null
here is random unit vectors, uniform on the sphere, for both dictionaries. It is a floor, not a full null:
a trained dictionary lives where the activations are (here non-negative, after a ReLU, and anisotropic),
so two unrelated trained dictionaries can share more than random ones do.

For one child ``u`` and ``n`` independent random parents, the cosines ``<u, p_i>`` are independent and
each is distributed as ``2 B - 1`` with ``B ~ Beta((d-1)/2, (d-1)/2)`` (the first coordinate of a uniform
point on the sphere S^{d-1}), so the largest has CDF ``F(t)^n``: :func:`max_cosine_quantile` gives its
quantiles exactly; :func:`random_parent_cosines` simulates the same statistic the chapters compute.

Dead features are counted differently by different codes: ours calls a feature dead when it never fires on
the held-out density sample (a million activations), the anchor's notebook when it fires on none of 11
fresh batches of 896 inputs. :func:`dead_by_check` turns measured densities into what such a small check
would count, so the two can be compared on the same dictionary.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def nearest_parent_cosine(children: Tensor, parents: Tensor, chunk: int = 4096) -> Tensor:
    """(m, d), (n, d) -> (m,): for each row of ``children``, the largest cosine to any row of ``parents``
    (signed, as ``analysis.split_table`` computes it for decoder directions)."""
    p = F.normalize(parents.float(), dim=1)  # (n, d)
    out = []
    for c in children.float().split(chunk):
        out.append((F.normalize(c, dim=1) @ p.t()).max(dim=1).values)  # (chunk,)
    return torch.cat(out) if out else children.new_zeros(0)


def random_unit_vectors(n: int, d: int, generator: torch.Generator) -> Tensor:
    """(n, d) rows uniform on the unit sphere (normalised Gaussians)."""
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


def random_parent_cosines(d: int, n_children: int, n_parents: int, seed: int = 0) -> np.ndarray:
    """The splitting statistic for random dictionaries: ``n_children`` and ``n_parents`` random unit vectors
    in ``d`` dimensions, each child's largest cosine to a parent. (n_children,); same seed, same values."""
    gen = torch.Generator().manual_seed(seed)
    parents = random_unit_vectors(n_parents, d, gen)
    children = random_unit_vectors(n_children, d, gen)
    return nearest_parent_cosine(children, parents).numpy()


def cosine_cdf(t: np.ndarray | float, d: int) -> np.ndarray:
    """P(<u, v> <= t) for u uniform on S^{d-1} and a fixed unit v."""
    from scipy import special

    a = (d - 1) / 2
    return special.betainc(a, a, (np.clip(np.asarray(t, dtype=float), -1, 1) + 1) / 2)


def max_cosine_quantile(q: float, d: int, n_parents: int) -> float:
    """The ``q``-quantile of the largest cosine between a random unit vector and ``n_parents`` independent
    random unit vectors in ``d`` dimensions: ``F^-1(q^(1/n))`` with ``F`` = :func:`cosine_cdf`."""
    from scipy import special

    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    a = (d - 1) / 2
    return float(2 * special.betaincinv(a, a, q ** (1 / n_parents)) - 1)


def splitting_baseline(pairs: list[tuple[int, int]], d: int, seed: int = 0, max_children: int = 4096,
                       q: float = 0.99) -> Any:
    """For each (child width, parent width): the random-dictionary value of the splitting statistic.

    Columns: ``width``, ``parent_width``, ``median_sim`` (median over ``min(width, max_children)`` simulated
    random children of their largest cosine to ``parent_width`` random parents, seeded), ``median_exact``
    (the same median from the exact distribution) and ``q_exact`` (its ``q``-quantile, e.g. the 99th
    percentile: a child above it is closer to a parent than 99% of random children would be)."""
    import pandas as pd

    rows = []
    for i, (width, parent_width) in enumerate(pairs):
        sim = random_parent_cosines(d, min(width, max_children), parent_width, seed=seed + i)
        rows.append({"width": width, "parent_width": parent_width, "median_sim": float(np.median(sim)),
                     "median_exact": max_cosine_quantile(0.5, d, parent_width),
                     "q_exact": max_cosine_quantile(q, d, parent_width)})
    return pd.DataFrame(rows)


def dead_by_check(density: np.ndarray, n_inputs: int) -> float:
    """The expected share of features that a dead-feature check over ``n_inputs`` independent inputs counts
    as dead (no firing on any of them), for features that fire with probabilities ``density`` (n_features,):
    the mean of ``(1 - p) ** n_inputs``. A never-firing feature counts 1, one firing everywhere 0; a feature
    with density 1 / n_inputs is missed about 37% of the time."""
    p = np.clip(np.asarray(density, dtype=np.float64), 0.0, 1.0)
    if n_inputs < 0:
        raise ValueError(f"n_inputs must be >= 0, got {n_inputs}")
    return float(np.mean(np.power(1.0 - p, n_inputs))) if p.size else float("nan")


def seed_matches(decoders: dict[str, Tensor], densities: dict[str, np.ndarray],
                 pairs: list[tuple[str, str]], inits: dict[str, Tensor] | None = None) -> Any:
    """Universality across training runs: for each ordered pair ``(a, b)`` of dictionaries and each feature
    of ``a``, its nearest feature of ``b`` by decoder cosine. Rows (``run``, ``other``, ``feature``,
    ``match``, ``cosine``, ``density``: the feature's density in ``a``, for leaving dead features out;
    ``neuron_cosine``: the cosine of its direction to the nearest neuron's, max_j |u_j| of the unit direction;
    ``init_cosine``: to its own direction before training, from ``inits`` (NaN without); ``same_start``: the
    two dictionaries began from the same directions (median same-index cosine of ``inits`` above 0.5), and
    then each feature's own index is left out of its matches, which would find the shared start, not a
    shared feature).

    Two seeds of one recipe that learn the same features give cosines near 1; two unrelated dictionaries give
    the random floor of :func:`max_cosine_quantile` (or more: see the module's note on shared shape)."""
    import pandas as pd

    inits = inits or {}
    frames = []
    for a, b in pairs:
        da = F.normalize(decoders[a].float(), dim=1)
        db = F.normalize(decoders[b].float(), dim=1)
        if da.shape[1] != db.shape[1]:
            raise ValueError(f"seed_matches: {a} has {da.shape[1]} input dimensions, {b} has {db.shape[1]}")
        ia, ib = (F.normalize(inits[k].float(), dim=1) if k in inits else None for k in (a, b))
        same = (ia is not None and ib is not None and ia.shape == ib.shape
                and float((ia * ib).sum(1).median()) > 0.5)
        best, match, start = [], [], 0
        for chunk in da.split(4096):
            sims = chunk @ db.t()
            if same:  # a feature's own index holds its shared start: left out
                rows = torch.arange(len(chunk))
                sims[rows, rows + start] = -float("inf")
            v, i = sims.max(dim=1)
            best.append(v)
            match.append(i)
            start += len(chunk)
        init_cos = (da * ia).sum(1).numpy() if ia is not None else np.full(len(da), np.nan)
        frames.append(pd.DataFrame({"run": a, "other": b, "feature": np.arange(len(da)),
                                    "match": torch.cat(match).numpy(), "cosine": torch.cat(best).numpy(),
                                    "density": np.asarray(densities[a], dtype=np.float64),
                                    "neuron_cosine": da.abs().max(dim=1).values.numpy(),
                                    "init_cosine": init_cos, "same_start": same}))
    return pd.concat(frames, ignore_index=True)
