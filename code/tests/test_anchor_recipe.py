"""The anchor's SAE recipe, literally: our trainer configured as the anchor against the re-creation of the
anchor's notebook loop (anchor_reference), step for step; the fixed recipe unchanged; the profiles' wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monosemantic import anchor_reference as R
from monosemantic import profiles, sae_train
from monosemantic import sae as S
from monosemantic.config import ConfigError

LITERAL = dict(init="anchor-linear", init_encoder_transpose=False, b_dec_init="init", decoder_norm_axis="input",
               resample_rule="anchor", resample_until=1.0)


def _literal(**kw) -> S.SAEConfig:
    base = dict(d_in=16, n_features=64, batch_size=32, n_steps=12, lr=1e-3, l1_coeff=3e-3, resample_every=3,
                dead_window=96, log_every=1, seed=0, **LITERAL)
    base.update(kw)
    return S.SAEConfig(**base)


class _Batches:
    """An indexed source over a fixed list of (B, d_in) batches, recording which indices were read."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.calls = batches, []

    def batch(self, i: int) -> torch.Tensor:
        self.calls.append(i)
        return self.batches[i]


def _activation_batches(n: int, batch: int = 32, d: int = 16, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g).relu() * 2 for _ in range(n)]  # >= 0, as MLP activations are


def _seeded_choice(seed: int) -> R.Choose:
    """np.random.choice's draw (without replacement, p = dist) made with the generator our trainer uses."""
    gen = torch.Generator().manual_seed(seed)

    def choose(dist: np.ndarray, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        return torch.multinomial(torch.from_numpy(dist).double(), n, replacement=False, generator=gen).numpy()
    return choose


def _copy_into_reference(ours: S.SAE) -> R.AnchorSparseAutoencoder:
    ref = R.AnchorSparseAutoencoder(ours.cfg.d_in, ours.cfg.n_features)
    with torch.no_grad():
        ref.encoder.weight.copy_(ours.W_enc.T)  # (n_features, d_in)
        ref.encoder.bias.copy_(ours.b_enc)
        ref.decoder.weight.copy_(ours.W_dec.T)  # (d_in, n_features)
        ref.decoder.bias.copy_(ours.b_dec)
    return ref


def test_anchor_linear_init_is_nn_linears_under_the_same_seed():
    cfg = _literal(seed=3)
    ours = S.SAE(cfg)
    torch.manual_seed(3)
    ref = R.AnchorSparseAutoencoder(16, 64)
    assert torch.equal(ours.W_enc, ref.encoder.weight.T) and torch.equal(ours.b_enc, ref.encoder.bias)
    assert torch.equal(ours.W_dec, ref.decoder.weight.T) and torch.equal(ours.b_dec, ref.decoder.bias)
    # the anchor's decoder starts un-normalised: uniform in +-1/sqrt(n_features)
    assert ours.W_dec.abs().max() <= 1 / 64 ** 0.5 and ours.b_enc.abs().max() <= 1 / 16 ** 0.5


def test_the_input_axis_is_the_anchors_decoder_normalisation():
    ours = S.SAE(_literal())
    expected = F.normalize(ours.W_dec.detach().T, p=2, dim=1).T  # the anchor's (d_in, n_features) weight, dim 1
    ours.normalize_decoder()
    torch.testing.assert_close(ours.W_dec.detach(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.W_dec.detach().norm(dim=0), torch.ones(16))  # each input coordinate
    assert not torch.allclose(ours.W_dec.detach().norm(dim=1), torch.ones(64))  # not each feature


@pytest.mark.parametrize("n_steps", [12, 10])  # 10: the last update is a resampling one (cell 11 still does it)
def test_our_trainer_as_the_anchor_matches_the_reference_step_for_step(n_steps):
    cfg = _literal(n_steps=n_steps)
    batches = _activation_batches(40)
    ours = S.SAE(cfg)
    with torch.no_grad():
        ours.b_enc[:16] = -50.0  # a quarter of the dictionary dead from the start: the first resampling has work
    ref = _copy_into_reference(ours)

    source = _Batches(batches)
    sae, history = S.train(cfg, source, progress=False, sae=ours, device="cpu")
    run = R.anchor_train_sae(ref, torch.optim.Adam(ref.parameters(), lr=cfg.lr), iter(batches),
                             train_steps=n_steps, lambda_reg=cfg.l1_coeff, neuron_resampling_samples=cfg.dead_window,
                             resample_frequency=cfg.resample_every, batch_size=cfg.batch_size,
                             choose=_seeded_choice(cfg.seed + 1))

    # the same schedule and the same batches: cell 11's steps 3, 6, 9 are our updates 4, 7, 10; each window is
    # the next 96 // 32 = 3 batches of the stream, never trained on
    assert [step for step, _ in run.resampled] == [3, 6, 9]
    assert run.resampled[0][1] >= 16
    assert [(r["step"], r["resampled"]) for r in history if r["resampled"]] == \
        [(step + 1, n) for step, n in run.resampled if n]
    assert source.calls == list(range(n_steps + 3 * 3))
    assert sum(r["resampled"] for r in history) == sum(n for _, n in run.resampled)
    # the same losses, step by step (float32, different kernels and summation orders)
    assert len(history) == n_steps
    torch.testing.assert_close(torch.tensor([r["loss"] for r in history]), torch.tensor(run.losses),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["mse"] for r in history]), torch.tensor(run.recon_losses),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["l1"] * cfg.l1_coeff for r in history]), torch.tensor(run.reg_losses),
                               rtol=1e-5, atol=1e-6)
    # and the same weights at the end
    for ours_w, ref_w in ((sae.W_enc, ref.encoder.weight.T), (sae.b_enc, ref.encoder.bias),
                          (sae.W_dec, ref.decoder.weight.T), (sae.b_dec, ref.decoder.bias)):
        torch.testing.assert_close(ours_w.detach(), ref_w.detach(), rtol=1e-5, atol=1e-6)


