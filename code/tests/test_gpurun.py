"""The GPU session's chapter 3 runs (monosemantic.gpurun): pack here, unpack and run there, store here.

The end-to-end test plays both machines on this CPU with the tiny profile: pack from one cache, unpack into
a scratch cache that has nothing else, run every job (in worker processes, as on the GPU), store what comes
back into the first cache and load it. The fast tests pin the pieces whose failure would be silent there: the
device-side batches are ArraySource's, the folded scale changes nothing but units, the stop rules.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from monosemantic import cli, gpujobs, gpupack, gpurun, profiles, store
from monosemantic import sae as sae_mod
from monosemantic.harvest import ArraySource
from monosemantic.sae import SAE, SAEConfig


def test_device_source_serves_array_source_batches_across_epochs():
    rows = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float16)
    ref = ArraySource(rows, 96, seed=3)
    dev = gpujobs.DeviceArraySource(torch.from_numpy(rows), 96, seed=3, scale=2.5)
    for step in (0, 1, 9, 10, 11, 20, 31, 10, 0):  # epochs of 1000 rows end inside batches 10, 20 and 31
        want = ref.batch(step)
        assert torch.equal(dev.batch(step), want * 2.5)
    assert dev.max_step == 31


def test_source_watch_ends_the_stream_and_training_stops_there():
    rows = torch.randn(512, 8, dtype=torch.float16)
    cfg = SAEConfig(d_in=8, n_features=16, architecture="topk", k=2, batch_size=32, n_steps=50, log_every=10,
                    resample_every=0)
    src = gpujobs.DeviceArraySource(rows, 32, seed=0, watch=lambda step: step >= 23)
    out = sae_mod.train(cfg, src, device="cpu", progress=False)
    assert out.history[-1]["step"] == 23 and out.history[-1]["n_activations"] == 23 * 32


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_folding_the_input_scale_keeps_latents_and_reconstructs_raw_inputs(architecture):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=16, n_features=64, architecture=architecture, k=4)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x, s = torch.randn(32, 16).abs(), 9.5
    scaled = sae(x * s)  # what training saw
    gpujobs.fold_scale(sae, s)
    raw = sae(x)
    assert torch.allclose(raw.latents, scaled.latents, rtol=1e-5, atol=1e-5)
    assert torch.allclose(raw.recon * s, scaled.recon, rtol=1e-5, atol=1e-4)


def test_converged_compares_the_fvu_at_nine_tenths_of_the_steps():
    flat = [(s, 0.2 + 0.0001 * (s < 50)) for s in range(10, 101, 10)]
    assert gpujobs.converged(flat, 0.1, 0.01)[0]
    falling = [(s, 1.0 / s) for s in range(10, 101, 10)]
    done, change = gpujobs.converged(falling, 0.1, 0.01)
    assert not done and change == pytest.approx((1 / 90 - 1 / 100) / (1 / 100))
    assert not gpujobs.converged([(100, 0.2)], 0.1, 0.01)[0]  # nothing as early as step 90
    history = [{"step": s, "fvu": f} for s, f in falling]
    assert gpujobs.curve_change(history, 0.1) == pytest.approx(change)


def test_balance_pauses_low_priority_work_only_while_a_literal_run_is_late():
    order = {"anchor-full": 0, "topk-seed1": 1, "width-512": 2}
    row = lambda name, kind, pid, step, rate, started=0.0: {  # noqa: E731
        "name": name, "kind": kind, "pid": pid, "step": step, "n_steps": 1000, "rate": rate, "time": 100.0,
        "started": started}
    others = [row("topk-seed1", "seed", 2, 10, 50.0), row("width-512", "width", 3, 10, 50.0)]
    late = [row("anchor-full", "main", 1, 100, 1.0), *others]  # 900 s to go
    assert gpurun.balance(late, 0.0, 300.0, set(), order) == (3, None)  # the lowest priority first
    assert gpurun.balance(late, 0.0, 300.0, {3}, order) == (2, None)
    early = [row("anchor-full", "main", 1, 900, 10.0), *others]  # 10 s to go
    assert gpurun.balance(early, 0.0, 300.0, {3}, order) == (None, 3)
    assert gpurun.balance(early, 0.0, 300.0, set(), order) == (None, None)
    assert gpurun.balance(others, 0.0, 300.0, {2}, order) == (None, 2)  # no literal run left: resume
    young = [row("anchor-full", "main", 1, 100, 1.0, started=90.0), *others]
    assert gpurun.balance(young, 0.0, 300.0, set(), order) == (None, None)  # too early to judge its rate


def test_the_cpu_plan_is_the_anchors_length_first_then_seeds_widths_controls():
    stage = profiles.get("cpu").sae
    jobs = gpujobs.plan_jobs(stage, gpujobs.PlanConfig(), scale=9.4)
    names = [j.name for j in jobs]
    assert names[:6] == ["anchor-full", "anchor-scaled", "topk-seed1", "anchor-fixed-seed1", "topk-seed2",
                         "anchor-fixed-seed2"]
    assert names[6:-2] == [f"width-{n}" for n in stage.widths]
    assert names[-2:] == ["topk-seed0-gpu", "anchor-fixed-seed0-gpu"]
    for job in jobs[:2]:
        assert job.cfg.n_steps == 100_000 and job.cfg.batch_size == 896 and job.cfg.n_activations >= 89_000_000
        assert job.cfg.resample_rule == "anchor" and job.cfg.resample_until == 1 and job.cfg.l1_coeff == 3e-3
    assert [j.scale for j in jobs[:3]] == [1.0, 9.4, 1.0]
    assert jobs[2].cfg == stage.topk.replace(seed=1) and jobs[3].cfg == stage.anchor_fixed.replace(seed=1)
    assert all(j.converge and j.cfg.n_activations <= 30_000_000 + j.cfg.batch_size for j in jobs if j.kind == "width")
    assert [j.name for j in jobs if j.artifact] == names[:6]
    assert gpujobs.Job.from_dict(json.loads(json.dumps(jobs[1].to_dict()))) == jobs[1]
    # another input factor: one more literal job after anchor-scaled; the plan's hash unchanged without it
    more = gpujobs.plan_jobs(stage, gpujobs.PlanConfig(extra_scales=(6.9,)), scale=9.4)
    assert [j.name for j in more[:4]] == ["anchor-full", "anchor-scaled", "anchor-scaled-6.9", "topk-seed1"]
    assert more[2].scale == 6.9 and more[2].cfg == jobs[1].cfg and more[2].kind == "main"
    assert "extra_scales" not in gpujobs.PlanConfig().to_dict()


@pytest.fixture(scope="module")
def here(tmp_path_factory, tiny_pipeline):
    """The tiny profile's cache as this machine has it: corpus, LM, harvest, the seed-0 TopK and L1 SAEs."""
    cache = tiny_pipeline("harvest", tmp_path_factory.mktemp("gpurun") / "here")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONOSEMANTIC_CACHE", str(cache))
        for argv in (["train-sae", "--recipe", "topk", "--threads", "1"],
                     ["train-sae", "--recipe", "anchor-fixed", "--threads", "1"]):
            assert cli.main([*argv, "--profile", "tiny", "--no-progress"]) == 0
    return cache


