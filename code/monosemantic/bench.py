"""``monosemantic bench`` (``make bench``): our throughput side by side with the anchor's, same machine,
same run, plus this machine's matmul peak and each step's model FLOPs utilisation (MFU).

Each group of measurements is a function in :data:`BENCHES` returning rows
``{name, unit, ours, anchor, ratio, ...}`` (``ratio`` = ours / anchor, > 1 is faster); a group is written
into one artifact per machine, ``cache/bench/<hardware slug>/results.json`` (the slug starts with
``cpu-`` or ``gpu-``). To add a group, write ``def bench_xxx(ctx: BenchContext) -> list[dict]``
and append ``("xxx", bench_xxx)`` to :data:`BENCHES`.

Timing: ours and the anchor's step alternate (ours, anchor, ours, anchor, ...) after warm-up steps, and
each side's median step time is reported, so a machine that gets busier during the run slows both.

FLOPs: a training token costs 6 N + 12 L d T model FLOPs (PaLM appendix B / nanoGPT), a forward token a
third of that; N = parameters in matrix multiplies (the attention, MLP and unembedding weights, no
embeddings, biases or norms), L = layers, d = d_model, T = context. At vocab 50,304 the unembedding is
97% of N. MFU = model FLOPs per second / the best bf16 matmul rate this machine reaches at the step's
shapes (measured here, below); the anchor's fp32 step is divided by the same bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

DEFAULT_PROFILE = "cpu"


@dataclasses.dataclass
class BenchContext:
    quick: bool
    device: torch.device
    threads: int
    peaks: dict[str, float] = dataclasses.field(default_factory=dict)  # FLOP/s by dtype name

    def peak(self, dtype: str | torch.dtype) -> float:
        """Best measured matmul FLOP/s in ``dtype`` (the peak an MFU in that dtype is against)."""
        name = str(dtype).removeprefix("torch.")
        return self.peaks.get(name) or measure_peaks(self)[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_pair(ours: Callable[[], Any], anchor: Callable[[], Any], device: torch.device, repeat: int,
              warmup: int = 1) -> tuple[float, float]:
    """Median seconds of two functions timed alternately (so both see the same machine)."""
    for _ in range(warmup):
        ours()
        anchor()
    a, b = [], []
    for _ in range(repeat):
        for f, out in ((ours, a), (anchor, b)):
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            out.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def matmul_shapes(tokens: int = 4096, d: int = 128, vocab: int = 50304) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of the LM step's three unembedding products, which are 97% of its FLOPs."""
    return {"logits x W^T": (tokens, d, vocab), "dx = G W": (tokens, vocab, d), "dW = G^T x": (vocab, tokens, d)}


def measure_peaks(ctx: BenchContext) -> dict[str, float]:
    """Best matmul FLOP/s per dtype over the step's shapes (and a square 2048^3 for reference)."""
    if {"float32", "bfloat16"} <= set(ctx.peaks):
        return ctx.peaks
    tokens = 1024 if ctx.quick else 4096
    shapes = {**matmul_shapes(tokens), "square 2048": (2048, 2048, 2048)}
    out: dict[str, float] = {}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for label, (m, k, n) in shapes.items():
            # rows cut so that one product takes about a quarter of a second: an emulated bf16 (AVX2-only
            # CPUs, ~1 GFLOP/s) would otherwise spend minutes here; a probe of ~2e8 FLOPs gives the rate
            probe = max(8, min(m, int(2e8 / (2 * k * n))))
            b = torch.randn(k, n, dtype=dtype, device=ctx.device)
            a = torch.randn(probe, k, dtype=dtype, device=ctx.device)
            rate = 2 * probe * k * n / time_call(lambda a=a, b=b: a @ b, ctx.device, repeat=1)
            rows_used = min(m, max(probe, int(0.25 * rate / (2 * k * n))))
            a = torch.randn(rows_used, k, dtype=dtype, device=ctx.device)
            seconds = time_call(lambda a=a, b=b: a @ b, ctx.device, repeat=2 if ctx.quick else 3)
            rate = 2 * rows_used * k * n / seconds
            rows.append((str(dtype).removeprefix("torch."), label, rate))
            best = max(best, rate)
        out[str(dtype).removeprefix("torch.")] = best
    ctx.peaks.update(out)
    ctx.peak_rows = rows  # type: ignore[attr-defined]
    return out


