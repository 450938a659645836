"""The analysis's streaming passes read every unit set's activations as their non-zeros (a TopK SAE's are k of
n per token) and never build the dense (tokens, units) matrices: on small random cases, what they accumulate
equals the direct dense computation, and held-out text given as windows is read as those windows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monosemantic import analysis as A
from monosemantic import explain as E
from monosemantic import sae as S

D, T, VOCAB = 16, 16, 50304


class WindowModel:
    """Stands in for the LM: activations that depend on the token, its predecessor and the position (the
    first one is an outlier, as a real model's is), with both signs."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(97, D, generator=g)
        self.pos = torch.randn(T, D, generator=g)
        self.pos[0] *= 5
        self.config = SimpleNamespace(context_length=T, d_mlp=D, vocab_size=VOCAB)
        self.n_vocab = VOCAB
        self.effects = torch.randn(64, VOCAB, generator=g)

    def run_with_cache(self, x, names):
        e = self.emb[x % 97]
        return {names[0]: e + 0.5 * torch.roll(e, 1, dims=1) + self.pos[: x.shape[1]]}  # (B, T, D)

    def logit_effects(self, directions):
        return directions[:, :1] * self.effects[: len(directions)]


def _sets() -> list[A.UnitSet]:
    """A TopK SAE, a ReLU SAE, a random dictionary and the (signed) neurons."""
    topk = S.SAE(S.SAEConfig(d_in=D, n_features=48, architecture="topk", k=4, seed=1))
    relu = S.SAE(S.SAEConfig(d_in=D, n_features=40, seed=2))
    with torch.no_grad():
        relu.b_enc.fill_(-1.0)  # sparse, as a trained one is
    return [A.UnitSet.neurons(D), A.UnitSet.from_sae("topk", topk), A.UnitSet.from_sae("anchor", relu),
            A.UnitSet.random_dictionary("random", D, 56, 5, seed=3)]


def _windows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, (n, T))


def _activations(model, windows: np.ndarray) -> torch.Tensor:
    return model.run_with_cache(torch.as_tensor(windows), [A.HOOK])[A.HOOK].reshape(-1, D)  # (W*T, D)


def test_sparse_encodings_are_the_dense_ones_in_row_major_order():
    model = WindowModel()
    h = _activations(model, _windows(6, 0))
    with torch.no_grad():
        for s in _sets():
            a = s.nonzeros(h)
            assert torch.equal(a.dense(), s.encode(h)), s.name
            keys = a.rows * s.n_units + a.units
            assert (keys[1:] > keys[:-1]).all() and (a.values != 0).all()
            polar = A.UnitSet(s.name, s.encode, s.directions, polarity=torch.where(
                torch.arange(s.n_units) % 3 == 0, -1.0, 1.0))
            oriented = polar.orient_nonzeros(polar.nonzeros(h))
            assert torch.equal(oriented.dense(), polar.activations(h)) and (oriented.values > 0).all()


def test_span_reader_reads_what_dense_slices_hold():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(40, 7, generator=g) * (torch.rand(40, 7, generator=g) < 0.3)
    read = E.SparseActivations.of(dense).span_reader()
    units, starts = torch.tensor([0, 3, 6, 2, 5]), torch.tensor([-4, 0, 10, 33, 39])  # ends run off both sides
    got = read(units, starts, 8)
    padded = torch.cat([torch.zeros(8, 7), dense, torch.zeros(8, 7)])
    want = torch.stack([padded[s + 8:s + 16, u] for u, s in zip(units.tolist(), starts.tolist(), strict=True)])
    assert torch.equal(got, want)


def _pool_merge_by_full_sort(keys, index, extra, new_keys, new_index, new_extra, slots):
    """The pool merge written plainly: every column's pool and new entries sorted together, stably."""
    P, n = keys.shape
    all_k = torch.cat([keys.t().reshape(-1), new_keys])
    all_i = torch.cat([index.t().reshape(-1), new_index])
    all_e = torch.cat([extra.transpose(0, 1).reshape(P * n, *extra.shape[2:]), new_extra])
    all_s = torch.cat([torch.arange(n).repeat_interleave(P), slots])
    order = torch.argsort(all_k, descending=True, stable=True)
    order = order[torch.argsort(all_s[order], stable=True)]
    s_sorted = all_s[order]
    rank = torch.arange(len(order)) - torch.searchsorted(s_sorted, torch.arange(n))[s_sorted]
    keep = rank < P
    keys[rank[keep], s_sorted[keep]] = all_k[order[keep]]
    index[rank[keep], s_sorted[keep]] = all_i[order[keep]]
    extra[rank[keep], s_sorted[keep]] = all_e[order[keep]]


