"""What chapter 3's GPU session trains and how (:mod:`monosemantic.gpurun` runs it): the plan and its jobs, the
input scale of the rescaled literal run, the device-resident batches, convergence watching, and one job's
training, evaluation and staging."""


from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ConfigError, StageConfig, work_dir
from .gpupack import SEED_RECIPES
from .harvest import ArraySource, open_rows, sequential_windows
from .sae import SAE, SAEConfig

CHECKPOINT_EVERY = 5000


# --- what runs, and how ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlanConfig(StageConfig):
    """The GPU session's chapter 3 runs beyond ``train-sae``'s, and the rules that stop them."""

    STAGE: ClassVar[str] = "sae"
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("extra_scales",)

    literal_steps: int = 100_000
    """Steps of the literal runs: the anchor's 100,000 x 896 = 89.6M activations."""
    literal_dtype: str = ""
    """Compute dtype of the literal runs ('' keeps the profile's, ``auto``; ``float32`` is the anchor's own)."""
    input_scale: float = 0.0
    """Factor on the inputs of ``anchor-scaled``; 0: ``sqrt(d_in / E|x|^2)`` from the harvest (:func:`input_scale`)."""
    extra_scales: tuple[float, ...] = ()
    """More input factors for the literal recipe at full length, each a job ``anchor-scaled-<factor>`` after
    ``anchor-scaled`` (e.g. the middle of the range the anchor's logs allow, to test a prediction)."""
    seeds: tuple[int, ...] = (1, 2)
    """Seeds of ``topk-seed<N>`` and ``anchor-fixed-seed<N>`` (seed 0 is the committed run)."""
    controls: bool = True
    """Also retrain seed 0 of both on this device (metrics only)."""
    width_min_activations: int = 2_000_000
    """A width run is not judged converged before this many activations."""
    width_max_activations: int = 30_000_000
    """Cap of a width run (5 passes over the cpu profile's 6M)."""
    converge_tol: float = 0.01
    """Converged: held-out FVU changed by less than this fraction ..."""
    converge_window: float = 0.1
    """... over the last this fraction of the steps so far."""
    converge_checks: int = 100
    """Held-out FVU checks over the cap (every ``cap / converge_checks`` steps)."""
    converge_rows: int = 16_384
    """Val activations the held-out FVU of the convergence checks is measured on."""

    def __post_init__(self) -> None:
        if not all(isinstance(s, (int, float)) and s > 0 for s in self.extra_scales):
            raise ConfigError(f"extra input scales must be positive numbers, got {list(self.extra_scales)}")


@dataclasses.dataclass(frozen=True)
class Job:
    """One SAE to train on the GPU machine."""

    name: str
    kind: str  # "main" (the literal runs), "seed", "width", "control"
    recipe: str  # the SAEStageConfig recipe it derives from: "anchor", "anchor-fixed" or "topk"
    cfg: SAEConfig
    scale: float = 1.0  # factor on the inputs in training, folded into the saved weights
    converge: bool = False  # stop when the held-out FVU settles
    artifact: bool = True  # written as sae/<profile>-<name> with weights

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cfg": self.cfg.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(**{**d, "cfg": SAEConfig(**d["cfg"])})


def plan_jobs(stage, plan: PlanConfig, scale: float) -> list[Job]:
    """Every job, highest priority first (see the module's docstring)."""
    from .sae_train import plan as stage_plan

    literal = stage.anchor.replace(n_steps=plan.literal_steps, **({"dtype": plan.literal_dtype}
                                                                   if plan.literal_dtype else {}))
    jobs = [Job("anchor-full", "main", "anchor", literal), Job("anchor-scaled", "main", "anchor", literal, scale=scale),
            *(Job(f"anchor-scaled-{s:g}", "main", "anchor", literal, scale=float(s)) for s in plan.extra_scales)]
    for seed in plan.seeds:
        for recipe in SEED_RECIPES:
            jobs.append(Job(f"{recipe}-seed{seed}", "seed", recipe, stage.recipe(recipe).replace(seed=seed)))
    for run in stage_plan(stage):
        if run.family == "width":
            jobs.append(Job(run.name, "width", "topk", run.cfg.with_activations(plan.width_max_activations),
                            converge=True, artifact=False))
    if plan.controls:
        for recipe in SEED_RECIPES:
            jobs.append(Job(f"{recipe}-seed0-gpu", "control", recipe, stage.recipe(recipe), artifact=False))
    return jobs


