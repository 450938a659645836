"""What a Llama run costs: matmul FLOPs of a token's forward pass and of an SAE step, measured throughput
(:func:`benchmark`: Llama-3-8B's exact layer shapes with random weights, cached per machine as
``llama/<profile>-throughput-<hardware>``), and the hours, dollars and disk of a Stheno run
(:func:`cost_model`) from those measurements.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from .llama import RANDOM_PRESETS, LlamaSource, _random_model, resolve_dtype
from .llama_train import memory_plan

# --- throughput, and the cost of a Stheno run -----------------------------------------------------------------

def forward_flops_per_token(n_layers: int, d_model: int, d_mlp: int, n_heads: int, n_kv: int, seq_len: int) -> float:
    """Matmul FLOPs of one token through ``n_layers`` decoder layers (no unembedding: harvesting stops at
    the hook): 2 x weights (q, k, v, o, gate, up, down) + causal attention (QK^T and AV, half the square)."""
    head = d_model // n_heads
    weights = d_model * (d_model + 2 * n_kv * head + d_model) + 3 * d_model * d_mlp
    return n_layers * (2 * weights + 2 * seq_len * d_model)


def sae_flops_per_activation(d_in: int, n_features: int) -> float:
    """FLOPs of one TopK SAE training step per activation, counted as the dense encoder's forward and the
    gradient of its weights (4 d n) plus the gradient of the pre-activations fed back (2 d n): the sparse
    decoder's O(k d) is negligible."""
    return 6 * d_in * n_features


def _time_forward(src: LlamaSource, ids: torch.Tensor, sync: Callable[[], None], seconds: float) -> float:
    """Tokens per second of the forward pass up to the default hook, after one warm-up."""
    hook = src.default_hook
    src.run_with_hooks(ids[:, :16], [hook])
    sync()
    t = time.perf_counter()
    reps = 0
    while reps < 2 or time.perf_counter() - t < seconds:
        src.run_with_hooks(ids, [hook])
        sync()
        reps += 1
    return reps * ids.numel() / (time.perf_counter() - t)


def benchmark(*, device: str | None = None, n_layers: int = 2, seq_len: int = 256, batch: int = 4,
              sae_features: int = 8192, sae_batch: int = 1024, steps: int = 5, profile: str = "cpu",
              seconds: float = 5.0, write: bool = True) -> dict[str, Any]:
    """Time the real shapes of Llama-3-8B (random weights, ``n_layers`` of its layers, forward up to the
    last layer's MLP in bf16/fp32), SmolLM2-135M's whole forward pass at the same windows, and a TopK SAE
    step on Llama-3-8B's 14,336-dim MLP activations, and store the achieved FLOP/s as
    ``llama/<profile>-throughput-<hardware>`` for :func:`cost_model`."""
    from . import hardware, store
    from . import sae as sae_mod

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    dtype = resolve_dtype("auto", dev)
    ids = torch.randint(0, 256, (batch, seq_len))
    # a 256-token vocabulary: the embedding lookup costs nothing either way and the harvest never unembeds,
    # so the timing is that of the real layers without 1B parameters of tables to initialise
    rates = {}
    smol_layers = RANDOM_PRESETS["smollm2-135m"]["num_hidden_layers"]
    for preset, layers in (("llama3-8b", n_layers), ("smollm2-135m", smol_layers)):
        spec = f"random:{preset}:{layers}"
        model, tok = _random_model(spec, dtype, dev, vocab_size=256)
        rates[preset] = _time_forward(LlamaSource(model, tok, spec), ids, sync, seconds)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    p = RANDOM_PRESETS["llama3-8b"]
    fwd_flops = forward_flops_per_token(n_layers, p["hidden_size"], p["intermediate_size"],
                                        p["num_attention_heads"], p["num_key_value_heads"], seq_len)
    d_in = p["intermediate_size"]
    scfg = sae_mod.SAEConfig(d_in=d_in, n_features=sae_features, architecture="topk", k=64, batch_size=sae_batch,
                             resample_every=0, dtype="auto", b_dec_init="zeros")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sae = sae_mod.SAE(scfg, device=dev)  # built once, outside the timing: the steps alone are timed
    opt = sae_mod.make_optimizer(sae)
    x = torch.randn(sae_batch, d_in, device=dev)
    sae_dtype = scfg.compute_dtype(dev)
    sae_mod.train_step(sae, opt, x, None, sae_dtype)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        sae_mod.train_step(sae, opt, x, None, sae_dtype)
    sync()
    acts_s = steps * sae_batch / (time.perf_counter() - t)
    # the memory model against what the device held at its peak (a check on memory_plan's estimate)
    peak_gb = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    del sae, opt, x
    sae_flops = sae_flops_per_activation(d_in, sae_features)
    tok_s = rates["llama3-8b"]
    row = {"device": hardware.cuda_device() or hardware.cpu_model(), "hardware": hardware.slug(),
           "model_dtype": str(dtype).removeprefix("torch."),
           "forward_tokens_per_s": round(tok_s, 2), "forward_flop_per_s": round(tok_s * fwd_flops),
           "smollm2_tokens_per_s": round(rates["smollm2-135m"], 2),
           "sae_acts_per_s": round(acts_s, 2), "sae_flop_per_s": round(acts_s * sae_flops),
           "sae_memory_planned_gb": round(memory_plan(d_in, sae_features, sae_batch).total_gb, 2),
           **({"sae_memory_peak_gb": round(peak_gb, 2)} if peak_gb is not None else {}),
           "bench_layers": n_layers, "seq_len": seq_len, "batch": batch, "sae_features": sae_features,
           "sae_batch": sae_batch}
    if write:
        keys = ("bench_layers", "seq_len", "batch", "sae_features", "sae_batch")
        with store.write("llama", profile, f"throughput-{hardware.slug()}", config={k: row[k] for k in keys},
                         command=f"monosemantic llama bench --profile {profile} " + " ".join(
                             f"--{k.replace('_', '-').replace('bench-', '')} {row[k]}" for k in keys)) as w:
            w.metrics.update(row)
    return row


