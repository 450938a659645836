"""Chapter 3's SAE runs on a borrowed GPU machine that cannot reach the corpus: pack here, run there, store here.

The GPU machine (scripts/gpu-chapter3 says how to call it) reaches nothing outside itself and takes at most
64 MiB of files per call, so it cannot rebuild the corpus or receive the 220 MB train split. It gets only
what the runs read::

    scripts/pack-gpu-inputs          # here: .gpu-ch3/ (46 MiB: LM, the harvest's windows, val split, seed-0 SAEs)
    scripts/gpu-chapter3 OUT         # there: check, rebuild a scratch cache, harvest, train, evaluate, tar to OUT
    scripts/store-gpu-chapter3 DIR   # here: check the returned artifacts and copy them into cache/

**Packing** (:func:`~monosemantic.gpupack.pack`). ``harvest_to_disk`` reads random windows of the train split drawn
from the profile's seed; the pack holds exactly those windows (their starts and tokens: 46,912 windows of 128 tokens
for the cpu profile's 6M activations, 12 MB), the val split whole (0.5M tokens), the LM artifact, the seed-0 SAEs
that the held-out evaluation compares against, a few thousand activations computed here as a reference, and a
manifest of sha256s. :func:`~monosemantic.gpupack.unpack` checks every part, rebuilds the cache there with a sparse
``train.bin`` of the full length holding those windows at their offsets, and checks that this machine's torch draws
the same windows from it before anything runs.

**Running** (:func:`run`). One harvest (the cpu profile's 6M + 1M activations) by ``harvest_to_disk`` exactly as
``monosemantic harvest`` runs it (the model on the CPU, fp32; the machine's 16 cores take ~30 s). When its files are
byte for byte the committed CPU harvest's (the pack brings that manifest), the runs read
``activations/<profile>-mlp`` itself; when another CPU or torch rounds differently, the harvest is
``activations/<profile>-mlp-gpu`` and the SAEs trained on it name it as their input (naming the committed one would
make them read as stale here). Then the jobs of :func:`~monosemantic.gpujobs.plan_jobs`, highest priority first, in
worker processes that share the GPU (each is bound by Python's kernel launches, not by the GPU) and train from the
rows held on the GPU in the order ``harvest.ArraySource`` gives (:class:`~monosemantic.gpujobs.DeviceArraySource`:
the same batches, gathered there):

1. ``anchor-full``: the anchor's recipe literally for its 100,000 steps x 896 = 89.6M activations (15 passes over the 6M
   harvested), and ``anchor-scaled``: the same on inputs multiplied by ``input_scale`` (see
   :func:`~monosemantic.gpujobs.input_scale`), folded into the saved weights so the SAE reads the model's raw
   activations;
2. ``topk-seed<N>``, ``anchor-fixed-seed<N>``: the main TopK and the fixed L1 recipe with other seeds;
3. ``width-<n>``: the width sweep, each run stopped when its held-out FVU changes by less than 1% over the last 10%
   of its steps (``converged``), or at a cap or the time budget (``converged`` false);
4. ``topk-seed0-gpu``, ``anchor-fixed-seed0-gpu``: seed 0 again on this device, to tell the device's and dtype's
   effect from the seeds' (metrics only).

The literal runs are checkpointed; when the time budget runs out they stop and a second call on the warm machine
resumes them (the scratch cache lives in the ignored ``.gpu-ch3-run/``). Finished runs are written as artifacts
(``sae/<profile>-<name>``; the sweep as ``sae/<profile>-widths``, every job's timings as
``sae/<profile>-gpu-runs``), every SAE with weights is evaluated on the whole held-out split with intervals over
documents (``sae/<profile>-heldout``, as ``monosemantic evaluate`` writes it), and the new artifacts (weights fp16,
tables, manifests; no activations, no sweep weights) go to OUT as a split tarball with ``ch3-returned.json`` (their
sha256s). :func:`~monosemantic.gpupack.store_returned` checks them and copies them into the cache.

What would be cleaner in the stage modules, which this file leaves untouched: ``input_scale`` and a seed suffix as
fields of ``SAEStageConfig`` (here they live in :class:`~monosemantic.gpujobs.PlanConfig` and in each artifact's
config dict), a ``device`` argument to ``evaluation.run_stage`` and a source factory for ``sae_train.train_run``
(here :func:`heldout` and :func:`~monosemantic.gpujobs.train_job` are their GPU-resident counterparts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import UserError, cache_dir, work_dir
from .gpujobs import (
    Context,
    Job,
    PlanConfig,
    act_art_upstream,
    input_scale,
    job_stamp,
    plan_jobs,
    staged_result,
    staging,
    to_device,
    train_job,
)
from .gpupack import (
    COMMAND,
    HARVEST_NAME,
    PACK_DIR,
    SEED_RECIPES,
    GPURunError,
    pack,
    return_artifacts,
    store_returned,
    timed_log,
    unpack,
)
from .harvest import harvest_to_disk, open_rows

# --- the worker processes -------------------------------------------------------------------------------

def estimate_seconds(job: Job, rates: dict[str, float]) -> float:
    """Rough training time of ``job`` at ``rates`` (activations/s by architecture, for 4,096 features)."""
    rate = rates[job.cfg.architecture] * min(1.0, (4096 / job.cfg.n_features) ** 0.5)
    return job.cfg.n_activations / rate + 15


def worker(args: argparse.Namespace, stage) -> int:
    """Claim jobs in priority order (a folder per claim) and run them until none is left or time is up.
    ``stage``: the ``SAEStageConfig`` of the jobs' profile."""
    torch.set_num_threads(args.threads)
    log = timed_log(f"[w{args.id}] ")
    spec = json.loads(Path(args.jobs).read_text())
    jobs = [Job.from_dict(d) for d in spec["jobs"]]
    plan = PlanConfig(**{**spec["plan"], "seeds": tuple(spec["plan"]["seeds"])})
    claims, status = Path(spec["claims"]), Path(spec["status"])
    rates = spec["rates"]
    from . import store

    upstream = act_art_upstream(store.load("lm", spec["profile"], "model"),
                                store.load("activations", spec["profile"], spec["harvest"], verify=False))
    ctx = None
    for job in jobs:
        try:
            (claims / job.name).mkdir()
        except FileExistsError:
            continue
        if staged_result(spec["profile"], job, job_stamp(job, upstream, plan, stage.eval_windows)) is not None:
            continue  # finished in an earlier call
        left = spec["deadline"] - time.time()
        est = estimate_seconds(job, rates)
        if job.kind == "main":
            need = 60.0  # resumable: a start now is progress kept for the next call
        elif job.converge:
            need = estimate_seconds(dataclasses.replace(job, cfg=job.cfg.with_activations(
                plan.width_min_activations)), rates)
        else:
            need = est
        if left < need:
            log(f"skip {job.name}: about {need:.0f} s needed, {left:.0f} s left")
            (claims / job.name).rmdir()
            continue
        if ctx is None:
            ctx = Context(spec["profile"], stage, spec["device"], spec["harvest"], log)
        log(f"start {job.name} ({job.kind}): {job.cfg.architecture} {job.cfg.d_in}->{job.cfg.n_features}, "
            f"{job.cfg.n_activations / 1e6:.1f}M act, seed {job.cfg.seed}, input x{job.scale:.4g}, ~{est:.0f} s")
        try:
            train_job(job, ctx, plan, deadline=spec["deadline"], status_dir=status, log=log)
        except KeyboardInterrupt as e:
            log(f"{job.name} stopped ({e or 'signal'}); its checkpoint is kept: run again to resume")
            return 0
        (status / f"{job.name}.json").unlink(missing_ok=True)
    return 0


