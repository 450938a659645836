"""Checkpoints of long runs, one way for every trainer: written atomically, read back with a one-line error
when the file is not a checkpoint, set aside (with a note) when it was made with another config, and the
stop signals (Ctrl-C, SIGTERM) caught so a run stops between steps with its checkpoint written.

    state = checkpoint.load(path, cfg.config_hash(), {"step", "model"}, what="lm", fix="delete it or run with --fresh")
    ...
    checkpoint.save(path, {"config_hash": cfg.config_hash(), "step": step, ...})
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import UserError


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file beside ``path`` and rename it: a crash leaves
    the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path | None, config_hash: str, required: set[str], *, what: str, fix: str,
         log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none or it was made with another config (``log``
    says so: the run starts afresh and overwrites it). A file that is not a readable checkpoint with the
    ``required`` keys raises a one-line :class:`UserError` ending in ``fix`` (what the user can do)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not required <= state.keys():
            raise ValueError("some of its parts are missing")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{path} is not a readable {what} checkpoint ({reason}); {fix}") from None
    if state.get("config_hash") != config_hash:
        log(f"ignoring {path}: it was made with another {what} config ({state.get('config_hash')}, now "
            f"{config_hash}); starting afresh")
        return None
    return state


def catch_stop_signals(flag: list[int]) -> dict[int, Any]:
    """Make SIGINT and SIGTERM append their number to ``flag`` (for the loop to honour between steps) instead of
    stopping at once; returns the old handlers for :func:`restore_signals`. Off the main thread nothing is
    caught (signal handlers can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda signum, frame: flag.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
