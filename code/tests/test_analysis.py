"""The analysis stage: detectors on constructed text, both monosemanticity scores on synthetic units with
known answers, logit effects against a direct computation through the model, feature splitting."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from monosemantic import analysis as A
from monosemantic import explain as E
from monosemantic.tokenizer import load as load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def families_of(tok, text):
    ids = tok.encode(text)
    fam = A.token_families(tok.token_bytes(ids))
    return [(s, {A.FAMILY_NAMES[j] for j in np.flatnonzero(row)}) for s, row in
            zip(tok.token_strings(ids), fam, strict=True)]


def labelled(tok, text, family):
    """The tokens of ``text`` carrying ``family``, joined."""
    return "".join(s for s, f in families_of(tok, text) if family in f)


@pytest.mark.parametrize("text,family,expected", [
    ("int main() { return 0; }", "code-brace", "{}"),
    ("see https://example.com/page for more", "url", "https://example.com/page"),
    ("as shown [@smith2020] before", "citation", "[@smith2020]"),
    ("as shown \\cite{knuth} before", "citation", "\\cite{knuth}"),
    ("Bricken et al. found", "citation", " et al."),
    ("the area is $x^2$ here", "latex", "$$"),
    ("\\begin{equation}", "latex", "\\begin"),
    ("in 1987 there were 42", "digits", " 1987 42"),
    ("Hello there, said Alice", "capitalised", "Hello Alice"),
])
def test_each_detector_marks_what_it_should(tok, text, family, expected):
    got = labelled(tok, text, family)
    assert got.replace(" ", "") == expected.replace(" ", ""), families_of(tok, text)


def test_scripts_mark_every_token_of_a_split_character(tok):
    for text, family in (("مرحبا بالعالم", "arabic"), ("中文字符", "cjk"), ("Привет мир", "cyrillic"),
                         ("שלום", "hebrew"), ("Καλημέρα", "greek"), ("nämlich größer", "latin-diacritic")):
        ids = tok.encode(text)
        fam = A.token_families(tok.token_bytes(ids))
        j = A.FAMILY_NAMES.index(family)
        marked = fam[:, j]
        if family == "latin-diacritic":
            assert marked.any() and not marked.all()  # "n", "lich" have none
        else:
            assert marked[[i for i, b in enumerate(tok.token_bytes(ids)) if b.strip()]].all(), (text, marked)
    # English prose carries none of the script families
    fam = A.token_families(tok.token_bytes(tok.encode("plain English words only")))
    assert not fam[:, [A.FAMILY_NAMES.index(f) for f in ("arabic", "cjk", "cyrillic", "latin-diacritic")]].any()


def test_whitespace_punctuation_and_the_document_separator(tok):
    ids = tok.encode("Stop!\n\n    x") + [A.EOT_ID]
    pieces = [b"" if i == A.EOT_ID else tok.encoding.decode_single_token_bytes(i) for i in ids]
    fam = A.token_families(pieces, [i == A.EOT_ID for i in ids])
    strings = tok.token_strings(ids)
    col = {f: A.FAMILY_NAMES.index(f) for f in ("punctuation", "whitespace")}
    assert fam[strings.index("!"), col["punctuation"]]
    assert any(fam[i, col["whitespace"]] for i, s in enumerate(strings) if s.strip() == "" and s)
    assert not fam[-1].any()  # <|endoftext|> belongs to no family


# --- synthetic units through the whole analysis -------------------------------------------------------

class TokenModel(torch.nn.Module):
    """Stands in for the LM: its 'MLP activations' carry the token id (h[..., 0]), noise (h[..., 1]) and the
    position in the window (h[..., 2]), so that units with known answers can be written as functions of them."""

    def __init__(self, d_model: int = 8, d_mlp: int = 4, context: int = 32, vocab: int = 50304):
        super().__init__()
        self.config = SimpleNamespace(context_length=context, d_mlp=d_mlp, vocab_size=vocab)
        mlp = torch.nn.Module()
        mlp.fc_out = torch.nn.Linear(d_mlp, d_model)
        block = torch.nn.Module()
        block.mlp = mlp
        self.blocks = torch.nn.ModuleList([block])
        self.ln_final = torch.nn.LayerNorm(d_model)
        self.unembed = torch.nn.Linear(d_model, vocab)

    def run_with_cache(self, x, names):
        h = torch.zeros(*x.shape, self.config.d_mlp)
        h[..., 0] = x.float()
        h[..., 2] = torch.arange(x.shape[1]).float()
        for b, window in enumerate(x):  # noise that depends on the window only, as a real model's output does
            g = torch.Generator().manual_seed(int((window * torch.arange(1, x.shape[1] + 1)).sum()))
            h[b, :, 1] = torch.rand(x.shape[1], generator=g)
        return {names[0]: h}


def _synthetic_text(tok, n_docs: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "slept", "quietly", "here"]
    years = ["1987", "2003", "42", "7"]
    ids: list[int] = []
    for _ in range(n_docs):
        parts = [rng.choice(years) if rng.random() < 0.15 else rng.choice(words) for _ in range(60)]
        ids += tok.encode(" ".join(parts) + ".") + [A.EOT_ID]
    return np.asarray(ids, dtype=np.uint16)


def test_a_unit_firing_exactly_on_one_family_scores_high_and_a_random_unit_low(tok):
    model = TokenModel()
    vocab = model.config.vocab_size
    digit_tokens = torch.zeros(vocab, dtype=torch.bool)
    for i in range(A.N_VOCAB):
        if any(c.isdigit() for c in tok.token_strings([i])[0]):
            digit_tokens[i] = True
    dirs = torch.eye(4)[:2]

    def encode(h):
        t = h[:, 0].long()
        family_unit = digit_tokens[t].float() * (1.0 + 0.1 * h[:, 1])  # on digits, only, at ~1
        random_unit = torch.relu(h[:, 1] - 0.7) * 5  # on 30% of tokens, whatever they are
        return torch.stack([family_unit, random_unit], 1)

    sets = [A.UnitSet("synthetic", encode, dirs)]
    cfg = A.AnalysisConfig(explain_tokens=20_000, top_contexts=8, interval_samples=4, batch_windows=16,
                           min_firings=3)
    out = A.analyze(model, tok, sets, _synthetic_text(tok, 400, 0), _synthetic_text(tok, 100, 1), cfg,
                    progress=False, log=lambda s: None)
    units = out["units"].set_index("unit")
    fam, rnd = units.loc[0], units.loc[1]
    assert fam["explain_corr"] > 0.9 and rnd["explain_corr"] < 0.2, units[["explain_corr"]]
    assert fam["family"] == "digits" and fam["family_share"] > 0.99 and fam["family_lift"] > 5
    assert not (rnd["family_share"] >= cfg.specificity_threshold and rnd["family_lift"] >= cfg.lift_threshold)
    assert A.interpretable_fraction(out["units"], "explain_corr", cfg) == 0.5
    assert A.interpretable_fraction(out["units"], "specificity", cfg) == 0.5
    # dashboards: top contexts of the family unit centre on digit tokens, with per-token activations
    ctx = out["contexts"]
    top = ctx[(ctx.unit == 0) & (ctx.kind == "top")]
    assert 0 < len(top) <= cfg.top_contexts and top.document.nunique() == len(top)
    for _, row in top.iterrows():
        centre = int(row.tokens[row.center])
        assert digit_tokens[centre] and row.acts[row.center] == pytest.approx(row.activation, rel=1e-2)
    tops = out["top_tokens"]
    assert set(tops[tops.unit == 0].token) <= set(np.flatnonzero(digit_tokens.numpy()))
    assert units.loc[0, "density"] > 0 and units.loc[0, "q50"] == pytest.approx(1.05, rel=0.15)


def _digit_tokens(tok, vocab: int) -> torch.Tensor:
    out = torch.zeros(vocab, dtype=torch.bool)
    for i in range(A.N_VOCAB):
        if any(c.isdigit() for c in tok.token_strings([i])[0]):
            out[i] = True
    return out


@pytest.fixture(scope="module")
def signed_analysis(tok):
    """The analysis of units with known answers: a non-negative digit unit (0), a mostly negative one (1:
    -3 on every digit token, small positive noise elsewhere) and a two-signed one (2: -3 on digits, +2 on
    " cat"); and (``ref``) that of the non-negative units max(-a, 0) of units 1 and 2 beside unit 0."""
    model = TokenModel()
    digits = _digit_tokens(tok, model.config.vocab_size)
    cat = tok.encode(" cat")[0]

    def nonneg(h):
        return digits[h[:, 0].long()].float() * (1.0 + 0.1 * h[:, 1])

    def signed(h):
        t = h[:, 0].long()
        d = digits[t].float()
        mostly_negative = -3.0 * d + 0.05 * h[:, 1] * (1 - d)
        two_signed = -3.0 * d + 2.0 * (t == cat).float()
        return torch.stack([nonneg(h), mostly_negative, two_signed], 1)

    def negated(h):  # what units 1 and 2 should be read as: their negative halves, as non-negative units
        a = signed(h)
        return torch.cat([a[:, :1], (-a[:, 1:]).clamp_min(0)], 1)

    cfg = A.AnalysisConfig(explain_tokens=20_000, top_contexts=8, interval_samples=4, batch_windows=16,
                           min_firings=3)
    explain, val = _synthetic_text(tok, 400, 0), _synthetic_text(tok, 100, 1)
    out, ref = (A.analyze(model, tok, [A.UnitSet("signed", encode, torch.eye(4)[:3])], explain, val, cfg,
                          progress=False, log=lambda s: None) for encode in (signed, negated))
    windows, _ = A.spread_windows(explain, model.config.context_length, cfg.explain_tokens)
    val_windows, _ = A.spread_windows(val, model.config.context_length, len(val))
    skip = cfg.skip_first_positions  # the measured positions of every window

    def share(w):
        return float(digits[torch.as_tensor(w[:, skip:].astype(np.int64))].double().mean())

    return SimpleNamespace(out=out, ref=ref, cfg=cfg, model=model, digits=digits, cat=cat,
                           digit_share=share(windows), digit_share_val=share(val_windows))


def test_a_mostly_negative_unit_is_read_negated_with_the_family_density_and_share_expected(signed_analysis):
    r = signed_analysis
    units = r.out["units"]
    row = units[(units["set"] == "signed") & (units["unit"] == 1)].iloc[0]
    assert row["polarity"] == -1 and row["scored"]
    assert row["family"] == "digits"
    # it "fires" (is active in its polarity) on the digit tokens exactly, at 3
    assert row["density"] == pytest.approx(r.digit_share, rel=1e-9)
    assert row["density_val"] == pytest.approx(r.digit_share_val, rel=1e-9)
    assert row["mean"] == pytest.approx(3 * r.digit_share, rel=1e-6) and row["max"] == pytest.approx(3.0)
    assert row["q50"] == pytest.approx(3.0, rel=0.15)
    assert 0.99 < row["family_share"] <= 1.0 and row["family_lift"] > 5
    assert 0 < row["other_sign_share"] < 0.2  # the positive noise, left out
    assert row["explain_corr"] > 0.9
    tops = r.out["top_tokens"]
    tops = tops[(tops["set"] == "signed") & (tops["unit"] == 1)]
    assert set(tops.token) <= set(np.flatnonzero(r.digits.numpy())) and tops["share"].between(0, 1).all()
    # logit effects: those of -1 times its direction (what it writes when it is active, at a < 0)
    effect = A.logit_effects(r.model, torch.eye(4)[1:2])[0, :A.N_VOCAB]
    lg = r.out["logits"]
    up = lg[(lg["set"] == "signed") & (lg["unit"] == 1) & (lg["sign"] == 1)].sort_values("rank")
    assert up["effect"].iloc[0] == pytest.approx(float(-effect.min()), rel=1e-5)
    # every share of every unit is a share
    shares = units["family_share"].dropna()
    assert len(shares) and shares.between(0, 1).all()


def test_a_two_signed_unit_s_dashboard_shows_its_stronger_polarity(signed_analysis):
    r = signed_analysis
    units = r.out["units"].set_index(["set", "unit"])
    assert units.loc[("signed", 2), "polarity"] == -1 and units.loc[("signed", 2), "family"] == "digits"
    assert 0.1 < units.loc[("signed", 2), "other_sign_share"] < 0.5  # the +2 on " cat"
    ctx = r.out["contexts"]
    top = ctx[(ctx["set"] == "signed") & (ctx["unit"] == 2) & (ctx["kind"] == "top")]
    assert len(top) == r.cfg.top_contexts
    for _, row in top.iterrows():  # the -3s on digits, shown as 3; never the +2 on " cat"
        assert r.digits[int(row.tokens[row.center])] and row.activation == pytest.approx(3.0)
        assert row.acts[row.center] == pytest.approx(3.0) and (row.acts >= 0).all()
        assert (row.acts[row.tokens == r.cat] == 0).all()
    samples = ctx[(ctx["set"] == "signed") & (ctx["unit"] == 2) & (ctx["kind"] == "interval")]
    assert len(samples) and all(r.digits[int(t[c])] for t, c in zip(samples.tokens, samples.center, strict=True))


def test_a_non_negative_unit_is_measured_as_before_and_a_signed_one_as_its_stronger_half(signed_analysis):
    """A non-negative unit has polarity +1 and is measured on a itself, whatever else its set holds: its
    row, dashboards, tokens and histogram are the same beside two-signed units (the set then takes the
    two-halves path) as beside non-negative ones, and its numbers are the direct ones. A unit read negated
    is measured exactly as the non-negative unit max(-a, 0) would be."""
    import pandas as pd

    r = signed_analysis
    units, ref = r.out["units"], r.ref["units"]
    assert list(units["polarity"]) == [1, -1, -1] and list(ref["polarity"]) == [1, 1, 1]
    assert ref["other_sign_share"].eq(0).all() and units.loc[0, "other_sign_share"] == 0
    cols = [c for c in units.columns if c not in ("polarity", "other_sign_share")]
    pd.testing.assert_frame_equal(units[cols], ref[cols], check_exact=True)
    for table in ("contexts", "top_tokens", "histograms"):
        assert len(r.out[table])
        pd.testing.assert_frame_equal(r.out[table], r.ref[table], check_exact=True)
    lg, lg_ref = r.out["logits"], r.ref["logits"]
    pd.testing.assert_frame_equal(lg[lg["unit"] == 0], lg_ref[lg_ref["unit"] == 0], check_exact=True)
    row = units.loc[0]
    assert row["density"] == pytest.approx(r.digit_share, rel=1e-9) and row["family"] == "digits"
    assert row["mean"] == pytest.approx(1.05 * r.digit_share, rel=0.05) and row["family_share"] > 0.99


@pytest.fixture(scope="module")
def scored_analysis(tok):
    """Units with known held-out scores: a perfect detector of the token " 42" (0), noise firing on 3% of
    tokens whatever they are (1), a digit unit (2), a unit firing too rarely held out to be scored (3), and
    one at 10 on the first position of every window and at 1 on digits elsewhere (4); analysed with the
    first position skipped (the default) and, for unit 4, not skipped."""
    model = TokenModel()
    digits = _digit_tokens(tok, model.config.vocab_size)
    (t42,), (t7,) = tok.encode(" 42"), tok.encode(" 7")

    def encode(h):
        t, noise, pos = h[:, 0].long(), h[:, 1], h[:, 2]
        detector = (t == t42).float()
        random_unit = torch.relu(noise - 0.97) * 30
        family = digits[t].float() * (1.0 + 0.1 * noise)
        rare = ((t == t7) & (noise > 0.9)).float()
        first = torch.where(pos == 0, 10.0, digits[t].float())
        return torch.stack([detector, random_unit, family, rare, first], 1)

    cfg = A.AnalysisConfig(explain_tokens=20_000, top_contexts=8, interval_samples=4, batch_windows=16,
                           min_firings=3)
    explain, val = _synthetic_text(tok, 400, 0), _synthetic_text(tok, 100, 1)
    out = A.analyze(model, tok, [A.UnitSet("topk", encode, torch.eye(4)[[0, 1, 0, 1, 3]])], explain, val, cfg,
                    progress=False, log=lambda s: None)
    unskipped = A.analyze(model, tok, [A.UnitSet("topk", lambda h: encode(h)[:, 4:], torch.eye(4)[3:])], explain,
                          val, cfg.replace(skip_first_positions=0), progress=False, log=lambda s: None)
    return SimpleNamespace(out=out, unskipped=unskipped, cfg=cfg, t42=t42, digits=digits,
                           units=out["units"].set_index("unit"))


def test_a_perfect_token_detector_simulates_and_detects_perfectly(scored_analysis):
    r = scored_analysis
    row = r.units.loc[0]
    assert row["scored"] and not row["too_rare"] and row["heldout_firings"] >= r.cfg.min_heldout_firings
    assert row["explanation"] == f"{r.t42}:1"  # the token table: " 42" at 1, nothing else
    assert row["sim_corr"] == pytest.approx(1.0) and row["explain_corr"] == pytest.approx(1.0)
    assert row["detection"] == 1.0 and row["detection_tpr"] == 1.0 and row["detection_tnr"] == 1.0


def test_a_noise_unit_scores_at_chance(scored_analysis):
    row = scored_analysis.units.loc[1]
    assert row["scored"] and row["heldout_firings"] > 100
    assert abs(row["sim_corr"]) < 0.15 and abs(row["explain_corr"]) < 0.15
    assert abs(row["detection"] - 0.5) < 0.15, row[["detection_tpr", "detection_tnr"]]
    assert row["family"] == "" or row["family_lift"] < 2


def test_a_family_unit_gets_its_family_and_scores_high(scored_analysis):
    row = scored_analysis.units.loc[2]
    assert row["family"] == "digits" and row["family_share"] > 0.99 and row["family_lift"] > 5
    assert row["sim_corr"] > 0.9 and row["detection"] > 0.95


def test_units_with_too_few_heldout_firings_are_counted_not_scored(scored_analysis):
    r = scored_analysis
    row = r.units.loc[3]
    assert 0 < row["heldout_firings"] < r.cfg.min_heldout_firings and row["too_rare"] and not row["scored"]
    assert np.isnan([row["sim_corr"], row["detection"], row["explain_corr"], row["family_share"]]).all()
    assert row["explanation"] == ""
    m = A.summary_metrics(r.out["units"], r.cfg)
    assert m["too_rare_features"] == 1 and m["scored_features"] == 4
    assert m["heldout_never_fired_fraction_features"] == 0.0  # all five fire on the held-out text
    silent = r.out["units"].copy()
    silent.loc[silent.unit == 3, "density_val"] = 0.0  # the rare unit, had it never fired there
    assert A.summary_metrics(silent, r.cfg)["heldout_never_fired_fraction_features"] == pytest.approx(1 / 5)
    assert m["detection_fraction_features"] == pytest.approx(3 / 4)  # detector, digits, first-position unit
    assert m["simulation_fraction_features"] == pytest.approx(3 / 4)
    assert all(v is None or np.isfinite(v) for v in m.values() if not isinstance(v, str))


def test_the_first_position_of_a_window_is_not_measured_but_reported(scored_analysis):
    r = scored_analysis
    row = r.units.loc[4]
    # skipped: the 10s at position 0 are not measured, the unit reads as the digit unit it is elsewhere
    assert row["max"] == pytest.approx(1.0) and row["first_pos_top_share"] == 1.0
    assert row["density"] == pytest.approx(r.units.loc[2, "density"])
    ctx = r.out["contexts"]
    top = ctx[(ctx.unit == 4) & (ctx.kind == "top")]
    assert len(top) and (top.activation == 1.0).all()
    for _, c in top.iterrows():
        assert r.digits[int(c.tokens[c.center])]
        if c.center < r.cfg.before:  # the context starts at the window's first position: shown as 0
            assert c.acts[0] == 0
    assert r.units.loc[2, "first_pos_top_share"] < 0.5  # a digit at position 0 is no outlier
    # not skipped: the first positions are its top activations
    plain = r.unskipped["units"].iloc[0]
    assert plain["max"] == pytest.approx(10.0) and plain["first_pos_top_share"] == 1.0
    ctx = r.unskipped["contexts"]
    assert (ctx[ctx.kind == "top"].center == 0).all()


def test_unit_orientation_keeps_non_negative_activations_as_they_are():
    a = torch.tensor([[0.0, 2.0, -1.0], [3.0, 0.0, 4.0]])
    plain = A.UnitSet("s", lambda h: h, torch.eye(3))
    assert plain.orient(a[:, :2]) is not None and torch.equal(plain.orient(a[:, :2]), a[:, :2])
    assert torch.equal(plain.orient(a), a.clamp_min(0))
    oriented = A.UnitSet("s", lambda h: h, torch.eye(3), polarity=torch.tensor([1.0, 1.0, -1.0]))
    assert torch.equal(oriented.activations(a), torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]))


def test_browser_says_which_units_are_read_negated(signed_analysis, tmp_path):
    import json

    from monosemantic import browser

    for name in A.TABLES:
        r = signed_analysis.out[name]
        r.to_parquet(tmp_path / f"{name}.parquet", index=False)
    art = SimpleNamespace(file=lambda name: tmp_path / name, stage="analysis", profile="test", name="signed",
                          content_hash="test", config={"intervals": 4})
    browser.write(art, tmp_path / "browser", sets=(("signed", "synthetic units"),), reuse=False)
    index = json.loads((tmp_path / "browser" / "index.js").read_text().split("=", 1)[1].rstrip(";\n"))
    assert index["units"]["signed"]["polarity"] == [1, -1, -1]
    shard = json.loads((tmp_path / "browser" / "signed-0.js").read_text().split(",", 1)[1].rsplit(")", 1)[0])
    assert shard["1"]["polarity"] == -1 and 0 < shard["1"]["other_sign_share"] < 0.2
    assert shard["2"]["top"] and all(x["a"] == 3.0 for x in shard["2"]["top"])
    # the explanation, read as tokens, and its held-out scores
    assert index["units"]["signed"]["sim"][1] > 0.9 and index["units"]["signed"]["det"][1] > 0.9
    assert shard["1"]["explanation"].startswith("'") and not shard["1"]["too_rare"]
    assert shard["1"]["sim"] > 0.9 and shard["1"]["heldout_firings"] > 50 and shard["1"]["first_pos"] is not None


def test_sparse_pool_merge_keeps_the_largest_per_column_like_a_dense_topk():
    g = torch.Generator().manual_seed(0)
    keys, index = torch.full((5, 7), -1.0), torch.zeros((5, 7), dtype=torch.int64)
    seen = []
    for step in range(6):
        a = torch.rand(40, 7, generator=g) * (torch.rand(40, 7, generator=g) < 0.3)
        seen.append(a)
        rows, cols = torch.nonzero((a > 0) & (a > keys[-1]), as_tuple=True)
        A.passes._pool_merge(keys, index, a[rows, cols], rows + 40 * step, cols)
    allv = torch.cat(seen)
    want_v, want_i = torch.topk(torch.where(allv > 0, allv, -1.0), 5, dim=0)
    torch.testing.assert_close(keys, want_v)
    assert torch.equal(torch.where(want_v > 0, index, 0), torch.where(want_v > 0, want_i, 0))


def test_token_tables_predict_the_mean_shown_activation_of_each_token():
    ex = E.fit_token_tables(2, [(0, np.array([5, 6, 5]), np.array([1.0, 0.0, 3.0])),
                                (1, np.array([7]), np.array([2.0]))], vocab=10)
    dense = ex.toarray()
    assert dense[5, 0] == 2.0 and dense[6, 0] == 0.0 and dense[7, 1] == 2.0 and dense.sum() == 4.0


def test_pearson_from_running_sums():
    a = torch.tensor([[0.0, 1, 2, 0, 5], [1, 1, 1, 1, 1], [3, 0, 1, 2, 0]]).double()
    p = torch.tensor([[0.0, 2, 3, 1, 4], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]).double()
    st = {"a": a.sum(1), "aa": (a * a).sum(1), "p": p.sum(1), "pp": (p * p).sum(1), "ap": (a * p).sum(1),
          "n": torch.tensor(5.0)}
    r = A.pearson(st)
    assert r[0] == pytest.approx(np.corrcoef(a[0], p[0])[0, 1])
    assert torch.isnan(r[1]) and r[2] == 0  # a unit that never varies; an explanation predicting nothing


def test_logit_effects_equal_a_direct_computation_through_the_model():
    from monosemantic.lm import LMConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(LMConfig(context_length=16, d_model=32, n_heads=4, d_mlp=64, vocab_size=500,
                                 dtype="float32", compile=False)).eval()
    with torch.no_grad():
        model.ln_final.weight.uniform_(0.5, 1.5)
        model.ln_final.bias.normal_()
        model.unembed.bias.normal_()
    d = torch.nn.functional.normalize(torch.randn(64), dim=0)
    effect = A.logit_effects(model, d[None])[0]
    with torch.no_grad():
        # write d into the hidden layer of an otherwise empty residual stream: the change in the logits is
        # the effect divided by the LayerNorm's scale (the standard deviation of what was written)
        delta = model.blocks[0].mlp.fc_out(d) - model.blocks[0].mlp.fc_out.bias  # (d_model,)
        delta = delta * 1e3  # large, so that the LayerNorm's epsilon is negligible
        change = model.unembed(model.ln_final(delta)) - model.unembed(model.ln_final(torch.zeros(32)))
        sigma = delta.std(unbiased=False)
    torch.testing.assert_close(change * sigma / 1e3, effect, rtol=1e-3, atol=1e-4)


def test_neurons_logit_effect_is_the_column_of_the_output_weights():
    from monosemantic.lm import LMConfig, Transformer

    model = Transformer(LMConfig(context_length=16, d_model=32, n_heads=4, d_mlp=64, vocab_size=500,
                                 dtype="float32", compile=False))
    eye = A.UnitSet.neurons(64).directions
    torch.testing.assert_close(A.logit_effects(model, eye)[3], A.logit_effects(model, eye[3:4])[0])


def test_split_table_finds_each_child_s_parent():
    g = torch.Generator().manual_seed(0)
    small = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    children = small.repeat_interleave(2, 0) + 0.05 * torch.randn(16, 16, generator=g)
    table = A.split_table({8: small, 16: children})
    assert list(table.parent) == [i // 2 for i in range(16)] and (table.cosine > 0.9).all()
    assert set(table.width) == {16} and set(table.parent_width) == {8}


def test_bad_config_and_too_little_text_are_one_line_errors():
    from monosemantic.config import ConfigError, UserError

    with pytest.raises(ConfigError, match="explain_tokens must be an integer > 0"):
        A.AnalysisConfig(explain_tokens=0)
    with pytest.raises(UserError, match="at least 128"):
        A.spread_windows(np.zeros(10, dtype=np.uint16), 128, 1000)


def test_browser_shows_characters_split_over_tokens_whole(tok):
    from monosemantic.browser import display_tokens

    for text in ("中文字符和日本語のテキスト", "مرحبا بالعالم", "plain ascii"):
        ids = tok.encode(text)
        shown = display_tokens(tok, ids)
        assert len(shown) == len(ids) and "".join(shown) == text and "\ufffd" not in "".join(shown)
    assert display_tokens(tok, [A.EOT_ID])[0] == "<|endoftext|>"
    # from an analysis's vocab table alone (any model's tables), the same text
    import pandas as pd

    from monosemantic.browser import VocabPieces

    ids = tok.encode("中文字符 and مرحبا") + [A.EOT_ID]
    used = sorted(set(ids))
    vocab = pd.DataFrame({"token": used, "text": tok.token_strings(used), "bytes": tok.token_bytes(used),
                          "special": [i == A.EOT_ID for i in used]})
    assert display_tokens(VocabPieces(vocab), ids) == display_tokens(tok, ids)


def test_the_browser_picture_shows_the_best_predicted_readable_feature_of_moderate_density():
    import pandas as pd

    from monosemantic.browser import figure_unit

    units = pd.DataFrame({
        "set": ["topk"] * 5 + ["neurons"],
        "unit": [0, 1, 2, 3, 4, 0],
        "scored": [True, True, True, False, True, True],
        "density_val": [0.005, 0.5, 0.002, 0.005, 0.003, 0.005],  # unit 1 too dense for the picture
        "sim_corr": [0.7, 0.99, 0.95, 0.99, 0.9, 0.999],  # unit 3 not scored; the neuron is not a feature
        "explanation": ["10:1.0", "11:1.0", "12:1.0 10:0.5", "13:1.0", "14:1.0", "15:1.0"],
    })
    assert figure_unit(units) == 2  # the best simulation score of the scored features at 0.1%-1% density
    top = pd.DataFrame({"set": "topk", "unit": [0, 2, 4], "rank": 0, "token": [10, 12, 14],
                        "share": [0.9, 0.9, 0.8]})
    text = {10: " the", 12: "<0xE5>", 14: " Webster"}
    assert figure_unit(units, top, text) == 4  # unit 2's top token is a byte fragment
    top.loc[top.unit == 4, "share"] = 0.3  # most of unit 4's activation is elsewhere: unit 0 is left
    assert figure_unit(units, top, text) == 0


def test_half_neurons_keep_the_k_largest_signed_values_of_each_token():
    h = torch.tensor([[3.0, -5.0, 1.0], [-1.0, 0.5, -0.2]])
    u = A.UnitSet.neuron_topk("half", 3, k=2)
    a = u.encode(h)
    # units 0..2 are +h, 3..5 are -h: row 0 keeps -h_1 = 5 and h_0 = 3; row 1 keeps -h_0 = 1 and h_1 = 0.5
    assert a.tolist() == [[3.0, 0.0, 0.0, 0.0, 5.0, 0.0], [0.0, 0.5, 0.0, 1.0, 0.0, 0.0]]
    assert torch.equal(u.directions, torch.cat([torch.eye(3), -torch.eye(3)]))
    rows, units, values = u.sparse_encode(h)
    dense = torch.zeros(2, 6)
    dense[rows, units] = values
    assert torch.equal(dense, a) and u.n_units == 6

