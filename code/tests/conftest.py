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


# --- the tiny pipeline, built once per test run ----------------------------------------------------------

TINY_LEVELS: dict[str, tuple[tuple[str, ...], ...]] = {
    "corpus": (),  # corpus.build
    "lm": (("train-lm", "--threads", "1", "--no-progress"),),
    "harvest": (("harvest", "--no-progress"),),
    "sae": (("train-sae", "--no-progress"),),  # every SAE of the tiny profile
}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """``make(level, dest) -> dest``: a cache of its own at ``dest`` holding the tiny profile's pipeline up to
    ``level`` (a key of :data:`TINY_LEVELS`, each including the ones before it), artifacts and work files. The
    stages run once per test session, on first demand, and are snapshotted after each level; each caller gets
    a copy, so no test sees another's writes."""
    import shutil

    from monosemantic import cli, corpus, profiles

    root = tmp_path_factory.mktemp("tiny-pipeline")
    live = root / "live"
    snapshots: dict[str, object] = {}

    def make(level: str, dest):
        order = list(TINY_LEVELS)
        for name in order[:order.index(level) + 1]:
            if name in snapshots:
                continue
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MONOSEMANTIC_CACHE", str(live))
                if name == "corpus":
                    live.mkdir()
                    corpus.build(profiles.get("tiny").corpus, "tiny", workers=1, threads=1, command="test")
                for argv in TINY_LEVELS[name]:
                    assert cli.main([*argv, "--profile", "tiny"]) == 0, argv
            snapshots[name] = root / f"after-{name}"
            shutil.copytree(live, snapshots[name])
        shutil.copytree(snapshots[level], dest)
        return dest

    return make


# --- the fault table ------------------------------------------------------------------------------------
# Tests of bad input and faults record what they tried and what the program said (the ``fault`` fixture, which
# marks them ``faults``); `monosemantic faults` runs them alone and writes the rows into the artifact
# faults/tiny-table (the setup appendix of the book shows it). A plain test run writes nothing.

_FAULTS: dict[str, dict[str, str]] = {}


class FaultRecorder:
    def __init__(self, tmp_path):
        self.tmp = str(tmp_path)

    def __call__(self, case: str, entry: str, fault: str, said: str, kept: str) -> None:
        """Record one case; ``said`` must be one line with no traceback (checked here)."""
        import re

        said = str(said).strip()
        assert said and "\n" not in said and "Traceback" not in said, said
        said = said.replace(self.tmp, "<tmp>")
        said = re.sub(r"/tmp/[^\s'\"`),;]*", "<tmp>", said)
        _FAULTS[case] = {"case": case, "entry point": entry, "fault or bad input": fault,
                         "what the program said": said, "what was kept": kept}


@pytest.fixture
def fault(tmp_path):
    return FaultRecorder(tmp_path)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "fault" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.faults)


def pytest_sessionfinish(session, exitstatus):
    import os

    from monosemantic.faults import OUT_ENV, record

    if _FAULTS and exitstatus == 0 and os.environ.get(OUT_ENV):
        record(_FAULTS, os.environ[OUT_ENV])