def test_one_anchor_resampling_matches_the_notebooks_block():
    # one resampling on a trained state, Adam's state included: new rows, their scale, the zeroed moments
    cfg = _literal()
    ours = S.SAE(cfg)
    with torch.no_grad():
        ours.b_enc[::3] = -50.0
    ref = _copy_into_reference(ours)
    opt_ours, opt_ref = S.make_optimizer(ours), torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    batches = _activation_batches(6)
    for x in batches[:3]:
        S.train_step(ours, opt_ours, x)
        R.anchor_sae_step(ref, opt_ref, x, lambda_reg=cfg.l1_coeff)
    window = torch.cat(batches[3:])  # (96, 16)
    dead = S.never_fired(ours, window)
    assert int(dead.sum()) >= 64 // 3
    n = S.resample_dead(ours, opt_ours, window, dead, generator=torch.Generator().manual_seed(7))
    assert n == R.anchor_resample(ref, opt_ref, iter(batches[3:]), 96, 32, choose=_seeded_choice(7))
    torch.testing.assert_close(ours.W_enc.detach(), ref.encoder.weight.detach().T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.b_enc.detach(), ref.encoder.bias.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.W_dec.detach(), ref.decoder.weight.detach().T, rtol=1e-5, atol=1e-7)
    assert (ours.b_enc[dead] == 0).all()
    for ours_p, ref_p, index in ((ours.W_enc, ref.encoder.weight, lambda t: t.T), (ours.b_enc, ref.encoder.bias,
                                 lambda t: t), (ours.W_dec, ref.decoder.weight, lambda t: t.T)):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_ours.state[ours_p][key], index(opt_ref.state[ref_p][key]),
                                       rtol=1e-5, atol=1e-9)
        # neither resets Adam's step count
        assert int(opt_ours.state[ours_p]["step"]) == int(opt_ref.state[ref_p]["step"]) == 3


def test_the_anchor_rule_resamples_after_its_steps_for_the_whole_run():
    literal = profiles.get("gpu").sae.anchor
    steps = [s for s in range(1, literal.n_steps + 1) if S.fit._resample_due(literal, s)]
    assert steps[:2] == [1001, 2001] and steps[-1] == 99_001 and len(steps) == 99
    assert literal.dead_window // literal.batch_size * literal.batch_size == 9_856  # 11 batches of 896
    fixed = profiles.get("gpu").sae.anchor_fixed
    steps = [s for s in range(1, fixed.n_steps + 1) if S.fit._resample_due(fixed, s)]
    assert steps[0] == 1000 and steps[-1] == 50_000  # Anthropic's rule over the first half, as before


