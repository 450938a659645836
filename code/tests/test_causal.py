"""The causal test's pieces with known answers: the clamp and ablation edits, the shift they cause, the
random control's directions, the family masks of the vocabulary and the choice of features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from monosemantic.analysis import FAMILY_NAMES
from monosemantic.causal import (
    CausalConfig,
    distribution_shift,
    distribution_shifts,
    edit_hook,
    output_push,
    pick,
    random_directions,
    rank_among,
    vocab_family_masks,
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


def test_no_edit_shifts_nothing_and_a_big_push_shifts_a_lot():
    model, windows = tiny_lm_and_windows()
    mask = torch.zeros(60, dtype=torch.bool)  # shorter than the vocabulary: padded with zeros
    mask[:8] = True
    none = distribution_shift(model, HOOK, windows, lambda h, name: h, mask)
    assert np.allclose(none["kl"], 0, atol=1e-6) and np.allclose(none["dmass"], 0, atol=1e-6)
    assert none["tokens"].tolist() == [8.0] * 4
    push = distribution_shift(model, HOOK, windows, lambda h, name: h + 50.0, mask)
    assert (push["kl"] > 1e-3).all()
    # two masks at once give what each gives alone; a mask and its complement over the whole vocabulary
    # hold all the probability, so their changes cancel
    full = F.pad(mask, (0, 64 - 60))
    two = distribution_shift(model, HOOK, windows, lambda h, name: h + 50.0, torch.stack([full, ~full], dim=1))
    comp = distribution_shift(model, HOOK, windows, lambda h, name: h + 50.0, ~full)
    assert np.allclose(two["dmass"], push["dmass"], atol=1e-6) and np.allclose(two["kl"], push["kl"], atol=1e-6)
    assert np.allclose(two["dmass2"], comp["dmass"], atol=1e-6)
    assert np.allclose(two["dmass"] + two["dmass2"], 0, atol=1e-5)  # the mass moves from one to the other


def test_vocabulary_tokens_get_the_families_their_detectors_give_them():
    masks = vocab_family_masks([b"123", b" The", b"{", b"\xd0\xbf"])  # 'п' is Cyrillic
    col = {f: j for j, f in enumerate(FAMILY_NAMES)}
    assert masks[0, col["digits"]] and masks[1, col["capitalised"]] and masks[2, col["code-brace"]]
    assert masks[3, col["cyrillic"]] and not masks[0, col["cyrillic"]]


def test_pick_takes_the_most_specific_qualifying_feature_of_each_family():
    units = pd.DataFrame({
        "unit": [0, 1, 2, 3, 4], "scored": [True, True, True, True, False],
        "density_val": [1e-3, 1e-3, 1e-6, 1e-3, 1e-3], "family": ["digits", "digits", "digits", "url", "url"],
        "family_share": [0.6, 0.9, 0.99, 0.7, 0.95], "family_lift": [10, 20, 30, 8, 9]})
    cfg = CausalConfig(n_features=5, min_heldout_firings=50, min_family_tokens=10)
    chosen = pick(units, ["digits", "url", "latex"], {"digits": 100, "url": 50, "latex": 0}, cfg, 500_000)
    # unit 2 fires 0.5 times held out (too rare), unit 4 is not scored, latex has no vocabulary tokens
    assert [int(r["unit"]) for r in chosen] == [1, 3]
    # features that tie on the share (within a point): the one that fires most held out, whatever the order
    ties = pd.DataFrame({"unit": [7, 8, 9], "scored": True, "density_val": [1e-3, 5e-3, 2e-3],
                         "family": "digits", "family_share": [1.0, 0.995, 0.97], "family_lift": 20})
    assert [int(r["unit"]) for r in pick(ties, ["digits"], {"digits": 100}, cfg, 500_000)] == [8]


@pytest.mark.parametrize("bad", [{"n_random": 0}, {"clamp_multiple": 0.0}, {"eval_windows": True},
                                 {"dose_multiples": (1.0, -2.0)}, {"n_random": 3, "dose_random": 4}])
def test_bad_config_is_one_line(bad):
    with pytest.raises(ConfigError):
        CausalConfig(**bad)


def test_an_unknown_mode_is_refused():
    with pytest.raises(UserError, match="clamp"):
        edit_hook(tiny_sae(), 0, "pin")


def test_firing_counts_count_positions_per_window():
    from monosemantic.causal import firing_counts

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, context_length=8, d_model=16, n_heads=2, d_mlp=D, compile=False, dtype="float32")
    model, sae = Transformer(cfg).eval(), tiny_sae()
    x = torch.randint(0, 64, (5, 8))
    counts = firing_counts(model, sae, HOOK, x, [3, 9], batch=2)
    h = model.run_with_cache(x, [HOOK])[HOOK]
    z = sae.encode(h.reshape(-1, D))
    expected = (z[:, [3, 9]] > 0).reshape(5, 8, 2).sum(1).numpy()
    assert counts.shape == (5, 2) and np.array_equal(counts, expected)


def test_output_push_is_the_norm_of_the_mlp_output_change():
    model = Transformer(LMConfig(vocab_size=50, context_length=8, d_model=4, n_heads=1, d_mlp=D, compile=False,
                                 dtype="float32"))
    with torch.no_grad():
        model.blocks[0].mlp.fc_out.weight.zero_()
        model.blocks[0].mlp.fc_out.weight[0, 0] = 3.0  # hidden unit 0 writes 3x into output 0; the rest nothing
    v = torch.zeros(2, D)
    v[0, 0], v[1, 1] = 1.0, 1.0  # two unit vectors, equal in the hidden layer
    assert output_push(model, v).tolist() == pytest.approx([3.0, 0.0])


def test_the_feature_ranks_among_random_directions_by_the_way_its_edit_should_go():
    kl = np.array([0.5, 0.1, 0.7, 0.2])  # the feature first, then three random directions
    dmass = np.array([0.02, 0.03, -0.01, 0.0])
    # clamped: one random direction moves the distribution further (0.7) and one raises the mass more (0.03)
    assert rank_among(kl, dmass, "clamp") == {"kl_rank": 2, "dmass_rank": 2}
    # ablated, the mass should fall: the feature raises it (+0.02), and two random directions (-0.01, 0.0) do
    # better the way it should go, one (+0.03) worse: third of four
    assert rank_among(kl, dmass, "ablate") == {"kl_rank": 2, "dmass_rank": 3}
    assert rank_among(np.array([9.0, 1.0, 2.0]), np.array([-5.0, 0.0, 1.0]), "ablate") == {"kl_rank": 1,
                                                                                          "dmass_rank": 1}


def test_each_edit_is_also_measured_on_its_own_tokens():
    model, windows = tiny_lm_and_windows()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:8] = True
    push = lambda h, name: h + 50.0  # noqa: E731
    # an edit's own tokens give what the same tokens as a family mask give, edit by edit
    own = [torch.arange(8), torch.arange(8, 20)]
    got = distribution_shifts(model, HOOK, windows, [push, push], mask, own_tokens=own)
    other = torch.zeros(64, dtype=torch.bool)
    other[8:20] = True
    want = distribution_shifts(model, HOOK, windows, [push], torch.stack([mask, other], dim=1))[0]
    assert np.allclose(got[0]["dmass_own"], want["dmass"], atol=1e-6)
    assert np.allclose(got[1]["dmass_own"], want["dmass2"], atol=1e-6)
    assert np.allclose(got[1]["mass_own"], want["mass2"], atol=1e-6)
    with pytest.raises(UserError, match="2 edits"):
        distribution_shifts(model, HOOK, windows, [push, push], mask, own_tokens=own[:1])
