"""The causal test's pieces with known answers: the clamp and ablation edits, reading an edit from cached
positions (exactly what the full forward pass gives), the shift it causes, the controls, the family masks of
the vocabulary, what a feature's firings predict and the choice of features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from monosemantic.analysis import FAMILY_NAMES
from monosemantic.causal import (
    RESID,
    CausalConfig,
    cache_positions,
    pick,
    predicted,
    scan,
    vocab_family_masks,
)
from monosemantic.causal_edits import (
    Shift,
    coefficients,
    edit_hook,
    edit_logits,
    fast_shift,
    random_directions,
    rank_first,
    readout,
    shift,
    token_sets,
    writes,
)
from monosemantic.config import ConfigError, UserError
from monosemantic.harvest import HOOK, sequential_windows
from monosemantic.lm import LMConfig, Transformer
from monosemantic.sae import SAE, SAEConfig

D, N = 16, 32


def tiny_sae() -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=D, n_features=N, b_dec_init="zeros"))
    with torch.no_grad():
        sae.b_dec.zero_()
    return sae


def test_clamp_moves_h_along_the_feature_direction_by_the_missing_amount():
    sae = tiny_sae()
    h = torch.rand(2, 3, D)  # (B, T, d_in)
    f = sae.encode(h.reshape(-1, D))[:, 5]
    out = edit_hook(sae, 5, "clamp", value=4.0)(h, HOOK)
    expected = h.reshape(-1, D) + (4.0 - f)[:, None] * sae.W_dec[5]
    assert torch.allclose(out.reshape(-1, D), expected, atol=1e-6)
    assert out.shape == h.shape
    skipped = edit_hook(sae, 5, "clamp", value=4.0, skip_first=True)(h, HOOK)  # a prompt's separator left alone
    assert torch.equal(skipped[:, 0], h[:, 0]) and torch.allclose(skipped[:, 1:], out[:, 1:])


def test_ablation_touches_only_positions_where_the_feature_fires():
    sae = tiny_sae()
    h = torch.rand(4, 5, D)
    f = sae.encode(h.reshape(-1, D))[:, 3]
    out = edit_hook(sae, 3, "ablate")(h, HOOK).reshape(-1, D)
    silent = f == 0
    assert torch.equal(out[silent], h.reshape(-1, D)[silent])
    assert torch.allclose(out[~silent], (h.reshape(-1, D) - f[:, None] * sae.W_dec[3])[~silent], atol=1e-6)


def test_the_random_control_uses_the_same_coefficients_along_another_direction():
    sae = tiny_sae()
    r = random_directions(D, 3, seed=1)
    assert r.shape == (3, D) and torch.allclose(r.norm(dim=1), torch.ones(3))
    assert torch.equal(r, random_directions(D, 3, seed=1)) and not torch.equal(r, random_directions(D, 3, seed=2))
    h = torch.rand(1, 4, D)
    f = sae.encode(h.reshape(-1, D))[:, 7]
    out = edit_hook(sae, 7, "clamp", direction=r[0], value=2.0)(h, HOOK).reshape(-1, D)
    assert torch.allclose(out - h.reshape(-1, D), (2.0 - f)[:, None] * r[0], atol=1e-6)


def tiny_lm_and_windows():
    """A random 64-token LM (d_mlp = D) and 4 windows of 8 random tokens, 2 per batch."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, context_length=8, d_model=16, n_heads=2, d_mlp=D, compile=False, dtype="float32")
    toks = np.random.default_rng(0).integers(0, 64, 8 * 4 + 1).astype(np.uint16)
    return Transformer(cfg).eval(), sequential_windows(toks, 8, 4, batch=2)


def test_vocabulary_tokens_get_the_families_their_detectors_give_them():
    masks = vocab_family_masks([b"123", b" The", b"{", b"\xd0\xbf"])  # 'п' is Cyrillic
    col = {f: j for j, f in enumerate(FAMILY_NAMES)}
    assert masks[0, col["digits"]] and masks[1, col["capitalised"]] and masks[2, col["code-brace"]]
    assert masks[3, col["cyrillic"]] and not masks[0, col["cyrillic"]]