def balance(rows: list[dict[str, Any]], now: float, t_train: float, paused: set[int], order: dict[str, int],
            slack: float = 60.0, warmup: float = 20.0) -> tuple[int | None, int | None]:
    """(pid to pause, pid to resume), at most one of each: pause the lowest-priority running non-main job while
    a main job would finish after ``t_train`` at its current rate; resume one when all main jobs would finish
    ``slack`` s early, or when none is running; nothing while a main job is in its first ``warmup`` s. ``rows``:
    the workers' status files."""
    mains = [r for r in rows if r["kind"] == "main" and r["step"] < r["n_steps"]]
    others = sorted((r for r in rows if r["kind"] != "main"), key=lambda r: order.get(r["name"], 0))
    if not mains:
        return None, next(iter(paused), None)
    if any(r["time"] - r["started"] < warmup for r in mains):
        return None, None  # a rate over the first seconds (CUDA and cuBLAS starting) says little
    ends = [now + (r["n_steps"] - r["step"]) / max(r["rate"], 1e-9) for r in mains]
    if max(ends) > t_train:
        running = [r["pid"] for r in others if r["pid"] not in paused]
        return (running[-1] if running else None), None
    if max(ends) < t_train - slack and paused:
        return None, next(iter(paused))
    return None, None


# --- the orchestrator -----------------------------------------------------------------------------------

