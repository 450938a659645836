"""The SAE training step's fast path: the ReLU and TopK steps as autograd functions with hand-written
backwards (:meth:`monosemantic.sae.SAE.training_forward` calls them), and the kernels they are made of:
column sums of bf16 tensors, sparse gradient products, gathered dot products.

Each computes what :meth:`SAE.forward` with autograd computes (tests compare losses and gradients), in
fewer passes over the (batch, n_features) latents and, for TopK, without them at all."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# TopK training: when a step gathers at least this fraction of the latents per input (k, plus AuxK's latents
# when they are gathered one by one), a dense matmul in the compute dtype beats the sparse kernels: for
# SmolLM2's 1,536 -> 6,144 SAE at batch 1,024 with AuxK on, the fp32 sparse-dense product of the encoder
# gradient took 0.6 s a step and embedding_bag's per-sample-weight backward 0.4 s, against ~0.05 s for
# each bf16 matmul (2 CPU cores). Below it (k alone) the sparse path does O(B k d_in) work and wins.
DENSE_GATHER_FRACTION = 1 / 32

# AuxK over the dead latents' columns: when its aux_k picks are at least this fraction of the dead latents
# (always while at most 8 x aux_k latents are dead: 4,096 at aux_k 512), AuxK is computed densely on the
# (B, n_dead) block of dead columns only, 4 products of n_dead / n_features the size of a dense step's;
# below it, its picks are gathered one by one with the k (the sparse path above).
AUX_DENSE_FRACTION = 1 / 8

# the CSR products of the TopK backward are exact (a test compares them with dense ones); PyTorch's notice
# that its CSR layout is "beta" would otherwise be printed in the middle of every first training step
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

_SUM_BLOCK = 256  # rows summed per output of a bf16 product: counts up to 256 are exact in bfloat16
_block_ones: dict[tuple, Tensor] = {}


def _column_sums(t: Tensor) -> Tensor:
    """(B, n) -> (n,) float32 column sums. A float32 ``t`` is summed as it is; a bfloat16 one by a product
    with a (ceil(B / 256), B) block matrix of ones, accumulated in float32 and summed in float32: counts of
    0/1 entries stay exact, sums are rounded once per block of 256 rows. ``t.sum(0, dtype=torch.float32)``
    first copies all of ``t`` to float32: on a 2-core CPU three such sums were 10 ms of a 75 ms step."""
    if t.dtype == torch.float32:
        return t.sum(0)
    n_rows = t.shape[0]
    key = (n_rows, t.dtype, str(t.device))
    ones = _block_ones.get(key)
    if ones is None:
        block = torch.arange(n_rows, device=t.device) // _SUM_BLOCK  # (B,) each row's block
        ones = (block[None, :] == torch.arange(int(block[-1]) + 1, device=t.device)[:, None]).to(t.dtype)
        if len(_block_ones) > 8:
            _block_ones.clear()
        _block_ones[key] = ones
    return (ones @ t).float().sum(0)


class ReluStep(torch.autograd.Function):
    """The ReLU SAE's training loss with a hand-written backward: the same maths as :meth:`SAE.forward`
    (mse + l1_coeff * l1), in fewer passes over the (B, n_features) latents (no float32 copy of them, the
    L1 gradient folded into the ReLU's backward, done in place), and for ``b_dec`` the matrix-vector
    product -W_enc (sum_b dL/dpre_b) instead of the (B, d_in) input gradient (x itself needs none).

    Returns (loss, mse, l1, recon (B, d_in) float32, fires (n_features,) float32: on how many inputs of the
    batch each latent is > 0); only the first three carry gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, l1_coeff: float,
                dtype: torch.dtype):
        xc = (x - b_dec).to(dtype)  # (B, d_in)
        w_dec = W_dec.to(dtype)  # (n_features, d_in)
        f = torch.addmm(b_enc.to(dtype), xc, W_enc.to(dtype)).relu_()  # (B, n_features) latents
        recon = (f @ w_dec).float() + b_dec  # (B, d_in)
        diff = recon - x  # (B, d_in)
        mse = diff.pow(2).mean()
        l1 = _column_sums(f).sum() / x.shape[0]  # |f| = f after the ReLU
        # sign(f) is 1 where f > 0, else 0: summed per column it is the count (amax(0) with count_nonzero took
        # 5x as long on a CPU, a bool mask summed as int 2x)
        fires = _column_sums(f.sign())  # (n_features,) exact counts below 2^24 inputs
        ctx.save_for_backward(xc, f, diff, W_enc, w_dec)
        ctx.l1_coeff = l1_coeff
        ctx.mark_non_differentiable(recon, fires)
        return mse + l1_coeff * l1, mse, l1, recon, fires

    @staticmethod
    def backward(ctx, g_loss: Tensor, g_mse: Tensor, g_l1: Tensor, _g_recon: Tensor, _g_fires: Tensor):
        xc, f, diff, W_enc, w_dec = ctx.saved_tensors
        n_batch, d_in = diff.shape
        g_rec = diff * ((g_loss + g_mse) * 2 / diff.numel())  # (B, d_in) dL/drecon, float32
        g_rec_c = g_rec.to(f.dtype)
        grad_w_dec = (f.t() @ g_rec_c).float()  # (n_features, d_in)
        g_pre = g_rec_c @ w_dec.t()  # (B, n_features) dL/df from the reconstruction ...
        g_pre.add_((g_loss * ctx.l1_coeff + g_l1) / n_batch)  # ... + the L1's ...
        # ... through the ReLU (0 where f = 0), in place: ReLU's own backward kernel, one pass over g_pre and f
        # (g_pre.mul_(f > 0) casts the mask to floats first: 3 passes and 9x the time on a CPU)
        torch.ops.aten.threshold_backward.grad_input(g_pre, f, 0, grad_input=g_pre)
        grad_w_enc = (xc.t() @ g_pre).float()  # (d_in, n_features)
        grad_b_enc = _column_sums(g_pre)  # (n_features,)
        grad_b_dec = g_rec.sum(0) - W_enc @ grad_b_enc  # decoder bias, and the pre-encoder bias
        return None, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None, None


