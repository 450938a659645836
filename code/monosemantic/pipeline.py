"""``monosemantic reproduce``: every stage of the pipeline, in order, for one profile.

Each step is the same CLI call a researcher would type, so the pipeline has no logic of its own: it runs
the stages one after the other and stops at the first that fails. Stages that are already in the cache
with the current config are cheap to re-run (they resume or overwrite; see each stage's --help).

:func:`profile_time` says how long a profile took end to end, from the committed manifests (the README and
the book's setup appendix show it); the pipeline's progress line uses the same times to say how long is left.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import NamedTuple

# (what it makes, argv after `monosemantic`); the profile is appended to each
STAGES: list[tuple[str, list[str]]] = [
    ("text corpus and GPT-2 token shards", ["corpus"]),
    ("one-layer language model", ["train-lm"]),
    ("MLP activations of the one-layer model", ["harvest"]),
    ("SAEs: the anchor's recipe, TopK, frontiers, width sweep", ["train-sae"]),
    ("every SAE on the whole held-out split, with intervals over documents", ["evaluate"]),
    ("held-out windows of every source, never seen in training", ["heldout"]),
    ("features and neurons: dashboards and scores", ["analyze"]),
    ("named features clamped and ablated, against random directions", ["causal"]),
    ("toy superposition and dictionary recovery (chapter 2)", ["toy"]),
    ("SmolLM2 last-layer MLP SAE (chapter 4)", ["llama", "run"]),
    ("model diffing pilot: fine-tune and crosscoder (chapter 5)", ["diff"]),
]

# The cache stages (cache/<stage>/) each command above writes.
WRITES: dict[str, tuple[str, ...]] = {
    "corpus": ("corpus", "tokens"), "train-lm": ("lm",), "harvest": ("activations",), "train-sae": ("sae",),
    "evaluate": ("sae",), "heldout": ("heldout",), "analyze": ("analysis",), "causal": ("analysis",),
    "toy": ("toy",), "llama": ("llama",), "diff": ("diff",),
}
# Artifacts that are measurements, not stages: benchmarks, the tests' fault table, the GPU check of the tiny
# pipeline, the Llama throughput rows and the Stheno rehearsal (scripts/stheno-rehearsal). Their time is not a stage's.
MEASUREMENT_STAGES = ("bench", "faults", "gpucheck")
# A stage manifest written before `store` recorded the whole command's time holds only the time it took to
# write the files (well under a second); a real stage of the cpu or gpu profile never takes that little.
LEGACY_WALL_S = 1.0


# --- how long each profile took, from the committed manifests ------------------------------------------------

class Timed(NamedTuple):
    """A wall time read from the manifests."""

    seconds: float
    lower_bound: bool  # True: the manifests recorded only part of it (a legacy manifest: see artifact_time)


class RunTime(NamedTuple):
    """One run of one command, which wrote one or more artifacts."""

    command: str  # as the manifest records it, without `monosemantic ` and `--no-progress`
    step: str  # the pipeline's command it belongs to (a key of WRITES)
    artifacts: list  # the store.Artifacts it wrote
    time: Timed
    machine: str

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.artifacts]


class StepTime(NamedTuple):
    """One command of the pipeline: its runs (several for `toy --part ...`, `diff --source mix`, a second
    SAE width), their time together, work shared by several runs counted once."""

    step: str
    time: Timed
    runs: list[RunTime]
    shared_seconds: float  # time several runs report for one piece of work (e.g. one harvest), counted once


class ProfileTime(NamedTuple):
    """What running every committed stage of one profile took, end to end."""

    profile: str
    time: Timed  # the sum of the steps'
    steps: list[StepTime]  # in the pipeline's order; only those with artifacts
    missing: list[str]  # pipeline commands with no artifact of this profile in the cache
    machines: list[str]  # the machines the runs were made on


def is_measurement(a) -> bool:
    """``a`` (a :class:`~monosemantic.store.Artifact`) is a benchmark or check, not a pipeline stage's output."""
    return a.stage in MEASUREMENT_STAGES or a.name.startswith(("throughput-", "rehearsal-"))


def _parts_seconds(a) -> float:
    """The seconds the artifact's metrics record for parts of its run (``*_seconds``); for the SAE sweep, its
    runs' training time (its manifest has no total)."""
    parts = sum(v for k, v in a.metrics.items() if k.endswith("_seconds") and isinstance(v, int | float))
    if a.stage == "sae" and a.name == "sweep" and "sweep.parquet" in a.files:
        import pandas as pd

        parts += float(pd.read_parquet(a.file("sweep.parquet"), columns=["train_seconds"]).train_seconds.sum())
    return parts


def artifact_time(a) -> Timed:
    """The wall time of the command that made ``a``, as its manifest records it. A legacy stage manifest
    (written before the whole command was timed: ``wall_time_s`` under :data:`LEGACY_WALL_S`, or none) gives
    what its metrics record of the run's parts (``*_seconds``) as a lower bound, or 0 as a lower bound."""
    wall = a.manifest.get("wall_time_s")
    if wall is not None and (wall >= LEGACY_WALL_S or is_measurement(a) or a.profile == "tiny"):
        return Timed(float(wall), False)
    return Timed(_parts_seconds(a), True)


def machine(a) -> str:
    hw = a.manifest.get("hardware", {})
    return hw.get("gpu") or f"{hw.get('cpu', '?')}, {hw.get('cpu_cores', '?')} cores"


def _short(command: str) -> str:
    return command.removeprefix("monosemantic ").replace(" --no-progress", "")