def harvest(profile: str, cfg, log: Callable[[str], None], reference_tol: float = 1e-2):
    """The profile's harvest on this machine, by ``harvest_to_disk`` as ``monosemantic harvest`` runs it (the
    model on the CPU, float32, all cores), its first rows checked against the reference rows computed where
    the pack was made. When its files are byte for byte the committed CPU harvest's (whose manifest came in the
    pack), they complete that artifact (``activations/<profile>-mlp``); otherwise they are
    ``activations/<profile>-mlp-gpu``. Reused when present. ``cfg``: the profile's ``HarvestConfig``."""
    from . import store
    from .data import TokenDataset
    from .lm import load_pretrained

    for name in ("mlp", HARVEST_NAME):
        try:
            art = store.load("activations", profile, name, config=cfg, verify=False)
        except store.CacheError:
            continue
        if all((art.work_path / f"{s}.f16").is_file() for s in ("train", "val")):
            log(f"{art.key} is here already")
            return art
    lm_art = store.load("lm", profile, "model")
    model = load_pretrained(profile).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    try:
        with store.write("activations", profile, HARVEST_NAME, config=cfg, inputs=[lm_art], command=COMMAND) as w:
            check: dict[str, float] = {}
            for split, n in (("train", cfg.train_activations), ("val", cfg.val_activations)):
                rows = harvest_to_disk(model, TokenDataset.open(profile, split).tokens, n,
                                       w.work_dir / f"{split}.f16", seq_len=cfg.seq_len, seed=cfg.seed, hook=cfg.hook,
                                       progress=False)
                if split == "train":
                    check = reference_check(rows, work_dir() / "gpu-inputs" / "reference.f16")
                    log(f"harvest: first {check['rows']:,} rows against the packing machine's: relative L2 "
                        f"difference {check['rel_l2']:.2e}, {check['equal_fraction']:.4%} of fp16 values equal")
                    if not check["rel_l2"] <= reference_tol:
                        raise GPURunError(f"the harvest differs from the reference rows by {check['rel_l2']:.3g} "
                                          "(relative L2): wrong windows or model; nothing was trained")
                del rows
            seconds = time.perf_counter() - t0
            w.metrics.update({"train_activations": cfg.train_activations, "val_activations": cfg.val_activations,
                              "d_in": model.config.d_mlp, "harvest_seconds": round(seconds, 1)})
            w.info.update({"made_on": "the GPU machine's CPU (harvest_to_disk, float32, all cores)",
                           "windows": "the windows harvest_to_disk draws from the profile's seed, packed by "
                                      "scripts/pack-gpu-inputs and rebuilt in a sparse train.bin",
                           "reference_check": check})
    finally:
        torch.set_num_threads(threads)
    art = store.load("activations", profile, HARVEST_NAME, config=cfg, verify=False)
    log(f"harvested {cfg.train_activations:,} + {cfg.val_activations:,} activations in {seconds:.0f} s")
    try:
        cpu = store.load("activations", profile, "mlp", config=cfg, verify=False)
    except store.CacheError:
        return art
    if all(cpu.manifest["files"].get(f, {}).get("sha256") == art.manifest["files"][f]["sha256"]
           for f in ("train.f16", "val.f16")):
        cpu.work_path.mkdir(parents=True, exist_ok=True)
        for f in ("train.f16", "val.f16"):
            os.replace(art.work_path / f, cpu.work_path / f)
        shutil.rmtree(art.path)
        shutil.rmtree(art.work_path, ignore_errors=True)
        log(f"the harvest is byte for byte {cpu.key}: the runs read the committed CPU harvest")
        return store.load("activations", profile, "mlp", config=cfg, verify=False)
    log(f"the harvest's bytes differ from {cpu.key}'s (another CPU, torch or thread count rounds differently): "
        f"the runs name {art.key} as their input")
    return art


