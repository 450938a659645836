"""The held-out set: the windows each run read are redrawn exactly, the stratified choice has the known
answer, the document -> source index is recomputed without tokenizing, and the stage runs on tiny."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monosemantic import cli, corpus, heldout, lm_train, profiles, store
from monosemantic.analysis import spread_windows
from monosemantic.corpus import CorpusConfig
from monosemantic.harvest import harvest_to_disk
from monosemantic.heldout import HeldoutConfig, SeenWindows
from monosemantic.sae_train import HarvestConfig

# --- the windows each run read ------------------------------------------------------------------------------


class _Recording(lm_train.TokenSplit):
    def __init__(self, tokens):
        super().__init__(tokens, "train")
        self.starts: list[np.ndarray] = []

    def windows(self, starts, seq_len):
        self.starts.append(np.array(starts))
        return super().windows(starts, seq_len)


def test_lm_windows_are_the_trainers_batches():
    cfg = profiles.get("tiny").lm.replace(steps=3, eval_interval=3, eval_batches=1, batch_size=4)
    rng = np.random.default_rng(0)
    split = _Recording(rng.integers(0, 500, 3000).astype(np.uint16))
    val = lm_train.TokenSplit(rng.integers(0, 500, 500).astype(np.uint16), "val")
    lm_train.train(cfg, split, val, progress=False, log=lambda *a: None, device="cpu")
    seen = heldout.lm_windows(len(split), cfg)
    assert seen.span == cfg.context_length + 1
    assert np.array_equal(seen.starts, np.concatenate(split.starts))  # every batch, in order


class _Echo(torch.nn.Module):
    """A 'model' whose activation at each position is the token id there: the harvest's rows show which
    windows it read."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def run_with_cache(self, ids, hooks):
        return {hooks[0]: ids[..., None].float()}


def test_harvest_windows_are_the_harvesters(tmp_path):
    tokens = np.arange(1500, dtype=np.uint16)  # distinct ids (exact in fp16): a row's value is its position
    cfg = HarvestConfig(train_activations=64 * 8 * 2 + 40, val_activations=1, seq_len=8, seed=3)
    rows = harvest_to_disk(_Echo(), tokens, cfg.train_activations, tmp_path / "rows.f16", seq_len=cfg.seq_len,
                           seed=cfg.seed, dtype="float32", progress=False)
    written = np.asarray(rows[:, 0], dtype=np.int64)
    read_starts = written[::cfg.seq_len]  # the first row of each window is its start
    seen = heldout.harvest_windows(tokens, cfg)
    assert seen.span == cfg.seq_len and len(seen.starts) == 3 * 64  # whole batches: the last one ran in full
    assert np.array_equal(seen.starts[:len(read_starts)], read_starts)
    covered = heldout.covered(len(tokens), [seen])
    assert covered[written].all()


def test_explanation_windows_are_the_analysis_windows():
    tokens = np.arange(10_000, dtype=np.uint16)
    seen = heldout.explanation_windows(tokens, 32, 2048)
    assert np.array_equal(seen.starts, spread_windows(tokens, 32, 2048)[1]) and seen.span == 32


# --- the choice -----------------------------------------------------------------------------------------------


def test_allocate_known_answer():
    # lam = 57 / 54 gives 44.33, 12.67 and the 3 source 2 has: floors 44 + 12 + 3 = 59, the last to source 1
    counts = heldout.allocate(np.array([100, 50, 2]), np.array([0, 0, 1]), np.array([0.7, 0.2, 0.1]), 60, 10)
    assert counts.tolist() == [44, 13, 3]
    # not enough anywhere: everything; floors above the total: the floors
    assert heldout.allocate(np.array([5, 5]), np.array([1, 0]), np.array([1.0, 1.0]), 100, 3).tolist() == [6, 5]
    assert heldout.allocate(np.array([50, 50]), np.array([0, 0]), np.array([0.9, 0.1]), 10, 8).tolist() == [8, 8]


