"""Text into a Llama-family model, and its activations onto disk: the corpus as raw documents (re-tokenised
by the model's own tokenizer), packed into windows, and the sharded, resumable harvest of one hook's
activations (one process, or every ``torchrun`` rank taking every W-th window), read back by :class:`Shards`
a seeded global batch at a time.

    texts = corpus_texts("cpu")                          # documents of the train split, as text
    res = harvest(cfg, "cpu", source=source, texts=texts)  # acts-r<rank>-<n>.safetensors + index-r<rank>.json
    for batch in Shards(res.folder).batches(4096, n_steps): ...
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import ConfigError, UserError, check_free_space
from .llama import LlamaConfig, LlamaError, LlamaSource, load_model

# --- text ---------------------------------------------------------------------------------------------------

def local_texts() -> Iterator[str]:
    """Deterministic English-ish text that every install has: the package descriptions (METADATA) and
    markdown files of the installed Python packages, sorted by path. For tests and as a stand-in until
    the project's corpus is built."""
    import site
    import sysconfig

    roots = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    for root in roots:
        files = sorted([*Path(root).glob("*.dist-info/METADATA"), *Path(root).glob("*/README*.md")])
        for path in files:
            text = path.read_text(errors="replace")
            if path.name == "METADATA":  # the long description follows the first blank line
                text = text.partition("\n\n")[2]
            if len(text.strip()) > 200:
                yield text


def corpus_texts(profile: str, split: str = "train") -> Iterator[str]:
    """The project's corpus as raw text, one document at a time, in its stored (shuffled) order: the
    GPT-2 token shards of :mod:`monosemantic.data` decoded back to text (GPT-2's byte-level BPE round-trips
    exactly), to be re-tokenized by the model's own tokenizer. Falls back to :func:`local_texts` (with a
    note) when the corpus stage has not been run for ``profile``."""
    try:
        from . import data, tokenizer

        ds = data.TokenDataset.open(profile, split)
        gpt2 = tokenizer.load()
    except (UserError, AttributeError, ImportError) as e:
        print(f"llama: no {profile} corpus ({str(e)[:120]}); using the installed packages' documentation instead")
        yield from local_texts()
        return
    import numpy as np

    eot, pos, chunk = ds.eot_id, 0, 1 << 20
    carry = np.zeros(0, dtype=ds.tokens.dtype)
    while pos < len(ds.tokens):
        block = np.concatenate([carry, np.asarray(ds.tokens[pos:pos + chunk])])
        pos += chunk
        ends = np.flatnonzero(block == eot)
        start = 0
        for e in ends:
            if e > start:
                yield gpt2.decode(block[start:e])
            start = e + 1
        carry = block[start:]
    if len(carry):
        yield gpt2.decode(carry)


def documents(source: LlamaSource, texts: Iterable[str]) -> Iterator[list[int]]:
    """Each document tokenized as the model's tokenizer does by default (BOS included where it adds one),
    followed by EOS: the packing of :func:`windows` and :func:`token_stream`."""
    eos = getattr(source.tokenizer, "eos_token_id", None)
    for text in texts:
        yield source.encode(text, add_special_tokens=True) + ([int(eos)] if eos is not None else [])