def profile_time(profile: str, artifacts=None) -> ProfileTime:
    """Every committed stage artifact of ``profile`` (``artifacts``: default, the cache's), grouped into the
    runs that made them (artifacts recording the same command), each run's time counted once: a run's is its
    longest artifact's (each records the time since the command started), or, where the run's manifests are
    legacy, the sum of the parts they record (a lower bound). A ``*_seconds`` part that several runs of a step
    report with the same value is one piece of work they share (the SmolLM2 SAEs' one harvest): counted once."""
    from . import store

    arts = [a for a in (store.list_artifacts() if artifacts is None else artifacts)
            if a.profile == profile and not is_measurement(a)]
    step_of: dict[str, str] = {}  # a stage's artifacts belong to the first step that writes the stage ...
    for step, stages in WRITES.items():
        for stage in stages:
            step_of.setdefault(stage, step)

    def step_for(command: str, stage: str) -> str:  # ... unless their command names another step that does
        first = command.split()[0] if command.split() else ""
        return first if stage in WRITES.get(first, ()) else step_of[stage]

    by_command: dict[str, list] = {}
    for a in arts:
        if a.stage in step_of:
            by_command.setdefault(_short(a.command), []).append(a)
    runs = []
    for command, group in sorted(by_command.items()):
        times = [artifact_time(a) for a in group]
        exact = [t.seconds for t in times if not t.lower_bound]
        partial = sum(t.seconds for t in times if t.lower_bound)
        lower = any(t.lower_bound for t in times)
        seconds = max(max(exact, default=0.0), partial) if lower else max(exact)
        group.sort(key=lambda a: a.key)
        runs.append(RunTime(command, step_for(command, group[0].stage), group, Timed(seconds, lower),
                            machine(group[0])))
    steps = []
    for _, argv in STAGES:
        mine = [r for r in runs if r.step == argv[0]]
        if not mine:
            continue
        parts = Counter((k, v) for r in mine
                        for k, v in {(k, v) for a in r.artifacts for k, v in a.metrics.items()
                                     if k.endswith("_seconds") and isinstance(v, int | float) and v > 0})
        shared = sum(v * (n - 1) for (_, v), n in parts.items() if n > 1)
        time_ = Timed(sum(r.time.seconds for r in mine) - shared, any(r.time.lower_bound for r in mine))
        steps.append(StepTime(argv[0], time_, mine, shared))
    total = Timed(sum(s.time.seconds for s in steps), any(s.time.lower_bound for s in steps))
    missing = [argv[0] for _, argv in STAGES if argv[0] not in {s.step for s in steps}]
    return ProfileTime(profile, total, steps, missing, sorted({r.machine for r in runs}))


def duration(seconds: float) -> str:
    """``seconds`` for a reader: "45 s", "12 min", "2.6 h"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def time_left(expected: dict[str, Timed], steps: list[str]) -> str:
    """How long the pipeline commands ``steps`` still take by the manifests' wall times (``expected``: step ->
    its time, as :func:`profile_time` gives it), for the progress line: "about 2.6 h left", "at least 2.6 h
    left" where a step's time is a lower bound or not recorded, or "time left unknown"."""
    known = [expected[s] for s in steps if s in expected]
    if not steps:
        return "nothing left"
    if not any(t.seconds for t in known):
        return "time left unknown (no timed manifest of this profile)"
    partial = len(known) < len(steps) or any(t.lower_bound for t in known)
    return f"{'at least' if partial else 'about'} {duration(sum(t.seconds for t in known))} left"


def progress(i: int, n: int, elapsed: float, left: str) -> str:
    """The pipeline's one progress line: stage ``i`` of ``n``, the time since it started, the time left."""
    return f"[{i}/{n}] {duration(elapsed)} elapsed, {left}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", metavar="COMMAND",
                   help=f"run only these stages (of: {', '.join(' '.join(a) for _, a in STAGES)})")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")


def run(args: argparse.Namespace) -> int:
    from .cli import main
    from .config import UserError

    steps = [(what, argv) for what, argv in STAGES if not args.only or argv[0] in args.only]
    if args.only and len(steps) != len(set(args.only)):
        known = ", ".join(a[0] for _, a in STAGES)
        raise UserError(f"--only names a stage the pipeline does not have; its stages are: {known}")
    # what each stage took when the committed artifacts were made: the estimate of the time left
    expected = {s.step: s.time for s in profile_time(args.profile).steps}
    names = [argv[0] for _, argv in steps]
    n = len(steps)
    begin = time.perf_counter()
    for i, (what, argv) in enumerate(steps, 1):
        command = [*argv, "--profile", args.profile]
        if args.dry_run:
            took = expected.get(argv[0])
            last = (f"{'≥ ' if took.lower_bound else ''}{duration(took.seconds)} last time" if took and took.seconds
                    else "not timed yet")
            print(f"[{i}/{n}] {what} ({last}): monosemantic {' '.join(command)}", flush=True)
            continue
        print(f"{progress(i, n, time.perf_counter() - begin, time_left(expected, names[i - 1:]))} · {what}: "
              f"monosemantic {' '.join(command)}", flush=True)
        start = time.perf_counter()
        status = main(command)
        if status:
            print(f"stage `monosemantic {' '.join(command)}` failed (exit {status}); fix it and run "
                  f"`monosemantic reproduce --profile {args.profile}` again", flush=True)
            return status
        print(f"[{i}/{n}] done in {duration(time.perf_counter() - start)}", flush=True)
    if not args.dry_run:
        print(f"{progress(n, n, time.perf_counter() - begin, 'done')}: every stage of the {args.profile} "
              f"profile ran", flush=True)
    return 0
