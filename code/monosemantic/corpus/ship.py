"""Shipping the corpus's text to a machine without registries, in parts, and replaying it there into the same
token shards."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..store import sha256_file
from .sources import CorpusError

# --- shipping the corpus to a machine without registries ----------------------------------------------

EXPORT_FORMAT = 1
EXPORT_PART_BYTES = 48_000_000  # the GPU machine receives at most 64 MiB per call: ship one part per call


def split_parts(path: Path, part_bytes: int = EXPORT_PART_BYTES) -> list[Path]:
    """Cut ``path`` into ``path.part00``, ``.part01``, ... of at most ``part_bytes`` each (removing
    ``path``); a file that fits is left whole. Returns the files."""
    if path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        while block := f.read(part_bytes):
            part = path.with_name(f"{path.name}.part{len(parts):02d}")
            part.write_bytes(block)
            parts.append(part)
    path.unlink()
    return parts


def export_files(path: Path) -> list[Path]:
    """The file(s) of an export: ``path`` itself or its ``.partNN`` pieces, in order."""
    if path.is_file():
        return [path]
    parts = sorted(path.parent.glob(path.name + ".part[0-9][0-9]"))
    if not parts:
        raise CorpusError(f"no corpus export at {path} (nor {path.name}.part00, ...)")
    return parts


class _Chain(io.RawIOBase):
    """Several files read back to back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [open(p, "rb") for p in paths]  # closed in close()
        self.i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.i < len(self.files):
            n = self.files[self.i].readinto(buf)
            if n:
                return n
            self.i += 1
        return 0

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def export_text(profile: str, name: str, out: Path, preset: int = 6,
                part_bytes: int = EXPORT_PART_BYTES) -> dict[str, Any]:
    """Write built token shards back out as text, one JSON line per document in shard order
    (``{"split": ..., "text": ...}``) after a header line with the shards' index, xz-compressed and cut
    into parts of ``part_bytes``. Decoding is exact (the ids came from encoding this text), so
    :func:`replay_text` on another machine rebuilds the same shards byte for byte and checks it against
    the header's sha256."""
    from ..data import TokenDataset
    from ..tokenizer import load

    tok = load()
    header: dict[str, Any] = {"format": EXPORT_FORMAT, "profile": profile, "name": name}
    tmp = out.with_name(out.name + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=preset) as f:
        for split in ("train", "val"):
            ds = TokenDataset.open(profile, split, name=name)
            if split == "train":
                header["index"] = ds.index
                f.write(json.dumps(header) + "\n")
            tokens = np.asarray(ds.tokens)
            ends = np.flatnonzero(tokens == ds.eot_id)
            start = 0
            for end in ends:
                f.write(json.dumps({"split": split, "text": tok.decode(tokens[start:end])}, ensure_ascii=False)
                        + "\n")
                start = end + 1
    for stale in out.parent.glob(out.name + ".part[0-9][0-9]"):  # from an earlier export
        stale.unlink()
    os.replace(tmp, out)
    header["files"] = [p.name for p in split_parts(out, part_bytes)]
    return header


def replay_text(path: Path, profile: str, name: str | None = None, threads: int = 2,
                command: str | None = None) -> Any:
    """Tokenize an :func:`export_text` file into token shards (``tokens/<profile>-<name>``) and check
    they are byte-identical to the ones it was exported from."""
    from .. import store
    from ..data import write_split
    from ..tokenizer import EOT_ID, load

    tok = load()
    files = export_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(bytes.fromhex(sha256_file(file)))
    with lzma.open(io.BufferedReader(_Chain(files)), "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())
        if header.get("format") != EXPORT_FORMAT:
            raise CorpusError(f"{path} is not a corpus export (format {header.get('format')!r})")
        texts: dict[str, list[str]] = {"train": [], "val": []}
        for line in f:
            rec = json.loads(line)
            texts[rec["split"]].append(rec["text"])
    name = name or header["name"]
    cfg = {"replay_of": f"{header['profile']}-{header['name']}", "export_sha256": digest.hexdigest()}
    with store.write("tokens", profile, name, config=cfg, command=command) as w:
        index = dict(header["index"], splits={})
        for split in ("train", "val"):
            arrays = []
            for i in range(0, len(texts[split]), 512):  # in batches: lists of Python ints are large
                for ids in tok.encode_batch(texts[split][i:i + 512], num_threads=threads):
                    a = np.empty(len(ids) + 1, dtype=np.uint16)
                    a[:-1] = ids
                    a[-1] = EOT_ID
                    arrays.append(a)
            index["splits"][split] = write_split(w.work_dir, split, arrays)
            want = header["index"]["splits"][split]["sha256"]
            if index["splits"][split]["sha256"] != want:
                raise CorpusError(f"replaying {path}: the {split} shard differs from the exported one "
                                  f"(sha256 {index['splits'][split]['sha256'][0][:12]} vs {want[0][:12]}); "
                                  f"is the tokenizer the same?")
        (w.work_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        w.metrics.update({"train_tokens": index["splits"]["train"]["tokens"],
                          "val_tokens": index["splits"]["val"]["tokens"],
                          "n_documents": sum(len(v) for v in texts.values())})
        w.info["index"] = index
    return store.load("tokens", profile, name)