def model_flops_per_token(model: nn.Module, d_model: int, context: int, n_layers: int = 1,
                          train: bool = True) -> int:
    """6 N + 12 L d T (training) or a third of it (forward), N = nn.Linear weights."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    fwd_bwd = 6 * n + 12 * n_layers * d_model * context
    return fwd_bwd if train else fwd_bwd // 3


def _row(name: str, unit: str, ours: float, anchor: float | None, **extra: Any) -> dict[str, Any]:
    row = {"name": name, "unit": unit, "ours": float(f"{ours:.4g}"),
           "anchor": None if anchor is None else float(f"{anchor:.4g}"),
           "ratio": None if not anchor else round(ours / anchor, 2)}
    row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()})
    return row


# --- the LM group -----------------------------------------------------------------------------------

def bench_matmul(ctx: BenchContext) -> list[dict[str, Any]]:
    measure_peaks(ctx)
    return [_row(f"matmul {dtype} {label}", "TFLOP/s", rate / 1e12, None)
            for dtype, label, rate in ctx.peak_rows]  # type: ignore[attr-defined]


def bench_lm(ctx: BenchContext) -> list[dict[str, Any]]:
    """LM training step and forward-only harvest, ours (bf16, fused unembedding + CE) against the anchor's
    faithful fp32 re-creation, at the anchor's config (vocab 50,304, context 128, batch 32 and more)."""
    rows = []
    for i, batch in enumerate((32,) if ctx.quick else (32, 64)):
        rows += _bench_lm_batch(ctx, batch, forward_too=i == 0)
    return rows


