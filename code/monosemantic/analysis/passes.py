"""The streaming passes over the text: statistics and top activations, interval samples, and the held-out
scores, each reading a unit set's non-zeros block by block (the package's docstring says what each computes)."""


from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import explain
from ..config import ConfigError, StageConfig, check_positive
from ..explain import ContextPools, SparseActivations, argsort
from ..harvest import HOOK
from .families import FAMILY_NAMES
from .units import UnitSet

# --- the streaming pass -----------------------------------------------------------------------------

class Stopwatch:
    """Wall seconds per part of a run, summed over its ``with clock(part):`` blocks; ``clock.part(prefix)``
    times into the same table under ``prefix: part``. What the analysis manifest reports as ``seconds``."""

    def __init__(self, seconds: dict[str, float] | None = None, prefix: str = "") -> None:
        self.seconds = {} if seconds is None else seconds
        self.prefix = prefix

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = self.prefix + part
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def part(self, prefix: str) -> Stopwatch:
        return Stopwatch(self.seconds, f"{self.prefix}{prefix}: ")


LM_FORWARD = "lm forward"  # the Stopwatch part of the model's forward passes (shared by every unit set)


_M64 = (1 << 64) - 1
INTERVAL_SAMPLING = ("keyed: the largest of uniform keys that are a splitmix64 hash of (seed, set, token, unit), "
                     "the same on every machine")  # the manifest's info.interval_sampling (absent: a random stream)


def sample_keys(seed: int, set_name: str, index: Tensor, units: Tensor, n_units: int) -> Tensor:
    """Uniform keys in [0, 1) (float32), one per (global token index, unit) of the set ``set_name``: a fixed
    function of the four (splitmix64 of one 64-bit number made of them), so that a token's key is the same
    whichever other tokens fire. The interval samples are the largest keys; drawn from a random stream, one
    number per non-zero, a single activation on the other side of 0 (float32 rounding on another machine)
    shifted every later draw, and re-running the analysis elsewhere changed 91% of the samples."""
    import zlib

    base = (seed * 0x9E3779B97F4A7C15 + zlib.crc32(set_name.encode()) * 0xD1B54A32D192ED03) & _M64
    z = index.numpy().astype(np.uint64) * np.uint64(n_units) + units.numpy().astype(np.uint64) + np.uint64(base)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24))


_HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)[1:]])  # bins of log10 width 0.1, clipped ends


