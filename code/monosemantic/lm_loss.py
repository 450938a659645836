"""The unembedding and its cross-entropy, fused (:class:`LinearCrossEntropy`): the loss of the one-layer LM
(:mod:`monosemantic.lm`) computed in chunks of tokens, never materialising the (tokens, vocab) logits, with
the gradients computed during the forward pass (the loss is the last node of the graph, so they are known
then). In fp32 on a CPU a chunk is ~1,024 tokens whose logits become probabilities in place in one reused
buffer (:func:`loss_chunk_tokens`); in bf16 a chunk is at least 256 tokens on a CPU, the config's
``loss_chunk`` on a GPU, and the softmax part is compiled into one fused kernel."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch


def _exp_and_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits (C, V) and targets (C,): the summed cross-entropy (fp32 scalar), e = exp(logits - max)
    in the logits' dtype (C, V) and its row sums s (C, 1) fp32. softmax = e / s; the caller folds 1/s into
    the small (C, D) side of the matmuls, so the (C, V) tensor is touched by one pass and one exp."""
    lf = logits.float()
    m = lf.amax(dim=-1, keepdim=True)  # (C, 1)
    e = torch.exp(lf - m)  # (C, V)
    s = e.sum(dim=-1, keepdim=True)  # (C, 1)
    loss = (m + torch.log(s) - lf.gather(1, targets[:, None])).sum()
    return loss, e.to(logits.dtype), s


def _xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk, no gradient (evaluation)."""
    lf = logits.float()
    return (torch.logsumexp(lf, dim=-1) - lf.gather(1, targets[:, None])[:, 0]).sum()


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


# fp32 on a CPU: the fused loss works through chunks of about this many bytes of logits (1,024 tokens at
# vocab 50,304). The three (c, 128) x (128, 50,304)-shaped products ran at 40-70% of their c = 1,024 rate
# at c = 128 (2-core AVX2 EPYC); whole steps were fastest at c = 1,024 and 2,048, no faster at 4,096,
# whose buffer is 4x the memory.
FP32_CPU_CHUNK_BYTES = 256 * 2**20

# bf16 on a CPU: chunks of up to this many bytes of logits (256 tokens at vocab 50,304). The chunk's (c, V)
# logits and exponentials are read five times, the (V, D) weight and gradient once each per chunk: larger
# chunks read the weight less often per token, but over the heap's block limit (32 MB,
# hardware.HEAP_MMAP_THRESHOLD) each chunk's tensors are fresh maps of memory, faulted in page by page.
# Steps alternated in one process on a 2-core Zen 4: 922 ms at 128 tokens, 818 ms at 256, 915 ms at 512.
BF16_CPU_CHUNK_BYTES = 32 * 2**20

# a target whose probability is under this (a loss over ~69 nats) gets its loss recomputed from its logits:
# -log(p) of a subnormal or zero p is inexact (the gradient p - onehot is exact either way)
_TINY_PROB = 1e-30

_workspace: dict[tuple, torch.Tensor] = {}


def _logits_buffer(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A (rows, vocab) fp32 buffer kept from one step to the next. On a CPU a fresh tensor this large is
    mapped from the OS and zero-filled page by page on first touch every time (PyTorch's CPU allocator
    caches nothing): that alone made the logits product run at 55-60% of its rate into a reused buffer
    and exp() 3.5x slower. One buffer is kept (a new shape replaces it; 206 MB at 1,024 x 50,304), used by
    one call at a time."""
    key = (rows, vocab, str(device))
    buf = _workspace.get(key)
    if buf is None:
        _workspace.clear()
        buf = _workspace[key] = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    return buf


