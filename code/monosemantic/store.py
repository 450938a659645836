"""The result cache: one folder per artifact, a manifest that says how it was made, verified on load.

Layout::

    cache/<stage>/<profile>-<name>/manifest.json   committed: small results (fp16 weights, parquet, JSON)
    cache/work/<stage>/<profile>-<name>/...        ignored: large files (the manifest still hashes them)

Write with :func:`write` (a context manager: files go to a temporary folder that is renamed into place
only when the block finishes without error, so a crash never leaves a half-written artifact), read
with :func:`load`, which checks that the artifact exists, that every file has the size and sha256 the
manifest recorded, that it was made by the config the caller expects and from the upstream artifacts
that are in the cache now. Every failure is a :class:`CacheError` whose one-line message names the
command that regenerates the artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__, hardware
from .config import (
    COMMAND_ENV,
    COMMAND_START_ENV,
    StageConfig,
    UserError,
    cache_dir,
    check_profile,
    project_root,
    stable_hash,
    work_dir,
)

MANIFEST = "manifest.json"
FORMAT = 1  # bumped when the manifest's own layout changes

# The command that (re)makes each stage's artifacts; ``{profile}`` is filled in.
STAGE_COMMANDS: dict[str, str] = {
    "corpus": "monosemantic corpus --profile {profile}",
    "tokens": "monosemantic corpus --profile {profile}",
    "lm": "monosemantic train-lm --profile {profile}",
    "activations": "monosemantic harvest --profile {profile}",
    "sae": "monosemantic train-sae --profile {profile}",
    "toy": "monosemantic toy --profile {profile}",
    "analysis": "monosemantic analyze --profile {profile}",
    "llama": "monosemantic llama --profile {profile}",
    "bench": "make bench",
    "reliability": "make test",
}


class CacheError(UserError, RuntimeError):
    """A missing, corrupt or stale artifact. The message is one line and says what to run."""


def regenerate_command(stage: str, profile: str) -> str:
    return STAGE_COMMANDS.get(stage, "monosemantic {stage} --profile {profile}").format(
        stage=stage, profile=profile)


def artifact_key(stage: str, profile: str, name: str) -> str:
    return f"{stage}/{profile}-{name}"


def artifact_path(stage: str, profile: str, name: str) -> Path:
    return cache_dir() / stage / f"{profile}-{name}"


def work_path(stage: str, profile: str, name: str) -> Path:
    return work_dir() / stage / f"{profile}-{name}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    """HEAD of the checkout, with ``+dirty`` when the package sources have uncommitted changes."""
    root = project_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "code/monosemantic"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def current_command() -> str:
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("monosemantic", "__main__.py", "cli.py"):
        argv[0] = "monosemantic"
    return " ".join(argv)


@dataclasses.dataclass
class Artifact:
    """An artifact in the cache, as read from its manifest."""

    stage: str
    profile: str
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return artifact_key(self.stage, self.profile, self.name)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def content_hash(self) -> str:
        """Hash of the files' hashes: changes whenever any file of the artifact changes."""
        return stable_hash({k: v["sha256"] for k, v in self.manifest.get("files", {}).items()})

    @property
    def command(self) -> str:
        return self.manifest.get("command") or regenerate_command(self.stage, self.profile)

    @property
    def work_path(self) -> Path:
        return work_path(self.stage, self.profile, self.name)

    def file(self, rel: str) -> Path:
        """Path of one of the artifact's files; a file kept in ``cache/work/`` that is not on this
        machine raises :class:`CacheError` saying how to make it."""
        entry = self.manifest.get("files", {}).get(rel)
        if entry is None:
            raise CacheError(f"{self.key} has no file {rel!r} (it has: {', '.join(self.files) or 'none'})")
        path = (self.work_path if entry.get("location") == "work" else self.path) / rel
        if not path.is_file():
            where = "cache/work/ (not committed)" if entry.get("location") == "work" else "the cache"
            raise CacheError(f"{self.key}: {rel} is missing from {where}; regenerate it with "
                             f"`{self.command}`")
        return path

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest.get("files", {}))

    def size_bytes(self, location: str | None = "cache") -> int:
        return sum(e["bytes"] for e in self.manifest.get("files", {}).values()
                   if location is None or e.get("location", "cache") == location)

    def problems(self, check_work: bool = True) -> list[str]:
        """Every way the files differ from the manifest (empty when the artifact is intact)."""
        out = []
        for rel, entry in sorted(self.manifest.get("files", {}).items()):
            in_work = entry.get("location") == "work"
            path = (self.work_path if in_work else self.path) / rel
            if not path.is_file():
                if not in_work:
                    out.append(f"{rel} is missing")
                continue  # work files are optional on a fresh clone
            if in_work and not check_work:
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                out.append(f"{rel} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
            elif sha256_file(path) != entry["sha256"]:
                out.append(f"{rel} does not match its sha256 (modified after it was written)")
        return out


class ArtifactWriter:
    """Collects an artifact's files and metrics; see :func:`write`."""

    def __init__(self, stage: str, profile: str, name: str, config: StageConfig | dict,
                 command: str | None, inputs: list[Artifact] | None):
        self.stage, self.profile, self.name = stage, check_profile(profile), name
        self.config = config
        self.command = command or current_command()
        self.inputs = {a.key: a.content_hash for a in (inputs or [])}
        self.metrics: dict[str, Any] = {}
        self.info: dict[str, Any] = {}  # anything else worth recording: seeds, data sizes, notes
        self.wall_time_s: float | None = None  # set to override the measured time (e.g. resumed runs)
        token = uuid.uuid4().hex[:8]
        final = artifact_path(stage, profile, name)
        self.dir = final.parent / f".tmp-{final.name}-{token}"
        self.work_dir = work_path(stage, profile, name).parent / f".tmp-{final.name}-{token}"
        self._start = time.perf_counter()

    def _files(self) -> dict[str, dict[str, Any]]:
        files = {}
        for location, root in (("cache", self.dir), ("work", self.work_dir)):
            if not root.exists():
                continue
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                rel = path.relative_to(root).as_posix()
                if rel == MANIFEST:
                    continue
                if rel in files:
                    raise CacheError(f"{rel} was written both to the cache and to cache/work/")
                files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size,
                              "location": location}
        return files

    def manifest(self) -> dict[str, Any]:
        if isinstance(self.config, StageConfig):
            config, config_hash = self.config.to_dict(), self.config.config_hash()
        else:
            config, config_hash = dict(self.config), stable_hash(self.config)
        _check_finite(self.metrics, f"{self.stage} metrics")
        wall = self.wall_time_s
        if wall is None:  # the whole command so far when run from the CLI (which records its start), else this block
            started = os.environ.get(COMMAND_START_ENV)
            wall = time.time() - float(started) if started else time.perf_counter() - self._start
        return {
            "format": FORMAT,
            "stage": self.stage,
            "profile": self.profile,
            "name": self.name,
            "config": config,
            "config_hash": config_hash,
            "package_version": __version__,
            "git_commit": git_commit(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "wall_time_s": round(wall, 3),
            "hardware": hardware.describe(),
            "inputs": self.inputs,
            "files": self._files(),
            "metrics": self.metrics,
            **({"info": self.info} if self.info else {}),
        }


def _check_finite(obj: Any, where: str) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise CacheError(f"{where} hold a non-finite number ({obj}); refusing to record it")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_finite(v, where)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing what was there with two renames (never half of each)."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def write(stage: str, profile: str, name: str, *, config: StageConfig | dict, command: str | None = None,
          inputs: list[Artifact] | None = None) -> Iterator[ArtifactWriter]:
    """Write an artifact atomically.

    >>> with store.write("lm", "cpu", "model", config=cfg, inputs=[tokens]) as w:
    ...     save_file(weights, w.dir / "model.safetensors")      # committed
    ...     np.save(w.work_dir / "big.npy", acts)                # kept in ignored cache/work/
    ...     w.metrics["val_loss"] = 3.1

    ``inputs`` are the upstream artifacts it was made from; loading it later checks they are unchanged.
    """
    w = ArtifactWriter(stage, profile, name, config, command, inputs)
    w.dir.mkdir(parents=True)
    w.work_dir.mkdir(parents=True)
    try:
        yield w
        manifest = w.manifest()
        (w.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        has_work = any(e["location"] == "work" for e in manifest["files"].values())
        if has_work:
            _replace_dir(w.work_dir, work_path(stage, profile, name))
        else:
            shutil.rmtree(w.work_dir, ignore_errors=True)
        _replace_dir(w.dir, artifact_path(stage, profile, name))
    except BaseException:
        shutil.rmtree(w.dir, ignore_errors=True)
        shutil.rmtree(w.work_dir, ignore_errors=True)
        raise


def move_to_work(art: Artifact, rels: list[str]) -> Artifact:
    """Keep the files ``rels`` of a written artifact in ``cache/work/`` instead of the committed cache (the
    manifest records their location; their hashes do not change), e.g. tables no chapter reads, to keep the
    committed cache small. The artifact, read again."""
    manifest = json.loads((art.path / MANIFEST).read_text())
    for rel in rels:
        entry = manifest.get("files", {}).get(rel)
        if entry is None:
            raise CacheError(f"{art.key} has no file {rel!r} (it has: {', '.join(art.files) or 'none'})")
        if entry.get("location") == "work":
            continue
        target = art.work_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(art.path / rel), str(target))
        entry["location"] = "work"
    tmp = art.path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, art.path / MANIFEST)
    return load(art.stage, art.profile, art.name)