@pytest.mark.parametrize("bad", [{"n_random": 0}, {"clamp_multiple": 0.0}, {"positions": True},
                                 {"dose_multiples": (1.0, -2.0)}, {"n_random": 3, "dose_random": 4},
                                 {"scan_windows": -1}, {"n_random": 2, "sample_random": 3},
                                 {"predicted_tokens": 2, "min_predicted_tokens": 3}])
def test_bad_config_is_one_line(bad):
    with pytest.raises(ConfigError):
        CausalConfig(**bad)


def test_an_unknown_mode_is_refused():
    with pytest.raises(UserError, match="clamp"):
        edit_hook(tiny_sae(), 0, "steer")


def test_pinning_replaces_h_by_the_reconstruction_with_the_feature_set():
    # the anchor's generate_with_pinned_features: the error term is dropped, the feature's latent set to the value
    sae = tiny_sae()
    h = torch.rand(2, 3, D)
    f = sae.encode(h.reshape(-1, D))
    f[:, 4] = 100.0
    out = edit_hook(sae, 4, "pin", value=100.0)(h, HOOK)
    assert torch.allclose(out.reshape(-1, D), f @ sae.W_dec + sae.b_dec, atol=1e-5)
    plain = edit_hook(sae, None, "pin")(h, HOOK).reshape(-1, D)  # no feature: the reconstruction itself
    assert torch.allclose(plain, sae.decode(sae.encode(h.reshape(-1, D))), atol=1e-6)


def test_a_push_is_the_norm_of_the_mlp_output_change():
    model = Transformer(LMConfig(vocab_size=50, context_length=8, d_model=4, n_heads=1, d_mlp=D, compile=False,
                                 dtype="float32"))
    with torch.no_grad():
        model.blocks[0].mlp.fc_out.weight.zero_()
        model.blocks[0].mlp.fc_out.weight[0, 0] = 3.0  # hidden unit 0 writes 3x into output 0; the rest nothing
    v = torch.zeros(2, D)
    v[0, 0], v[1, 1] = 1.0, 1.0  # two unit vectors, equal in the hidden layer
    assert writes(model, v).norm(dim=1).tolist() == pytest.approx([3.0, 0.0])


def test_the_feature_ranks_among_random_directions_by_the_way_its_edit_should_go():
    kl = np.array([0.5, 0.1, 0.7, 0.2])  # the feature first, then three random directions
    dmass = np.array([0.02, 0.03, -0.01, 0.0])
    # clamped: one random direction moves the distribution further (0.7) and one raises the mass more (0.03)
    assert (rank_first(kl, 1.0), rank_first(dmass, 1.0)) == (2, 2)
    # ablated, the mass should fall: the feature raises it (+0.02), and two random directions (-0.01, 0.0) do
    # better the way it should go, one (+0.03) worse: third of four
    assert (rank_first(kl, 1.0), rank_first(dmass, -1.0)) == (2, 3)
    assert (rank_first(np.array([9.0, 1.0, 2.0]), 1.0), rank_first(np.array([-5.0, 0.0, 1.0]), -1.0)) == (1, 1)


