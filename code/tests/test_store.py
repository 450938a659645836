"""The result cache: atomic writes, verified loads, and one clear error naming the command to run."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from monosemantic import cli, store
from monosemantic.config import ConfigError, StageConfig, stable_hash


@dataclasses.dataclass(frozen=True)
class DemoConfig(StageConfig):
    STAGE = "lm"
    width: int = 4
    lr: float = 1e-3


def make(cfg=DemoConfig(), name="model", payload=b"weights", work_payload=None, inputs=None):
    with store.write("lm", "tiny", name, config=cfg, command="monosemantic train-lm --profile tiny",
                     inputs=inputs) as w:
        (w.dir / "weights.bin").write_bytes(payload)
        if work_payload is not None:
            (w.work_dir / "big.bin").write_bytes(work_payload)
        w.metrics["val_loss"] = 3.25
    return store.load("lm", "tiny", name, config=cfg)


def test_round_trip_records_the_manifest(tmp_cache):
    art = make()
    m = art.manifest
    assert art.path == tmp_cache / "lm" / "tiny-model"
    assert m["config"] == {"width": 4, "lr": 0.001}
    assert m["config_hash"] == DemoConfig().config_hash()
    assert m["metrics"] == {"val_loss": 3.25}
    assert m["files"]["weights.bin"]["bytes"] == 7
    assert m["command"] == "monosemantic train-lm --profile tiny"
    for key in ("package_version", "git_commit", "created", "wall_time_s", "hardware"):
        assert key in m
    assert art.file("weights.bin").read_bytes() == b"weights"


def test_config_hash_is_stable_and_sensitive():
    assert DemoConfig().config_hash() == DemoConfig(width=4, lr=0.001).config_hash()
    assert DemoConfig().config_hash() != DemoConfig(width=5).config_hash()
    assert stable_hash({"a": 1.0}) == stable_hash({"a": 1})
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


def test_missing_artifact_names_the_command(tmp_cache):
    with pytest.raises(store.CacheError, match=r"not in the cache.*`monosemantic train-lm --profile cpu`"):
        store.load("lm", "cpu", "model")


def test_tampered_file_is_detected(tmp_cache):
    art = make()
    (art.path / "weights.bin").write_bytes(b"weightz")
    with pytest.raises(store.CacheError, match=r"corrupt: weights.bin does not match its sha256.*train-lm"):
        store.load("lm", "tiny", "model")


def test_truncated_file_is_detected(tmp_cache):
    art = make()
    (art.path / "weights.bin").write_bytes(b"wei")
    with pytest.raises(store.CacheError, match=r"corrupt: weights.bin has 3 bytes.*truncated"):
        store.load("lm", "tiny", "model")


def test_deleted_file_and_broken_manifest(tmp_cache):
    art = make()
    (art.path / "weights.bin").unlink()
    with pytest.raises(store.CacheError, match="weights.bin is missing"):
        store.load("lm", "tiny", "model")
    (art.path / "manifest.json").write_text("{not json")
    with pytest.raises(store.CacheError, match="not valid JSON.*regenerate"):
        store.load("lm", "tiny", "model")


def test_changed_config_is_stale(tmp_cache):
    make()
    with pytest.raises(store.CacheError, match=r"stale.*width: 4 -> 8.*train-lm --profile tiny"):
        store.load("lm", "tiny", "model", config=DemoConfig(width=8))


def test_incompatible_format_is_stale(tmp_cache):
    art = make()
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["format"] = store.FORMAT + 1
    (art.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(store.CacheError, match="cache format"):
        store.load("lm", "tiny", "model")


def test_stage_version_bump_makes_old_artifacts_stale(tmp_cache):
    make()

    @dataclasses.dataclass(frozen=True)
    class DemoConfigV2(DemoConfig):
        VERSION = 2

    assert DemoConfigV2().config_hash() != DemoConfig().config_hash()


def test_changed_upstream_makes_downstream_stale(tmp_cache):
    up = make(name="upstream")
    make(name="downstream", inputs=[up])
    store.load("lm", "tiny", "downstream")
    make(name="upstream", payload=b"retrained")
    with pytest.raises(store.CacheError, match=r"stale: it was made from a different lm/tiny-upstream"):
        store.load("lm", "tiny", "downstream")


def test_failed_write_leaves_nothing_and_keeps_the_old_artifact(tmp_cache):
    make()
    with pytest.raises(RuntimeError, match="boom"):
        with store.write("lm", "tiny", "model", config=DemoConfig()) as w:
            (w.dir / "weights.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert store.load("lm", "tiny", "model").file("weights.bin").read_bytes() == b"weights"
    assert [p.name for p in (tmp_cache / "lm").iterdir()] == ["tiny-model"]


def test_non_finite_metric_is_refused(tmp_cache):
    with pytest.raises(store.CacheError, match="non-finite"):
        with store.write("lm", "tiny", "model", config=DemoConfig()) as w:
            w.metrics["val_loss"] = float("nan")
    assert not (tmp_cache / "lm" / "tiny-model").exists()


def test_work_files_are_hashed_but_optional(tmp_cache):
    art = make(work_payload=b"large activations")
    assert art.manifest["files"]["big.bin"]["location"] == "work"
    assert art.file("big.bin").read_bytes() == b"large activations"
    art.file("big.bin").unlink()  # a fresh clone has no cache/work/
    art = store.load("lm", "tiny", "model")  # the committed part still loads
    with pytest.raises(store.CacheError, match=r"big.bin is missing from cache/work/.*train-lm"):
        art.file("big.bin")


def test_find_prefers_the_largest_profile(tmp_cache):
    make()
    assert store.find("lm", "model").profile == "tiny"
    with pytest.raises(store.CacheError, match="no sae/\\*-model artifact"):
        store.find("sae", "model")


def test_unknown_profile(tmp_cache):
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        store.load("lm", "huge", "model")


def test_cache_cli_list_and_verify(tmp_cache, capsys):
    art = make()
    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "lm" in out and "tiny" in out and "val_loss=3.25" in out and "1 artifacts" in out
    assert cli.main(["cache", "verify"]) == 0
    assert "1 of 1 artifacts intact" in capsys.readouterr().out
    (art.path / "weights.bin").write_bytes(b"x")
    assert cli.main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert "FAIL lm/tiny-model" in out and "train-lm --profile tiny" in out


def test_cli_user_error_is_one_line(tmp_cache, capsys, monkeypatch):
    def boom(args):
        raise store.CacheError("lm/cpu-model is not in the cache; make it with `x`")

    monkeypatch.setattr(cli, "run", boom)
    assert cli.main(["cache", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: lm/cpu-model is not in the cache" in err


def test_wall_time_is_the_commands_when_the_cli_started_it(tmp_cache, monkeypatch):
    """A stage's artifacts record the time since its command started (set by the CLI), not just the
    seconds spent writing them."""
    import time

    monkeypatch.setenv(store.COMMAND_START_ENV, str(time.time() - 120))
    with store.write("toy", "tiny", "timed", config=StageConfig()) as w:
        w.metrics["x"] = 1
    assert 119 < store.load("toy", "tiny", "timed").manifest["wall_time_s"] < 200
    monkeypatch.delenv(store.COMMAND_START_ENV)
    with store.write("toy", "tiny", "quick", config=StageConfig()) as w:
        w.metrics["x"] = 1
    assert store.load("toy", "tiny", "quick").manifest["wall_time_s"] < 5


def test_an_artifact_records_the_cli_command_that_made_it_also_when_called_from_python(tmp_cache, monkeypatch):
    """The manifest's command is the ``monosemantic ...`` line the CLI ran (what a stale-artifact error tells
    the reader to rerun), not the host process's argv (pytest's, a notebook kernel's)."""
    def write(args):
        with store.write("toy", "tiny", "made", config=StageConfig()) as w:
            w.metrics["x"] = 1

    monkeypatch.setattr(cli, "run", write)
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    assert cli.main(["cache", "list", "--stage", "toy"]) == 0
    assert store.load("toy", "tiny", "made").manifest["command"] == "monosemantic cache list --stage toy"
    assert store.COMMAND_ENV not in os.environ  # restored once the command is done