@pytest.mark.slow
def test_pack_run_store_round_trip_on_the_tiny_profile(here, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MONOSEMANTIC_DTYPE_CACHE", str(tmp_path / "dtype.json"))
    pack, there, out = tmp_path / "pack", tmp_path / "there", tmp_path / "out"
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(here))
    assert gpurun.main(["pack", "--profile", "tiny", "--out", str(pack), "--reference-rows", "256"]) == 0
    manifest = json.loads((pack / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"lm.tar.gz", "tokens.tar.gz", "saes.tar.gz"}
    assert manifest["windows"] * 32 >= 8192 and manifest["saes"].keys() == {"topk", "anchor-fixed"}

    # there: nothing but the pack; a corrupt part is refused before anything is unpacked
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(there))
    broken = tmp_path / "broken"
    shutil.copytree(pack, broken)
    with open(broken / "lm.tar.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    assert gpurun.main(["unpack", "--pack", str(broken)]) == 2
    assert "does not match" in capsys.readouterr().err and not there.exists()
    assert gpurun.main(["unpack", "--pack", str(pack)]) == 0
    train_bin = next((there / "work" / "tokens").glob("tiny-*/train.bin"))
    assert train_bin.stat().st_size == manifest["tokens"]["train_tokens"] * 2
    # without the CPU harvest's manifest the GPU machine's harvest is its own artifact (as when its bytes differ)
    shutil.rmtree(there / "activations" / "tiny-mlp")
    argv = ["run", "--profile", "tiny", "--out", str(out), "--pack", str(pack), "--allow-cpu", "--workers", "2",
            "--threads", "1", "--literal-steps", "40", "--seeds", "1", "--no-controls", "--width-max", "4096",
            "--width-min", "1024", "--budget", "900", "--reserve", "60", "--heldout-windows", "16"]
    assert gpurun.main(argv) == 0
    returned = json.loads((out / gpupack.RETURNED).read_text())
    assert not returned["unfinished"], returned["states"]
    assert set(returned["artifacts"]) == {
        "activations/tiny-mlp-gpu", "sae/tiny-anchor-full", "sae/tiny-anchor-scaled", "sae/tiny-topk-seed1",
        "sae/tiny-anchor-fixed-seed1", "sae/tiny-widths", "sae/tiny-gpu-runs", "sae/tiny-heldout"}
    assert all(p.stat().st_size <= gpupack.RETURN_PART for p in out.glob("ch3-artifacts.tgz.*"))
    # a second call (as after a time-out) finds everything staged, trains nothing and returns the same SAEs
    assert gpurun.main(argv) == 0
    again = json.loads((out / gpupack.RETURNED).read_text())
    assert {k: v for k, v in again["artifacts"].items() if "heldout" not in k and "gpu-runs" not in k} == \
        {k: v for k, v in returned["artifacts"].items() if "heldout" not in k and "gpu-runs" not in k}

    # here: a damaged part is refused, then the artifacts are stored and load
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(here))
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    part = next(bad.glob("ch3-artifacts.tgz.*"))
    part.write_bytes(part.read_bytes()[:-10])
    assert gpurun.main(["store", str(bad)]) == 2
    assert not (here / "sae" / "tiny-anchor-full").exists()
    # a seed-0 SAE that changed here since the pack: the held-out table that read it is skipped, the rest stored
    shutil.copytree(here / "sae" / "tiny-topk", tmp_path / "topk-as-packed")
    with store.write("sae", "tiny", "topk", config={"retrained": 1}) as w:
        (w.dir / "x.json").write_text("{}")
    assert gpurun.main(["store", str(out)]) == 0
    assert "skipped sae/tiny-heldout" in capsys.readouterr().out
    assert (here / "sae" / "tiny-anchor-full").is_dir() and not (here / "sae" / "tiny-heldout").exists()
    shutil.rmtree(here / "sae" / "tiny-topk")
    shutil.copytree(tmp_path / "topk-as-packed", here / "sae" / "tiny-topk")
    assert gpurun.main(["store", str(out)]) == 0  # the rest is here already, byte for byte
    stage = profiles.get("tiny").sae
    literal = store.load("sae", "tiny", "anchor-full")
    scaled = store.load("sae", "tiny", "anchor-scaled")
    for art in (literal, scaled):
        assert art.metrics["train_activations"] == 40 * stage.anchor.batch_size
        assert "resampled_total" in art.metrics and art.config["anchor"]["n_steps"] == 40
        assert art.config["anchor"]["resample_rule"] == "anchor"
        assert art.manifest["inputs"]["activations/tiny-mlp-gpu"] == returned["artifacts"]["activations/tiny-mlp-gpu"]
    assert literal.config["input_scale"] == 1 and scaled.config["input_scale"] == scaled.metrics["input_scale"] > 1
    # the returned SAEs keep their weights in cache/work/, their hashes unchanged
    weights = sae_mod.SAE_WEIGHTS_FILENAME
    for art in (literal, scaled, store.load("sae", "tiny", "topk-seed1")):
        assert art.manifest["files"][weights]["location"] == "work" and not (art.path / weights).exists()
        assert art.content_hash == returned["artifacts"][art.key] and art.problems() == []
    assert json.loads(scaled.file("cfg.json").read_text())["metadata"]["input_scale"] == scaled.metrics["input_scale"]
    assert store.load("sae", "tiny", "topk-seed1").config["topk"]["seed"] == 1
    assert store.load("sae", "tiny", "anchor-fixed-seed1").config["anchor_fixed"]["seed"] == 1
    widths = pd.read_parquet(store.load("sae", "tiny", "widths").file("widths.parquet"))
    assert list(widths["run"]) == [f"width-{n}" for n in stage.widths]
    assert widths["converged"].dtype == bool and (widths["train_activations"] <= 4096).all()
    runs = pd.read_parquet(store.load("sae", "tiny", "gpu-runs").file("runs.parquet"))
    assert (runs["state"] == "done").all() and runs["run"].iloc[0] == "anchor-full"
    held = pd.read_parquet(store.load("sae", "tiny", "heldout").file("heldout.parquet"))
    assert {"topk", "anchor-fixed", "anchor-full", "anchor-scaled", "topk-seed1", "anchor-fixed-seed1"} <= \
        set(held["sae"])
    # storing again changes nothing; an artifact that differs here is replaced only on request
    assert gpurun.main(["store", str(out)]) == 0
    with store.write("sae", "tiny", "topk-seed1", config={"other": 1}) as w:
        (w.dir / "x.json").write_text("{}")
    assert gpurun.main(["store", str(out)]) == 2 and "--force" in capsys.readouterr().err
    assert gpurun.main(["store", str(out), "--force"]) == 0
    assert store.load("sae", "tiny", "topk-seed1").content_hash == returned["artifacts"]["sae/tiny-topk-seed1"]


