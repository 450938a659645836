"""SAE evaluation: known answers for perfect and empty reconstructions, the splice, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monosemantic.harvest import HOOK, sequential_windows
from monosemantic.lm import LMConfig, Transformer
from monosemantic.metrics import (
    METRIC_NAMES,
    MetricsError,
    density_histogram,
    evaluate,
    feature_fires,
    metric_intervals,
    run_evaluation,
)
from monosemantic.sae import SAE, SAEConfig, SAEOutput

SEQ, D_MLP, VOCAB = 16, 64, 97


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=VOCAB, context_length=SEQ, d_model=32, n_heads=4, d_mlp=D_MLP, compile=False,
                   dtype="float32")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # a larger MLP output than GPT-2's init, so that ablating it changes the loss
        model.blocks[0].mlp.fc_out.weight.mul_(20)
    return model


def windows(n_windows: int = 6, seed: int = 1):
    toks = np.random.default_rng(seed).integers(0, VOCAB, size=n_windows * SEQ + 1).astype(np.uint16)
    return sequential_windows(toks, SEQ, n_windows, batch=4)


class IdentitySAE(SAE):
    """Reconstructs its input exactly; its latents are the ordinary ReLU encoder's."""

    def forward(self, x, dead_mask=None):
        pre = self.pre_activations(x)
        zero = x.new_zeros(())
        return SAEOutput(x.clone(), F.relu(pre), pre, zero, zero, zero, zero)


class ZeroSAE(SAE):
    """Reconstructs everything as zeros, with no latent ever active."""

    def forward(self, x, dead_mask=None):
        pre = self.pre_activations(x)
        zero = x.new_zeros(())
        return SAEOutput(torch.zeros_like(x), torch.zeros_like(pre), pre, zero, zero, zero, zero)


def cfg(**kw) -> SAEConfig:
    return SAEConfig(**{"d_in": D_MLP, "n_features": 128, **kw})


def test_metric_names_are_exactly_the_agreed_ones():
    m = evaluate(tiny_model(), SAE(cfg()), windows())
    assert tuple(m) == METRIC_NAMES
    assert m["n_features"] == 128 and m["eval_tokens"] == 6 * SEQ
    assert all(np.isfinite(v) for v in m.values())


def test_perfect_reconstruction_recovers_all_of_the_loss():
    model = tiny_model()
    m = evaluate(model, IdentitySAE(cfg()), windows())
    assert m["ce_loss_zero"] - m["ce_loss_orig"] > 1e-3  # the baseline gap is real
    assert m["ce_loss_sae"] == m["ce_loss_orig"]
    assert m["ce_loss_recovered"] == 1.0 and m["ce_loss_recovered_mean_ablation"] == 1.0
    assert m["mse"] == 0.0 and m["fvu"] == 0.0


def test_zero_reconstruction_recovers_none_and_nothing_fires():
    m = evaluate(tiny_model(), ZeroSAE(cfg()), windows())
    assert m["ce_loss_sae"] == m["ce_loss_zero"]
    assert m["ce_loss_recovered"] == 0.0
    assert m["l0"] == 0.0 and m["dead_fraction"] == 1.0 and m["ultralow_fraction"] == 1.0
    assert m["fvu"] > 1.0  # zeros are worse than predicting the mean


