"""``monosemantic bench`` (``make bench``): our throughput side by side with the anchor's, same machine,
same run, plus this machine's matmul peak and each step's model FLOPs utilisation (MFU).

Each group of measurements is a generator in :data:`BENCHES` that yields rows
``{name, unit, ours, anchor, ratio, seconds, ...}`` (``ratio`` = ours / anchor, > 1 is faster) one by one as
they are measured, and the command prints each as it comes. A group is written into one artifact per
machine, ``cache/bench/<hardware slug>/results.json``: the slug starts with ``cpu-`` or ``gpu-`` and, for a
CPU, ends with its vector instruction set (:func:`monosemantic.hardware.slug`), so an AVX2 and an AVX-512
machine of the same model keep their own. To add a group, write
``def bench_xxx(ctx: BenchContext) -> Iterator[dict]`` and append ``("xxx", bench_xxx)`` to :data:`BENCHES`.

A row's name ends with what it ran on: ``[float32, 2 threads]`` = the dtype our side computes in (what the
configs' ``auto`` picks on this machine) and the CPU threads both sides used (or ``cuda``); the anchor's side
is always its fp32 code.

Timing: ours and the anchor's step alternate (ours, anchor, ours, anchor, ...) after a warm-up pair, until
``repeat`` pairs are done or the row's time budget is spent (at least one pair), and each side's median is
reported, so a machine that gets busier during the run slows both. Both sides run in the one process, under
the heap setting every command runs with (:func:`monosemantic.hardware.keep_freed_memory`). ``--quick``
uses smaller sizes and budgets and takes under a minute on 2 CPU cores; the default groups take under ten
minutes there.

FLOPs: a training token costs 6 N + 12 L d T model FLOPs (PaLM appendix B / nanoGPT), a forward token a
third of that; N = parameters in matrix multiplies (the attention, MLP and unembedding weights, no
embeddings, biases or norms), L = layers, d = d_model, T = context. At vocab 50,304 the unembedding is
97% of N. A dense SAE step costs 10 d_in n_features per activation: 6 N with N = 2 d_in n_features (encoder
and decoder) less the input gradient, which an SAE's input (data) does not need; both sides are counted so
(the anchor's autograd computes that gradient anyway, for its pre-encoder bias). A TopK step counts its
dense encoder forward, 2 d_in n_features, plus 8 d_in for each latent it uses (decode, and three gradient
products). MFU = model FLOPs per second / the best matmul rate this machine reaches in the dtype that side
computes in (measured here, over the steps' own shapes and a square 2048^3).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
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
    refresh_peaks: bool = True  # time a product again before each row (:meth:`fresh_peak`)

    def peak(self, dtype: str | torch.dtype) -> float:
        """Best measured matmul FLOP/s in ``dtype`` (the peak an MFU in that dtype is against)."""
        name = str(dtype).removeprefix("torch.")
        return self.peaks.get(name) or measure_peaks(self)[name]

    def fresh_peak(self, dtype: str | torch.dtype, shape: tuple[int, int, int] = (2048, 2048, 2048)) -> float:
        """:meth:`peak`, after timing one more product of ``shape`` now (best of 3): on a machine other work
        shares, the peak measured at the start may be from a busier moment than the row about to be timed
        (an MFU over 100% says so). An emulated dtype (under 0.1 TFLOP/s) is not timed again."""
        name = str(dtype).removeprefix("torch.")
        best = self.peak(name)
        if self.refresh_peaks and (best >= 1e11 or self.device.type == "cpu" and name == "float32"):
            m, k, n = shape
            dt = getattr(torch, name)
            a, b = torch.randn(m, k, dtype=dt, device=self.device), torch.randn(k, n, dtype=dt, device=self.device)
            c = torch.empty(m, n, dtype=dt, device=self.device)
            seconds = min(time_call(lambda: torch.mm(a, b, out=c), self.device, repeat=1, warmup=int(i == 0))
                          for i in range(3))
            self.peaks[name] = best = max(best, 2 * m * k * n / seconds)
        return best

    @property
    def budget_s(self) -> float:
        """Seconds of timed pairs a row may take after its warm-up (it always gets one pair)."""
        return 3.0 if self.quick else 20.0

    def tag(self, dtype: str | torch.dtype) -> str:
        """What a row ran on, for its name: ``[float32, 2 threads]`` (ours computes in ``dtype``)."""
        where = "cuda" if self.device.type == "cuda" else f"{self.threads} thread{'s' * (self.threads != 1)}"
        return f"[{str(dtype).removeprefix('torch.')}, {where}]"


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
              warmup: int = 1, budget_s: float | None = None) -> tuple[float, float]:
    """Median seconds of two functions timed alternately (so both see the same machine): ``warmup`` pairs,
    then up to ``repeat`` timed pairs, stopping early once ``budget_s`` seconds have gone (at least one)."""
    for _ in range(warmup):
        ours()
        anchor()
    a, b = [], []
    start = time.perf_counter()
    for i in range(repeat):
        if i and budget_s is not None and time.perf_counter() - start > budget_s:
            break
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
    """Best matmul FLOP/s per dtype over the steps' shapes (the LM's unembedding products at a 1,024-token
    chunk, the SAE's encoder) and a square 2048^3: for each, the fastest of several runs (a peak is what the
    machine can do; a busy moment only slows some runs), into a reused output."""
    if ctx.peaks:
        return ctx.peaks
    shapes = {**matmul_shapes(1024), "sae encoder 896x512x4096": (896, 512, 4096), "square 2048": (2048, 2048, 2048)}
    if ctx.quick:
        shapes = {k: shapes[k] for k in ("dx = G W", "sae encoder 896x512x4096", "square 2048")}
    out: dict[str, float] = {}
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for label, (m, k, n) in shapes.items():
            # rows cut so that one product takes about a tenth of a second: an emulated bf16 (AVX2-only
            # CPUs, ~1 GFLOP/s) would otherwise spend minutes here; a probe of ~2e8 FLOPs gives the rate
            probe = max(8, min(m, int(2e8 / (2 * k * n))))
            b = torch.randn(k, n, dtype=dtype, device=ctx.device)
            a = torch.randn(probe, k, dtype=dtype, device=ctx.device)
            rate = 2 * probe * k * n / time_call(lambda a=a, b=b: a @ b, ctx.device, repeat=1)
            rows_used = min(m, max(probe, int(0.1 * rate / (2 * k * n))))
            a = torch.randn(rows_used, k, dtype=dtype, device=ctx.device)
            c = torch.empty(rows_used, n, dtype=dtype, device=ctx.device)  # reused: no page faults timed
            fast = dtype == torch.float32 or rate > 1e11  # an emulated bf16 gets fewer tries
            repeat = (3 if ctx.quick else 7) if fast else 2
            seconds = min(time_call(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), ctx.device, repeat=1, warmup=0)
                          for _ in range(repeat))
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


def _timed(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows, each with ``seconds``: the wall time from the previous row (its setup, warm-up and timing)."""
    start = time.perf_counter()
    for row in rows:
        now = time.perf_counter()
        yield {**row, "seconds": round(now - start, 1)}
        start = time.perf_counter()