def _bench_lm_batch(ctx: BenchContext, batch: int, forward_too: bool) -> list[dict[str, Any]]:
    from .anchor_reference import AnchorTransformer, anchor_train_step
    from .lm import LMConfig, Transformer

    repeat = 2 if ctx.quick else 3
    torch.manual_seed(0)
    # the anchor's exact architecture (its quirks: no W_O, 1/sqrt(d_model)); the standard form adds 0.25% FLOPs
    cfg = LMConfig(batch_size=batch, anchor_quirks=True, loss_chunk=batch * 128 if ctx.device.type == "cuda" else 128)
    dtype = str(cfg.compute_dtype(ctx.device)).removeprefix("torch.")  # what `auto` picks on this machine
    peak, anchor_peak = ctx.peak(dtype), ctx.peak("float32")
    ours = Transformer(cfg).to(ctx.device)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=5e-4, fused=True)
    anchor = AnchorTransformer().to(ctx.device)
    anchor_opt = torch.optim.AdamW(anchor.parameters(), lr=5e-4)
    x = torch.randint(0, 50257, (batch, 128), device=ctx.device)
    y = torch.randint(0, 50257, (batch, 128), device=ctx.device)

    def train_step(model: Transformer, opt: torch.optim.Optimizer) -> Callable[[], float]:
        def step() -> float:
            loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    ours_step = train_step(ours, ours_opt)
    ours_step()  # compiles the fused softmax kernel (cached on disk afterwards)
    t_ours, t_anchor = time_pair(ours_step, lambda: anchor_train_step(anchor, anchor_opt, x, y), ctx.device,
                                 repeat=repeat)
    tokens = batch * 128
    f_ours, f_anchor = ours.flops_per_token(), model_flops_per_token(anchor, 128, 128)
    rows = [_row(f"lm train step, batch {batch}", "tokens/s", tokens / t_ours, tokens / t_anchor,
                 ours_mfu=tokens / t_ours * f_ours / peak, anchor_mfu=tokens / t_anchor * f_anchor / anchor_peak,
                 ours_dtype=dtype, anchor_dtype="float32", flops_per_token=f_ours)]
    if forward_too and not ctx.quick:
        # where the gain comes from: the same model and dtype but the plain logits + F.cross_entropy
        plain = Transformer(cfg.replace(loss_chunk=0)).to(ctx.device)
        plain_step = train_step(plain, torch.optim.AdamW(plain.parameters(), lr=5e-4, fused=True))
        t_plain, t_anchor2 = time_pair(plain_step, lambda: anchor_train_step(anchor, anchor_opt, x, y), ctx.device,
                                       repeat=repeat)
        rows.append(_row(f"lm train step, batch {batch}, {dtype} without the fused loss", "tokens/s",
                         tokens / t_plain, tokens / t_anchor2, ours_mfu=tokens / t_plain * f_ours / peak,
                         anchor_mfu=tokens / t_anchor2 * f_anchor / anchor_peak, ours_dtype=dtype,
                         anchor_dtype="float32", note=f"ablation: {dtype}, logits + F.cross_entropy"))
        del plain, plain_step  # the step holds its optimizer
    if forward_too:
        ours.eval()
        anchor.eval()
        with torch.no_grad():
            t_ours, t_anchor = time_pair(lambda: ours.run_with_cache(x, ["blocks.0.mlp.hook_post"]),
                                         lambda: anchor.forward_embedding(x), ctx.device, repeat=repeat + 2)
            rows.append(_row(f"lm forward to MLP activations (harvest), batch {batch}", "tokens/s",
                             tokens / t_ours, tokens / t_anchor, ours_dtype=dtype, anchor_dtype="float32",
                             note="stops after blocks.0.mlp.hook_post; no unembedding"))
            t_ours, t_anchor = time_pair(lambda: ours(x, y), lambda: anchor(x, y), ctx.device, repeat=repeat)
        f_fwd, f_fwd_anchor = ours.flops_per_token(train=False), model_flops_per_token(anchor, 128, 128, train=False)
        rows.append(_row(f"lm forward with loss, batch {batch}", "tokens/s", tokens / t_ours, tokens / t_anchor,
                         ours_mfu=tokens / t_ours * f_fwd / peak,
                         anchor_mfu=tokens / t_anchor * f_fwd_anchor / anchor_peak, ours_dtype=dtype,
                         anchor_dtype="float32"))
    return rows


# --- the SAE group ----------------------------------------------------------------------------------

