"""Stage configurations and where the project's files live.

Every stage (corpus, lm, sae, ...) describes its run by one frozen dataclass that subclasses
:class:`StageConfig`. The dataclass is the only place numbers such as batch sizes live; its
:meth:`~StageConfig.config_hash` is what the cache records, so an artifact made by another config is
detected as stale. ``VERSION`` is bumped by hand when a stage's code changes what it writes, which
makes old artifacts stale too.

The three profiles (``tiny``, ``cpu``, ``gpu``) are assembled in :mod:`monosemantic.profiles`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Any, ClassVar

PROFILES = ("tiny", "cpu", "gpu")
CORPUS_NAME = "minipile"
"""The corpus artifact name of every profile (cache/corpus/<profile>-<name>, cache/work/tokens/<profile>-<name>):
library code that reads token shards defaults to it (a test holds the profiles to it)."""


class UserError(Exception):
    """Bad input or state that the user can fix. The message is one line and says what to do; the CLI
    prints it without a traceback. Every error class meant for users subclasses this."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message says which field and why."""


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        omit = getattr(type(value), "OMIT_AT_DEFAULT", ())
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.name in omit and getattr(value, f.name) == f.default)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        # 1.0 and 1 must hash alike whichever way a profile spells them
        return int(value)
    return value


def stable_hash(obj: Any, length: int = 12) -> str:
    """sha256 of the canonical JSON form of ``obj`` (sorted keys, no whitespace), truncated."""
    text = json.dumps(_to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage's config: a frozen dataclass with a stable hash.

    Subclasses set ``STAGE`` (the cache folder, e.g. ``"lm"``) and may bump ``VERSION``. A field added after
    artifacts were made goes in ``OMIT_AT_DEFAULT``: at its default it is left out of the config's dict and
    hash, so those artifacts keep their hash and a config that sets it gets another.
    """

    STAGE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    def config_hash(self) -> str:
        return stable_hash({"stage": self.STAGE, "class": type(self).__name__,
                            "version": self.VERSION, "fields": self.to_dict()})

    def replace(self, **changes: Any):
        """A copy with some fields changed (validation runs again)."""
        return dataclasses.replace(self, **changes)


def check_positive(cfg: Any, *names: str, integer: bool = False, zero: bool = False) -> None:
    """The one check of a config's numeric fields: each of ``names`` must be a number > 0 (``zero``: >= 0;
    ``integer``: an integer, numpy's included, never a bool), else a one-line :class:`ConfigError` naming the
    class and the field."""
    for name in names:
        value = getattr(cfg, name)
        is_number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
        if not (is_number and (value >= 0 if zero else value > 0)):
            kind = ("an integer" if integer else "a number") + (" >= 0" if zero else " > 0")
            raise ConfigError(f"{type(cfg).__name__}: {name} must be {kind}, got {value!r}")


def check_profile(name: str) -> str:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return name


def project_root() -> Path:
    """The repository root: $MONOSEMANTIC_ROOT, else the nearest parent holding pyproject.toml and
    cache/ (so an installed package run from inside a checkout finds it), else the current folder."""
    env = os.environ.get("MONOSEMANTIC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in [Path.cwd().resolve(), *Path.cwd().resolve().parents, *here.parents]:
        if (parent / "pyproject.toml").is_file() and (parent / "code" / "monosemantic").is_dir():
            return parent
    return Path.cwd().resolve()


def cache_dir() -> Path:
    """Committed results (``cache/``); ``$MONOSEMANTIC_CACHE`` overrides (tests use a temp folder)."""
    env = os.environ.get("MONOSEMANTIC_CACHE")
    return Path(env).resolve() if env else project_root() / "cache"


def work_dir() -> Path:
    """Large, ignored intermediates: corpora, token shards, activations, checkpoints, big weights."""
    return cache_dir() / "work"


COMMAND_START_ENV = "MONOSEMANTIC_COMMAND_START"
"""Set by the CLI to the epoch time its command started: an artifact's wall time is then the command's."""

COMMAND_ENV = "MONOSEMANTIC_COMMAND"
"""Set by the CLI to the command line it runs (``monosemantic <args>``): what an artifact records as the
command that made it, also when the CLI is called from Python (a test, a notebook) rather than a shell."""


class DiskSpaceError(UserError, OSError):
    """Not enough free disk for a long write."""


def human_bytes(n: float) -> str:
    """A size as people read it: ``512 B``, ``4.9 kB``, ``1.2 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` (one line: how much is needed, how much is free, where) unless the
    file system holding ``path`` has ``need_bytes`` free plus a 5% margin. Called before long writes, so
    a full disk stops a run before it starts rather than with a half-written file."""
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes * 1.05 > free:
        raise DiskSpaceError(f"{what} needs {human_bytes(need_bytes)} free at {probe}, only {human_bytes(free)} "
                             "is; free some space (or point MONOSEMANTIC_CACHE at a larger disk) and run again")
