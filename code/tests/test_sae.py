"""The SAE module: invariants of the maths, resampling and AuxK, known-answer recovery, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monosemantic import sae as S
from monosemantic.config import ConfigError, UserError


def _synthetic(d: int = 16, n_true: int = 32, n: int = 20_000, p: float = 0.02, seed: int = 0):
    """x = sum_i a_i f_i with n_true unit directions in d dims, each firing with probability p."""
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(n_true, d, generator=g), dim=1)
    a = (torch.rand(n, n_true, generator=g) < p).float() * (0.5 + torch.rand(n, n_true, generator=g))
    return a @ f, f


def _cfg(**kw) -> S.SAEConfig:
    base = dict(d_in=16, n_features=64, lr=3e-3, batch_size=256, n_steps=50, resample_every=0,
                dead_window=5000, log_every=10, aux_k=16, k=4)
    base.update(kw)
    return S.SAEConfig(**base)


def test_decoder_rows_stay_unit_norm():
    x, _ = _synthetic()
    sae, history = S.train(_cfg(n_steps=30), x, progress=False)
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert len(history) == 3 and {"loss", "mse", "l1", "l0", "dead_fraction"} <= set(history[0])


def test_topk_keeps_exactly_k():
    sae = S.SAE(_cfg(architecture="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive, so ReLU removes none of the k
    out = sae(torch.randn(40, 16))
    assert ((out.latents != 0).sum(-1) == 5).all()


@pytest.mark.parametrize("k,n_features", [(4, 64), (3, 17)])
def test_sparse_decode_equals_dense(k, n_features):
    x = torch.randn(33, 16)
    sparse = S.SAE(_cfg(architecture="topk", k=k, n_features=n_features, decode="sparse"))
    dense = S.SAE(_cfg(architecture="topk", k=k, n_features=n_features, decode="dense"))
    dense.load_state_dict(sparse.state_dict())
    a, b = sparse(x), dense(x)
    torch.testing.assert_close(a.recon, b.recon, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(sparse.W_dec.grad, dense.W_dec.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.W_enc.grad, dense.W_enc.grad, atol=1e-5, rtol=1e-5)


def test_auxk_gives_gradient_to_dead_latents_only_through_aux():
    sae = S.SAE(_cfg(architecture="topk", k=2, n_features=32, aux_k=8))
    x = torch.randn(64, 16)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[20:] = True
    with torch.no_grad():
        sae.b_enc[:20] = 10.0  # live latents always win the top k: the others never fire, only AuxK reaches them
    out = sae(x, dead)
    assert out.aux > 0 and (out.latents[:, 20:] == 0).all()
    out.loss.backward()
    assert sae.W_dec.grad[20:].abs().sum(-1).gt(0).any()
    assert sae.W_enc.grad[:, 20:].abs().sum(0).gt(0).any()
    # without the dead mask the same latents get no gradient at all
    sae.zero_grad()
    sae(x).loss.backward()
    assert sae.W_dec.grad[20:].abs().sum() == 0


def test_resampling_revives_dead_and_leaves_live_untouched():
    torch.manual_seed(0)
    cfg = _cfg(n_features=32)
    sae = S.SAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(512, 16)
    sae(x).loss.backward()
    opt.step()  # Adam state exists for every row
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():
        sae.b_enc[dead] = -100.0  # these features never fire
    assert (sae.encode(x)[:, dead] == 0).all()
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    state_before = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}

    n = S.resample_dead(sae, opt, x, dead, generator=torch.Generator().manual_seed(0))
    assert n == int(dead.sum())
    live = ~dead
    # live features: weights and Adam moments bit-identical
    assert torch.equal(sae.W_dec[live], before["W_dec"][live])
    assert torch.equal(sae.W_enc[:, live], before["W_enc"][:, live])
    assert torch.equal(sae.b_enc[live], before["b_enc"][live])
    for name, idx in (("W_dec", (live,)), ("W_enc", (slice(None), live)), ("b_enc", (live,))):
        p = dict(sae.named_parameters())[name]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key][idx], state_before[name][key][idx])
    # dead features: unit decoder rows along sampled inputs, encoder 0.2 x mean live norm, bias 0, Adam reset
    rows = sae.W_dec[dead]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(int(dead.sum())))
    best = (F.normalize(x, dim=1) @ rows.T).max(0).values
    torch.testing.assert_close(best, torch.ones_like(best))
    target = 0.2 * before["W_enc"][:, live].norm(dim=0).mean()
    torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0), target.expand(int(dead.sum())))
    assert (sae.b_enc[dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (opt.state[sae.W_enc]["exp_avg_sq"][:, dead] == 0).all()
    # and they fire again
    assert (sae.encode(x)[:, dead] > 0).any(0).all()


def test_resampling_during_training_revives_dead_features():
    x, _ = _synthetic()
    cfg = _cfg(n_features=64, n_steps=40, resample_every=20, dead_window=256 * 5, l1_coeff=0.3)
    sae = S.SAE(cfg)
    with torch.no_grad():
        sae.b_enc[:32] = -50.0  # half the dictionary starts dead
    _, history = S.train(cfg, x, progress=False, sae=sae)
    assert sum(h["resampled"] for h in history) >= 32


def test_wide_sae_recovers_known_features():
    # K = 2d true directions, very sparse: an 8x-wide L1 SAE finds (nearly) all of them
    x, f = _synthetic(d=16, n_true=32, n=40_000, p=0.02)
    cfg = _cfg(n_features=128, n_steps=800, batch_size=512, l1_coeff=3e-3, lr=3e-3, log_every=100)
    sae, _ = S.train(cfg, x, progress=False)
    cos = f @ sae.W_dec.detach().T  # (K, n_features)
    assert (cos.max(1).values >= 0.9).float().mean() >= 0.9


def test_training_is_reproducible():
    x, _ = _synthetic()
    for arch in ("relu", "topk"):
        cfg = _cfg(architecture=arch, n_steps=20)
        a, ha = S.train(cfg, x, progress=False)
        b, hb = S.train(cfg, x, progress=False)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (arch, name)
        assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_iterator_source_and_bf16_autocast():
    x, _ = _synthetic()
    chunks = iter(x.split(300))  # ragged chunks get re-cut into full batches
    sae, history = S.train(_cfg(n_steps=10, dtype="bfloat16"), chunks, progress=False)
    assert history[-1]["step"] == 10 and torch.isfinite(torch.tensor(history[-1]["loss"]))


def test_save_load_round_trip(tmp_path):
    sae = S.SAE(_cfg(architecture="topk", k=3))
    folder = S.save(sae, tmp_path / "sae", dtype=torch.float32, metadata={"hook_name": "blocks.0.mlp.hook_post"})
    again = S.load(folder)
    assert again.cfg == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(again, name), getattr(sae, name))
    import json

    meta = json.loads((folder / "cfg.json").read_text())
    assert meta["d_sae"] == 64 and meta["architecture"] == "topk" and meta["k"] == 3


@pytest.mark.parametrize("bad,match", [
    (dict(architecture="gated"), "architecture"),
    (dict(n_features=0), "n_features"),
    (dict(architecture="topk", k=100, n_features=64), "k = 100"),
    (dict(l1_coeff=-1.0), "l1_coeff"),
    (dict(b_dec_init="median"), "b_dec_init"),
])
def test_bad_config_is_one_clear_line(bad, match):
    with pytest.raises(ConfigError, match=match) as err:
        _cfg(**bad)
    assert "\n" not in str(err.value)


def test_wrong_input_width_is_a_config_error():
    with pytest.raises(ConfigError, match="d_in"):
        S.train(_cfg(), torch.randn(1000, 8), progress=False)


def test_finite_stream_stops_training_early():
    x, _ = _synthetic(n=256 * 5 + 100)
    sae, history = S.train(_cfg(n_steps=50, log_every=2), iter(x.split(256)), progress=False)
    assert history[-1]["step"] == 5 and history[-1]["n_activations"] == 5 * 256


@pytest.mark.parametrize("arch,aux", [("relu", False), ("relu", True), ("topk", False), ("topk", "block"),
                                      ("topk", "all dead"), ("topk", "gathered")])
@pytest.mark.parametrize("dense_gather", [False, True])
def test_training_forward_matches_forward(arch, aux, dense_gather, monkeypatch):
    # the trainer's fast path (sparse TopK encoder and decoder backward, matrix-vector b_dec gradient; dense
    # matmuls when the gathered entries are many; AuxK on the dead latents' block: their top aux_k of 22, or
    # all of them; or AuxK's picks gathered one by one) computes the same loss and the same gradients as the
    # plain forward that evaluation uses
    from monosemantic.sae import steps  # where the step reads them (the package only re-exports them)

    monkeypatch.setattr(steps, "DENSE_GATHER_FRACTION", 0.0 if dense_gather else 2.0)
    monkeypatch.setattr(steps, "AUX_DENSE_FRACTION", 2.0 if aux == "gathered" else 1 / 8)
    cfg = _cfg(architecture=arch, k=4, n_features=64, aux_k=32 if aux == "all dead" else 16)
    plain = S.SAE(cfg)
    with torch.no_grad():
        plain.b_dec.normal_()
        plain.b_enc.normal_()
        plain.b_enc[:20] -= 5.0  # some latents rarely fire
    fast = S.SAE(cfg)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(50, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    mask = dead if aux else None
    a, b = plain(x, mask), fast.training_forward(x, mask)
    for name in ("loss", "mse", "l1", "aux"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name).detach(), atol=1e-6, rtol=1e-5)
    if arch == "topk" and aux:
        assert a.aux > 0
    torch.testing.assert_close(b.recon, a.recon.detach())
    assert torch.equal(b.fired, (a.latents > 0).any(0))
    torch.testing.assert_close(b.l0, (a.latents > 0).sum(-1).float().mean())
    a.loss.backward()
    b.loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, atol=1e-6, rtol=1e-5)


def test_column_sums_of_bf16_count_exactly_past_bf16s_integers():
    # bfloat16 holds integers exactly only up to 256: the training step's per-latent fire counts over a
    # 600-row batch are summed in blocks of 256 rows, each exact, then added in float32
    from monosemantic.sae.steps import _column_sums

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 40, generator=g)
    x[:, 0] = 1.0  # a column that fires on every row: 600 is not a bfloat16
    signs = x.relu().to(torch.bfloat16).sign()
    assert torch.equal(_column_sums(signs), (x > 0).sum(0).float())
    values = x.relu().to(torch.bfloat16)
    torch.testing.assert_close(_column_sums(values), values.float().sum(0), rtol=4e-3, atol=0)
    assert torch.equal(_column_sums(x), x.sum(0))  # float32 as it is


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_gradient_products_add_up_repeated_and_unsorted_entries(transposed):
    # the TopK backward's onehot^T @ src as a CSR product, each row's entries in any order and an index
    # repeated (a latent among the k and AuxK's picks): the dense scatter-and-multiply answer
    from monosemantic.sae.steps import _rows_of

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (30, 5), generator=g)
    idx[:, 1] = idx[:, 0]
    w, src = torch.randn(30, 5, generator=g), torch.randn(30, 7, generator=g)
    want = torch.zeros(30, 50).scatter_add_(1, idx, w).t() @ src  # (50, 7)
    got = _rows_of(idx, w, src, 50, torch.float32, transposed=transposed)
    torch.testing.assert_close(got, want.t() if transposed else want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,dead", [("relu", 0.0), ("topk", 0.0), ("topk", 0.3)])
def test_bf16_training_step_tracks_the_float32_reference(arch, dead):
    # the fast bf16 step (hand-written backward, block sums, sparse TopK and AuxK products) against the
    # plain float32 forward and autograd, at the weights the reference reaches after each of a few Adam
    # steps: same loss, and gradients of the same size pointing the same way (bf16 rounding may swap a
    # near-tie among a TopK row's k, so they are not compared entry by entry; leaving out AuxK's encoder
    # gradient drops W_enc's cosine to 0.988, a 5% error in b_enc's shows in its norm)
    cfg = _cfg(architecture=arch, d_in=32, n_features=512, batch_size=300, k=8, aux_k=64)
    x, _ = _synthetic(d=32, n=300 * 5)
    mask = torch.arange(512) % 10 < dead * 10 if dead else None
    ref, fast = S.SAE(cfg), S.SAE(cfg)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    for batch in x.split(300):
        fast.load_state_dict(ref.state_dict())
        fast.zero_grad()
        out = ref(batch, mask)
        opt.zero_grad()
        out.loss.backward()
        fast_out = fast.training_forward(batch, mask, torch.bfloat16)
        fast_out.loss.backward()
        torch.testing.assert_close(fast_out.loss, out.loss.detach(), rtol=1e-2, atol=1e-6)
        assert (fast_out.aux > 0) == (mask is not None)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            got, want = getattr(fast, name).grad.flatten(), getattr(ref, name).grad.flatten()
            cos = F.cosine_similarity(got, want, dim=0)
            assert cos > (0.999 if arch == "relu" else 0.99), (name, float(cos))
            assert abs(float(got.norm() / want.norm()) - 1) < 0.02, (name, float(got.norm() / want.norm()))
        opt.step()
        ref.normalize_decoder()


class _Indexed:
    """A source whose batch is a function of the step; it 'crashes' once at ``stop_at`` by raising
    KeyboardInterrupt, or by sending this process SIGINT (which the trainer honours after that step)."""

    def __init__(self, x, batch_size, stop_at=None, how="raise"):
        self.x, self.batch_size, self.stop_at, self.how = x, batch_size, stop_at, how
        self.calls = []

    def batch(self, step):
        self.calls.append(step)
        if step == self.stop_at:
            self.stop_at = None
            if self.how == "raise":
                raise KeyboardInterrupt
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)
        g = torch.Generator().manual_seed(step)
        return self.x[torch.randint(self.x.shape[0], (self.batch_size,), generator=g)]


@pytest.mark.parametrize("arch,how", [("relu", "signal"), ("topk", "raise")])
def test_interrupted_training_resumes_exactly(tmp_path, arch, how):
    x, _ = _synthetic()
    # relu: resampling every 5 steps, so the resample pool, the dead tracker and the generator are resumed;
    # topk: a short dead window so AuxK runs
    cfg = _cfg(architecture=arch, n_steps=24, log_every=4, resample_every=5 if arch == "relu" else 0,
               dead_window=256 * 3, l1_coeff=0.3)

    def half_dead():
        sae = S.SAE(cfg)
        with torch.no_grad():
            sae.b_enc[:32] = -50.0  # half the dictionary starts dead: resampling and AuxK have work
        return sae

    straight, h_straight = S.train(cfg, _Indexed(x, cfg.batch_size), progress=False, sae=half_dead())

    ckpt = tmp_path / "sae.ckpt"
    source = _Indexed(x, cfg.batch_size, stop_at=11, how=how)
    with pytest.raises(KeyboardInterrupt):
        S.train(cfg, source, progress=False, sae=half_dead(), checkpoint=ckpt, checkpoint_every=4)
    assert ckpt.is_file()
    source.calls.clear()
    resumed, h_resumed = S.train(cfg, source, progress=False, checkpoint=ckpt, checkpoint_every=4)
    assert source.calls[0] == (11 if how == "raise" else 12)  # nothing is redone, nothing skipped
    assert not ckpt.exists()  # a finished run leaves no checkpoint behind
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight, name), getattr(resumed, name)), name
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert drop(h_straight) == drop(h_resumed)
    if arch == "relu":
        assert sum(row["resampled"] for row in h_straight) > 0
    else:
        assert any(row["aux"] > 0 for row in h_straight)


def test_a_checkpoint_of_another_config_is_set_aside_and_a_broken_one_is_one_clear_line(tmp_path):
    x, _ = _synthetic()
    cfg = _cfg(n_steps=6)
    ckpt = tmp_path / "sae.ckpt"
    with pytest.raises(KeyboardInterrupt):
        S.train(cfg, _Indexed(x, cfg.batch_size, stop_at=3), progress=False, checkpoint=ckpt)
    # another config: the run says so and starts afresh (the LM's trainer does the same), giving what a run
    # with no checkpoint gives
    notes: list[str] = []
    other = cfg.replace(lr=1e-3)
    got = S.train(other, _Indexed(x, cfg.batch_size), progress=False, checkpoint=ckpt, log=notes.append)
    fresh = S.train(other, _Indexed(x, cfg.batch_size), progress=False)
    assert any("another SAE config" in n and "starting afresh" in n for n in notes)
    assert torch.equal(got.sae.W_dec, fresh.sae.W_dec)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable SAE checkpoint.*delete it") as err:
        S.train(cfg, _Indexed(x, cfg.batch_size), progress=False, checkpoint=ckpt)
    assert "\n" not in str(err.value)
