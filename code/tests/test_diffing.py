"""Chapter 5's pilot: fine-tune the tiny LM on one source, then diff the two models with a crosscoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from monosemantic import cli, diffing, profiles, store
from monosemantic import sae as sae_mod
from monosemantic.config import ConfigError


def test_relative_norm_and_cosine_of_known_decoders():
    d = 4
    w = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0],   # base half only
                      [0, 0, 0, 0, 0, 2.0, 0, 0],   # fine-tune half only
                      [1.0, 0, 0, 0, 1.0, 0, 0, 0],  # both, same direction
                      [1.0, 0, 0, 0, -1.0, 0, 0, 0]])  # both, opposite
    r, cos = diffing.relative_norms(w, d)
    assert r.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5])
    assert cos[2:].tolist() == pytest.approx([1.0, -1.0])
    assert diffing.latent_kind(r) == ["base-only", "fine-tune-only", "shared", "shared"]


def test_a_crosscoder_finds_features_only_one_model_has():
    """Synthetic pairs: 24 features both 'models' write (the same direction in each half) and 8 that only
    the second writes. The trained crosscoder's latents for the 8 have r near 1, the rest near 0.5."""
    g = torch.Generator().manual_seed(0)
    d, shared, only_b, n = 16, 24, 8, 30_000
    dirs_a = torch.nn.functional.normalize(torch.randn(shared, d, generator=g), dim=1)
    dirs_b = torch.nn.functional.normalize(torch.randn(shared + only_b, d, generator=g), dim=1)
    codes = torch.rand(n, shared + only_b, generator=g) * (torch.rand(n, shared + only_b, generator=g) < 0.06)
    rows = torch.cat([codes[:, :shared] @ dirs_a, codes @ dirs_b], dim=1)  # (n, 2d)
    cfg = diffing.DiffConfig(n_features=64, k=4, epochs=30, sae_lr=3e-3)
    cc = diffing.train_crosscoder(rows, cfg, progress=False).sae
    r, _ = diffing.relative_norms(cc.W_dec.detach(), d)
    # match each true feature to the latent whose decoder is closest to its full (2d) direction
    true = torch.cat([torch.cat([dirs_a, dirs_b[:shared]], 1), torch.cat([torch.zeros(only_b, d), dirs_b[shared:]], 1)])
    best = (torch.nn.functional.normalize(true, dim=1) @ cc.W_dec.detach().t()).argmax(1)
    assert (r[best[shared:]] > 0.9).all(), r[best[shared:]]
    assert ((r[best[:shared]] - 0.5).abs() < 0.2).float().mean() > 0.8


@pytest.fixture(scope="module")
def tiny_diff(tmp_path_factory, tiny_pipeline):
    cache = tiny_pipeline("sae", tmp_path_factory.mktemp("diff") / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONOSEMANTIC_CACHE", str(cache))
        assert cli.main(["diff", "--no-progress", "--profile", "tiny"]) == 0
        yield cache, store.load("diff", "tiny", "finetune-numpy-docs")


def test_the_stage_fine_tunes_measures_transfer_and_tables_every_latent(tiny_diff):
    cache, art = tiny_diff
    cfg = profiles.get("tiny").diff
    tables = diffing.summary(art)
    losses = tables["losses"].set_index(["model", "text"])["loss"]
    assert set(losses.index) == {(m, t) for m in ("base", "finetuned") for t in ("mix", "source")}
    assert np.isfinite(losses).all() and losses["base", "source"] != losses["finetuned", "source"]
    transfer = tables["transfer"]
    assert len(transfer) == 4 and {"fvu", "ce_loss_recovered", "l0"} <= set(transfer.columns)
    latents = tables["latents"]
    assert len(latents) == cfg.n_features and latents["rel_norm"].between(0, 1).all()
    assert set(latents["kind"]) <= {"shared", "base-only", "fine-tune-only"}
    assert {"density_mix", "density_source", "top_tokens"} <= set(latents.columns)
    m = art.metrics
    assert m["latents_shared"] + m["latents_base_only"] + m["latents_finetune_only"] == m["crosscoder_live"]
    assert m["finetune_tokens"] == cfg.steps * cfg.batch_size * 32
    # the fine-tuned weights are kept out of the committed artifact, in the work folder
    assert (cache / "work" / "diff" / "tiny-numpy-docs" / "finetuned.safetensors").is_file()
    assert not any(p.suffix == ".safetensors" for p in art.path.iterdir())


def test_fine_tuning_starts_from_the_base_weights(tiny_diff, monkeypatch):
    cache, _ = tiny_diff
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(cache))
    from monosemantic.lm import load_pretrained, load_weights

    base = load_pretrained("tiny")
    tuned = load_weights(cache / "work" / "diff" / "tiny-numpy-docs" / "finetuned.safetensors")
    diffs = [float((base.state_dict()[k] - v).abs().max()) for k, v in tuned.state_dict().items()]
    assert 0 < max(diffs) < 0.5  # moved, a little: 8 steps at a fine-tuning lr from the trained model


def test_missing_source_text_is_one_line_naming_the_command(tmp_cache):
    with pytest.raises(diffing.DiffError, match="monosemantic corpus"):
        diffing.source_documents("shakespeare")
    with pytest.raises(Exception, match="holdout"):
        diffing.DiffConfig(holdout=0.7)


def test_sae_module_is_used_unchanged():  # the crosscoder is our TopK SAE on 2 x d_mlp inputs
    cfg = diffing.DiffConfig(n_features=32, k=2, epochs=1)
    res = diffing.train_crosscoder(torch.rand(2048, 8), cfg, progress=False)
    assert isinstance(res.sae, sae_mod.SAE) and res.sae.cfg.d_in == 8
    assert torch.allclose(res.sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-4)
    _ = pd  # tables are pandas frames (summary)