def windows(source: LlamaSource, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    """Pack :func:`documents` into consecutive windows of ``seq_len`` tokens."""
    buf: list[int] = []
    for doc in documents(source, texts):
        buf.extend(doc)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def token_stream(source: LlamaSource, texts: Iterable[str], n_tokens: int) -> Any:
    """The first ``n_tokens`` of ``texts`` packed as :func:`windows` packs them (each document then EOS),
    as a numpy array: the text the feature analysis reads."""
    import numpy as np

    out: list[int] = []
    for doc in documents(source, texts):
        out.extend(doc)
        if len(out) >= n_tokens:
            break
    if not out:
        raise LlamaError("no text to analyse: build the corpus first (`monosemantic corpus --profile ...`)")
    return np.asarray(out[:n_tokens], dtype=np.int64)


# --- distributed helpers ------------------------------------------------------------------------------------

class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int


def dist_info() -> Dist:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", td.get_rank())))
    return Dist(0, 1, 0)


def init_distributed() -> Dist:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def device_for(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


# --- harvest --------------------------------------------------------------------------------------------------

def run_dir(profile: str, cfg: LlamaConfig) -> Path:
    """Where a run's large files live (ignored by git): ``cache/work/llama/<profile>-<run>/``."""
    from .store import work_path

    return work_path("llama", profile, cfg.run_name)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class HarvestResult(NamedTuple):
    folder: Path
    rows: int  # activations stored by this rank
    tokens_per_s: float  # forward throughput of this run (0 when nothing was left to do)
    seconds: float


def harvest(cfg: LlamaConfig, profile: str, *, source: LlamaSource | None = None,
            texts: Iterable[str] | None = None, folder: Path | None = None, progress: bool = True) -> HarvestResult:
    """Stream text through the model and store the activations at ``cfg.layer``/``cfg.site`` in shards.

    Each shard (``acts-r<rank>-<n>.safetensors``) holds ``acts`` (rows, d) in ``cfg.store_dtype`` and
    ``tokens`` (rows,) int32, the token at each position. ``index-r<rank>.json``
    records the shards written and how many windows they cover; a rerun continues after the last
    complete shard. Under ``torchrun`` rank r takes windows r, r+W, r+2W, ... Memory is bounded by one
    shard plus one batch.
    """
    from safetensors.torch import save_file

    d = dist_info()
    folder = folder or run_dir(profile, cfg) / "acts"
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / f"index-r{d.rank}.json"
    fields = cfg.harvest_fields()
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("fields") != fields or index.get("world") != d.world:
            raise LlamaError(f"{folder} holds activations of another harvest ({index.get('fields')}, "
                             f"world {index.get('world')}); delete the folder or use another --profile/run")
    else:
        index = {"fields": fields, "world": d.world, "windows_done": 0, "shards": [], "complete": False}
    target = math.ceil(cfg.harvest_tokens / d.world)  # rows this rank stores
    have = sum(s["rows"] for s in index["shards"])
    if have >= target:
        index["complete"] = True
        write_json(index_path, index)
        return HarvestResult(folder, have, 0.0, 0.0)

    source = source or load_model(cfg.model, device=device_for(d), dtype=cfg.dtype)
    hook = source.hook_name(cfg.layer, cfg.site)
    store_dtype = getattr(torch, cfg.store_dtype)
    check_free_space(folder, (target - have) * source.width(hook) * store_dtype.itemsize,
                     f"harvesting {target - have:,} activations of {hook}")
    texts = texts if texts is not None else corpus_texts(profile)
    # windows of this rank, after the ones already stored
    mine = (w for i, w in enumerate(windows(source, texts, cfg.seq_len)) if i % d.world == d.rank)
    for _ in range(index["windows_done"]):
        next(mine, None)

    acts_buf: list[torch.Tensor] = []
    tok_buf: list[torch.Tensor] = []
    buffered = windows_in_buf = 0
    n_tokens, start = 0, time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=target, initial=have, unit="act", desc=f"harvest {hook}", disable=not progress or d.rank > 0,
               mininterval=2.0)

    def flush() -> None:
        nonlocal acts_buf, tok_buf, buffered, windows_in_buf, have
        if not buffered:
            return
        name = f"acts-r{d.rank}-{len(index['shards']):05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file({"acts": torch.cat(acts_buf).contiguous(), "tokens": torch.cat(tok_buf).contiguous()}, str(tmp))
        os.replace(tmp, folder / name)
        index["shards"].append({"file": name, "rows": buffered, "windows": windows_in_buf})
        index["windows_done"] += windows_in_buf
        write_json(index_path, index)
        have += buffered
        acts_buf, tok_buf, buffered, windows_in_buf = [], [], 0, 0

    while have + buffered < target:
        batch = [w for _, w in zip(range(cfg.batch_size), mine, strict=False)]
        if not batch:
            break
        ids = torch.tensor(batch)  # (B, T)
        acts = source.run_with_hooks(ids, [hook])[hook][:, cfg.skip_first:]  # (B, T - skip, d)
        n_tokens += ids.numel()
        rows = acts.reshape(-1, acts.shape[-1]).to("cpu", store_dtype)
        if store_dtype == torch.float16 and not torch.isfinite(rows).all():
            raise LlamaError(f"activations at {hook} overflow float16; harvest with --store-dtype bfloat16")
        take = min(rows.shape[0], target - have - buffered)
        acts_buf.append(rows[:take])
        tok_buf.append(ids[:, cfg.skip_first:].reshape(-1)[:take].to(torch.int32))
        buffered += take
        windows_in_buf += len(batch)
        bar.update(take)
        if buffered >= cfg.shard_tokens:
            flush()
    flush()
    bar.close()
    seconds = time.perf_counter() - start
    have = sum(s["rows"] for s in index["shards"])
    index["complete"] = have >= target
    index.setdefault("runs", []).append({"tokens": n_tokens, "seconds": round(seconds, 3),
                                         "device": str(source.device), "dtype": str(source.model.dtype)})
    write_json(index_path, index)
    if not index["complete"]:
        print(f"llama harvest: the text ran out after {have:,} of {target:,} activations")
    return HarvestResult(folder, have, n_tokens / max(seconds, 1e-9), seconds)


class Shards:
    """The activation shards of a harvest folder, read in a seeded order a global batch at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        indexes = sorted(self.folder.glob("index-r*.json"))
        if not indexes:
            raise LlamaError(f"no harvested activations in {self.folder}; run `monosemantic llama harvest` first")
        self.indexes = [json.loads(p.read_text()) for p in indexes]
        fields = {json.dumps(ix["fields"], sort_keys=True) for ix in self.indexes}
        if len(fields) != 1 or len(self.indexes) != self.indexes[0]["world"]:
            raise LlamaError(f"{self.folder} mixes shards of different harvests; delete it and harvest again")
        self.fields = self.indexes[0]["fields"]
        self.files = [(self.folder / s["file"], s["rows"]) for ix in self.indexes for s in ix["shards"]]
        for path, _ in self.files:
            if not path.is_file():
                raise LlamaError(f"shard {path.name} is listed in the index but missing; harvest again")
        from safetensors import safe_open

        with safe_open(str(self.files[0][0]), "pt") as f:
            self.width = f.get_slice("acts").get_shape()[1]

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.files)

    def harvest_seconds(self) -> float:
        """Wall time of the harvest (the slowest process, summed over resumed runs)."""
        return max((sum(r["seconds"] for r in ix.get("runs", [])) for ix in self.indexes), default=0.0)

    def tokens_per_s(self) -> float:
        """Forward throughput of the harvest, all processes together (each rank's tokens / its seconds)."""
        total = 0.0
        for ix in self.indexes:
            runs = [r for r in ix.get("runs", []) if r["seconds"] > 0]
            if runs:
                total += sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
        return total

    def _load(self, path: Path) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(path))["acts"]

    def batches(self, global_batch: int, n_steps: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                buffer_shards: int = 4) -> Iterator[torch.Tensor]:
        """``n_steps`` batches of this rank's ``global_batch // world`` rows (float32). Every rank walks the
        same seeded sequence of global batches (shards in a shuffled order, ``buffer_shards`` at a time
        mixed row-wise) and takes its slice, so W processes see exactly the one-process batches."""
        if global_batch % world:
            raise ConfigError(f"the SAE batch {global_batch} is not divisible by {world} processes")
        local = global_batch // world
        gen = torch.Generator().manual_seed(seed)
        step, carry = 0, None
        while step < n_steps:
            order = torch.randperm(len(self.files), generator=gen).tolist()
            for b in range(0, len(order), buffer_shards):
                parts = [self._load(self.files[i][0]) for i in order[b:b + buffer_shards]]
                buf = torch.cat(parts if carry is None else [carry, *parts])
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                n_full = buf.shape[0] // global_batch
                for j in range(n_full):
                    if step == n_steps:
                        return
                    rows = buf[j * global_batch + rank * local: j * global_batch + (rank + 1) * local]
                    yield rows.float()
                    step += 1
                carry = buf[n_full * global_batch:]