# Stheno's architecture (LlamaForCausalLM, Llama-3-8B shapes) and the run the cost model prices.
STHENO_SHAPE = dict(n_layers=32, d_model=4096, d_mlp=14336, n_heads=32, n_kv=8)


@dataclasses.dataclass(frozen=True)
class CostAssumptions:
    """The inputs of :func:`cost_model` that are not measurements: prices and the run's shape."""

    usd_per_gpu_hour: float = 2.5
    """Rental price of one H100 hour (on-demand cloud prices in 2025 range from about $2 to $4)."""
    usd_per_h200_hour: float = 3.5
    """Rental price of one H200 hour (about $3 to $5 on demand in 2025)."""
    budget_usd: float = 50.0
    h100_bf16_flop_per_s: float = 989e12
    """H100 SXM dense bf16 peak (NVIDIA datasheet); used with ``assumed_utilization`` only until an H100
    throughput has been measured and cached."""
    assumed_utilization: float = 0.4
    """Fraction of peak the forward pass and the SAE step reach on an H100 when no measurement exists."""
    seq_len: int = 1024
    d_in: int = 14336
    expansion: int = 8
    epochs: float = 1.0
    bytes_per_value: int = 2
    """On-disk bytes per activation value (fp16/bf16)."""


def measured_throughputs() -> list[dict[str, Any]]:
    """Every ``llama/*-throughput-*`` artifact's metrics (one row per hardware measured), with the date it was
    measured and the machine's bf16 units (``bf16_units``: the CPU flag, "gpu", or None), each loaded through
    :func:`store.load`, so a damaged one stops with one line and the book lists what it read."""
    from . import store

    rows = []
    for art in store.list_artifacts("llama"):
        if art.name.startswith("throughput-"):
            art = store.load(art.stage, art.profile, art.name)
            hw = art.manifest.get("hardware", {})
            rows.append({**art.metrics, "profile": art.profile, "measured": art.manifest.get("created", "")[:10],
                         "bf16_units": hw.get("cpu_bf16") if not hw.get("gpu") else "gpu"})
    return rows


def cost_model(tokens: float, assumptions: CostAssumptions = CostAssumptions(),
               throughputs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Predicted time and money of a Stheno run that harvests ``tokens`` last-layer MLP activations and
    trains a TopK SAE (``expansion`` x 14,336) on them for ``epochs``, per hardware: every measured one
    (FLOP/s achieved by :func:`benchmark`, cached) and an H100 from its peak x ``assumed_utilization`` when
    none was measured. Also: disk for the shards, SAE memory, and what ``budget_usd`` buys on that device."""
    a = assumptions
    throughputs = measured_throughputs() if throughputs is None else throughputs
    fwd = forward_flops_per_token(seq_len=a.seq_len, **STHENO_SHAPE)
    n_features = a.expansion * a.d_in
    sae = sae_flops_per_activation(a.d_in, n_features)
    rows = []
    devices = [(t["device"], t["forward_flop_per_s"], t["sae_flop_per_s"], "measured") for t in throughputs]
    h200 = [d for d in devices if "H200" in d[0]]
    if not any("H100" in dev for dev, *_ in devices):
        if h200:  # the H200 is an H100 with more and faster memory: same SMs, same 989 TFLOP/s bf16 peak
            devices.append(("NVIDIA H100 (from the H200)", h200[0][1], h200[0][2], "H200 measurement, same peak"))
        else:
            peak = a.h100_bf16_flop_per_s * a.assumed_utilization
            devices.append(("NVIDIA H100 (assumed)", peak, peak, f"assumed {a.assumed_utilization:.0%} of peak"))
    plan = memory_plan(a.d_in, n_features, 4096)
    for dev, fwd_rate, sae_rate, basis in devices:
        harvest_h = tokens * fwd / fwd_rate / 3600
        sae_h = tokens * a.epochs * sae / sae_rate / 3600
        hours = harvest_h + sae_h
        price = a.usd_per_gpu_hour if "H100" in dev else a.usd_per_h200_hour if "H200" in dev else float("nan")
        per_token_usd = (fwd / fwd_rate + a.epochs * sae / sae_rate) / 3600 * price
        rows.append({"device": dev, "basis": basis, "tokens": tokens, "n_features": n_features,
                     "harvest_hours": harvest_h, "sae_hours": sae_h, "total_hours": hours,
                     "usd_per_hour": price, "usd": hours * price,
                     "tokens_for_budget": a.budget_usd / per_token_usd,
                     "disk_gb": tokens * a.d_in * a.bytes_per_value / 1e9, "sae_memory_gb": plan.total_gb,
                     "forward_tflop_per_s": fwd_rate / 1e12, "sae_tflop_per_s": sae_rate / 1e12})
    return rows
