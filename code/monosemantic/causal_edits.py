"""The causal test's edits and how they are read: the clamp, the ablation and the anchor's pin as hooks on the
SAE's input (:func:`edit_hook`), the push a hidden-layer direction writes into the residual stream
(:func:`writes`), and the next-token distribution an edit gives at cached positions, read without a product
over the vocabulary (:class:`Readout`, :func:`fast_shift`), with the plain read-out the tests check it against
(:func:`edit_logits`, :func:`shift`); the positions it is read at (:func:`cache_positions`), and the scale that
gives a control the feature's KL (:func:`kl_matched_scale`). :mod:`monosemantic.causal` runs the stage."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import UserError

RESID = "blocks.0.hook_resid_post"  # the residual stream after the (one) MLP: what the final LayerNorm reads

# --- the interventions ------------------------------------------------------------------------------------

def edit_hook(sae, feature: int, mode: str, direction: Tensor | None = None, value: float = 0.0,
              skip_first: bool = False) -> Callable[[Tensor, str], Tensor]:
    """A hook ``fn(h, name) -> h'`` on the SAE's hook point: ``mode`` "clamp" sets feature ``feature`` to
    ``value`` (h + (value - f) d), "ablate" removes it (h - f d). ``direction`` (d_in,) replaces the
    feature's decoder direction d (a control); the coefficients are the feature's own. ``skip_first``: the
    first position of each sequence (B, T, d_in) is left as it is (where a prompt's document separator sits,
    and where the analysis measures nothing). ``mode`` "pin" is the anchor's
    ``generate_with_pinned_features``: h replaced by the SAE's reconstruction with the feature's activation set
    to ``value`` (the error term dropped; ``feature`` None: the plain reconstruction), at every position."""
    if mode not in ("clamp", "ablate", "pin"):
        raise UserError(f"mode must be 'clamp', 'ablate' or 'pin', got {mode!r}")
    if mode == "pin":
        def pinned(h: Tensor, name: str) -> Tensor:
            flat = h.reshape(-1, h.shape[-1]).float()
            with torch.no_grad():
                f = sae.encode(flat)
                if feature is not None:
                    f[:, feature] = value
                return sae.decode(f).to(h.dtype).reshape(h.shape)
        return pinned
    d = (sae.W_dec[feature] if direction is None else direction).detach().float()  # (d_in,)

    def fn(h: Tensor, name: str) -> Tensor:
        flat = h.reshape(-1, h.shape[-1]).float()  # (N, d_in)
        with torch.no_grad():
            f = sae.encode(flat)[:, feature]  # (N,)
        out = (flat + coefficients(f, mode, value)[:, None] * d.to(flat.device)).to(h.dtype).reshape(h.shape)
        if skip_first and h.dim() == 3:
            out[:, 0] = h[:, 0]
        return out
    return fn


def coefficients(f: Tensor, mode: str, value: float = 0.0) -> Tensor:
    """(N,) how far each position is moved along the edited direction, given the feature's activations f (N,):
    value - f when clamped, -f when ablated (zero where the feature is silent)."""
    return (value - f) if mode == "clamp" else -f


def writes(model, vectors: Tensor) -> Tensor:
    """(n, d_model) what each (n, d_in) hidden-layer vector adds to the residual stream: W_out v (no bias). Two
    unit directions edited with the same coefficient push the residual stream by different amounts, so a
    control is scaled to the norm of this push, not to its norm in the hidden layer."""
    w_out = model.blocks[0].mlp.fc_out.weight.detach().float()  # (d_model, d_mlp)
    return vectors.float() @ w_out.t()


def random_directions(d_in: int, n: int, seed: int) -> Tensor:
    """(n, d_in) random unit vectors (uniform on the sphere), seeded."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d_in, generator=g)
    return r / r.norm(dim=1, keepdim=True)


def edit_logits(model, resid: Tensor, push: Tensor, coeff: Tensor, vocab: int) -> Tensor:
    """(N, vocab) next-token logits at N positions whose residual stream after the MLP is ``resid`` (N, d_model),
    when the MLP's hidden activation there is moved by ``coeff`` (N,) along a direction that writes ``push``
    (d_model,) into the residual stream: the final LayerNorm and the unembedding of resid + coeff push. In a
    one-layer model this is exactly what the edit hooked into the full forward pass gives at those positions
    (nothing after the MLP mixes positions)."""
    x = resid + coeff[:, None] * push[None, :]
    return model.unembed(model.ln_final(x))[:, :vocab].float()