def _read_manifest(path: Path, key: str, command: str) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheError(f"{key} has no {MANIFEST} (an interrupted write?); regenerate it with "
                         f"`{command}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{key}/{MANIFEST} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); "
                         f"regenerate it with `{command}`") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise CacheError(f"{key}/{MANIFEST} is not a manifest; regenerate it with `{command}`")
    return manifest


READS: dict[str, str] = {}
"""Every artifact :func:`load` returned in this process, with its content hash: the book build reads it
from each chapter's kernel to report which chapters read which artifacts."""


def load(stage: str, profile: str, name: str, *, config: StageConfig | None = None,
         verify: bool = True, check_inputs: bool = True) -> Artifact:
    """Read and verify an artifact. Raises :class:`CacheError` (one line, naming the command to run)
    when it is missing, corrupt, made by another config or code version, or made from upstream
    artifacts that have changed since."""
    check_profile(profile)
    key = artifact_key(stage, profile, name)
    command = regenerate_command(stage, profile)
    path = artifact_path(stage, profile, name)
    if not path.is_dir():
        raise CacheError(f"{key} is not in the cache ({path}); make it with `{command}`")
    manifest = _read_manifest(path, key, command)
    art = Artifact(stage, profile, name, path, manifest)
    command = art.command
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{key} was written in cache format {manifest.get('format')}, this code reads "
                         f"format {FORMAT}; regenerate it with `{command}`")
    if config is not None and manifest.get("config_hash") != config.config_hash():
        changed = _changed_fields(manifest.get("config", {}), config.to_dict())
        raise CacheError(f"{key} is stale: made with config {manifest.get('config_hash')}, the current "
                         f"{profile} profile gives {config.config_hash()} ({changed}); regenerate it with "
                         f"`{command}`")
    if verify:
        problems = art.problems()
        if problems:
            raise CacheError(f"{key} is corrupt: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                             + f"; regenerate it with `{command}`")
    if check_inputs:
        for upstream_key, content_hash in manifest.get("inputs", {}).items():
            up_stage, rest = upstream_key.split("/", 1)
            up_profile, up_name = rest.split("-", 1)
            up_path = artifact_path(up_stage, up_profile, up_name)
            try:
                up = Artifact(up_stage, up_profile, up_name, up_path,
                              _read_manifest(up_path, upstream_key, command))
            except CacheError:
                continue  # an upstream that is gone does not make this result wrong
            if up.content_hash != content_hash:
                raise CacheError(f"{key} is stale: it was made from a different {upstream_key} than the "
                                 f"one in the cache now; regenerate it with `{command}`")
    READS[key] = art.content_hash
    return art


def _changed_fields(old: dict, new: dict, prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changed_fields(a, b, f"{prefix}{k}.")
            if inner != "no field differs":
                diffs.append(inner)
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    if not diffs:
        return "no field differs"
    return ", ".join(diffs[:3]) + (f", +{len(diffs) - 3} more" if len(diffs) > 3 else "")


def list_artifacts(stage: str | None = None) -> list[Artifact]:
    """Every artifact in the cache (unverified), sorted by stage, profile and name."""
    root = cache_dir()
    out = []
    for manifest_path in sorted(root.glob(f"{stage or '*'}/*/{MANIFEST}")):
        folder = manifest_path.parent
        if folder.name.startswith(".") or folder.parent.name == "work":
            continue
        profile, _, name = folder.name.partition("-")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = {"files": {}, "corrupt": True}
        out.append(Artifact(folder.parent.name, profile, name, folder, manifest))
    return out


def find(stage: str, name: str, profiles: tuple[str, ...] = ("gpu", "cpu", "tiny")) -> Artifact:
    """The largest-profile artifact of this stage and name that is present (verified), so a chapter
    shows the biggest run there is and can say which."""
    errors = []
    for profile in profiles:
        if artifact_path(stage, profile, name).is_dir():
            try:
                return load(stage, profile, name)
            except CacheError as e:
                errors.append(str(e))
    if errors:
        raise CacheError(errors[0])
    raise CacheError(f"no {stage}/*-{name} artifact in the cache; make one with "
                     f"`{regenerate_command(stage, profiles[-1])}`")


def verify_all(check_work: bool = True) -> list[tuple[Artifact, list[str]]]:
    """Each artifact with the list of its problems (empty when intact)."""
    out = []
    for art in list_artifacts():
        if art.manifest.get("corrupt"):
            out.append((art, [f"{MANIFEST} is not valid JSON"]))
        else:
            out.append((art, art.problems(check_work=check_work)))
    return out