def test_the_control_fine_tunes_on_the_base_mix(tiny_diff, monkeypatch):
    cache, _ = tiny_diff
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(cache))
    assert cli.main(["diff", "--profile", "tiny", "--no-progress", "--source", "mix"]) == 0
    art = store.load("diff", "tiny", "finetune-mix")
    assert art.config["source"] == "mix" and art.metrics["crosscoder_live"] > 0


def test_a_second_crosscoder_seed_shares_the_pair_and_rows_and_nothing_else(tiny_diff, monkeypatch):
    """The noise floor: --crosscoder-seed trains another crosscoder on the same fine-tuned pair and rows, so the
    losses and the SAE transfer are those of the first run to the bit, and only the crosscoder differs."""
    import pandas as pd

    cache, first = tiny_diff
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(cache))
    assert cli.main(["diff", "--profile", "tiny", "--no-progress", "--crosscoder-seed", "1"]) == 0
    second = store.load("diff", "tiny", "finetune-numpy-docs-cc1")
    assert second.config["crosscoder_seed"] == 1 and "crosscoder_seed" not in first.config
    for name in ("losses", "transfer"):
        pd.testing.assert_frame_equal(pd.read_parquet(first.file(f"{name}.parquet")),
                                      pd.read_parquet(second.file(f"{name}.parquet")))
    assert second.metrics["crosscoder_rows"] == first.metrics["crosscoder_rows"]
    a, b = (pd.read_parquet(x.file("latents.parquet")) for x in (first, second))
    assert not np.allclose(a["cos"], b["cos"])


def test_the_self_pair_diffs_the_base_against_itself(tiny_diff, monkeypatch):
    """--steps 0: no fine-tune; the two halves of every row are the same model's, so both models' losses and
    the SAE transfer agree to the bit, and the crosscoder's latents are the floor of 'shared'."""
    cache, first = tiny_diff
    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(cache))
    assert cli.main(["diff", "--profile", "tiny", "--no-progress", "--steps", "0"]) == 0
    art = store.load("diff", "tiny", "finetune-numpy-docs-0step")
    assert art.config["steps"] == 0 and art.metrics["finetune_seconds"] == 0 and "lm_config" not in art.manifest["info"]
    losses = pd.read_parquet(art.file("losses.parquet")).pivot(index="text", columns="model", values="loss")
    assert (losses["base"] == losses["finetuned"]).all()
    base_half = pd.read_parquet(first.file("losses.parquet")).query("model == 'base'").set_index("text").loss
    assert (losses["base"] == base_half).all()  # the same base and text as the real pair
    latents = pd.read_parquet(art.file("latents.parquet"))
    assert (latents.kind == "shared").mean() > 0.9
    with pytest.raises(ConfigError, match="steps must be an integer >= 0"):
        diffing.DiffConfig(steps=-1)


def test_a_field_added_later_keeps_old_hashes_at_its_default():
    from monosemantic.config import stable_hash
    from monosemantic.diffing import DiffConfig

    default = DiffConfig()
    fields = default.to_dict()
    assert "crosscoder_seed" not in fields  # left out at its default ...
    assert default.config_hash() == stable_hash({"stage": "diff", "class": "DiffConfig", "version": 1,
                                                 "fields": fields})
    assert DiffConfig(crosscoder_seed=3).config_hash() != default.config_hash()  # ... and kept when set
    assert DiffConfig(**DiffConfig(crosscoder_seed=3).to_dict()) == DiffConfig(crosscoder_seed=3)
    with pytest.raises(ConfigError, match="crosscoder_seed"):
        DiffConfig(seed=2, crosscoder_seed=2)


def test_artifact_names_say_which_seeds():
    from monosemantic.diffing import DiffConfig, artifact_name

    assert artifact_name(DiffConfig(source="mix")) == "finetune-mix"
    assert artifact_name(DiffConfig(source="mix", seed=1)) == "finetune-mix-s1"
    assert artifact_name(DiffConfig(source="mix", crosscoder_seed=2)) == "finetune-mix-cc2"


def test_run_stats_on_a_known_table():
    latents = pd.DataFrame({"latent": range(5), "rel_norm": [0.05, 0.5, 0.5, 0.95, 0.5],
                            "cos": [0.1, 0.9, 0.7, 0.3, 0.5], "kind": ["base-only", "shared", "shared",
                                                                     "fine-tune-only", "shared"],
                            "density_mix": [0.01, 0.0, 0.01, 0.01, 0.0], "density_source": [0.01, 0.01, 0.01,
                                                                                           0.01, 0.0]})
    losses = pd.DataFrame({"model": ["base", "base", "finetuned", "finetuned"],
                           "text": ["mix", "source"] * 2, "loss": [4.0, 5.0, 4.5, 3.0]})
    s = diffing.run_stats({"latents": latents, "losses": losses})
    # latent 4 never fires: not live; latent 1 fires only on the source (ratio (0.01+1e-4)/1e-4 = 101)
    assert (s["live"], s["base_only"], s["finetune_only"], s["register"]) == (4, 1, 1, 1)
    assert s["median_cos"] == pytest.approx(0.5) and s["register_cos"] == pytest.approx(0.9)
    assert s["rest_cos"] == pytest.approx(0.3)  # median of 0.1, 0.7, 0.3
    assert (s["loss_shift_mix"], s["loss_shift_source"]) == (pytest.approx(0.5), pytest.approx(-2.0))