# --- the LM group -----------------------------------------------------------------------------------

def bench_matmul(ctx: BenchContext) -> Iterator[dict[str, Any]]:
    measure_peaks(ctx)
    for dtype, label, rate in ctx.peak_rows:  # type: ignore[attr-defined]
        yield _row(f"matmul {label} {ctx.tag(dtype)}", "TFLOP/s", rate / 1e12, None, ours_dtype=dtype,
                   threads=ctx.threads)


def bench_lm(ctx: BenchContext) -> Iterator[dict[str, Any]]:
    """LM training step and forward-only harvest, ours (``Transformer`` in the dtype ``auto`` picks here,
    fused unembedding + CE) against the anchor's faithful fp32 re-creation, at the anchor's config (vocab
    50,304, context 128, batch 32 and 64; ``--quick``: batch 8)."""
    for i, batch in enumerate((8,) if ctx.quick else (32, 64)):
        yield from _bench_lm_batch(ctx, batch, extras=i == 0)


def _bench_lm_batch(ctx: BenchContext, batch: int, extras: bool) -> Iterator[dict[str, Any]]:
    from .anchor_reference import AnchorTransformer, anchor_train_step
    from .lm import LMConfig, Transformer

    repeat = 3 if ctx.quick else 5
    torch.manual_seed(0)
    # the anchor's exact architecture (its quirks: no W_O, 1/sqrt(d_model)); the standard form adds 0.25% FLOPs
    cfg = LMConfig(batch_size=batch, anchor_quirks=True, loss_chunk=batch * 128 if ctx.device.type == "cuda" else 128)
    dtype = str(cfg.compute_dtype(ctx.device)).removeprefix("torch.")  # what `auto` picks on this machine
    peak, anchor_peak = ctx.peak(dtype), ctx.peak("float32")
    tag = ctx.tag(dtype)
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

    def anchor_step() -> float:
        return anchor_train_step(anchor, anchor_opt, x, y)

    ours_step = train_step(ours, ours_opt)
    ours_step()  # bf16: compiles the fused softmax kernel (cached on disk afterwards)
    peak, anchor_peak = ctx.fresh_peak(dtype), ctx.fresh_peak("float32")
    t_ours, t_anchor = time_pair(ours_step, anchor_step, ctx.device, repeat=repeat, budget_s=ctx.budget_s)
    tokens = batch * 128
    f_ours, f_anchor = ours.flops_per_token(), model_flops_per_token(anchor, 128, 128)
    yield _row(f"lm train step, batch {batch} {tag}", "tokens/s", tokens / t_ours, tokens / t_anchor,
               ours_mfu=tokens / t_ours * f_ours / peak, anchor_mfu=tokens / t_anchor * f_anchor / anchor_peak,
               ours_dtype=dtype, anchor_dtype="float32", threads=ctx.threads, flops_per_token=f_ours,
               key=f"lm_train_b{batch}")
    if extras and not ctx.quick:
        # where the gain comes from: the same model and dtype but the plain logits + F.cross_entropy
        plain = Transformer(cfg.replace(loss_chunk=0)).to(ctx.device)
        plain_step = train_step(plain, torch.optim.AdamW(plain.parameters(), lr=5e-4, fused=True))
        t_plain, t_anchor2 = time_pair(plain_step, anchor_step, ctx.device, repeat=repeat, budget_s=ctx.budget_s)
        yield _row(f"lm train step, batch {batch}, without the fused loss {tag}", "tokens/s",
                   tokens / t_plain, tokens / t_anchor2, ours_mfu=tokens / t_plain * f_ours / peak,
                   anchor_mfu=tokens / t_anchor2 * f_anchor / anchor_peak, ours_dtype=dtype,
                   anchor_dtype="float32", threads=ctx.threads, note=f"ablation: {dtype}, logits + F.cross_entropy")
        del plain, plain_step  # the step holds its optimizer
    if extras:
        ours.eval()
        anchor.eval()
        with torch.no_grad():
            t_ours, t_anchor = time_pair(lambda: ours.run_with_cache(x, ["blocks.0.mlp.hook_post"]),
                                         lambda: anchor.forward_embedding(x), ctx.device, repeat=repeat + 2,
                                         budget_s=ctx.budget_s / 2)
            yield _row(f"lm forward to MLP activations (harvest), batch {batch} {tag}", "tokens/s",
                       tokens / t_ours, tokens / t_anchor, ours_dtype=dtype, anchor_dtype="float32",
                       threads=ctx.threads, note="stops after blocks.0.mlp.hook_post; no unembedding")
            t_ours, t_anchor = time_pair(lambda: ours(x, y), lambda: anchor(x, y), ctx.device, repeat=repeat,
                                         budget_s=ctx.budget_s / 2)
        f_fwd, f_fwd_anchor = ours.flops_per_token(train=False), model_flops_per_token(anchor, 128, 128, train=False)
        yield _row(f"lm forward with loss, batch {batch} {tag}", "tokens/s", tokens / t_ours, tokens / t_anchor,
                   ours_mfu=tokens / t_ours * f_fwd / peak,
                   anchor_mfu=tokens / t_anchor * f_fwd_anchor / anchor_peak, ours_dtype=dtype,
                   anchor_dtype="float32", threads=ctx.threads)