def input_scale(rows: torch.Tensor, chunk: int = 1 << 18) -> dict[str, float]:
    """The factor that brings our activations to the scale input-normalised SAEs assume, E|x|^2 = d_in.

    The anchor's logs give its end state (MSE 0.094 per coordinate, L1 term 0.05) but neither its inputs'
    norm nor its FVU, and MSE = FVU x E|x - mean|^2 / d_in has both unknown, so its scale cannot be solved
    from them. We take the convention the L1 grid of profiles.py already uses (E|x|^2 = 5.7 here against
    d_in = 512): ``scale = sqrt(d_in / E|x|^2)``, measured on the harvest, and report the FVU that the anchor's
    MSE would mean at that scale (``anchor_implied_fvu``); the rescaled run's end-of-training MSE and L1 term
    (in its own units) are recorded beside the anchor's logged 0.094 and 0.05."""
    from .anchors import WARD

    n, d = rows.shape
    sq, total = 0.0, torch.zeros(d, dtype=torch.float64, device=rows.device)
    for start in range(0, n, chunk):
        x = rows[start:start + chunk].double()
        sq += float(x.pow(2).sum())
        total += x.sum(0)
    mean_sq = sq / n  # E|x|^2
    centred = mean_sq - float((total / n).pow(2).sum())  # E|x - mean|^2
    scale = (d / mean_sq) ** 0.5
    return {"input_scale": scale, "mean_sq_norm": mean_sq, "mean_sq_centred_norm": centred,
            "anchor_implied_fvu": float(WARD["sae_mse"]) * d / (scale**2 * centred)}


def converged(points: list[tuple[int, float]], window: float, tol: float) -> tuple[bool, float]:
    """Whether the last of ``points`` ((step, fvu) in step order) is within ``tol`` (relative) of the FVU at
    ``(1 - window)`` of its step (the last point at or before it), and that relative change (nan when no
    point is that early)."""
    if not points:
        return False, float("nan")
    step, fvu = points[-1]
    earlier = [f for s, f in points if s <= (1 - window) * step]
    if not earlier or step <= 0:
        return False, float("nan")
    change = abs(earlier[-1] - fvu) / max(abs(fvu), 1e-12)
    return change < tol, change


def curve_change(history: list[dict[str, float]], window: float) -> float:
    """Relative change of the training curve's FVU over the last ``window`` of its steps (nan if too short)."""
    points = [(int(r["step"]), float(r["fvu"])) for r in history if "fvu" in r]
    return converged(points, window, 1.0)[1]