_scratch_buffers: dict[tuple, Tensor] = {}


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor kept for the next call with the same shape (one at a time), for a large
    temporary that never leaves the function using it: a fresh (1,024, 4,096) tensor on a CPU is mapped
    and zero-filled page by page by the OS on each step (PyTorch's CPU allocator caches nothing)."""
    key = (shape, dtype, str(device))
    buf = _scratch_buffers.get(key)
    if buf is None:
        _scratch_buffers.clear()
        buf = _scratch_buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def _rows_of(indices: Tensor, weights: Tensor, src: Tensor, n_rows: int, dtype: torch.dtype,
             transposed: bool = False) -> Tensor:
    """(n_rows, D) float32: row j = sum over the entries (b, i) with indices[b, i] = j of weights[b, i] * src[b];
    with ``transposed``, the same matrix as (D, n_rows), computed in that layout (the encoder weight's).

    indices, weights: (B, m); src: (B, D). That is onehot(indices, weights)^T @ src, the gradient of a
    weight matrix some of whose rows were gathered. A sparse-dense product, O(B m D), with the onehot as a
    CSR matrix, repeated indices adding up: for the (D, n_rows) layout the (B, n_rows) onehot as it comes
    (row b holds its m entries, no sorting), for (n_rows, D) its transpose built with the entries sorted by
    row (on a 2-core CPU 2-3x faster than the COO product, whose output had to be transposed by a strided
    copy); unless m is at least ``DENSE_GATHER_FRACTION`` of ``n_rows``, where a dense matmul in ``dtype``
    is cheaper."""
    n_batch, m = indices.shape
    if m >= DENSE_GATHER_FRACTION * n_rows:
        dense = torch.zeros(n_batch, n_rows, dtype=dtype, device=src.device)
        dense.scatter_add_(1, indices, weights.to(dtype))  # (B, n_rows)
        out = src.to(dtype).t() @ dense if transposed else dense.t() @ src.to(dtype)
        return out.float()
    if src.device.type != "cpu":  # CUDA's sparse products want sorted COO; the CSR path is for the CPU's MKL
        entry_input = torch.arange(n_batch, device=src.device).repeat_interleave(m)  # the input of each entry
        coo = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), entry_input]),
                                      weights.reshape(-1).float(), (n_rows, n_batch), check_invariants=False)
        out = torch.sparse.mm(coo, src.float())
        return out.t().contiguous() if transposed else out
    if transposed:  # src^T @ onehot, onehot (B, n_rows): row b holds its m entries, no sorting needed
        crow = torch.arange(0, n_batch * m + 1, m, device=src.device)
        onehot = torch.sparse_csr_tensor(crow, indices.reshape(-1), weights.reshape(-1).float(),
                                         (n_batch, n_rows), check_invariants=False)
        return torch.mm(src.float().t(), onehot)  # (D, n_rows)
    # onehot^T (n_rows, B) built directly, its entries sorted by row (PyTorch's transpose of the CSR above
    # converts through a sort of its own and writes the product column-major, then copies it: 2x the time)
    flat = indices.reshape(-1)
    order = flat.argsort()
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=src.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    onehot_t = torch.sparse_csr_tensor(crow, order // m, weights.reshape(-1).float()[order], (n_rows, n_batch),
                                       check_invariants=False)
    return torch.mm(onehot_t, src.float())  # (n_rows, D)