# --- the SAE group ----------------------------------------------------------------------------------

def bench_sae(ctx: BenchContext, d_in: int = 512, n_features: int = 4096, batch: int = 896,
              topk_batch: int = 1024, k: int = 24, big_batch: int = 8192, lm_in_loop: bool = True,
              density_features: int | None = 32768, density_rows: int | None = None) -> Iterator[dict[str, Any]]:
    """SAE training steps, ours (:func:`monosemantic.sae.train_step`: fused Adam, the dtype ``auto`` picks,
    the ReLU step's hand-written backward, the TopK step's sparse one) against the anchor's faithful fp32
    step (:func:`monosemantic.anchor_reference.anchor_sae_step`) at its setting, 512 -> 4096, batch 896; our
    TopK at the cpu profile's setting (k = 24, batch 1,024) with AuxK idle, at 5% dead latents (what a
    trained TopK SAE has) and at 35% (the anchor's literal runs), each also against our dense step
    (``vs_dense``), and that step's floor (:func:`_topk_floor`); then feature density over a wide dictionary
    (``density_features``). The sizes are parameters so that
    the tests can run the group at a tiny size."""
    from . import sae as S
    from .anchor_reference import anchor_sae_step, make_anchor_sae

    relu = S.SAEConfig(d_in=d_in, n_features=n_features, batch_size=batch, dtype="auto")
    dtype_name = str(relu.compute_dtype(ctx.device)).removeprefix("torch.")
    peak, anchor_peak = ctx.peak(dtype_name), ctx.peak("float32")
    tag = ctx.tag(dtype_name)
    repeat, warmup = (4, 1) if ctx.quick else (25, 3)  # a step is ~0.1 s: many pairs steady the medians
    # model FLOPs per activation of a dense step: forward 4 d_in n (encoder, decoder), backward 6 d_in n (both
    # weight gradients and the latents' gradient; the input is data and needs none): both sides alike
    flops = 10 * d_in * n_features
    note = (f"MFU counts a dense step's 10 d_in n_features = {flops / 1e6:.3g} MFLOP per activation (forward 4, "
            "backward 6: weight and latent gradients, no input gradient) on both sides; for TopK, the dense "
            "encoder forward that picks the k, 2 d_in n_features, plus 8 d_in per latent used (k, and AuxK's); "
            "over this machine's matmul peak in the dtype each side uses")
    torch.manual_seed(0)
    anchor, anchor_opt = make_anchor_sae(d_in, n_features)
    anchor.to(ctx.device)
    g = torch.Generator().manual_seed(0)
    x_small = torch.randn(batch, d_in, generator=g).relu().to(ctx.device)  # MLP activations are >= 0
    x_topk = torch.randn(topk_batch, d_in, generator=g).relu().to(ctx.device)
    x_big = torch.randn(big_batch, d_in, generator=g).relu().to(ctx.device)

    def ours_step(cfg: S.SAEConfig, x: torch.Tensor, dead_fraction: float = 0.0) -> tuple[Callable[[], float], int]:
        """The step, and its model FLOPs per activation."""
        sae = S.SAE(cfg).to(ctx.device)
        opt = S.make_optimizer(sae)
        dtype = cfg.compute_dtype(ctx.device)
        dead, step_flops = None, flops
        if cfg.architecture == "topk":  # the anchor's runs had 30-40% dead latents: AuxK has work to do
            dead = (torch.rand(n_features, generator=g) < dead_fraction).to(ctx.device)
            k_aux = min(cfg.aux_k, int(dead.sum()))
            step_flops = 2 * d_in * n_features + 8 * d_in * (cfg.k + k_aux)

        def step() -> float:
            return float(S.train_step(sae, opt, x, dead, dtype).loss.detach())  # the loss read back, as the anchor does
        return step, step_flops

    def anchor_step() -> float:
        return anchor_sae_step(anchor, anchor_opt, x_small)

    k = max(1, min(k, n_features // 8))
    topk = relu.replace(architecture="topk", k=k, aux_k=min(512, n_features // 2), batch_size=topk_batch)
    topk_note = {"ours_arch": "topk", "vs_dense_note": "vs_dense: this step's activations/s over our dense "
                 "ReLU + L1 step's (the first row)"}
    cases = [
        (f"sae train step relu+L1 {d_in}->{n_features}, batch {batch} {tag}", ours_step(relu, x_small), batch,
         {"key": "sae_relu"}),
        (f"sae train step topk k={k}, no dead latents (AuxK idle), batch {topk_batch} {tag}",
         ours_step(topk, x_topk, 0.0), topk_batch, {**topk_note, "key": "sae_topk_idle"}),
        # what a trained TopK SAE has: our cpu-topk run ended its training with 4.9% of its latents dead
        (f"sae train step topk k={k} + AuxK (5% dead), batch {topk_batch} {tag}",
         ours_step(topk, x_topk, 0.05), topk_batch, {**topk_note, "key": "sae_topk_dead5"}),
        # the anchor's literal runs had 30-40% dead: AuxK's aux_k = 512 picks of ~1,400 dead columns per input
        (f"sae train step topk k={k} + AuxK (35% dead), batch {topk_batch} {tag}",
         ours_step(topk, x_topk, 0.35), topk_batch, {**topk_note, "key": "sae_topk_dead35"}),
    ]
    if not ctx.quick:
        cases.append((f"sae train step relu+L1, ours batch {big_batch} vs anchor batch {batch} {tag}",
                      ours_step(relu.replace(batch_size=big_batch), x_big), big_batch, {"ours_batch": big_batch}))
    dense_rate = None
    for name, (fn, ours_flops), n_ours, extra in cases:
        peak, anchor_peak = ctx.fresh_peak(dtype_name, (batch, d_in, n_features)), ctx.fresh_peak("float32")
        t_ours, t_anchor = time_pair(fn, anchor_step, ctx.device, repeat=repeat, warmup=warmup,
                                     budget_s=ctx.budget_s / 2)
        ours_rate, anchor_rate = n_ours / t_ours, batch / t_anchor
        dense_rate = dense_rate or ours_rate
        if extra.get("ours_arch") == "topk":
            extra = {**extra, "vs_dense": round(ours_rate / dense_rate, 2)}
        yield _row(name, "activations/s", ours_rate, anchor_rate, ours_mfu=ours_rate * ours_flops / peak,
                   anchor_mfu=anchor_rate * flops / anchor_peak, ours_dtype=dtype_name, anchor_dtype="float32",
                   threads=ctx.threads, anchor_batch=batch, ours_flops_per_activation=ours_flops, note=note,
                   **extra)
    yield _topk_floor(ctx, topk, x_topk, dense_rate, tag, dtype_name)
    if lm_in_loop:
        yield _bench_fused(ctx, relu, anchor, anchor_opt, batch)
    if density_features:
        yield _bench_density(ctx, d_in, density_features, density_rows or (2048 if ctx.quick else 8192))


def _topk_floor(ctx: BenchContext, cfg, x: torch.Tensor, dense_rate: float, tag: str, dtype_name: str) -> dict:
    """The part of a TopK step no sparse kernel can remove, timed alone: the dense encoder product that
    picks the k, the top-k itself, the dense Adam update of every weight and the decoder's renormalisation
    (with no backward at all). Its rate over the dense step's (``vs_dense``) is the most a TopK step can
    gain on this machine with these kernels."""
    from . import sae as S

    sae = S.SAE(cfg).to(ctx.device)
    opt = S.make_optimizer(sae)
    for p in sae.parameters():
        p.grad = torch.zeros_like(p)
    dtype = cfg.compute_dtype(ctx.device)
    w_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()

    def floor() -> None:
        with torch.no_grad():
            pre = torch.addmm(b_enc.to(dtype), (x - sae.b_dec).to(dtype), w_enc.to(dtype))  # (B, n)
            pre.topk(cfg.k, dim=1, sorted=False)
        opt.step()
        sae.normalize_decoder()

    seconds = time_call(floor, ctx.device, repeat=3 if ctx.quick else 9, warmup=1)
    rate = x.shape[0] / seconds
    return _row(f"sae topk k={cfg.k} floor: encoder product + top-k + Adam + renorm, batch {x.shape[0]} {tag}",
                "activations/s", rate, None, ours_dtype=dtype_name, threads=ctx.threads, ours_arch="topk",
                vs_dense=round(rate / dense_rate, 2), key="sae_topk_floor",
                note="no backward: the bound on a TopK step's speed-up over the dense step with these kernels")


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

    # quick: no warm-up pair (the anchor's side runs its model on 896 x 128 tokens for 896 activations)
    t_ours, t_anchor = time_pair(ours, theirs, ctx.device, repeat=1 if ctx.quick else 3, warmup=int(not ctx.quick),
                                 budget_s=ctx.budget_s / 2)
    n_ours = ours_x.numel()
    dtype_name = str(dtype).removeprefix("torch.")
    return _row(f"sae harvest + train fused (model in the loop), batch {batch} {ctx.tag(dtype_name)}",
                "activations/s", n_ours / t_ours, batch / t_anchor, ours_dtype=dtype_name, anchor_dtype="float32",
                threads=ctx.threads, note=f"ours: {ours_x.shape[0]} windows of {seq}, every position; anchor: "
                f"{batch} sequences, one random position each (its recipe)")


def _bench_density(ctx: BenchContext, d_in: int, n_features: int, n_rows: int) -> dict[str, Any]:
    """Feature density (the fraction of rows each feature fires on) of a wide ReLU SAE:
    :func:`monosemantic.metrics.feature_fires` against the anchor's way (neuron_resampling.ipynb, cell 11:
    encode batches of 896 with its nn.Linear SAE, concatenate the dense latents, ``(f > 0).float().mean(0)``)."""
    from . import metrics
    from . import sae as S
    from .anchor_reference import AnchorSparseAutoencoder

    torch.manual_seed(0)
    anchor = AnchorSparseAutoencoder(d_in, n_features).to(ctx.device)
    sae = S.SAE(S.SAEConfig(d_in=d_in, n_features=n_features)).to(ctx.device)
    rows = torch.randn(n_rows, d_in, generator=torch.Generator().manual_seed(2)).relu().to(ctx.device)

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            f = torch.cat([anchor.encode(b) for b in rows.split(896)])  # (N, n_features)
            return (f > 0).to(torch.float32).mean(dim=0)

    t_ours, t_anchor = time_pair(lambda: metrics.feature_fires(sae, rows), theirs, ctx.device, repeat=3,
                                 warmup=0, budget_s=ctx.budget_s / 2)
    flops = 2 * d_in * n_features  # per row: the encoder product, both sides
    rate, anchor_rate = n_rows / t_ours, n_rows / t_anchor
    ctx.fresh_peak("float32")
    return _row(f"feature density, {n_features:,} features {ctx.tag('float32')}", "rows/s", rate, anchor_rate,
                ours_mfu=rate * flops / ctx.peak("float32"), anchor_mfu=anchor_rate * flops / ctx.peak("float32"),
                ours_dtype="float32", anchor_dtype="float32", threads=ctx.threads, rows=n_rows,
                seconds_per_million_rows=round(1e6 / rate), key="density_wide",
                note=f"{n_rows:,} rows of {d_in}; MFU counts the encoder product, 2 d_in n_features per row")


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


def bench_numerics(ctx: BenchContext, lm_steps: int = 30, sae_steps: int = 60) -> Iterator[dict[str, Any]]:
    """Not a speed: how far the same training (same seed, same data, the dtype our configs pick on each
    device) lands on this device from the CPU, and from itself when run again. On a CPU-only machine both
    sides are the CPU (trained once for both), so the rows say whether runs repeat exactly."""
    cpu = torch.device("cpu")
    if ctx.quick:
        lm_steps, sae_steps = min(lm_steps, 10), min(sae_steps, 20)
    for what, fn, steps, metric in (("lm", _train_lm_steps, lm_steps, "loss"),
                                    ("sae", _train_sae_steps, sae_steps, "FVU")):
        ref_metric, ref_w = fn(cpu, steps)
        dev_metric, dev_w = fn(ctx.device, steps) if ctx.device.type != "cpu" else (ref_metric, ref_w)
        again_metric, again_w = fn(ctx.device, steps)
        where = f"{ctx.device.type} vs cpu" if ctx.device.type != "cpu" else "cpu vs cpu"
        yield _row(f"numerics {what} {steps} steps: {metric} {where}", "abs diff", abs(dev_metric - ref_metric),
                   None, cpu_value=round(ref_metric, 6), device_value=round(dev_metric, 6))
        yield _row(f"numerics {what} {steps} steps: weights {where}", "rel L2 diff", _rel_l2_diff(ref_w, dev_w), None)
        yield _row(f"numerics {what} {steps} steps: {metric} {ctx.device.type} run to run", "abs diff",
                   abs(again_metric - dev_metric), None)
        yield _row(f"numerics {what} {steps} steps: weights {ctx.device.type} run to run", "rel L2 diff",
                   _rel_l2_diff(dev_w, again_w), None)
        if ctx.device.type == "cuda":  # the same twice with PyTorch's deterministic kernels only
            try:
                torch.use_deterministic_algorithms(True)
                (m1, w1), (m2, w2) = fn(ctx.device, steps), fn(ctx.device, steps)
                yield _row(f"numerics {what} {steps} steps: weights cuda run to run, deterministic algorithms",
                           "rel L2 diff", _rel_l2_diff(w1, w2), None, metric_diff=abs(m1 - m2))
            except RuntimeError as e:  # an op without a deterministic CUDA kernel
                yield {"name": f"numerics {what}: deterministic algorithms", "unit": "rel L2 diff",
                       "ours": None, "anchor": None, "ratio": None, "note": " ".join(str(e).split())[:160]}
            finally:
                torch.use_deterministic_algorithms(False)


# Groups of rows, each written as one artifact. Add yours here.
BENCHES: list[tuple[str, Callable[[BenchContext], Iterable[dict[str, Any]]]]] = [
    ("matmul", bench_matmul),
    ("lm", bench_lm),
    ("sae", bench_sae),
    ("numerics", bench_numerics),
]


def write_results(group: str, rows: list[dict[str, Any]], ctx: BenchContext, seconds: float) -> str:
    """Merge this group's rows into the machine's one artifact, ``cache/bench/<hardware slug>/results.json``
    (the slug starts with ``cpu-`` or ``gpu-``, which the store reads as the profile): rows of other groups,
    measured in earlier runs, are kept; this group's old rows are replaced. ``seconds``: the group's real
    wall time; the manifest's ``wall_time_s`` is the sum of its groups' (each as last measured)."""
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
            "load_average_at_end": load, "seconds": round(seconds, 1), "threads": ctx.threads,
            "peaks_tflops": {k: round(v / 1e12, 3) for k, v in ctx.peaks.items()}}
        info["groups"] = {g: v for g, v in info["groups"].items() if g in groups}
        w.info.update(info)
        w.wall_time_s = sum(v.get("seconds", 0.0) for v in info["groups"].values())
    return str(store.artifact_path("bench", profile, name))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller sizes and shorter timings (under a minute on "
                   "2 CPU cores; the default groups take under ten minutes there)")
    p.add_argument("--only", help="comma-separated groups to run (default: all: "
                   + ", ".join(g for g, _ in BENCHES) + ")")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--no-write", action="store_true", help="print the rows, write nothing")


def format_row(r: dict[str, Any]) -> str:
    """One printed line: name, ours, the anchor and the ratio, MFU of both sides, the row's seconds."""
    ours = "-" if r["ours"] is None else f"{r['ours']:,.4g}"
    line = f"  {r['name']:<78} ours {ours:>10} {r['unit']:<13}"
    if r.get("anchor") is not None:
        line += f" anchor {r['anchor']:>10,.4g}  ratio {r['ratio']:>5}"
    if r.get("ours_mfu") is not None:
        line += f"  MFU ours {r['ours_mfu']:.0%}" + (f" anchor {r['anchor_mfu']:.0%}" if r.get("anchor_mfu") is not None
                                                     else "")
    if r.get("seconds") is not None:
        line += f"  ({r['seconds']:.0f} s)"
    return line


def run(args: argparse.Namespace) -> int:
    from . import hardware
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
    print(f"bench on {hardware.slug()} ({device}, {ctx.threads} threads{', quick' if ctx.quick else ''}), load "
          f"average {load:.2f}" + ("  (the machine is busy: ratios hold, absolute numbers are low)"
                                   if load > ctx.threads * 0.5 else ""), flush=True)
    began = time.perf_counter()
    for group in chosen:
        start = time.perf_counter()
        print(f"{group}:", flush=True)
        rows = []
        for row in _timed(groups[group](ctx)):
            rows.append(row)
            print(format_row(row), flush=True)
        seconds = time.perf_counter() - start
        where = "" if args.no_write else f" -> {write_results(group, rows, ctx, seconds)}"
        print(f"  {group}: {seconds:.0f} s{where}", flush=True)
    print(f"bench: {time.perf_counter() - began:.0f} s in all", flush=True)
    return 0
