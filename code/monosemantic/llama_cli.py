"""``monosemantic llama ...``: the Llama path's subcommands (info, activations, harvest, train-sae, sweep, run,
evaluate, bench, cost), each a thin call of a function of :mod:`monosemantic.llama` and its stage modules."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .llama import SITES, STHENO, LlamaConfig, LlamaError, load_model

DEFAULT_PROFILE = "cpu"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="llama_command", required=True,
                           metavar="{info,activations,harvest,train-sae,sweep,evaluate,run,bench,cost}")

    def model_args(q, harvest: bool = True):
        q.add_argument("--model", help="hub id, folder, .gguf file, smollm2 or random:<preset> "
                                        f"(default: the profile's; Stheno is {STHENO})")
        q.add_argument("--layer", type=int, help="decoder layer (-1 = last, the default)")
        q.add_argument("--site", choices=SITES, help="hook site in the layer (default mlp.hook_post; "
                                                     "hook_mlp_out is the cheaper d_model-wide alternative)")
        q.add_argument("--dtype", choices=("auto", "float32", "bfloat16"))
        if harvest:
            q.add_argument("--tokens", type=int, dest="harvest_tokens", help="activations to harvest")
            q.add_argument("--seq-len", type=int, dest="seq_len")
            q.add_argument("--batch-size", type=int, dest="batch_size", help="windows per forward pass")
            q.add_argument("--shard-tokens", type=int, dest="shard_tokens")
            q.add_argument("--store-dtype", choices=("float16", "bfloat16"), dest="store_dtype")

    def sae_args(q):
        q.add_argument("--expansion", type=int, help="dictionary = expansion x width (0: largest that fits)")
        q.add_argument("-k", type=int, dest="k", help="TopK latents per activation")
        q.add_argument("--sae-batch", type=int, dest="sae_batch")
        q.add_argument("--epochs", type=float, dest="sae_epochs")
        q.add_argument("--memory-gb", type=float, dest="memory_gb", help="SAE memory budget per device")
        q.add_argument("--eval-tokens", type=int, dest="eval_tokens")
        q.add_argument("--fsdp", action="store_true", help="shard the SAE over the torchrun processes")

    i = sub.add_parser("info", help="load a model and print its architecture, hooks and chat format")
    model_args(i, harvest=False)
    a = sub.add_parser("activations", help="print the activations at one token of a text")
    model_args(a, harvest=False)
    a.add_argument("text")
    a.add_argument("--token", help="the token (default: the last)")
    a.add_argument("--top", type=int, default=10)
    h = sub.add_parser("harvest", help="store a layer's activations on a corpus (resumable; torchrun for many GPUs)")
    model_args(h)
    t = sub.add_parser("train-sae", help="train a TopK SAE on harvested activations, evaluate it, cache it")
    model_args(t)
    sae_args(t)
    s = sub.add_parser("sweep", help="train the SAE with a few settings of length and AuxK on the harvest, "
                                     "measure each on held-out text, cache the table")
    model_args(s)
    sae_args(s)
    s.add_argument("--settings", default="all",
                   help="which of the sweep's settings to run, by number: e.g. 1,2,5-7 (1, the reference, is always "
                        "run); default all")
    r = sub.add_parser("run", help="harvest, then train-sae (the whole thing)")
    model_args(r)
    sae_args(r)
    e = sub.add_parser("evaluate", help="re-evaluate the cached SAE of a run and print its metrics")
    model_args(e)
    sae_args(e)
    b = sub.add_parser("bench", help="time Llama-3-8B-shaped layers and SAE steps on this machine; cache it")
    b.add_argument("--layers", type=int, default=2, help="Llama-3-8B layers to time (32: the whole model)")
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    b.add_argument("--sae-features", type=int, default=8192, help="SAE width (8 x 14,336 = 114,688: Stheno's)")
    b.add_argument("--sae-batch", type=int, default=1024)
    from .llama_cost import CostAssumptions

    c = sub.add_parser("cost", help="hours and dollars of a Stheno run from the cached throughputs")
    c.add_argument("--tokens", type=float, default=100e6)
    c.add_argument("--usd-per-hour", type=float, default=CostAssumptions.usd_per_gpu_hour)
    c.add_argument("--expansion", type=int, default=CostAssumptions.expansion)
    from .config import PROFILES

    for q in (i, a, h, t, s, r, e, b, c):  # `llama run --profile tiny` as well as `llama --profile tiny run`
        q.add_argument("--profile", choices=PROFILES, default=argparse.SUPPRESS, help="scale of the run")


def config_from_args(args) -> LlamaConfig:
    cfg = args.profile_config.llama
    keys = [f.name for f in dataclasses.fields(LlamaConfig)]
    changes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return cfg.replace(**changes) if changes else cfg


def run(args) -> int:
    from .llama_cost import CostAssumptions, benchmark, cost_model
    from .llama_data import dist_info, harvest, init_distributed
    from .llama_eval import evaluate, heldout_windows, load_sae, train_and_store

    cmd = args.llama_command
    if cmd == "cost":
        rows = cost_model(args.tokens, CostAssumptions(usd_per_gpu_hour=args.usd_per_hour, expansion=args.expansion))
        for r in rows:
            print(f"{r['device']} ({r['basis']}): {r['tokens']:.3g} tokens -> harvest {r['harvest_hours']:.2f} h + "
                  f"SAE {r['sae_hours']:.2f} h = {r['total_hours']:.2f} h"
                  + (f", ${r['usd']:.0f}; $50 buys {r['tokens_for_budget']:.3g} tokens" if r["usd"] == r["usd"] else "")
                  + f"; shards {r['disk_gb']:.0f} GB on disk")
        return 0
    if cmd == "bench":
        row = benchmark(n_layers=args.layers, seq_len=args.seq_len, batch=args.batch, sae_features=args.sae_features,
                        sae_batch=args.sae_batch, profile=args.profile)
        print(json.dumps(row, indent=1))
        return 0
    cfg = config_from_args(args)
    if cmd in ("info", "activations"):
        src = load_model(cfg.model, dtype=cfg.dtype)
        src.hook_name(cfg.layer, cfg.site)  # a layer the model does not have is an error here too
        if cmd == "info":
            for k, v in src.info().items():
                print(f"{k:>14}: {v}")
            print(f"{'hooks':>14}: {len(src.hook_names)}, e.g. " + ", ".join(src.hook_names[-len(SITES):]))
            ids = src.chat_ids([{"role": "user", "content": "Hi!"}])
            print(f"{'chat':>14}: {src.tokenizer.decode(ids)!r}")
            return 0
        from .activations import get_activations

        hook = src.hook_name(cfg.layer, cfg.site)
        kw = {"token": args.token} if args.token else {"position": -1}
        ta = get_activations(src, args.text, hook=hook, **kw)
        _, idx = ta.values.abs().topk(min(args.top, ta.values.numel()))
        print(f"{hook} at token {ta.position} {ta.token!r} (width {ta.values.numel()}, norm {ta.values.norm():.3f})")
        for j in idx.tolist():
            print(f"  [{j:>6}] {ta.values[j]:+.4f}")
        return 0
    if cmd in ("harvest", "run"):
        init_distributed()
        res = harvest(cfg, args.profile)
        if dist_info().rank == 0:
            print(f"llama harvest: {res.rows:,} activations in {res.folder}"
                  + (f" ({res.tokens_per_s:,.0f} tokens/s)" if res.seconds else " (already complete)"))
        if dist_info().world > 1:
            import torch.distributed as td

            td.barrier()
        if cmd == "harvest":
            return 0
    if cmd in ("train-sae", "run"):
        from .llama_eval import own_run

        own = args.profile_config.llama
        train_and_store(cfg, args.profile, fsdp=args.fsdp, tables_in_work=cfg != own,
                        paired_with=own_run(cfg, args.profile, own))
        return 0
    if cmd == "sweep":
        from .llama_sweep import VARIANTS, chosen_settings, run_sweep

        art = run_sweep(cfg, args.profile, settings=chosen_settings(args.settings, len(VARIANTS)))
        print(f"llama sweep: wrote {art.key}")
        return 0
    if cmd == "evaluate":
        from . import store

        src = load_model(cfg.model, dtype=cfg.dtype)
        d_in = src.width(src.hook_name(cfg.layer, cfg.site))
        n_features = cfg.expansion * d_in if cfg.expansion else None
        candidates = [a for a in store.list_artifacts("llama") if a.profile == args.profile
                      and a.name.startswith(cfg.run_name + f"-topk{cfg.k}-")
                      and (n_features is None or a.name.endswith(f"-{n_features}"))]
        if not candidates:
            raise LlamaError(f"no cached SAE for {cfg.run_name}; train one with `monosemantic llama train-sae "
                             f"--profile {args.profile}`")
        art = store.load("llama", args.profile, candidates[-1].name)
        ev = evaluate(cfg, src, load_sae(art), heldout_windows(cfg, src, args.profile).spread(cfg.eval_tokens))
        for k, v in ev.metrics.items():
            print(f"{k:>24}: {v:.5g}" if isinstance(v, float) else f"{k:>24}: {v}")
        return 0
    raise AssertionError(cmd)