def _row_dots(weight: Tensor, indices: Tensor, vectors: Tensor) -> Tensor:
    """(B, m): out[b, i] = weight[indices[b, i]] . vectors[b], for weight (n, D), indices (B, m), vectors (B, D):
    the gradient of ``embedding_bag``'s per-sample weights, which is what computes it here (its kernel
    walks the m rows of each input in place; gathering them into a (B, m, D) tensor for one ``bmm`` took
    ~8x longer on a CPU, and the dense (B, n) product is a full matmul)."""
    with torch.enable_grad():
        w = torch.ones(indices.shape, dtype=weight.dtype, device=weight.device, requires_grad=True)
        out = F.embedding_bag(indices, weight.detach(), per_sample_weights=w, mode="sum")  # (B, D)
    return torch.autograd.grad(out, w, vectors.to(out.dtype))[0]


class TopKStep(torch.autograd.Function):
    """The TopK SAE's training loss (mse + aux_coeff * AuxK) with a hand-written backward: the same maths as
    :meth:`SAE.forward` with :func:`auxk_loss`, done without the dense (B, n_features) latents.

    Forward: the pre-activations (B, n) in ``dtype`` (the step's one dense product), their top k per row,
    decoded with ``embedding_bag`` from the k decoder rows. Backward: the decoder's and the encoder's
    gradients at those B * k entries are sparse-dense products (:func:`_rows_of`), the k values' gradients
    are B * k dot products (:func:`_row_dots`).

    AuxK (``dead``: the dead latents' indices, empty for none) works on the dead latents alone. While its
    ``aux_k`` picks are at least ``AUX_DENSE_FRACTION`` of them, on their (B, n_dead) block of the
    pre-activations: the top aux_k of each row (all of the block when aux_k >= n_dead) decoded by one
    (B, n_dead) x (n_dead, d_in) product, three more of that size in the backward, none over all n columns.
    Otherwise its picks are gathered entry by entry like the k.

    Returns (loss, mse, aux, recon (B, d_in) float32, indices (B, k), values (B, k) float32 after the ReLU);
    only the first three carry gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, dead: Tensor,
                k: int, aux_k: int, aux_coeff: float, dtype: torch.dtype):
        xc = x - b_dec  # (B, d_in)
        pre = _scratch((x.shape[0], W_enc.shape[1]), dtype, x.device)  # (B, n), only read in this forward
        torch.addmm(b_enc.to(dtype), xc.to(dtype), W_enc.to(dtype), out=pre)
        top, indices = pre.topk(k, dim=1, sorted=False)  # (B, k)
        values = top.float().relu_()  # (B, k)
        recon = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec  # (B, d_in)
        diff = recon - x  # (B, d_in)
        mse = diff.pow(2).mean()
        aux = mse.new_zeros(())
        ctx.aux = None
        if dead.numel() and aux_coeff > 0:
            k_aux = min(aux_k, dead.numel())
            residual = x - recon  # (B, d_in) a fixed target, as in auxk_loss
            if k_aux >= AUX_DENSE_FRACTION * dead.numel():  # the dead block
                a = pre.index_select(1, dead).float()  # (B, n_dead)
                if k_aux < dead.numel():  # keep each row's top k_aux
                    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k_aux, dim=1, sorted=False)[1],
                                                                         True)
                    a.masked_fill_(~keep, 0.0)
                a = a.relu_().to(dtype)  # (B, n_dead)
                w_dead = W_dec.index_select(0, dead).to(dtype)  # (n_dead, d_in)
                diff_aux = (a @ w_dead).float() - residual  # (B, d_in)
                ctx.aux = ("block", a, w_dead)
            else:  # picks gathered one by one
                aux_idx = dead[pre.index_select(1, dead).topk(k_aux, dim=1, sorted=False)[1]]  # (B, k_aux)
                a = pre.gather(1, aux_idx).float().relu_()  # (B, k_aux)
                diff_aux = F.embedding_bag(aux_idx, W_dec, per_sample_weights=a, mode="sum") - residual
                ctx.aux = ("gathered", a, aux_idx)
            aux = diff_aux.pow(2).mean()
            ctx.diff_aux = diff_aux
        ctx.save_for_backward(xc, W_enc, W_dec, dead, indices, values, diff)
        ctx.aux_coeff, ctx.dtype = aux_coeff, dtype
        ctx.mark_non_differentiable(recon, indices, values)
        return mse + aux_coeff * aux, mse, aux, recon, indices, values

    @staticmethod
    def backward(ctx, g_loss: Tensor, g_mse: Tensor, g_aux: Tensor, _g_recon, _g_indices, _g_values):
        xc, W_enc, W_dec, dead, indices, values, diff = ctx.saved_tensors
        n, dt = W_enc.shape[1], ctx.dtype
        g_rec = diff * ((g_loss + g_mse) * 2 / diff.numel())  # (B, d_in) dL/drecon
        g_pre = _row_dots(W_dec, indices, g_rec).mul_(values > 0)  # (B, k) dL/dpre at the k, through the ReLU
        grad_w_dec = _rows_of(indices, values, g_rec, n, dt)  # (n, d_in)
        enc_idx, enc_grad = indices, g_pre  # entries of dL/dpre, gathered
        block = None
        if ctx.aux is not None:
            kind, a, where = ctx.aux
            g_e = ctx.diff_aux * ((g_loss * ctx.aux_coeff + g_aux) * 2 / ctx.diff_aux.numel())  # (B, d_in)
            if kind == "block":  # where: the dead block's decoder rows (n_dead, d_in)
                g_ec = g_e.to(dt)
                grad_w_dec.index_add_(0, dead, (a.t() @ g_ec).float())  # (n_dead, d_in)
                block = (g_ec @ where.t()).float().mul_(a > 0)  # (B, n_dead) dL/dpre on the block
            else:  # where: the picks' indices (B, k_aux)
                grad_w_dec += _rows_of(where, a, g_e, n, dt)
                enc_idx = torch.cat([indices, where], dim=1)
                enc_grad = torch.cat([g_pre, _row_dots(W_dec, where, g_e).mul_(a > 0)], dim=1)
        grad_w_enc = _rows_of(enc_idx, enc_grad, xc, n, dt, transposed=True)  # (d_in, n), as W_enc
        grad_b_enc = torch.zeros(n, device=xc.device).index_add_(0, enc_idx.reshape(-1), enc_grad.reshape(-1))
        if block is not None:
            grad_w_enc.index_add_(1, dead, (xc.to(dt).t() @ block.to(dt)).float())  # (d_in, n_dead)
            grad_b_enc.index_add_(0, dead, block.sum(0))
        grad_b_dec = g_rec.sum(0) - W_enc @ grad_b_enc  # the decoder bias, and the pre-encoder bias
        return None, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None, None, None, None, None