def reference_check(rows: np.ndarray, reference: Path) -> dict[str, float]:
    """How the first rows of a harvest compare with the packed reference rows (same windows, other machine)."""
    ref = np.fromfile(reference, dtype=np.float16).reshape(-1, rows.shape[1]).astype(np.float32)
    ours = np.asarray(rows[:ref.shape[0]], dtype=np.float32)
    rel = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
    return {"rows": int(ref.shape[0]), "rel_l2": rel, "max_abs": float(np.abs(ours - ref).max()),
            "equal_fraction": float((ours == ref).mean())}


def _stage_for(stage, job: Job):
    """The stage config as it was for this job: its recipe's field replaced by the job's SAE config."""
    return stage.replace(**{job.recipe.replace("-", "_"): job.cfg})


def write_sae(profile: str, job: Job, stage, saved: dict[str, Any], inputs: list, plan_info: dict) -> Path:
    """``sae/<profile>-<job>``: the files of ``sae_train.write_main``; the config is the stage's with the job's
    SAE config in its recipe's field, plus ``input_scale``."""
    import pandas as pd

    from . import hardware, store
    from . import sae as sae_mod

    folder = staging(profile, job.name)
    density = np.load(folder / "density.npy")
    config = {**_stage_for(stage, job).to_dict(), "input_scale": job.scale}
    hardware.resolve_dtype(job.cfg.dtype, "sae", [(job.cfg.batch_size, job.cfg.d_in, job.cfg.n_features),
                                                   (job.cfg.batch_size, job.cfg.n_features, job.cfg.d_in)],
                           "cuda" if torch.cuda.is_available() else "cpu")
    with store.write("sae", profile, job.name, config=config, inputs=inputs, command=COMMAND) as w:
        for name in (sae_mod.SAE_CFG_FILENAME, sae_mod.SAE_WEIGHTS_FILENAME):
            shutil.copy(folder / "sae" / name, w.dir / name)
        pd.DataFrame(saved["history"]).to_parquet(w.dir / "training_curve.parquet", index=False)
        pd.DataFrame({"feature": np.arange(len(density)), "density": density}).to_parquet(
            w.dir / "feature_density.parquet", index=False)
        w.metrics.update({k: v for k, v in saved["metrics"].items() if v is not None})
        w.info.update({"job": job.name, "kind": job.kind, "recipe": job.recipe, "seed": job.cfg.seed,
                       "stopped": saved["stopped"], "compute_dtype": saved["compute_dtype"],
                       "device": saved["device"], **plan_info})
        w.wall_time_s = float(saved["metrics"]["train_seconds"] + saved["metrics"]["eval_seconds"])
    return store.artifact_path("sae", profile, job.name)


