"""Harvesting: stream token windows through the language model and serve its MLP activations, shuffled.

The SAE's input is ``blocks.0.mlp.hook_post``: the 512 MLP activations after the ReLU, before the
down-projection, at every position of every window. Neighbouring positions of one text are strongly
correlated, so a batch of 128 rows from one window would be a poor gradient estimate. The
:class:`ActivationBuffer` therefore holds ``capacity`` activations from many windows, shuffles them, serves
half of them as batches, refills that half with fresh windows, reshuffles, and so on (the scheme of
SAELens's ActivationsStore and of Bricken et al.'s shuffled activation store)::

    model = lm.load_pretrained("cpu")
    buffer = ActivationBuffer(model, random_windows(TokenDataset.open("cpu", "train").tokens, 128, seed=0),
                              capacity=2**18, batch_size=896, seed=0)
    result = sae.train(cfg, buffer)                 # the buffer is an endless iterator of (896, 512) batches

Each served row is one (window, position) of the token stream; with ``track=True`` the buffer also keeps
that address for every row (``buffer.last_origin``, (batch, 2) int64), which the tests use to check that
what is served is exactly what the model computes. Same model, tokens and seed: same batches.

The buffer lives in memory (``capacity x d_in x 4`` bytes: 512 MiB for 2^18 rows of 512). Spilling it to
fp16 ``.npy`` memmaps in ``cache/work/`` for buffers that do not fit is a follow-up. Measured on this
2-core CPU with a random full-size model (d_model 128, 512 neurons, T = 128): about 40k activations/s
served, fp32 or bf16 (the LM forward stops at the hook, so the unembedding is never computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from . import hardware
from .config import UserError

HOOK = "blocks.0.mlp.hook_post"
"""The one-layer model's 512 MLP activations (post-ReLU, pre-down-projection): the SAE's input."""

ForwardDtype = Literal["auto", "bfloat16", "float32", "model"]


class HarvestError(UserError, ValueError):
    """Bad input to the harvester; the message is one line and says what to do instead."""


def resolve_dtype(dtype: ForwardDtype, device: torch.device | str = "cpu") -> str | None:
    """The autocast dtype name of a forward pass: ``auto`` is bfloat16 on a GPU or on a CPU with bf16 units
    (AMX, AVX512-BF16), else float32; ``model`` (None) keeps the model's own ``config.dtype``."""
    if dtype == "model":
        return None
    if dtype == "auto":
        on_gpu = torch.device(device).type == "cuda"
        return "bfloat16" if on_gpu or hardware.cpu_bf16_unit() else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise HarvestError(f"dtype must be 'auto', 'bfloat16', 'float32' or 'model', got {dtype!r}")
    return dtype


@contextlib.contextmanager
def forward_dtype(model: torch.nn.Module, dtype: str | None) -> Iterator[None]:
    """Run ``model``'s forward passes in autocast ``dtype`` for the ``with`` block. The LM autocasts itself
    to ``model.config.dtype`` (an outer autocast would be overridden), so its config is swapped for one with
    the dtype changed, and restored even on error. ``None``: leave the model as it is."""
    config = getattr(model, "config", None)
    if dtype is None or config is None or getattr(config, "dtype", dtype) == dtype:
        yield
        return
    model.config = config.replace(dtype=dtype)
    try:
        yield
    finally:
        model.config = config


