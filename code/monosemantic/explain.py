"""Explanations of units and their scores on held-out text, as the field computes them.

An *explainer* is two functions (:class:`Explainer`): ``explain(examples) -> str`` turns a unit's examples on
the explanation text (its dashboard: top-activating contexts and contexts sampled from lower activation
intervals, every token with the unit's activation) into an explanation, and ``simulate(explanation, tokens)``
predicts, from the explanation alone, the unit's activation on every token of new contexts (Bills et al.
2023, "Language models can explain neurons in language models"). Two scores, each on held-out text and on
contexts of ``score_context`` tokens chosen per unit by :class:`ContextPools`:

- **simulation**: the Pearson correlation of predicted and true activations over every token of a mix of
  the unit's top contexts, contexts sampled uniformly from activation intervals (equal widths of (0, max]
  on the explanation text) and random contexts, each context counted once (Bills et al. score on "top and
  random" contexts; the interval samples, as on the dashboards, add the middle of the distribution);
- **detection**: balanced accuracy, (TPR + TNR) / 2, at telling the activating contexts (top and interval
  samples) from random contexts where the unit does not fire at all, a context being predicted to fire
  when the simulation reaches the explanation's threshold (``fires_at``) on any of its tokens (EleutherAI
  delphi's detection score, with the simulator answering in place of a yes/no question).

Explainers (``--explainer``, :func:`make_explainer`):

- ``token-table`` (the offline default, deterministic): the explanation is the tokens with the largest mean
  activation over the dashboard's tokens (zeros included), written ``id:value id:value ...``; it simulates by
  looking each token up, and predicts a firing where a token's value reaches ``predict_fraction`` of its
  largest. The same table, whole (:func:`fit_token_tables`), gives the older all-token score.
- ``openai:<model>@<base_url>``: any OpenAI-compatible chat endpoint (``<base_url>/chat/completions``, the
  standard library's ``urllib``; the key, if the endpoint needs one, from ``$MONOSEMANTIC_API_KEY`` or
  ``$OPENAI_API_KEY``), prompted as Bills et al. prompt: activations on a 0-10 scale, one sentence back; it
  simulates each context with one request (a JSON list of 0-10 integers, one per token).
- ``hf:<model folder or hub id>``: a local Hugging Face chat model (transformers), prompted the same way.

Comparing units by these scores, within bins of density, is :mod:`monosemantic.comparisons`.

Nothing here is used by the book at read time; the artifact records the scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .config import UserError

TOKEN_TABLE = "token-table"
API_KEY_VARS = ("MONOSEMANTIC_API_KEY", "OPENAI_API_KEY")


class ExplainerError(UserError, ValueError):
    """A bad ``--explainer`` or an endpoint that cannot be used; the message is one line."""


@dataclasses.dataclass
class UnitExamples:
    """What an explainer sees of one unit: its dashboard's contexts on the explanation text."""

    unit: int
    tokens: list[np.ndarray]  # each context's token ids (L,)
    acts: list[np.ndarray]  # the unit's activation on each of them (L,), >= 0 (its measured half)


class Explainer(NamedTuple):
    """An explainer as three functions (module docstring)."""

    name: str
    explain: Callable[[UnitExamples], str]
    simulate: Callable[[str, np.ndarray], np.ndarray]
    """(explanation, token ids (K, C)) -> predicted activations (K, C)."""
    fires_at: Callable[[str], float]
    """The predicted activation at which the explanation says the unit fires (detection's threshold)."""


# --- the token table (offline default) -------------------------------------------------------------------