def test_pool_merge_keeps_the_rank_order_of_a_full_stable_sort_ties_included():
    g = torch.Generator().manual_seed(0)
    P, n = 4, 9
    mine = (torch.full((P, n), -1.0), torch.zeros((P, n), dtype=torch.int64), torch.zeros(P, n, 3))
    plain = tuple(x.clone() for x in mine)
    for step in range(8):
        M = int(torch.randint(0, 30, (1,), generator=g))
        new_keys = torch.randint(0, 6, (M,), generator=g).float()  # few values: many ties
        slots = torch.randint(0, n - 2, (M,), generator=g)  # the last columns are never offered anything
        new_index = torch.arange(M) + 100 * step
        new_extra = torch.rand(M, 3, generator=g)
        asked = []

        def extra_of(pos, new_extra=new_extra, asked=asked):  # only the entering entries' are asked for
            asked.append(len(pos))
            return new_extra[pos]

        A.passes._pool_merge(mine[0], mine[1], new_keys, new_index, slots, extras=[(mine[2], extra_of)])
        _pool_merge_by_full_sort(*plain, new_keys, new_index, new_extra, slots)
        for x, y in zip(mine, plain, strict=True):
            assert torch.equal(x, y), step
        assert not asked or asked[0] <= min(M, P * n)


def _dense_reference(model, s: A.UnitSet, windows: np.ndarray, skip: int):
    """(raw (N, n), measured oriented activations (N, n), measured (N,)) the direct way."""
    h = _activations(model, windows)
    with torch.no_grad():
        raw = s.encode(h)
        measured = torch.as_tensor(np.tile(np.arange(T) >= skip, len(windows)))
        return raw, torch.where(measured[:, None], s.activations(h), 0.0), measured