def bench_sae(ctx: BenchContext, d_in: int = 512, n_features: int = 4096, batch: int = 896,
              big_batch: int = 8192, lm_in_loop: bool = True) -> list[dict[str, Any]]:
    """SAE training steps, ours (:func:`monosemantic.sae.train_step`: fused Adam, bf16 where the machine
    has bf16 units, the TopK encoder's sparse backward) against the anchor's faithful fp32 step
    (:func:`monosemantic.anchor_reference.anchor_sae_step`) at its setting, 512 -> 4096, batch 896. The
    sizes are parameters so that the tests can run the group at a tiny size."""
    from . import sae as S
    from .anchor_reference import anchor_sae_step, make_anchor_sae

    relu = S.SAEConfig(d_in=d_in, n_features=n_features, batch_size=batch, dtype="auto")
    dtype_name = str(relu.compute_dtype(ctx.device)).removeprefix("torch.")
    peak, anchor_peak = ctx.peak(dtype_name), ctx.peak("float32")
    repeat, warmup = (3, 1) if ctx.quick else (9, 2)
    flops = 6 * d_in * n_features  # per activation: a dense step's forward + backward, both sides alike
    note = (f"MFU counts every step as a dense one, 6 B d_in n_features = {flops / 1e6:.3g} MFLOP per activation "
            "(the work the anchor's step does), over this machine's matmul peak in the dtype each side uses")
    torch.manual_seed(0)
    anchor, anchor_opt = make_anchor_sae(d_in, n_features)
    anchor.to(ctx.device)
    g = torch.Generator().manual_seed(0)
    x_small = torch.randn(batch, d_in, generator=g).relu().to(ctx.device)  # MLP activations are >= 0
    x_big = torch.randn(big_batch, d_in, generator=g).relu().to(ctx.device)

    def ours_step(cfg: S.SAEConfig, x: torch.Tensor, dead_fraction: float = 0.0) -> Callable[[], float]:
        sae = S.SAE(cfg).to(ctx.device)
        opt = S.make_optimizer(sae)
        dtype = cfg.compute_dtype(ctx.device)
        dead = None
        if cfg.architecture == "topk":  # the anchor's runs had 30-40% dead latents: AuxK has work to do
            dead = torch.rand(n_features, generator=g) < dead_fraction
            dead = dead.to(ctx.device)

        def step() -> float:
            return float(S.train_step(sae, opt, x, dead, dtype).loss.detach())  # the loss read back, as the anchor does
        return step

    def anchor_step() -> float:
        return anchor_sae_step(anchor, anchor_opt, x_small)

    k = max(1, min(32, n_features // 8))
    topk = relu.replace(architecture="topk", k=k, aux_k=min(512, n_features // 2))
    cases = [
        (f"sae train step relu+L1 {d_in}->{n_features}, batch {batch}", ours_step(relu, x_small), batch, {}),
        (f"sae train step topk k={k} + AuxK (35% dead), batch {batch}", ours_step(topk, x_small, 0.35), batch,
         {"ours_arch": "topk"}),
        (f"sae train step topk k={k}, no dead latents (AuxK idle), batch {batch}", ours_step(topk, x_small, 0.0),
         batch, {"ours_arch": "topk"}),
        (f"sae train step relu+L1, ours batch {big_batch} vs anchor batch {batch}",
         ours_step(relu.replace(batch_size=big_batch), x_big), big_batch, {"ours_batch": big_batch}),
    ]
    rows = []
    for name, fn, n_ours, extra in cases:
        t_ours, t_anchor = time_pair(fn, anchor_step, ctx.device, repeat=repeat, warmup=warmup)
        ours_rate, anchor_rate = n_ours / t_ours, batch / t_anchor
        rows.append(_row(name, "activations/s", ours_rate, anchor_rate, ours_mfu=ours_rate * flops / peak,
                         anchor_mfu=anchor_rate * flops / anchor_peak, ours_dtype=dtype_name,
                         anchor_dtype="float32", anchor_batch=batch, note=note, **extra))
    if lm_in_loop:
        rows.append(_bench_fused(ctx, relu, anchor, anchor_opt, batch))
    return rows


def _bench_fused(ctx: BenchContext, relu, anchor_sae, anchor_opt, batch: int, seq: int = 128) -> dict[str, Any]:
    """Harvest and train fused, the language model in the loop: ours runs the model on batch / seq windows
    and trains on every position (what `harvest` does, without the disk); the anchor's loop runs its fp32
    model on ``batch`` sequences and keeps one random position of each (its recipe), then takes its step."""
    from . import sae as S
    from .anchor_reference import AnchorTransformer, anchor_sae_step
    from .harvest import HOOK
    from .lm import LMConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(LMConfig(anchor_quirks=True)).to(ctx.device).eval()
    anchor_lm = AnchorTransformer().to(ctx.device).eval()
    sae = S.SAE(relu).to(ctx.device)
    opt = S.make_optimizer(sae)
    dtype = relu.compute_dtype(ctx.device)
    g = torch.Generator().manual_seed(1)
    ours_x = torch.randint(0, 50257, (max(1, batch // seq), seq), generator=g).to(ctx.device)
    anchor_x = torch.randint(0, 50257, (batch, seq), generator=g).to(ctx.device)
    def ours() -> float:
        acts = model.run_with_cache(ours_x, [HOOK])[HOOK].reshape(-1, relu.d_in)  # (batch, 512)
        return float(S.train_step(sae, opt, acts, None, dtype).loss.detach())

    def theirs() -> float:
        with torch.no_grad():
            h = anchor_lm.forward_embedding(anchor_x)  # (batch, seq, 512): every position computed ...
        pos = torch.randint(0, seq, (batch,), generator=g).to(ctx.device)
        return anchor_sae_step(anchor_sae, anchor_opt, h[torch.arange(batch), pos])  # ... one of each kept

    t_ours, t_anchor = time_pair(ours, theirs, ctx.device, repeat=2, warmup=1)
    n_ours = ours_x.numel()
    return _row(f"sae harvest + train fused (model in the loop), batch {batch}", "activations/s", n_ours / t_ours,
                batch / t_anchor, ours_dtype=str(dtype).removeprefix("torch."), anchor_dtype="float32",
                note=f"ours: {ours_x.shape[0]} windows of {seq}, every position; anchor: {batch} sequences, one "
                     "random position each (its recipe)")

# --- the numerics group -----------------------------------------------------------------------------

def _train_lm_steps(device: torch.device, steps: int, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """A small one-layer LM trained ``steps`` AdamW steps on fixed Zipf-distributed token batches; the last
    loss and the weights (on the CPU). Same seed and data on every device."""
    from .lm import LMConfig, Transformer

    cfg = LMConfig(vocab_size=2048, context_length=64, d_model=64, n_heads=4, d_mlp=256, batch_size=16, compile=False,
                   loss_chunk=1024 if device.type == "cuda" else 128)
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, 2049, dtype=torch.float64)  # a rank-frequency law, so the loss can fall
    loss = torch.zeros(())
    for _ in range(steps):
        tokens = torch.multinomial(zipf, 16 * 65, replacement=True, generator=g).view(16, 65).to(device)
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item(), {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def _train_sae_steps(device: torch.device, steps: int, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """A TopK SAE 256 -> 2048 trained ``steps`` steps on fixed synthetic sparse data; its FVU and weights."""
    from . import sae as S

    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(1024, 256, generator=g), dim=-1)
    codes = torch.rand(8192, 1024, generator=g) * (torch.rand(8192, 1024, generator=g) < 0.01)
    x = codes @ dirs
    cfg = S.SAEConfig(d_in=256, n_features=2048, architecture="topk", k=16, batch_size=512, n_steps=steps,
                      resample_every=0, dtype="auto", seed=seed, log_every=steps)
    res = S.train(cfg, x, device=device, progress=False)
    sae = res.sae.float()
    with torch.no_grad():
        xd = x.to(device)
        fvu = float(((sae(xd).recon - xd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    return fvu, {k: v.detach().float().cpu() for k, v in sae.state_dict().items()}


def _rel_l2_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of any weight tensor, ||a - b|| / ||a|| (Frobenius norms)."""
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a)


def bench_numerics(ctx: BenchContext, lm_steps: int = 30, sae_steps: int = 60) -> list[dict[str, Any]]:
    """Not a speed: how far the same training (same seed, same data, the dtype our configs pick on each
    device) lands on this device from the CPU, and from itself when run again. On a CPU-only machine both
    sides are the CPU, so the rows say whether runs repeat exactly."""
    rows = []
    cpu = torch.device("cpu")
    for what, fn, steps, metric in (("lm", _train_lm_steps, lm_steps, "loss"),
                                    ("sae", _train_sae_steps, sae_steps, "FVU")):
        ref_metric, ref_w = fn(cpu, steps)
        dev_metric, dev_w = fn(ctx.device, steps)
        again_metric, again_w = fn(ctx.device, steps)
        where = f"{ctx.device.type} vs cpu" if ctx.device.type != "cpu" else "cpu vs cpu"
        rows.append(_row(f"numerics {what} {steps} steps: {metric} {where}", "abs diff", abs(dev_metric - ref_metric),
                         None, cpu_value=round(ref_metric, 6), device_value=round(dev_metric, 6)))
        rows.append(_row(f"numerics {what} {steps} steps: weights {where}", "rel L2 diff",
                         _rel_l2_diff(ref_w, dev_w), None))
        rows.append(_row(f"numerics {what} {steps} steps: {metric} {ctx.device.type} run to run", "abs diff",
                         abs(again_metric - dev_metric), None))
        rows.append(_row(f"numerics {what} {steps} steps: weights {ctx.device.type} run to run", "rel L2 diff",
                         _rel_l2_diff(dev_w, again_w), None))
        if ctx.device.type == "cuda":  # the same twice with PyTorch's deterministic kernels only
            try:
                torch.use_deterministic_algorithms(True)
                (m1, w1), (m2, w2) = fn(ctx.device, steps), fn(ctx.device, steps)
                rows.append(_row(f"numerics {what} {steps} steps: weights cuda run to run, deterministic "
                                 "algorithms", "rel L2 diff", _rel_l2_diff(w1, w2), None,
                                 metric_diff=abs(m1 - m2)))
            except RuntimeError as e:  # an op without a deterministic CUDA kernel
                rows.append({"name": f"numerics {what}: deterministic algorithms", "unit": "rel L2 diff",
                             "ours": None, "anchor": None, "ratio": None, "note": " ".join(str(e).split())[:160]})
            finally:
                torch.use_deterministic_algorithms(False)
    return rows


# Groups of rows, each written as one artifact. Add yours here.
BENCHES: list[tuple[str, Callable[[BenchContext], list[dict[str, Any]]]]] = [
    ("matmul", bench_matmul),
    ("lm", bench_lm),
    ("sae", bench_sae),
    ("numerics", bench_numerics),
]


def write_results(group: str, rows: list[dict[str, Any]], ctx: BenchContext, seconds: float) -> str:
    """Merge this group's rows into the machine's one artifact, ``cache/bench/<hardware slug>/results.json``
    (the slug starts with ``cpu-`` or ``gpu-``, which the store reads as the profile): rows of other groups,
    measured in earlier runs, are kept; this group's old rows are replaced."""
    import json

    from . import hardware, store

    profile, name = hardware.slug().split("-", 1)
    group = group + ("-quick" if ctx.quick else "")
    kept, info = [], {}
    try:
        old = store.load("bench", profile, name)
        kept = [r for r in json.loads(old.file("results.json").read_text()) if r.get("group") != group]
        info = old.manifest.get("info", {})
    except store.CacheError:
        pass  # first bench on this machine, or a damaged one: start afresh
    rows = kept + [{"group": group, **r} for r in rows]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    groups = sorted({r["group"] for r in rows})
    with store.write("bench", profile, name, command="make bench",
                     config={"groups": groups, "threads": ctx.threads, "device": str(ctx.device)}) as w:
        (w.dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        w.metrics.update({f"{r['name']} ratio": r["ratio"] for r in rows if r.get("ratio") is not None})
        info.setdefault("groups", {})[group] = {
            "load_average_at_start": load, "seconds": round(seconds, 1),
            "peaks_tflops": {k: round(v / 1e12, 3) for k, v in ctx.peaks.items()}}
        w.info.update(info)
    return str(store.artifact_path("bench", profile, name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (under a minute)")
    p.add_argument("--only", help="comma-separated groups to run (default: all: "
                   + ", ".join(g for g, _ in BENCHES) + ")")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--no-write", action="store_true", help="print the rows, write nothing")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        extra = "  ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "unit", "ours", "anchor", "ratio"))
        anchor = "" if r["anchor"] is None else f"  anchor {r['anchor']:>10,.4g}  ratio {r['ratio']:>5}"
        ours = "-" if r["ours"] is None else f"{r['ours']:,.4g}"
        print(f"  {r['name']:<52} ours {ours:>10} {r['unit']:<9}{anchor}  {extra}")


def run(args: argparse.Namespace) -> int:
    from .config import UserError

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = BenchContext(quick=args.quick, device=device, threads=torch.get_num_threads())
    groups = dict(BENCHES)
    chosen = args.only.split(",") if args.only else list(groups)
    unknown = [g for g in chosen if g not in groups]
    if unknown:
        raise UserError(f"unknown bench group(s) {', '.join(unknown)}; known: {', '.join(groups)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"bench on {device} ({ctx.threads} threads), load average {load:.2f}"
          + ("  (the machine is busy: ratios hold, absolute numbers are low)" if load > ctx.threads * 0.5 else ""))
    for group in chosen:
        start = time.perf_counter()
        rows = groups[group](ctx)
        print(f"{group}:")
        _print_rows(rows)
        if not args.no_write:
            print(f"  -> {write_results(group, rows, ctx, time.perf_counter() - start)}")
    return 0


# --- every stage on a GPU against the same machine's CPU (scripts/gpu-tiny-check) ---------------------------

PIPELINE_CHECK = {  # stage artifact -> the metrics compared
    "lm/tiny-model": ("val_loss", "train_loss"),
    "sae/tiny-topk": ("fvu", "ce_loss_recovered", "dead_fraction"),
    "sae/tiny-anchor": ("fvu", "l0", "ce_loss_recovered"),
    "analysis/tiny-features": ("median_explain_corr_neurons", "scored_neurons"),
    "diff/tiny-finetune-numpy-docs": ("crosscoder_live", "crosscoder_fvu_mix_base"),
}


def pipeline_check_rows(gpu_root, cpu_root) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``{artifact, metric, gpu, cpu, difference}`` comparing two caches made by the same tiny pipeline
    on a GPU and on the CPU (``scripts/gpu-tiny-check``), and the GPU run's hardware. A stage missing from
    either cache raises: the check is that every stage ran on both."""
    import json
    from pathlib import Path

    from .config import UserError

    rows, hardware = [], {}
    for key, names in PIPELINE_CHECK.items():
        found = {}
        for side, root in (("gpu", gpu_root), ("cpu", cpu_root)):
            path = Path(root) / key / "manifest.json"
            if not path.is_file():
                raise UserError(f"{key} is missing from the {side} cache {root}: that stage failed there "
                                f"(see its log from scripts/gpu-tiny-check)")
            found[side] = json.loads(path.read_text())
        hardware = hardware or found["gpu"]["hardware"]
        for m in names:
            g, c = found["gpu"]["metrics"][m], found["cpu"]["metrics"][m]
            rows.append({"artifact": key, "metric": m, "gpu": g, "cpu": c, "difference": g - c,
                         "gpu_wall_s": found["gpu"].get("wall_time_s"), "cpu_wall_s": found["cpu"].get("wall_time_s")})
    return rows, hardware


def store_pipeline_check(gpu_root, cpu_root) -> str:
    """Write ``gpucheck/tiny-<gpu>`` from :func:`pipeline_check_rows` (its own stage: ``bench/`` holds the
    speed rows of ``make bench``)."""
    import json

    from . import hardware as hw
    from . import store

    rows, hardware = pipeline_check_rows(gpu_root, cpu_root)
    gpu = hardware.get("gpu") or "gpu"
    name = hw.slug_text(gpu)
    with store.write("gpucheck", "tiny", name, command="scripts/gpu-tiny-check",
                     config={"stages": sorted(PIPELINE_CHECK), "profile": "tiny"}) as w:
        (w.dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        w.wall_time_s = sum({r["artifact"]: r["gpu_wall_s"] or 0.0 for r in rows}.values())  # the GPU side's
        w.metrics["stages"] = len(PIPELINE_CHECK)
        w.metrics["largest_relative_difference"] = max(
            abs(r["difference"]) / max(abs(r["cpu"]), 1e-12) for r in rows)
        w.info["gpu_hardware"] = hardware
    return str(store.artifact_path("gpucheck", "tiny", name))
