"""Activations: the named vectors a model computes on its way from tokens to logits.

One call answers "what are the MLP activations of this token in this text?", for our one-layer model
and for any Hugging Face causal LM, because both are wrapped as an :class:`ActivationSource`: something
that tokenizes text, says where each token sits in the text, and runs a forward pass returning the
tensors at named hook points (``blocks.0.mlp.hook_post`` = the 512 MLP activations of the one-layer
model; ``layers.31.mlp.hook_post`` = the 14,336 down-projection inputs of Llama-3-8B's last layer).

>>> get_activations(source, "The cat sat on the mat", token=" mat")
TokenActivations(values=tensor([...]), position=5, token=' mat', hook='blocks.0.mlp.hook_post', ...)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from .config import UserError


class ActivationError(UserError, ValueError):
    """Bad input to the activations API; the message is one line and says what to do instead."""


@runtime_checkable
class ActivationSource(Protocol):
    """What the activations API needs from a model (ours in ``lm``, Hugging Face ones in ``llama``)."""

    @property
    def hook_names(self) -> tuple[str, ...]:
        """Every hook point this model exposes, in forward order."""

    @property
    def default_hook(self) -> str:
        """The MLP hidden activations of the layer this project studies."""

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model accepts (None: no fixed limit)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token as text (bytes decoded with replacement for partial characters)."""

    def run_with_hooks(self, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Forward ``ids`` (batch, seq) and return ``{name: tensor (batch, seq, d)}`` for each name."""


class TokenActivations(NamedTuple):
    """The activations at one token of one text."""

    values: torch.Tensor  # (d,) float32, the vector at the hook point
    position: int  # index of the token in the tokenized text
    token: str  # that token as text
    hook: str  # the hook point read
    tokens: list[str]  # the whole tokenized text, for context


class TextActivations(NamedTuple):
    """The activations at every token of one text."""

    values: torch.Tensor  # (seq, d) float32
    tokens: list[str]  # (seq,) token strings
    hook: str


def token_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character span (start, end) of each token, from the token strings' lengths."""
    spans, start = [], 0
    for t in tokens:
        spans.append((start, start + len(t)))
        start += len(t)
    return spans


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise ActivationError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ActivationError("text is empty: give at least one non-blank character")
    return text


def _check_texts(texts: object) -> list[str]:
    """One string or a list (or tuple) of strings, as a list; anything else is a one-line error."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise ActivationError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ActivationError("no texts given: pass a string or a non-empty list of strings")
    return [_check_text(t) for t in texts]


def _check_int(name: str, value: object) -> int:
    """An integer argument (Python or numpy; not a bool) as an int, else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ActivationError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _check_hook(source: ActivationSource, hook: str | None) -> str:
    hook = hook or source.default_hook
    if hook not in source.hook_names:
        near = [h for h in source.hook_names if hook.split(".")[-1] in h][:4] or list(source.hook_names[:4])
        raise ActivationError(f"unknown hook point {hook!r}; this model has e.g. {', '.join(near)} "
                              f"({len(source.hook_names)} in all)")
    return hook


def _encode(source: ActivationSource, text: str) -> tuple[list[int], list[str]]:
    ids = source.encode(text)
    if not ids:
        raise ActivationError("text tokenizes to no tokens")
    limit = source.context_length
    if limit is not None and len(ids) > limit:
        raise ActivationError(f"text is {len(ids)} tokens, longer than the model's context of {limit}; "
                              f"shorten it or split it")
    return ids, source.token_strings(ids)


def resolve_position(tokens: Sequence[str], *, position: int | None = None, token: str | None = None,
                     char: int | None = None, occurrence: int = 0) -> int:
    """The index of the token asked for by exactly one of: ``position`` (negative counts from the end),
    ``token`` (its string, e.g. ``" mat"``; the ``occurrence``-th match, leading space optional) or
    ``char`` (a character offset into the text: the token that covers it)."""
    given = [k for k, v in (("position", position), ("token", token), ("char", char)) if v is not None]
    if len(given) != 1:
        raise ActivationError("say which token with exactly one of position=, token= or char= "
                              f"(got {', '.join(given) or 'none'})")
    occurrence = _check_int("occurrence", occurrence)
    if occurrence < 0:
        raise ActivationError(f"occurrence counts matches from 0, got {occurrence}")
    position = None if position is None else _check_int("position", position)
    char = None if char is None else _check_int("char", char)
    if token is not None and not isinstance(token, str):
        raise ActivationError(f"token must be the token's text, e.g. ' mat', got {token!r}")
    n = len(tokens)
    if position is not None:
        if not -n <= position < n:
            raise ActivationError(f"position {position} is out of range: the text has {n} tokens "
                                  f"(0..{n - 1}, or -1..-{n})")
        return position % n
    if token is not None:
        matches = [i for i, t in enumerate(tokens) if t == token]
        if not matches:
            matches = [i for i, t in enumerate(tokens) if t.strip() == token.strip() and token.strip()]
        if len(matches) <= occurrence:
            shown = " ".join(repr(t) for t in tokens[:12]) + (" ..." if n > 12 else "")
            raise ActivationError(f"token {token!r} is not in the text"
                                  + (f" {occurrence + 1} times" if matches else "")
                                  + f"; its tokens are {shown}")
        return matches[occurrence]
    spans = token_spans(tokens)
    total = spans[-1][1]
    if not 0 <= char < total:
        raise ActivationError(f"character offset {char} is out of range: the text has {total} characters")
    return next(i for i, (s, e) in enumerate(spans) if s <= char < e)


@torch.no_grad()
def get_activations(source: ActivationSource, text: str, *, position: int | None = None,
                    token: str | None = None, char: int | None = None, occurrence: int = 0,
                    hook: str | None = None) -> TokenActivations:
    """The activations at one token of ``text`` at hook point ``hook`` (default: the MLP hidden layer)."""
    hook = _check_hook(source, hook)
    ids, tokens = _encode(source, _check_text(text))
    i = resolve_position(tokens, position=position, token=token, char=char, occurrence=occurrence)
    acts = source.run_with_hooks(torch.tensor([ids]), [hook])[hook]  # (1, seq, d)
    return TokenActivations(acts[0, i].float().cpu(), i, tokens[i], hook, tokens)


@torch.no_grad()
def get_text_activations(source: ActivationSource, texts: str | Sequence[str], *,
                         hook: str | None = None, batch_size: int = 32) -> list[TextActivations]:
    """The activations at every token of each text (batched, padded on the right, padding dropped)."""
    texts = _check_texts(texts)
    hook = _check_hook(source, hook)
    encoded = [_encode(source, t) for t in texts]
    out: list[TextActivations] = []
    for b in range(0, len(encoded), batch_size):
        chunk = encoded[b:b + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            batch[r, :len(ids)] = torch.tensor(ids)
        acts = source.run_with_hooks(batch, [hook])[hook]  # (B, width, d); causal: padding is harmless
        for r, (ids, tokens) in enumerate(chunk):
            out.append(TextActivations(acts[r, :len(ids)].float().cpu(), tokens, hook))
    return out


@torch.no_grad()
def feature_activations(source: ActivationSource, sae, text: str, feature: int | None = None, *,
                        hook: str | None = None) -> TextActivations:
    """An SAE's feature activations at every token of ``text``: (seq, n_features), or (seq, 1) for one
    ``feature``. The SAE must read the hook's width (its ``cfg.d_in``)."""
    n = sae.cfg.n_features
    if feature is not None:
        feature = _check_int("feature", feature)
        if not 0 <= feature < n:
            raise ActivationError(f"feature {feature} does not exist: this SAE has {n:,} features, 0..{n - 1}")
    acts = get_text_activations(source, _check_text(text), hook=hook)[0]
    if acts.values.shape[-1] != sae.cfg.d_in:
        raise ActivationError(f"the SAE reads {sae.cfg.d_in} numbers but {acts.hook} has {acts.values.shape[-1]}; "
                              "use the SAE trained on this hook of this model")
    z = sae.encode(acts.values.to(sae.W_dec.device, torch.float32)).float().cpu()  # (seq, n)
    return TextActivations(z if feature is None else z[:, feature:feature + 1], acts.tokens,
                           f"{acts.hook} -> SAE" + ("" if feature is None else f" feature {feature}"))