def test_held_out_sums_and_contexts_equal_a_direct_dense_computation():
    model = WindowModel()
    cfg = A.AnalysisConfig(batch_windows=4, score_context=8, score_top=3, score_per_interval=2, score_random=3,
                           score_negatives=2, intervals=2)
    windows = _windows(10, 1)  # three batches, the last one short
    labels = np.random.default_rng(2).random((*windows.shape, len(A.FAMILY_NAMES))) < 0.2
    rng = np.random.default_rng(3)
    sets = _sets()
    sets[0] = A.UnitSet("neurons", sets[0].encode, sets[0].directions,  # a signed set, read through polarities
                        polarity=torch.where(torch.arange(D) % 2 == 0, -1.0, 1.0))
    tables, maxima = [], []
    for s in sets:
        shown = [(int(u), rng.integers(0, 300, 6), rng.random(6) * (rng.random(6) < 0.5))
                 for u in rng.integers(0, s.n_units, 20 * s.n_units)]
        tables.append(E.fit_token_tables(s.n_units, shown, VOCAB))
        maxima.append(torch.rand(s.n_units) + 0.5)
    skip = cfg.skip_first_positions
    with torch.no_grad():
        held, pools = A.passes._held_out_pass(model, sets, windows, labels, tables, maxima, cfg, progress=False)
    lab = torch.as_tensor(labels.reshape(-1, labels.shape[-1]), dtype=torch.float64)
    ids = windows.reshape(-1)
    for s, st, table, pool, mx in zip(sets, held, tables, pools, maxima, strict=True):
        raw, a, measured = _dense_reference(model, s, windows, skip)
        p = torch.where(measured[:, None], torch.as_tensor(table.toarray()[ids], dtype=torch.float32), 0.0)
        want = {"a": a.double().sum(0), "aa": (a * a).double().sum(0), "p": p.double().sum(0),
                "pp": (p * p).double().sum(0), "ap": (a * p).double().sum(0), "raw_aa": (raw * raw).double().sum(0),
                "fired": (a > 0).sum(0).double(), "family_mass": a.double().t() @ (lab * measured[:, None])}
        for name, value in want.items():
            torch.testing.assert_close(st[name], value, rtol=1e-12, atol=1e-12, msg=f"{s.name} {name}")
        assert float(st["n"]) == int(measured.sum())
        # the contexts chosen, and the activations kept, as when the pools are fed the dense activations
        dense = E.ContextPools(mx, 8, n_top=3, intervals=2, per_interval=2, n_random=3, n_negative=2, seed=cfg.seed)
        for b in range(0, len(windows), cfg.batch_windows):
            dense.add(a.reshape(len(windows), T, -1)[b:b + cfg.batch_windows], b * (T // 8))
        for name in ("top", "interval", "random", "negative"):
            mine, theirs = getattr(pool, name), getattr(dense, name)
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.index, theirs.index), (s.name, name)
            assert mine.extra is None or torch.equal(mine.extra, theirs.extra)


def test_first_pass_statistics_equal_a_direct_dense_computation():
    model = WindowModel()
    cfg = A.AnalysisConfig(batch_windows=4, top_contexts=2)
    windows = _windows(9, 4)
    labels = np.random.default_rng(5).random((*windows.shape, len(A.FAMILY_NAMES))) < 0.2
    sets = _sets()
    with torch.no_grad():
        stats = A.passes._first_pass(model, sets, windows, labels, cfg, progress=False)
    lab = torch.as_tensor(labels.reshape(-1, labels.shape[-1]), dtype=torch.float64)
    edges = torch.as_tensor(A.passes._HIST_EDGES[1:-1], dtype=torch.float32)
    ids = torch.as_tensor(windows.reshape(-1))
    for s, st in zip(sets, stats, strict=True):
        raw, _, measured = _dense_reference(model, s, windows, cfg.skip_first_positions)
        raw = torch.where(measured[:, None], raw, 0.0)
        # each unit's stronger half: the negative one where it carries more mass
        flip = (-raw).clamp_min(0).double().sum(0) > raw.clamp_min(0).double().sum(0)
        assert s.name == "neurons" or not flip.any()
        assert torch.equal(st.polarity, torch.where(flip, -1.0, 1.0))
        a = (raw * st.polarity).clamp_min(0)  # (N, n)
        torch.testing.assert_close(st.total, a.double().sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.family_mass, a.double().t() @ lab, rtol=1e-12, atol=1e-12)
        assert torch.equal(st.fired, (a > 0).sum(0)) and torch.equal(st.max, a.amax(0))
        rows, units = torch.nonzero(a, as_tuple=True)
        hist = torch.zeros_like(st.hist)
        hist.index_put_((units, torch.bucketize(a[rows, units], edges)), torch.ones_like(units), accumulate=True)
        assert torch.equal(st.hist, hist)
        top_v, top_i = torch.where(a > 0, a, -1.0).topk(st.pool, dim=0)  # no ties among these random values
        assert torch.equal(st.best_v, top_v)
        assert torch.equal(torch.where(top_v > 0, st.best_i, 0), torch.where(top_v > 0, top_i, 0))
        u, t, sums, counts = st.pairs.result()
        key = units * VOCAB + ids[rows]
        want = torch.zeros(s.n_units * VOCAB, dtype=torch.float64).index_add_(0, key, a[rows, units].double())
        np.testing.assert_allclose(sums, want[u * VOCAB + t].numpy(), rtol=1e-12)
        assert counts.sum() == len(rows)


def _interval_samples_dense(sets, h_batches, maxima, cfg):
    """The interval pass written densely over every (token, unit), as it was before it read non-zeros."""
    I, Sm = cfg.intervals, cfg.interval_samples
    out = []
    state = [(torch.full((Sm, I * s.n_units), -1.0), torch.zeros((Sm, I * s.n_units), dtype=torch.int64),
              torch.zeros((Sm, I * s.n_units))) for s in sets]
    for b, h in h_batches:
        for (keys, idx, val), s, mx in zip(state, sets, maxima, strict=True):
            a = s.activations(h)
            a = torch.where((torch.arange(len(a)) % T >= cfg.skip_first_positions)[:, None], a, 0.0)
            rows, units = torch.nonzero(a > 0, as_tuple=True)
            v = a[rows, units]
            which = (torch.ceil(v / mx[units].clamp_min(1e-12) * I).long() - 1).clamp(0, I - 1)
            slot = which * s.n_units + units
            r = A.passes.sample_keys(cfg.seed, s.name, rows + b * T, units, s.n_units)
            beat = r > keys[-1, slot]
            _pool_merge_by_full_sort(keys, idx, val, r[beat], rows[beat] + b * T, v[beat], slot[beat])
    for keys, idx, val in state:
        out.append((keys, idx, val))
    return out


def test_interval_samples_are_the_ones_a_dense_pass_draws_and_come_with_their_contexts():
    model = WindowModel()
    cfg = A.AnalysisConfig(batch_windows=4, top_contexts=2, intervals=3, interval_samples=2, before=5, after=2)
    windows = _windows(11, 6)
    sets = _sets()[1:]  # the non-negative sets
    maxima = [torch.rand(s.n_units) * 2 + 0.5 for s in sets]
    rng = np.random.default_rng(7)
    top = [[(int(u), int(g)) for u, g in zip(rng.integers(0, s.n_units, 30), rng.integers(0, windows.size, 30),
                                             strict=True)] for s in sets]
    with torch.no_grad():
        got = A.passes._interval_pass(model, sets, windows, maxima, top, cfg, progress=False)
        batches = [(b, _activations(model, windows[b:b + 4])) for b in range(0, len(windows), 4)]
        want = _interval_samples_dense(sets, batches, maxima, cfg)
    for s, sm, (keys, idx, val), exs in zip(sets, got, want, top, strict=True):
        n, I, Sm = s.n_units, cfg.intervals, cfg.interval_samples
        assert (sm.values > 0).sum() > n  # samples were drawn
        assert torch.equal(sm.values, torch.where(keys >= 0, val, -1.0).reshape(Sm, I, n).transpose(0, 1))
        assert torch.equal(sm.index, idx.reshape(Sm, I, n).transpose(0, 1))
        _, a, _ = _dense_reference(model, s, windows, cfg.skip_first_positions)  # (N, n) measured
        samples = [(int(u), int(sm.index[j, r, u]), sm.contexts[j, r, u].numpy())
                   for j, r, u in torch.nonzero(sm.values > 0).tolist()]
        for u, g, span in samples + [(u, g, span) for (u, g), span in zip(exs, sm.top_contexts, strict=True)]:
            t = g % T
            lo, hi = max(0, t - cfg.before), min(T, t + cfg.after + 1)
            assert np.array_equal(A.passes._context_acts(span, t, T, cfg), a[g - t + lo:g - t + hi, u].numpy())


def test_interval_samples_of_other_units_stay_when_one_activation_crosses_zero():
    """What a re-run on another machine can change (one float32 activation on the other side of 0) changes the
    samples of that unit alone; the keys are a fixed function of seed, set, token and unit, uniform."""
    model = WindowModel()
    cfg = A.AnalysisConfig(batch_windows=4, top_contexts=2, intervals=3, interval_samples=2, before=5, after=2)
    windows = _windows(11, 6)
    base = _sets()[2]  # the ReLU SAE: non-negative, dense non-zeros
    maxima = [torch.rand(base.n_units) * 2 + 0.5]
    top = [[(0, 0)]]

    def run(s):  # one pass per run, as two runs on two machines
        with torch.no_grad():
            return A.passes._interval_pass(model, [s], windows, maxima, top, cfg, progress=False)[0]

    a = run(base)
    assert (a.values > 0).sum() > base.n_units  # samples were drawn
    j, r, unit = [int(i) for i in torch.nonzero(a.values > 0)[0]]  # a sample, and the token it is
    g = int(a.index[j, r, unit])
    b0, row = divmod(g, cfg.batch_windows * T)  # its batch of windows and row there
    dropped = []

    def encode(h):  # the same set with that one firing gone
        out = base.encode(h).clone()
        if h.shape[0] == cfg.batch_windows * T and torch.equal(h, _activations(model, windows[b0 * 4:b0 * 4 + 4])):
            assert out[row, unit] > 0
            out[row, unit] = 0.0
            dropped.append(True)
        return out

    b = run(A.UnitSet(base.name, encode, base.directions))
    assert dropped == [True]
    moved = torch.nonzero((a.index != b.index).any(dim=(0, 1))).flatten().tolist()
    assert moved == [unit]  # that unit lost a sample; every other unit's samples, values and contexts stay
    keep = torch.arange(base.n_units) != unit
    assert torch.equal(a.values[:, :, keep], b.values[:, :, keep])
    assert torch.equal(a.contexts[:, :, keep], b.contexts[:, :, keep])
    g, u = torch.arange(200_000), torch.zeros(200_000, dtype=torch.long)
    keys = A.passes.sample_keys(0, "x", g, u, 1)
    assert torch.equal(keys, A.passes.sample_keys(0, "x", g, u, 1))
    assert 0 <= keys.min() and keys.max() < 1 and abs(float(keys.mean()) - 0.5) < 0.005
    assert torch.histc(keys, bins=10, min=0, max=1).min() > 19_000  # uniform: ~20,000 per tenth
    assert not torch.equal(keys, A.passes.sample_keys(1, "x", g, u, 1))  # the seed and the set name matter
    assert not torch.equal(keys, A.passes.sample_keys(0, "y", g, u, 1))


@pytest.fixture(scope="module")
def tok():
    from monosemantic.tokenizer import load

    return load()


def test_held_out_text_given_as_windows_is_read_as_those_windows(tok):
    model = WindowModel()
    cfg = A.AnalysisConfig(explain_tokens=12 * T, batch_windows=4, top_contexts=2, interval_samples=2,
                           min_firings=2, min_heldout_firings=5, score_context=8)
    explain = np.random.default_rng(7).integers(0, 300, 40 * T)
    explain[::37] = A.EOT_ID
    val = np.random.default_rng(8).integers(0, 300, 10 * T)
    sets = _sets()[1:]
    with torch.no_grad():
        flat = A.analyze(model, tok, sets, explain, val, cfg, progress=False, log=lambda s: None)
        windows = A.analyze(model, tok, sets, explain, val.reshape(-1, T), cfg, progress=False, log=lambda s: None)
    assert flat["units"]["scored"].any()
    for name in A.TABLES:
        assert flat[name].equals(windows[name]) or name == "contexts", name
    for col in ("tokens", "acts"):
        assert all(np.array_equal(x, y) for x, y in zip(flat["contexts"][col], windows["contexts"][col], strict=True))
    assert flat["tokens"] == windows["tokens"]
    # a held-out set of windows from many places: taken as they are
    picked = val.reshape(-1, T)[[7, 2, 5]]
    assert np.array_equal(A.held_out_windows(picked, T), picked)
    from monosemantic.config import UserError

    with pytest.raises(UserError, match="windows of 16 tokens"):
        A.held_out_windows(val.reshape(-1, 8), T)


def test_the_stopwatch_sums_each_part_and_keeps_a_prefixed_table_in_the_same_place(monkeypatch):
    from monosemantic.analysis import passes

    ticks = iter([0.0, 1.5, 10.0, 10.25, 20.0, 24.0])  # start, stop of three blocks
    monkeypatch.setattr(passes.time, "perf_counter", lambda: next(ticks))
    clock = passes.Stopwatch()
    with clock("a"):
        pass
    with clock.part("random model")("a"):
        pass
    with pytest.raises(RuntimeError), clock("a"):  # an error still stops the clock
        raise RuntimeError
    assert clock.seconds == {"a": 5.5, "random model: a": 0.25}
    assert A.stage_seconds(clock.seconds, whole=7.0) == {"a": 5.5, "random model: a": 0.2, "other": 1.2,
                                                          "whole": 7.0}
    assert A.stage_seconds(clock.seconds, whole=5.0)["other"] == -0.8  # overlapping parts show, not hidden