def _synthetic():
    """Three sources: 0 has ten documents of 1000 tokens, 1 twenty of 300, 2 two of 5000 (long: both get
    explained). Training windows and explanation windows at known places."""
    lengths = np.array([1000] * 10 + [300] * 20 + [5000] * 2)
    sources = np.array([0] * 10 + [1] * 20 + [2] * 2)
    order = np.random.default_rng(1).permutation(len(lengths))  # documents shuffled, as in the shards
    lengths, sources = lengths[order], sources[order]
    first = np.cumsum(lengths) - lengths
    n = int(lengths.sum())
    trained = [SeenWindows("lm", np.arange(0, n - 40, 997), 33),
               SeenWindows("harvest", np.arange(500, n - 40, 2311), 32)]
    long_docs = np.flatnonzero(sources == 2)
    explanation = [SeenWindows("explanation", np.array([first[long_docs[0]] + 100, first[long_docs[1]] + 2500,
                                                        first[np.flatnonzero(sources == 0)[0]] + 10]), 32)]
    return lengths, sources, trained, explanation


def test_choice_never_touches_seen_text_and_keeps_the_floors():
    lengths, sources, trained, explanation = _synthetic()
    n, T = int(lengths.sum()), 32
    val_sources = np.array([0, 0, 1])  # three val windows
    cfg = HeldoutConfig(target_tokens=80 * T, floor_tokens=10 * T, fallback_gap=64, seed=5)
    c = heldout.choose(lengths, sources, trained, explanation, val_sources, np.array([0.5, 0.3, 0.2]), cfg, T)
    assert c.counts.sum() == 80 and len(c.starts) == 77
    ends = np.cumsum(lengths)
    tokens = c.starts[:, None] + np.arange(T)  # (W, T) positions
    seen = heldout.covered(n, trained)
    assert not seen[tokens].any()
    assert len(np.unique(tokens)) == tokens.size  # no two windows overlap
    assert np.array_equal(np.searchsorted(ends, c.starts, "right"), c.documents)
    assert np.array_equal(np.searchsorted(ends, c.starts + T - 1, "right"), c.documents)  # within one document
    explained = np.zeros(len(lengths), bool)
    for w in explanation[0].starts:
        explained[np.searchsorted(ends, w, "right")] = True
    assert np.array_equal(c.explained, explained)
    assert not explained[c.documents[~c.fallback]].any()
    # the long source has no unexplained text: it is topped up to its floor from its explained documents,
    # far from the explanation windows; no other source needed that
    assert set(sources[c.documents[c.fallback]]) == {2} and c.available[2] == 0
    gaps = np.abs(c.starts[c.fallback][:, None] - explanation[0].starts[None, :])
    assert (gaps >= T + cfg.fallback_gap).all()
    got = np.bincount(sources[c.documents], minlength=3) + np.bincount(val_sources, minlength=3)
    assert np.array_equal(got, c.counts)
    assert (c.counts >= np.minimum(c.available + c.val_windows, 10)).all() and c.counts[2] == 10
    # seeded: the same seed the same windows, another seed others
    again = heldout.choose(lengths, sources, trained, explanation, val_sources, np.array([0.5, 0.3, 0.2]), cfg, T)
    assert np.array_equal(again.starts, c.starts)
    other = heldout.choose(lengths, sources, trained, explanation, val_sources, np.array([0.5, 0.3, 0.2]),
                           cfg.replace(seed=6), T)
    assert np.array_equal(other.counts, c.counts) and not np.array_equal(other.starts, c.starts)
    # without the fallback the long source has nothing, and the artifact would say so
    strict = heldout.choose(lengths, sources, trained, explanation, val_sources, np.array([0.5, 0.3, 0.2]),
                            cfg.replace(fallback=False), T)
    assert strict.counts[2] == 0 and not strict.fallback.any()


def test_config_checks():
    with pytest.raises(Exception, match="floor_tokens"):
        HeldoutConfig(target_tokens=100, floor_tokens=200)
    with pytest.raises(Exception, match="fallback_gap"):
        HeldoutConfig(fallback_gap=-1)


# --- the document -> source index, and the stage on tiny -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_pipeline):
    """The tiny corpus, LM and harvest."""
    return tiny_pipeline("harvest", tmp_path_factory.mktemp("heldout") / "cache")


def _one_line(e) -> str:
    said = str(e.value)
    assert said and "\n" not in said
    return said