class Shift(NamedTuple):
    """Per-position effects of one edit: ``kl`` (N,) KL(p || p'); for each of M token sets, ``dmass`` (N, M)
    p'(set) - p(set), ``dlogodds`` (N, M) the change of its log-odds, ``mass`` (N, M) p(set) before the edit."""

    kl: Tensor
    dmass: Tensor
    dlogodds: Tensor
    mass: Tensor


def log_odds(m: Tensor) -> Tensor:
    m = m.clamp(1e-7, 1 - 1e-7)
    return torch.log(m) - torch.log1p(-m)


def shift(logp: Tensor, logq: Tensor, sets: Tensor) -> Shift:
    """:class:`Shift` of next-token log-probabilities ``logp`` (N, V) to ``logq`` (N, V) on the token sets
    ``sets`` (V, M) (0/1)."""
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum(-1)
    base, after = p @ sets, q @ sets  # (N, M)
    return Shift(kl.double(), (after - base).double(), (log_odds(after) - log_odds(base)).double(), base.double())


def token_sets(vocab: int, *sets: Tensor) -> Tensor:
    """(vocab, M) float 0/1 columns, one per set: a bool mask (V,) or a tensor of token ids."""
    out = torch.zeros(vocab, len(sets))
    for j, s_ in enumerate(sets):
        if s_.dtype == torch.bool:
            out[: len(s_), j] = s_[:vocab].float()
        else:
            out[s_.long(), j] = 1.0
    return out


class Readout(NamedTuple):
    """The cached positions' next-token read-out, arranged so that an edit costs no matrix product. An edit adds
    c u to the residual stream x at a position (u = W_out d); the final LayerNorm then gives
    s' (x~ + c u~) * gamma + beta, with x~, u~ the centred vectors and s' = 1 / sqrt(var(x~ + c u~) + eps), and
    var(x~ + c u~) = var(x~) + 2 c mean(x~ u~) + c^2 var(u~); so the logits are z = s' A + s' c B + C with
    A = W (gamma x~) for each position, B = W (gamma u~) for each direction and C = W beta + b (W the
    unembedding). :func:`fast_shift` reads an edit from them; a test checks it against :func:`edit_logits`."""

    A: Tensor  # (N, V)
    C: Tensor  # (V,)
    xc: Tensor  # (N, d_model) the centred residual streams
    var: Tensor  # (N,) their variances
    gamma: Tensor  # (d_model,)
    W: Tensor  # (V, d_model)
    eps: float
    p: Tensor  # (N, V) the unedited next-token distribution
    plogp: Tensor  # (N,) sum p log p
    pA: Tensor  # (N,) sum p A
    pC: Tensor  # (N,) sum p C


@torch.no_grad()
def readout(model, resid: Tensor, vocab: int) -> Readout:
    """:class:`Readout` of the positions whose residual stream after the MLP is ``resid`` (N, d_model)."""
    ln, un = model.ln_final, model.unembed
    W = un.weight[:vocab].float()  # (V, d)
    gamma = ln.weight.float()
    C = ln.bias.float() @ W.t() + un.bias[:vocab].float()
    xc = resid.float() - resid.float().mean(-1, keepdim=True)
    var = xc.pow(2).mean(-1)
    A = (xc * gamma) @ W.t()
    z = A * (var + ln.eps).rsqrt()[:, None] + C
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    # the sums over the vocabulary in float64: the KL below is a small difference of large terms
    pd_ = p.double()
    return Readout(A, C, xc, var, gamma, W, float(ln.eps), p, (pd_ * logp.double()).sum(-1), (pd_ * A.double()).sum(-1),
                   pd_ @ C.double())


