"""One pass of the causal test over held-out windows (:mod:`monosemantic.causal`): what follows each tested
feature's firings, and each control feature's and neuron's, on the explore half of the documents; where each
tested feature fires on the other half; the mean hidden activation where it fires; and the tokens its firings
predict."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .hardware import trimmed


class Scan(NamedTuple):
    """What a pass over held-out windows found for each tested feature (and the next tokens of ``extra`` ones)."""

    next_counts: np.ndarray  # (F + E + N, V) next tokens after each feature's and neuron's firings, explore half
    all_counts: np.ndarray  # (V,) next tokens after every position, explore half
    firings: list[np.ndarray]  # per tested feature, (n, 2) (window row, position) of its firings in the test half
    positions: np.ndarray  # (n, 2) every scanned test-half (row, position), the first position left out
    h_firing: np.ndarray  # (F, d_in) mean hidden activation where each tested feature fires, explore half
    h_all: np.ndarray  # (d_in,) mean hidden activation over every explore-half position


@torch.no_grad()
def scan(model, sae, hook: str, inputs: Tensor, targets: Tensor, rows: np.ndarray, explore: np.ndarray,
         features: list[int], batch: int, vocab: int, extra: list[int] | tuple[int, ...] = (),
         neurons: list[int] | tuple[int, ...] = ()) -> Scan:
    """One pass over the windows ``rows`` of ``inputs`` (targets: the next tokens), the first position of each
    left out as the analysis leaves it out: on the ``explore`` rows (bool per window of ``inputs``), the next
    tokens after each feature (``features``, then ``extra``) and each MLP neuron (``neurons``, after them: a
    neuron fires where its activation is above 0) fires and after every position, and the mean hidden activation
    where each of ``features`` fires and over all positions; on the others, where each of ``features`` fires."""
    every = [*features, *extra]
    idx = torch.as_tensor(every, dtype=torch.long)
    n_idx = torch.as_tensor(list(neurons), dtype=torch.long)
    n_f = len(features)
    counts = torch.zeros((len(every) + len(n_idx)) * vocab, dtype=torch.int64)
    all_counts = np.zeros(vocab, dtype=np.int64)
    firings: list[list[np.ndarray]] = [[] for _ in features]
    positions = []
    h_fire = torch.zeros(n_f, sae.cfg.d_in, dtype=torch.float64)
    n_fire = torch.zeros(n_f, dtype=torch.float64)
    h_sum, n_all = torch.zeros(sae.cfg.d_in, dtype=torch.float64), 0
    for i in trimmed(range(0, len(rows), batch)):
        r = rows[i:i + batch]
        h = model.run_with_cache(inputs[r], [hook])[hook][:, 1:].float()  # (B, T-1, d_in): first position left out
        B, T = h.shape[:2]
        flat = h.reshape(-1, h.shape[-1])
        fires = sae.encode(flat)[:, idx] > 0  # (B (T-1), F + E)
        nxt = targets[r][:, 1:].reshape(-1).long()  # (B (T-1),)
        ex = torch.as_tensor(np.repeat(explore[r], T))
        all_counts += np.bincount(nxt[ex].numpy(), minlength=vocab)[:vocab]
        counted = torch.cat([fires, flat[:, n_idx] > 0], dim=1)  # (B (T-1), F + E + N)
        p_, f_ = torch.nonzero(counted & ex[:, None], as_tuple=True)
        counts.index_add_(0, f_ * vocab + nxt[p_], torch.ones(len(p_), dtype=torch.int64))
        hx, fx = h.reshape(-1, h.shape[-1])[ex].double(), fires[ex][:, :n_f].double()
        h_fire += fx.t() @ hx
        n_fire += fx.sum(0)
        h_sum += hx.sum(0)
        n_all += len(hx)
        on = fires[:, :n_f].reshape(B, T, n_f).numpy()
        test = ~explore[r]
        for j in range(n_f):
            b, t = np.nonzero(on[..., j] & test[:, None])
            firings[j].append(np.stack([r[b], t + 1], axis=1))
        b, t = np.nonzero(np.broadcast_to(test[:, None], (B, T)))
        positions.append(np.stack([r[b], t + 1], axis=1))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)  # noqa: E731
    h_firing = (h_fire / n_fire.clamp_min(1)[:, None]).float().numpy()
    h_firing[n_fire.numpy() == 0] = np.nan
    return Scan(counts.view(len(every) + len(n_idx), vocab).numpy(), all_counts, [cat(f) for f in firings],
                cat(positions), h_firing, (h_sum / max(n_all, 1)).float().numpy())


def predicted(next_counts: np.ndarray, all_counts: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` token ids whose probability after the feature fires (``next_counts``) exceeds their probability
    after any position (``all_counts``) by most; only tokens that do exceed it (fewer when fewer do)."""
    if next_counts.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    excess = next_counts / next_counts.sum() - all_counts / max(all_counts.sum(), 1)
    order = np.argsort(-excess, kind="stable")[:n]
    return order[excess[order] > 0]


def sample_positions(pos: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` rows of ``pos`` (k, 2), a seeded draw, sorted (all of them when there are fewer)."""
    if len(pos) <= n:
        return pos
    keep = np.sort(np.random.default_rng(seed).choice(len(pos), n, replace=False))
    return pos[keep]
