"""Features and neurons, measured the same way: ``monosemantic analyze``.

For every SAE feature and, for comparison, every MLP neuron of the one-layer model, over held-out text:

- **statistics**: density, mean, activation quantiles, a log-scale histogram of the non-zero activations;
- **dashboards**: the top activating contexts (one per document, so a list shows breadth, not one long
  text) and samples from lower activation intervals (as in Anthropic's dashboards), each with the
  surrounding tokens and every token's activation; the tokens the unit fires on most;
- **logit effects**: the unit's output direction through the MLP's down-projection, the final LayerNorm
  (its gain and centring folded in, its data-dependent scale left out, as Bricken et al. do) and the
  unembedding: the tokens it promotes and suppresses;
- **automatic monosemanticity scores**, computed identically for every kind of unit:

  1. *explain, then predict* (:mod:`monosemantic.explain`): each unit's explanation is made from its
     dashboard only (top contexts and interval samples on the explanation text; the offline default
     explainer is a token table, the mean activation of each token over the contexts shown, zeros included;
     ``--explainer`` points it at a chat model instead) and scored on held-out text (the val split) as the
     field scores it: by *simulation* (Bills et al. 2023: the correlation of predicted and true activations
     over a mix of the unit's top, interval-sampled and random held-out contexts) and by *detection*
     (EleutherAI delphi: balanced accuracy at telling contexts where it fires from ones where it does not).
     The older score, the whole token table's correlation over every held-out token, is kept beside them
     (``explain_corr``).
  2. *concept specificity*: rule-based detectors (:data:`FAMILIES`) label every token; a unit's best
     family is chosen on the explanation text (the largest share of the unit's activation mass) and its
     score is the share of its activation mass inside that family on the held-out text, beside the
     family's share of all tokens (Anthropic: Arabic is 0.13% of tokens but 81% of the Arabic feature's
     activation).

  A unit is scored only when it fires on at least ``min_heldout_firings`` held-out tokens (and on
  ``min_firings`` explanation tokens); the others are counted as too rare to score. The ``units`` table
  holds ``explanation``, ``sim_corr``, ``detection`` (with ``detection_tpr``, ``detection_tnr``), the older
  ``explain_corr``, ``family_share``, ``family_lift``, ``heldout_firings`` and ``too_rare``.

**Controls.** Four kinds of unit are measured alike: the MLP's neurons, the SAE's features, a *random
dictionary* (unit random directions in the same space with the TopK SAE's encoding, width and k: what a
dictionary scores by chance) and, when its artifact exists, the features of an SAE trained on a randomly
initialised copy of the LM. Because the lift rule and the scores depend on how sparse a unit is, every
comparison is also made within bins of held-out density (:func:`density_bins`), and the headline difference
from the neurons is averaged over those bins with the neurons' density distribution as weights
(:func:`matched_differences`), each with a 95% bootstrap interval over units.

**Positions.** The first position of every window carries outlier activations (nothing to attend to but
itself), so the first ``skip_first_positions`` positions of every window are not measured: they count in no
statistic, score or top context (shown contexts show 0 there). What they would have been is reported apart:
each unit's ``first_pos_top_share``, the share of its top activations that would have been at a window's
first position.

**Units that take both signs.** Every measurement above is of a non-negative quantity: SAE features and
ReLU neurons are non-negative already, but a SiLU-gated neuron (SmolLM2's, Llama's) takes both signs, and a
share of a signed sum is not a share (it can be negative, or 10^16). So every unit, neuron or feature, is
read through its *polarity* p = +1 or -1, the sign that carries more of its activation mass on the
explanation text (p = -1 when the sum of max(-a, 0) exceeds the sum of max(a, 0); ties and non-negative
units get +1), and what is measured is its stronger half, a+ = max(p a, 0): density is the share of tokens
with a+ > 0, the mean, quantiles, histogram, top contexts, interval samples, explanations, held-out
correlation, family share and lift are all of a+, and its logit effects are those of p times its direction
(what it writes when it is active in its polarity). A family share is then a share of a non-negative mass,
in [0, 1] by construction (clipped there against float32 rounding). A non-negative unit has p = +1 and
a+ = a: its numbers are exactly what they were before polarity existed. The ``units`` table records ``p``
(``polarity``) and the share of the unit's |a| mass on the other sign (``other_sign_share``), which the
measurement leaves out; the browser shows both.

The text: ``explain_tokens`` of the train split in windows of the model's context spread evenly over it
(dashboards, explanations, best families) and the whole val split, or held-out windows a caller gives
(:func:`analyze`) (scores, held-out densities). Tables are top-k summaries, small enough to commit; no raw
activations are stored. Every pass reads the text in blocks of ``batch_windows`` windows: two over the
explanation text (statistics and top activations; then interval samples, with the activations around every
example a dashboard shows) and one over the held-out text. Each reads a unit set's activations as their
non-zeros (:class:`~monosemantic.explain.SparseActivations`: a TopK SAE's are k of its n features per token),
never as a dense (tokens, units) matrix: memory does not grow with the text.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import explain
from .comparisons import density_bins, interpretable_fraction, matched_differences
from .config import ConfigError, StageConfig, UserError, check_positive
from .explain import ContextPools, SparseActivations, argsort, fit_token_tables
from .harvest import HOOK, held_out_windows, spread_windows  # noqa: F401 (the windows are read here too)
from .lm import random_lm  # noqa: F401 (the random-model control, re-exported)
from .tokenizer import EOT_ID, N_VOCAB, TokenTable  # GPT-2's; the chapters and the causal stage read them here too

DEFAULT_PROFILE = "cpu"

# --- detectors --------------------------------------------------------------------------------------

# Unicode blocks of the scripts in our corpus (non-English sources: Arabic Quran, Chinese poetry, UDHR and
# localised manuals in many languages)
_SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "hebrew": ((0x0590, 0x05FF),),
    "cyrillic": ((0x0400, 0x052F),),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cjk": ((0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
            (0xFF00, 0xFFEF)),
    "indic": ((0x0900, 0x0DFF),),
    "latin-diacritic": ((0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x024F)),  # é ü å ø ß ...
}
_CHAR_SETS: dict[str, str] = {
    "code-brace": "{}",
    "code-syntax": "();=<>[]*&|^%#~`",
    "digits": "0123456789",
}
_REGEXES: dict[str, re.Pattern[str]] = {
    "url": re.compile(r"(?:https?|ftp)://[^\s<>\"')\]]+|www\.[^\s<>\"')\]]+"),
    "citation": re.compile(r"\[@[^\]\s]*\]?|\\cite[a-zA-Z]*\{[^}]*\}|\[\d+(?:\s*[,–-]\s*\d+)*\]|\bet al\b\.?"),
    "latex": re.compile(r"\\[A-Za-z]+|\$"),
}
_PUNCTUATION = set(".,;:!?'\"-–—…()«»“”‘’")
FAMILIES: dict[str, str] = {
    **{name: f"a character of the {name} script" if name != "latin-diacritic" else
       "a Latin letter with a diacritic (é, ü, å, ø, ...)" for name in _SCRIPTS},
    "code-brace": "a curly brace, { or }",
    "code-syntax": "code punctuation: ( ) ; = < > [ ] * & | ^ % # ~ `",
    "digits": "a digit",
    "url": "part of a URL",
    "citation": "part of a citation marker: [@key], \\cite{...}, [12], et al.",
    "latex": "a LaTeX command (\\word) or a dollar sign",
    "punctuation": "only prose punctuation (. , ; : ! ? quotes dashes brackets)",
    "capitalised": "a capitalised word (Xxxx)",
    "whitespace": "only whitespace (newlines, indentation)",
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
_CAPITALISED = re.compile(r"^[A-Z][a-z]+$")


def _char_owners(pieces: Sequence[bytes]) -> tuple[str, np.ndarray, np.ndarray]:
    """The text of the concatenated token bytes (invalid UTF-8 -> U+FFFD) and, per character, the first
    and last token holding its bytes (a character split across byte-level tokens belongs to each)."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths)  # byte end (exclusive) of each token
    data = b"".join(pieces)
    if data.isascii():
        idx = np.arange(len(data))
        owner = np.searchsorted(ends, idx, side="right")
        return data.decode("ascii"), owner, owner
    chars, starts, sizes = [], [], []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        size = 1 if b < 0x80 else 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
        try:
            ch = data[i:i + size].decode("utf-8")
        except UnicodeDecodeError:
            ch, size = "\ufffd", 1
        chars.append(ch)
        starts.append(i)
        sizes.append(size)
        i += size
    s, z = np.asarray(starts, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    return "".join(chars), np.searchsorted(ends, s, side="right"), np.searchsorted(ends, s + z - 1, side="right")


def token_families(pieces: Sequence[bytes], eot: Sequence[bool] | None = None) -> np.ndarray:
    """(T, len(FAMILY_NAMES)) bool: which families each token of one contiguous text belongs to.

    ``pieces``: each token's bytes, in order; ``eot``: tokens that are document separators (no family).
    Character families (scripts, braces, digits) mark every token holding part of such a character;
    pattern families (URLs, citations, LaTeX) every token overlapping a match in the decoded text; token
    families (punctuation, capitalised, whitespace) look at the token alone."""
    T = len(pieces)
    out = np.zeros((T, len(FAMILY_NAMES)), dtype=bool)
    if T == 0:
        return out
    col = {name: j for j, name in enumerate(FAMILY_NAMES)}
    text, first, last = _char_owners(pieces)
    if text:
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        char_masks = []
        for name, ranges in _SCRIPTS.items():
            m = np.zeros(len(cp), dtype=bool)
            for lo, hi in ranges:
                m |= (cp >= lo) & (cp <= hi)
            char_masks.append((col[name], m))
        for name, chars in _CHAR_SETS.items():
            char_masks.append((col[name], np.isin(cp, np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32))))
        spanning = np.flatnonzero(first != last)
        for j, m in char_masks:
            out[first[m], j] = True
            for c in spanning[m[spanning]]:
                out[first[c]:last[c] + 1, j] = True
        for name, pattern in _REGEXES.items():
            for match in pattern.finditer(text):
                a, b = match.span()
                if b > a:
                    out[first[a]:last[b - 1] + 1, col[name]] = True
    for t, piece in enumerate(pieces):
        s = piece.decode("utf-8", errors="replace")
        stripped = s.strip()
        if not stripped:
            out[t, col["whitespace"]] = bool(s)
        elif all(c in _PUNCTUATION for c in stripped):
            out[t, col["punctuation"]] = True
        elif _CAPITALISED.match(stripped):
            out[t, col["capitalised"]] = True
    if eot is not None:
        out[np.asarray(eot, dtype=bool)] = False
    return out