def test_an_edit_read_from_cached_positions_is_the_full_forward_pass_with_the_edit_hooked_in():
    # one layer, the MLP after the attention: an edit at every position changes each position's output as
    # an edit there alone does, so the cached residual stream and the last LayerNorm and unembedding suffice
    model, windows = tiny_lm_and_windows()
    sae = tiny_sae()
    x = torch.cat([w for w, _ in windows])  # (4, 8)
    pos = np.array([[0, 1], [0, 7], [2, 3], [3, 0], [3, 5]])
    docs = np.array(["a", "a", "b", "c"])
    at = cache_positions(model, HOOK, x, pos, docs, batch=3)
    full = F.log_softmax(model(x).logits[..., :60].float(), -1)
    unedited = F.log_softmax(edit_logits(model, at.resid, torch.zeros(16), torch.zeros(len(pos)), 60), -1)
    assert torch.allclose(unedited, full[pos[:, 0], pos[:, 1]], atol=1e-5)
    assert list(at.docs) == ["a", "a", "b", "c", "c"]
    for mode, direction in (("clamp", None), ("ablate", None), ("clamp", random_directions(D, 1, seed=4)[0] * 3)):
        d = sae.W_dec[6] if direction is None else direction
        with model.hooks({HOOK: edit_hook(sae, 6, mode, direction, value=7.0)}):
            edited = F.log_softmax(model(x).logits[..., :60].float(), -1)[pos[:, 0], pos[:, 1]]
        coeff = coefficients(sae.encode(at.h)[:, 6], mode, 7.0)
        fast = F.log_softmax(edit_logits(model, at.resid, writes(model, d[None])[0], coeff, 60), -1)
        assert torch.allclose(fast, edited, atol=1e-5), mode
    assert RESID in model.hook_points


def test_a_shift_measures_kl_mass_and_log_odds_on_each_token_set():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    logq = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    sets = token_sets(3, torch.tensor([True, False, False]), torch.tensor([2]))  # {0} as a mask, {2} as ids
    assert sets.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    s = shift(logp, logq, sets)
    assert s.kl.item() == pytest.approx(0.5 * np.log(2) + 0.25 * np.log(0.5))
    assert s.dmass.tolist() == [[pytest.approx(-0.25), pytest.approx(0.25)]]
    assert s.mass.tolist() == [[pytest.approx(0.5), pytest.approx(0.25)]]
    # log-odds: 0.5 -> 0.25 is log(1/3) - 0; 0.25 -> 0.5 the reverse
    assert s.dlogodds.tolist() == [[pytest.approx(np.log(1 / 3)), pytest.approx(-np.log(1 / 3))]]
    none = shift(logp, logp, sets)
    assert torch.equal(none.dmass, torch.zeros(1, 2)) and none.kl.abs().item() < 1e-7


def test_rank_first_counts_the_controls_at_least_as_good_the_way_the_edit_should_go():
    assert rank_first(np.array([0.3, 0.1, 0.3, 0.5]), 1.0) == 3  # a tie counts against the feature
    assert rank_first(np.array([-0.3, 0.1, -0.2]), -1.0) == 1  # down: the lowest wins


def test_the_predicted_tokens_are_those_that_follow_a_firing_more_than_any_position():
    after = np.array([0, 6, 3, 1, 0])  # next tokens after the feature fires
    overall = np.array([50, 10, 20, 20, 0])  # after every position
    # excess: token 1 0.6 - 0.1, token 2 0.3 - 0.2, token 3 0.1 - 0.2 (below), token 0 0 - 0.5
    assert predicted(after, overall, 5).tolist() == [1, 2]
    assert predicted(after, overall, 1).tolist() == [1]
    assert predicted(np.zeros(5, int), overall, 3).tolist() == []


