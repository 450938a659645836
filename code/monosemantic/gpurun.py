"""Chapter 3's SAE runs on a borrowed GPU machine that cannot reach the corpus: pack here, run there, store here.

The GPU machine (scripts/gpu-chapter3 says how to call it) reaches nothing outside itself and takes at most
64 MiB of files per call, so it cannot rebuild the corpus or receive the 220 MB train split. It gets only
what the runs read::

    scripts/pack-gpu-inputs          # here: .gpu-ch3/ (46 MiB: LM, the harvest's windows, val split, seed-0 SAEs)
    scripts/gpu-chapter3 OUT         # there: check, rebuild a scratch cache, harvest, train, evaluate, tar to OUT
    scripts/store-gpu-chapter3 DIR   # here: check the returned artifacts and copy them into cache/

**Packing** (:func:`pack`). ``harvest_to_disk`` reads random windows of the train split drawn from the
profile's seed; the pack holds exactly those windows (their starts and tokens: 46,912 windows of 128 tokens
for the cpu profile's 6M activations, 12 MB), the val split whole (0.5M tokens), the LM artifact, the seed-0
SAEs that the held-out evaluation compares against, a few thousand activations computed here as a reference,
and a manifest of sha256s. :func:`unpack` checks every part, rebuilds the cache there with a sparse
``train.bin`` of the full length holding those windows at their offsets, and checks that this machine's
torch draws the same windows from it before anything runs.

**Running** (:func:`run`). One harvest (the cpu profile's 6M + 1M activations) by ``harvest_to_disk`` exactly
as ``monosemantic harvest`` runs it (the model on the CPU, fp32; the machine's 16 cores take ~30 s). When its
files are byte for byte the committed CPU harvest's (the pack brings that manifest), the runs read
``activations/<profile>-mlp`` itself; when another CPU or torch rounds differently, the harvest is
``activations/<profile>-mlp-gpu`` and the SAEs trained on it name it as their input (naming the committed one
would make them read as stale here). Then the jobs of :func:`plan_jobs`, highest priority first, in worker
processes that share the GPU (each is bound by Python's kernel launches, not by the GPU) and train from the rows
held on the GPU in the order ``harvest.ArraySource`` gives (:class:`DeviceArraySource`: the same batches,
gathered there):

1. ``anchor``: the anchor's recipe literally for its 100,000 steps x 896 = 89.6M activations (15 passes over
   the 6M harvested), and ``anchor-scaled``: the same on inputs multiplied by ``input_scale`` (see
   :func:`input_scale`), folded into the saved weights so the SAE reads the model's raw activations;
2. ``topk-seed<N>``, ``anchor-fixed-seed<N>``: the main TopK and the fixed L1 recipe with other seeds;
3. ``width-<n>``: the width sweep, each run stopped when its held-out FVU changes by less than 1% over the
   last 10% of its steps (``converged``), or at a cap or the time budget (``converged`` false);
4. ``topk-seed0-gpu``, ``anchor-fixed-seed0-gpu``: seed 0 again on this device, to tell the device's and
   dtype's effect from the seeds' (metrics only).

The literal runs are checkpointed; when the time budget runs out they stop and a second call on the warm
machine resumes them (the scratch cache lives in the ignored ``.gpu-ch3-run/``). Finished runs are written
as artifacts (``sae/<profile>-<name>``; the sweep as ``sae/<profile>-widths``, every job's timings as
``sae/<profile>-gpu-runs``), every SAE with weights is evaluated on the whole held-out split with intervals
over documents (``sae/<profile>-heldout``, as ``monosemantic evaluate`` writes it), and the new artifacts
(weights fp16, tables, manifests; no activations, no sweep weights) go to OUT as a split tarball with
``ch3-returned.json`` (their sha256s). :func:`store_returned` checks them and copies them into the cache.

What would be cleaner in the stage modules, which this file leaves untouched: ``input_scale`` and a seed
suffix as fields of ``SAEStageConfig`` (here they live in :class:`PlanConfig` and in each artifact's config
dict), a ``device`` argument to ``evaluation.run_stage`` and a source factory for ``sae_train.train_run``
(here :func:`heldout` and :func:`train_job` are their GPU-resident counterparts).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .config import StageConfig, UserError, cache_dir, work_dir
from .harvest import ArraySource, harvest_batch, harvest_to_disk, harvest_windows, open_rows, sequential_windows  # noqa: F401
from .sae import SAE, SAEConfig
from .store import sha256_file

PACK_DIR = ".gpu-ch3"
"""The packed inputs (ignored; the device call carries it)."""
RUN_DIR = ".gpu-ch3-run"
"""The scratch cache on the GPU machine (ignored, so it stays between calls on a warm machine)."""
HARVEST_NAME = "mlp-gpu"
"""``activations/<profile>-mlp-gpu``: the harvest made on the GPU machine."""
SEED_RECIPES = ("topk", "anchor-fixed")
PART_LIMIT = 55 * 2**20
"""Largest packed part (the device takes 64 MiB of files per call, the code tree included)."""
RETURN_PART = 15 * 2**20
"""Largest returned part (the device returns files of at most 16 MiB, 8 files, 64 MiB in all)."""
RETURNED = "ch3-returned.json"
COMMAND = "scripts/pack-gpu-inputs, then scripts/gpu-chapter3 OUT on a GPU machine, then scripts/store-gpu-chapter3 OUT"
CHECKPOINT_EVERY = 5000


class GPURunError(UserError):
    """A pack, an unpacked cache or a returned folder that does not check out; one line."""


def _log(prefix: str = "") -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {prefix}{msg}", flush=True)
    return log


# --- packing (here) -------------------------------------------------------------------------------------

def _tar(path: Path, members: dict[str, Path]) -> None:
    """A gzipped tar of ``{name inside: file here}`` (names relative to a cache root)."""
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for name, src in sorted(members.items()):
            tar.add(src, arcname=name, recursive=False)


def _artifact_members(art, root: str) -> dict[str, Path]:
    """The committed files of an artifact (and its manifest) as tar members under ``root``."""
    from .store import MANIFEST

    members = {f"{root}/{MANIFEST}": art.path / MANIFEST}
    for rel, entry in art.manifest.get("files", {}).items():
        if entry.get("location", "cache") == "cache":
            members[f"{root}/{rel}"] = art.path / rel
    return members


def pack(profile: str, out: Path, stage, *, reference_rows: int = 2048, saes: tuple[str, ...] = SEED_RECIPES,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the GPU run's inputs to ``out`` (emptied first): ``lm.tar.gz`` (the LM artifact),
    ``tokens.tar.gz`` (the tokens manifest and index, the val split, the harvest's train windows and the first
    ``reference_rows`` activations of the harvest computed here), ``saes.tar.gz`` (the committed SAEs
    ``saes`` and the CPU harvest's manifest they name) and ``manifest.json`` (sizes and sha256s). Returns
    the manifest. ``stage``: the profile's ``SAEStageConfig``."""
    from . import store
    from .config import CORPUS_NAME
    from .data import TokenDataset
    from .lm import load_pretrained

    hcfg = stage.harvest
    lm_art = store.load("lm", profile, "model")
    tok_art = store.load("tokens", profile, CORPUS_NAME, verify=False, check_inputs=False)
    train = TokenDataset.open(profile, "train")
    val = TokenDataset.open(profile, "val", verify=True)
    start = time.perf_counter()
    starts, ids = harvest_windows(train.tokens, hcfg.seq_len, hcfg.seed, hcfg.train_activations)
    log(f"{len(starts):,} train windows of {hcfg.seq_len} tokens ({ids.nbytes / 1e6:.1f} MB) for "
        f"{hcfg.train_activations:,} activations")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "windows.npz", starts=starts, ids=ids)
        model = load_pretrained(profile).eval()
        harvest_to_disk(model, train.tokens, reference_rows, tmp / "reference.f16", seq_len=hcfg.seq_len,
                        seed=hcfg.seed, hook=hcfg.hook, progress=False)
        tok_root = f"work/tokens/{profile}-{CORPUS_NAME}"
        parts = {
            "lm.tar.gz": _artifact_members(lm_art, f"lm/{profile}-model"),
            "tokens.tar.gz": {f"tokens/{profile}-{CORPUS_NAME}/{store.MANIFEST}": tok_art.path / store.MANIFEST,
                              f"{tok_root}/index.json": tok_art.work_path / "index.json",
                              f"{tok_root}/{val.path.name}": val.path,
                              "work/gpu-inputs/windows.npz": tmp / "windows.npz",
                              "work/gpu-inputs/reference.f16": tmp / "reference.f16"},
        }
        sae_members: dict[str, Path] = {}
        sae_hashes = {}
        for name in saes:
            art = store.load("sae", profile, name)
            sae_members.update(_artifact_members(art, f"sae/{profile}-{name}"))
            sae_hashes[name] = art.content_hash
            for key in art.manifest.get("inputs", {}):
                stage, rest = key.split("/", 1)
                if stage == "activations" and store.artifact_path(stage, *rest.split("-", 1)).is_dir():
                    up = store.artifact_path(stage, *rest.split("-", 1))
                    sae_members[f"{key}/{store.MANIFEST}"] = up / store.MANIFEST  # its files are not needed
        if sae_members:
            parts["saes.tar.gz"] = sae_members
        manifest: dict[str, Any] = {
            "format": 1, "profile": profile, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": store.git_commit(), "harvest": hcfg.to_dict(), "harvest_batch": harvest_batch(),
            "windows": int(len(starts)), "reference_rows": reference_rows, "lm": lm_art.content_hash,
            "tokens": {"name": CORPUS_NAME, "content_hash": tok_art.content_hash, "train_tokens": len(train),
                       "val_tokens": len(val), "val_sha256": sha256_file(val.path)},
            "saes": sae_hashes, "parts": {},
        }
        for part, members in parts.items():
            _tar(out / part, members)
            size = (out / part).stat().st_size
            if size > PART_LIMIT:
                raise GPURunError(f"{part} is {size / 2**20:.1f} MiB, over the {PART_LIMIT / 2**20:.0f} MiB a part "
                                  "may be; pack fewer SAEs (--saes)")
            manifest["parts"][part] = {"sha256": sha256_file(out / part), "bytes": size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p["bytes"] for p in manifest["parts"].values())
    log(f"packed {len(parts)} parts, {total / 2**20:.1f} MiB, into {out} in {time.perf_counter() - start:.0f} s")
    if total > 60 * 2**20:
        log(f"warning: {total / 2**20:.1f} MiB leaves little of the device's 64 MiB for the code tree")
    return manifest


