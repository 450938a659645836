"""Moving chapter 3's GPU run between machines: the pack of its inputs made here, unpacked and checked there,
and the returned artifacts checked and stored here (:mod:`monosemantic.gpurun` says what runs and why)."""


from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import UserError
from .harvest import harvest_batch, harvest_to_disk, harvest_windows
from .store import sha256_file

PACK_DIR = ".gpu-ch3"
"""The packed inputs (ignored; the device call carries it)."""
RUN_DIR = ".gpu-ch3-run"
"""The scratch cache on the GPU machine (ignored, so it stays between calls on a warm machine)."""
HARVEST_NAME = "mlp-gpu"
"""``activations/<profile>-mlp-gpu``: the harvest made on the GPU machine."""
SEED_RECIPES = ("topk", "anchor-fixed")
PART_LIMIT = 55 * 2**20
"""Largest packed part (the device takes 64 MiB of files per call, the code tree included)."""
RETURN_PART = 15 * 2**20
"""Largest returned part (the device returns files of at most 16 MiB, 8 files, 64 MiB in all)."""
RETURNED = "ch3-returned.json"
COMMAND = ("python -m monosemantic.gpurun run --out OUT (on a GPU machine: scripts/pack-gpu-inputs here, then "
           "scripts/gpu-chapter3 OUT there), then python -m monosemantic.gpurun store OUT")


class GPURunError(UserError):
    """A pack, an unpacked cache or a returned folder that does not check out; one line."""


def timed_log(prefix: str = "") -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {prefix}{msg}", flush=True)
    return log


# --- packing (here) -------------------------------------------------------------------------------------

def _tar(path: Path, members: dict[str, Path]) -> None:
    """A gzipped tar of ``{name inside: file here}`` (names relative to a cache root)."""
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for name, src in sorted(members.items()):
            tar.add(src, arcname=name, recursive=False)


def _artifact_members(art, root: str) -> dict[str, Path]:
    """The committed files of an artifact (and its manifest) as tar members under ``root``."""
    from .store import MANIFEST

    members = {f"{root}/{MANIFEST}": art.path / MANIFEST}
    for rel, entry in art.manifest.get("files", {}).items():
        if entry.get("location", "cache") == "cache":
            members[f"{root}/{rel}"] = art.path / rel
    return members