def test_pick_draws_per_family_from_the_qualifying_features_only():
    units = pd.DataFrame({
        "unit": range(8), "scored": [True] * 7 + [False],
        "density_val": [1e-3, 1e-3, 1e-6, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3],
        "family": ["digits"] * 5 + ["url"] * 3, "family_share": [0.6, 0.9, 0.99, 0.3, 0.8, 0.7, 0.9, 0.95],
        "family_lift": [10, 20, 30, 8, 2, 8, 9, 9]})
    cfg = CausalConfig(per_family=2, min_heldout_firings=50, min_family_tokens=10)
    chosen = pick(units, ["digits", "url", "latex"], {"digits": 100, "url": 50, "latex": 0}, cfg, 500_000, 0.5, 5)
    # digits: 2 fires 0.5 times held out, 3 is not specific (share 0.3), 4 has a lift of 2: 0 and 1 remain;
    # url: 7 is not scored, so 5 and 6; latex has no vocabulary tokens
    assert [int(r["unit"]) for r in chosen] == [0, 1, 5, 6]
    one = pick(units, ["digits"], {"digits": 100}, cfg.replace(per_family=1), 500_000, 0.5, 5)
    assert len(one) == 1 and int(one[0]["unit"]) in (0, 1)
    assert [int(r["unit"]) for r in pick(units, ["digits"], {"digits": 100}, cfg.replace(per_family=1), 500_000,
                                         0.5, 5)] == [int(one[0]["unit"])]  # seeded
    capped = pick(units, ["digits", "url"], {"digits": 100, "url": 50}, cfg.replace(n_features=3), 500_000, 0.5, 5)
    assert len(capped) == 3 and {int(r["unit"]) for r in capped} <= {0, 1, 5, 6}


def test_the_scan_counts_next_tokens_on_one_half_and_firings_on_the_other():
    model, windows = tiny_lm_and_windows()
    sae = tiny_sae()
    x = torch.cat([w for w, _ in windows])
    y = torch.cat([t for _, t in windows])
    explore = np.array([True, False, True, False])
    found = scan(model, sae, HOOK, x, y, np.arange(4), explore, [3, 9], batch=3, vocab=64)
    z = sae.encode(model.run_with_cache(x, [HOOK])[HOOK].reshape(-1, D)).reshape(4, 8, -1)[:, 1:]  # no first position
    for j, f in enumerate((3, 9)):
        on = (z[..., f] > 0).numpy()
        want = np.bincount(y[:, 1:].numpy()[explore][on[explore]], minlength=64)
        assert np.array_equal(found.next_counts[j], want)
        rows, t = np.nonzero(on & ~explore[:, None])
        assert np.array_equal(found.firings[j], np.stack([rows, t + 1], 1))
    assert found.all_counts.sum() == 2 * 7 and len(found.positions) == 2 * 7
    assert set(found.positions[:, 0]) == {1, 3} and found.positions[:, 1].min() == 1
    # the mean hidden activation where each feature fires and everywhere, on the explore half
    h = model.run_with_cache(x, [HOOK])[HOOK][:, 1:][torch.as_tensor(explore)].reshape(-1, D)
    assert np.allclose(found.h_all, h.mean(0).numpy(), atol=1e-5)
    for j, f in enumerate((3, 9)):
        on = z[torch.as_tensor(explore)][..., f].reshape(-1) > 0
        if on.any():
            assert np.allclose(found.h_firing[j], h[on].mean(0).numpy(), atol=1e-5)
        else:
            assert np.isnan(found.h_firing[j]).all()
    # extra features: their next tokens counted after the tested ones', nothing else about them kept
    more = scan(model, sae, HOOK, x, y, np.arange(4), explore, [3], batch=2, vocab=64, extra=[9, 3])
    assert np.array_equal(more.next_counts, found.next_counts[[0, 1, 0]]) and len(more.firings) == 1
    # neurons: their next tokens counted last, where the MLP activation is above 0
    with_neurons = scan(model, sae, HOOK, x, y, np.arange(4), explore, [3], batch=2, vocab=64, extra=[9],
                        neurons=[0, 5])
    hx = model.run_with_cache(x, [HOOK])[HOOK][:, 1:]
    for j, u in enumerate((0, 5)):
        on = (hx[..., u] > 0).numpy()
        want = np.bincount(y[:, 1:].numpy()[explore][on[explore]], minlength=64)
        assert np.array_equal(with_neurons.next_counts[2 + j], want)
    assert np.array_equal(with_neurons.next_counts[:2], found.next_counts[:2])