def test_reconstruction_numbers_match_a_direct_computation():
    model, sae, w = tiny_model(), SAE(cfg(seed=2)), windows()
    result = run_evaluation(model, sae, w)
    acts = torch.cat([model.run_with_cache(x, [HOOK])[HOOK].reshape(-1, D_MLP) for x, _ in w])  # (N, d)
    with torch.no_grad():
        out = sae(acts)
    m = result.metrics
    torch.testing.assert_close(m["mse"], F.mse_loss(out.recon, acts).item(), rtol=1e-5, atol=0)
    fvu = ((out.recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    torch.testing.assert_close(m["fvu"], fvu.item(), rtol=1e-4, atol=0)
    torch.testing.assert_close(m["l0"], (out.latents > 0).sum(-1).float().mean().item(), rtol=1e-6, atol=0)
    density = (out.latents > 0).double().mean(0)
    torch.testing.assert_close(result.density, density)
    assert m["dead_fraction"] == pytest.approx(float((density == 0).double().mean()))
    # the mean-ablated loss uses the mean activation over the eval tokens
    mean = acts.mean(0)
    with torch.no_grad(), model.hooks({HOOK: lambda h, name: mean.expand_as(h)}):
        expected = sum(float(model(x, y).loss) * x.numel() for x, y in w) / acts.shape[0]
    assert m["ce_loss_mean"] == pytest.approx(expected, rel=1e-5)
    assert result.histogram.counts.sum() + result.histogram.n_dead == 128
    # the FVU without each window's first position: its residual and its deviation from the all-token mean left out
    later = torch.ones(len(acts), dtype=torch.bool).reshape(-1, SEQ)
    later[:, 0] = False
    later = later.reshape(-1)
    fvu_later = ((out.recon - acts)[later] ** 2).sum() / ((acts[later] - acts.mean(0)) ** 2).sum()
    ci = metric_intervals(result, np.arange(len(later) // SEQ) // 2, n_boot=50)
    torch.testing.assert_close(ci["fvu_after_first"].value, fvu_later.item(), rtol=1e-4, atol=0)


def test_density_histogram_counts_live_features_in_log10_bins_and_dead_apart():
    hist = density_histogram(torch.tensor([0.0, 0.0, 1e-3, 1e-3, 0.5, 1.0]), bins=10, low=-10)
    assert hist.n_dead == 2 and int(hist.counts.sum()) == 4
    assert int(hist.counts[7]) == 2  # log10 1e-3 = -3: bin [-3, -2), the 8th of 10 from -10
    assert int(hist.counts[9]) == 2  # 0.5 and 1.0 in the last bin, [-1, 0]


def test_width_mismatch_is_a_one_line_error():
    with pytest.raises(MetricsError, match="d_in") as err:
        evaluate(tiny_model(), SAE(cfg(d_in=32)), windows())
    assert "\n" not in str(err.value)


def test_nan_activations_are_a_one_line_error():
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].mlp.fc_in.bias[3] = float("nan")
    with pytest.raises(MetricsError, match="NaN or inf") as err:
        evaluate(model, SAE(cfg()), windows())
    assert "\n" not in str(err.value)


def test_no_windows_is_an_error():
    with pytest.raises(MetricsError, match="no eval windows"):
        evaluate(tiny_model(), SAE(cfg()), [])


def test_per_window_sums_add_up_to_the_metrics_and_intervals_hold_them():
    from monosemantic.metrics import WINDOW_SUMS, metric_intervals

    torch.manual_seed(0)
    ev = run_evaluation(tiny_model(), SAE(cfg()), windows(12), keep_fires=True)
    m, w = ev.metrics, ev.per_window
    assert set(w) == set(WINDOW_SUMS) and all(len(v) == 12 for v in w.values())
    assert w["tokens"].sum() == m["eval_tokens"]
    for key in ("orig", "sae", "zero", "mean"):
        assert w[f"loss_{key}"].sum() / m["eval_tokens"] == pytest.approx(m[f"ce_loss_{key}"], rel=1e-9)
    assert w["resid"].sum() / w["centred"].sum() == pytest.approx(m["fvu"], rel=1e-6)
    assert ev.window_fires.shape == (12, 128)
    assert (ev.window_fires.sum(0) / m["eval_tokens"]) == pytest.approx(ev.density.numpy())
    docs = np.repeat(np.arange(6), 2)  # two windows per document
    cis = metric_intervals(ev, docs, n_boot=200)
    for name in ("fvu", "l0", "mse", "ce_loss_recovered", "ce_loss_sae"):
        ci = cis[name]
        assert ci.value == pytest.approx(m[name], rel=1e-6), name
        assert ci.low <= ci.value <= ci.high and ci.n_groups == 6, name
    for name in ("dead_fraction", "ultralow_fraction"):  # the value, and no (invalid) bootstrap interval
        assert cis[name].value == m[name] and np.isnan(cis[name].low) and np.isnan(cis[name].high)


def test_a_perfect_sae_has_a_zero_width_interval_at_full_recovery():
    from monosemantic.metrics import metric_intervals

    ev = run_evaluation(tiny_model(), IdentitySAE(cfg()), windows(8))
    ci = metric_intervals(ev, np.arange(8), n_boot=100)
    assert ci["ce_loss_recovered"].value == pytest.approx(1.0)
    assert ci["ce_loss_recovered"].low == pytest.approx(1.0) and ci["ce_loss_recovered"].high == pytest.approx(1.0)
    assert ci["fvu"].high == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(ci["dead_fraction"].low)


def test_a_paired_difference_is_the_two_metrics_apart_and_tighter_than_either():
    from monosemantic.metrics import MetricsError, metric_intervals, paired_difference, run_evaluations

    torch.manual_seed(0)
    model, w = tiny_model(), windows(12)
    a, b = run_evaluations(model, [IdentitySAE(cfg()), SAE(cfg(architecture="topk", k=4))], w)
    docs = np.repeat(np.arange(6), 2)
    d = paired_difference(a, b, docs, n_boot=300)
    assert d.value == pytest.approx(b.metrics["ce_loss_recovered"] - a.metrics["ce_loss_recovered"], rel=1e-9)
    assert d.low <= d.value <= d.high and d.n_groups == 6
    # against a perfect SAE the difference varies only with b, so its interval is b's own, shifted by -1
    own = metric_intervals(b, docs, n_boot=300)["ce_loss_recovered"]
    assert d.low == pytest.approx(own.low - 1) and d.high == pytest.approx(own.high - 1)
    assert paired_difference(b, b, docs, "fvu", n_boot=50)[:3] == (0.0, 0.0, 0.0)  # one SAE against itself
    other = run_evaluations(model, [SAE(cfg())], windows(12, seed=5))[0]
    with pytest.raises(MetricsError, match="different windows"):
        paired_difference(a, other, docs)
    with pytest.raises(MetricsError, match="choose one of"):
        paired_difference(a, b, docs, "dead_fraction")


def test_several_saes_at_once_give_each_one_its_own_numbers():
    from monosemantic.metrics import run_evaluations

    torch.manual_seed(0)
    a, b = SAE(cfg()), SAE(cfg(architecture="topk", k=4))
    model, w = tiny_model(), windows(6)
    both = run_evaluations(model, [a, b], w, keep_fires=True)
    for sae, ev in zip((a, b), both, strict=True):
        alone = run_evaluation(model, sae, w, keep_fires=True)
        for name in METRIC_NAMES:
            assert ev.metrics[name] == pytest.approx(alone.metrics[name], rel=1e-9, abs=1e-12), name
        assert np.array_equal(ev.window_fires, alone.window_fires)
    assert both[0].metrics["ce_loss_orig"] == both[1].metrics["ce_loss_orig"]
    assert both[0].metrics["l0"] != both[1].metrics["l0"]


def test_an_interrupted_evaluation_resumes_from_its_checkpoint_to_the_same_numbers(tmp_path):
    from monosemantic.metrics import run_evaluations

    torch.manual_seed(0)
    saes = [SAE(cfg()), SAE(cfg(architecture="topk", k=4))]
    model, w = tiny_model(), windows(24)  # 6 batches of 4 windows
    whole = run_evaluations(model, saes, w, keep_fires=True)
    ckpt = tmp_path / "eval.ckpt"

    class Stop(Exception):
        pass

    def stop_at_second_save(line: str) -> None:
        if line.strip().startswith("4/6"):
            raise Stop  # after the checkpoint at batch 4 was written
    with pytest.raises(Stop):
        run_evaluations(model, saes, w, keep_fires=True, checkpoint=ckpt, checkpoint_key="k",
                        checkpoint_every=2, log=stop_at_second_save)
    assert ckpt.is_file()
    lines: list[str] = []
    resumed = run_evaluations(model, saes, w, keep_fires=True, checkpoint=ckpt, checkpoint_key="k",
                              checkpoint_every=2, log=lines.append)
    assert "resuming after 4 of 6 batches" in lines[0] and not ckpt.exists()
    for a, b in zip(whole, resumed, strict=True):
        for name in METRIC_NAMES:
            assert b.metrics[name] == pytest.approx(a.metrics[name], rel=1e-12, abs=1e-15), name
        assert all(np.array_equal(a.per_window[k], b.per_window[k]) for k in a.per_window)
        assert np.array_equal(a.window_fires, b.window_fires) and torch.equal(a.density, b.density)
    # a checkpoint made for something else (another key) is ignored, not mixed in
    with pytest.raises(Stop):
        run_evaluations(model, saes, w, checkpoint=ckpt, checkpoint_key="k", checkpoint_every=2,
                        log=stop_at_second_save)
    other = run_evaluations(model, saes, w, checkpoint=ckpt, checkpoint_key="other", checkpoint_every=2)
    assert other[0].metrics == whole[0].metrics


def test_the_neuron_basis_as_a_k_sparse_dictionary():
    from monosemantic.evaluation import NeuronTopK

    full, four = NeuronTopK(D_MLP, D_MLP), NeuronTopK(D_MLP, 4)
    m_full = evaluate(tiny_model(), full, windows())
    assert m_full["fvu"] == pytest.approx(0.0, abs=1e-12) and m_full["ce_loss_recovered"] == pytest.approx(1.0)
    m4 = evaluate(tiny_model(), four, windows())
    assert m4["l0"] <= 4 and 0 < m4["fvu"] < 1
    x = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.5]])
    out = NeuronTopK(5, 2)(x)
    assert out.recon.tolist() == [[0.0, 3.0, 0.0, 2.0, 0.0]] and torch.equal(out.latents, out.recon)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_feature_fires_counts_what_encode_says_in_any_blocking(arch):
    # counted block by block (the last block shorter), from a tensor or a numpy array: on how many rows each
    # latent is > 0, exactly what the dense encoder output says
    sae = SAE(SAEConfig(d_in=16, n_features=64, architecture=arch, k=5, seed=3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    rows = torch.randn(37, 16, generator=torch.Generator().manual_seed(4))
    want = (sae.encode(rows) > 0).sum(0)
    assert int(want.max()) > 0 and int(want.min()) < 37  # not a trivial answer
    for block in (None, 16, 37, 1):
        assert torch.equal(feature_fires(sae, rows, block), want), block
    assert torch.equal(feature_fires(sae, rows.numpy(), 16), want)
