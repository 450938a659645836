"""Known answers for the Gaussian null of the width sweep (monosemantic.gaussian_null)."""

import numpy as np
import torch

from monosemantic import gaussian_null
from monosemantic.sae import SAE, SAEConfig


def test_moments_and_draws_recover_a_known_gaussian():
    gen = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov = a @ a.t() / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mean = torch.arange(d, dtype=torch.float64)
    rows = (mean + torch.randn(200_000, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).t())
    m, c = gaussian_null.moments(rows.numpy(), 200_000, chunk=7_777)  # chunking does not change the answer
    m1, c1 = gaussian_null.moments(rows.numpy(), 200_000, chunk=1 << 20)
    assert torch.allclose(m, m1) and torch.allclose(c, c1)
    assert torch.allclose(m, mean, atol=0.02) and torch.allclose(c, cov, atol=0.03)
    draws = gaussian_null.GaussianSampler(m, c).draw(200_000, torch.Generator().manual_seed(1)).double()
    assert torch.allclose(draws.mean(0), mean, atol=0.02)
    assert torch.allclose(torch.cov(draws.t()), cov, atol=0.03)


def test_fvu_is_zero_for_an_exact_dictionary_and_one_for_the_mean():
    d = 8
    cfg = SAEConfig(architecture="topk", d_in=d, n_features=d, k=d, aux_k=1, batch_size=4)
    sae = SAE(cfg)
    rows = torch.rand(500, d, generator=torch.Generator().manual_seed(2)) + 0.1  # non-negative: ReLU keeps all
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    out = gaussian_null.fvu_l0_dead(sae, rows, block=64)
    assert out["fvu"] < 1e-10 and out["l0"] == d and out["dead_fraction"] == 0
    with torch.no_grad():  # no feature fires (pre-activations all negative): the reconstruction is b_dec = the mean
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.copy_(rows.mean(0))
    out = gaussian_null.fvu_l0_dead(sae, rows)
    assert abs(out["fvu"] - 1.0) < 1e-5 and out["l0"] == 0 and out["dead_fraction"] == 1.0
    assert np.isfinite(out["fvu"])