@pytest.mark.slow
def test_an_interrupted_job_resumes_to_the_same_sae(here, tmp_path, monkeypatch):
    """What a second device call does with a literal run the time budget stopped: the same weights as a run
    never stopped."""
    monkeypatch.setenv("MONOSEMANTIC_DTYPE_CACHE", str(tmp_path / "dtype.json"))
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(here))
    log = lambda msg: None  # noqa: E731
    ctx = gpujobs.Context("tiny", profiles.get("tiny").sae, "cpu", "mlp", log)
    plan = gpujobs.PlanConfig()
    cfg = profiles.get("tiny").sae.anchor.replace(n_steps=45)  # the literal rule: resampling after 21 and 41
    jobs = [gpujobs.Job(name, "main", "anchor", cfg, scale=3.0) for name in ("whole", "stopped")]
    done = gpujobs.train_job(jobs[0], ctx, plan, deadline=float("inf"), status_dir=tmp_path, log=log)

    real_call = gpujobs.Progress.__call__

    def stop_at_30(self, step):
        if step == 30 and not getattr(self, "stopped_once", False):
            self.stopped_once = True
            raise KeyboardInterrupt("stopped for the test")
        real_call(self, step)

    monkeypatch.setattr(gpujobs.Progress, "__call__", stop_at_30)
    with pytest.raises(KeyboardInterrupt):
        gpujobs.train_job(jobs[1], ctx, plan, deadline=float("inf"), status_dir=tmp_path, log=log)
    assert (gpujobs.staging("tiny", "stopped") / "checkpoint.pt").is_file()
    monkeypatch.setattr(gpujobs.Progress, "__call__", real_call)
    again = gpujobs.train_job(jobs[1], ctx, plan, deadline=float("inf"), status_dir=tmp_path, log=log)
    weights = [(gpujobs.staging("tiny", n) / "sae" / sae_mod.SAE_WEIGHTS_FILENAME).read_bytes()
               for n in ("whole", "stopped")]
    assert weights[0] == weights[1]
    assert again["metrics"]["resampled_total"] == done["metrics"]["resampled_total"]
    assert again["metrics"]["train_activations"] == 45 * cfg.batch_size and again["metrics"]["input_scale"] == 3.0