def pack(profile: str, out: Path, stage, *, reference_rows: int = 2048, saes: tuple[str, ...] = SEED_RECIPES,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the GPU run's inputs to ``out`` (emptied first): ``lm.tar.gz`` (the LM artifact),
    ``tokens.tar.gz`` (the tokens manifest and index, the val split, the harvest's train windows and the first
    ``reference_rows`` activations of the harvest computed here), ``saes.tar.gz`` (the committed SAEs
    ``saes`` and the CPU harvest's manifest they name) and ``manifest.json`` (sizes and sha256s). Returns
    the manifest. ``stage``: the profile's ``SAEStageConfig``."""
    from . import store
    from .config import CORPUS_NAME
    from .data import TokenDataset
    from .lm import load_pretrained

    hcfg = stage.harvest
    lm_art = store.load("lm", profile, "model")
    tok_art = store.load("tokens", profile, CORPUS_NAME, verify=False, check_inputs=False)
    train = TokenDataset.open(profile, "train")
    val = TokenDataset.open(profile, "val", verify=True)
    start = time.perf_counter()
    starts, ids = harvest_windows(train.tokens, hcfg.seq_len, hcfg.seed, hcfg.train_activations)
    log(f"{len(starts):,} train windows of {hcfg.seq_len} tokens ({ids.nbytes / 1e6:.1f} MB) for "
        f"{hcfg.train_activations:,} activations")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "windows.npz", starts=starts, ids=ids)
        model = load_pretrained(profile).eval()
        harvest_to_disk(model, train.tokens, reference_rows, tmp / "reference.f16", seq_len=hcfg.seq_len,
                        seed=hcfg.seed, hook=hcfg.hook, progress=False)
        tok_root = f"work/tokens/{profile}-{CORPUS_NAME}"
        parts = {
            "lm.tar.gz": _artifact_members(lm_art, f"lm/{profile}-model"),
            "tokens.tar.gz": {f"tokens/{profile}-{CORPUS_NAME}/{store.MANIFEST}": tok_art.path / store.MANIFEST,
                              f"{tok_root}/index.json": tok_art.work_path / "index.json",
                              f"{tok_root}/{val.path.name}": val.path,
                              "work/gpu-inputs/windows.npz": tmp / "windows.npz",
                              "work/gpu-inputs/reference.f16": tmp / "reference.f16"},
        }
        sae_members: dict[str, Path] = {}
        sae_hashes = {}
        for name in saes:
            art = store.load("sae", profile, name)
            sae_members.update(_artifact_members(art, f"sae/{profile}-{name}"))
            sae_hashes[name] = art.content_hash
            for key in art.manifest.get("inputs", {}):
                stage, rest = key.split("/", 1)
                if stage == "activations" and store.artifact_path(stage, *rest.split("-", 1)).is_dir():
                    up = store.artifact_path(stage, *rest.split("-", 1))
                    sae_members[f"{key}/{store.MANIFEST}"] = up / store.MANIFEST  # its files are not needed
        if sae_members:
            parts["saes.tar.gz"] = sae_members
        manifest: dict[str, Any] = {
            "format": 1, "profile": profile, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": store.git_commit(), "harvest": hcfg.to_dict(), "harvest_batch": harvest_batch(),
            "windows": int(len(starts)), "reference_rows": reference_rows, "lm": lm_art.content_hash,
            "tokens": {"name": CORPUS_NAME, "content_hash": tok_art.content_hash, "train_tokens": len(train),
                       "val_tokens": len(val), "val_sha256": sha256_file(val.path)},
            "saes": sae_hashes, "parts": {},
        }
        for part, members in parts.items():
            _tar(out / part, members)
            size = (out / part).stat().st_size
            if size > PART_LIMIT:
                raise GPURunError(f"{part} is {size / 2**20:.1f} MiB, over the {PART_LIMIT / 2**20:.0f} MiB a part "
                                  "may be; pack fewer SAEs (--saes)")
            manifest["parts"][part] = {"sha256": sha256_file(out / part), "bytes": size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p["bytes"] for p in manifest["parts"].values())
    log(f"packed {len(parts)} parts, {total / 2**20:.1f} MiB, into {out} in {time.perf_counter() - start:.0f} s")
    if total > 60 * 2**20:
        log(f"warning: {total / 2**20:.1f} MiB leaves little of the device's 64 MiB for the code tree")
    return manifest


def unpack(pack_dir: Path, cache: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check the parts of ``pack_dir`` against its manifest and rebuild a cache at ``cache``: the LM, the token
    split's manifest and index, ``val.bin``, a sparse ``train.bin`` of the full length holding the harvest's
    windows, the seed-0 SAEs. Checks that this machine's torch draws the same windows. Does nothing when
    ``cache`` already holds this pack."""
    pack_dir, cache = Path(pack_dir), Path(cache)
    manifest_file = pack_dir / "manifest.json"
    if not manifest_file.is_file():
        raise GPURunError(f"{manifest_file} is missing; make the pack with scripts/pack-gpu-inputs and carry "
                          f"{PACK_DIR}")
    manifest = json.loads(manifest_file.read_text())
    digest = hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    marker = cache / "work" / "gpu-inputs" / "unpacked.json"
    if marker.is_file() and json.loads(marker.read_text()).get("manifest_sha256") == digest:
        log(f"{cache} already holds this pack")
        return manifest
    for part, entry in manifest["parts"].items():
        path = pack_dir / part
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise GPURunError(f"{path} is missing or does not match the pack's manifest (sha256); pack again")
    cache.mkdir(parents=True, exist_ok=True)
    for part in manifest["parts"]:
        with tarfile.open(pack_dir / part) as tar:
            tar.extractall(cache, filter="data")
    profile, tok = manifest["profile"], manifest["tokens"]
    tok_dir = cache / "work" / "tokens" / f"{profile}-{tok['name']}"
    if sha256_file(tok_dir / "val.bin") != tok["val_sha256"]:
        raise GPURunError("the unpacked val.bin does not match its sha256")
    inputs = np.load(cache / "work" / "gpu-inputs" / "windows.npz")
    starts, ids = inputs["starts"], inputs["ids"]
    train = tok_dir / "train.bin"
    with open(train, "wb") as f:
        f.truncate(tok["train_tokens"] * 2)  # sparse: only the windows below take disk space
    tokens = np.memmap(train, dtype=np.uint16, mode="r+", shape=(tok["train_tokens"],))
    tokens[(starts[:, None] + np.arange(ids.shape[1])[None, :]).ravel()] = ids.ravel()
    tokens.flush()
    del tokens
    h = manifest["harvest"]
    tokens = np.memmap(train, dtype=np.uint16, mode="r", shape=(tok["train_tokens"],))
    again_starts, again_ids = harvest_windows(tokens, h["seq_len"], h["seed"], h["train_activations"])
    if not (np.array_equal(again_starts, starts) and np.array_equal(again_ids, ids)):
        raise GPURunError(f"torch {torch.__version__} here draws other harvest windows than the packing machine did; "
                          "the harvest would read tokens that were not packed")
    marker.write_text(json.dumps({"manifest_sha256": digest}))
    log(f"unpacked {len(manifest['parts'])} parts into {cache}; {len(starts):,} harvest windows in a sparse "
        f"train.bin of {tok['train_tokens']:,} tokens, drawn identically here")
    return manifest



def return_artifacts(keys: list[str], out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Tar the committed files of the artifacts ``keys`` (``stage/profile-name``) into ``out`` as parts of at
    most ``RETURN_PART`` bytes, with ``ch3-returned.json``: their content hashes and the parts' sha256s."""
    from . import store

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ch3-artifacts.tgz.*"):
        old.unlink()
    arts = {}
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "a.tgz"
        with tarfile.open(tarball, "w:gz", compresslevel=6) as tar:
            for key in keys:
                stage, rest = key.split("/", 1)
                profile, name = rest.split("-", 1)
                art = store.load(stage, profile, name, verify=False, check_inputs=False)
                for member, path in _artifact_members(art, key).items():
                    tar.add(path, arcname=member, recursive=False)
                arts[key] = art.content_hash
        parts = {}
        with open(tarball, "rb") as f:
            i = 0
            while block := f.read(RETURN_PART):
                part = out / f"ch3-artifacts.tgz.{i:02d}"
                part.write_bytes(block)
                parts[part.name] = {"sha256": hashlib.sha256(block).hexdigest(), "bytes": len(block)}
                i += 1
    returned = {"format": 1, "artifacts": arts, "parts": parts, **extra}
    (out / RETURNED).write_text(json.dumps(returned, indent=1) + "\n")
    return returned



# --- storing (here) -------------------------------------------------------------------------------------

def store_returned(folder: Path, *, force: bool = False, log: Callable[[str], None] = print) -> list[str]:
    """Check what scripts/gpu-chapter3 returned in ``folder`` (parts against ``ch3-returned.json``, every file
    against its artifact's manifest, every input against this cache or the returned set) and copy the artifacts
    into the cache. A damaged part or file stops everything; an artifact made from another version of an input
    than this cache holds is skipped, with the reason; one that is here already with other content is replaced
    only with ``force`` (otherwise nothing is copied). Returns the keys stored."""
    from . import store
    from .sae import SAE_WEIGHTS_FILENAME

    folder = Path(folder)
    spec_file = folder / RETURNED
    if not spec_file.is_file():
        raise GPURunError(f"{spec_file} is missing: pass the folder the GPU run's files were fetched to")
    spec = json.loads(spec_file.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tarball = tmp / "a.tgz"
        with open(tarball, "wb") as out:
            for part, entry in sorted(spec["parts"].items()):
                data = (folder / part).read_bytes() if (folder / part).is_file() else b""
                if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise GPURunError(f"{folder / part} is missing or does not match {RETURNED} (sha256)")
                out.write(data)
        root = tmp / "cache"
        with tarfile.open(tarball) as tar:
            tar.extractall(root, filter="data")
        keys = list(spec["artifacts"])  # upstream ones first, as the run lists them
        arts, replace, skipped = {}, [], set()
        for key in keys:
            stage, rest = key.split("/", 1)
            profile, name = rest.split("-", 1)
            manifest = json.loads((root / key / store.MANIFEST).read_text())
            art = store.Artifact(stage, profile, name, root / key, manifest)
            problems = art.problems(check_work=False)
            if problems:
                raise GPURunError(f"returned {key}: {problems[0]}")
            if art.content_hash != spec["artifacts"][key]:
                raise GPURunError(f"returned {key} is not the artifact {RETURNED} names")
            stale = None
            for up, content_hash in manifest.get("inputs", {}).items():
                if up in spec["artifacts"]:
                    ok = spec["artifacts"][up] == content_hash and up not in skipped
                else:
                    up_stage, up_rest = up.split("/", 1)
                    try:
                        here = store.load(up_stage, *up_rest.split("-", 1), verify=False, check_inputs=False)
                    except store.CacheError:
                        log(f"note: {key} was made from {up}, which is not in this cache")
                        continue
                    ok = here.content_hash == content_hash
                if not ok:
                    stale = up
                    break
            if stale is not None:  # e.g. the held-out table of a seed-0 SAE that was retrained here since
                log(f"skipped {key}: it was made from another {stale} than this cache holds (it would load as "
                    "stale); remake it here" + (" with `monosemantic evaluate`" if name == "heldout" else ""))
                skipped.add(key)
                continue
            dest = store.artifact_path(stage, profile, name)
            if dest.is_dir():
                try:
                    same = store.load(stage, profile, name, verify=False, check_inputs=False).content_hash == \
                        art.content_hash
                except store.CacheError:
                    same = False
                if not same:
                    replace.append(key)
            arts[key] = art
        if replace and not force:
            raise GPURunError(f"{', '.join(replace)} already in the cache with other content; pass --force to "
                              "replace them")
        for art in arts.values():
            dest = store.artifact_path(art.stage, art.profile, art.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.parent / f".tmp-{dest.name}-gpu"
            if tmp_dest.exists():
                shutil.rmtree(tmp_dest)
            shutil.copytree(art.path, tmp_dest)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp_dest, dest)
            # a returned SAE keeps its weights in cache/work/ (chapter 3 reads their curves and metrics; the
            # committed SAE weights are those the analysis reads); the manifest records where, and the hashes
            if art.stage == "sae" and SAE_WEIGHTS_FILENAME in art.files:
                store.move_to_work(store.load(art.stage, art.profile, art.name, verify=False, check_inputs=False),
                                   [SAE_WEIGHTS_FILENAME])
    keys = [k for k in keys if k not in skipped]
    for key in keys:
        stage, rest = key.split("/", 1)
        art = store.load(stage, *rest.split("-", 1))
        m = art.metrics
        brief = ", ".join(f"{k} {m[k]:.4g}" for k in ("train_activations", "resampled_total", "fvu", "l0",
                                                     "ce_loss_recovered", "input_scale")
                          if isinstance(m.get(k), (int, float)))
        log(f"stored {key}" + (f": {brief}" if brief else ""))
    if spec.get("unfinished"):
        log(f"unfinished on the GPU: {', '.join(spec['unfinished'])}")
    return keys
