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

The buffer lives in memory (``capacity x d_in x 4`` bytes: 512 MiB for 2^18 rows of 512). Measured on
this 2-core CPU with a random full-size model (d_model 128, 512 neurons, T = 128): about 40k
activations/s served, fp32 or bf16 (the LM forward stops at the hook, so the unembedding is never
computed).

For many SAEs trained on the same activations (the sweeps of chapter 3), harvesting once to disk is
cheaper than running the model again for each: :func:`harvest_to_disk` writes ``N`` rows as an fp16
``(N, d_in)`` memmap in ``cache/work/`` (resumable: it restarts where an interrupted run stopped), and
:class:`ArraySource` serves it in seeded, shuffled epochs where batch ``i`` is a function of ``i`` alone,
so an interrupted SAE run resumes on exactly the batches it would have seen::

    harvest_to_disk(model, tokens, n_rows=6_000_000, path=work / "acts.f16")
    source = ArraySource(open_rows(work / "acts.f16", d_in=512), batch_size=896, seed=0)
    source.batch(0)                                  # (896, 512) float32, rows from ~890 different windows
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from . import hardware
from .config import UserError, check_free_space

HOOK = "blocks.0.mlp.hook_post"
"""The one-layer model's 512 MLP activations (post-ReLU, pre-down-projection): the SAE's input."""

ForwardDtype = Literal["auto", "bfloat16", "float32", "model"]


class HarvestError(UserError, ValueError):
    """Bad input to the harvester; the message is one line and says what to do instead."""


def resolve_dtype(dtype: ForwardDtype, device: torch.device | str = "cpu",
                  model: torch.nn.Module | None = None) -> str | None:
    """The autocast dtype name of a forward pass: ``auto`` is whichever of bfloat16 and float32 runs the
    model's products faster here (:func:`monosemantic.hardware.auto_dtype`, measured once per machine on the
    shapes of ``model``'s config, or of the one-layer model's when it has none); ``model`` (None) keeps
    the model's own ``arithmetic.dtype``."""
    if dtype == "model":
        return None
    if dtype not in ("auto", "bfloat16", "float32"):
        raise HarvestError(f"dtype must be 'auto', 'bfloat16', 'float32' or 'model', got {dtype!r}")
    if dtype != "auto":
        return dtype
    arithmetic = getattr(model, "arithmetic", None)
    shapes = (arithmetic.forward_shapes(model.config, rows=1024) if arithmetic is not None else
              [(1024, 128, 512), (1024, 512, 128)])
    return str(hardware.resolve_dtype("auto", "forward", shapes, device)).removeprefix("torch.")


@contextlib.contextmanager
def forward_dtype(model: torch.nn.Module, dtype: str | None) -> Iterator[None]:
    """Run ``model``'s forward passes in autocast ``dtype`` for the ``with`` block. The LM autocasts itself
    to ``model.arithmetic.dtype`` (an outer autocast would be overridden), so its arithmetic is swapped for one
    with the dtype changed, and restored even on error. ``None``: leave the model as it is."""
    arithmetic = getattr(model, "arithmetic", None)
    if dtype is None or arithmetic is None or arithmetic.dtype == dtype:
        yield
        return
    model.arithmetic = arithmetic.replace(dtype=dtype)
    try:
        yield
    finally:
        model.arithmetic = arithmetic


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


def split_windows(tokens: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """Every whole window of ``seq_len`` consecutive tokens of a split, from its start, with next-token
    targets: ``(x, y)``, each (n_windows, seq_len) int64 (views of one copy of the tokens)."""
    n = (len(tokens) - 1) // seq_len
    stream = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1]).astype(np.int64))
    return stream[:-1].view(n, seq_len), stream[1:].view(n, seq_len)


def spread_rows(n_all: int, n: int) -> np.ndarray:
    """Indices of ``n`` of ``n_all`` windows spread evenly from first to last (every one when ``n`` is 0 or at
    least ``n_all``), so that every part of a split is represented."""
    if n <= 0 or n >= n_all:
        return np.arange(n_all)
    return np.unique(np.linspace(0, n_all - 1, n).round().astype(np.int64))


