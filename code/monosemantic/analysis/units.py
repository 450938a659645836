"""Units: what the analysis measures (neurons, an SAE's features, controls), each set read as its activations'
non-zeros, and the logit effects of their directions."""


from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from ..explain import SparseActivations, argsort
from ..tokenizer import N_VOCAB  # GPT-2's; the chapters and the causal stage read them here too

# --- units: what is measured ------------------------------------------------------------------------

@dataclasses.dataclass
class UnitSet:
    """A set of units read off the MLP's hidden activations: the neurons themselves, or an SAE's features.

    ``encode`` maps (N, d_mlp) activations to (N, n_units); ``directions`` (n_units, d_mlp) are what each
    unit writes back into the MLP's hidden layer (an SAE's decoder rows; the identity for neurons).
    ``polarity`` (n_units,) of +-1 is each unit's stronger sign (module docstring), chosen by
    :func:`analyze` after its first pass; None until then. ``sparse_encode`` maps (N, d_mlp) activations to
    the non-zeros of ``encode``'s (N, n_units), (rows, units, values) in row-major order, without making the
    dense matrix (a TopK SAE's is k of n_units per token); None: they are read off ``encode``."""

    name: str
    encode: Callable[[Tensor], Tensor]
    directions: Tensor
    contexts: bool = True  # keep dashboards (contexts, interval samples) for this set
    polarity: Tensor | None = None
    sparse_encode: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def n_units(self) -> int:
        return self.directions.shape[0]

    def orient(self, a: Tensor) -> Tensor:
        """(N, n_units) raw activations -> what is measured, max(polarity * a, 0): ``a`` itself (no copy)
        for a non-negative unit set."""
        if self.polarity is not None and bool((self.polarity < 0).any()):
            a = a * self.polarity.to(a.dtype)
        return a if not a.numel() or a.min() >= 0 else a.clamp_min(0)

    def activations(self, h: Tensor) -> Tensor:
        """(N, d_mlp) MLP activations -> (N, n_units) oriented unit activations, all >= 0."""
        return self.orient(self.encode(h))

    def nonzeros(self, h: Tensor) -> SparseActivations:
        """(N, d_mlp) MLP activations -> the non-zeros of their raw encoding (N, n_units)."""
        if self.sparse_encode is None:
            return SparseActivations.of(self.encode(h))
        rows, units, values = self.sparse_encode(h)
        return SparseActivations(rows, units, values, (h.shape[0], self.n_units))

    def orient_nonzeros(self, a: SparseActivations) -> SparseActivations:
        """:meth:`orient` on non-zeros: the entries of max(polarity * a, 0) that are > 0."""
        values = a.values
        if self.polarity is not None and bool((self.polarity < 0).any()):
            values = values * self.polarity.to(values.dtype)[a.units]
        negative = values < 0
        return a._replace(values=values).keep(~negative) if bool(negative.any()) else a._replace(values=values)

    @classmethod
    def neurons(cls, d_mlp: int) -> UnitSet:
        return cls("neurons", lambda h: h, torch.eye(d_mlp))

    @classmethod
    def neuron_topk(cls, name: str, d_mlp: int, k: int, contexts: bool = True) -> UnitSet:
        """The neuron basis made a sparse code of the SAE's width: the 2 d_mlp half-neurons max(h_i, 0) and
        max(-h_i, 0), of which each token keeps its k largest, a = ReLU(TopK_k([h, -h])). For a layer whose
        neurons take both signs (a gated MLP) this is the like-for-like neuron baseline of a TopK SAE with
        2 d_mlp latents: the same width and L0, each unit one sign of one neuron (directions +e_i, -e_i)."""
        eye = torch.eye(d_mlp)
        directions = torch.cat([eye, -eye])  # (2 d_mlp, d_mlp)

        def encode(h: Tensor) -> Tensor:
            return _topk_code(torch.cat([h, -h], dim=-1), k)

        def sparse_encode(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _topk_nonzeros(torch.cat([h, -h], dim=-1), k)

        return cls(name, encode, directions, contexts, sparse_encode=sparse_encode)

    @classmethod
    def from_sae(cls, name: str, sae, contexts: bool = True) -> UnitSet:
        sae = sae.float().eval()
        architecture = getattr(getattr(sae, "cfg", None), "architecture", None)
        if architecture == "topk":  # sae.activate's own steps, without its dense scatter
            def sparse_encode(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                return _topk_nonzeros(sae.pre_activations(h), sae.cfg.k)
        elif architecture == "relu":  # ReLU(pre) is non-zero where pre > 0
            def sparse_encode(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                pre = sae.pre_activations(h)
                rows, units = torch.nonzero(pre > 0, as_tuple=True)
                return rows, units, pre[rows, units]
        else:
            sparse_encode = None
        return cls(name, sae.encode, sae.W_dec.detach().float().clone(), contexts, sparse_encode=sparse_encode)

    @classmethod
    def random_dictionary(cls, name: str, d: int, n_units: int, k: int, seed: int = 0,
                          centre: Tensor | None = None, contexts: bool = True) -> UnitSet:
        """The chance control of a TopK SAE: ``n_units`` random unit directions R (n_units, d), uniform on the
        sphere and seeded, encoded as the TopK SAE encodes, a = ReLU(TopK_k(R (h - centre))): k non-zeros per
        token (fewer only where fewer than k projections are positive). ``centre``: the SAE's b_dec, so
        that both read the same centred activations."""
        gen = torch.Generator().manual_seed(seed)
        R = torch.nn.functional.normalize(torch.randn(n_units, d, generator=gen), dim=1)  # (n_units, d)
        c = torch.zeros(d) if centre is None else centre.detach().float().clone()

        def encode(h: Tensor) -> Tensor:
            return _topk_code((h - c) @ R.t(), k)  # (N, n_units)

        def sparse_encode(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _topk_nonzeros((h - c) @ R.t(), k)

        return cls(name, encode, R, contexts, sparse_encode=sparse_encode)


def _topk_code(pre: Tensor, k: int) -> Tensor:
    """ReLU(TopK_k(pre)) of pre-activations (N, n): each row's k largest kept where positive, the rest zero."""
    values, indices = pre.topk(k, dim=-1, sorted=False)  # (N, k)
    return torch.zeros_like(pre).scatter(-1, indices, values.clamp_min(0))


def _topk_nonzeros(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zeros of ReLU(TopK_k(pre)) for pre-activations (N, n), as (rows, units, values) in row-major
    order: exactly what ``zeros.scatter(indices, relu(values))`` of ``pre.topk(k, sorted=False)`` holds."""
    values, indices = pre.topk(k, dim=-1, sorted=False)  # (N, k)
    order = argsort(indices, dim=-1)
    indices, values = indices.gather(-1, order), values.gather(-1, order)
    keep = values > 0  # (N, k)
    rows = torch.arange(len(pre)).unsqueeze(1).expand_as(indices)
    return rows[keep], indices[keep], values[keep]


def logit_effects(model, directions: Tensor) -> Tensor:
    """(n_units, vocab) direct effect on the logits of writing each direction (n_units, d_mlp) into the
    MLP's hidden layer: through the down-projection (no bias: it is not the unit's), the final LayerNorm
    with its gain and its centring but not its data-dependent scale, and the unembedding (no bias)."""
    mlp = model.blocks[-1].mlp
    with torch.no_grad():
        resid = directions.float() @ mlp.fc_out.weight.float().t()  # (n_units, d_model)
        resid = resid - resid.mean(-1, keepdim=True)  # LayerNorm's centring
        resid = resid * model.ln_final.weight.float()  # its gain
        return resid @ model.unembed.weight.float().t()  # (n_units, vocab)


def logit_extremes(model, directions: Tensor, polarity: Tensor, n: int, chunk: int = 1024
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``n`` tokens whose logits each unit, written in its polarity, raises most and lowers most:
    (up values, up tokens, down values, down tokens), each (n_units, n), the down values as decreases (> 0 for
    a logit lowered). Made ``chunk`` units at a time: the whole (n_units, vocab) matrix of
    :func:`logit_effects` is 7 GB for Llama-3-8B's 14,336 neurons (128,256 tokens) and 59 GB for an 8x SAE."""
    n_vocab = getattr(model, "n_vocab", N_VOCAB)
    parts = []
    for s in range(0, directions.shape[0], chunk):
        d = directions[s:s + chunk]
        effects = (model.logit_effects(d) if hasattr(model, "logit_effects")  # another model kind
                   else logit_effects(model, d))[:, :n_vocab].cpu()
        effects = effects * polarity[s:s + chunk, None]  # what the unit writes when active in its polarity
        parts.append((*effects.topk(n, dim=1), *(-effects).topk(n, dim=1)))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