def fast_shift(ro: Readout, push: Tensor, coeff: Tensor, sets: list[Tensor], frozen: bool = False) -> Shift:
    """:class:`Shift` of the edit that writes ``push`` (d_model,) per unit of ``coeff`` (N,) at the positions of
    ``ro``, on the token sets ``sets`` (each a tensor of token ids), without a matrix product over the
    vocabulary: the KL as sum p log p - sum p z' + logsumexp z', each set's mass from its own columns.
    ``frozen``: the final LayerNorm keeps the unedited scale 1 / sqrt(var + eps) (a read-out of the edit's
    direction alone: removing a large push also shrinks the variance, which raises every logit's scale)."""
    uc = push.float() - push.float().mean()
    B = ro.W @ (ro.gamma * uc)  # (V,)
    var = ro.var if frozen else ro.var + 2 * coeff * (ro.xc @ uc) / len(uc) + coeff.pow(2) * uc.pow(2).mean()
    s1 = (var + ro.eps).rsqrt()  # (N,)
    z = torch.addr(ro.A, coeff, B).mul_(s1[:, None]).add_(ro.C)  # (N, V): s' (A + c B) + C
    lse = torch.logsumexp(z.double(), dim=-1).float()
    s1d, cd = s1.double(), coeff.double()
    pz = s1d * ro.pA + cd * s1d * (ro.p.double() @ B.double()) + ro.pC  # sum p z', in float64
    kl = ro.plogp - pz + lse.double()
    base = torch.stack([ro.p[:, t].sum(-1) for t in sets], 1)  # (N, M)
    after = torch.stack([(z[:, t] - lse[:, None]).exp().sum(-1) for t in sets], 1)
    return Shift(kl.double(), (after - base).double(), (log_odds(after) - log_odds(base)).double(), base.double())


def rank_first(values: np.ndarray, sign: float) -> int:
    """Where ``values[0]`` (the feature's) ranks among the rest (the control directions') the way the edit
    should go (``sign`` +1: up, -1: down): 1 + how many do at least as well. Rank 1 of n + 1 is the feature
    beating every control: p = 1 / (n + 1) under the null that its direction is one more of them."""
    v = sign * np.asarray(values, dtype=np.float64)
    return int(1 + (v[1:] >= v[0]).sum())


class Cached(NamedTuple):
    """Held-out positions where the edits are read: the SAE's input there and the residual stream after the MLP."""

    h: Tensor  # (N, d_in)
    resid: Tensor  # (N, d_model)
    docs: np.ndarray  # (N,) the document of each


@torch.no_grad()
def cache_positions(model, hook: str, inputs: Tensor, pos: np.ndarray, docs_all: np.ndarray, batch: int) -> Cached:
    """:class:`Cached` for the (window row, position) pairs ``pos`` of ``inputs``: the forward pass up to the
    MLP's output on the windows that hold them (no unembedding; :func:`readout` reads the distribution)."""
    rows = np.unique(pos[:, 0])
    where = {int(r): i for i, r in enumerate(rows)}
    hs, rs = [], []
    for i in range(0, len(rows), batch):
        got = model.run_with_cache(inputs[rows[i:i + batch]], [hook, RESID])
        hs.append(got[hook])
        rs.append(got[RESID])
    h_all, r_all = torch.cat(hs), torch.cat(rs)  # (W, T, d)
    wi = torch.as_tensor([where[int(r)] for r in pos[:, 0]], dtype=torch.long)
    ti = torch.as_tensor(pos[:, 1], dtype=torch.long)
    return Cached(h_all[wi, ti].float(), r_all[wi, ti].float(), docs_all[pos[:, 0]])


# --- the stage ----------------------------------------------------------------------------------------------


@torch.no_grad()
def kl_matched_scale(ro: Readout, push_f: Tensor, push: Tensor, coeff: Tensor, steps: int = 30) -> float:
    """The factor s for which writing ``s * push`` per unit of ``coeff`` moves the next-token distribution at the
    positions of ``ro`` as far (mean KL) as writing ``push_f`` does: bisection on log s within [1/64, 64] (the
    KL grows with the push's size); the end of that range when it is not reached."""
    empty = [torch.zeros(0, dtype=torch.long)]

    def kl(p: Tensor) -> float:
        return float(fast_shift(ro, p, coeff, empty).kl.mean())

    target = kl(push_f)
    lo, hi = math.log(1 / 64), math.log(64)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if kl(push * math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)