def write_widths(profile: str, jobs: list[Job], results: dict[str, dict], stage, plan: PlanConfig,
                 inputs: list) -> Path | None:
    """``sae/<profile>-widths``: the width sweep trained until its held-out FVU settled, one row per width
    (``converged``, ``stopped``, ``train_activations``, the metrics), curves, held-out FVU checks and density
    histograms; weights in ``cache/work/``."""
    import pandas as pd

    from . import metrics as metrics_mod
    from . import sae as sae_mod
    from . import store

    done = [j for j in jobs if j.kind == "width" and j.name in results]
    if not done:
        return None
    rows, curves, checks, hists = [], [], [], []
    for job in done:
        res = results[job.name]
        rows.append({"run": job.name, "family": "width", "architecture": job.cfg.architecture,
                     "n_features": job.cfg.n_features, "k": job.cfg.k, "batch_size": job.cfg.batch_size,
                     "lr": job.cfg.lr, "seed": job.cfg.seed, "max_activations": job.cfg.n_activations,
                     "stopped": res["stopped"], **{k: (np.nan if v is None else v) for k, v in res["metrics"].items()}})
        curves.append(pd.DataFrame(res["history"]).assign(run=job.name))
        checks.append(pd.DataFrame(res["heldout_fvu"], columns=["step", "fvu"]).assign(run=job.name))
        density = torch.from_numpy(np.load(staging(profile, job.name) / "density.npy"))
        hist = metrics_mod.density_histogram(density.float())
        hists.append(pd.DataFrame({"run": job.name, "left": hist.edges[:-1].numpy(), "right": hist.edges[1:].numpy(),
                                   "count": hist.counts.numpy(), "dead": hist.n_dead}))
    config = {**stage.to_dict(), "plan": plan.to_dict()}
    with store.write("sae", profile, "widths", config=config, inputs=inputs, command=COMMAND) as w:
        table = pd.DataFrame(rows)
        table.to_parquet(w.dir / "widths.parquet", index=False)
        pd.concat(curves, ignore_index=True).to_parquet(w.dir / "training_curves.parquet", index=False)
        pd.concat(checks, ignore_index=True).to_parquet(w.dir / "heldout_fvu.parquet", index=False)
        pd.concat(hists, ignore_index=True).to_parquet(w.dir / "density_histograms.parquet", index=False)
        for job in done:
            dest = w.work_dir / job.name
            dest.mkdir()
            for name in (sae_mod.SAE_CFG_FILENAME, sae_mod.SAE_WEIGHTS_FILENAME):
                shutil.copy(staging(profile, job.name) / "sae" / name, dest / name)
        w.metrics.update({"runs": len(done), "converged_runs": int(table["converged"].sum()),
                          "widths_planned": len([j for j in jobs if j.kind == "width"])})
        w.info["rule"] = (f"converged: held-out FVU (on {plan.converge_rows:,} val activations, checked every "
                          f"1/{plan.converge_checks} of the cap) changed by < {plan.converge_tol:.0%} over the last "
                          f"{plan.converge_window:.0%} of the steps, after at least {plan.width_min_activations:,} "
                          "activations")
    return store.artifact_path("sae", profile, "widths")


def write_ledger(profile: str, jobs: list[Job], results: dict[str, dict], states: dict[str, str], inputs: list,
                 info: dict[str, Any]) -> Path:
    """``sae/<profile>-gpu-runs``: one row per job (done, unfinished or skipped) with its timings and metrics,
    and the curves of the jobs that have no artifact of their own (the seed-0 controls)."""
    import pandas as pd

    from . import store

    rows, curves = [], []
    for i, job in enumerate(jobs):
        res = results.get(job.name)
        row = {"priority": i, "run": job.name, "kind": job.kind, "recipe": job.recipe,
               "architecture": job.cfg.architecture, "n_features": job.cfg.n_features, "seed": job.cfg.seed,
               "input_scale": job.scale, "planned_activations": job.cfg.n_activations, "state": states[job.name]}
        if res is not None:
            row.update({"stopped": res["stopped"], "compute_dtype": res["compute_dtype"],
                        **{k: (np.nan if v is None else v) for k, v in res["metrics"].items()}})
            if job.kind == "control":
                curves.append(pd.DataFrame(res["history"]).assign(run=job.name))
        rows.append(row)
    with store.write("sae", profile, "gpu-runs", config=info["plan"], inputs=inputs, command=COMMAND) as w:
        pd.DataFrame(rows).to_parquet(w.dir / "runs.parquet", index=False)
        if curves:
            pd.concat(curves, ignore_index=True).to_parquet(w.dir / "control_curves.parquet", index=False)
        w.metrics.update({"jobs": len(jobs), "done": sum(s == "done" for s in states.values()),
                          "unfinished": sum(s == "unfinished" for s in states.values()),
                          **{k: v for k, v in info["scale"].items()}, "harvest_seconds": info["harvest_seconds"],
                          "harvest_is_the_cpu_one": info["harvest"].endswith("-mlp"), "budget_s": info["budget_s"]})
        w.info.update({"device": info["device"], "workers": info["workers"], "packed_from": info["packed_from"],
                       "harvest": info["harvest"]})
    return store.artifact_path("sae", profile, "gpu-runs")


