"""Training a TopK SAE on a Llama harvest: the memory plan that picks the dictionary's width, the SAE
config, and :func:`monosemantic.sae.train` (the one-layer SAEs' trainer) on the shards, in one process or
data-parallel under ``torchrun``; :func:`trained` reuses an SAE a finished run with the same training
settings left in ``cache/work``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .llama import LlamaConfig, LlamaError
from .llama_data import Shards, device_for, dist_info, init_distributed, run_dir, write_json

# --- SAE memory model and training ---------------------------------------------------------------------------

class MemoryPlan(NamedTuple):
    d_in: int
    n_features: int
    params: int
    weights_gb: float  # fp32 weights
    grads_gb: float
    adam_gb: float  # two fp32 moments
    batch_gb: float  # pre-activations, latents and their gradients for one (local) batch
    total_gb: float  # per device (FSDP divides weights, grads and Adam by the process count)

    def table(self) -> str:
        return (f"SAE {self.d_in} -> {self.n_features:,} features: {self.params / 1e9:.3f}B parameters; memory per "
                f"device: weights {self.weights_gb:.2f} GB + grads {self.grads_gb:.2f} + Adam {self.adam_gb:.2f} "
                f"+ batch {self.batch_gb:.2f} = {self.total_gb:.2f} GB")


def memory_plan(d_in: int, n_features: int, batch: int, *, shards: int = 1) -> MemoryPlan:
    """Memory of training one SAE: fp32 weights, grads and Adam moments (16 bytes a parameter, divided over
    ``shards`` FSDP processes) plus ~4 (batch, n_features) fp32 tensors (pre-activations, their gradient,
    the top-k selection's dense latents and a temporary) and the input."""
    params = 2 * d_in * n_features + n_features + d_in
    gb = 1e9
    w = 4 * params / gb / shards
    batch_gb = (4 * batch * n_features * 4 + 3 * batch * d_in * 4) / gb
    return MemoryPlan(d_in, n_features, params, w, w, 2 * w, batch_gb, 4 * w + batch_gb)


def device_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    import psutil

    return psutil.virtual_memory().total / 1e9


def choose_width(cfg: LlamaConfig, d_in: int, device: torch.device, shards: int = 1) -> tuple[int, MemoryPlan]:
    """The dictionary size: ``expansion x d_in``, or (expansion 0) the largest power-of-two multiple of
    ``d_in`` whose plan fits the memory budget. Raises when a fixed expansion does not fit."""
    budget = cfg.memory_gb or (0.8 * device_memory_gb(device) if device.type == "cuda" else 4.0)
    local_batch = cfg.sae_batch // max(shards, 1)
    if cfg.expansion:
        plan = memory_plan(d_in, cfg.expansion * d_in, local_batch, shards=shards)
        if plan.total_gb > budget:
            raise LlamaError(f"{plan.table()}: more than the {budget:.1f} GB budget; lower --expansion, train on "
                             f"hook_mlp_out, or shard it over more GPUs (torchrun ... --fsdp)")
        return plan.n_features, plan
    best = None
    for e in (1, 2, 4, 8, 16, 32, 64, 128):
        plan = memory_plan(d_in, e * d_in, local_batch, shards=shards)
        if plan.total_gb <= budget:
            best = plan
    if best is None:
        raise LlamaError(f"even a 1x SAE on {d_in} inputs needs more than {budget:.1f} GB; lower --sae-batch")
    return best.n_features, best


def sae_config(cfg: LlamaConfig, d_in: int, n_features: int, n_steps: int):
    from .sae import SAEConfig

    return SAEConfig(d_in=d_in, n_features=n_features, architecture="topk", k=cfg.k, lr=cfg.sae_lr,
                     batch_size=cfg.sae_batch, n_steps=n_steps, resample_every=0, dtype="auto",
                     dead_window=max(cfg.sae_batch, cfg.dead_window), aux_coeff=cfg.aux_coeff,
                     b_dec_init="geometric_median", seed=cfg.seed, log_every=max(1, min(100, n_steps // 20)))


class TrainOutput(NamedTuple):
    sae: Any  # monosemantic.sae.SAE
    history: list[dict[str, float]]
    plan: MemoryPlan
    acts_per_s: float
    seconds: float


def train(cfg: LlamaConfig, profile: str, *, folder: Path | None = None, fsdp: bool = False,
          progress: bool = True) -> TrainOutput:
    """Train a TopK SAE on a harvest's shards with :func:`monosemantic.sae.train`; prints the memory plan
    first. Under ``torchrun`` (WORLD_SIZE > 1) every process trains on its slice of each global batch (DDP, or
    FSDP with ``fsdp=True``): the one-process update on the global batch."""
    from . import sae as sae_mod

    d = init_distributed()
    device = device_for(d)
    shards = Shards(folder or run_dir(profile, cfg) / "acts")
    if shards.fields != cfg.harvest_fields():
        raise LlamaError(f"the harvested activations in {shards.folder} were made with {shards.fields}, not the "
                         f"current config; harvest again (`monosemantic llama harvest --profile {profile}`)")
    n_features, plan = choose_width(cfg, shards.width, device, shards=d.world if fsdp else 1)
    n_steps = max(1, int(cfg.sae_epochs * shards.rows) // cfg.sae_batch)
    scfg = sae_config(cfg, shards.width, n_features, n_steps)
    if d.rank == 0:
        print(f"llama train: {shards.rows:,} activations of width {shards.width} in {len(shards.files)} shards; "
              f"{n_steps:,} steps of {cfg.sae_batch} on {d.world} process(es), {device}")
        print(f"llama train: {plan.table()}", flush=True)
    batches = shards.batches(cfg.sae_batch, n_steps, seed=cfg.seed, rank=d.rank, world=d.world)
    start = time.perf_counter()
    result = sae_mod.train(scfg, batches, device=device, progress=progress, desc=f"SAE {shards.width}->{n_features}",
                           parallel=("fsdp" if fsdp else "ddp") if d.world > 1 else None)
    seconds = time.perf_counter() - start
    return TrainOutput(result.sae, result.history, plan, n_steps * cfg.sae_batch / seconds, seconds)


def trained(cfg: LlamaConfig, profile: str, *, fsdp: bool = False, progress: bool = True) -> TrainOutput:
    """:func:`train`, or the SAE a finished run with the same :meth:`LlamaConfig.train_fields` left in
    ``cache/work`` (fp32, with its curve and timing), so changing only the evaluation does not retrain."""
    from . import sae as sae_mod
    from .config import stable_hash

    folder = run_dir(profile, cfg) / "sae-runs" / stable_hash(cfg.train_fields())
    result = folder / "result.json"
    if result.is_file():
        saved = json.loads(result.read_text())
        if saved.get("fields") == json.loads(json.dumps(cfg.train_fields())):
            init_distributed()
            sae = sae_mod.load(folder / "sae", device=device_for(dist_info()))
            if dist_info().rank == 0:
                print(f"llama train: reusing the SAE trained with this config in {folder} "
                      f"({saved['seconds']:.0f} s of training)")
            return TrainOutput(sae, saved["history"], MemoryPlan(**saved["plan"]), saved["acts_per_s"],
                               saved["seconds"])
    out = train(cfg, profile, fsdp=fsdp, progress=progress)
    if dist_info().rank == 0:
        if folder.exists():
            shutil.rmtree(folder)
        sae_mod.save(out.sae, folder / "sae", dtype=torch.float32)
        write_json(result, {"fields": cfg.train_fields(), "history": out.history, "plan": out.plan._asdict(),
                             "acts_per_s": out.acts_per_s, "seconds": out.seconds})
    return out
