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
