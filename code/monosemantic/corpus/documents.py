"""Which source each document of the token shards came from (``document_sources.npz``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import CORPUS_NAME, work_dir
from .sources import CorpusError

# --- which source each document came from --------------------------------------------------------------

DOCUMENT_SOURCES = "document_sources.npz"
"""Beside the token shards: the source of every document of each split, in shard order. Kept out of the
tokens artifact's manifest, so that writing it (or recomputing it for an old build) changes no hash that the
stages downstream of the shards were made from; it carries the shards' sha256 and is checked against them."""


class DocumentSources(dict):
    """``{split: (documents,) int array of source numbers}`` in shard order, with ``names[number]``."""

    def __init__(self, names: list[str], splits: dict[str, np.ndarray]):
        super().__init__(splits)
        self.names = list(names)


def write_document_sources(folder: Path, names: list[str], splits: dict[str, np.ndarray]) -> Path:
    """Write ``folder/document_sources.npz``: per split the source number of each document (in shard order),
    the source names, and each split's sha256 from ``folder/index.json``. Written atomically."""
    index = json.loads((folder / "index.json").read_text())
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    arrays = {f"{split}_sources": np.asarray(splits[split]).astype(dtype) for split in index["splits"]}
    arrays.update({f"{split}_sha256": np.array(index["splits"][split]["sha256"][0]) for split in index["splits"]})
    path = folder / DOCUMENT_SOURCES
    tmp = folder / f".{DOCUMENT_SOURCES}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, names=np.array(names), **arrays)
    os.replace(tmp, path)
    return path


def load_document_sources(profile: str, name: str | None = None, folder: Path | None = None) -> DocumentSources:
    """The source of every document of the ``profile``'s token shards (``folder``: read that folder instead).
    A one-line error when the index is missing or was made for other shards (the commands that make it)."""
    name = name or CORPUS_NAME
    folder = Path(folder) if folder is not None else work_dir() / "tokens" / f"{profile}-{name}"
    remake = f"`monosemantic corpus --profile {profile} --document-sources`"
    path = folder / DOCUMENT_SOURCES
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise CorpusError(f"token shards {folder} are missing; make them with `monosemantic corpus --profile "
                          f"{profile}`")
    if not path.is_file():
        raise CorpusError(f"{path} is missing (the source of each document); recompute it with {remake}")
    index = json.loads(index_path.read_text())
    with np.load(path) as z:
        names = [str(x) for x in z["names"]]
        splits = {}
        for split, entry in index["splits"].items():
            if f"{split}_sources" not in z or str(z[f"{split}_sha256"]) != entry["sha256"][0] or \
                    len(z[f"{split}_sources"]) != entry["documents"]:
                raise CorpusError(f"{path} was made for other token shards than those in {folder} ({split} split "
                                  f"differs); recompute it with {remake}")
            splits[split] = z[f"{split}_sources"].astype(np.int64)
    return DocumentSources(names, splits)


def document_lengths(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """(documents,) int64 length of each document of a shard, its closing <|endoftext|> included."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
    return np.diff(ends, prepend=0)
