"""``monosemantic faults``: the fault table the setup appendix shows. The tests of bad input and faults (those
that take the ``fault`` fixture, marked ``faults`` at collection) record what they tried, what the program said
and what it kept; this command runs them alone and writes what they recorded to ``faults/tiny-table``. The
test suite itself writes nothing into the cache.

    monosemantic faults
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import StageConfig, UserError, project_root

DEFAULT_PROFILE = "tiny"
OUT_ENV = "MONOSEMANTIC_FAULTS_OUT"
"""Where a test run that records faults writes them (a JSON list of rows); unset, it writes nothing."""


def record(rows: dict[str, dict[str, str]], path: str | os.PathLike) -> None:
    """Write the recorded rows, one per case, sorted by case (what the test session does at its end)."""
    Path(path).write_text(json.dumps([rows[k] for k in sorted(rows)], indent=1, ensure_ascii=False) + "\n")


def collect(tests: Path | None = None) -> list[dict[str, str]]:
    """Run the fault tests (``pytest -m faults``) and return the rows they recorded."""
    tests = tests or project_root() / "code" / "tests"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "faults.json"
        env = {**os.environ, OUT_ENV: str(out)}
        env.pop("MONOSEMANTIC_CACHE", None)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "faults", "-p", "no:cacheprovider",
                               str(tests)], env=env, cwd=project_root())
        if done.returncode != 0:
            raise UserError(f"the fault tests failed (pytest exit {done.returncode}); fix them, then run "
                            "`monosemantic faults` again")
        if not out.is_file():
            raise UserError("the fault tests recorded nothing; is the `fault` fixture still in code/tests/conftest.py?")
        return json.loads(out.read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from . import store

    rows = collect()
    with store.write("faults", args.profile, "table", config=StageConfig()) as w:
        (w.dir / "faults.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        w.metrics["cases"] = len(rows)
    print(f"faults: {len(rows)} cases written to faults/{args.profile}-table")
    return 0
