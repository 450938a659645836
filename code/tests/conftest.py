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


# --- the fault table ------------------------------------------------------------------------------------
# Tests of bad input and faults record what they tried and what the program said; at the end of the run
# the rows are merged into the artifact faults/tiny-table (the setup appendix of the book shows it).

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


def pytest_sessionfinish(session, exitstatus):
    if not _FAULTS or exitstatus != 0:
        return
    import json
    import os

    from monosemantic import store
    from monosemantic.config import StageConfig

    os.environ.pop("MONOSEMANTIC_CACHE", None)  # the repository's cache, whatever a test set
    try:
        old = {r["case"]: r for r in json.loads(store.load("faults", "tiny", "table").file("faults.json").read_text())}
    except (store.CacheError, OSError, ValueError):
        old = {}
    rows = {**old, **_FAULTS}
    if rows == old:
        return  # unchanged: the committed artifact stays byte for byte
    with store.write("faults", "tiny", "table", config=StageConfig(), command="make test") as w:
        (w.dir / "faults.json").write_text(json.dumps([rows[k] for k in sorted(rows)], indent=1,
                                                      ensure_ascii=False) + "\n")
        w.metrics["cases"] = len(rows)
