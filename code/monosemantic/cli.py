"""The ``monosemantic`` command: one subcommand per pipeline stage.

Each stage module (or an object in it, ``module:attr``) exposes ``add_arguments(parser)`` and
``run(args) -> int | None``; this file only lists them (imported lazily, so ``--help`` is fast) and turns
a :class:`~monosemantic.config.UserError` into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time

from .config import COMMAND_ENV, COMMAND_START_ENV, PROFILES, UserError, human_bytes

# (subcommand, module that implements it, one-line help). A stage adds its row here.
COMMANDS: list[tuple[str, str, str]] = [
    ("cache", "monosemantic.cli", "list and verify the result cache"),
    ("corpus", "monosemantic.corpus", "build the text corpus and its token shards"),
    ("book", "monosemantic.book", "build the book (HTML site + PDF) from the committed cache"),
    ("train-lm", "monosemantic.lm_train", "train the one-layer language model (resumes from its checkpoint)"),
    ("bench", "monosemantic.bench", "throughput and MFU side by side with the anchor's code (cache/bench/)"),
    ("faults", "monosemantic.faults", "run the tests of bad input and faults, and cache the table they record"),
    ("toy", "monosemantic.toy", "synthetic superposition and SAE dictionary recovery with known answers (chapter 2)"),
    ("readme", "monosemantic.readme", "write the README's headline numbers from the cache"),
    ("reproduce", "monosemantic.pipeline", "run every stage of the pipeline in order for one profile"),
    ("harvest", "monosemantic.sae_train", "the one-layer model's MLP activations for the SAEs (cache/work/)"),
    ("train-sae", "monosemantic.sae_train:TrainCommand",
     "SAEs on the MLP activations: the anchor's recipe, TopK, frontiers, width sweep (resumes)"),
    ("export-sae", "monosemantic.sae_train:ExportCommand", "write a committed SAE in SAELens's on-disk format"),
    ("evaluate", "monosemantic.evaluation",
     "every committed SAE on the whole held-out split, with 95% intervals over documents"),
    ("heldout", "monosemantic.heldout",
     "the held-out windows for unit-level claims: never-seen text of every corpus source (>= 5M tokens)"),
    ("analyze", "monosemantic.analysis",
     "features and neurons measured alike: dashboards, logit effects, monosemanticity scores, splitting"),
    ("causal", "monosemantic.causal",
     "clamp and ablate named features in the running model, against random directions of equal norm"),
    ("diff", "monosemantic.diffing", "chapter 5's pilot: fine-tune the LM on one source and diff the two models"),
    ("llama", "monosemantic.llama_cli",
     "Llama-family models (SmolLM2, L3-8B-Stheno): activations, harvest, SAE, cost"),
]


def _add_profile(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--profile", choices=PROFILES, default=default,
                   help=f"scale of the run: tiny (seconds, CI), cpu (laptop, committed), gpu (one H100); "
                        f"default {default}")


# --- `monosemantic cache` --------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="{list,verify}")
    ls = sub.add_parser("list", help="a table of every artifact: stage, profile, size, metrics, age")
    ls.add_argument("--stage", help="only this stage")
    v = sub.add_parser("verify", help="check every artifact's files against its manifest")
    v.add_argument("--skip-work", action="store_true", help="do not hash the large files in cache/work/")


def _age(created: str | None) -> str:
    import datetime as dt

    if not created:
        return "?"
    seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _short_metrics(metrics: dict, limit: int = 4) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v) if not isinstance(v, (dict, list)) else "..."
    items = [f"{k}={fmt(v)}" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    return " ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def run(args: argparse.Namespace) -> int:
    from . import store

    if args.cache_command == "list":
        arts = store.list_artifacts(args.stage)
        if not arts:
            print(f"the cache ({store.cache_dir()}) holds no artifacts")
            return 0
        rows = [("stage", "profile", "name", "size", "work", "age", "metrics")]
        for a in arts:
            work = a.size_bytes("work")
            rows.append((a.stage, a.profile, a.name, human_bytes(a.size_bytes("cache")),
                         human_bytes(work) if work else "-", _age(a.manifest.get("created")),
                         _short_metrics(a.metrics)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
        total = sum(a.size_bytes("cache") for a in arts)
        print(f"{len(arts)} artifacts, {human_bytes(total)} committed")
        return 0
    bad = 0
    results = store.verify_all(check_work=not args.skip_work)
    for art, problems in results:
        if problems:
            bad += 1
            print(f"FAIL {art.key}: {'; '.join(problems)} -> regenerate with `{art.command}`")
        else:
            print(f"ok   {art.key}")
    print(f"{len(results) - bad} of {len(results)} artifacts intact")
    return 1 if bad else 0


# --- the command ------------------------------------------------------------------------------------

def _implementation(spec: str):
    """The module (or ``module:attr`` object) that implements a subcommand."""
    module, _, attr = spec.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="monosemantic",
        description="Sparse autoencoders and monosemantic features: every stage of the book's pipeline.")
    parser.add_argument("--version", action="version", version=f"monosemantic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # stage modules are imported only for the subcommand asked for, so --help stays fast
        if argv[:1] == [name]:
            mod = _implementation(module)
            if name != "cache":
                _add_profile(p, default=getattr(importlib.import_module(module.partition(":")[0]),
                                                "DEFAULT_PROFILE", "cpu"))
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    if getattr(args, "profile", None) is not None:
        from . import profiles

        args.profile_config = profiles.get(args.profile)  # resolved here, once; the stages read it from args
    from . import hardware

    hardware.keep_freed_memory()  # every stage allocates and frees the same large tensors step after step
    start = time.perf_counter()
    outer = {name: os.environ.get(name) for name in (COMMAND_START_ENV, COMMAND_ENV)}
    os.environ[COMMAND_START_ENV] = str(time.time())  # what the store records as each artifact's wall time
    os.environ[COMMAND_ENV] = shlex.join(["monosemantic", *argv])  # and as the command that made it
    try:
        status = _implementation(args._module).run(args)
    except UserError as e:
        print(f"monosemantic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"monosemantic {args.command}: interrupted after {time.perf_counter() - start:.0f} s; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"monosemantic {args.command}: error: out of memory after {time.perf_counter() - start:.0f} s; "
              "free memory or use a smaller profile, then run the same command again",
              file=sys.stderr)
        return 2
    finally:
        for name, value in outer.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main())