class DeviceArraySource(ArraySource):
    """:class:`~monosemantic.harvest.ArraySource` over rows held on the device: batch ``step`` holds the same
    rows in the same order (the epoch permutations are drawn the same way, on the CPU, once per epoch), gathered
    on the device instead of read from a memmap, times ``scale``. ``watch(step) -> bool`` may end the stream
    (training then stops where the curve says), ``report(step)`` is called for every batch."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0, scale: float = 1.0,
                 watch: Callable[[int], bool] | None = None, report: Callable[[int], None] | None = None):
        super().__init__(rows, batch_size, seed)
        self.scale, self.watch, self.report = float(scale), watch, report
        self._dev_epoch, self._dev_perm = -1, None
        self.max_step = -1

    def _device_permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._dev_epoch:
            self._dev_perm = torch.from_numpy(self._permutation(epoch)).to(self.rows.device)
            self._dev_epoch = epoch
        return self._dev_perm

    def batch(self, step: int) -> torch.Tensor | None:
        if self.watch is not None and self.watch(step):
            return None
        start, parts, have = step * self.batch_size, [], 0
        while have < self.batch_size:  # ArraySource.batch's walk through the epochs
            epoch, offset = divmod(start, self.n)
            take = min(self.batch_size - have, self.n - offset)
            parts.append(self._device_permutation(epoch)[offset:offset + take])
            start, have = start + take, have + take
        index = torch.sort(torch.cat(parts)).values
        x = self.rows.index_select(0, index).float()
        self.max_step = max(self.max_step, step)
        if self.report is not None:
            self.report(step)
        return x * self.scale if self.scale != 1.0 else x


class ConvergenceWatch:
    """Ends a run (``watch`` of :class:`DeviceArraySource`) when the SAE's FVU on fixed held-out rows settles
    (:func:`converged`), or when ``deadline`` (epoch seconds) passes. ``points`` keeps (step, fvu)."""

    def __init__(self, sae: SAE, rows: torch.Tensor, scale: float, plan: PlanConfig, n_steps: int,
                 min_steps: int, deadline: float):
        x = rows.float() * scale
        self.sae, self.x = sae, x
        self.centred = float((x - x.mean(0)).pow(2).sum())
        self.every = max(1, n_steps // plan.converge_checks)
        self.min_steps, self.plan, self.deadline = min_steps, plan, deadline
        self.points: list[tuple[int, float]] = []
        self.stopped = "cap"
        self.change = float("nan")

    @torch.no_grad()
    def fvu(self) -> float:
        resid = sum(float((self.sae(part).recon.float() - part).pow(2).sum()) for part in self.x.split(4096))
        return resid / max(self.centred, 1e-12)

    def __call__(self, step: int) -> bool:
        if time.time() > self.deadline:
            self.stopped = "budget"
            return True
        if step == 0 or step % self.every:
            return False
        self.points.append((step, self.fvu()))
        done, self.change = converged(self.points, self.plan.converge_window, self.plan.converge_tol)
        if done and step >= self.min_steps:
            self.stopped = "converged"
            return True
        return False


class Progress:
    """Per-batch callback: a status file for the orchestrator every few seconds, a log line every ``every`` s."""

    def __init__(self, job: Job, status: Path, log: Callable[[str], None], every: float = 30.0):
        self.job, self.status, self.log, self.every = job, status, log, every
        self.t0 = self.last_status = self.last_log = time.time()
        self.first = None
        self.window: tuple[float, int] | None = None  # (time, step) at the start of the rate window
        self.rate = 0.0

    def __call__(self, step: int) -> None:
        now = time.time()
        if self.first is None:
            self.first, self.window = step, (now, step)
            return
        if now - self.last_status < 5:
            return
        t_w, s_w = self.window
        self.rate = (step - s_w) / max(now - t_w, 1e-9)  # batches/s over the last window
        self.window = (now, step)
        self.last_status = now
        n = self.job.cfg.n_steps
        self.status.write_text(json.dumps({"name": self.job.name, "kind": self.job.kind, "pid": os.getpid(),
                                           "step": step, "n_steps": n, "batch_size": self.job.cfg.batch_size,
                                           "rate": self.rate, "time": now, "started": self.t0}))
        if now - self.last_log >= self.every:
            self.last_log = now
            act = self.rate * self.job.cfg.batch_size
            self.log(f"{self.job.name}: batch {step:,}/{n:,} ({step * self.job.cfg.batch_size / 1e6:.1f}M act), "
                     f"{act:,.0f} act/s, ~{(n - step) / max(self.rate, 1e-9):.0f} s to go")


def fold_scale(sae: SAE, scale: float) -> None:
    """Make an SAE trained on ``scale * x`` read ``x`` and reconstruct ``x``: the same latents, the
    reconstruction divided by ``scale`` (W_enc x scale, W_dec / scale, b_dec / scale)."""
    if scale == 1.0:
        return
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.W_dec.div_(scale)
        sae.b_dec.div_(scale)


class Context:
    """What every job of a worker reads: the model, the harvested rows and the val windows, on ``device``."""

    def __init__(self, profile: str, stage, device: str, harvest_name: str, log: Callable[[str], None]):
        from . import store
        from .data import TokenDataset
        from .lm import load_pretrained

        self.profile, self.device = profile, device
        self.stage = stage
        h = self.stage.harvest
        self.lm_art = store.load("lm", profile, "model")
        self.act_art = store.load("activations", profile, harvest_name, config=h, verify=False)
        self.model = load_pretrained(profile).to(device).eval()
        d_in = self.act_art.metrics["d_in"]
        t = time.perf_counter()
        self.train = to_device(open_rows(self.act_art.work_path / "train.f16", d_in, h.train_activations), device)
        self.val = to_device(open_rows(self.act_art.work_path / "val.f16", d_in, h.val_activations), device)
        log(f"{self.train.shape[0]:,} + {self.val.shape[0]:,} activations on {device} in "
            f"{time.perf_counter() - t:.0f} s")
        val_tokens = TokenDataset.open(profile, "val").tokens
        self.windows = sequential_windows(val_tokens, h.seq_len, self.stage.eval_windows, batch=32)
        self.upstream = self.lm_art.content_hash + self.act_art.content_hash


def to_device(rows: np.ndarray, device: str, chunk: int = 1 << 20) -> torch.Tensor:
    out = torch.empty(rows.shape, dtype=torch.float16, device=device)
    for start in range(0, rows.shape[0], chunk):
        out[start:start + chunk] = torch.from_numpy(np.array(rows[start:start + chunk])).to(device)
    return out


def staging(profile: str, name: str) -> Path:
    return work_dir() / "sae" / profile / "gpu-runs" / name


def job_stamp(job: Job, ctx_upstream: str, plan: PlanConfig, eval_windows: int) -> dict[str, Any]:
    stamp = {"job": job.to_dict(), "config_hash": job.cfg.config_hash(), "upstream": ctx_upstream,
             "eval_windows": eval_windows}
    if job.converge:
        stamp["plan"] = plan.to_dict()
    return stamp


def staged_result(profile: str, job: Job, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The staged result of ``job`` when it was finished with this stamp, else None."""
    result = staging(profile, job.name) / "result.json"
    if result.is_file():
        saved = json.loads(result.read_text())
        if saved.get("stamp") == stamp:
            return saved
    return None


