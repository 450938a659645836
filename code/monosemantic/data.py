"""Token shards: the corpus as one flat array of GPT-2 token ids per split, read through a memmap.

Layout (written by ``monosemantic corpus``, kept in the ignored ``cache/work/``)::

    cache/work/tokens/<profile>-<name>/index.json   dtype, tokenizer, and per split: files, tokens, sha256
    cache/work/tokens/<profile>-<name>/train.bin    uint16 ids, documents joined by <|endoftext|> (50256)
    cache/work/tokens/<profile>-<name>/val.bin

Documents are shuffled (by a seeded hash) before they are joined, so any contiguous block is a mix of
sources. Reading, for the language model's training loop::

    ds = TokenDataset.open("cpu", "train")
    x, y = ds.sample_batch(32, 128, generator)          # (32, 128) int64 inputs and next-token targets
    for x, y in ds.blocks(32, 128, start=pos): ...      # sequential, resumable from a token position
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import UserError

DTYPE = np.uint16  # GPT-2's 50,257 ids fit in 16 bits


class TokenDataError(UserError):
    """Token shards that are missing or do not match their index."""


def write_split(folder: Path, split: str, arrays: list[np.ndarray]) -> dict:
    """Concatenate ``arrays`` (uint16 token ids, each a document ending in <|endoftext|>) into
    ``folder/<split>.bin``; returns its index entry. Written in chunks, hashed as written."""
    path = folder / f"{split}.bin"
    h = hashlib.sha256()
    n = 0
    with open(path, "wb") as f:
        buf: list[np.ndarray] = []
        size = 0
        for a in arrays:
            buf.append(a)
            size += len(a)
            if size >= 1 << 22:
                block = np.concatenate(buf).astype(DTYPE, copy=False).tobytes()
                f.write(block)
                h.update(block)
                n += size
                buf, size = [], 0
        if buf:
            block = np.concatenate(buf).astype(DTYPE, copy=False).tobytes()
            f.write(block)
            h.update(block)
            n += size
    return {"files": [path.name], "tokens": n, "documents": len(arrays), "sha256": [h.hexdigest()]}


def tokens_dir(profile: str, name: str = "minipile") -> Path:
    from . import store

    return store.work_path("tokens", profile, name)


@dataclasses.dataclass
class TokenDataset:
    """One split of the token shards: ``tokens`` is a read-only 1-D ``np.memmap`` of uint16 ids."""

    tokens: np.ndarray
    split: str
    path: Path
    index: dict

    @classmethod
    def open(cls, profile: str, split: str = "train", name: str | None = None, verify: bool = False,
             path: Path | None = None) -> TokenDataset:
        """The ``split`` ("train" or "val") of profile's token shards. ``name`` defaults to the corpus name
        every profile uses (``config.CORPUS_NAME``); ``path`` reads a folder directly (skipping the cache's
        manifest check); ``verify`` hashes the file (seconds for 100M tokens)."""
        if path is None:
            from . import store
            from .config import CORPUS_NAME

            name = name or CORPUS_NAME
            art = store.load("tokens", profile, name, verify=False, check_inputs=False)
            folder = art.work_path
            command = art.command
        else:
            folder, command = Path(path), "monosemantic corpus"
        index_path = folder / "index.json"
        if not index_path.is_file():
            raise TokenDataError(f"token shards {folder} are missing; make them with `{command}`")
        index = json.loads(index_path.read_text())
        entry = index["splits"].get(split)
        if entry is None:
            raise TokenDataError(f"{folder} has no split {split!r} (it has {', '.join(index['splits'])})")
        file = folder / entry["files"][0]
        expected = entry["tokens"] * np.dtype(DTYPE).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise TokenDataError(f"{file} is missing or truncated (expected {expected} bytes); remake it with "
                                 f"`{command}`")
        if verify:
            from .store import sha256_file

            if sha256_file(file) != entry["sha256"][0]:
                raise TokenDataError(f"{file} does not match its sha256; remake it with `{command}`")
        tokens = np.memmap(file, dtype=DTYPE, mode="r") if entry["tokens"] else np.zeros(0, dtype=DTYPE)
        return cls(tokens=tokens, split=split, path=file, index=index)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def eot_id(self) -> int:
        return int(self.index["eot_id"])

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``x`` and targets ``y`` (x shifted by one), both
        (batch_size, seq_len) int64. Start positions are drawn with ``generator``, so a seeded generator
        gives the same batches on every machine."""
        n = len(self.tokens) - seq_len - 1
        if n <= 0:
            raise TokenDataError(f"{self.split} split has {len(self.tokens)} tokens, too few for seq_len {seq_len}")
        starts = torch.randint(0, n + 1, (batch_size,), generator=generator).numpy()
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
        block = torch.from_numpy(self.tokens[idx].astype(np.int64))
        x, y = block[:, :-1], block[:, 1:]
        if str(device) != "cpu":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def blocks(self, batch_size: int, seq_len: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Consecutive, non-overlapping batches from token ``start`` on: ``(x, y, next_start)``; pass
        ``next_start`` back as ``start`` to resume. Stops when fewer than a full batch remain."""
        step = batch_size * seq_len
        pos = start
        while pos + step + 1 <= len(self.tokens):
            block = torch.from_numpy(self.tokens[pos:pos + step + 1].astype(np.int64))
            x = block[:-1].view(batch_size, seq_len)
            y = block[1:].view(batch_size, seq_len)
            pos += step
            yield x, y, pos
