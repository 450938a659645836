"""Reliability: a real `tiny` training run, killed by a real signal and run again, ends where an uninterrupted one does.

Each run is the command a reader types (``python -m monosemantic train-lm``) in its own process, on CPU with one
thread, against a temporary cache holding the tiny corpus. The kill lands right after the first checkpoint (the
tiny profile checkpoints at steps 20 and 40 of 40), so the rerun resumes from it.

SIGINT (Ctrl-C) and SIGTERM are caught as a flag that training honours between steps: it saves a checkpoint at
the step it reached and exits with status 130. SIGKILL cannot be caught: the rerun resumes from the last periodic
checkpoint. In every case the resumed run ends on the uninterrupted run's weights, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import monosemantic
from monosemantic import store

PACKAGE_ROOT = Path(monosemantic.__file__).resolve().parents[1]  # the folder `python -m monosemantic` runs from
COMMAND = [sys.executable, "-m", "monosemantic", "train-lm", "--profile", "tiny", "--threads", "1", "--no-progress"]
RESUMED = re.compile(r"resuming from \S+checkpoint\.pt at step (\d+) of (\d+)")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# a hang guard, not a speed check: a run takes ~30 s on a quiet 2-core machine (fp32 on AVX2), several
# times that when the machine is busy
HANG = 900


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "MONOSEMANTIC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def _shards(cache: Path) -> dict[str, str]:
    folder = cache / "work" / "tokens"
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*.bin"))}


def _train(cache: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(COMMAND, cwd=PACKAGE_ROOT, env=_env(cache), capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _result(cache: Path) -> dict:
    model = cache / "lm" / "tiny-model"
    manifest = json.loads((model / store.MANIFEST).read_text())
    curve = pd.read_parquet(model / "loss_curve.parquet").drop(columns="tokens_per_s")  # timings differ
    return {"weights": _sha(model / "model.safetensors"), "metrics": manifest["metrics"], "curve": curve}


def _clear_lm(cache: Path) -> None:
    shutil.rmtree(cache / "lm", ignore_errors=True)
    shutil.rmtree(cache / "work" / "lm", ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_pipeline):
    """The tiny corpus in a fresh cache, and the weights and metrics of one uninterrupted run on it."""
    cache = tiny_pipeline("corpus", tmp_path_factory.mktemp("resume") / "cache")
    shards = _shards(cache)
    assert set(shards) == {"tiny-minipile/train.bin", "tiny-minipile/val.bin"}
    out = _train(cache)
    assert not RESUMED.search(out.stdout + out.stderr)  # a fresh cache: nothing to resume from
    return cache, shards, _result(cache)


def _no_half_artifacts(cache: Path) -> None:
    """A killed run leaves no temporary folder and no artifact without its manifest."""
    for root in (cache / "lm", cache / "work" / "lm"):
        if root.exists():
            assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    if (cache / "lm").exists():
        for art in (cache / "lm").iterdir():
            assert (art / store.MANIFEST).is_file(), f"{art} has no manifest"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_run_resumes_to_the_same_model(reference, sig, tmp_path, fault):
    cache, shards, ref = reference
    _clear_lm(cache)  # a fresh start: no checkpoint, no finished model
    assert _shards(cache) == shards  # the same corpus as the reference run
    ckpt = cache / "work" / "lm" / "tiny" / "checkpoint.pt"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(COMMAND, cwd=PACKAGE_ROOT, env=_env(cache), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + HANG
            while proc.poll() is None and not ckpt.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, "the run finished before it could be interrupted:\n" + log.read_text()
            assert ckpt.exists(), f"no checkpoint after {HANG} s:\n" + log.read_text()
            proc.send_signal(sig)
            rc = proc.wait(timeout=HANG)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    killed = log.read_text()
    if sig == signal.SIGKILL:
        assert rc == -sig, killed
    else:  # caught: a checkpoint at the step reached, then the CLI's "interrupted ... run again" line
        assert rc == 130 and "run the same command again to resume" in killed, killed
    assert "val loss" not in killed  # it was stopped while training
    assert not (cache / "lm" / "tiny-model").exists()
    _no_half_artifacts(cache)

    out = _train(cache)
    resumed = RESUMED.search(out.stdout + out.stderr)
    assert resumed, out.stdout + out.stderr
    assert 20 <= int(resumed[1]) < 40 and int(resumed[2]) == 40
    got = _result(cache)
    assert got["weights"] == ref["weights"]  # byte for byte
    said = [re.sub(r"after \d+ s", "after N s", line) for line in killed.splitlines() if "interrupted" in line]
    fault(f"training: {signal.Signals(sig).name} mid-run", "monosemantic train-lm (tiny, a real process)",
          f"{signal.Signals(sig).name} sent after the first checkpoint",
          said[-1] if said else "nothing (the process is killed outright)",
          "the last checkpoint (" + ("every 20 steps" if sig == signal.SIGKILL else "written at the step "
          "reached") + "); the rerun resumed there and its weights equal an uninterrupted run's byte for byte")
    for key in ("val_loss", "train_loss", "train_tokens", "parameters", "mlp_zero_fraction",
                "mlp_neurons_never_firing"):
        assert got["metrics"][key] == ref["metrics"][key], key
    curve = ["step", "tokens", "lr", "train_loss", "val_loss"]  # all but the timings
    pd.testing.assert_frame_equal(got["curve"][curve], ref["curve"][curve], check_exact=True)
    _no_half_artifacts(cache)


def test_unreadable_checkpoint_is_one_clear_line(reference):
    cache, _, _ = reference
    _clear_lm(cache)
    ckpt = cache / "work" / "lm" / "tiny" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    out = subprocess.run(COMMAND, cwd=PACKAGE_ROOT, env=_env(cache), capture_output=True, text=True, timeout=HANG)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert "is not a readable lm checkpoint" in out.stderr and "--fresh" in out.stderr
    assert not (cache / "lm" / "tiny-model").exists()