def heldout(profile: str, device: str, log: Callable[[str], None], names: list[str] | None = None,
            max_windows: int = 0) -> Path:
    """``sae/<profile>-heldout`` with the model and the SAEs on ``device`` (:func:`evaluation.run_stage`)."""
    from . import evaluation

    cfg = evaluation.EvalConfig(max_windows=max_windows)
    evaluation.run_stage(profile, cfg, names, progress=False, log=log, device=device)
    return evaluation_path(profile)


def evaluation_path(profile: str) -> Path:
    from . import store

    return store.artifact_path("sae", profile, "heldout")



def run(args: argparse.Namespace, stage) -> int:
    """The whole GPU session: harvest, jobs in worker processes, artifacts, held-out evaluation, tarball.
    ``stage``: the profile's ``SAEStageConfig``."""
    from . import evaluation, store

    t_start = time.time()
    log = timed_log()
    profile = args.profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        raise GPURunError("no CUDA device here; this is the GPU session's script (--allow-cpu for a test)")
    torch.set_num_threads(args.threads)
    plan = PlanConfig(literal_steps=args.literal_steps, literal_dtype=args.literal_dtype,
                      input_scale=args.input_scale, extra_scales=tuple(args.extra_scale or ()),
                      seeds=tuple(args.seeds),
                      controls=not args.no_controls, width_max_activations=args.width_max,
                      width_min_activations=args.width_min)
    deadline = t_start + args.budget
    t_train = deadline - args.reserve
    log(f"{device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'no GPU'}), torch {torch.__version__}; "
        f"budget {args.budget:.0f} s: training stops at +{args.budget - args.reserve:.0f} s")
    manifest_file = Path(args.pack) / "manifest.json"
    packed_from = json.loads(manifest_file.read_text()).get("git_commit") if manifest_file.is_file() else None
    t0 = time.perf_counter()
    act_art = harvest(profile, stage.harvest, log)
    harvest_seconds = round(time.perf_counter() - t0, 1)
    lm_art = store.load("lm", profile, "model")
    inputs = [lm_art, act_art]
    d_in = act_art.metrics["d_in"]
    train_rows = open_rows(act_art.work_path / "train.f16", d_in, stage.harvest.train_activations)
    scale_info = input_scale(to_device(train_rows, device))
    if plan.input_scale > 0:
        scale_info = {**scale_info, "input_scale": plan.input_scale, "derived_scale": scale_info["input_scale"]}
    scale = float(scale_info["input_scale"])
    log(f"E|x|^2 = {scale_info['mean_sq_norm']:.3f}, E|x - mean|^2 = {scale_info['mean_sq_centred_norm']:.3f}: "
        f"anchor-scaled trains on {scale:.4f} x; the anchor's logged MSE 0.094 would then be FVU "
        f"{scale_info['anchor_implied_fvu']:.3f}")
    if device == "cuda":
        torch.cuda.empty_cache()
    jobs = plan_jobs(stage, plan, scale)
    if args.only:
        jobs = [j for j in jobs if j.name in args.only]
    run_dir = work_dir() / "sae" / profile / "gpu-session"
    claims, status = run_dir / f"claims-{int(t_start)}", run_dir / "status"
    claims.mkdir(parents=True)
    status.mkdir(parents=True, exist_ok=True)
    for old in status.glob("*.json"):
        old.unlink()
    for job in jobs:  # decide the SAEs' compute dtypes once, before the workers share the device
        job.cfg.compute_dtype(device)
    spec = {"profile": profile, "device": device, "harvest": act_art.name, "deadline": t_train,
            "claims": str(claims), "status": str(status),
            "rates": {"relu": args.rate_relu, "topk": args.rate_topk}, "plan": plan.to_dict(),
            "jobs": [j.to_dict() for j in jobs]}
    (run_dir / "jobs.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "monosemantic.gpurun", "worker", "--jobs",
                               str(run_dir / "jobs.json"), "--id", str(i), "--threads", str(args.threads)], env=env)
             for i in range(args.workers)]
    log(f"{len(jobs)} jobs, {args.workers} workers (pids {', '.join(str(p.pid) for p in procs)})")
    order = {j.name: i for i, j in enumerate(jobs)}
    paused: set[int] = set()
    last_action, last_report = 0.0, time.time()
    stopping = False
    while any(p.poll() is None for p in procs):
        time.sleep(2)
        now = time.time()
        rows = []
        for f in status.glob("*.json"):
            try:
                rows.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        alive = {p.pid for p in procs if p.poll() is None}
        rows = [r for r in rows if r["pid"] in alive]
        paused &= alive
        if now >= t_train + args.grace and not stopping:
            stopping = True
            log("training time is up: stopping the workers (checkpoints are kept)")
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
        if stopping and now >= t_train + args.grace + 60:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if not stopping and args.balance and now - last_action >= 30:
            pause, resume = balance(rows, now, t_train, paused, order)
            if pause is not None:
                os.kill(pause, signal.SIGSTOP)
                paused.add(pause)
                last_action = now
                log(f"paused worker pid {pause} so the literal runs finish in time")
            elif resume is not None:
                os.kill(resume, signal.SIGCONT)
                paused.discard(resume)
                last_action = now
                log(f"resumed worker pid {resume}")
        if now - last_report >= 60 and rows:
            last_report = now
            total = sum(r["rate"] * r["batch_size"] for r in rows)
            log(f"+{now - t_start:.0f} s: " + "; ".join(
                f"{r['name']} {r['step'] / r['n_steps']:.0%}" + (" (paused)" if r["pid"] in paused else "")
                for r in sorted(rows, key=lambda r: order.get(r["name"], 0))) + f"; {total:,.0f} act/s in all")
    for p in procs:
        p.wait()

    # artifacts of what finished
    results, states = {}, {}
    for job in jobs:
        saved = staged_result(profile, job, job_stamp(job, act_art_upstream(lm_art, act_art), plan,
                                                      stage.eval_windows))
        if saved is not None:
            results[job.name], states[job.name] = saved, "done"
        else:
            started = (staging(profile, job.name) / "checkpoint.pt").is_file()
            states[job.name] = "unfinished" if started else "not started"
    written = [act_art.key] if act_art.name == HARVEST_NAME else []  # else it is the committed one, unchanged
    plan_info = {"input_scale_rule": "sqrt(d_in / E|x|^2) of the harvest" if plan.input_scale <= 0 else "given",
                 "packed_from_commit": packed_from}
    for job in jobs:
        if job.artifact and job.name in results:
            write_sae(profile, job, stage, results[job.name], inputs, plan_info)
            written.append(f"sae/{profile}-{job.name}")
    if write_widths(profile, jobs, results, stage, plan, inputs) is not None:
        written.append(f"sae/{profile}-widths")
    write_ledger(profile, jobs, results, states, inputs,
                 {"plan": {**plan.to_dict(), "stage": stage.to_dict()}, "scale": scale_info,
                  "harvest_seconds": harvest_seconds, "harvest": act_art.key, "budget_s": args.budget,
                  "device": device,
                  "workers": args.workers, "packed_from": packed_from})
    written.append(f"sae/{profile}-gpu-runs")
    unfinished = [n for n, s in states.items() if s != "done"]
    log("done: " + ", ".join(n for n, s in states.items() if s == "done"))
    if unfinished:
        log("unfinished: " + ", ".join(f"{n} ({states[n]})" for n in unfinished)
            + "; run the same command again on this machine to resume")
    extra = {"profile": profile, "states": states, "unfinished": unfinished,
             "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "scale": scale_info}
    if not args.no_heldout and time.time() < deadline - args.heldout_seconds:
        # what is done so far goes to OUT first, in case the evaluation outlasts the call
        return_artifacts(written, Path(args.out), {**extra, "seconds": round(time.time() - t_start, 1)})
        heldout(profile, device, log, evaluation.committed_saes(profile), max_windows=args.heldout_windows)
        written.append(f"sae/{profile}-heldout")
    elif not args.no_heldout:
        log("no time left for the held-out evaluation; run `monosemantic evaluate` where the cache is")
    returned = return_artifacts(written, Path(args.out), {**extra, "seconds": round(time.time() - t_start, 1)})
    size = sum(p["bytes"] for p in returned["parts"].values())
    log(f"returned {len(written)} artifacts in {len(returned['parts'])} parts ({size / 2**20:.1f} MiB) to {args.out}, "
        f"+{time.time() - t_start:.0f} s")
    return 0



# --- command line ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monosemantic.gpurun", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: write the GPU run's inputs into PACK_DIR")
    a.add_argument("--profile", default="cpu")
    a.add_argument("--out", type=Path, default=Path(PACK_DIR))
    a.add_argument("--reference-rows", type=int, default=2048)
    a.add_argument("--saes", nargs="*", default=list(SEED_RECIPES), help="committed SAEs to evaluate beside the new")
    u = sub.add_parser("unpack", help="there: check the pack and rebuild the scratch cache ($MONOSEMANTIC_CACHE)")
    u.add_argument("--pack", type=Path, default=Path(PACK_DIR))
    r = sub.add_parser("run", help="there: harvest, train, evaluate, tar the new artifacts into --out")
    r.add_argument("--profile", default="cpu")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--pack", type=Path, default=Path(PACK_DIR))
    r.add_argument("--budget", type=float, default=480, help="seconds for this call, all included (default 480)")
    r.add_argument("--reserve", type=float, default=100, help="seconds kept after training for artifacts, "
                   "the held-out evaluation and the tarball (default 100)")
    r.add_argument("--grace", type=float, default=20, help="seconds a width run has to finish after training "
                   "time is up before the workers are stopped")
    r.add_argument("--workers", type=int, default=4)
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    r.add_argument("--literal-steps", type=int, default=PlanConfig.literal_steps)
    r.add_argument("--literal-dtype", choices=("", "auto", "float32", "bfloat16"), default="",
                   help="compute dtype of the literal runs (default: the profile's, auto)")
    r.add_argument("--input-scale", type=float, default=0.0, help="anchor-scaled's input factor (0: from the data)")
    r.add_argument("--extra-scale", type=float, action="append", metavar="S",
                   help="also the literal recipe at full length on inputs x S (job anchor-scaled-S; repeatable)")
    r.add_argument("--seeds", type=int, nargs="*", default=list(PlanConfig.seeds))
    r.add_argument("--no-controls", action="store_true", help="skip the seed-0 retrains on this device")
    r.add_argument("--width-max", type=int, default=PlanConfig.width_max_activations)
    r.add_argument("--width-min", type=int, default=PlanConfig.width_min_activations)
    r.add_argument("--only", nargs="*", help="only these jobs (names as in the log)")
    r.add_argument("--rate-relu", type=float, default=250_000, help="act/s assumed when deciding what still fits")
    r.add_argument("--rate-topk", type=float, default=120_000)
    r.add_argument("--no-balance", dest="balance", action="store_false",
                   help="never pause lower-priority workers for the literal runs")
    r.add_argument("--no-heldout", action="store_true")
    r.add_argument("--heldout-windows", type=int, default=0, help="at most this many held-out windows (0: all)")
    r.add_argument("--heldout-seconds", type=float, default=45, help="skip the held-out evaluation when fewer "
                   "seconds than this are left of the budget")
    r.add_argument("--allow-cpu", action="store_true", help="run without a GPU (the tests)")
    w = sub.add_parser("worker", help="(started by run)")
    w.add_argument("--jobs", required=True)
    w.add_argument("--id", type=int, default=0)
    w.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("store", help="here: check the returned folder and copy its artifacts into the cache")
    s.add_argument("folder", type=Path)
    s.add_argument("--force", action="store_true", help="replace artifacts that are here with other content")
    args = p.parse_args(argv)
    try:
        from . import profiles  # this command line resolves the profile; the functions above take its configs

        if args.cmd == "pack":
            pack(args.profile, args.out, profiles.get(args.profile).sae, reference_rows=args.reference_rows,
                 saes=tuple(args.saes))
        elif args.cmd == "unpack":
            unpack(args.pack, cache_dir())
        elif args.cmd == "run":
            return run(args, profiles.get(args.profile).sae)
        elif args.cmd == "worker":
            return worker(args, profiles.get(json.loads(Path(args.jobs).read_text())["profile"]).sae)
        else:
            store_returned(args.folder, force=args.force)
    except UserError as e:
        print(f"gpurun {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
