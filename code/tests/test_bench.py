"""The benchmark's plumbing (the measurements themselves run in `make bench`, not in the tests)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from monosemantic import bench, gpucheck, hardware, store
from monosemantic.anchor_reference import AnchorTransformer, anchor_train_step
from monosemantic.config import UserError


def test_rows_carry_the_ratio_and_are_written_as_an_artifact(tmp_cache):
    row = bench._row("lm train step, batch 32", "tokens/s", 3000.0, 1500.0, ours_mfu=0.4)
    assert row["ratio"] == 2.0 and row["ours_mfu"] == 0.4
    assert bench._row("matmul", "TFLOP/s", 0.2, None)["ratio"] is None
    ctx = bench.BenchContext(quick=True, device=torch.device("cpu"), threads=1,
                             peaks={"bfloat16": 1e9, "float32": 1e9})
    path = bench.write_results("lm", [row], ctx, seconds=1.0)
    assert path.endswith(hardware.slug())
    profile, name = hardware.slug().split("-", 1)
    read = lambda: json.loads(store.load("bench", profile, name).file("results.json").read_text())  # noqa: E731
    assert read() == [{"group": "lm-quick", **row}]
    # a second group is merged beside the first; re-running a group replaces only its rows
    other = bench._row("sae train step", "activations/s", 10.0, 5.0)
    bench.write_results("sae", [other], ctx, seconds=1.0)
    bench.write_results("lm", [{**row, "ours": 4000.0}], ctx, seconds=1.0)
    rows = read()
    assert [r["group"] for r in rows] == ["sae-quick", "lm-quick"] and rows[1]["ours"] == 4000.0
    assert all(callable(fn) for _, fn in bench.BENCHES)


def test_the_anchor_recreation_has_its_quirks_and_trains():
    torch.manual_seed(0)
    model = AnchorTransformer(vocab_size=64, context_length=16)
    assert len(model.h[0].attn.heads) == 8 and not hasattr(model.h[0].attn, "out")
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert n_linear == 3 * 128 * 128 + 2 * 128 * 512 + 128 * 64  # Q, K, V, MLP, unembedding; no W_O
    assert model.forward_embedding(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (4, 16))
    first = anchor_train_step(model, opt, x, x)
    for _ in range(5):
        last = anchor_train_step(model, opt, x, x)
    assert last < first


def test_the_sae_group_runs_at_a_tiny_size():
    # a peak of 1 MFLOP/s: the tiny shapes' MFU is then far above the 3 decimals a row keeps, however busy the
    # machine (against a realistic peak it rounds to 0.0 under load)
    ctx = bench.BenchContext(quick=True, device=torch.device("cpu"), threads=1, refresh_peaks=False,
                             peaks={"bfloat16": 1e6, "float32": 1e6})
    rows = list(bench.bench_sae(ctx, d_in=16, n_features=64, batch=32, topk_batch=48, lm_in_loop=False,
                                density_features=128, density_rows=100))
    assert len(rows) == 6 and ("sae", bench.bench_sae) in bench.BENCHES
    steps, floor, density = rows[:4], rows[4], rows[5]
    for row in steps + [density]:
        assert row["ours"] > 0 and row["anchor"] > 0
        assert abs(row["ratio"] - row["ours"] / row["anchor"]) < 0.02  # of the rounded figures
        assert 0 < row["ours_mfu"] and 0 < row["anchor_mfu"]
    for row in rows:
        assert row["name"].endswith("[float32, 1 thread]")  # the dtype ours computed in and the threads used
    assert all(r["unit"] == "activations/s" and "10 d_in n_features" in r["note"] for r in steps)
    assert "AuxK idle" in steps[1]["name"] and "5% dead" in steps[2]["name"] and "35% dead" in steps[3]["name"]
    # each TopK step against our dense step, and the floor no TopK step can beat (it does a subset of the work)
    dense = steps[0]["ours"]
    for row in steps[1:] + [floor]:
        assert abs(row["vs_dense"] - row["ours"] / dense) < 0.02 * row["vs_dense"] + 0.01
    assert "floor" in floor["name"] and floor["anchor"] is None and floor["ours"] > 0
    assert density["unit"] == "rows/s" and "128 features" in density["name"]


def test_bench_prints_each_row_as_it_is_measured_and_records_wall_times(tmp_cache, capsys, monkeypatch):
    def group(ctx):
        yield bench._row("first", "things/s", 2.0, 1.0)
        assert "first" in capsys.readouterr().out  # printed before the second is measured
        yield bench._row("second", "things/s", 1.0, 1.0, ours_mfu=0.5, anchor_mfu=0.25)

    monkeypatch.setattr(bench, "BENCHES", [("fake", group)])
    args = argparse.Namespace(quick=True, only=None, threads=1, no_write=False)
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "second" in out and "MFU ours 50% anchor 25%" in out and "fake:" in out
    profile, name = hardware.slug().split("-", 1)
    art = store.load("bench", profile, name)
    rows = json.loads(art.file("results.json").read_text())
    assert [r["name"] for r in rows] == ["first", "second"] and all("seconds" in r for r in rows)
    assert art.manifest["info"]["groups"]["fake-quick"]["seconds"] == art.manifest["wall_time_s"]


def test_the_anchor_sae_recreation_normalises_its_decoder_as_the_anchor_does():
    from monosemantic.anchor_reference import anchor_sae_step, make_anchor_sae

    torch.manual_seed(0)
    sae, opt = make_anchor_sae(d_in=16, n_features=64, lr=1e-3)
    x = torch.randn(32, 16).relu()
    first = anchor_sae_step(sae, opt, x)
    for _ in range(20):
        last = anchor_sae_step(sae, opt, x)
    assert last < first
    assert sae.decoder.weight.shape == (16, 64)  # nn.Linear(n_features, d_in).weight
    rows = sae.decoder.weight.norm(dim=1)  # per input coordinate, across features (its quirk)
    torch.testing.assert_close(rows, torch.ones(16))


def test_the_fused_harvest_and_train_row_uses_every_position_against_one_per_sequence():
    from monosemantic import sae as S

    ctx = bench.BenchContext(quick=True, device=torch.device("cpu"), threads=1,
                             peaks={"bfloat16": 1e9, "float32": 1e9})
    relu = S.SAEConfig(d_in=512, n_features=64, batch_size=256)
    from monosemantic.anchor_reference import make_anchor_sae

    anchor, opt = make_anchor_sae(512, 64)
    row = bench._bench_fused(ctx, relu, anchor, opt, batch=256, seq=128)
    assert row["unit"] == "activations/s" and row["ours"] > 0 and row["anchor"] > 0
    assert "2 windows of 128" in row["note"] and "one random position" in row["note"]


def test_numerics_rows_show_cpu_training_repeats_exactly():
    """On a CPU both sides of every numerics row are the CPU: same seed, same data, so no difference at all,
    while the trained values themselves moved (the runs did train)."""
    ctx = bench.BenchContext(quick=True, device=torch.device("cpu"), threads=1)
    rows = list(bench.bench_numerics(ctx, lm_steps=3, sae_steps=4))
    assert len(rows) == 8 and all(r["ours"] == 0.0 for r in rows), rows
    lm_loss = rows[0]
    assert "cpu vs cpu" in lm_loss["name"] and 0 < lm_loss["cpu_value"] < 9  # ln(2048) = 7.6 at the start


def _pipeline_caches(root, drop=None):
    for side, shift in (("gpu", 0.01), ("cpu", 0.0)):
        for key, names in gpucheck.PIPELINE_CHECK.items():
            if side == "gpu" and key == drop:
                continue
            folder = root / side / key
            folder.mkdir(parents=True)
            (folder / "manifest.json").write_text(json.dumps({
                "metrics": {m: 1.0 + shift for m in names}, "wall_time_s": 2.0,
                "hardware": {"gpu": "Test GPU" if side == "gpu" else None}}))


def test_the_gpu_pipeline_check_compares_every_stage_and_refuses_a_missing_one(tmp_cache, tmp_path):
    _pipeline_caches(tmp_path / "ok")
    rows, hw = gpucheck.pipeline_check_rows(tmp_path / "ok" / "gpu", tmp_path / "ok" / "cpu")
    assert len(rows) == sum(len(v) for v in gpucheck.PIPELINE_CHECK.values()) and hw["gpu"] == "Test GPU"
    assert all(abs(r["difference"] - 0.01) < 1e-9 for r in rows)
    path = gpucheck.store_pipeline_check(tmp_path / "ok" / "gpu", tmp_path / "ok" / "cpu")
    art = store.load("gpucheck", "tiny", "test-gpu")
    assert path.endswith("gpucheck/tiny-test-gpu") and abs(art.metrics["largest_relative_difference"] - 0.01) < 1e-9
    _pipeline_caches(tmp_path / "bad", drop="sae/tiny-topk")
    with pytest.raises(UserError, match="sae/tiny-topk is missing from the gpu cache"):
        gpucheck.pipeline_check_rows(tmp_path / "bad" / "gpu", tmp_path / "bad" / "cpu")