def test_the_fast_read_out_gives_what_the_logits_give():
    # the LayerNorm and unembedding rearranged so that an edit needs no product over the vocabulary; the final
    # LayerNorm's gain and bias made non-trivial, so that both enter the rearrangement
    model, windows = tiny_lm_and_windows()
    with torch.no_grad():
        model.ln_final.weight.uniform_(0.5, 2.0)
        model.ln_final.bias.normal_(0, 0.5)
    x = torch.cat([w for w, _ in windows])
    pos = np.array([[0, 1], [1, 4], [2, 7], [3, 3]])
    at = cache_positions(model, HOOK, x, pos, np.array(["a", "b", "c", "d"]), batch=4)
    ro = readout(model, at.resid, 60)
    logp = F.log_softmax(model(x).logits[..., :60].float(), -1)[pos[:, 0], pos[:, 1]]
    assert torch.allclose(ro.p.log(), logp, atol=1e-5)
    sets = [torch.tensor([0, 5, 9]), torch.arange(20, 40), torch.tensor([59])]
    for push, coeff in ((torch.randn(16), torch.randn(4) * 3), (torch.zeros(16), torch.ones(4)),
                        (torch.randn(16) * 10, torch.tensor([0.0, -2.0, 5.0, 1.0]))):
        want = shift(logp, F.log_softmax(edit_logits(model, at.resid, push, coeff, 60), -1),
                     token_sets(60, *sets))
        got = fast_shift(ro, push, coeff, sets)
        for k in Shift._fields:
            assert torch.allclose(getattr(got, k), getattr(want, k), atol=1e-5), k



def test_a_control_rescaled_to_the_features_kl_moves_the_distribution_as_far():
    from monosemantic.causal import kl_matched_scale

    model, windows = tiny_lm_and_windows()
    x = torch.cat([w for w, _ in windows])
    pos = np.array([[0, 1], [1, 4], [2, 7], [3, 3]])
    ro = readout(model, cache_positions(model, HOOK, x, pos, np.array(["a", "b", "c", "d"]), batch=4).resid, 60)
    coeff = torch.tensor([1.0, 2.0, 0.5, 1.5])
    push_f, push = torch.randn(16), torch.randn(16) * 0.3

    @torch.no_grad()
    def kl(p):
        return float(fast_shift(ro, p, coeff, [torch.tensor([0])]).kl.mean())

    s = kl_matched_scale(ro, push_f, push, coeff)
    assert kl(push * s) == pytest.approx(kl(push_f), rel=1e-4)
    assert kl_matched_scale(ro, push_f, push_f, coeff) == pytest.approx(1.0, rel=1e-4)  # itself: no change
    assert kl_matched_scale(ro, push_f, push_f * 1e-6, coeff) == pytest.approx(64.0)  # out of reach: the range's end


def test_a_frozen_scale_read_out_keeps_the_unedited_layernorm_scale():
    model, windows = tiny_lm_and_windows()
    x = torch.cat([w for w, _ in windows])
    pos = np.array([[0, 2], [1, 5], [3, 6]])
    at = cache_positions(model, HOOK, x, pos, np.array(["a", "b", "c", "d"]), batch=4)
    ro = readout(model, at.resid, 64)
    push, coeff = torch.randn(16) * 3, torch.tensor([1.0, -2.0, 0.5])
    ln, r = model.ln_final, at.resid
    scale = (r.var(-1, unbiased=False) + ln.eps).rsqrt()[:, None]  # the unedited positions' scale
    moved = r + coeff[:, None] * push
    z = ((moved - moved.mean(-1, keepdim=True)) * scale * ln.weight + ln.bias) @ model.unembed.weight[:64].t()
    want = shift(ro.p.log(), F.log_softmax(z + model.unembed.bias[:64], -1), token_sets(64, torch.tensor([1, 2])))
    got = fast_shift(ro, push, coeff, [torch.tensor([1, 2])], frozen=True)
    for k in Shift._fields:
        assert torch.allclose(getattr(got, k), getattr(want, k), atol=1e-5), k
    assert not torch.allclose(fast_shift(ro, push, coeff, [torch.tensor([1, 2])]).kl, got.kl)


