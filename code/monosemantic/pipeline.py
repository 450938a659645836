"""``monosemantic reproduce``: every stage of the pipeline, in order, for one profile.

Each step is the same CLI call a researcher would type, so the pipeline has no logic of its own: it runs
the stages one after the other and stops at the first that fails. Stages that are already in the cache
with the current config are cheap to re-run (they resume or overwrite; see each stage's --help).
"""

from __future__ import annotations

import argparse
import time

# (what it makes, argv after `monosemantic`); the profile is appended to each
STAGES: list[tuple[str, list[str]]] = [
    ("text corpus and GPT-2 token shards", ["corpus"]),
    ("one-layer language model", ["train-lm"]),
    ("MLP activations of the one-layer model", ["harvest"]),
    ("SAEs: the anchor's recipe, TopK, frontiers, width sweep", ["train-sae"]),
    ("features and neurons: dashboards and scores", ["analyze"]),
    ("toy superposition and dictionary recovery (chapter 2)", ["toy"]),
    ("SmolLM2 last-layer MLP SAE (chapter 4)", ["llama", "run"]),
    ("model diffing pilot: fine-tune and crosscoder (chapter 5)", ["diff"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", metavar="COMMAND",
                   help=f"run only these stages (of: {', '.join(' '.join(a) for _, a in STAGES)})")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")


def run(args: argparse.Namespace) -> int:
    from .cli import main
    from .config import UserError

    steps = [(what, argv) for what, argv in STAGES if not args.only or argv[0] in args.only]
    if args.only and len(steps) != len(set(args.only)):
        known = ", ".join(a[0] for _, a in STAGES)
        raise UserError(f"--only names a stage the pipeline does not have; its stages are: {known}")
    for i, (what, argv) in enumerate(steps, 1):
        command = [*argv, "--profile", args.profile]
        print(f"[{i}/{len(steps)}] {what}: monosemantic {' '.join(command)}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        status = main(command)
        if status:
            print(f"stage `monosemantic {' '.join(command)}` failed (exit {status}); fix it and run "
                  f"`monosemantic reproduce --profile {args.profile}` again", flush=True)
            return status
        print(f"[{i}/{len(steps)}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0