def train_job(job: Job, ctx: Context, plan: PlanConfig, *, deadline: float, status_dir: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Train, evaluate and stage one job (``sae_train.train_run`` for rows on the device, with the input scale
    folded in and the convergence stop); a finished one is returned from its staging folder. SIGTERM stops
    training with a checkpoint (KeyboardInterrupt); the next call resumes it."""
    from . import hardware, metrics
    from . import sae as sae_mod

    stamp = job_stamp(job, ctx.upstream, plan, ctx.stage.eval_windows)
    saved = staged_result(ctx.profile, job, stamp)
    if saved is not None:
        return saved
    folder = staging(ctx.profile, job.name)
    result_file, checkpoint = folder / "result.json", folder / "checkpoint.pt"
    if result_file.is_file():
        shutil.rmtree(folder)  # made by another job definition or from other activations
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file = folder / "stamp.json"
    if checkpoint.is_file() and (not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp):
        checkpoint.unlink()
    stamp_file.write_text(json.dumps(stamp))
    cfg = job.cfg
    sae = SAE(cfg)
    watch = None
    if job.converge:
        min_steps = max(1, plan.width_min_activations // cfg.batch_size)
        watch = ConvergenceWatch(sae, ctx.val[:plan.converge_rows], job.scale, plan, cfg.n_steps, min_steps,
                                 deadline)
    progress = Progress(job, status_dir / f"{job.name}.json", log)
    source = DeviceArraySource(ctx.train, cfg.batch_size, seed=cfg.seed, scale=job.scale, watch=watch,
                               report=progress)
    t0 = time.perf_counter()
    trained = sae_mod.train(cfg, source, device=ctx.device, progress=False, sae=sae, desc=job.name,
                            checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY, log=log)
    history = trained.history
    seconds = history[-1]["seconds"] if history else time.perf_counter() - t0
    steps = int(history[-1]["step"]) if history else 0
    last = history[-1] if history else {}
    sae = trained.sae
    fold_scale(sae, job.scale)
    t_eval = time.perf_counter()
    result = metrics.run_evaluation(ctx.model, sae, ctx.windows)  # model and SAE on the device, float32
    density = metrics.feature_density(sae, ctx.val)  # rows held on the SAE's device
    out: dict[str, Any] = dict(result.metrics)
    out["dead_fraction"] = float((density == 0).double().mean())
    out["ultralow_fraction"] = float((density < metrics.ULTRALOW_DENSITY).double().mean())
    out["density_tokens"] = int(ctx.val.shape[0])
    out["train_activations"] = steps * cfg.batch_size
    out["drawn_activations"] = (source.max_step + 1) * cfg.batch_size  # + the anchor rule's dead-check windows
    out["train_seconds"] = round(seconds, 1)
    out["resampled_total"] = int(sum(row.get("resampled", 0) for row in history))
    out["activations_per_s"] = round(out["train_activations"] / max(seconds, 1e-9), 1)
    out["input_scale"] = job.scale
    out["train_mse_end"] = float(last.get("mse", float("nan")))  # in training units (x input_scale)
    out["train_l1_term_end"] = float(cfg.l1_coeff * last.get("l1", float("nan"))) if cfg.architecture == "relu" \
        else float("nan")
    if watch is not None:
        out["converged"] = watch.stopped == "converged"
        out["fvu_change_last_10pct"] = watch.change
        out["heldout_checks"] = len(watch.points)
        stopped = watch.stopped
    else:
        out["fvu_change_last_10pct"] = curve_change(history, plan.converge_window)
        out["converged"] = bool(out["fvu_change_last_10pct"] < plan.converge_tol)
        stopped = "steps"
    out["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
    raw = out
    out = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}  # JSON-safe
    compute = str(cfg.compute_dtype(ctx.device)).removeprefix("torch.")
    sae_mod.save(sae, folder / "sae", dtype=torch.float16, metadata={
        "hook_name": ctx.stage.harvest.hook, "model_name": f"monosemantic-lm-{ctx.profile}",
        "input_scale": job.scale, **({"input_scale_folded": "trained on input_scale * x; saved as W_enc * s, "
                                      "W_dec / s, b_dec / s, so it reads and reconstructs x"}
                                     if job.scale != 1.0 else {})})
    np.save(folder / "density.npy", density.numpy())
    saved = {"stamp": stamp, "metrics": out, "history": history, "stopped": stopped, "compute_dtype": compute,
             "device": hardware.cuda_device() or "cpu", "heldout_fvu": watch.points if watch is not None else []}
    result_file.write_text(json.dumps(saved))
    log(f"{job.name} done: {steps * cfg.batch_size / 1e6:.1f}M act in {seconds:.0f} s "
        f"({raw['activations_per_s']:,.0f} act/s, {compute}), FVU {raw['fvu']:.4f}, L0 {raw['l0']:.1f}, "
        f"CE recovered {raw['ce_loss_recovered']:.4f}, dead {raw['dead_fraction']:.3f}, "
        f"resampled {raw['resampled_total']}, {stopped}")
    return saved



def act_art_upstream(lm_art, act_art) -> str:
    """The upstream stamp a job's staging folder carries (as :class:`Context` makes it)."""
    return lm_art.content_hash + act_art.content_hash