def test_summaries_leave_an_empty_token_set_undefined_and_ranks_skip_it():
    from monosemantic.causal import MEASURES, _ranks, _summaries

    n = len(MEASURES)
    shifts = [Shift(torch.tensor([0.1, 0.3]).double(), torch.full((2, n), d).double(), torch.full((2, n), d).double(),
                    torch.zeros(2, n).double()) for d in (1.0, 0.5, 2.0, -1.0)]
    full, empty = torch.tensor([1]), torch.zeros(0, dtype=torch.long)
    sets = [[full] * n, [full] * n, [full, full, full, empty], [full] * n]  # the third has no "self" tokens
    sm = _summaries(shifts, sets)
    assert np.isnan(sm["self_logodds"][2]) and sm["self_logodds"][[0, 1, 3]].tolist() == [1.0, 0.5, -1.0]
    r = _ranks(sm, [0, 1, 2, 3], "clamp", "_dec", MEASURES)
    assert r["self_rank_dec"] == 1 and r["family_rank_dec"] == 2  # the third beats the feature where defined
    sets[0] = [full, full, full, empty]  # the feature's own set empty: its rank is undefined (0)
    assert _ranks(_summaries(shifts, sets), [0, 1, 2, 3], "clamp", "_dec", MEASURES)["self_rank_dec"] == 0


def test_the_best_neuron_is_the_most_specific_scored_one_of_the_family():
    from monosemantic.causal import best_neuron

    neurons = pd.DataFrame({"unit": [0, 1, 2, 3], "scored": [True, True, False, True],
                            "family": ["digits", "digits", "digits", "url"],
                            "family_share": [0.4, 0.6, 0.9, 0.99], "density_val": [0.1, 0.01, 0.1, 0.1]})
    assert int(best_neuron(neurons, "digits")["unit"]) == 1  # unit 2 is not scored, unit 3 is another family
    assert best_neuron(neurons, "cjk") is None


def test_a_token_that_begins_a_character_belongs_to_its_script_where_its_bytes_fix_it():
    from monosemantic.analysis import partial_character_families

    arabic, cjk, greek = "\u0627".encode(), "\u3042".encode(), "\u03b1".encode()  # ا, あ, α
    assert partial_character_families(arabic[:1]) == ["arabic"]  # 0xD8: U+0600..U+063F, all Arabic
    assert partial_character_families(b"x" + cjk[:2]) == ["cjk"]  # 0xE3 0x81: U+3040..U+307F
    assert partial_character_families(greek[:1]) == ["greek"]  # 0xCE: U+0380..U+03BF
    assert partial_character_families("\u4e00".encode()[:1]) == []  # 0xE4: U+4000..U+4FFF straddles CJK blocks
    assert partial_character_families(arabic) == []  # a whole character: token_families' business
    assert partial_character_families(arabic[1:]) == []  # a continuation byte alone says nothing
    assert partial_character_families(b"ab") == []
    masks = vocab_family_masks([arabic[:1], b" the", arabic])
    plain = vocab_family_masks([arabic[:1], b" the", arabic], byte_aware=False)
    j = FAMILY_NAMES.index("arabic")
    assert masks[:, j].tolist() == [True, False, True] and plain[:, j].tolist() == [False, False, True]


def test_self_logodds_reads_the_feature_and_each_fitted_control_at_its_own_position():
    from monosemantic.causal import self_logodds

    summary = {"self_logodds": np.array([0.5, np.nan, 2.0, -1.0])}
    special_at = {"best_neuron": 2, "mean_difference": 3}
    assert self_logodds(summary, "feature", special_at) == 0.5
    assert self_logodds(summary, "best_neuron", special_at) == 2.0  # the neuron on its own predicted tokens
    assert self_logodds(summary, "mean_difference", special_at) == -1.0
    assert np.isnan(self_logodds(summary, "random", special_at))