def fit_token_tables(n_units: int, contexts: Sequence[tuple[int, np.ndarray, np.ndarray]], vocab: int):
    """Every unit's whole token table at once: ``contexts`` (unit, token ids, activations) per shown example
    -> a scipy CSR matrix (vocab, n_units) of each token's mean activation over the shown tokens (zeros
    included): the prediction of the all-token score."""
    import scipy.sparse as sp

    units, toks, vals = [], [], []
    for unit, ids, acts in contexts:
        units.append(np.full(len(ids), unit, dtype=np.int64))
        toks.append(np.asarray(ids, dtype=np.int64))
        vals.append(np.asarray(acts, dtype=np.float64))
    if not units:
        return sp.csr_matrix((vocab, n_units))
    u, t, v = np.concatenate(units), np.concatenate(toks), np.concatenate(vals)
    sums = sp.coo_matrix((v, (t, u)), shape=(vocab, n_units)).tocsr()
    counts = sp.coo_matrix((np.ones_like(v), (t, u)), shape=(vocab, n_units)).tocsr()
    sums.sum_duplicates()
    counts.sum_duplicates()
    mean = sums.copy()
    mean.data = sums.data / counts.data  # same sparsity pattern: both built from the same (t, u) pairs
    mean.eliminate_zeros()
    return mean


def parse_token_table(explanation: str) -> tuple[np.ndarray, np.ndarray]:
    """``"id:value id:value ..."`` -> (token ids sorted, their values)."""
    pairs = [p.split(":") for p in explanation.split()]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    ids = np.array([int(i) for i, _ in pairs], dtype=np.int64)
    values = np.array([float(v) for _, v in pairs])
    order = np.argsort(ids, kind="stable")
    return ids[order], values[order]


def token_table(n_tokens: int = 20, predict_fraction: float = 0.5) -> Explainer:
    """The offline explainer: the ``n_tokens`` tokens of largest mean activation over the shown tokens."""

    def explain(ex: UnitExamples) -> str:
        if not ex.tokens:
            return ""
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in ex.tokens])
        acts = np.concatenate([np.asarray(a, dtype=np.float64) for a in ex.acts])
        uniq, inv = np.unique(ids, return_inverse=True)
        mean = np.bincount(inv, weights=acts, minlength=len(uniq)) / np.bincount(inv, minlength=len(uniq))
        order = np.lexsort((uniq, -mean))[:n_tokens]  # largest first, ties by id
        order = order[mean[order] > 0]
        return " ".join(f"{uniq[i]}:{mean[i]:.4g}" for i in order)

    def simulate(explanation: str, tokens: np.ndarray) -> np.ndarray:
        ids, values = parse_token_table(explanation)
        tokens = np.asarray(tokens, dtype=np.int64)
        if not len(ids):
            return np.zeros(tokens.shape)
        at = np.minimum(np.searchsorted(ids, tokens), len(ids) - 1)
        return np.where(ids[at] == tokens, values[at], 0.0)

    def fires_at(explanation: str) -> float:
        _, values = parse_token_table(explanation)
        return predict_fraction * float(values.max()) if len(values) else float("inf")

    return Explainer(TOKEN_TABLE, explain, simulate, fires_at)


# --- chat models -----------------------------------------------------------------------------------------

Chat = Callable[[list[dict[str, str]]], str]

_EXPLAIN_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at the parts of the document the neuron activates for and summarize in a single sentence "
    "what the neuron is looking for. Don't list examples of words.\n\nThe activation format is token<tab>"
    "activation. Activation values range from 0 to 10. A neuron finding what it's looking for is represented "
    "by a non-zero activation value. The higher the activation value, the stronger the match.")
_SIMULATE_SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Given an explanation of what the neuron looks for, predict its activation on every token of a "
    "document, as an integer from 0 (not at all) to 10 (its strongest).")