def window_families(tokenizer, windows: np.ndarray) -> np.ndarray:
    """(W, T, F) bool family labels of token windows (W, T), each window read as one text. ``tokenizer``:
    GPT-2's (:mod:`monosemantic.tokenizer`) or any with ``token_bytes``, ``eot_id`` and ``n_vocab``."""
    eot, n_vocab = getattr(tokenizer, "eot_id", EOT_ID), getattr(tokenizer, "n_vocab", N_VOCAB)
    out = np.zeros((*windows.shape, len(FAMILY_NAMES)), dtype=bool)
    cache: dict[int, bytes] = {}
    for w, ids in enumerate(windows):
        missing = sorted({i for i in ids.tolist() if i not in cache})
        real = [i for i in missing if i != eot and i < n_vocab]
        cache.update(dict.fromkeys(missing, b""))
        cache.update(zip(real, tokenizer.token_bytes(real), strict=True))
        out[w] = token_families([cache[i] for i in ids.tolist()], ids == eot)
    return out


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


# --- the streaming pass -----------------------------------------------------------------------------

_HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61)[1:]])  # bins of log10 width 0.1, clipped ends


class _PairSums:
    """Sums and counts of values per (unit, token) pair, accumulated sparsely and compacted as it grows."""

    def __init__(self, n_tokens: int = 1 << 20):  # above every vocabulary we read (Llama-3's: 128,256)
        self.v = n_tokens
        self.keys: list[np.ndarray] = []
        self.sums: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self._pending = 0

    def add(self, units: np.ndarray, tokens: np.ndarray, values: np.ndarray) -> None:
        self.keys.append(units.astype(np.int64) * self.v + tokens.astype(np.int64))
        self.sums.append(values.astype(np.float64))
        self.counts.append(np.ones(len(values), dtype=np.int64))
        self._pending += len(values)
        if self._pending > 20_000_000:
            self._compact()

    def _compact(self) -> None:
        if not self.keys:
            return
        keys, inv = np.unique(np.concatenate(self.keys), return_inverse=True)
        sums = np.bincount(inv, weights=np.concatenate(self.sums), minlength=len(keys))
        counts = np.bincount(inv, weights=np.concatenate(self.counts), minlength=len(keys)).astype(np.int64)
        self.keys, self.sums, self.counts, self._pending = [keys], [sums], [counts], 0

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(units, tokens, sums, counts), one entry per pair seen."""
        self._compact()
        if not self.keys:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e.astype(np.float64), e
        keys = self.keys[0]
        return keys // self.v, keys % self.v, self.sums[0], self.counts[0]

    def where(self, other: _PairSums, flip: np.ndarray) -> _PairSums:
        """The pairs of the units not in ``flip`` (n,) bool from ``self``, of those in it from ``other``."""
        out = _PairSums(self.v)
        for mine, pairs in ((False, self), (True, other)):
            units, tokens, sums, counts = pairs.result()
            keep = flip[units] == mine
            out.keys.append(units[keep] * self.v + tokens[keep])
            out.sums.append(sums[keep])
            out.counts.append(counts[keep])
        out._compact()
        return out


def _top_tokens_frame(set_name: str, st: _Stats, top: int) -> Any:
    """The ``top`` tokens of each unit by activation mass: rows (set, unit, token, mass, count, rank, share),
    share = the token's part of the unit's total activation."""
    import pandas as pd

    units, toks, sums, counts = st.pairs.result()
    frame = pd.DataFrame({"unit": units, "token": toks, "mass": sums, "count": counts})
    frame = frame.sort_values(["unit", "mass"], ascending=[True, False]).groupby("unit").head(top).copy()
    frame["rank"] = frame.groupby("unit").cumcount()
    frame["share"] = frame["mass"] / st.total.numpy()[frame["unit"].to_numpy()]
    frame.insert(0, "set", set_name)
    return frame


def _pool_merge(keys: Tensor, index: Tensor, new_keys: Tensor, new_index: Tensor, slots: Tensor,
                extras: Sequence[tuple[Tensor, Tensor | Callable[[Tensor], Tensor]]] = ()) -> None:
    """In place: per slot (column), keep the ``P`` largest keys of the pool (P, n) and of the new entries
    (``new_keys`` (M,) in column ``slots`` (M,)), with their ``index``, in rank order (largest first; among
    equal keys the pool's entries, then the new ones in the order given). ``extras``: more per-entry values
    kept alike, (pool (P, n, ...), the new entries' (M, ...) or a function of the positions (K,) among the
    new entries of those that enter -> their (K, ...)).

    Only entries above a column's current minimum are passed in, which after the first batches is a small
    fraction of the tokens: a sparse merge instead of a dense top-k over every token of every column. Only
    the new entries are sorted: a pool column is in rank order already, so each entry's new rank is its rank
    on its own side plus a count, by binary search, of the entries from the other side ahead of it."""
    P = keys.shape[0]
    if new_keys.numel() == 0:
        return
    new_c = _sort_key(slots, new_keys)
    order = argsort(new_c)  # (M,) by slot, then largest key first
    new_c = new_c[order]
    cols, count = torch.unique_consecutive(slots[order], return_counts=True)  # (m,) the columns offered to
    first = torch.cumsum(count, 0) - count  # (m,) each column's first new entry
    col = torch.repeat_interleave(torch.arange(len(cols)), count)  # (M,) the column (of cols) of each new entry
    old_k = keys[:, cols].t().contiguous()  # (m, P), rank order
    old_c = _sort_key(cols[:, None], old_k)  # (m, P): ascending, as new_c is
    # a new entry's rank: the new entries ahead of it, plus the pool's entries at least as large (they win ties)
    new_rank = (torch.arange(len(order)) - first[col]
                + torch.searchsorted(old_c.reshape(-1), new_c, right=True) - col * P)
    # a pool entry's rank: its place, plus the new entries strictly larger
    old_rank = torch.arange(P) + torch.searchsorted(new_c, old_c) - first[:, None]  # (m, P)
    # only the pool's entries that move and the new ones that enter are written
    oc, op = torch.nonzero((old_rank < P) & (old_rank != torch.arange(P)), as_tuple=True)
    kept = torch.nonzero(new_rank < P).squeeze(1)
    to_rank = torch.cat([old_rank[oc, op], new_rank[kept]])
    to_col = cols[torch.cat([oc, col[kept]])]
    for pool, new in [(keys, new_keys), (index, new_index), *extras]:
        entering = new(order[kept]) if callable(new) else new[order[kept]]
        pool[to_rank, to_col] = torch.cat([pool[op, cols[oc]], entering.to(pool.dtype)])  # read, then written


def _sort_key(slots: Tensor, keys: Tensor) -> Tensor:
    """int64 that sorts ascending as (slot ascending, float32 key descending)."""
    bits = keys.float().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # in the keys' order, in [-2^31, 2^31)
    return slots * (1 << 32) + (0x7FFFFFFF - bits)


@dataclasses.dataclass
class _Stats:
    """What one pass over the explanation windows accumulates for one unit set."""

    n: int
    pool: int
    fired: Tensor = None  # (n,) int64
    max: Tensor = None  # (n,) largest activation
    total: Tensor = None  # (n,) float64
    best_v: Tensor = None  # (pool, n) top activations
    best_i: Tensor = None  # (pool, n) their global token index
    hist: Tensor = None  # (n, bins) counts of non-zero activations by log bin
    family_mass: Tensor = None  # (n, F) float64
    pairs: _PairSums = None
    polarity: Tensor = None  # (n,) +-1: the half these statistics are of (module docstring)
    other: Tensor = None  # (n,) float64: activation mass of the other half, left out

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.n, dtype=torch.int64)
        self.max = torch.zeros(self.n)
        self.total = torch.zeros(self.n, dtype=torch.float64)
        self.best_v = torch.full((self.pool, self.n), -1.0)
        self.best_i = torch.zeros((self.pool, self.n), dtype=torch.int64)
        self.hist = torch.zeros((self.n, len(_HIST_EDGES) - 1), dtype=torch.int64)
        self.family_mass = torch.zeros((self.n, len(FAMILY_NAMES)), dtype=torch.float64)
        self.pairs = _PairSums()
        self.polarity = torch.ones(self.n)
        self.other = torch.zeros(self.n, dtype=torch.float64)

    def add(self, a: SparseActivations, lab: np.ndarray, ids: np.ndarray, offset: int, pool: bool,
            edges: Tensor) -> None:
        """Accumulate the positive activations ``a`` (the non-zeros of (N, n), all > 0) of tokens ``ids`` (N,)
        with family labels ``lab`` (N, F); ``offset``: the global index of the first; ``pool``: keep the
        top-activation pool too."""
        rows, units, vals = a.rows, a.units, a.values
        self.fired += torch.bincount(units, minlength=self.n)
        self.total.index_add_(0, units, vals.double())
        self.family_mass += _family_mass(a, lab)
        self.max.scatter_reduce_(0, units, vals.to(self.max.dtype), "amax")
        if pool:  # the top-activation pool is only needed for dashboards
            beat = vals > self.best_v[-1][units]  # beats the pool's smallest
            _pool_merge(self.best_v, self.best_i, vals[beat], rows[beat] + offset, units[beat])
        bins = torch.bucketize(vals, edges)
        self.hist.view(-1).index_add_(0, units * self.hist.shape[1] + bins, torch.ones_like(bins))
        self.pairs.add(units.numpy(), ids[rows.numpy()], vals.numpy())

    def choose(self, neg: _Stats) -> None:
        """In place: these statistics (of the positive halves, max(a, 0)) become those of each unit's
        stronger half, taking ``neg``'s (of max(-a, 0)) where the negative half carries more mass."""
        flip = neg.total > self.total  # (n,) polarity -1
        self.other = torch.where(flip, self.total, neg.total)
        self.polarity = torch.where(flip, -1.0, 1.0)
        for name in ("fired", "max", "total", "hist", "family_mass"):
            getattr(self, name)[flip] = getattr(neg, name)[flip]
        self.best_v[:, flip] = neg.best_v[:, flip]
        self.best_i[:, flip] = neg.best_i[:, flip]
        self.pairs = self.pairs.where(neg.pairs, flip.numpy())


def _mlp_batches(model, windows: np.ndarray, batch: int) -> Iterator[tuple[int, Tensor]]:
    """(first window, (B*T, d_mlp) MLP activations) for consecutive batches of windows (W, T)."""
    for b in range(0, len(windows), batch):
        x = torch.as_tensor(windows[b:b + batch].astype(np.int64))
        yield b, model.run_with_cache(x, [HOOK])[HOOK].reshape(-1, model.config.d_mlp)


def _family_mass(a: SparseActivations, lab: np.ndarray) -> Tensor:
    """(n, F) float64 a.t() @ lab: each unit's activation mass on each family, from the non-zeros ``a`` of
    (N, n) and the labels ``lab`` (N, F) (a sparse product: no dense (N, n) matrix)."""
    import scipy.sparse as sp

    N, n = int(np.prod(a.shape[:-1])), a.shape[-1]
    indptr = torch.searchsorted(a.rows, torch.arange(N + 1)).numpy()  # rows are ascending
    m = sp.csr_matrix((a.values.double().numpy(), a.units.numpy(), indptr), shape=(N, n))
    return torch.from_numpy(np.asarray(m.T @ lab))


def _measured_nonzeros(a: SparseActivations, T: int, skip: int) -> SparseActivations:
    """The entries of non-zeros ``a`` of B windows of T tokens (rows: window * T + position) that are
    measured: not at the first ``skip`` positions of a window (module docstring)."""
    return a if skip == 0 else a.keep(a.rows % T >= skip)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig(StageConfig):
    """Which text, how many examples per unit, and the score thresholds."""

    STAGE: ClassVar[str] = "analysis"
    VERSION: ClassVar[int] = 2  # 2: first positions not measured; scored needs min_heldout_firings

    explain_tokens: int = 2_000_000
    """Train-split tokens (in context-length windows spread evenly over the split) for dashboards,
    explanations and best families. The scores are measured on the whole val split."""
    top_contexts: int = 12
    """Top activating contexts kept per unit (one per document)."""
    intervals: int = 4
    """Activation intervals (equal widths of (0, max]) below the top to sample contexts from ..."""
    interval_samples: int = 3
    """... and how many from each."""
    before: int = 16
    after: int = 4
    top_tokens: int = 10
    logit_tokens: int = 10
    neighbours: int = 5
    """Nearest units by decoder cosine, per unit (SAE features only)."""
    batch_windows: int = 64
    min_firings: int = 10
    """A unit is scored when it fires on at least this many explanation tokens ..."""
    min_heldout_firings: int = 50
    """... and on at least this many held-out tokens; one that does not is counted as too rare to score."""
    skip_first_positions: int = 1
    """Positions at the start of every window that are not measured (the first one's activations are
    outliers); what the top activations would have been there is reported apart."""
    explainer: str = "token-table"
    """Who explains and simulates: ``token-table`` (offline), ``openai:<model>@<base_url>`` or
    ``hf:<model>`` (:mod:`monosemantic.explain`)."""
    explanation_tokens: int = 20
    """Tokens a token-table explanation lists (the largest mean activations of its dashboard)."""
    predict_fraction: float = 0.5
    """An explanation predicts a firing where its simulation reaches this share of its largest value (a
    token table's; 10 on a chat model's 0-10 scale): the threshold of detection."""
    score_context: int = 32
    """Tokens of a held-out scoring context (a chunk of a window; delphi uses 32, Bills et al. 64)."""
    score_top: int = 10
    """Scoring mix per unit: its top held-out contexts ..."""
    score_per_interval: int = 5
    """... contexts sampled from each of ``intervals`` activation intervals ..."""
    score_random: int = 20
    """... and random contexts; detection adds ..."""
    score_negatives: int = 20
    """... random contexts where the unit does not fire."""
    corr_threshold: float = 0.5
    """Explain-then-predict: a unit counts as interpretable when its held-out correlation (all-token:
    ``explain_corr``; simulation: ``sim_corr``) reaches this ..."""
    detection_threshold: float = 0.8
    """... and as detected when its detection balanced accuracy does."""
    specificity_threshold: float = 0.5
    """Concept specificity: when at least this share of its held-out activation mass is in its family ..."""
    lift_threshold: float = 5.0
    """... and that share is at least this many times the family's share of tokens."""
    random_dictionary: bool = True
    """Measure a random dictionary beside the SAE (the chance control; ``monosemantic analyze`` only)."""
    density_bin_width: float = 0.5
    """Width of the held-out density bins, in decades (0.5: half-decade bins)."""
    n_boot: int = 1000
    """Bootstrap replicates of every interval."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self, "explain_tokens", "top_contexts", "intervals", "batch_windows", "min_firings",
                       "min_heldout_firings", "score_context", "score_top", "explanation_tokens", "n_boot",
                       integer=True)
        check_positive(self, "skip_first_positions", "score_per_interval", "score_random", "score_negatives",
                       integer=True, zero=True)
        if not 0 < self.corr_threshold < 1 or not 0 < self.specificity_threshold <= 1:
            raise ConfigError("AnalysisConfig: thresholds must lie in (0, 1)")
        if not 0.5 < self.detection_threshold <= 1 or not 0 < self.predict_fraction <= 1:
            raise ConfigError("AnalysisConfig: detection_threshold must lie in (0.5, 1], predict_fraction in (0, 1]")
        check_positive(self, "density_bin_width")
        try:
            explain.check_spec(self.explainer)
        except explain.ExplainerError as e:
            raise ConfigError(f"AnalysisConfig: {e}") from None


def _first_pass(model, sets: list[UnitSet], windows: np.ndarray, labels: np.ndarray, cfg: AnalysisConfig,
                progress: bool) -> list[_Stats]:
    """Each set's statistics on the explanation text, of each unit's stronger half (module docstring):
    both halves are accumulated for a set once it has shown a negative activation, and each unit keeps
    the half with more mass (``polarity``)."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    pool = 8 * cfg.top_contexts  # candidates, thinned to one per document
    stats = [_Stats(s.n_units, pool) for s in sets]
    negative: list[_Stats | None] = [None] * len(sets)  # the negative halves, made when first needed
    edges = torch.as_tensor(_HIST_EDGES[1:-1], dtype=torch.float32)
    for b, h in tqdm(_mlp_batches(model, windows, cfg.batch_windows), total=-(-W // cfg.batch_windows),
                     desc="analyze: explanation text", disable=not progress):
        ids = windows[b:b + cfg.batch_windows].reshape(-1)  # (N,)
        lab = labels[b:b + cfg.batch_windows].reshape(-1, labels.shape[-1]).astype(np.float64)  # (N, F)
        for k, (s, st) in enumerate(zip(sets, stats, strict=True)):
            with torch.no_grad():
                a = _measured_nonzeros(s.nonzeros(h), T, cfg.skip_first_positions)  # of (N, n)
            negative_values = a.values < 0
            if bool(negative_values.any()):  # a unit set that takes both signs (a non-negative one never gets here)
                if negative[k] is None:
                    negative[k] = _Stats(s.n_units, pool)
                neg = a.keep(negative_values)
                negative[k].add(neg._replace(values=-neg.values), lab, ids, b * T, s.contexts, edges)
                a = a.keep(~negative_values)
            st.add(a, lab, ids, b * T, s.contexts, edges)
    for st, neg in zip(stats, negative, strict=True):
        if neg is not None:
            st.choose(neg)
    return stats


class _Samples(NamedTuple):
    """What the second pass over the explanation text finds for one set (-1: no value)."""

    values: Tensor  # (I, S, n) interval samples: activations ...
    index: Tensor  # (I, S, n) ... and global token indices
    contexts: Tensor  # (I, S, n, before + 1 + after) the unit's activations around each sample (no dashboards: 0)
    top_contexts: list[np.ndarray]  # (before + 1 + after,) around each of the set's top examples
    first: Tensor  # (top_contexts, n) the largest activations at the first position of a window


def _interval_pass(model, sets: list[UnitSet], windows: np.ndarray, maxima: list[Tensor],
                   top: list[list[tuple[int, int]]], cfg: AnalysisConfig, progress: bool) -> list[_Samples]:
    """Per set: uniform samples of tokens from each activation interval (j/I max, (j+1)/I max], j < I, per
    unit; the unit's measured activations around each sample and around each of the ``top`` examples (unit,
    global index), ``before`` tokens before to ``after`` after (0 where not measured; from the neighbouring
    windows at a window's ends: cut off by :func:`_context_acts`), read while the samples are drawn rather
    than in a pass of their own; and the largest activations at the first position of a window (not
    measured, reported apart)."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    I, S = cfg.intervals, cfg.interval_samples
    L = cfg.before + 1 + cfg.after
    gen = torch.Generator().manual_seed(cfg.seed)
    # one pool column per (interval, unit): the S largest random keys among the tokens in that interval
    state = [(torch.full((S, I * s.n_units), -1.0), torch.zeros((S, I * s.n_units), dtype=torch.int64),
              torch.zeros((S, I * s.n_units)), torch.zeros((S, I * s.n_units, L) if s.contexts else (0,)))
             for s in sets]
    first = [torch.full((cfg.top_contexts, s.n_units), -1.0) for s in sets]
    # the top examples by batch: (unit, global index, example number) sorted by global index
    wanted = [np.array([(u, g, e) for e, (u, g) in enumerate(exs)], dtype=np.int64).reshape(-1, 3) for exs in top]
    wanted = [x[np.argsort(x[:, 1], kind="stable")] for x in wanted]
    top_contexts = [[np.zeros(L, dtype=np.float32)] * len(exs) for exs in top]
    for b, h in tqdm(_mlp_batches(model, windows, cfg.batch_windows), total=-(-W // cfg.batch_windows),
                     desc="analyze: interval samples", disable=not progress):
        for k, (s, mx) in enumerate(zip(sets, maxima, strict=True)):
            if not s.contexts:
                continue
            keys, idx, val, ctx = state[k]
            with torch.no_grad():
                full = s.orient_nonzeros(s.nonzeros(h))  # of (N, n), all > 0
            at0 = torch.full((len(h) // T, s.n_units), -1.0)  # (B, n): position 0 of each window
            zero = full.rows % T == 0
            at0[full.rows[zero] // T, full.units[zero]] = full.values[zero].to(at0.dtype)
            first[k] = torch.cat([first[k], at0]).topk(cfg.top_contexts, dim=0).values
            a = _measured_nonzeros(full, T, cfg.skip_first_positions)
            read = a.span_reader()
            rows, units, v = a.rows, a.units, a.values
            which = (torch.ceil(v / mx[units].clamp_min(1e-12) * I).long() - 1).clamp(0, I - 1)
            slot = which * s.n_units + units
            r = torch.rand(len(v), generator=gen)
            beat = torch.nonzero(r > keys[-1, slot]).squeeze(1)
            new_units, new_starts = units[beat], rows[beat] - cfg.before
            _pool_merge(keys, idx, r[beat], rows[beat] + b * T, slot[beat], extras=[
                (val, v[beat]),
                (ctx, lambda pos, read=read, u=new_units, s0=new_starts: read(u[pos], s0[pos], L))])  # entering
            lo, hi = np.searchsorted(wanted[k][:, 1], [b * T, b * T + len(h)])
            here = torch.as_tensor(wanted[k][lo:hi])  # (m, 3) the top examples in this batch
            for e, acts in zip(here[:, 2].tolist(), read(here[:, 0], here[:, 1] - b * T - cfg.before, L).numpy(),
                               strict=True):
                top_contexts[k][e] = acts
    out = []
    for (keys, idx, val, ctx), s, f, tc in zip(state, sets, first, top_contexts, strict=True):
        n = s.n_units
        v = torch.where(keys >= 0, val, -1.0).reshape(S, I, n).transpose(0, 1)  # (I, S, n)
        c = ctx.reshape(S, I, n, L).transpose(0, 1) if s.contexts else torch.zeros(I, S, n, 0)
        out.append(_Samples(v.contiguous(), idx.reshape(S, I, n).transpose(0, 1).contiguous(), c, tc, f))
    return out


def _context_acts(span: np.ndarray, t: int, T: int, cfg: AnalysisConfig) -> np.ndarray:
    """The part inside its window of the activations ``span`` (before + 1 + after,) around position ``t``."""
    lo, hi = max(0, t - cfg.before), min(T, t + cfg.after + 1)
    return span[lo - (t - cfg.before):hi - (t - cfg.before)].astype(np.float32)


def first_position_share(best_v: Tensor, best_i: Tensor, first_v: Tensor, K: int, T: int, skip: int) -> np.ndarray:
    """(n,) the share of each unit's ``K`` largest activations, over every position, that are at the first
    position of a window (NaN for a unit that never fired). ``best_v``, ``best_i`` (P >= K, n): the largest
    measured activations and their global indices; ``first_v`` (K, n): the largest at position 0 (-1: none),
    which were not measured when ``skip`` > 0 (and are in ``best_v`` already when it is 0)."""
    if skip == 0:
        top = best_v[:K]
        at0 = ((best_i[:K] % T == 0) & (top > 0)).sum(0)
        fired = (top > 0).sum(0)
    else:
        vals = torch.cat([best_v[:K], first_v[:K]])  # (2K, n), measured ones first: they win ties
        src = torch.arange(len(vals)) >= len(best_v[:K])  # (2K,) from position 0
        v, i = torch.sort(vals, dim=0, descending=True, stable=True)
        v, i = v[:K], i[:K]
        at0 = (src[i] & (v > 0)).sum(0)
        fired = (v > 0).sum(0)
    share = at0.double() / fired.clamp_min(1).double()
    return torch.where(fired > 0, share, float("nan")).numpy()


def score_context(cfg: AnalysisConfig, T: int) -> int:
    """Tokens per held-out scoring context: ``cfg.score_context``, or the whole window if that is shorter."""
    return min(cfg.score_context, T)


def _held_out_pass(model, sets: list[UnitSet], windows: np.ndarray, labels: np.ndarray, tables: list[Any],
                   maxima: list[Tensor], cfg: AnalysisConfig, progress: bool
                   ) -> tuple[list[dict[str, Tensor]], list[ContextPools]]:
    """Per set: held-out firing counts, activation mass by family, and the sums for each unit's Pearson
    correlation between its activation and its whole token table's prediction (``tables``), all of the
    measured oriented activations (``sets`` carry their polarity); ``raw_aa``: the sum of squares of the
    raw ones at every position. And per set, the contexts each unit's explanation is scored on."""
    from tqdm.auto import tqdm

    W, T = windows.shape
    skip = cfg.skip_first_positions
    acc = [{name: torch.zeros(s.n_units, dtype=torch.float64) for name in ("a", "aa", "p", "pp", "ap", "fired",
                                                                            "raw_aa")}
           | {"family_mass": torch.zeros((s.n_units, len(FAMILY_NAMES)), dtype=torch.float64)} for s in sets]
    C = score_context(cfg, T)
    pools = [ContextPools(mx, C, n_top=cfg.score_top, intervals=cfg.intervals, per_interval=cfg.score_per_interval,
                          n_random=cfg.score_random, n_negative=cfg.score_negatives, seed=cfg.seed) for mx in maxima]
    family_tokens = torch.zeros(len(FAMILY_NAMES), dtype=torch.float64)
    # the predictions p as float32, as the correlation reads them; a unit's sums of p and p^2 over the text
    # are those of its table's entries weighted by how often each token is measured (counts), and a * p is
    # non-zero only where the unit fires: no dense (N, n) prediction matrix
    tables = [t.astype(np.float32) for t in tables]  # (vocab, n) CSR
    counts = np.zeros(tables[0].shape[0] if tables else 0, dtype=np.int64)  # (vocab,) measured tokens
    for b, h in tqdm(_mlp_batches(model, windows, cfg.batch_windows), total=-(-W // cfg.batch_windows),
                     desc="analyze: held-out text", disable=not progress):
        win = windows[b:b + cfg.batch_windows]  # (B, T)
        ids = win.reshape(-1)
        counts += np.bincount(win[:, skip:].reshape(-1), minlength=len(counts))
        lab = labels[b:b + cfg.batch_windows]  # (B, T, F)
        family_tokens += torch.as_tensor(lab[:, skip:].sum((0, 1)), dtype=torch.float64)
        lab = lab.reshape(-1, lab.shape[-1]).astype(np.float64)  # (N, F)
        uniq, inv = np.unique(ids, return_inverse=True)
        inv = torch.as_tensor(inv.reshape(-1))  # (N,) each token's row of uniq
        for s, st, table, pool in zip(sets, acc, tables, pools, strict=True):
            with torch.no_grad():
                raw = s.nonzeros(h)  # of (N, n), every position
            st["raw_aa"].index_add_(0, raw.units, (raw.values * raw.values).double())
            a = _measured_nonzeros(s.orient_nonzeros(raw), T, skip)  # all > 0
            st["a"].index_add_(0, a.units, a.values.double())
            st["aa"].index_add_(0, a.units, (a.values * a.values).double())
            st["fired"] += torch.bincount(a.units, minlength=s.n_units).double()
            st["family_mass"] += _family_mass(a, lab)
            p = torch.as_tensor(table[uniq].toarray())[inv[a.rows], a.units]  # (nnz,) predictions where a fires
            st["ap"].index_add_(0, a.units, (a.values * p).double())
            pool.add(a._replace(shape=(len(win), T, s.n_units)), b * (T // C))
    n = W * (T - skip)  # measured tokens
    weights = counts.astype(np.float64)
    for st, table in zip(acc, tables, strict=True):
        st["p"] = torch.as_tensor(table.T @ weights)
        st["pp"] = torch.as_tensor(table.multiply(table).T @ weights)  # p * p in float32, as p is read
        st["n"] = torch.tensor(float(n))
        st["family_tokens"] = family_tokens
    return acc, pools


def pearson(st: dict[str, Tensor]) -> Tensor:
    """Correlation from running sums (a, aa, p, pp, ap over n): NaN where the activation never varies,
    0 where the prediction never does (an explanation that predicts nothing)."""
    n = st["n"]
    cov = st["ap"] / n - st["a"] / n * st["p"] / n
    var_a = (st["aa"] / n - (st["a"] / n) ** 2).clamp_min(0)
    var_p = (st["pp"] / n - (st["p"] / n) ** 2).clamp_min(0)
    r = cov / (var_a * var_p).sqrt()
    r = torch.where(var_p <= 1e-18, torch.zeros_like(r), r)
    return torch.where(var_a <= 1e-18, torch.full_like(r, float("nan")), r)


# --- the whole analysis -----------------------------------------------------------------------------

def analyze(model, tokenizer: TokenTable, sets: list[UnitSet], explain_tokens: np.ndarray, val_tokens: np.ndarray,
            cfg: AnalysisConfig, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every pass; returns pandas tables: ``units`` (one row per unit of every set), ``contexts``,
    ``top_tokens``, ``logits``, ``histograms``, ``families`` and a ``vocab`` of the token strings used.
    Every unit that fires on at least ``min_heldout_firings`` held-out tokens is explained and scored by the
    explainer ``cfg.explainer`` names (:mod:`monosemantic.explain`).

    ``model``: the one-layer LM, or any object with its interface (``config.context_length``, ``d_mlp``,
    ``vocab_size``; ``run_with_cache(ids, [HOOK])``), a ``logit_effects(directions)`` and ``n_vocab`` (real
    tokens) of its own, as :class:`monosemantic.llama_eval.LayerModel` has for SmolLM2 or Stheno.
    ``tokenizer``: ``token_bytes``, ``token_strings`` and ``eot_id`` (the document separator).

    ``explain_tokens``: a 1-D token array, read in ``cfg.explain_tokens`` tokens of windows of the model's
    context T spread evenly over it (:func:`spread_windows`). ``val_tokens``, the held-out text: a 1-D token
    array, read whole in windows spread evenly over it, or (W, T) windows read as they are (windows taken
    from many places, each a text of its own)."""
    import pandas as pd

    T = model.config.context_length
    windows, starts = spread_windows(explain_tokens, T, cfg.explain_tokens)
    val_windows = held_out_windows(val_tokens, T)
    log(f"analyze: {windows.size:,} explanation tokens, {val_windows.size:,} held-out tokens, "
        + ", ".join(f"{s.n_units:,} {s.name}" for s in sets))
    labels = window_families(tokenizer, windows)
    val_labels = window_families(tokenizer, val_windows)
    stats = _first_pass(model, sets, windows, labels, cfg, progress)
    # from here on every set is read through its units' polarities: oriented activations max(p a, 0)
    sets = [dataclasses.replace(s, polarity=st.polarity) for s, st in zip(sets, stats, strict=True)]
    maxima = [st.max for st in stats]

    eots = np.flatnonzero(np.asarray(explain_tokens) == getattr(tokenizer, "eot_id", EOT_ID))

    def document(g: np.ndarray) -> np.ndarray:  # the document of global index g (window * T + t)
        return np.searchsorted(eots, starts[g // T] + g % T)

    examples: list[list[tuple[int, int]]] = []  # per set: (unit, global index), the top ones first
    example_meta: list[list[dict[str, Any]]] = []
    for s, st in zip(sets, stats, strict=True):
        exs, meta = [], []
        if s.contexts:
            docs = document(st.best_i.numpy())  # (pool, n)
            bv = st.best_v.numpy()
            for u in range(s.n_units):
                seen: set[int] = set()
                for r in range(st.pool):
                    if bv[r, u] <= 0 or len(seen) == cfg.top_contexts:
                        break
                    if docs[r, u] in seen:
                        continue
                    seen.add(int(docs[r, u]))
                    exs.append((u, int(st.best_i[r, u])))
                    meta.append({"unit": u, "kind": "top", "interval": -1, "rank": len(seen) - 1,
                                 "activation": float(bv[r, u]), "document": int(docs[r, u])})
        examples.append(exs)
        example_meta.append(meta)
    intervals = _interval_pass(model, sets, windows, maxima, examples, cfg, progress)
    context_acts = [[_context_acts(span, g % T, T, cfg) for (_, g), span in zip(exs, sm.top_contexts, strict=True)]
                    for exs, sm in zip(examples, intervals, strict=True)]
    for s, exs, meta, acts, sm in zip(sets, examples, example_meta, context_acts, intervals, strict=True):
        if s.contexts:
            ivv, iii, ivc = sm.values.numpy(), sm.index.numpy(), sm.contexts.numpy()
            for j in range(cfg.intervals):
                for r in range(cfg.interval_samples):
                    for u in np.flatnonzero(ivv[j, r] > 0):
                        g = int(iii[j, r, u])
                        exs.append((int(u), g))
                        meta.append({"unit": int(u), "kind": "interval", "interval": j, "rank": r,
                                     "activation": float(ivv[j, r, u]), "document": int(document(np.array([g]))[0])})
                        acts.append(_context_acts(ivc[j, r, u], g % T, T, cfg))

    skip = cfg.skip_first_positions
    tables, shown_by_set, context_rows = [], [], []
    for s, exs, meta, acts in zip(sets, examples, example_meta, context_acts, strict=True):
        shown: list[tuple[int, np.ndarray, np.ndarray]] = []
        for (u, g), m, a in zip(exs, meta, acts, strict=True):
            t = g % T
            lo = max(0, t - cfg.before)
            ids = windows[g // T, lo:lo + len(a)]
            measured = lo + np.arange(len(a)) >= skip
            shown.append((u, ids[measured], a[measured]))
            context_rows.append({"set": s.name, **m, "center": t - lo, "tokens": ids.astype(np.int32),
                                 "acts": a.astype(np.float16)})
        tables.append(fit_token_tables(s.n_units, shown, model.config.vocab_size))
        shown_by_set.append(shown)
    held, pools = _held_out_pass(model, sets, val_windows, val_labels, tables, maxima, cfg, progress)

    measured_explain = labels[:, skip:].reshape(-1, labels.shape[-1])
    base_explain = torch.as_tensor(measured_explain.mean(0), dtype=torch.float64)
    n_explain = len(measured_explain)
    scored_by_set = [(st.fired.numpy() >= cfg.min_firings) & (h["fired"].numpy() >= cfg.min_heldout_firings)
                     for st, h in zip(stats, held, strict=True)]
    explainer = explain.make_explainer(cfg.explainer, tokenizer.token_strings, n_tokens=cfg.explanation_tokens,
                                       predict_fraction=cfg.predict_fraction)
    log(f"analyze: explaining and scoring {sum(int(x.sum()) for x in scored_by_set):,} units with {explainer.name}"
        f" ({sum(int((h['fired'] < cfg.min_heldout_firings).sum()) for h in held):,} fire on fewer than "
        f"{cfg.min_heldout_firings} held-out tokens: too rare to score)")
    scores = [explain.explain_and_score(explainer, shown, pool, scored, val_windows, skip, progress, s.name)
              for s, shown, pool, scored in zip(sets, shown_by_set, pools, scored_by_set, strict=True)]
    if hasattr(explainer.simulate, "failures") and explainer.simulate.failures:
        log(f"analyze: {explainer.simulate.failures:,} simulations could not be read (predicted as zeros)")

    unit_rows, token_rows, logit_rows, hist_rows = [], [], [], []
    for s, st, h, mx, iv, scored_s, sc in zip(sets, stats, held, maxima, intervals, scored_by_set, scores,
                                             strict=True):
        corr = pearson(h).numpy()
        maxima_s = mx.numpy()
        first_share = first_position_share(st.best_v, st.best_i, iv.first, cfg.top_contexts, T, skip)
        heldout_fired = h["fired"].numpy().astype(np.int64)
        # best family: the largest share of the unit's mass on the explanation text, among families with a
        # lift of at least 2 there (a unit is not "about" whitespace because whitespace is everywhere)
        share_e = (st.family_mass / st.total.clamp_min(1e-12)[:, None]).numpy()
        lift_e = share_e / np.maximum(base_explain.numpy(), 1e-12)
        choice = np.where(lift_e >= 2, share_e, -1.0)
        best = choice.argmax(1)
        has_family = choice.max(1) > 0
        # a share of a non-negative mass: in [0, 1] but for float32 rounding of the family sums
        share_v = np.clip((h["family_mass"] / h["a"].clamp_min(1e-12)[:, None]).numpy(), 0.0, 1.0)
        base_v = (h["family_tokens"] / h["n"]).numpy()
        hist = st.hist.numpy()
        q = _quantiles(hist, (0.5, 0.9, 0.99))
        up_v, up_i, down_v, down_i = logit_extremes(model, s.directions, st.polarity, cfg.logit_tokens)
        polarity, other = st.polarity.numpy(), st.other.numpy()
        absolute = st.total.numpy() + other  # the unit's |a| mass on the explanation text
        fired_e = st.fired.numpy()
        for u in range(s.n_units):
            fam = FAMILY_NAMES[best[u]] if has_family[u] else ""
            scored = bool(scored_s[u])
            sv = float(share_v[u, best[u]]) if has_family[u] else float("nan")
            bv_ = float(base_v[best[u]]) if has_family[u] else float("nan")
            unit_rows.append({
                "set": s.name, "unit": u, "density": fired_e[u] / n_explain,
                "density_val": float(h["fired"][u] / h["n"]), "mean": float(st.total[u] / n_explain),
                "max": float(maxima_s[u]),
                "q50": q[u, 0], "q90": q[u, 1], "q99": q[u, 2], "scored": bool(scored),
                "explain_corr": float(corr[u]) if scored else float("nan"),
                "family": fam, "family_share": sv if scored else float("nan"),
                "family_base": bv_, "family_lift": sv / bv_ if scored and bv_ > 0 else float("nan"),
                "polarity": int(polarity[u]),
                "other_sign_share": float(other[u] / absolute[u]) if absolute[u] > 0 else 0.0,
                "heldout_firings": int(heldout_fired[u]),
                "too_rare": bool(heldout_fired[u] < cfg.min_heldout_firings),
                **sc.get(u, explain.UNSCORED), "first_pos_top_share": float(first_share[u])})
            for j, (v, i) in enumerate(zip(up_v[u].tolist(), up_i[u].tolist(), strict=True)):
                logit_rows.append({"set": s.name, "unit": u, "sign": 1, "rank": j, "token": i, "effect": v})
            for j, (v, i) in enumerate(zip(down_v[u].tolist(), down_i[u].tolist(), strict=True)):
                logit_rows.append({"set": s.name, "unit": u, "sign": -1, "rank": j, "token": i, "effect": -v})
        hist_rows.append(pd.DataFrame({"set": s.name, "unit": np.arange(s.n_units),
                                       "counts": list(hist.astype(np.int32))}))
        frame = _top_tokens_frame(s.name, st, cfg.top_tokens)
        if len(frame):
            token_rows.append(frame)
    neighbour_rows = []
    for s in sets:
        if s.name == "neurons":
            continue  # the standard basis: every pair is orthogonal
        d = torch.nn.functional.normalize(s.directions.float() * s.polarity[:, None], dim=1)
        cos = d @ d.t()
        cos.fill_diagonal_(-2.0)
        v, i = cos.topk(min(cfg.neighbours, s.n_units - 1), dim=1)
        neighbour_rows.append(pd.DataFrame({
            "set": s.name, "unit": np.repeat(np.arange(s.n_units), v.shape[1]),
            "rank": np.tile(np.arange(v.shape[1]), s.n_units), "other": i.reshape(-1).numpy(),
            "cosine": v.reshape(-1).numpy()}))
    units_df = pd.DataFrame(unit_rows)
    contexts_df = pd.DataFrame(context_rows)
    top_tokens_df = pd.concat(token_rows, ignore_index=True) if token_rows else pd.DataFrame()
    logits_df = pd.DataFrame(logit_rows)
    used = set(top_tokens_df["token"].tolist() if len(top_tokens_df) else [])
    used |= set(logits_df["token"].tolist())
    if explainer.name == explain.TOKEN_TABLE:  # an explanation's tokens, so that the browser can show them
        for text in units_df["explanation"]:
            used |= set(explain.parse_token_table(text)[0].tolist())
    for ids in contexts_df.get("tokens", []):
        used |= set(ids.tolist())
    used_ids = np.array(sorted(used), dtype=np.int64)
    special = (used_ids == getattr(tokenizer, "eot_id", EOT_ID)) | (used_ids >= getattr(tokenizer, "n_vocab", N_VOCAB))
    real = tokenizer.token_bytes(used_ids[~special])
    pieces = [b""] * len(used_ids)
    for j, piece in zip(np.flatnonzero(~special), real, strict=True):
        pieces[j] = piece
    # bytes too, so that the browser shows any model's tokens without its tokenizer
    vocab = pd.DataFrame({"token": used_ids, "text": tokenizer.token_strings(used_ids), "bytes": pieces,
                          "special": special | np.array([not p for p in pieces], dtype=bool)})
    families = pd.DataFrame({"family": list(FAMILY_NAMES), "description": [FAMILIES[f] for f in FAMILY_NAMES],
                             "token_share_explain": base_explain.numpy(),
                             "token_share_val": (held[0]["family_tokens"] / held[0]["n"]).numpy()})
    # E|h|^2 of the MLP's activations on held-out text (the neurons' sum of squares): the scale an L1
    # coefficient is relative to
    mean_sq = {s.name: float(h["raw_aa"].sum() / val_windows.size) for s, h in zip(sets, held, strict=True)
               if s.name == "neurons"}  # every position: what an SAE trains on
    return {"mlp_mean_sq_norm": mean_sq.get("neurons"), "explainer": explainer.name,
            "units": units_df, "contexts": contexts_df, "top_tokens": top_tokens_df, "logits": logits_df,
            "histograms": pd.concat(hist_rows, ignore_index=True), "vocab": vocab, "families": families,
            "neighbours": pd.concat(neighbour_rows, ignore_index=True) if neighbour_rows else pd.DataFrame(
                columns=["set", "unit", "rank", "other", "cosine"]),
            "tokens": {"explain": n_explain, "held_out": int(held[0]["n"]) if held else 0},
            # for per-family curves (:mod:`monosemantic.family_curves`): the sets with their polarities, and each
            # unit's explanation-text share of activation mass per family and firings there
            "oriented_sets": sets,
            "family_share_explain": {s.name: (st.family_mass / st.total.clamp_min(1e-12)[:, None]).numpy()
                                     for s, st in zip(sets, stats, strict=True)},
            "fired_explain": {s.name: st.fired.numpy() for s, st in zip(sets, stats, strict=True)},
            "held_out_labels": val_labels}  # (W, T, F) family labels of the held-out windows


def _quantiles(hist: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """(n, len(qs)) quantiles of each unit's non-zero activations from its log-binned histogram (bin
    geometric centres; NaN for a unit that never fired)."""
    edges = _HIST_EDGES.copy()
    edges[0] = 1e-3 / 10 ** 0.1
    centres = np.sqrt(edges[:-1] * edges[1:])
    cum = np.cumsum(hist, axis=1)
    total = cum[:, -1:]
    out = np.full((hist.shape[0], len(qs)), np.nan)
    for j, q in enumerate(qs):
        idx = (cum < q * np.maximum(total, 1)).sum(1)
        out[:, j] = np.where(total[:, 0] > 0, centres[np.minimum(idx, len(centres) - 1)], np.nan)
    return out


# --- feature splitting ------------------------------------------------------------------------------

def split_table(decoders: dict[int, Tensor]) -> Any:
    """For each dictionary size but the smallest, each feature's nearest feature (decoder cosine) in the
    next smaller dictionary: rows (width, feature, parent_width, parent, cosine)."""
    import pandas as pd

    widths = sorted(decoders)
    rows = []
    for small, large in zip(widths, widths[1:], strict=False):
        a = torch.nn.functional.normalize(decoders[small].float(), dim=1)
        b = torch.nn.functional.normalize(decoders[large].float(), dim=1)
        cos = b @ a.t()  # (large, small)
        v, i = cos.max(1)
        rows.append(pd.DataFrame({"width": large, "feature": np.arange(len(b)), "parent_width": small,
                                  "parent": i.numpy(), "cosine": v.numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["width", "feature", "parent_width", "parent", "cosine"])


def token_profiles(model, sets: list[UnitSet], tokens: np.ndarray, n_tokens: int, top: int = 5,
                   batch_windows: int = 64, progress: bool = True, skip_first_positions: int = 1) -> Any:
    """The ``top`` tokens of each unit by activation mass over ``n_tokens`` of ``tokens`` (no dashboards):
    rows (set, unit, rank, token, mass, count, share), plus each unit's density as rank -1 rows' ``share``."""
    import pandas as pd

    cfg = AnalysisConfig(explain_tokens=n_tokens, batch_windows=batch_windows,
                         skip_first_positions=skip_first_positions)
    windows, _ = spread_windows(tokens, model.config.context_length, n_tokens)
    labels = np.zeros((*windows.shape, len(FAMILY_NAMES)), dtype=bool)  # families are not needed here
    stats = _first_pass(model, sets, windows, labels, cfg, progress)
    frames = []
    for s, st in zip(sets, stats, strict=True):
        frames.append(_top_tokens_frame(s.name, st, top))
        measured = len(windows) * (windows.shape[1] - cfg.skip_first_positions)
        dens = pd.DataFrame({"set": s.name, "unit": np.arange(s.n_units), "token": -1, "mass": st.total.numpy(),
                             "count": st.fired.numpy(), "rank": -1, "share": st.fired.numpy() / measured})
        frames.append(dens)
    return pd.concat(frames, ignore_index=True)


# --- the stage ---------------------------------------------------------------------------------------

MAIN_SAE = "topk"  # the SAE whose features the chapter shows (the better recipe)
RANDOM_DICTIONARY = "random"  # the set of random directions with the TopK SAE's encoding
RANDOM_MODEL = "random-model"  # the set (and sae/<profile>-random-model artifact) of an SAE on a random LM
NEURON_TOPK = "neuron-topk"  # the half-neurons of a two-signed layer, k per token (UnitSet.neuron_topk)
TABLES = ("units", "contexts", "top_tokens", "logits", "histograms", "vocab", "families", "neighbours")
CONTROL_TABLES = ("density_bins", "density_matched")
LABELS = {"neurons": "neurons", MAIN_SAE: "features", "anchor": "anchor_features",
          RANDOM_DICTIONARY: "random_dictionary", RANDOM_MODEL: "random_model_features",
          NEURON_TOPK: "neuron_topk"}  # manifest names
_NO_CONTEXTS = ("anchor", RANDOM_DICTIONARY, RANDOM_MODEL, NEURON_TOPK)  # sets whose dashboards are not kept


def control_tables(units, cfg: AnalysisConfig) -> dict[str, Any]:
    """The tables of :data:`CONTROL_TABLES` for an analysis's ``units``: every score's pass fraction per set
    and density bin, and each set's density-matched difference from the neurons."""
    return {"density_bins": density_bins(units, cfg), "density_matched": matched_differences(units, cfg)}


def drop_control_contexts(result: dict[str, Any]) -> None:
    """Drop the dashboards of the sets in ``_NO_CONTEXTS`` from an :func:`analyze` result: they only served
    those sets' explanations; their scores are kept, their contexts would multiply the committed size."""
    result["contexts"] = result["contexts"][~result["contexts"]["set"].isin(_NO_CONTEXTS)]


def _random_model_set(profile: str, lm_art, log: Callable[[str], None]):
    """(random LM, its SAE's unit set, the artifact) from ``sae/<profile>-random-model``, or None (said in
    one line) when that artifact is absent. The artifact is an SAE folder (:func:`monosemantic.sae.load`)
    trained on the MLP activations of :func:`random_lm` with the seed its config records as ``model_seed``
    (0 if none), or of the model whose weights it holds as ``model.safetensors``."""
    from . import sae as sae_mod
    from . import store
    from .lm import WEIGHTS_FILE, LMConfig, load_weights

    if not store.artifact_path("sae", profile, RANDOM_MODEL).is_dir():
        log(f"analyze: sae/{profile}-{RANDOM_MODEL} (an SAE on a randomly initialised copy of the LM) is not in "
            "the cache: that control is left out")
        return None
    art = store.load("sae", profile, RANDOM_MODEL)  # present but stale or corrupt: an error that says so
    weights = art.path / WEIGHTS_FILE
    model = (load_weights(weights) if weights.is_file()
             else random_lm(LMConfig(**lm_art.config), int(art.config.get("model_seed", 0))))
    return model, UnitSet.from_sae(RANDOM_MODEL, sae_mod.load(art.path)), art


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The tables of two analyses of the same text (of different models) as one."""
    import pandas as pd

    out = dict(a)
    for name in TABLES:
        if name == "families":
            continue  # the same text: the same token shares
        frame = pd.concat([a[name], b[name]], ignore_index=True)
        out[name] = frame.drop_duplicates("token", ignore_index=True) if name == "vocab" else frame
    return out


def _carried_splitting(profile: str, sweep, missing: list[str]) -> dict:
    """The splitting tables of the analysis artifact in the cache, when it was made from the same width-sweep
    artifact as ``sweep`` (whose weights are not on this machine); else a one-line error saying what to run."""
    import pandas as pd

    from . import store

    command = f"`monosemantic train-sae --profile {profile} --recipe sweep`"
    try:
        old = store.load("analysis", profile, "features", check_inputs=False)
    except store.CacheError:
        raise UserError(f"{sweep.key}: the weights of {', '.join(missing)} are not on this machine (they live in "
                        f"cache/work/); remake them with {command}") from None
    if old.manifest.get("inputs", {}).get(sweep.key) != sweep.content_hash:
        raise UserError(f"{sweep.key}: the weights of {', '.join(missing)} are not on this machine, and the cached "
                        f"{old.key} was made from another sweep; remake them with {command}")
    return {"splitting": pd.read_parquet(old.file("splitting.parquet")),
            "width_top_tokens": pd.read_parquet(old.file("width_top_tokens.parquet")), "from": old.key,
            "note": (f"splitting.parquet and width_top_tokens.parquet copied from {old.key} (content "
                     f"{old.content_hash}, made {old.manifest.get('created')}) from the same {sweep.key} "
                     f"(content {sweep.content_hash}), whose width SAEs' weights were not on this machine; "
                     "those two tables still measure every position of a window, the first included")}


def run_stage(profile: str, cfg: AnalysisConfig, stage, progress: bool = True,
              log: Callable[[str], None] = print):
    """``analysis/<profile>-features``: neurons, the TopK SAE, the anchor-recipe SAE and the controls (a
    random dictionary; an SAE on a random LM when ``sae/<profile>-random-model`` exists), analysed alike,
    compared within density bins; plus feature splitting across the width sweep's dictionaries. ``stage``:
    the profile's ``SAEStageConfig``, whose SAE artifacts are analysed."""
    import time

    import pandas as pd

    from . import sae as sae_mod
    from . import sae_train, store
    from .data import TokenDataset
    from .lm import load_pretrained
    from .tokenizer import load as load_tokenizer

    start = time.perf_counter()
    model = load_pretrained(profile)
    model.eval()
    tokenizer = load_tokenizer()
    lm_art = store.load("lm", profile, "model")
    saes, inputs = {}, [lm_art]
    for recipe in sae_train.RECIPES:
        try:
            art = store.load("sae", profile, recipe, config=stage)
        except store.CacheError as e:
            if recipe == MAIN_SAE:
                raise
            log(f"{recipe} SAE not analysed: {e}")
            continue
        saes[recipe] = sae_mod.load(art.path)
        inputs.append(art)
    sweep = store.load("sae", profile, "sweep", config=stage)
    inputs.append(sweep)
    # the set called "anchor" is the ReLU + L1 SAE: the literal recipe when it has been run, else anchor-fixed
    relu = "anchor" if "anchor" in saes else "anchor-fixed"
    if relu not in saes:
        raise UserError(f"no ReLU + L1 SAE (sae/{profile}-anchor or -anchor-fixed) in the cache; train one with "
                        f"`monosemantic train-sae --profile {profile} --recipe anchor-fixed`")
    sets = [UnitSet.neurons(model.config.d_mlp), UnitSet.from_sae(MAIN_SAE, saes[MAIN_SAE]),
            UnitSet.from_sae("anchor", saes[relu])]
    main = saes[MAIN_SAE]
    if cfg.random_dictionary:  # the TopK SAE's width, k and centre, random directions
        sets.append(UnitSet.random_dictionary(RANDOM_DICTIONARY, main.cfg.d_in, main.cfg.n_features, main.cfg.k,
                                              seed=cfg.seed, centre=main.b_dec))
    train_tokens = TokenDataset.open(profile, "train").tokens
    held_out, held_docs, held_sources, held_art = _held_out_text(profile, cfg, model.config.context_length, log)
    if held_art is not None:
        inputs.append(held_art)
    result = analyze(model, tokenizer, sets, train_tokens, held_out, cfg, progress, log)
    curves, curve_summary = _family_curves(model, result, held_out, held_docs, cfg, progress, log)
    random_model = _random_model_set(profile, lm_art, log)
    if random_model is not None:
        rm_model, rm_set, rm_art = random_model
        inputs.append(rm_art)
        result = _merge(result, analyze(rm_model, tokenizer, [rm_set], train_tokens, held_out, cfg, progress, log))

    # feature splitting: the width sweep's dictionaries (weights in cache/work), nearest parents by cosine
    widths: dict[int, Any] = {}
    missing = []
    for run in sae_train.plan(stage):
        if run.family != "width":
            continue
        folder = sweep.work_path / run.name
        if folder.is_dir():
            widths[run.cfg.n_features] = sae_mod.load(folder)
        else:
            missing.append(run.name)
    carried = None
    if missing:  # the sweep's weights live in cache/work: reuse the last splitting tables if made from this sweep
        carried = _carried_splitting(profile, sweep, missing)
        splits, width_tokens = carried["splitting"], carried["width_top_tokens"]
        log(f"width sweep weights not on this machine ({', '.join(missing)}): splitting tables carried over from "
            f"{carried['from']}, made from the same {sweep.key}")
    else:
        splits = split_table({n: s.W_dec.detach() for n, s in widths.items()})
        width_sets = [UnitSet.from_sae(f"width-{n}", s, contexts=False) for n, s in sorted(widths.items())]
        width_tokens = token_profiles(model, width_sets, train_tokens, min(cfg.explain_tokens, 500_000),
                                      progress=progress, skip_first_positions=cfg.skip_first_positions)

    units = result["units"]
    controls = control_tables(units, cfg)
    with store.write("analysis", profile, "features", config=cfg, inputs=inputs) as w:
        drop_control_contexts(result)
        for name in TABLES:
            result[name].to_parquet(w.dir / f"{name}.parquet", index=False)
        for name, frame in controls.items():
            frame.to_parquet(w.dir / f"{name}.parquet", index=False)
        splits.to_parquet(w.dir / "splitting.parquet", index=False)
        curves.to_parquet(w.dir / "family_curves.parquet", index=False)
        curve_summary.to_parquet(w.dir / "family_units.parquet", index=False)
        T = model.config.context_length
        source_table = (pd.DataFrame({"source": held_sources}).groupby("source").size().rename("windows")
                        .reset_index().assign(tokens=lambda t: t.windows * (T - cfg.skip_first_positions)))
        source_table.to_parquet(w.dir / "heldout_sources.parquet", index=False)
        w.metrics["held_out_set"] = held_art.key if held_art is not None else f"tokens/{profile}: the val split"
        w.metrics["held_out_sources"] = int(len(source_table))
        w.metrics["held_out_min_source_tokens"] = int(source_table.tokens.min())
        width_tokens.to_parquet(w.dir / "width_top_tokens.parquet", index=False)
        w.wall_time_s = round(time.perf_counter() - start, 1)  # the whole stage, not just this write
        w.metrics.update(summary_metrics(units, cfg))
        w.metrics.update(control_metrics(controls["density_matched"]))
        w.metrics["random_model"] = ("measured" if random_model is not None else
                                     f"absent: no sae/{profile}-{RANDOM_MODEL} in the cache")
        w.metrics["explainer"] = result["explainer"]
        w.metrics["anchor_set_recipe"] = relu
        if carried is not None:
            w.info["splitting_carried_from"] = carried["note"]
        w.metrics["explain_tokens"] = result["tokens"]["explain"]
        w.metrics["held_out_tokens"] = result["tokens"]["held_out"]
        w.metrics["mlp_mean_sq_norm"] = round(result["mlp_mean_sq_norm"], 4)
        w.info["score"] = ("explain_corr: Pearson correlation, over every measured held-out (val) token, between a "
                           "unit's activation and the prediction of a token table learned from its dashboard only")
        w.info["sim_corr"] = (f"simulation: correlation of the explanation's predicted and the true activations over "
                              f"the tokens of a unit's {cfg.score_top} top, {cfg.score_per_interval} per activation "
                              f"interval and {cfg.score_random} random held-out contexts of {cfg.score_context} "
                              "tokens (Bills et al. 2023)")
        w.info["detection"] = (f"balanced accuracy at telling the top and interval contexts from {cfg.score_negatives} "
                               "random held-out contexts where the unit does not fire, a context predicted to fire "
                               f"when the simulation reaches {cfg.predict_fraction:g} of the explanation's largest "
                               "value on one of its tokens (EleutherAI delphi)")
        w.info["specificity"] = ("family_share: share of a unit's held-out activation mass inside the family it "
                                 "was assigned on the explanation text; family_lift: that share over the "
                                 "family's share of held-out tokens")
        w.info["controls"] = ("density_bins: every score's pass fraction and median per set and half-decade of "
                              "held-out density; density_matched: each set's pass fraction minus the neurons', raw "
                              "and averaged over density bins with the neurons' distribution as weights; "
                              "intervals: 95% bootstrap over units")
    return store.artifact_path("analysis", profile, "features")


def _held_out_text(profile: str, cfg: AnalysisConfig, seq_len: int, log: Callable[[str], None]):
    """The held-out text units are scored on: ``(windows (W, T), document of each window (W,), source of each
    window (W,), the heldout artifact)``, the windows of ``heldout/<profile>-windows`` (never-seen text of
    every corpus source) when it exists, else the val split's windows (said in one line; artifact None)."""
    from . import heldout, store
    from .data import TokenDataset
    from .intervals import window_documents

    if store.artifact_path("heldout", profile, "windows").is_dir():
        held = heldout.load_windows(profile, explain_tokens=cfg.explain_tokens)
        return held.windows, held.documents, held.sources, store.load("heldout", profile, "windows")
    log(f"analyze: no heldout/{profile}-windows: scoring on the val split instead (`monosemantic heldout "
        f"--profile {profile}` makes the held-out set of every source)")
    data = TokenDataset.open(profile, "val")
    windows, starts = spread_windows(data.tokens, seq_len, len(data.tokens))
    docs = window_documents(data.tokens, starts, data.eot_id)
    return windows, docs, np.array(["val"] * len(windows)), None


def _family_curves(model, result: dict[str, Any], windows: np.ndarray, docs: np.ndarray,
                   cfg: AnalysisConfig, progress: bool, log: Callable[[str], None]):
    """Per family, the best neuron and the best feature of the main SAE (chosen on the explanation text)
    measured on the held-out ``windows``: :func:`monosemantic.family_curves.tables`' (curves, summary)."""
    import pandas as pd

    from . import family_curves as fc

    T = model.config.context_length
    units = result["units"]
    chosen = [s for s in result["oriented_sets"] if s.name in ("neurons", MAIN_SAE)]
    counts, names = [], []
    for s in chosen:
        best = fc.choose_units(result["family_share_explain"][s.name], result["fired_explain"][s.name],
                               cfg.min_firings)
        pairs = [(f, int(u)) for f, u in enumerate(best) if u >= 0]
        mine = units[units.set == s.name].sort_values("unit")
        maxima = torch.as_tensor(mine["max"].to_numpy().copy(), dtype=torch.float32)
        counts.append(fc.CurveCounts(pairs, maxima, len(windows)))
        names.append(s.name)
    labels = result["held_out_labels"]  # (W, T, F), labelled once by analyze
    log(f"analyze: per-family curves of {sum(len(c.pairs) for c in counts)} units on {windows.size:,} held-out tokens")
    batches = _mlp_batches(model, windows, cfg.batch_windows)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(windows) // cfg.batch_windows), desc="analyze: family curves")
    fc.measure(batches, [s.activations for s in chosen], counts, labels, T, cfg.skip_first_positions)
    measured = labels[:, cfg.skip_first_positions:].reshape(-1, labels.shape[-1])
    family_tokens = measured.sum(0)
    tabs = [fc.tables(c, [name] * len(c.pairs), FAMILY_NAMES, len(measured), family_tokens, groups=docs,
                      n_boot=cfg.n_boot, seed=cfg.seed) for c, name in zip(counts, names, strict=True)]
    return (pd.concat([t[0] for t in tabs], ignore_index=True), pd.concat([t[1] for t in tabs], ignore_index=True))


def _finite(x: float, digits: int = 4) -> float | None:
    """``x`` rounded, or None where it is NaN (a manifest holds no NaN)."""
    return round(float(x), digits) if np.isfinite(x) else None


def summary_metrics(units, cfg: AnalysisConfig) -> dict[str, Any]:
    """The manifest's headline numbers for every set: the pass fraction and median of every score, the
    units scored and too rare to score, and the mean share of top activations at a window's first position."""
    out: dict[str, Any] = {"interpretable_score": "explain_corr", "interpretable_threshold": cfg.corr_threshold,
                           "specificity_threshold": cfg.specificity_threshold, "lift_threshold": cfg.lift_threshold,
                           "detection_threshold": cfg.detection_threshold,
                           "min_heldout_firings": cfg.min_heldout_firings}
    for set_name, label in LABELS.items():
        part = units[units["set"] == set_name]
        if not len(part):
            continue
        scored = part[part["scored"]]
        out[f"interpretable_fraction_{label}"] = _finite(interpretable_fraction(part, "explain_corr", cfg))
        out[f"specific_fraction_{label}"] = _finite(interpretable_fraction(part, "specificity", cfg))
        out[f"median_explain_corr_{label}"] = _finite(scored["explain_corr"].median())
        out[f"scored_{label}"] = int(part["scored"].sum())
        # on the explanation text: units that never fire there, and how often a live one fires
        out[f"never_fired_fraction_{label}"] = _finite(float((part["density"] == 0).mean()))
        out[f"median_density_{label}"] = _finite(float(part.loc[part["density"] > 0, "density"].median()), 8)
        if "density_val" in part:  # and on the held-out text: the dead fraction an SAE's bar is set on
            out[f"heldout_never_fired_fraction_{label}"] = _finite(float((part["density_val"] == 0).mean()))
        if "sim_corr" not in part:
            continue
        out[f"simulation_fraction_{label}"] = _finite(interpretable_fraction(part, "sim_corr", cfg))
        out[f"detection_fraction_{label}"] = _finite(interpretable_fraction(part, "detection", cfg))
        out[f"median_sim_corr_{label}"] = _finite(scored["sim_corr"].median())
        out[f"median_detection_{label}"] = _finite(scored["detection"].median())
        out[f"too_rare_{label}"] = int(part["too_rare"].sum())
        out[f"first_pos_top_share_{label}"] = _finite(part["first_pos_top_share"].mean())
    return out


def control_metrics(matched) -> dict[str, Any]:
    """The density-matched headline: ``matched_<score>_<label>_minus_neurons`` (and ``_low``, ``_high``,
    ``raw_...``) for the specificity, simulation and detection scores."""
    out: dict[str, Any] = {}
    for row in matched.itertuples():
        if row.score == "explain_corr" or row.set not in LABELS:
            continue
        key = f"{row.score}_{LABELS[row.set]}_minus_{row.baseline}"
        for kind in ("matched", "raw"):
            out[f"{kind}_{key}"] = _finite(getattr(row, kind))
            out[f"{kind}_{key}_low"] = _finite(getattr(row, f"{kind}_low"))
            out[f"{kind}_{key}_high"] = _finite(getattr(row, f"{kind}_high"))
        out[f"matched_{key}_coverage"] = _finite(row.coverage)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--explainer", default=None,
                   help="who explains and simulates: token-table (the offline default), "
                        "openai:<model>@<base_url> (an OpenAI-compatible endpoint; key from $MONOSEMANTIC_API_KEY "
                        "or $OPENAI_API_KEY) or hf:<model folder or hub id> (a local chat model)")


def run(args: argparse.Namespace) -> int:
    """``monosemantic analyze``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = args.profile_config.analysis
    if getattr(args, "explainer", None):
        cfg = cfg.replace(explainer=args.explainer)
    path = run_stage(args.profile, cfg, args.profile_config.sae, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0
