"""``monosemantic corpus``: the command."""

from __future__ import annotations

import argparse
from pathlib import Path

from .assemble import build, recompute_document_sources
from .ship import export_text, replay_text
from .sources import EXTERNAL_PREFIXES, CorpusConfig, CorpusError

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
    from .. import store

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