def test_document_sources_are_recomputed_without_tokenizing(tiny_cache, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tiny_cache))
    cfg = profiles.get("tiny").corpus
    built = corpus.load_document_sources("tiny")
    folder = store.work_path("tokens", "tiny", cfg.name)
    (folder / corpus.DOCUMENT_SOURCES).unlink()
    with pytest.raises(corpus.CorpusError, match="--document-sources") as e:
        corpus.load_document_sources("tiny")
    _one_line(e)
    assert cli.main(["corpus", "--profile", "tiny", "--document-sources"]) == 0
    again = corpus.load_document_sources("tiny")
    assert again.names == built.names == [s for s, _ in cfg.sources]
    for split in ("train", "val"):
        assert np.array_equal(again[split], built[split])
    # the replay is checked against the build's per-source counts: a changed count is one line
    sources = store.load("corpus", "tiny", cfg.name).file("sources.parquet")
    table = pd.read_parquet(sources)
    table.loc[1, "val_tokens"] += 1
    table.to_parquet(sources, index=False)
    with pytest.raises(corpus.CorpusError, match="numpy-docs gets") as e:
        corpus.recompute_document_sources(cfg, "tiny", log=lambda *a: None)
    _one_line(e)
    table.loc[1, "val_tokens"] -= 1
    table.to_parquet(sources, index=False)


def test_replay_consumes_a_capped_sources_last_batch_as_the_build_did(tmp_cache, tmp_path):
    # sub-source "a" is capped inside its first batch; a document of it past the cap is still seen by the
    # deduplication, so b's copy of it is dropped: a replay that stopped at the cap would keep it
    folder = tmp_path / "texts"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for i in range(30):
        (folder / "a" / f"{i:02d}.txt").write_text(f"Document {i} of the first sub-source, with words. " * 20)
    for i in range(30):
        (folder / "b" / f"{i:02d}.txt").write_text(f"Document {i} of the first sub-source, with words. " * 20)
    cfg = CorpusConfig(name="capped", sources=((f"folder:{folder}", 1000),), val_fraction=0.1)
    corpus_art, _ = corpus.build(cfg, "tiny", workers=1, threads=1, command="test")
    stats = {s["name"]: s for s in corpus_art.manifest["info"]["sources"]}
    assert stats["a"]["capped"] and stats["a"]["documents"] < 30 and stats["b"]["duplicates"] == 30
    built = corpus.load_document_sources("tiny", "capped")
    corpus.recompute_document_sources(cfg, "tiny", log=lambda *a: None)
    again = corpus.load_document_sources("tiny", "capped")
    assert all(np.array_equal(again[s], built[s]) for s in ("train", "val"))


def test_heldout_stage_on_tiny(tiny_cache, monkeypatch, capsys):
    import pandas as pd

    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tiny_cache))
    assert cli.main(["heldout", "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    art = store.load("heldout", "tiny", "windows", config=profiles.get("tiny").heldout)
    m = art.metrics
    assert m["corpus_sources"] == 3 and "held-out:" in out
    table = pd.read_parquet(art.file(heldout.SOURCES_FILE))
    assert table["selected_tokens"].sum() == m["heldout_tokens"]
    x, sources, documents = heldout.load_windows("tiny")
    assert x.shape == (m["heldout_windows"], m["seq_len"]) and x.dtype == np.uint16 and len(sources) == len(x)
    windows = pd.read_parquet(art.file(heldout.WINDOWS_FILE))  # each window's document, labelled within its split
    assert list(documents) == [f"{s}:{d}" for s, d in zip(windows["split"], windows["document"], strict=True)]
    assert set(sources) <= set(table["source"])
    assert heldout.windows_table("tiny", explain_tokens=profiles.get("tiny").analysis.explain_tokens).shape[0] == len(x)
    with pytest.raises(heldout.HeldoutError, match="explanation text") as e:
        heldout.load_windows("tiny", explain_tokens=1)
    _one_line(e)
    shard = store.work_path("tokens", "tiny", "minipile") / "val.bin"
    shard.rename(shard.with_suffix(".away"))
    try:
        with pytest.raises(heldout.HeldoutError, match="val token shard") as e:
            heldout.load_windows("tiny")
        _one_line(e)
    finally:
        shard.with_suffix(".away").rename(shard)