def test_check_positive_is_the_one_message_for_a_bad_number():
    import dataclasses

    import numpy as np

    from monosemantic.config import ConfigError, check_positive

    @dataclasses.dataclass(frozen=True)
    class Demo:
        n: object = 1
        rate: object = 0.5

    check_positive(Demo(n=np.int64(3)), "n", integer=True)  # numpy's integers are integers
    check_positive(Demo(n=0), "n", integer=True, zero=True)
    for bad, kind in ((Demo(n=0), "an integer > 0"), (Demo(n=True), "an integer > 0"), (Demo(n=2.0), "an integer > 0")):
        with pytest.raises(ConfigError, match=rf"^Demo: n must be {kind}, got {bad.n!r}$"):
            check_positive(bad, "n", integer=True)
    with pytest.raises(ConfigError, match=r"^Demo: rate must be a number >= 0, got -0.1$"):
        check_positive(Demo(rate=-0.1), "rate", zero=True)
    with pytest.raises(ConfigError, match="rate must be a number > 0"):
        check_positive(Demo(rate="1"), "n", "rate")


def test_checkpoint_save_is_atomic_and_load_sets_aside_another_config(tmp_path):
    from monosemantic import checkpoint
    from monosemantic.config import UserError

    path = tmp_path / "run" / "checkpoint.pt"
    assert checkpoint.load(path, "abc", {"step"}, what="demo", fix="delete it") is None  # none yet
    checkpoint.save(path, {"config_hash": "abc", "step": 7})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    assert checkpoint.load(path, "abc", {"step"}, what="demo", fix="delete it")["step"] == 7
    notes: list[str] = []
    assert checkpoint.load(path, "xyz", {"step"}, what="demo", fix="delete it", log=notes.append) is None
    assert notes == [f"ignoring {path}: it was made with another demo config (abc, now xyz); starting afresh"]
    with pytest.raises(UserError, match=r"is not a readable demo checkpoint \(some of its parts are missing\); "
                                        r"delete it$"):
        checkpoint.load(path, "abc", {"step", "model"}, what="demo", fix="delete it")


def test_a_file_moved_to_work_keeps_its_hash_and_leaves_the_committed_cache(tmp_cache):
    import shutil

    with store.write("lm", "tiny", "model", config=DemoConfig(), command="monosemantic train-lm --profile tiny") as w:
        (w.dir / "weights.bin").write_bytes(b"weights")
        (w.dir / "table.bin").write_bytes(b"a big table")
    art = store.move_to_work(store.load("lm", "tiny", "model"), ["table.bin"])
    assert not (art.path / "table.bin").exists() and art.file("table.bin").read_bytes() == b"a big table"
    assert art.manifest["files"]["table.bin"]["location"] == "work" and art.problems() == []
    assert art.size_bytes() == len(b"weights")  # what is committed
    assert store.move_to_work(art, ["table.bin"]).problems() == []  # moving it again changes nothing
    shutil.rmtree(art.work_path)  # a fresh clone: the work file is optional, and asking for it names the command
    assert art.problems() == []
    with pytest.raises(store.CacheError, match="monosemantic train-lm --profile tiny"):
        art.file("table.bin")
    with pytest.raises(store.CacheError, match="no file 'nope'"):
        store.move_to_work(art, ["nope"])
