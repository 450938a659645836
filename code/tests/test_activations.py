"""The activations API on our one-layer model: known positions, token strings, offsets, clear errors."""

from __future__ import annotations

import pytest
import torch

from monosemantic.activations import ActivationError, ActivationSource, get_activations, get_text_activations
from monosemantic.lm import LMConfig, Transformer

TEXT = "The cat sat on the mat"  # GPT-2: 'The' ' cat' ' sat' ' on' ' the' ' mat'


@pytest.fixture(scope="module")
def source() -> Transformer:
    from monosemantic import tokenizer

    torch.manual_seed(0)
    cfg = LMConfig(context_length=32, d_model=32, n_heads=4, d_mlp=64, dtype="float32", compile=False)
    model = Transformer(cfg).eval()
    model.tokenizer = tokenizer.load()
    return model


def test_it_is_an_activation_source(source):
    assert isinstance(source, ActivationSource)
    assert source.default_hook == "blocks.0.mlp.hook_post" and source.default_hook in source.hook_names
    assert source.context_length == 32


def test_a_token_by_string_position_and_character_offset(source):
    by_token = get_activations(source, TEXT, token=" mat")
    assert (by_token.position, by_token.token, by_token.hook) == (5, " mat", "blocks.0.mlp.hook_post")
    assert by_token.tokens == ["The", " cat", " sat", " on", " the", " mat"]
    assert by_token.values.shape == (64,) and by_token.values.dtype == torch.float32
    assert (by_token.values >= 0).all()  # after the ReLU
    by_position = get_activations(source, TEXT, position=-1)
    by_char = get_activations(source, TEXT, char=TEXT.index("mat"))
    assert by_position.position == by_char.position == 5
    assert torch.equal(by_token.values, by_position.values) and torch.equal(by_token.values, by_char.values)
    # the same numbers the model's own cache gives
    ids = torch.tensor([source.encode(TEXT)])
    expected = source.run_with_cache(ids, ["blocks.0.mlp.hook_post"])["blocks.0.mlp.hook_post"][0, 5]
    torch.testing.assert_close(by_token.values, expected)
    # "the" and " the": the second occurrence, leading space optional
    assert get_activations(source, TEXT, token="the").position == 4
    resid = get_activations(source, TEXT, token=" cat", hook="blocks.0.hook_resid_post")
    assert resid.values.shape == (32,)


def test_batched_text_activations_equal_one_text_at_a_time(source):
    texts = [TEXT, "Hello world, this is a longer sentence with more tokens."]
    batched = get_text_activations(source, texts)
    for text, acts in zip(texts, batched, strict=True):
        alone = get_text_activations(source, text)[0]
        assert acts.tokens == alone.tokens
        torch.testing.assert_close(acts.values, alone.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(position=6), "out of range"),
    (dict(position=-7), "out of range"),
    (dict(token=" dog"), "not in the text"),
    (dict(char=100), "out of range"),
    (dict(), "exactly one"),
    (dict(position=1, token=" mat"), "exactly one"),
    (dict(token=" mat", hook="blocks.0.mlp.hook_nope"), "unknown hook point"),
])
def test_clear_errors_for_bad_requests(source, kwargs, message):
    with pytest.raises(ActivationError, match=message):
        get_activations(source, TEXT, **kwargs)


def test_clear_errors_for_empty_and_too_long_text(source):
    with pytest.raises(ActivationError, match="empty"):
        get_activations(source, "   ", position=0)
    with pytest.raises(ActivationError, match="longer than the model's context of 32"):
        get_activations(source, "word " * 40, position=0)


@pytest.fixture(scope="module")
def sae():
    from monosemantic.sae import SAE, SAEConfig

    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=64, n_features=16, b_dec_init="zeros"))


def test_feature_ids_may_be_numpy_integers(source, sae):
    import numpy as np

    from monosemantic.activations import feature_activations

    a = feature_activations(source, sae, TEXT, np.int64(7))
    b = feature_activations(source, sae, TEXT, 7)
    assert a.values.shape == (6, 1) and torch.equal(a.values, b.values)
    assert get_activations(source, TEXT, position=np.int32(-1)).position == 5


@pytest.mark.parametrize("call, message", [
    (lambda s, sae: __import__("monosemantic.activations").activations.feature_activations(s, sae, 42),
     "text must be a string, got int"),
    (lambda s, sae: __import__("monosemantic.activations").activations.feature_activations(s, sae, TEXT, True),
     "feature must be an integer, got True"),
    (lambda s, sae: __import__("monosemantic.activations").activations.feature_activations(s, sae, TEXT, 16),
     "feature 16 does not exist: this SAE has 16 features, 0..15"),
    (lambda s, sae: get_text_activations(s, None), "texts must be a string or a list of strings, got NoneType"),
    (lambda s, sae: get_text_activations(s, []), "no texts given"),
    (lambda s, sae: get_text_activations(s, [TEXT, 3]), "text must be a string, got int"),
    (lambda s, sae: get_activations(s, TEXT, position=1.0), "position must be an integer"),
    (lambda s, sae: get_activations(s, TEXT, token=5), "token must be the token's text"),
])
def test_the_public_api_says_what_is_wrong_in_one_line(source, sae, call, message):
    with pytest.raises(ActivationError) as err:
        call(source, sae)
    assert message in str(err.value) and "\n" not in str(err.value)