def window_batches(x: Tensor, y: Tensor, rows: np.ndarray, batch: int) -> list[tuple[Tensor, Tensor]]:
    """Rows ``rows`` of :func:`split_windows`' ``(x, y)`` in batches of ``batch`` windows, in the given order."""
    return [(x[rows[i:i + batch]], y[rows[i:i + batch]]) for i in range(0, len(rows), batch)]


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


def open_rows(path: Path, d_in: int, n_rows: int | None = None) -> np.ndarray:
    """The fp16 ``(N, d_in)`` memmap written by :func:`harvest_to_disk` (read-only)."""
    path = Path(path)
    if not path.is_file():
        raise HarvestError(f"harvested activations {path} are missing; make them with `monosemantic harvest`")
    size = path.stat().st_size
    row_bytes = d_in * np.dtype(np.float16).itemsize
    if size % row_bytes or (n_rows is not None and size != n_rows * row_bytes):
        raise HarvestError(f"{path} holds {size} bytes, not {n_rows or 'a whole number of'} rows of {d_in} fp16 "
                           f"numbers (an interrupted harvest?); rerun `monosemantic harvest`")
    return np.memmap(path, dtype=np.float16, mode="r", shape=(size // row_bytes, d_in))


def harvest_to_disk(model: torch.nn.Module, tokens: np.ndarray, n_rows: int, path: Path, *, seq_len: int,
                    seed: int = 0, batch: int = 64, hook: str = HOOK, dtype: ForwardDtype = "float32",
                    progress: bool = True) -> np.ndarray:
    """Run random windows of ``tokens`` through ``model`` and write the first ``n_rows`` activations at
    ``hook`` (every position of every window, in window order) to ``path`` as an fp16 ``(n_rows, d)``
    memmap. A partial file from an interrupted run is continued: the windows are a function of ``seed``, so
    the windows already written are skipped without running the model. Returns the memmap (read-only)."""
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cast = resolve_dtype(dtype, next(model.parameters()).device, model)
    windows = random_windows(tokens, seq_len, seed=seed, batch=batch)
    rows_per_batch = batch * seq_len
    with torch.no_grad():  # the width, from one window
        d = model.run_with_cache(torch.from_numpy(np.asarray(tokens[:seq_len]).astype(np.int64))[None], [hook])[hook]
    d_in = d.shape[-1]
    row_bytes = d_in * 2
    done = path.stat().st_size // row_bytes if path.exists() else 0
    have = path.stat().st_size if path.exists() else 0
    check_free_space(path.parent, n_rows * row_bytes - have, f"harvesting {n_rows:,} activations to {path.name}")
    done = min(done, n_rows) // rows_per_batch * rows_per_batch  # restart at a whole batch of windows
    with open(path, "r+b" if path.exists() else "w+b") as f:
        f.truncate(n_rows * row_bytes)
    out = np.memmap(path, dtype=np.float16, mode="r+", shape=(n_rows, d_in))
    device = next(model.parameters()).device
    bar = tqdm(total=n_rows, initial=done, desc=f"harvest {hook}", unit="act", unit_scale=True,
               disable=not progress, mininterval=1.0)
    pos = 0
    with torch.no_grad(), forward_dtype(model, cast):
        while pos < n_rows:
            ids, _ = next(windows)
            if pos + rows_per_batch <= done:  # written by an earlier run
                pos += rows_per_batch
                continue
            acts = model.run_with_cache(ids.to(device), [hook])[hook]  # (B, T, d)
            rows = acts.reshape(-1, d_in).float()
            if not torch.isfinite(rows).all():
                raise HarvestError(f"activations at {hook} contain NaN or inf; check the model's weights")
            take = min(rows.shape[0], n_rows - pos)
            out[pos:pos + take] = rows[:take].cpu().numpy().astype(np.float16)
            pos += take
            bar.update(take)
    bar.close()
    out.flush()
    del out
    return open_rows(path, d_in, n_rows)


class ArraySource:
    """Batches of an ``(N, d)`` array (an fp16 memmap from :func:`harvest_to_disk`, or a tensor) in shuffled
    epochs: batch ``step`` is rows ``[step*B, (step+1)*B)`` of the endless sequence of epoch permutations,
    each seeded by ``(seed, epoch)``. :meth:`batch` is a pure function of ``step``, so training can resume
    exactly; iterating yields ``batch(0), batch(1), ...``. Rows are returned as float32 tensors."""

    def __init__(self, rows: np.ndarray | Tensor, batch_size: int, seed: int = 0):
        if rows.ndim != 2 or rows.shape[0] < batch_size:
            raise HarvestError(f"need an (N, d) array with N >= batch_size = {batch_size}, got shape "
                               f"{tuple(rows.shape)}; harvest more activations")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.n = rows.shape[0]
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=gen).numpy(), epoch
        return self._perm

    def batch(self, step: int) -> Tensor:
        start = step * self.batch_size
        parts = []
        while len(parts) == 0 or sum(len(p) for p in parts) < self.batch_size:
            epoch, offset = divmod(start, self.n)
            take = min(self.batch_size - sum(len(p) for p in parts), self.n - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            start += take
        index = np.sort(np.concatenate(parts))  # sorted reads are kinder to a memmap; order within a batch is moot
        rows = self.rows[index]
        return torch.as_tensor(np.asarray(rows, dtype=np.float32))

    def __iter__(self) -> Iterator[Tensor]:
        step = 0
        while True:
            yield self.batch(step)
            step += 1


class ActivationBuffer:
    """An endless iterator of shuffled ``(batch_size, d_in)`` float32 batches of activations at ``hook``.

    windows: an iterator of ``(ids, starts)`` (see :func:`random_windows`), ids (B, T) int64; every
        position of every window becomes one row. ``starts`` is only recorded (for ``track``).
    capacity: rows held in memory. Half of them are served between refills, so one batch draws from about
        ``capacity / T`` windows; a row is served at most once (served rows are overwritten).
    seed: seeds the shuffles; the windows' order is the ``windows`` iterator's (seed it too).
    dtype: autocast of the model's forward (:func:`resolve_dtype`; ``auto`` = the faster of bf16 and fp32 here).
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
        self.dtype = resolve_dtype(dtype, self.device, model)
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


# --- which windows a harvest and an analysis read --------------------------------------------------

def harvest_batch() -> int:
    """Windows per forward pass of ``harvest_to_disk`` (its default): the windows are drawn in batches of it."""
    return int(inspect.signature(harvest_to_disk).parameters["batch"].default)


def harvest_windows(tokens: np.ndarray, seq_len: int, seed: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows ``harvest_to_disk(model, tokens, n_rows, seq_len=seq_len, seed=seed)`` reads, in its order:
    starts (W,) int64 and token ids (W, seq_len) uint16, W a whole number of its batches."""
    batch = harvest_batch()
    n_batches = -(-n_rows // (batch * seq_len))
    windows = random_windows(tokens, seq_len, seed=seed, batch=batch)
    starts, ids = [], []
    for _ in range(n_batches):
        x, s = next(windows)
        ids.append(x.numpy().astype(np.uint16))
        starts.append(s.numpy().astype(np.int64))
    return np.concatenate(starts), np.concatenate(ids)


def spread_windows(tokens: np.ndarray, seq_len: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, seq_len) windows spread evenly over ``tokens``, W = min(n_tokens, len) // seq_len, and their
    (W,) start offsets."""
    n = len(tokens)
    if n < seq_len:
        raise UserError(f"only {n} tokens: analysis windows need at least {seq_len}; build a bigger corpus")
    n_windows = max(1, min(n_tokens, n) // seq_len)
    starts = np.linspace(0, n - seq_len, n_windows).astype(np.int64)
    return np.stack([np.asarray(tokens[s:s + seq_len]) for s in starts]), starts


def held_out_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """(W, seq_len) held-out windows: ``tokens`` itself when it is already (W, seq_len) windows, else those
    spread evenly over the 1-D ``tokens`` that cover it (:func:`spread_windows`)."""
    if getattr(tokens, "ndim", 1) == 2:
        if tokens.shape[1] != seq_len or not len(tokens):
            raise UserError(f"held-out windows of shape {tuple(tokens.shape)}: the model reads windows of "
                            f"{seq_len} tokens, at least one of them")
        return np.asarray(tokens)
    return spread_windows(tokens, seq_len, len(tokens))[0]