def unpack(pack_dir: Path, cache: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check the parts of ``pack_dir`` against its manifest and rebuild a cache at ``cache``: the LM, the token
    split's manifest and index, ``val.bin``, a sparse ``train.bin`` of the full length holding the harvest's
    windows, the seed-0 SAEs. Checks that this machine's torch draws the same windows. Does nothing when
    ``cache`` already holds this pack."""
    pack_dir, cache = Path(pack_dir), Path(cache)
    manifest_file = pack_dir / "manifest.json"
    if not manifest_file.is_file():
        raise GPURunError(f"{manifest_file} is missing; make the pack with scripts/pack-gpu-inputs and carry "
                          f"{PACK_DIR}")
    manifest = json.loads(manifest_file.read_text())
    digest = hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    marker = cache / "work" / "gpu-inputs" / "unpacked.json"
    if marker.is_file() and json.loads(marker.read_text()).get("manifest_sha256") == digest:
        log(f"{cache} already holds this pack")
        return manifest
    for part, entry in manifest["parts"].items():
        path = pack_dir / part
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise GPURunError(f"{path} is missing or does not match the pack's manifest (sha256); pack again")
    cache.mkdir(parents=True, exist_ok=True)
    for part in manifest["parts"]:
        with tarfile.open(pack_dir / part) as tar:
            tar.extractall(cache, filter="data")
    profile, tok = manifest["profile"], manifest["tokens"]
    tok_dir = cache / "work" / "tokens" / f"{profile}-{tok['name']}"
    if sha256_file(tok_dir / "val.bin") != tok["val_sha256"]:
        raise GPURunError("the unpacked val.bin does not match its sha256")
    inputs = np.load(cache / "work" / "gpu-inputs" / "windows.npz")
    starts, ids = inputs["starts"], inputs["ids"]
    train = tok_dir / "train.bin"
    with open(train, "wb") as f:
        f.truncate(tok["train_tokens"] * 2)  # sparse: only the windows below take disk space
    tokens = np.memmap(train, dtype=np.uint16, mode="r+", shape=(tok["train_tokens"],))
    tokens[(starts[:, None] + np.arange(ids.shape[1])[None, :]).ravel()] = ids.ravel()
    tokens.flush()
    del tokens
    h = manifest["harvest"]
    tokens = np.memmap(train, dtype=np.uint16, mode="r", shape=(tok["train_tokens"],))
    again_starts, again_ids = harvest_windows(tokens, h["seq_len"], h["seed"], h["train_activations"])
    if not (np.array_equal(again_starts, starts) and np.array_equal(again_ids, ids)):
        raise GPURunError(f"torch {torch.__version__} here draws other harvest windows than the packing machine did; "
                          "the harvest would read tokens that were not packed")
    marker.write_text(json.dumps({"manifest_sha256": digest}))
    log(f"unpacked {len(manifest['parts'])} parts into {cache}; {len(starts):,} harvest windows in a sparse "
        f"train.bin of {tok['train_tokens']:,} tokens, drawn identically here")
    return manifest


# --- what runs, and how ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlanConfig(StageConfig):
    """The GPU session's chapter 3 runs beyond ``train-sae``'s, and the rules that stop them."""

    STAGE: ClassVar[str] = "sae"

    literal_steps: int = 100_000
    """Steps of the literal runs: the anchor's 100,000 x 896 = 89.6M activations."""
    literal_dtype: str = ""
    """Compute dtype of the literal runs ('' keeps the profile's, ``auto``; ``float32`` is the anchor's own)."""
    input_scale: float = 0.0
    """Factor on the inputs of ``anchor-scaled``; 0: ``sqrt(d_in / E|x|^2)`` from the harvest (:func:`input_scale`)."""
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
    jobs = [Job("anchor", "main", "anchor", literal), Job("anchor-scaled", "main", "anchor", literal, scale=scale)]
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
        self.train = _to_device(open_rows(self.act_art.work_path / "train.f16", d_in, h.train_activations), device)
        self.val = _to_device(open_rows(self.act_art.work_path / "val.f16", d_in, h.val_activations), device)
        log(f"{self.train.shape[0]:,} + {self.val.shape[0]:,} activations on {device} in "
            f"{time.perf_counter() - t:.0f} s")
        val_tokens = TokenDataset.open(profile, "val").tokens
        self.windows = sequential_windows(val_tokens, h.seq_len, self.stage.eval_windows, batch=32)
        self.upstream = self.lm_art.content_hash + self.act_art.content_hash


def _to_device(rows: np.ndarray, device: str, chunk: int = 1 << 20) -> torch.Tensor:
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


# --- the worker processes -------------------------------------------------------------------------------

def estimate_seconds(job: Job, rates: dict[str, float]) -> float:
    """Rough training time of ``job`` at ``rates`` (activations/s by architecture, for 4,096 features)."""
    rate = rates[job.cfg.architecture] * min(1.0, (4096 / job.cfg.n_features) ** 0.5)
    return job.cfg.n_activations / rate + 15


def worker(args: argparse.Namespace, stage) -> int:
    """Claim jobs in priority order (a folder per claim) and run them until none is left or time is up.
    ``stage``: the ``SAEStageConfig`` of the jobs' profile."""
    torch.set_num_threads(args.threads)
    log = _log(f"[w{args.id}] ")
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


def return_artifacts(keys: list[str], out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Tar the committed files of the artifacts ``keys`` (``stage/profile-name``) into ``out`` as parts of at
    most ``RETURN_PART`` bytes, with ``ch3-returned.json``: their content hashes and the parts' sha256s."""
    from . import store

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ch3-artifacts.tgz.*"):
        old.unlink()
    arts = {}
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "a.tgz"
        with tarfile.open(tarball, "w:gz", compresslevel=6) as tar:
            for key in keys:
                stage, rest = key.split("/", 1)
                profile, name = rest.split("-", 1)
                art = store.load(stage, profile, name, verify=False, check_inputs=False)
                for member, path in _artifact_members(art, key).items():
                    tar.add(path, arcname=member, recursive=False)
                arts[key] = art.content_hash
        parts = {}
        with open(tarball, "rb") as f:
            i = 0
            while block := f.read(RETURN_PART):
                part = out / f"ch3-artifacts.tgz.{i:02d}"
                part.write_bytes(block)
                parts[part.name] = {"sha256": hashlib.sha256(block).hexdigest(), "bytes": len(block)}
                i += 1
    returned = {"format": 1, "artifacts": arts, "parts": parts, **extra}
    (out / RETURNED).write_text(json.dumps(returned, indent=1) + "\n")
    return returned


def run(args: argparse.Namespace, stage) -> int:
    """The whole GPU session: harvest, jobs in worker processes, artifacts, held-out evaluation, tarball.
    ``stage``: the profile's ``SAEStageConfig``."""
    from . import evaluation, store

    t_start = time.time()
    log = _log()
    profile = args.profile
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        raise GPURunError("no CUDA device here; this is the GPU session's script (--allow-cpu for a test)")
    torch.set_num_threads(args.threads)
    plan = PlanConfig(literal_steps=args.literal_steps, literal_dtype=args.literal_dtype,
                      input_scale=args.input_scale, seeds=tuple(args.seeds),
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
    scale_info = input_scale(_to_device(train_rows, device))
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


def act_art_upstream(lm_art, act_art) -> str:
    """The upstream stamp a job's staging folder carries (as :class:`Context` makes it)."""
    return lm_art.content_hash + act_art.content_hash


# --- storing (here) -------------------------------------------------------------------------------------

def store_returned(folder: Path, *, force: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Check what scripts/gpu-chapter3 returned in ``folder`` (parts against ``ch3-returned.json``, every file
    against its artifact's manifest, every input against this cache or the returned set) and copy the artifacts
    into the cache. A damaged part or file stops everything; an artifact made from another version of an input
    than this cache holds is skipped, with the reason; one that is here already with other content is replaced
    only with ``force`` (otherwise nothing is copied). Returns the keys stored."""
    from . import store

    folder = Path(folder)
    spec_file = folder / RETURNED
    if not spec_file.is_file():
        raise GPURunError(f"{spec_file} is missing: pass the folder the GPU run's files were fetched to")
    spec = json.loads(spec_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tarball = tmp / "a.tgz"
        with open(tarball, "wb") as out:
            for part, entry in sorted(spec["parts"].items()):
                data = (folder / part).read_bytes() if (folder / part).is_file() else b""
                if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise GPURunError(f"{folder / part} is missing or does not match {RETURNED} (sha256)")
                out.write(data)
        root = tmp / "cache"
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="data")
        keys = list(spec["artifacts"])  # upstream ones first, as the run lists them
        arts, replace, skipped = {}, [], set()
        for key in keys:
            stage, rest = key.split("/", 1)
            profile, name = rest.split("-", 1)
            manifest = json.loads((root / key / store.MANIFEST).read_text())
            art = store.Artifact(stage, profile, name, root / key, manifest)
            problems = art.problems(check_work=False)
            if problems:
                raise GPURunError(f"returned {key}: {problems[0]}")
            if art.content_hash != spec["artifacts"][key]:
                raise GPURunError(f"returned {key} is not the artifact {RETURNED} names")
            stale = None
            for up, content_hash in manifest.get("inputs", {}).items():
                if up in spec["artifacts"]:
                    ok = spec["artifacts"][up] == content_hash and up not in skipped
                else:
                    up_stage, up_rest = up.split("/", 1)
                    try:
                        here = store.load(up_stage, *up_rest.split("-", 1), verify=False, check_inputs=False)
                    except store.CacheError:
                        log(f"note: {key} was made from {up}, which is not in this cache")
                        continue
                    ok = here.content_hash == content_hash
                if not ok:
                    stale = up
                    break
            if stale is not None:  # e.g. the held-out table of a seed-0 SAE that was retrained here since
                log(f"skipped {key}: it was made from another {stale} than this cache holds (it would load as "
                    "stale); remake it here" + (" with `monosemantic evaluate`" if name == "heldout" else ""))
                skipped.add(key)
                continue
            dest = store.artifact_path(stage, profile, name)
            if dest.is_dir():
                try:
                    same = store.load(stage, profile, name, verify=False, check_inputs=False).content_hash == \
                        art.content_hash
                except store.CacheError:
                    same = False
                if not same:
                    replace.append(key)
            arts[key] = art
        if replace and not force:
            raise GPURunError(f"{', '.join(replace)} already in the cache with other content; pass --force to "
                              "replace them")
        for art in arts.values():
            dest = store.artifact_path(art.stage, art.profile, art.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.parent / f".tmp-{dest.name}-gpu"
            if tmp_dest.exists():
                shutil.rmtree(tmp_dest)
            shutil.copytree(art.path, tmp_dest)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp_dest, dest)
    keys = [k for k in keys if k not in skipped]
    for key in keys:
        stage, rest = key.split("/", 1)
        art = store.load(stage, *rest.split("-", 1))
        m = art.metrics
        brief = ", ".join(f"{k} {m[k]:.4g}" for k in ("train_activations", "resampled_total", "fvu", "l0",
                                                     "ce_loss_recovered", "input_scale")
                          if isinstance(m.get(k), (int, float)))
        log(f"stored {key}" + (f": {brief}" if brief else ""))
    if spec.get("unfinished"):
        log(f"unfinished on the GPU: {', '.join(spec['unfinished'])}")
    return keys


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