def random_windows(tokens: np.ndarray, seq_len: int, seed: int = 0, batch: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches of random windows of a 1-D token array (e.g. ``TokenDataset.tokens``):
    ``(ids, starts)``, ids (batch, seq_len) int64 and starts (batch,) int64 the windows' first token."""
    n = len(tokens) - seq_len
    if n < 0:
        raise HarvestError(f"{len(tokens)} tokens are too few for windows of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    offsets = np.arange(seq_len)[None, :]
    while True:
        starts = torch.randint(0, n + 1, (batch,), generator=gen)  # (batch,)
        ids = torch.from_numpy(tokens[starts.numpy()[:, None] + offsets].astype(np.int64))  # (batch, seq_len)
        yield ids, starts


def sequential_windows(tokens: np.ndarray, seq_len: int, n_windows: int, batch: int = 32,
                       start: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Consecutive, non-overlapping windows from token ``start`` with their next-token targets, for
    evaluation: a list of ``(x, y)``, each (≤ batch, seq_len) int64. Raises if the tokens run out."""
    need = start + n_windows * seq_len + 1
    if len(tokens) < need:
        raise HarvestError(f"{n_windows} windows of {seq_len} tokens need {need} tokens from {start}, "
                           f"have {len(tokens)}; ask for fewer windows")
    block = torch.from_numpy(np.asarray(tokens[start:need]).astype(np.int64))
    x = block[:-1].view(n_windows, seq_len)  # (n_windows, seq_len)
    y = block[1:].view(n_windows, seq_len)
    return list(zip(x.split(batch), y.split(batch), strict=True))


class ActivationBuffer:
    """An endless iterator of shuffled ``(batch_size, d_in)`` float32 batches of activations at ``hook``.

    windows: an iterator of ``(ids, starts)`` (see :func:`random_windows`), ids (B, T) int64; every
        position of every window becomes one row. ``starts`` is only recorded (for ``track``).
    capacity: rows held in memory. Half of them are served between refills, so one batch draws from about
        ``capacity / T`` windows; a row is served at most once (served rows are overwritten).
    seed: seeds the shuffles; the windows' order is the ``windows`` iterator's (seed it too).
    dtype: autocast of the model's forward (:func:`resolve_dtype`; ``auto`` = bf16 where the hardware has it).
    track: also keep each row's origin (window number, position, window start token), served beside each
        batch as ``last_origin`` ((batch_size, 3) int64): for tests and for looking features up in the text.
    """

    def __init__(self, model: torch.nn.Module, windows: Iterator[tuple[Tensor, Tensor]], *, hook: str = HOOK,
                 capacity: int = 1 << 16, batch_size: int = 896, seed: int = 0, dtype: ForwardDtype = "auto",
                 device: torch.device | str | None = None, track: bool = False):
        if batch_size <= 0 or capacity < 2 * batch_size:
            raise HarvestError(f"capacity ({capacity}) must be at least twice batch_size ({batch_size}), "
                               f"so that half a buffer holds a batch")
        self.model, self.windows, self.hook = model, windows, hook
        self.capacity, self.batch_size, self.track = capacity, batch_size, track
        self.device = torch.device(device or next(model.parameters()).device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.gen = torch.Generator().manual_seed(seed)
        self.n_windows = 0  # windows run through the model so far
        self.last_origin: Tensor | None = None
        self._acts: Tensor | None = None  # (capacity, d_in) float32
        self._origin: Tensor | None = None  # (capacity, 3) int64 when tracking
        self._carry: tuple[Tensor, Tensor | None] | None = None  # rows of the last forward not yet stored

    @torch.no_grad()
    def _forward(self) -> tuple[Tensor, Tensor | None]:
        """One batch of windows -> rows (B*T, d) float32 and their origins (B*T, 3) (None unless tracking)."""
        try:
            ids, starts = next(self.windows)
        except StopIteration:
            raise HarvestError("the token windows ran out while filling the activation buffer; pass an "
                               "endless window iterator such as random_windows(...)") from None
        B, T = ids.shape
        with forward_dtype(self.model, self.dtype):
            acts = self.model.run_with_cache(ids.to(self.device), [self.hook])[self.hook]  # (B, T, d)
        rows = acts.reshape(B * T, -1).float().cpu()  # (B*T, d)
        if not torch.isfinite(rows).all():
            raise HarvestError(f"activations at {self.hook} contain NaN or inf; check the model's weights")
        origin = None
        if self.track:
            window = torch.arange(self.n_windows, self.n_windows + B)  # (B,)
            origin = torch.stack([window[:, None].expand(B, T), torch.arange(T)[None, :].expand(B, T),
                                  starts.long()[:, None].expand(B, T)], dim=-1).reshape(B * T, 3)
        self.n_windows += B
        return rows, origin

    def _fill(self, n: int) -> None:
        """Overwrite rows [0, n) of the buffer with fresh activations (the last forward's surplus is kept)."""
        got = 0
        while got < n:
            rows, origin = self._carry if self._carry is not None else self._forward()
            self._carry = None
            if self._acts is None:
                self._acts = torch.empty(self.capacity, rows.shape[1])
                self._origin = torch.empty(self.capacity, 3, dtype=torch.long) if self.track else None
            take = min(n - got, rows.shape[0])
            self._acts[got:got + take] = rows[:take]
            if self._origin is not None:
                self._origin[got:got + take] = origin[:take]
            if take < rows.shape[0]:
                self._carry = (rows[take:], None if origin is None else origin[take:])
            got += take

    def __iter__(self) -> Iterator[Tensor]:
        self._fill(self.capacity)
        bs = self.batch_size
        served = (self.capacity // 2) // bs * bs  # rows served between refills
        while True:
            perm = torch.randperm(self.capacity, generator=self.gen)
            self._acts = self._acts[perm]
            if self._origin is not None:
                self._origin = self._origin[perm]
            for start in range(0, served, bs):
                if self._origin is not None:
                    self.last_origin = self._origin[start:start + bs].clone()
                yield self._acts[start:start + bs].clone()
            self._fill(served)  # the served rows are replaced; the unserved half is reshuffled with them
