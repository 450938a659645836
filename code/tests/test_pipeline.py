"""`monosemantic reproduce` runs the stages' own commands, in order, and stops at the first failure."""

from __future__ import annotations

from monosemantic import cli, pipeline


def test_dry_run_lists_every_stage_in_order(capsys):
    assert cli.main(["reproduce", "--profile", "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(pipeline.STAGES)
    assert out[0].endswith("monosemantic corpus --profile tiny")
    assert out[1].endswith("monosemantic train-lm --profile tiny")


def test_only_an_unknown_stage_is_one_clear_line(capsys):
    assert cli.main(["reproduce", "--profile", "tiny", "--only", "nonsense"]) == 2
    assert "the pipeline does not have" in capsys.readouterr().err


def test_a_failing_stage_stops_the_pipeline(monkeypatch, capsys):
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 1

    monkeypatch.setattr(cli, "main", fake_main)
    from argparse import Namespace

    assert pipeline.run(Namespace(profile="tiny", only=None, dry_run=False)) == 1
    assert calls == [["corpus", "--profile", "tiny"]]
    assert "failed (exit 1)" in capsys.readouterr().out


# --- how long each profile took, from the manifests -----------------------------------------------------------

def fake_artifact(stage, name, command, wall, metrics=None, profile="cpu"):
    from pathlib import Path

    from monosemantic import store

    manifest = {"command": f"monosemantic {command} --no-progress", "wall_time_s": wall, "metrics": metrics or {},
                "hardware": {"cpu": "Test CPU", "cpu_cores": 2, "gpu": None}, "files": {}}
    return store.Artifact(stage, profile, name, Path("/nonexistent"), manifest)


def test_profile_time_counts_each_run_once_and_marks_legacy_manifests_as_lower_bounds():
    arts = [
        # one run writing two artifacts: the later one's wall time covers the whole command
        fake_artifact("corpus", "minipile", "corpus --profile cpu", 250.0),
        fake_artifact("tokens", "minipile", "corpus --profile cpu", 252.0),
        fake_artifact("lm", "model", "train-lm --profile cpu", 2000.0, {"train_seconds": 1990.0}),
        # a legacy run: wall time is only the write time; its parts are a lower bound
        fake_artifact("sae", "anchor", "train-sae --profile cpu", 0.02, {"train_seconds": 300.0}),
        fake_artifact("sae", "topk", "train-sae --profile cpu", 0.01, {"train_seconds": 200.0}),
        fake_artifact("analysis", "features", "analyze --profile cpu", 0.3),
        # two runs of one step that report one shared harvest: counted once
        fake_artifact("llama", "a", "llama train-sae --profile cpu", 1500.0, {"harvest_seconds": 1000.0}),
        fake_artifact("llama", "b", "llama train-sae --profile cpu --expansion 2", 1200.0, {"harvest_seconds": 1000.0}),
        # measurements and other profiles are not stages of this profile
        fake_artifact("llama", "throughput-cpu", "llama bench --profile cpu", 30.0),
        fake_artifact("bench", "cpu-box", "make bench", 40.0),
        fake_artifact("lm", "model", "train-lm --profile tiny", 1.0, profile="tiny"),
    ]
    t = pipeline.profile_time("cpu", arts)
    steps = {s.step: s for s in t.steps}
    assert list(steps) == ["corpus", "train-lm", "train-sae", "analyze", "llama"]  # the pipeline's order
    assert steps["corpus"].time == pipeline.Timed(252.0, False) and len(steps["corpus"].runs) == 1
    assert steps["train-sae"].time == pipeline.Timed(500.0, True)
    assert steps["analyze"].time == pipeline.Timed(0.0, True)
    assert steps["llama"].time == pipeline.Timed(1700.0, False) and steps["llama"].shared_seconds == 1000.0
    assert t.time == pipeline.Timed(252.0 + 2000.0 + 500.0 + 1700.0, True)
    assert t.missing == ["harvest", "evaluate", "heldout", "causal", "toy", "diff"]
    assert t.machines == ["Test CPU, 2 cores"]
    assert pipeline.artifact_time(arts[0]) == pipeline.Timed(250.0, False)
    assert pipeline.profile_time("gpu", arts).steps == []
    assert [pipeline.duration(s) for s in (42, 600, 9000)] == ["42 s", "10 min", "2.5 h"]


def test_the_committed_cpu_profile_takes_hours_not_one():
    t = pipeline.profile_time("cpu")
    if not t.steps:
        import pytest

        pytest.skip("no cpu-profile artifacts in this cache")
    assert t.time.seconds > 2 * 3600, pipeline.duration(t.time.seconds)  # the README once said "about an hour"


def test_reproduce_prints_one_progress_line_per_stage_with_the_time_left_from_the_manifests(monkeypatch, capsys):
    from argparse import Namespace

    arts = [fake_artifact("corpus", "minipile", "corpus --profile cpu", 240.0),
            fake_artifact("lm", "model", "train-lm --profile cpu", 2400.0),
            fake_artifact("sae", "topk", "train-sae --profile cpu", 0.01, {"train_seconds": 600.0})]  # legacy
    measured = pipeline.profile_time
    monkeypatch.setattr(pipeline, "profile_time", lambda profile, artifacts=None: measured(profile, arts))
    monkeypatch.setattr(cli, "main", lambda argv: 0)
    only = ["corpus", "train-lm", "train-sae", "toy"]
    assert pipeline.run(Namespace(profile="cpu", only=only, dry_run=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = [line for line in lines if " elapsed, " in line and " · " in line]
    assert [line.split("]")[0] for line in starts] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    # the corpus, the LM and the SAEs (a lower bound) by their manifests; toy has none: "at least"
    assert "at least 54 min left" in starts[0] and starts[0].endswith("monosemantic corpus --profile cpu")
    assert "at least 50 min left" in starts[1] and "at least 10 min left" in starts[2]
    assert "time left unknown" in starts[3]
    assert lines[-1].startswith("[4/4]") and "done" in lines[-1]