def test_an_anchor_rule_run_resumes_exactly(tmp_path):
    cfg = _literal(n_steps=14, log_every=2)
    batches = _activation_batches(40)

    def start() -> S.SAE:
        sae = S.SAE(cfg)
        with torch.no_grad():
            sae.b_enc[:16] = -50.0
        return sae

    straight, h_straight = S.train(cfg, _Batches(batches), progress=False, sae=start(), device="cpu")

    class Crashing(_Batches):
        crashed = False

        def batch(self, i):
            # batches 0-3 train updates 1-4, 4-6 are the first window, 7-9 train updates 5-7, 10-12 are the
            # second window: 13 is update 8's, the first after a window
            if i == 13 and not self.crashed:
                self.crashed = True
                raise KeyboardInterrupt
            return super().batch(i)

    ckpt = tmp_path / "sae.ckpt"
    with pytest.raises(KeyboardInterrupt):
        S.train(cfg, Crashing(batches), progress=False, sae=start(), device="cpu", checkpoint=ckpt,
                checkpoint_every=100)
    source = _Batches(batches)
    resumed, h_resumed = S.train(cfg, source, progress=False, device="cpu", checkpoint=ckpt)
    assert source.calls[0] == 13  # the windows' batches are not read again, nor trained on
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(straight, name), getattr(resumed, name)), name
    drop = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert drop(h_straight) == drop(h_resumed) and sum(r["resampled"] for r in h_straight) >= 16


def test_the_fixed_recipe_trains_as_it_did_before_the_anchor_options():
    """Known answers, recorded with the code before ``init``, ``decoder_norm_axis`` and ``resample_rule``
    existed (which gave bit-identical weights and curves to today's on these and three other runs)."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    x = ((torch.rand(20000, 32, generator=g) < 0.02).float() * (0.5 + torch.rand(20000, 32, generator=g))) @ f
    cfg = S.SAEConfig(d_in=16, n_features=64, lr=3e-3, batch_size=256, n_steps=40, resample_every=10,
                      dead_window=1280, log_every=10, l1_coeff=0.3)
    assert (cfg.init, cfg.decoder_norm_axis, cfg.resample_rule) == ("gao", "feature", "anthropic")
    assert cfg.resample_until == 0.5
    sae = S.SAE(cfg)
    with torch.no_grad():
        sae.b_enc[:32] = -50.0
    sae, history = S.train(cfg, x, progress=False, sae=sae, device="cpu")
    assert [r["resampled"] for r in history] == [32, 0, 0, 0]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in history]),
                               torch.tensor([0.515268, 0.435839, 0.269347, 0.169408]), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor([r["l0"] for r in history]),
                               torch.tensor([8.2957, 13.45, 6.6129, 3.5594]), rtol=1e-3, atol=0)
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), torch.ones(64))


def test_every_profile_has_both_anchor_recipes():
    assert sae_train.RECIPES == ("anchor", "anchor-fixed", "topk")
    for name in ("tiny", "cpu", "gpu"):
        stage = profiles.get(name).sae
        literal, fixed = stage.recipe("anchor"), stage.recipe("anchor-fixed")
        assert {k: getattr(literal, k) for k in LITERAL} == LITERAL, name
        assert (fixed.init, fixed.decoder_norm_axis, fixed.resample_rule) == ("gao", "feature", "anthropic"), name
        for field in ("architecture", "l1_coeff", "lr", "batch_size", "resample_every", "n_features"):
            assert getattr(literal, field) == getattr(fixed, field), (name, field)
        assert [r.name for r in sae_train.plan(stage)][:3] == list(sae_train.RECIPES)
        assert all(r.cfg.resample_rule == "anthropic" for r in sae_train.plan(stage) if r.family == "l1")
    gpu = profiles.get("gpu").sae.anchor
    assert (gpu.n_steps, gpu.batch_size, gpu.lr, gpu.l1_coeff, gpu.dead_window) == (100_000, 896, 1e-4, 3e-3, 10_240)


@pytest.mark.parametrize("bad,match", [
    (dict(init="xavier"), "init must be"),
    (dict(init_encoder_transpose=True), "init_encoder_transpose"),
    (dict(decoder_norm_axis="row"), "decoder_norm_axis"),
    (dict(resample_rule="openai"), "resample_rule"),
    (dict(dead_window=16), "dead_window = 16 is under batch_size = 32"),
])
def test_bad_anchor_options_are_one_clear_line(bad, match):
    with pytest.raises(ConfigError, match=match) as err:
        _literal(**bad)
    assert "\n" not in str(err.value)
