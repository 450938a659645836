"""The Stheno rehearsal at tiny shapes: the same code path as the full-shape run (a sharded Hugging Face folder
with an index -> load -> harvest the last layer -> train -> evaluate -> analyse -> browser), with known answers:
the loaded folder gives the in-memory model's logits, the harvested width is the MLP's, the predictions are
the cost model's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from monosemantic import llama, profiles, rehearsal, store  # noqa: E402

# Stheno's config.json, shrunk: 2 layers of width 64 and MLP 96, Llama-3's 128,256-token vocabulary kept
TINY = rehearsal.RehearsalConfig.tiny()
RATES = {"forward_flop_per_s": 1e9, "sae_flop_per_s": 2e9}  # a machine's measured throughput, made up


def test_config_is_sthenos_with_these_shapes(tmp_path):
    full = rehearsal.RehearsalConfig()
    assert full.stheno_shapes and not TINY.stheno_shapes
    c = full.model_config()
    assert (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"], c["num_hidden_layers"]) == (4096, 14336, 32, 8, 128256, 2)
    assert c["rope_theta"] == 500000.0 and c["rms_norm_eps"] == 1e-5 and c["tie_word_embeddings"] is False
    run = full.run_config(tmp_path / "L3-8B-Stheno-v3.2-2-layers-random", profiles.get("gpu").llama)
    gpu = profiles.get("gpu").llama
    assert (run.k, run.store_dtype, run.layer, run.site, run.dtype) == (gpu.k, gpu.store_dtype, -1, "mlp.hook_post",
                                                                       gpu.dtype)
    assert run.seq_len == gpu.seq_len == 1024 and run.expansion == 1 < gpu.expansion
    # the 1x SAE fits 24 GB by the memory model; the gpu profile's 8x does not
    assert llama.memory_plan(14336, 14336, full.sae_batch).total_gb < full.memory_gb < 24
    assert llama.memory_plan(14336, 8 * 14336, full.sae_batch).total_gb > 24
    with pytest.raises(rehearsal.ConfigError):
        rehearsal.RehearsalConfig(num_attention_heads=7)


def test_stand_in_tokenizer_is_gpt2_bpe():
    from monosemantic import tokenizer

    tok = rehearsal.stand_in_tokenizer()
    text = "Hello world, ünïcode 日本  two  spaces\n\nend"
    assert tok.encode(text) == tokenizer.load().encode(text)
    assert len(tok) == tokenizer.N_VOCAB and tok.eos_token_id == tokenizer.EOT_ID
    assert tok.decode(tok.encode(text)) == text


def test_meter_nests_stages_and_restores_functions():
    meter = rehearsal.Meter()
    original = llama.load_model
    with meter.stage("outer"), meter.around("load_model", "load"), meter.around("no_such_function", "x"):
        from monosemantic import llama_data

        assert llama_data.load_model is not original  # the harvest's name for it is measured ...
        with meter.stage("inner"):
            import mmap

            # 50 MB of fresh anonymous pages, touched: RSS grows by that much whatever the allocators hold in
            # reserve from earlier tests (a torch tensor may reuse pages that are already resident)
            big = mmap.mmap(-1, 50_000_000)
            big.write(b"\x01" * 50_000_000)
        big.close()
    assert llama.load_model is original and llama_data.load_model is original  # ... for the block only
    outer, inner = meter.stages
    assert (inner.parent, inner.depth, inner.parent_index) == ("outer", 1, 0) and outer.passed and inner.passed
    if meter.per_stage_peaks:
        assert inner.peak_rss_gb >= inner.start_rss_gb + 0.045
    assert outer.peak_rss_gb >= inner.peak_rss_gb and outer.seconds >= inner.seconds
    assert meter.unmeasured == ["no_such_function"]


def test_rehearsal_end_to_end_at_tiny_shapes(tmp_cache):
    art = rehearsal.rehearse(TINY, profiles.get("gpu").llama, throughput=RATES, progress=False, log=lambda *_: None)
    m, info = art.metrics, art.manifest["info"]
    assert art.key == "llama/cpu-rehearsal-stheno-2-layers" and m["completed"] and not info["failure"]
    assert m["stages_passed"] == m["stages"]
    import pandas as pd

    stages = pd.read_parquet(art.file("stages.parquet"))
    assert list(stages.loc[stages.depth == 0, "stage"]) == ["build", "load", "harvest", "train, evaluate, analyse",
                                                            "browser"]
    inner = stages[stages.depth == 1]
    assert list(inner["stage"]) == ["load model", "train SAE", "load model", "evaluate", "analyse"]
    assert list(inner["parent"]) == ["harvest"] + ["train, evaluate, analyse"] * 4
    assert (stages["self_seconds"] <= stages["seconds"] + 1e-6).all() and (stages["peak_rss_gb"] > 0).all()

    # the folder: several bf16 shards and the index, as the hub holds Stheno; config.json like Stheno's
    folder = Path(info["scratch"]) / rehearsal.folder_name(TINY)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    n_layer_tensors = 9  # q, k, v, o, gate, up, down, two norms
    assert m["n_shards"] >= 2 and len(index["weight_map"]) == m["n_tensors"] == 2 * n_layer_tensors + 3
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(index["weight_map"])  # untied: both stored
    assert m["weights_bytes"] == 2 * m["n_params"]  # bf16
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["tie_word_embeddings"] is False
    assert config["intermediate_size"] == 96 and config["num_hidden_layers"] == 2
    from safetensors import safe_open

    with safe_open(str(folder / index["weight_map"]["lm_head.weight"]), "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"

    # known answers: the same logits from the folder, the last layer's MLP input harvested at its width
    assert m["logits_max_abs_diff"] == 0.0
    assert info["checks"]["default_hook"] == info["hook"] == "layers.1.mlp.hook_post"
    assert m["activation_width"] == 96 and m["width_is_intermediate_size"]
    assert m["n_features"] == 2 * 96 and m["activation_shards"] == 5 and info["activation_rows"] == 620
    assert info["checks"]["tokenizer_vocab"] == 50257 and info["checks"]["loaded_params"] == m["n_params"]
    assert m["browser_units"] == 96 + 192 and info["pipeline_metrics"]["l0"] <= 64

    # the predictions are the cost model's, from the throughput given
    fwd = llama.forward_flops_per_token(2, 64, 96, 4, 2, 32)
    assert m["harvest_predicted_seconds"] == pytest.approx(620 * fwd / 1e9, abs=0.01)
    sae = llama.sae_flops_per_activation(96, 192)
    assert m["train_predicted_seconds"] == pytest.approx(m["train_activations"] * sae / 2e9, abs=0.01)
    assert m["train_predicted_gb"] == pytest.approx(llama.memory_plan(96, 192, 64).total_gb, abs=1e-3)
    assert 0 < m["train_loop_seconds"] <= m["train_seconds"]  # the steps, inside the stage

    # the run's own artifact and weights stayed in cache/work; the book's Llama run is not this one
    assert [a.key for a in store.list_artifacts("llama")] == [art.key]
    assert llama.main_artifact() is None
    table = rehearsal.stage_table(art)
    assert len(table) == len(stages) and table["passed"].eq("yes").all()


def test_a_failing_stage_is_recorded(tmp_cache):
    bad = TINY.replace(memory_gb=1e-4, harvest_tokens=124)  # no SAE fits: train-sae refuses
    with pytest.raises(rehearsal.RehearsalError, match="train SAE") as e:
        rehearsal.rehearse(bad, profiles.get("gpu").llama, throughput=RATES, progress=False, log=lambda *_: None)
    assert "\n" not in str(e.value)
    art = store.load("llama", "cpu", bad.name)
    assert not art.metrics["completed"] and "budget" in art.manifest["info"]["failure"]
    import pandas as pd

    stages = pd.read_parquet(art.file("stages.parquet")).set_index("stage")
    assert stages.loc[["build", "load", "harvest"], "passed"].all()
    assert not stages.loc["train SAE", "passed"] and "budget" in stages.loc["train SAE", "error"]


def test_logit_extremes_in_chunks_are_those_of_the_whole_matrix():
    """The analysis ranks each unit's logit effects a chunk of units at a time (the rehearsal's finding: the
    whole matrix is 7 GB at Llama-3-8B's 14,336 neurons), with the same answer as on the whole matrix."""
    from monosemantic import analysis

    gen = torch.Generator().manual_seed(0)
    unembed = torch.randn(8, 300, generator=gen)

    class Model:
        n_vocab = 257  # the columns past it are not real tokens

        def logit_effects(self, d):
            return d @ unembed

    directions = torch.randn(10, 8, generator=gen)
    polarity = torch.tensor([1.0, -1.0] * 5)
    whole = (directions @ unembed)[:, :257] * polarity[:, None]
    up_v, up_i, down_v, down_i = analysis.logit_extremes(Model(), directions, polarity, 4, chunk=3)
    torch.testing.assert_close((up_v, up_i), whole.topk(4, dim=1))
    torch.testing.assert_close((down_v, down_i), (-whole).topk(4, dim=1))
    assert int(up_i.max()) < 257
