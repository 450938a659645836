"""Shared fixtures. Tests never touch the committed cache: each gets its own under tmp_path."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads():
    # two cores are shared by everything on this machine; tests stay predictable with one thread
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty result cache for one test (``MONOSEMANTIC_CACHE`` points at it)."""
    path = tmp_path / "cache"
    path.mkdir()
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(path))
    return path