def chat_explainer(chat: Chat, texts: Callable[[Sequence[int]], list[str]], name: str,
                   predict_fraction: float = 0.5, max_chars: int = 300) -> Explainer:
    """An explainer that asks a chat model (Bills et al.'s prompts, shortened). ``texts``: token ids -> their
    strings. A simulation the model answers unreadably predicts nothing (zeros) and is counted in
    ``failures``, an attribute of the returned ``simulate``."""

    def explain(ex: UnitExamples) -> str:
        top = max((float(np.max(a)) for a in ex.acts if len(a)), default=0.0)
        blocks = []
        for i, (ids, acts) in enumerate(zip(ex.tokens, ex.acts, strict=True)):
            scaled = np.round(10 * np.asarray(acts, dtype=np.float64) / top).astype(int) if top > 0 else acts * 0
            lines = "\n".join(f"{t}\t{int(a)}" for t, a in zip(texts([int(i) for i in ids]), scaled, strict=True))
            blocks.append(f"Example {i + 1}:\n<start>\n{lines}\n<end>")
        reply = chat([{"role": "system", "content": _EXPLAIN_SYSTEM},
                      {"role": "user", "content": "\n\n".join(blocks)
                       + "\n\nExplanation of the neuron's behaviour: the main thing it does is find"}])
        lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
        return (lines[0] if lines else "")[:max_chars]

    def simulate(explanation: str, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        out = np.zeros(tokens.shape)
        for k, ids in enumerate(tokens.reshape(-1, tokens.shape[-1]) if tokens.size else []):
            strings = texts([int(i) for i in ids])
            listing = "\n".join(f"{i + 1}\t{s}" for i, s in enumerate(strings))
            reply = chat([{"role": "system", "content": _SIMULATE_SYSTEM},
                          {"role": "user", "content": f"Explanation: the main thing this neuron does is find "
                           f"{explanation}\n\nDocument, one token a line (number<tab>token):\n{listing}\n\n"
                           f"Reply with only a JSON list of {len(strings)} integers from 0 to 10, one per "
                           "token, in order."}])
            values = _integers(reply, len(strings))
            if values is None:
                simulate.failures += 1
            else:
                out.reshape(-1, tokens.shape[-1])[k] = values
        return out

    simulate.failures = 0  # type: ignore[attr-defined]
    return Explainer(name, explain, simulate, lambda explanation: 10.0 * predict_fraction)


def _integers(reply: str, n: int) -> np.ndarray | None:
    """The first JSON list of numbers in ``reply``, clipped to [0, 10] and cut or padded (zeros) to ``n``;
    None when there is none."""
    for match in re.finditer(r"\[[^\[\]]*\]", reply):
        try:
            values = [float(v) for v in json.loads(match.group(0))]
        except (ValueError, TypeError):
            continue
        out = np.zeros(n)
        out[:min(n, len(values))] = np.clip(values[:n], 0, 10)
        return out
    return None


def openai_chat(base_url: str, model: str, *, timeout: float = 120.0, max_tokens: int = 1024) -> Chat:
    """``chat(messages) -> reply`` of an OpenAI-compatible endpoint (POST ``<base_url>/chat/completions``,
    temperature 0), with the standard library only. The key: the first of :data:`API_KEY_VARS` set."""
    import urllib.error
    import urllib.request

    url = base_url.rstrip("/") + "/chat/completions"
    key = next((os.environ[v] for v in API_KEY_VARS if os.environ.get(v)), None)

    def chat(messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise ExplainerError(f"{url} answered HTTP {e.code} ({e.reason}) for model {model!r}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise ExplainerError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
        except ValueError:
            raise ExplainerError(f"{url} did not answer JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            raise ExplainerError(f"{url} answered without choices[0].message.content") from None

    return chat


def hf_chat(spec: str, *, model: Any = None, tokenizer: Any = None, max_new_tokens: int = 512) -> Chat:
    """``chat(messages) -> reply`` of a local Hugging Face chat model (greedy decoding, its chat template).
    ``model`` and ``tokenizer`` already loaded, or loaded from ``spec`` (a folder or a hub id in the local
    cache) on the first call."""
    loaded: dict[str, Any] = {"model": model, "tokenizer": tokenizer}

    def chat(messages: list[dict[str, str]]) -> str:
        if loaded["model"] is None:
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                loaded["tokenizer"] = AutoTokenizer.from_pretrained(spec)
                loaded["model"] = AutoModelForCausalLM.from_pretrained(spec).eval()
            except (ImportError, OSError) as e:
                raise ExplainerError(f"cannot load the chat model {spec!r}: {str(e).splitlines()[0][:300]}") from None
        tok, lm = loaded["tokenizer"], loaded["model"]
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        with torch.no_grad():
            out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return tok.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)

    return chat


def check_spec(spec: str) -> None:
    """Raise :class:`ExplainerError` unless ``spec`` names an explainer (module docstring)."""
    if spec == TOKEN_TABLE:
        return
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        model, at, url = rest.partition("@")
        if not (model and at and re.match(r"https?://", url)):
            raise ExplainerError(f"bad explainer {spec!r}: write openai:<model>@<base_url>, e.g. "
                                 "openai:gpt-4o-mini@https://api.openai.com/v1")
    elif kind == "hf":
        if not rest:
            raise ExplainerError(f"bad explainer {spec!r}: write hf:<model folder or hub id>")
    else:
        raise ExplainerError(f"unknown explainer {spec!r}: use {TOKEN_TABLE}, openai:<model>@<base_url> or "
                             "hf:<model>")


def make_explainer(spec: str, texts: Callable[[Sequence[int]], list[str]], *, n_tokens: int = 20,
                   predict_fraction: float = 0.5) -> Explainer:
    """The explainer ``spec`` names (module docstring); ``texts``: token ids -> their strings."""
    check_spec(spec)
    if spec == TOKEN_TABLE:
        return token_table(n_tokens, predict_fraction)
    kind, _, rest = spec.partition(":")
    if kind == "openai":
        model, _, url = rest.partition("@")
        return chat_explainer(openai_chat(url, model), texts, spec, predict_fraction)
    return chat_explainer(hf_chat(rest), texts, spec, predict_fraction)


# --- scores ----------------------------------------------------------------------------------------------

def correlation(true: np.ndarray, pred: np.ndarray) -> float:
    """Pearson correlation; NaN where ``true`` never varies, 0 where ``pred`` never does (an explanation
    that predicts nothing)."""
    true, pred = np.asarray(true, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    if len(true) < 2 or np.ptp(true) == 0:
        return float("nan")
    if np.ptp(pred) == 0:
        return 0.0
    return float(np.corrcoef(true, pred)[0, 1])


class UnitScores(NamedTuple):
    sim_corr: float  # simulation: correlation over the mix's tokens
    detection: float  # balanced accuracy, (tpr + tnr) / 2; NaN without positives or negatives
    tpr: float  # activating contexts predicted to fire
    tnr: float  # non-activating contexts predicted not to


def score_unit(explainer: Explainer, explanation: str, mix_tokens: np.ndarray, mix_acts: np.ndarray,
               mix_valid: np.ndarray, positive: np.ndarray, neg_tokens: np.ndarray,
               neg_valid: np.ndarray) -> UnitScores:
    """Both scores of one unit's explanation. ``mix_*`` (K, C): the scoring mix's token ids, true
    activations and which tokens count (positions a window's first ones are not); ``positive`` (K,) bool:
    the activating (top and interval) contexts of the mix; ``neg_*`` (N, C): non-activating contexts."""
    pred = explainer.simulate(explanation, np.concatenate([mix_tokens, neg_tokens]))  # (K + N, C)
    p_mix, p_neg = pred[:len(mix_tokens)], pred[len(mix_tokens):]
    sim = correlation(mix_acts[mix_valid], p_mix[mix_valid])
    tau = explainer.fires_at(explanation)
    said = (np.where(mix_valid, p_mix, -np.inf) >= tau).any(1)  # (K,) the explanation predicts a firing
    said_neg = (np.where(neg_valid, p_neg, -np.inf) >= tau).any(1)
    tpr = float(said[positive].mean()) if positive.any() else float("nan")
    tnr = float(1 - said_neg.mean()) if len(said_neg) else float("nan")
    return UnitScores(sim, (tpr + tnr) / 2, tpr, tnr)


# --- activations as their non-zeros ---------------------------------------------------------------------

def argsort(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.argsort(x, dim, stable=True)`` by numpy's sort, several times faster on CPU (a radix sort for
    integers of 16 bits or fewer, to which a long run of small non-negative integers is narrowed)."""
    a = x.numpy()
    if a.ndim == 1 and a.dtype.kind in "iu" and a.itemsize > 2 and a.size and 0 <= a.min() and a.max() < 1 << 15:
        a = a.astype(np.int16)
    return torch.from_numpy(np.argsort(a, axis=dim, kind="stable"))


class SparseActivations(NamedTuple):
    """The non-zero entries of a tensor of activations of ``n`` units, of shape ``shape`` (..., n), in
    row-major order (row, then unit), a row being an index into the flattened leading dimensions (window * T
    + position for (B, T, n)): what the streaming passes read in place of the dense tensor, which for a
    dictionary of thousands of sparse features is almost all zeros (a TopK SAE's: k of n per token)."""

    rows: Tensor  # (nnz,) int64, ascending
    units: Tensor  # (nnz,) int64, ascending within a row
    values: Tensor  # (nnz,) non-zero
    shape: tuple[int, ...]  # the dense tensor's, (..., n)

    @classmethod
    def of(cls, a: Tensor) -> SparseActivations:
        """The non-zeros of a dense tensor ``a`` (..., n)."""
        flat = a.reshape(-1, a.shape[-1])
        rows, units = torch.nonzero(flat, as_tuple=True)
        return cls(rows, units, flat[rows, units], tuple(a.shape))

    def keep(self, mask: Tensor) -> SparseActivations:
        """The entries where ``mask`` (nnz,) is true."""
        at = torch.nonzero(mask).squeeze(1)  # once, not once per field
        return SparseActivations(self.rows[at], self.units[at], self.values[at], self.shape)

    def dense(self) -> Tensor:
        """The dense tensor of ``shape``."""
        out = torch.zeros(int(np.prod(self.shape[:-1])), self.shape[-1], dtype=self.values.dtype)
        out[self.rows, self.units] = self.values
        return out.reshape(self.shape)

    def span_reader(self) -> Callable[[Tensor, Tensor, int], Tensor]:
        """``read(units, starts, length)`` -> (f, length): unit ``units[i]``'s values at rows ``starts[i]`` ..
        ``starts[i] + length - 1`` (0 where there is no entry or no such row), for (f,) spans. The entries are
        sorted by unit once, on the first read; a span then costs two binary searches, not one per value."""
        N = int(np.prod(self.shape[:-1]))
        by_unit = key = None

        def read(units: Tensor, starts: Tensor, length: int) -> Tensor:
            nonlocal by_unit, key
            out = torch.zeros(len(units), length, dtype=self.values.dtype)
            if not len(units) or not len(self.values):
                return out
            if key is None:
                by_unit = argsort(self.units)  # (nnz,) rows stay ascending within a unit
                key = self.units[by_unit] * N + self.rows[by_unit]
            lo = torch.searchsorted(key, units * N + starts.clamp(0, N))
            hi = torch.searchsorted(key, units * N + (starts + length).clamp(0, N))
            count = hi - lo
            span = torch.repeat_interleave(torch.arange(len(units)), count)  # (m,) the span of each entry found
            entry = by_unit[lo[span] + torch.arange(len(span)) - (torch.cumsum(count, 0) - count)[span]]
            out[span, self.rows[entry] - starts[span]] = self.values[entry]
            return out

        return read


# --- choosing the held-out contexts, in one streaming pass ----------------------------------------------

@dataclasses.dataclass
class _Pool:
    """Per slot, the ``size`` largest keys offered (in no order), their context ids and (optionally) the
    unit's activations on the context's tokens."""

    size: int
    slots: int
    context: int | None  # None: no activations kept

    def __post_init__(self) -> None:
        self.keys = torch.full((self.slots, self.size), -1.0)
        self.index = torch.zeros((self.slots, self.size), dtype=torch.int64)
        self.extra = None if self.context is None else torch.zeros((self.slots, self.size, self.context))

    def offer(self, keys: Tensor, acts: Callable[[Tensor, Tensor], Tensor] | None, first: int,
              slot0: int = 0) -> None:
        """``keys`` (n, M) of this batch's M contexts for units 0..n-1 (-1: not eligible); ``acts(contexts
        (f,), units (f,))`` -> (f, C): those units' activations on those contexts of the batch; ``first`` the
        id of the first; unit u's slot is ``slot0 + u``.

        Entries stay where they are: each one that enters takes the place of one pushed out, so a batch
        costs a few key comparisons per slot and a copy per entering context, not a copy of the pool."""
        n, M = keys.shape
        if self.size == 0 or M == 0:
            return
        P = self.size
        old = self.keys[slot0:slot0 + n]  # (n, P)
        floor = old.min(1).values  # (n,)
        best = keys.amax(1)
        units = torch.nonzero((best >= 0) & (best > floor)).squeeze(1)  # (m,) the slots something enters
        if not len(units):
            return
        v, i = keys[units].topk(min(P, M), dim=1)  # (m, k): only these can enter the pool
        k = v.shape[1]
        old = old[units]
        v = torch.where((v >= 0) & (v > floor[units, None]), v, -1.0)
        sel = torch.cat([old, v], 1).topk(P, dim=1).indices  # (m, P): the new pool; >= P: from this batch
        kept = torch.zeros(len(units), P + k, dtype=torch.bool).scatter_(1, sel, True)
        n_in = kept[:, P:].sum(1, keepdim=True)  # (m, 1) entering = pushed out
        out_pos = argsort(kept[:, :P].to(torch.int8), dim=1)  # pushed-out places first
        in_pos = argsort((~kept[:, P:]).to(torch.int8), dim=1)  # entering candidates first
        r, j = torch.nonzero(torch.arange(min(P, k)) < n_in, as_tuple=True)
        slot, place, cand = units[r] + slot0, out_pos[r, j], in_pos[r, j]
        self.keys[slot, place] = v[r, cand]
        self.index[slot, place] = i[r, cand] + first
        if self.extra is not None:
            self.extra[slot, place] = acts(i[r, cand], units[r]).to(self.extra.dtype)  # (f, C)


class ContextPools:
    """Per unit, the held-out contexts (chunks of ``context`` tokens of the model's windows, in order: context
    id = window * (T // context) + chunk) that its explanation is scored on, chosen while streaming:

    - ``top``: the ``n_top`` contexts with the largest activation;
    - ``interval``: ``per_interval`` contexts uniformly at random among those whose largest activation lies
      in each of ``intervals`` equal intervals of (0, ``maxima``] (the explanation text's maxima; a context
      above them falls in the last interval);
    - ``random``: ``n_random`` contexts uniformly at random;
    - ``negative``: ``n_negative`` contexts uniformly at random among those where the unit never fires.

    The first three keep the unit's activations on each token; a negative's are all zero. Uniform samples
    are the contexts with the largest of independent uniform keys (reservoir sampling)."""

    def __init__(self, maxima: Tensor, context: int, *, n_top: int, intervals: int, per_interval: int,
                 n_random: int, n_negative: int, seed: int = 0):
        n = len(maxima)
        self.n, self.context, self.intervals = n, context, intervals
        self.maxima = maxima.float().clamp_min(1e-12)[:, None]  # (n, 1)
        self.top = _Pool(n_top, n, context)
        self.interval = _Pool(per_interval, intervals * n, context)
        self.random = _Pool(n_random, n, context)
        self.negative = _Pool(n_negative, n, None)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, a: Tensor | SparseActivations, first: int) -> None:
        """``a`` (B, T, n): measured activations (>= 0; 0 where not measured) of B consecutive windows, dense
        or as its non-zeros (rows: window * T + position); ``first``: the id of their first context."""
        if isinstance(a, Tensor):
            a = SparseActivations.of(a)
        B, T, n = a.shape
        C = self.context
        per = T // C  # contexts per window; the last T % C tokens belong to none
        pos = a.rows % T
        inside = pos < per * C
        ctx = (a.rows // T) * per + pos // C  # (nnz,) context of each entry
        M = B * per
        amax = torch.zeros(n * M, dtype=a.values.dtype).scatter_reduce_(  # (n, M) each context's largest
            0, (a.units * M + ctx)[inside], a.values[inside], "amax").view(n, M)
        fired = amax > 0
        read = a.span_reader()

        def acts(contexts: Tensor, units: Tensor) -> Tensor:  # (f, C) of (f,) contexts of this batch
            return read(units, (contexts // per) * T + (contexts % per) * C, C)

        self.top.offer(torch.where(fired, amax, -1.0), acts, first)
        which = (torch.ceil(amax / self.maxima * self.intervals).long() - 1).clamp(0, self.intervals - 1)
        r = torch.rand(amax.shape, generator=self.gen)
        for j in range(self.intervals):
            self.interval.offer(torch.where(fired & (which == j), r, -1.0), acts, first, j * n)
        self.random.offer(torch.rand(amax.shape, generator=self.gen), acts, first)
        self.negative.offer(torch.where(fired, -1.0, torch.rand(amax.shape, generator=self.gen)), None, first)

    def unit(self, u: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Unit ``u``'s scoring contexts: the mix's ids (K,) (top, then interval samples, then random ones,
        each context once), their activations (K, C), which are activating (top or interval) (K,), and the
        non-activating contexts' ids (N,)."""
        ids, acts, pos = [], [], []
        slots = [(self.top, [u], True), (self.interval, [j * self.n + u for j in range(self.intervals)], True),
                 (self.random, [u], False)]
        for pool, cols, positive in slots:
            for c in cols:
                ok = pool.keys[c] >= 0
                ids.append(pool.index[c, ok].numpy())
                acts.append(pool.extra[c, ok].numpy())
                pos.append(np.full(int(ok.sum()), positive))
        ids_a = np.concatenate(ids)
        _, first = np.unique(ids_a, return_index=True)
        first = np.sort(first)  # each context once, at its first place in the order above
        neg = self.negative.index[u, self.negative.keys[u] >= 0].numpy()
        return (ids_a[first], np.concatenate(acts)[first].reshape(len(first), self.context),
                np.concatenate(pos)[first], neg)


def context_tokens(windows: np.ndarray, ids: np.ndarray, C: int, skip: int) -> tuple[np.ndarray, np.ndarray]:
    """Scoring contexts ``ids`` (K,) of ``windows`` (W, T) -> their tokens (K, C) and which are measured."""
    per = windows.shape[1] // C
    w, chunk = np.divmod(np.asarray(ids, dtype=np.int64), per)
    pos = chunk[:, None] * C + np.arange(C)  # (K, C) positions in the window
    return windows[w[:, None], pos], pos >= skip


# --- explaining and scoring a unit set --------------------------------------------------------------------

UNSCORED = {"explanation": "", "sim_corr": float("nan"), "detection": float("nan"), "detection_tpr": float("nan"),
             "detection_tnr": float("nan")}


def explain_and_score(explainer: Explainer, shown: list[tuple[int, np.ndarray, np.ndarray]],
                      pools: ContextPools, scored: np.ndarray, val_windows: np.ndarray, skip: int,
                      progress: bool, name: str) -> dict[int, dict[str, Any]]:
    """Unit -> its explanation (from ``shown``, its dashboard) and both held-out scores on the contexts
    ``pools`` chose in ``val_windows``, for every unit ``scored`` (n,) marks; ``skip``: positions at the start
    of a window that are not measured."""
    from tqdm.auto import tqdm

    by_unit: dict[int, UnitExamples] = {}
    for u, ids, acts in shown:
        ex = by_unit.setdefault(u, UnitExamples(u, [], []))
        ex.tokens.append(ids)
        ex.acts.append(acts)
    C = pools.context
    out = {}
    for u in tqdm(np.flatnonzero(scored).tolist(), desc=f"analyze: explanations of {name}", disable=not progress):
        text = explainer.explain(by_unit.get(u, UnitExamples(u, [], [])))
        mix_ids, mix_acts, positive, neg_ids = pools.unit(u)
        mix_tokens, mix_valid = context_tokens(val_windows, mix_ids, C, skip)
        neg_tokens, neg_valid = context_tokens(val_windows, neg_ids, C, skip)
        sc = score_unit(explainer, text, mix_tokens, mix_acts, mix_valid, positive, neg_tokens, neg_valid)
        out[u] = {"explanation": text, "sim_corr": sc.sim_corr, "detection": sc.detection,
                  "detection_tpr": sc.tpr, "detection_tnr": sc.tnr}
    return out
