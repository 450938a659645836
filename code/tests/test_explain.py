"""Explanations and their scores (monosemantic.explain) with known answers: the token-table explainer, the
simulation and detection scores, the held-out context pools, the random dictionary, density-matched
comparisons, and the chat explainers against a fake endpoint on localhost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from monosemantic import analysis as A
from monosemantic import comparisons as C
from monosemantic import explain as E
from monosemantic.config import ConfigError

# --- the token table ------------------------------------------------------------------------------------


def test_token_table_lists_the_largest_means_and_simulates_by_lookup():
    ex = E.UnitExamples(0, tokens=[np.array([5, 6, 5, 9]), np.array([7, 5])],
                        acts=[np.array([1.0, 0.0, 3.0, 0.5]), np.array([0.0, 2.0])])
    explainer = E.token_table(n_tokens=2, predict_fraction=0.5)
    text = explainer.explain(ex)
    assert text == "5:2 9:0.5"  # 5: mean of 1, 3, 2; 9: 0.5; 6 and 7 (zero) and the third token cut
    pred = explainer.simulate(text, np.array([[5, 6, 9], [1, 5, 2]]))
    assert np.array_equal(pred, [[2.0, 0.0, 0.5], [0.0, 2.0, 0.0]])
    assert explainer.fires_at(text) == 1.0  # half the largest value
    assert explainer.explain(E.UnitExamples(1, [], [])) == ""
    assert explainer.simulate("", np.array([[1, 2]])).sum() == 0 and explainer.fires_at("") == float("inf")


def test_token_tables_agree_with_the_whole_table():
    rng = np.random.default_rng(0)
    shown = [(0, rng.integers(0, 30, 20), rng.random(20) * (rng.random(20) < 0.4)) for _ in range(6)]
    whole = E.fit_token_tables(1, shown, vocab=30).toarray()[:, 0]
    text = E.token_table(n_tokens=30).explain(E.UnitExamples(0, [s[1] for s in shown], [s[2] for s in shown]))
    ids, values = E.parse_token_table(text)
    assert np.allclose(whole[ids], values, rtol=1e-3) and (whole[np.setdiff1d(np.arange(30), ids)] == 0).all()


# --- the two scores -------------------------------------------------------------------------------------

def _contexts(rng, n, C=16, vocab=50):
    return rng.integers(0, vocab, (n, C))


def test_score_unit_known_answers():
    rng = np.random.default_rng(0)
    explainer = E.token_table()
    mix = _contexts(rng, 30)
    mix = np.where(mix == 7, 8, mix)
    mix[:10, 3] = 7  # the activating contexts hold token 7, once
    acts = (mix == 7).astype(float)
    valid = np.ones_like(mix, dtype=bool)
    positive = acts.max(1) > 0
    neg = _contexts(rng, 20)
    neg = np.where(neg == 7, 8, neg)
    sc = E.score_unit(explainer, "7:1", mix, acts, valid, positive, neg, np.ones_like(neg, dtype=bool))
    assert sc.sim_corr == pytest.approx(1.0) and sc.detection == 1.0
    # an explanation of the wrong token: no correlation, every context called quiet: chance
    sc = E.score_unit(explainer, "9:1", mix, acts, valid, positive, neg, np.ones_like(neg, dtype=bool))
    assert abs(sc.sim_corr) < 0.2 and sc.tpr < 0.5 and sc.detection < 0.75
    # an explanation that says "always": every context called active, balanced accuracy 0.5
    always = " ".join(f"{i}:1" for i in range(50))
    sc = E.score_unit(explainer, always, mix, acts, valid, positive, neg, np.ones_like(neg, dtype=bool))
    assert sc.tpr == 1.0 and sc.tnr == 0.0 and sc.detection == 0.5
    # tokens not measured (a window's first position) count in neither score
    masked = valid.copy()
    masked[:10, 3] = False
    sc = E.score_unit(explainer, "7:1", mix, acts, masked, positive, neg, np.ones_like(neg, dtype=bool))
    assert np.isnan(sc.sim_corr) and sc.tpr == 0.0


def test_correlation_edge_cases():
    assert np.isnan(E.correlation(np.ones(5), np.arange(5)))  # a unit that never varies
    assert E.correlation(np.arange(5), np.zeros(5)) == 0.0  # an explanation that predicts nothing
    assert E.correlation(np.arange(5), 2 * np.arange(5) + 1) == pytest.approx(1.0)


# --- choosing held-out contexts -------------------------------------------------------------------------

def test_context_pools_choose_top_interval_random_and_negative_contexts():
    g = torch.Generator().manual_seed(0)
    B, T, C, n = 8, 32, 8, 3  # 4 contexts per window
    batches = [torch.rand(B, T, n, generator=g) * (torch.rand(B, T, n, generator=g) < 0.05) for _ in range(5)]
    allv = torch.cat(batches)  # (40, 32, 3)
    ctx_max = allv.reshape(-1, C, n).amax(1)  # (160, 3): context id = window * 4 + chunk
    pools = E.ContextPools(torch.ones(n), C, n_top=4, intervals=2, per_interval=3, n_random=5, n_negative=6)
    for k, a in enumerate(batches):
        pools.add(a, k * B * (T // C))
    for u in range(n):
        ids, acts, positive, neg = pools.unit(u)
        assert len(set(ids.tolist())) == len(ids)  # each context once
        top = torch.topk(ctx_max[:, u], 4).indices.tolist()
        assert sorted(ids[:4].tolist()) == sorted(top) and positive[:4].all()
        for i, a in zip(ids, acts, strict=True):  # the activations kept are the context's own
            assert np.allclose(a, allv.reshape(-1, C, n)[i, :, u].numpy())
        sampled = ids[4:][positive[4:]]
        assert len(sampled) == 6 and (ctx_max[sampled, u] > 0).all()
        assert ((ctx_max[sampled, u] > 0.5).sum() == 3)  # three from each half of (0, 1]
        assert (~positive).sum() <= 5 and len(neg) == 6 and (ctx_max[neg, u] == 0).all()


def test_context_tokens_mark_the_first_positions_of_a_window():
    windows = np.arange(2 * 8).reshape(2, 8)
    tokens, valid = E.context_tokens(windows, np.array([0, 1, 2, 3]), 4, skip=1)
    assert tokens.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert valid[:, 0].tolist() == [False, True, False, True] and valid[:, 1:].all()


# --- the random dictionary ------------------------------------------------------------------------------

def test_the_random_dictionary_encodes_with_exactly_k_nonzeros_per_token():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(500, 16, generator=g) + 3.0  # off-centre, as MLP activations are
    s = A.UnitSet.random_dictionary("random", d=16, n_units=64, k=4, seed=0, centre=h.mean(0))
    a = s.encode(h)
    assert a.shape == (500, 64) and ((a > 0).sum(1) == 4).all() and (a >= 0).all()
    assert torch.allclose(s.directions.norm(dim=1), torch.ones(64))
    assert (a > 0).any(0).float().mean() > 0.9  # centred: the units share the firing, none is always on
    again = A.UnitSet.random_dictionary("random", d=16, n_units=64, k=4, seed=0, centre=h.mean(0))
    other = A.UnitSet.random_dictionary("random", d=16, n_units=64, k=4, seed=1, centre=h.mean(0))
    assert torch.equal(again.directions, s.directions) and not torch.equal(other.directions, s.directions)
    # its value on a token is the projection on its direction, where it is among the k largest
    pre = (h - h.mean(0)) @ s.directions.t()
    assert torch.allclose(a[a > 0], pre[a > 0])


def test_random_lm_is_seeded():
    from monosemantic.lm import LMConfig

    cfg = LMConfig(context_length=16, d_model=32, n_heads=4, d_mlp=64, vocab_size=500, dtype="float32", compile=False)
    a, b, c = A.random_lm(cfg, 0), A.random_lm(cfg, 0), A.random_lm(cfg, 1)
    wa, wb, wc = (m.blocks[0].mlp.fc_out.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# --- density-matched comparisons ------------------------------------------------------------------------

def _units(set_name, densities, passing, family_share=None):
    n = len(densities)
    return pd.DataFrame({"set": set_name, "unit": np.arange(n), "density_val": densities, "scored": True,
                         "too_rare": False, "family_share": passing * 0.9 if family_share is None else family_share,
                         "family_lift": 10.0, "sim_corr": np.where(passing, 0.8, 0.1),
                         "detection": np.where(passing, 0.9, 0.6), "explain_corr": np.where(passing, 0.7, 0.0)})


def _synthetic_sets():
    """Two sets with the same pass rate in each density bin (20% at ~1e-3, 80% at ~1e-1) but opposite
    density distributions: "neurons" mostly dense, "topk" mostly sparse."""
    def one(name, n_sparse, n_dense):
        d = np.concatenate([np.full(n_sparse, 1.5e-3), np.full(n_dense, 0.15)])
        ok = np.concatenate([np.arange(n_sparse) % 5 == 0, np.arange(n_dense) % 5 != 0])
        return _units(name, d, ok)

    return pd.concat([one("neurons", 100, 900), one("topk", 900, 100)], ignore_index=True)


def test_matched_difference_is_zero_for_equal_rates_in_every_bin_while_the_raw_one_is_not():
    units = _synthetic_sets()
    cfg = A.AnalysisConfig()
    table = C.matched_differences(units, cfg)
    for row in table.itertuples():
        assert row.set == "topk" and row.baseline == "neurons"
        assert row.raw == pytest.approx(0.26 - 0.74) and row.raw_high < 0  # sparser: fewer pass, raw
        assert row.matched == pytest.approx(0.0, abs=1e-12) and row.matched_low < 0 < row.matched_high
        assert row.coverage == 1.0 and row.bins == 2
    m = A.control_metrics(table)
    assert m["matched_sim_corr_features_minus_neurons"] == 0.0
    assert m["raw_specificity_features_minus_neurons"] == pytest.approx(-0.48)


def test_matched_difference_recovers_a_real_difference_and_reports_coverage():
    d = np.concatenate([np.full(500, 1.5e-3), np.full(500, 0.15)])
    ok = np.arange(1000) % 2 == 0  # 50% in both bins
    base_d = np.concatenate([np.full(800, 0.15), np.full(200, 0.9)])  # a bin the other set lacks
    base_ok = np.arange(1000) % 10 == 0  # 10%
    m = C.matched_difference(d, ok, base_d, base_ok, width=0.5, n_boot=500)
    assert m.matched == pytest.approx(0.4) and m.matched_low < 0.4 < m.matched_high and m.matched_low > 0.3
    assert m.coverage == pytest.approx(0.8) and m.bins == 1


def test_matched_difference_skips_bins_too_small_to_resample_and_takes_weights_from_a_third_set():
    d = np.concatenate([np.full(100, 1.5e-3), np.full(1, 0.15)])  # one unit in the dense bin
    ok = np.concatenate([np.zeros(100, bool), np.ones(1, bool)])  # 0% sparse, 100% dense
    base_d = np.concatenate([np.full(100, 1.5e-3), np.full(100, 0.15)])
    base_ok = np.concatenate([np.zeros(100, bool), np.zeros(100, bool)])
    every = C.matched_difference(d, ok, base_d, base_ok, width=0.5, n_boot=200)
    assert every.matched == pytest.approx(0.5) and every.bins == 2  # the lone dense unit counts half
    floor = C.matched_difference(d, ok, base_d, base_ok, width=0.5, n_boot=200, min_units=20)
    assert floor.matched == pytest.approx(0.0) and floor.bins == 1 and floor.coverage == pytest.approx(0.5)
    # weighted by a third set that lives in the dense bin only: the difference there, 100% - 0%
    third = C.matched_difference(d, ok, base_d, base_ok, width=0.5, n_boot=200, weight_density=np.full(50, 0.15))
    assert third.matched == pytest.approx(1.0) and third.coverage == pytest.approx(1.0)


def test_density_bins_give_fractions_and_medians_with_intervals():
    units = _synthetic_sets()
    table = C.density_bins(units, A.AnalysisConfig(n_boot=200))
    rows = table.set_index(["set", "bin"])
    sparse = rows.loc[("topk", "10^-3..10^-2.5")]
    assert sparse["units"] == 900 and sparse["scored"] == 900
    assert sparse["sim_corr_fraction"] == pytest.approx(0.2) and sparse["sim_corr_fraction_low"] < 0.2
    assert sparse["sim_corr_median"] == pytest.approx(0.1)
    dense = rows.loc[("neurons", "10^-1..10^-0.5")]
    assert dense["detection_fraction"] == pytest.approx(0.8) and dense["detection_fraction_high"] > 0.8
    assert rows.loc[("topk", "all"), "specificity_fraction"] == pytest.approx(0.26)
    cols = [c for c in table.columns if c.endswith(("_low", "_high")) and not c.startswith("log10")]
    assert table[cols].notna().all().all()


def test_passes_and_interpretable_fraction_count_scored_units_only():
    units = _units("topk", np.full(4, 0.01), np.array([True, True, False, False]))
    units.loc[1, "scored"] = False
    cfg = A.AnalysisConfig()
    assert C.passes(units, "detection", cfg).tolist() == [True, False, False, False]
    assert C.interpretable_fraction(units, "detection", cfg) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown score"):
        C.passes(units, "vibes", cfg)


# --- chat explainers ------------------------------------------------------------------------------------

class _FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that answers an explanation or a simulation, canned."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        if "JSON list" in prompt:
            n = int(prompt.rsplit("JSON list of ", 1)[1].split()[0])
            lines = prompt.split("number<tab>token):\n", 1)[1].split("\n\n", 1)[0].splitlines()
            reply = json.dumps([10 if line.split("\t", 1)[1] == " cat" else 0 for line in lines][:n])
            reply = "Sure: " + reply if "dog" not in prompt else "I cannot say."
        else:
            reply = "the word cat.\nmore text"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    _FakeEndpoint.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


VOCAB = {0: " the", 1: " cat", 2: " sat", 3: " dog"}


def _texts(ids):
    return [VOCAB[int(i)] for i in ids]


def test_openai_explainer_explains_simulates_and_scores_through_the_endpoint(endpoint, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_API_KEY", "secret-key")
    explainer = E.make_explainer(f"openai:tiny-model@{endpoint}", _texts)
    assert explainer.name == f"openai:tiny-model@{endpoint}"
    text = explainer.explain(E.UnitExamples(0, [np.array([0, 1, 2])], [np.array([0.0, 2.5, 0.0])]))
    assert text == "the word cat."
    first = _FakeEndpoint.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret-key"
    assert first["body"]["model"] == "tiny-model" and " cat\t10" in first["body"]["messages"][-1]["content"]
    tokens = np.array([[0, 1, 2], [2, 0, 0]])
    assert explainer.simulate(text, tokens).tolist() == [[0, 10, 0], [0, 0, 0]]
    acts = (tokens == 1).astype(float)
    sc = E.score_unit(explainer, text, tokens, acts, np.ones_like(tokens, bool), acts.max(1) > 0,
                      np.array([[0, 2, 2]]), np.ones((1, 3), bool))
    assert sc.sim_corr == pytest.approx(1.0) and sc.detection == 1.0
    # an unreadable answer predicts nothing and is counted
    assert explainer.simulate("x", np.array([[3, 1]])).tolist() == [[0, 0]]
    assert explainer.simulate.failures == 1


def test_openai_explainer_errors_are_one_line(monkeypatch):
    for var in E.API_KEY_VARS:
        monkeypatch.delenv(var, raising=False)
    chat = E.openai_chat("http://127.0.0.1:9/v1", "m", timeout=2)  # port 9 (discard): nothing listens
    with pytest.raises(E.ExplainerError, match="cannot reach"):
        chat([{"role": "user", "content": "hi"}])


def test_hf_chat_uses_the_chat_template_and_decodes_only_the_answer():
    class Tok:
        def apply_chat_template(self, messages, **kw):
            assert kw["add_generation_prompt"] and messages[-1]["role"] == "user"
            return {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

        def decode(self, ids, skip_special_tokens):
            return "[0, 10]" if ids.tolist() == [7, 8] else "?"

    class Model:
        def generate(self, input_ids, attention_mask, max_new_tokens, do_sample):
            assert not do_sample
            return torch.cat([input_ids, torch.tensor([[7, 8]])], 1)

    explainer = E.chat_explainer(E.hf_chat("unused", model=Model(), tokenizer=Tok()), _texts, "hf:fake")
    assert explainer.simulate("cats", np.array([[0, 1]])).tolist() == [[0, 10]]


def test_bad_explainer_specs_are_one_line_errors():
    for spec in ("gpt", "openai:model", "openai:model@localhost:8000", "hf:"):
        with pytest.raises(E.ExplainerError):
            E.check_spec(spec)
    E.check_spec("openai:llama3:8b@http://localhost:11434/v1")  # a model name with a colon
    E.check_spec("hf:/models/chat")
    with pytest.raises(ConfigError, match="unknown explainer"):
        A.AnalysisConfig(explainer="gpt")


def test_analyze_cli_flag_replaces_the_explainer(monkeypatch):
    seen = {}
    from monosemantic import profiles

    monkeypatch.setattr(A.stage, "run_stage",
                        lambda profile, cfg, stage, progress: seen.setdefault("cfg", cfg) and "path")
    args = SimpleNamespace(profile="tiny", threads=None, no_progress=True, explainer="openai:m@http://localhost:1/v1",
                           profile_config=profiles.get("tiny"))
    assert A.run(args) == 0 and seen["cfg"].explainer == "openai:m@http://localhost:1/v1"


# --- the SAE on a randomly initialised LM ---------------------------------------------------------------

def test_the_random_model_control_is_optional_and_read_from_its_artifact(tmp_path, monkeypatch):
    from monosemantic import sae as sae_mod
    from monosemantic import store
    from monosemantic.lm import LMConfig

    monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / "cache"))
    cfg = LMConfig(context_length=16, d_model=32, n_heads=4, d_mlp=64, vocab_size=500, dtype="float32", compile=False)
    lm_art = SimpleNamespace(config=cfg.to_dict())
    said = []
    assert A.stage._random_model_set("tiny", lm_art, said.append) is None
    assert len(said) == 1 and "tiny-random-model" in said[0] and "left out" in said[0]
    sae = sae_mod.SAE(sae_mod.SAEConfig(d_in=64, n_features=128, architecture="topk", k=4))
    with store.write("sae", "tiny", A.RANDOM_MODEL, config={"model_seed": 3}) as w:
        sae_mod.save(sae, w.dir)
    model, units, art = A.stage._random_model_set("tiny", lm_art, said.append)
    assert units.name == A.RANDOM_MODEL and units.n_units == 128 and art.name == A.RANDOM_MODEL
    assert torch.equal(model.blocks[0].mlp.fc_out.weight, A.random_lm(cfg, 3).blocks[0].mlp.fc_out.weight)


def test_two_analyses_merge_into_one_set_of_tables():
    def tables(set_name, tokens):
        frame = pd.DataFrame({"set": [set_name], "unit": [0]})
        out = {name: frame for name in A.TABLES}
        out["vocab"] = pd.DataFrame({"token": tokens, "text": [str(t) for t in tokens]})
        out["families"] = pd.DataFrame({"family": ["digits"]})
        return out

    merged = A.stage._merge(tables("topk", [1, 2]), tables(A.RANDOM_MODEL, [2, 3]))
    assert merged["units"]["set"].tolist() == ["topk", A.RANDOM_MODEL]
    assert merged["vocab"]["token"].tolist() == [1, 2, 3] and len(merged["families"]) == 1


def test_analyze_explains_and_scores_through_a_chat_endpoint(endpoint, monkeypatch):
    """The whole analysis with ``--explainer openai:...``: a unit that fires on " cat" exactly, explained
    and simulated by the fake endpoint (which predicts 10 on " cat"), scores perfectly."""
    from test_analysis import TokenModel, _synthetic_text

    from monosemantic.tokenizer import load

    monkeypatch.delenv("MONOSEMANTIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tok = load()
    (cat,) = tok.encode(" cat")
    cfg = A.AnalysisConfig(explain_tokens=4_000, top_contexts=4, interval_samples=2, batch_windows=16, min_firings=3,
                           score_top=3, score_per_interval=1, score_random=3, score_negatives=3,
                           explainer=f"openai:fake@{endpoint}")
    units = A.UnitSet("topk", lambda h: (h[:, :1].long() == cat).float(), torch.eye(4)[:1])
    out = A.analyze(TokenModel(), tok, [units], _synthetic_text(tok, 80, 0), _synthetic_text(tok, 40, 1), cfg,
                    progress=False, log=lambda s: None)
    row = out["units"].iloc[0]
    assert out["explainer"] == cfg.explainer and row["explanation"] == "the word cat."
    assert row["sim_corr"] == pytest.approx(1.0) and row["detection"] == 1.0
    assert _FakeEndpoint.requests[0]["auth"] is None  # no key set: no header
