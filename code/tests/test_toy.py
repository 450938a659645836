"""Toy models of superposition and the dictionary-recovery sweep: known answers, and the CLI end to end."""

from __future__ import annotations

import torch

from monosemantic import cli, profiles, store
from monosemantic import toy as T


def test_sparse_toy_model_represents_more_features_than_dimensions():
    cfg = T.SuperpositionConfig(n_features=10, n_hidden=3, densities=(1.0, 0.02), n_seeds=1, batch_size=256,
                                n_steps=1500, lr=3e-3)
    models, density, _ = T.train_toy_models(cfg, progress=False)
    represented = T.superposition_metrics(models.W.detach())["represented"]
    assert represented[0] <= cfg.n_hidden  # dense: at most m features, the most important ones
    assert represented[1] > cfg.n_hidden  # sparse: superposition


def test_superposition_metrics_on_known_geometries():
    # instance 0: two features on their own axes and one dropped; instance 1: an antipodal pair and a dropped one
    W = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                      [[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]])  # (I=2, m=2, n=3)
    m = T.superposition_metrics(W)
    torch.testing.assert_close(m["norm"], torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(m["interference"][:, :2], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(m["dimensionality"], torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))
    assert m["represented"].tolist() == [2.0, 2.0]
    torch.testing.assert_close(m["dims_per_feature"], torch.tensor([1.0, 1.0]))


def test_synthetic_data_has_the_requested_sparsity_and_spread():
    cfg = T.RecoveryConfig(d=16, n_true=64, mean_active=4.0, n_train=4096, n_eval=512)
    p = T.firing_probabilities(cfg)
    assert abs(float(p.sum()) - 4.0) < 1e-4 and bool((p[:-1] >= p[1:]).all()) and p[0] > 20 * p[-1]
    data = T.SyntheticData(cfg)
    x, a = data.sample(8192)
    assert x.shape == (8192, 16) and a.shape == (8192, 64)
    l0 = (a.to_dense() > 0).sum(1).float().mean()
    assert 3.6 < float(l0) < 4.4
    torch.testing.assert_close(data.features.norm(dim=1), torch.ones(64))


def test_dictionary_scores_know_a_perfect_dictionary():
    truth = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    off = (truth @ truth.T).abs() - torch.eye(20)
    assert off.max() < 0.9  # no two true directions count as duplicates of each other (unseeded, they could)
    learned = torch.cat([truth * 3, truth[:2]])  # scale does not matter; two duplicates
    s = T._dictionary_scores(learned, truth, 0.9)
    assert s["recovered"] == 1.0 and abs(s["mean_max_cos"] - 1) < 1e-5
    assert abs(s["duplicate_fraction"] - 4 / 22) < 1e-6
    assert T._dictionary_scores(-truth, truth, 0.9, signed=False)["recovered"] == 1.0


def test_toy_command_writes_the_cache(tmp_cache, capsys):
    assert cli.main(["toy", "--profile", "tiny", "--no-progress"]) == 0
    cfg = profiles.get("tiny").toy
    sup = store.load("toy", "tiny", "superposition", config=cfg.superposition)
    rec = store.load("toy", "tiny", "recovery", config=cfg.recovery)
    assert {"features_represented_dense", "features_represented_high_sparsity"} <= set(sup.metrics)
    assert {"recovery_at_width_K", "coef_ratio_l1_at_width_K"} <= set(rec.metrics)
    import pandas as pd

    res = pd.read_parquet(rec.file("results.parquet"))
    assert set(res.method) == {"l1", "topk", "ae", "pca"}
    assert "recovers" in capsys.readouterr().out