class _PairSums:
    """Sums and counts of values per (unit, token) pair, accumulated sparsely and compacted as it grows."""

    def __init__(self, n_tokens: int = 1 << 20):  # above every vocabulary we read (Llama-3's: 128,256)
        self.v = n_tokens
        self.keys: list[np.ndarray] = []
        self.sums: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self._pending = 0

    def add(self, units: np.ndarray, tokens: np.ndarray, values: np.ndarray) -> None:
        self.keys.append(units.astype(np.int64) * self.v + tokens.astype(np.int64))
        self.sums.append(values.astype(np.float64))
        self.counts.append(np.ones(len(values), dtype=np.int64))
        self._pending += len(values)
        if self._pending > 20_000_000:
            self._compact()

    def _compact(self) -> None:
        if not self.keys:
            return
        keys, inv = np.unique(np.concatenate(self.keys), return_inverse=True)
        sums = np.bincount(inv, weights=np.concatenate(self.sums), minlength=len(keys))
        counts = np.bincount(inv, weights=np.concatenate(self.counts), minlength=len(keys)).astype(np.int64)
        self.keys, self.sums, self.counts, self._pending = [keys], [sums], [counts], 0

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(units, tokens, sums, counts), one entry per pair seen."""
        self._compact()
        if not self.keys:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e.astype(np.float64), e
        keys = self.keys[0]
        return keys // self.v, keys % self.v, self.sums[0], self.counts[0]

    def where(self, other: _PairSums, flip: np.ndarray) -> _PairSums:
        """The pairs of the units not in ``flip`` (n,) bool from ``self``, of those in it from ``other``."""
        out = _PairSums(self.v)
        for mine, pairs in ((False, self), (True, other)):
            units, tokens, sums, counts = pairs.result()
            keep = flip[units] == mine
            out.keys.append(units[keep] * self.v + tokens[keep])
            out.sums.append(sums[keep])
            out.counts.append(counts[keep])
        out._compact()
        return out


def _top_tokens_frame(set_name: str, st: _Stats, top: int) -> Any:
    """The ``top`` tokens of each unit by activation mass: rows (set, unit, token, mass, count, rank, share),
    share = the token's part of the unit's total activation."""
    import pandas as pd

    units, toks, sums, counts = st.pairs.result()
    frame = pd.DataFrame({"unit": units, "token": toks, "mass": sums, "count": counts})
    frame = frame.sort_values(["unit", "mass"], ascending=[True, False]).groupby("unit").head(top).copy()
    frame["rank"] = frame.groupby("unit").cumcount()
    frame["share"] = frame["mass"] / st.total.numpy()[frame["unit"].to_numpy()]
    frame.insert(0, "set", set_name)
    return frame


def _pool_merge(keys: Tensor, index: Tensor, new_keys: Tensor, new_index: Tensor, slots: Tensor,
                extras: Sequence[tuple[Tensor, Tensor | Callable[[Tensor], Tensor]]] = ()) -> None:
    """In place: per slot (column), keep the ``P`` largest keys of the pool (P, n) and of the new entries
    (``new_keys`` (M,) in column ``slots`` (M,)), with their ``index``, in rank order (largest first; among
    equal keys the pool's entries, then the new ones in the order given). ``extras``: more per-entry values
    kept alike, (pool (P, n, ...), the new entries' (M, ...) or a function of the positions (K,) among the
    new entries of those that enter -> their (K, ...)).

    Only entries above a column's current minimum are passed in, which after the first batches is a small
    fraction of the tokens: a sparse merge instead of a dense top-k over every token of every column. Only
    the new entries are sorted: a pool column is in rank order already, so each entry's new rank is its rank
    on its own side plus a count, by binary search, of the entries from the other side ahead of it."""
    P = keys.shape[0]
    if new_keys.numel() == 0:
        return
    new_c = _sort_key(slots, new_keys)
    order = argsort(new_c)  # (M,) by slot, then largest key first
    new_c = new_c[order]
    cols, count = torch.unique_consecutive(slots[order], return_counts=True)  # (m,) the columns offered to
    first = torch.cumsum(count, 0) - count  # (m,) each column's first new entry
    col = torch.repeat_interleave(torch.arange(len(cols)), count)  # (M,) the column (of cols) of each new entry
    old_k = keys[:, cols].t().contiguous()  # (m, P), rank order
    old_c = _sort_key(cols[:, None], old_k)  # (m, P): ascending, as new_c is
    # a new entry's rank: the new entries ahead of it, plus the pool's entries at least as large (they win ties)
    new_rank = (torch.arange(len(order)) - first[col]
                + torch.searchsorted(old_c.reshape(-1), new_c, right=True) - col * P)
    # a pool entry's rank: its place, plus the new entries strictly larger
    old_rank = torch.arange(P) + torch.searchsorted(new_c, old_c) - first[:, None]  # (m, P)
    # only the pool's entries that move and the new ones that enter are written
    oc, op = torch.nonzero((old_rank < P) & (old_rank != torch.arange(P)), as_tuple=True)
    kept = torch.nonzero(new_rank < P).squeeze(1)
    to_rank = torch.cat([old_rank[oc, op], new_rank[kept]])
    to_col = cols[torch.cat([oc, col[kept]])]
    for pool, new in [(keys, new_keys), (index, new_index), *extras]:
        entering = new(order[kept]) if callable(new) else new[order[kept]]
        pool[to_rank, to_col] = torch.cat([pool[op, cols[oc]], entering.to(pool.dtype)])  # read, then written


def _sort_key(slots: Tensor, keys: Tensor) -> Tensor:
    """int64 that sorts ascending as (slot ascending, float32 key descending)."""
    bits = keys.float().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # in the keys' order, in [-2^31, 2^31)
    return slots * (1 << 32) + (0x7FFFFFFF - bits)


@dataclasses.dataclass
class _Stats:
    """What one pass over the explanation windows accumulates for one unit set."""

    n: int
    pool: int
    fired: Tensor = None  # (n,) int64
    max: Tensor = None  # (n,) largest activation
    total: Tensor = None  # (n,) float64
    best_v: Tensor = None  # (pool, n) top activations
    best_i: Tensor = None  # (pool, n) their global token index
    hist: Tensor = None  # (n, bins) counts of non-zero activations by log bin
    family_mass: Tensor = None  # (n, F) float64
    pairs: _PairSums = None
    polarity: Tensor = None  # (n,) +-1: the half these statistics are of (module docstring)
    other: Tensor = None  # (n,) float64: activation mass of the other half, left out

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.n, dtype=torch.int64)
        self.max = torch.zeros(self.n)
        self.total = torch.zeros(self.n, dtype=torch.float64)
        self.best_v = torch.full((self.pool, self.n), -1.0)
        self.best_i = torch.zeros((self.pool, self.n), dtype=torch.int64)
        self.hist = torch.zeros((self.n, len(_HIST_EDGES) - 1), dtype=torch.int64)
        self.family_mass = torch.zeros((self.n, len(FAMILY_NAMES)), dtype=torch.float64)
        self.pairs = _PairSums()
        self.polarity = torch.ones(self.n)
        self.other = torch.zeros(self.n, dtype=torch.float64)

    def add(self, a: SparseActivations, lab: np.ndarray, ids: np.ndarray, offset: int, pool: bool,
            edges: Tensor) -> None:
        """Accumulate the positive activations ``a`` (the non-zeros of (N, n), all > 0) of tokens ``ids`` (N,)
        with family labels ``lab`` (N, F); ``offset``: the global index of the first; ``pool``: keep the
        top-activation pool too."""
        rows, units, vals = a.rows, a.units, a.values
        self.fired += torch.bincount(units, minlength=self.n)
        self.total.index_add_(0, units, vals.double())
        self.family_mass += _family_mass(a, lab)
        self.max.scatter_reduce_(0, units, vals.to(self.max.dtype), "amax")
        if pool:  # the top-activation pool is only needed for dashboards
            beat = vals > self.best_v[-1][units]  # beats the pool's smallest
            _pool_merge(self.best_v, self.best_i, vals[beat], rows[beat] + offset, units[beat])
        bins = torch.bucketize(vals, edges)
        self.hist.view(-1).index_add_(0, units * self.hist.shape[1] + bins, torch.ones_like(bins))
        self.pairs.add(units.numpy(), ids[rows.numpy()], vals.numpy())

    def choose(self, neg: _Stats) -> None:
        """In place: these statistics (of the positive halves, max(a, 0)) become those of each unit's
        stronger half, taking ``neg``'s (of max(-a, 0)) where the negative half carries more mass."""
        flip = neg.total > self.total  # (n,) polarity -1
        self.other = torch.where(flip, self.total, neg.total)
        self.polarity = torch.where(flip, -1.0, 1.0)
        for name in ("fired", "max", "total", "hist", "family_mass"):
            getattr(self, name)[flip] = getattr(neg, name)[flip]
        self.best_v[:, flip] = neg.best_v[:, flip]
        self.best_i[:, flip] = neg.best_i[:, flip]
        self.pairs = self.pairs.where(neg.pairs, flip.numpy())


def mlp_batches(model, windows: np.ndarray, batch: int, clock: Stopwatch | None = None
                ) -> Iterator[tuple[int, Tensor]]:
    """(first window, (B*T, d_mlp) MLP activations) for consecutive batches of windows (W, T); the forward
    passes timed as ``clock``'s :data:`LM_FORWARD`."""
    clock = clock or Stopwatch()
    for b in range(0, len(windows), batch):
        x = torch.as_tensor(windows[b:b + batch].astype(np.int64))
        with clock(LM_FORWARD):
            h = model.run_with_cache(x, [HOOK])[HOOK].reshape(-1, model.config.d_mlp)
        yield b, h


def _family_mass(a: SparseActivations, lab: np.ndarray) -> Tensor:
    """(n, F) float64 a.t() @ lab: each unit's activation mass on each family, from the non-zeros ``a`` of
    (N, n) and the labels ``lab`` (N, F) (a sparse product: no dense (N, n) matrix)."""
    import scipy.sparse as sp

    N, n = int(np.prod(a.shape[:-1])), a.shape[-1]
    indptr = torch.searchsorted(a.rows, torch.arange(N + 1)).numpy()  # rows are ascending
    m = sp.csr_matrix((a.values.double().numpy(), a.units.numpy(), indptr), shape=(N, n))
    return torch.from_numpy(np.asarray(m.T @ lab))


def _measured_nonzeros(a: SparseActivations, T: int, skip: int) -> SparseActivations:
    """The entries of non-zeros ``a`` of B windows of T tokens (rows: window * T + position) that are
    measured: not at the first ``skip`` positions of a window (module docstring)."""
    return a if skip == 0 else a.keep(a.rows % T >= skip)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig(StageConfig):
    """Which text, how many examples per unit, and the score thresholds."""

    STAGE: ClassVar[str] = "analysis"
    VERSION: ClassVar[int] = 2  # 2: first positions not measured; scored needs min_heldout_firings

    explain_tokens: int = 2_000_000
    """Train-split tokens (in context-length windows spread evenly over the split) for dashboards,
    explanations and best families. The scores are measured on the whole val split."""
    top_contexts: int = 12
    """Top activating contexts kept per unit (one per document)."""
    intervals: int = 4
    """Activation intervals (equal widths of (0, max]) below the top to sample contexts from ..."""
    interval_samples: int = 3
    """... and how many from each."""
    before: int = 16
    after: int = 4
    top_tokens: int = 10
    logit_tokens: int = 10
    neighbours: int = 5
    """Nearest units by decoder cosine, per unit (SAE features only)."""
    batch_windows: int = 64
    min_firings: int = 10
    """A unit is scored when it fires on at least this many explanation tokens ..."""
    min_heldout_firings: int = 50
    """... and on at least this many held-out tokens; one that does not is counted as too rare to score."""
    skip_first_positions: int = 1
    """Positions at the start of every window that are not measured (the first one's activations are
    outliers); what the top activations would have been there is reported apart."""
    explainer: str = "token-table"
    """Who explains and simulates: ``token-table`` (offline), ``openai:<model>@<base_url>`` or
    ``hf:<model>`` (:mod:`monosemantic.explain`)."""
    explanation_tokens: int = 20
    """Tokens a token-table explanation lists (the largest mean activations of its dashboard)."""
    predict_fraction: float = 0.5
    """An explanation predicts a firing where its simulation reaches this share of its largest value (a
    token table's; 10 on a chat model's 0-10 scale): the threshold of detection."""
    score_context: int = 32
    """Tokens of a held-out scoring context (a chunk of a window; delphi uses 32, Bills et al. 64)."""
    score_top: int = 10
    """Scoring mix per unit: its top held-out contexts ..."""
    score_per_interval: int = 5
    """... contexts sampled from each of ``intervals`` activation intervals ..."""
    score_random: int = 20
    """... and random contexts; detection adds ..."""
    score_negatives: int = 20
    """... random contexts where the unit does not fire."""
    corr_threshold: float = 0.5
    """Explain-then-predict: a unit counts as interpretable when its held-out correlation (all-token:
    ``explain_corr``; simulation: ``sim_corr``) reaches this ..."""
    detection_threshold: float = 0.8
    """... and as detected when its detection balanced accuracy does."""
    specificity_threshold: float = 0.5
    """Concept specificity: when at least this share of its held-out activation mass is in its family ..."""
    lift_threshold: float = 5.0
    """... and that share is at least this many times the family's share of tokens."""
    random_dictionary: bool = True
    """Measure a random dictionary beside the SAE (the chance control; ``monosemantic analyze`` only)."""
    density_bin_width: float = 0.5
    """Width of the held-out density bins, in decades (0.5: half-decade bins)."""
    n_boot: int = 1000
    """Bootstrap replicates of every interval."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "explain_tokens", "top_contexts", "intervals", "batch_windows", "min_firings",
                       "min_heldout_firings", "score_context", "score_top", "explanation_tokens", "n_boot",
                       integer=True)
        check_positive(self, "skip_first_positions", "score_per_interval", "score_random", "score_negatives",
                       integer=True, zero=True)
        if not 0 < self.corr_threshold < 1 or not 0 < self.specificity_threshold <= 1:
            raise ConfigError("AnalysisConfig: thresholds must lie in (0, 1)")
        if not 0.5 < self.detection_threshold <= 1 or not 0 < self.predict_fraction <= 1:
            raise ConfigError("AnalysisConfig: detection_threshold must lie in (0.5, 1], predict_fraction in (0, 1]")
        check_positive(self, "density_bin_width")
        try:
            explain.check_spec(self.explainer)
        except explain.ExplainerError as e:
            raise ConfigError(f"AnalysisConfig: {e}") from None


def _first_pass(model, sets: list[UnitSet], windows: np.ndarray, labels: np.ndarray, cfg: AnalysisConfig,
                progress: bool, clock: Stopwatch | None = None) -> list[_Stats]:
    """Each set's statistics on the explanation text, of each unit's stronger half (module docstring):
    both halves are accumulated for a set once it has shown a negative activation, and each unit keeps
    the half with more mass (``polarity``)."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    pool = 8 * cfg.top_contexts  # candidates, thinned to one per document
    stats = [_Stats(s.n_units, pool) for s in sets]
    negative: list[_Stats | None] = [None] * len(sets)  # the negative halves, made when first needed
    edges = torch.as_tensor(_HIST_EDGES[1:-1], dtype=torch.float32)
    clock = clock or Stopwatch()
    for b, h in tqdm(mlp_batches(model, windows, cfg.batch_windows, clock), total=-(-W // cfg.batch_windows),
                     desc="analyze: explanation text", disable=not progress):
        ids = windows[b:b + cfg.batch_windows].reshape(-1)  # (N,)
        lab = labels[b:b + cfg.batch_windows].reshape(-1, labels.shape[-1]).astype(np.float64)  # (N, F)
        for k, (s, st) in enumerate(zip(sets, stats, strict=True)):
            with clock(s.name):
                with torch.no_grad():
                    a = _measured_nonzeros(s.nonzeros(h), T, cfg.skip_first_positions)  # of (N, n)
                negative_values = a.values < 0
                if bool(negative_values.any()):  # a set that takes both signs (a non-negative one never gets here)
                    if negative[k] is None:
                        negative[k] = _Stats(s.n_units, pool)
                    neg = a.keep(negative_values)
                    negative[k].add(neg._replace(values=-neg.values), lab, ids, b * T, s.contexts, edges)
                    a = a.keep(~negative_values)
                st.add(a, lab, ids, b * T, s.contexts, edges)
    for st, neg in zip(stats, negative, strict=True):
        if neg is not None:
            st.choose(neg)
    return stats


class _Samples(NamedTuple):
    """What the second pass over the explanation text finds for one set (-1: no value)."""

    values: Tensor  # (I, S, n) interval samples: activations ...
    index: Tensor  # (I, S, n) ... and global token indices
    contexts: Tensor  # (I, S, n, before + 1 + after) the unit's activations around each sample (no dashboards: 0)
    top_contexts: list[np.ndarray]  # (before + 1 + after,) around each of the set's top examples
    first: Tensor  # (top_contexts, n) the largest activations at the first position of a window


def _interval_pass(model, sets: list[UnitSet], windows: np.ndarray, maxima: list[Tensor],
                   top: list[list[tuple[int, int]]], cfg: AnalysisConfig, progress: bool,
                   clock: Stopwatch | None = None) -> list[_Samples]:
    """Per set: uniform samples of tokens from each activation interval (j/I max, (j+1)/I max], j < I, per
    unit; the unit's measured activations around each sample and around each of the ``top`` examples (unit,
    global index), ``before`` tokens before to ``after`` after (0 where not measured; from the neighbouring
    windows at a window's ends: cut off by :func:`_context_acts`), read while the samples are drawn rather
    than in a pass of their own; and the largest activations at the first position of a window (not
    measured, reported apart)."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    I, S = cfg.intervals, cfg.interval_samples
    L = cfg.before + 1 + cfg.after
    # one pool column per (interval, unit): the S largest random keys among the tokens in that interval
    state = [(torch.full((S, I * s.n_units), -1.0), torch.zeros((S, I * s.n_units), dtype=torch.int64),
              torch.zeros((S, I * s.n_units)), torch.zeros((S, I * s.n_units, L) if s.contexts else (0,)))
             for s in sets]
    first = [torch.full((cfg.top_contexts, s.n_units), -1.0) for s in sets]
    # the top examples by batch: (unit, global index, example number) sorted by global index
    wanted = [np.array([(u, g, e) for e, (u, g) in enumerate(exs)], dtype=np.int64).reshape(-1, 3) for exs in top]
    wanted = [x[np.argsort(x[:, 1], kind="stable")] for x in wanted]
    top_contexts = [[np.zeros(L, dtype=np.float32)] * len(exs) for exs in top]
    clock = clock or Stopwatch()
    for b, h in tqdm(mlp_batches(model, windows, cfg.batch_windows, clock), total=-(-W // cfg.batch_windows),
                     desc="analyze: interval samples", disable=not progress):
        for k, (s, mx) in enumerate(zip(sets, maxima, strict=True)):
            if not s.contexts:
                continue
            with clock(s.name):
                keys, idx, val, ctx = state[k]
                with torch.no_grad():
                    full = s.orient_nonzeros(s.nonzeros(h))  # of (N, n), all > 0
                at0 = torch.full((len(h) // T, s.n_units), -1.0)  # (B, n): position 0 of each window
                zero = full.rows % T == 0
                at0[full.rows[zero] // T, full.units[zero]] = full.values[zero].to(at0.dtype)
                first[k] = torch.cat([first[k], at0]).topk(cfg.top_contexts, dim=0).values
                a = _measured_nonzeros(full, T, cfg.skip_first_positions)
                read = a.span_reader()
                rows, units, v = a.rows, a.units, a.values
                which = (torch.ceil(v / mx[units].clamp_min(1e-12) * I).long() - 1).clamp(0, I - 1)
                slot = which * s.n_units + units
                r = sample_keys(cfg.seed, s.name, rows + b * T, units, s.n_units)  # (nnz,) keyed, not drawn
                beat = torch.nonzero(r > keys[-1, slot]).squeeze(1)
                new_units, new_starts = units[beat], rows[beat] - cfg.before
                _pool_merge(keys, idx, r[beat], rows[beat] + b * T, slot[beat], extras=[
                    (val, v[beat]),
                    (ctx, lambda pos, read=read, u=new_units, s0=new_starts: read(u[pos], s0[pos], L))])  # entering
                lo, hi = np.searchsorted(wanted[k][:, 1], [b * T, b * T + len(h)])
                here = torch.as_tensor(wanted[k][lo:hi])  # (m, 3) the top examples in this batch
                for e, acts in zip(here[:, 2].tolist(), read(here[:, 0], here[:, 1] - b * T - cfg.before, L).numpy(),
                                   strict=True):
                    top_contexts[k][e] = acts
    out = []
    for (keys, idx, val, ctx), s, f, tc in zip(state, sets, first, top_contexts, strict=True):
        n = s.n_units
        v = torch.where(keys >= 0, val, -1.0).reshape(S, I, n).transpose(0, 1)  # (I, S, n)
        c = ctx.reshape(S, I, n, L).transpose(0, 1) if s.contexts else torch.zeros(I, S, n, 0)
        out.append(_Samples(v.contiguous(), idx.reshape(S, I, n).transpose(0, 1).contiguous(), c, tc, f))
    return out


def _context_acts(span: np.ndarray, t: int, T: int, cfg: AnalysisConfig) -> np.ndarray:
    """The part inside its window of the activations ``span`` (before + 1 + after,) around position ``t``."""
    lo, hi = max(0, t - cfg.before), min(T, t + cfg.after + 1)
    return span[lo - (t - cfg.before):hi - (t - cfg.before)].astype(np.float32)


def first_position_share(best_v: Tensor, best_i: Tensor, first_v: Tensor, K: int, T: int, skip: int) -> np.ndarray:
    """(n,) the share of each unit's ``K`` largest activations, over every position, that are at the first
    position of a window (NaN for a unit that never fired). ``best_v``, ``best_i`` (P >= K, n): the largest
    measured activations and their global indices; ``first_v`` (K, n): the largest at position 0 (-1: none),
    which were not measured when ``skip`` > 0 (and are in ``best_v`` already when it is 0)."""
    if skip == 0:
        top = best_v[:K]
        at0 = ((best_i[:K] % T == 0) & (top > 0)).sum(0)
        fired = (top > 0).sum(0)
    else:
        vals = torch.cat([best_v[:K], first_v[:K]])  # (2K, n), measured ones first: they win ties
        src = torch.arange(len(vals)) >= len(best_v[:K])  # (2K,) from position 0
        v, i = torch.sort(vals, dim=0, descending=True, stable=True)
        v, i = v[:K], i[:K]
        at0 = (src[i] & (v > 0)).sum(0)
        fired = (v > 0).sum(0)
    share = at0.double() / fired.clamp_min(1).double()
    return torch.where(fired > 0, share, float("nan")).numpy()


def score_context(cfg: AnalysisConfig, T: int) -> int:
    """Tokens per held-out scoring context: ``cfg.score_context``, or the whole window if that is shorter."""
    return min(cfg.score_context, T)


def _held_out_pass(model, sets: list[UnitSet], windows: np.ndarray, labels: np.ndarray, tables: list[Any],
                   maxima: list[Tensor], cfg: AnalysisConfig, progress: bool, clock: Stopwatch | None = None
                   ) -> tuple[list[dict[str, Tensor]], list[ContextPools]]:
    """Per set: held-out firing counts, activation mass by family, and the sums for each unit's Pearson
    correlation between its activation and its whole token table's prediction (``tables``), all of the
    measured oriented activations (``sets`` carry their polarity); ``raw_aa``: the sum of squares of the
    raw ones at every position. And per set, the contexts each unit's explanation is scored on."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    skip = cfg.skip_first_positions
    acc = [{name: torch.zeros(s.n_units, dtype=torch.float64) for name in ("a", "aa", "p", "pp", "ap", "fired",
                                                                            "raw_aa")}
           | {"family_mass": torch.zeros((s.n_units, len(FAMILY_NAMES)), dtype=torch.float64)} for s in sets]
    C = score_context(cfg, T)
    pools = [ContextPools(mx, C, n_top=cfg.score_top, intervals=cfg.intervals, per_interval=cfg.score_per_interval,
                          n_random=cfg.score_random, n_negative=cfg.score_negatives, seed=cfg.seed) for mx in maxima]
    family_tokens = torch.zeros(len(FAMILY_NAMES), dtype=torch.float64)
    # the predictions p as float32, as the correlation reads them; a unit's sums of p and p^2 over the text
    # are those of its table's entries weighted by how often each token is measured (counts), and a * p is
    # non-zero only where the unit fires: no dense (N, n) prediction matrix
    tables = [t.astype(np.float32) for t in tables]  # (vocab, n) CSR
    counts = np.zeros(tables[0].shape[0] if tables else 0, dtype=np.int64)  # (vocab,) measured tokens
    clock = clock or Stopwatch()
    for b, h in tqdm(mlp_batches(model, windows, cfg.batch_windows, clock), total=-(-W // cfg.batch_windows),
                     desc="analyze: held-out text", disable=not progress):
        win = windows[b:b + cfg.batch_windows]  # (B, T)
        ids = win.reshape(-1)
        counts += np.bincount(win[:, skip:].reshape(-1), minlength=len(counts))
        lab = labels[b:b + cfg.batch_windows]  # (B, T, F)
        family_tokens += torch.as_tensor(lab[:, skip:].sum((0, 1)), dtype=torch.float64)
        lab = lab.reshape(-1, lab.shape[-1]).astype(np.float64)  # (N, F)
        uniq, inv = np.unique(ids, return_inverse=True)
        inv = torch.as_tensor(inv.reshape(-1))  # (N,) each token's row of uniq
        for s, st, table, pool in zip(sets, acc, tables, pools, strict=True):
            with clock(s.name):
                with torch.no_grad():
                    raw = s.nonzeros(h)  # of (N, n), every position
                st["raw_aa"].index_add_(0, raw.units, (raw.values * raw.values).double())
                a = _measured_nonzeros(s.orient_nonzeros(raw), T, skip)  # all > 0
                st["a"].index_add_(0, a.units, a.values.double())
                st["aa"].index_add_(0, a.units, (a.values * a.values).double())
                st["fired"] += torch.bincount(a.units, minlength=s.n_units).double()
                st["family_mass"] += _family_mass(a, lab)
                p = torch.as_tensor(table[uniq].toarray())[inv[a.rows], a.units]  # (nnz,) predictions where a fires
                st["ap"].index_add_(0, a.units, (a.values * p).double())
                pool.add(a._replace(shape=(len(win), T, s.n_units)), b * (T // C))
    n = W * (T - skip)  # measured tokens
    weights = counts.astype(np.float64)
    for st, table in zip(acc, tables, strict=True):
        st["p"] = torch.as_tensor(table.T @ weights)
        st["pp"] = torch.as_tensor(table.multiply(table).T @ weights)  # p * p in float32, as p is read
        st["n"] = torch.tensor(float(n))
        st["family_tokens"] = family_tokens
    return acc, pools


def pearson(st: dict[str, Tensor]) -> Tensor:
    """Correlation from running sums (a, aa, p, pp, ap over n): NaN where the activation never varies,
    0 where the prediction never does (an explanation that predicts nothing)."""
    n = st["n"]
    cov = st["ap"] / n - st["a"] / n * st["p"] / n
    var_a = (st["aa"] / n - (st["a"] / n) ** 2).clamp_min(0)
    var_p = (st["pp"] / n - (st["p"] / n) ** 2).clamp_min(0)
    r = cov / (var_a * var_p).sqrt()
    r = torch.where(var_p <= 1e-18, torch.zeros_like(r), r)
    return torch.where(var_a <= 1e-18, torch.full_like(r, float("nan")), r)