def loss_chunk_tokens(loss_chunk: int, n_tokens: int, vocab: int, dtype: torch.dtype,
                      device: torch.device | str) -> int:
    """Tokens per chunk of :class:`LinearCrossEntropy` for ``n_tokens`` tokens: ``loss_chunk`` (the config's,
    for GPUs) except on a CPU, where it is at least the power of two whose (chunk, vocab) logits fill
    :data:`FP32_CPU_CHUNK_BYTES` in fp32 or :data:`BF16_CPU_CHUNK_BYTES` in bf16, at most ``n_tokens``
    (results differ only by the order of the sums)."""
    if loss_chunk <= 0 or torch.device(device).type != "cpu":
        return loss_chunk
    budget, size = (FP32_CPU_CHUNK_BYTES, 4) if dtype == torch.float32 else (BF16_CPU_CHUNK_BYTES, 2)
    by_bytes = 2 ** max(0, int(math.log2(max(1, budget // (size * vocab)))))
    return max(1, min(n_tokens, max(loss_chunk, by_bytes)))


def _fp32_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                               chunk: int, want_grad: bool):
    """The fp32 form of :class:`LinearCrossEntropy`: summed loss and, if ``want_grad``, the summed loss's
    gradients (dx (N, D), dW (V, D), db (V,)), all fp32.

    Per chunk of c tokens the logits are written into one reused (c, V) buffer and turned into softmax
    probabilities p in place (PyTorch's softmax kernel: max, exp, sum and scale on each row while it sits
    in cache, so one read and one write of the buffer from memory); the loss of a token is -log p[y]; then
    G = p - onehot(y) is used without being formed: dx = p W - W[y], dW += p^T x - onehot(y)^T x,
    db += colsum(p) - counts(y). Two products read the buffer, nothing else allocates (c, V)."""
    N, V = x.shape[0], weight.shape[0]
    buf = _logits_buffer(min(chunk, N), V, x.device)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = dw = db = None
    if want_grad:
        dx = torch.empty_like(x)  # (N, D)
        dw = torch.zeros_like(weight)  # (V, D)
        db = torch.zeros_like(bias)  # (V,)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        xc, y, p = x[start:end], targets[start:end], buf[:end - start]  # (c, D), (c,), (c, V)
        torch.addmm(bias, xc, weight.t(), out=p)  # (c, V) logits
        torch.softmax(p, dim=1, out=p)  # in place: p = softmax(logits)
        p_y = p.gather(1, y[:, None])[:, 0]  # (c,)
        nll = -torch.log(p_y)  # (c,) each token's loss
        tiny = p_y < _TINY_PROB
        if bool(tiny.any()):  # -log of an underflowed p: recompute those few tokens' losses from their logits
            rows = tiny.nonzero()[:, 0]
            logits = torch.addmm(bias, xc[rows], weight.t())  # (r, V)
            nll[rows] = torch.logsumexp(logits, 1) - logits.gather(1, y[rows, None])[:, 0]
        loss += nll.sum()
        if not want_grad:
            continue
        torch.mm(p, weight, out=dx[start:end]).sub_(weight[y])  # (c, D)
        dw.addmm_(p.t(), xc).index_add_(0, y, xc, alpha=-1)  # (V, D)
        db.add_(p.sum(0)).index_add_(0, y, torch.ones_like(y, dtype=torch.float32), alpha=-1)  # (V,)
    return loss, (dx, dw, db)


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(x_i W^T + b, y_i) for x (N, D), W (V, D), b (V,), y (N,), in chunks of tokens.

    Forward computes the loss and, when gradients are wanted, the gradients of x, W and b as it goes.
    Peak memory is one chunk's logits instead of (N, V), and the (N, V) logits are never written to or
    read back from main memory as a whole: that traffic, not the arithmetic, is what the plain form
    (logits, then F.cross_entropy and its backward) spends much of its time on. Backward only scales the
    stored gradients by the incoming one.

    In fp32 (:func:`_fp32_linear_cross_entropy`) each chunk's logits become softmax probabilities in place in
    a buffer reused across steps. In a lower ``dtype`` (bf16 with fp32 accumulation inside the matmuls), per
    chunk of ``chunk`` tokens: logits (c, V) in ``dtype``; e = exp(logits - max) and its row sums s in one
    fused pass (compiled when ``compile``); then, with G = e/s - onehot(y) the gradient of the summed loss
    with respect to the logits,

        dx = G W    = (e W) / s - W[y]              (c, D)
        dW += G^T x = e^T (x / s) - onehot(y)^T x   (V, D)
        db += 1^T G = (1/s)^T e - counts(y)         (V,)

    so G itself is never formed; dW and db come from one product, e^T [x / s, 1 / s, 0...] (V, D + 1 padded to
    a multiple of 16: one read of e instead of two; steps alternated in one process on a 2-core Zen 4,
    790 -> 767 and 814 -> 795 ms), accumulated in ``dtype`` over ``flush`` tokens, then in fp32; db's counts
    are taken off chunk by chunk (its partial sums stay small), dW's onehot(y)^T x once at the end in fp32. The
    gradients kept are the summed loss's; backward scales them by the incoming gradient over N in one pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, chunk: int, dtype: torch.dtype, compile: bool, want_grad: bool):
        # want_grad: torch.is_grad_enabled() at the call (inside forward grad mode is always off, and
        # ctx.needs_input_grad says True even under torch.no_grad)
        N = x.shape[0]
        if dtype == torch.float32:
            loss, (dx, dw, db) = _fp32_linear_cross_entropy(x.float(), weight.float(), bias.float(), targets,
                                                             chunk, want_grad)
            if want_grad:
                ctx.save_for_backward(dx, dw, db)
                ctx.n_tokens = N
            return loss / N
        xl, wl, bl = x.to(dtype), weight.to(dtype), bias.to(dtype)  # (N, D), (V, D), (V,)
        kernel = _compiled(_exp_and_loss) if compile else _exp_and_loss
        xent = _compiled(_xent) if compile else _xent
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        if want_grad:
            # the (V, D) tensors are written before they are read (no zero-fill, no pass to divide by N: the
            # backward's scaling does that): on a 2-core CPU each pass over them costs ~10 ms of a ~0.8 s step
            D = x.shape[1]
            dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (N, D)
            acc = part = None  # [dW | db | 0] (V, width) float32, and its partial sum in dtype over `flush` tokens
            xs = torch.zeros(min(chunk, N), -(-(D + 1) // 16) * 16, dtype=dtype, device=x.device)  # [x/s | 1/s | 0]
            flush = max(chunk, 2048)
            ones = torch.ones(min(chunk, N), dtype=dtype, device=x.device)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            y = targets[start:end]  # (c,)
            logits = torch.addmm(bl, xl[start:end], wl.t())  # (c, V)
            if not want_grad:
                loss += xent(logits, y)
                continue
            chunk_loss, ex, sums = kernel(logits, y)  # (), (c, V), (c, 1)
            loss += chunk_loss
            inv = 1 / sums  # (c, 1)
            torch.mul((ex @ wl).float(), inv, out=dx[start:end]).sub_(weight[y])  # (c, D)
            xc = xs[:end - start]
            torch.mul(xl[start:end].float(), inv, out=xc[:, :D])  # (c, D) x / s, rounded to dtype
            xc[:, D] = inv[:, 0]
            if part is None:
                part = torch.mm(ex.t(), xc)  # (V, width)
            else:
                part.addmm_(ex.t(), xc)
            # - counts(y) here, so that db's partial sums in dtype stay near the gradient's size (summed
            # probabilities alone grow with the tokens, and their bf16 rounding grew db's error ~7x)
            part[:, D].index_add_(0, y, ones[:end - start], alpha=-1)
            if end % flush < chunk or end == N:
                acc = part.float() if acc is None else acc.add_(part)
                part = None
        if want_grad:
            dw, db = acc[:, :D], acc[:, D]  # (V, D), (V,) views: backward's scaling makes them dense
            dw.index_add_(0, targets, x, alpha=-1)  # - onehot(y)^T x, all chunks at once, in fp32
            ctx.save_for_backward(dx, dw, db)  # the summed loss's gradients; backward divides by N
            ctx.n_tokens = N
        return loss / N

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw, db = ctx.saved_tensors  # of the summed loss; the loss is their mean over the N tokens
        scale = grad_loss / ctx.n_tokens
        return dx * scale, dw * scale, db * scale, None, None, None, None, None
