"""``monosemantic train-lm``: train the one-layer language model on the token shards.

The loop is nanoGPT's in a few small functions: ``get_batch`` (random windows of the train split, drawn
from a generator seeded by the step, so a resumed run sees exactly the batches an uninterrupted one
would), ``estimate_val_loss`` (fixed windows spread over the held-out split), the learning rate from
:meth:`LMConfig.lr_at` (the anchor's: constant, one drop by 10x; plus a short warmup), AdamW.

Checkpoints (model, optimizer, step, history, RNG state, time spent) go to ``cache/work/lm/<profile>/``
every ``checkpoint_interval`` steps and on Ctrl-C, written to a temporary file and renamed; running the
same command again resumes from the last one. The finished run is one artifact,
``cache/lm/<profile>-model/``: fp16 weights (safetensors), the loss curve (parquet), sample completions
(JSON) and the metrics ``val_loss``, ``train_tokens``, ``tokens_per_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import checkpoint as checkpoint_io
from . import hardware
from .config import UserError, work_dir
from .lm import WEIGHTS_FILE, LMConfig, Transformer, save_weights
from .tokenizer import EOT_ID

DEFAULT_PROFILE = "cpu"
CHECKPOINT = "checkpoint.pt"
SAMPLE_PROMPTS = ("The", "In 1998, the", "def main(", "The license", "\\begin{", "Der")


class TokenSplit:
    """The little the loop needs from a split of the token shards: a 1-D array of token ids."""

    def __init__(self, tokens: np.ndarray, name: str = "train"):
        self.tokens, self.name = tokens, name

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (B, T+1)
        block = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return block[:, :-1], block[:, 1:]  # inputs and next-token targets, (B, T) each


def batch_starts(n_tokens: int, cfg: LMConfig, step: int, split: str = "train") -> np.ndarray:
    """The first token of each of step ``step``'s batch_size windows (each context_length + 1 tokens: inputs
    and the next-token target) of a split of ``n_tokens``: (batch_size,) int64, a function of (seed, step)
    alone, so a resumed run draws what an uninterrupted one would (:mod:`monosemantic.heldout` redraws them
    to know which tokens the model was trained on)."""
    n = n_tokens - cfg.context_length - 1
    if n <= 0:
        raise UserError(f"the {split} split has {n_tokens} tokens, too few for context {cfg.context_length}")
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, n + 1, (cfg.batch_size,), generator=g).numpy()


def get_batch(split: TokenSplit, cfg: LMConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: batch_size random windows, the same for a given (seed, step) everywhere."""
    return split.windows(batch_starts(len(split), cfg, step, split.name), cfg.context_length)


@torch.no_grad()
def estimate_val_loss(model: Transformer, val: TokenSplit, cfg: LMConfig) -> float:
    """Mean loss over eval_batches x batch_size windows spread evenly over the held-out split."""
    was_training = model.training
    model.eval()
    n = len(val) - cfg.context_length - 1
    if n <= 0:
        raise UserError(f"the val split has {len(val)} tokens, too few for context {cfg.context_length}")
    starts = np.linspace(0, n, cfg.eval_batches * cfg.batch_size).astype(np.int64)
    losses = []
    dev = model.unembed.weight.device
    for b in range(cfg.eval_batches):
        x, y = val.windows(starts[b * cfg.batch_size:(b + 1) * cfg.batch_size], cfg.context_length)
        losses.append(model(x.to(dev), y.to(dev)).loss.item())
    model.train(was_training)
    return float(np.mean(losses))


class TrainResult(NamedTuple):
    model: Transformer
    history: list[dict[str, float]]  # one row per logged interval: step, tokens, lr, train_loss, val_loss
    val_loss: float
    train_seconds: float  # time spent in training steps, summed over resumed sessions
    tokens_per_s: float  # training tokens per second of train_seconds


def train(cfg: LMConfig, train_split: TokenSplit, val_split: TokenSplit, *, checkpoint: Path | None = None,
          stop_after: int | None = None, progress: bool = True, log=print,
          device: str | torch.device | None = None, init: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train from scratch, or resume from ``checkpoint`` when it holds a run of the same config, on
    ``device`` (default: the GPU if there is one), starting from the weights ``init`` if given (a
    fine-tune) or from a fresh initialisation. The model comes back on the CPU.

    ``stop_after``: stop (with a checkpoint) once this many steps are done in total, as an interrupted run
    would; the tests use it to check that resuming changes nothing. A loss that stops being finite ends the
    run with a one-line error, leaving the last checkpoint (made before it) as it was."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hardware.keep_freed_memory()
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg)
    if init is not None:
        model.load_state_dict(init)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; biases, norms and no decay
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999),
                                  fused=True)  # one kernel per step instead of a dozen passes over 13M numbers
    step, history, train_seconds = 0, [], 0.0
    state = checkpoint_io.load(checkpoint, cfg.config_hash(), {"step", "model", "optimizer", "rng"}, what="lm",
                               fix="delete it or run with --fresh", log=log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log(f"resuming from {checkpoint} at step {step} of {cfg.steps}")

    def save() -> None:
        if checkpoint is not None:
            checkpoint_io.save(checkpoint, {
                "config": cfg.to_dict(), "config_hash": cfg.config_hash(), "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                "train_seconds": train_seconds, "tokens": step * cfg.tokens_per_step, "losses": losses,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}})

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=2.0)
    model.train()
    losses: list[float] = list(state.get("losses", [])) if state else []  # since the last logged interval
    interval_start = time.perf_counter()
    # Ctrl-C and SIGTERM only raise a flag, honoured between steps: a signal that lands inside
    # optimizer.step() must not checkpoint an update under the previous step's number.
    stop_signal: list[int] = []
    previous = checkpoint_io.catch_stop_signals(stop_signal)
    try:
        while step < end:
            t0 = time.perf_counter()
            x, y = get_batch(train_split, cfg, step)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss = model(x, y).loss
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                kept = f"the checkpoint in {checkpoint} is from before it" if checkpoint and checkpoint.exists() \
                    else "no checkpoint was written"
                raise UserError(f"training diverged: the loss is {losses[-1]} at step {step + 1}; {kept}; "
                                "lower lm.lr or raise lm.warmup_steps and run again")
            step += 1
            train_seconds += time.perf_counter() - t0
            last = step == cfg.steps
            if step % cfg.eval_interval == 0 or last or step == 1:
                seconds = time.perf_counter() - interval_start
                row = {"step": step, "tokens": step * cfg.tokens_per_step, "lr": cfg.lr_at(step - 1),
                       "train_loss": float(np.mean(losses)), "val_loss": estimate_val_loss(model, val_split, cfg),
                       "tokens_per_s": len(losses) * cfg.tokens_per_step / seconds}
                history.append(row)
                losses = []
                if bar is not None:
                    bar.write(f"step {step}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}")
                interval_start = time.perf_counter()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{step * cfg.tokens_per_step / train_seconds:.0f}"
                                if train_seconds else "?", refresh=False)
            if step % cfg.checkpoint_interval == 0 or step == end:
                save()
            if stop_signal:
                save()
                raise KeyboardInterrupt(f"signal {stop_signal[0]} at step {step}")
    finally:
        checkpoint_io.restore_signals(previous)
        if bar is not None:
            bar.close()
    val_loss = history[-1]["val_loss"] if history and history[-1]["step"] == step else \
        estimate_val_loss(model, val_split, cfg)
    return TrainResult(model.cpu().eval(), history, val_loss, train_seconds,
                       step * cfg.tokens_per_step / max(train_seconds, 1e-9))


@torch.no_grad()
def sample_completions(model: Transformer, tokenizer, prompts=SAMPLE_PROMPTS, new_tokens: int = 40,
                       seed: int = 0) -> list[dict[str, str]]:
    """Greedy and sampled (temperature 1, top-k 50, seeded) continuations of a few prompts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        idx = torch.tensor([tokenizer.encode(prompt)])
        greedy = model.generate(idx, new_tokens, temperature=0)
        sampled = model.generate(idx, new_tokens, temperature=1.0, top_k=50, generator=g)
        out.append({"prompt": prompt, "greedy": tokenizer.decode(greedy[0, idx.shape[1]:].tolist()),
                    "sampled": tokenizer.decode(sampled[0, idx.shape[1]:].tolist())})
    return out


@torch.no_grad()
def neuron_statistics(model: Transformer, split: TokenSplit, tokenizer, n_tokens: int = 262_144, top_k: int = 20,
                      before: int = 16, after: int = 4, batch_size: int = 64, eot_id: int = EOT_ID) -> dict[str, Any]:
    """How the MLP neurons fire on held-out text, for the book (which never runs the model on the corpus).

    The text is ``n_tokens`` of the split, in windows of the model's context spread evenly over it. Returns
    tables: ``top_contexts`` (neuron, rank, activation, document, the text before the token, the token,
    the text after: all within the window, so exactly what the model saw), keeping the strongest
    activation of each *document* only, so that a neuron's list shows the breadth of what excites it and
    not one long document over and over; ``random_contexts``, a uniform random sample of the tokens each
    neuron fires on (what it does most of the time, not only at its peak); ``summary`` (per neuron: firing
    frequency, mean and max activation, distinct tokens among its top contexts); ``histogram`` (every
    neuron's activation at every token; bin 0 counts the exact zeros)."""
    import pandas as pd

    T, d_mlp = model.config.context_length, model.config.d_mlp
    hook = model.default_hook
    n_windows = max(1, min(n_tokens // T, (len(split) - 1) // T))
    starts = np.linspace(0, len(split) - T - 1, n_windows).astype(np.int64)  # (W,)
    eots = np.flatnonzero(np.asarray(split.tokens) == eot_id)  # document boundaries
    edges = np.concatenate([[0.0], np.geomspace(1e-3, 100, 61)])  # bin 0: exact zeros; then log-spaced
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    zeros = 0
    fired = torch.zeros(d_mlp, dtype=torch.int64)
    total = torch.zeros(d_mlp, dtype=torch.float64)
    pool = 8 * top_k  # candidates per neuron, thinned to one per document at the end
    best_v = torch.full((pool, d_mlp), -1.0)  # (pool, d_mlp)
    best_i = torch.zeros((pool, d_mlp), dtype=torch.int64)  # window * T + position
    # a uniform random sample of the tokens each neuron fires on: the largest random keys among them
    gen = torch.Generator().manual_seed(0)
    rand_k = torch.full((top_k, d_mlp), -1.0)
    rand_i = torch.zeros((top_k, d_mlp), dtype=torch.int64)
    rand_v = torch.zeros((top_k, d_mlp))
    for b in range(0, n_windows, batch_size):
        x, _ = split.windows(starts[b:b + batch_size], T)  # (B, T)
        acts = model.run_with_cache(x, [hook])[hook].reshape(-1, d_mlp)  # (B*T, d_mlp)
        fired += (acts > 0).sum(0)
        total += acts.sum(0, dtype=torch.float64)
        zeros += int((acts == 0).sum())
        positive = np.clip(acts[acts > 0].numpy(), edges[1], edges[-1] * (1 - 1e-9))  # tails into end bins
        hist[1:] += np.histogram(positive, bins=edges[1:])[0]
        index = torch.arange(b * T, b * T + acts.shape[0])[:, None].expand_as(acts)  # (B*T, d_mlp)
        v, i = torch.topk(torch.cat([best_v, acts]), min(pool, len(acts) + pool), dim=0)
        best_i, best_v = torch.gather(torch.cat([best_i, index]), 0, i), v
        keys = torch.where(acts > 0, torch.rand(acts.shape, generator=gen), -1.0)  # (B*T, d_mlp)
        k, i = torch.topk(torch.cat([rand_k, keys]), min(top_k, len(acts) + top_k), dim=0)
        rand_v = torch.gather(torch.cat([rand_v, acts]), 0, i)
        rand_i, rand_k = torch.gather(torch.cat([rand_i, index]), 0, i), k
    n_seen = n_windows * T
    def context(g: int) -> dict[str, Any]:
        w0 = int(starts[g // T])  # where the window starts in the split
        p = w0 + g % T  # the token's position in the split
        ids = np.asarray(split.tokens[max(w0, p - before):min(w0 + T, p + 1 + after)], dtype=np.int64)
        k = p - max(w0, p - before)
        # each span's bytes together: a character split over byte-level tokens stays whole, and bytes of one cut
        # by a span's ends show as <0xNN> (never U+FFFD)
        return {"document": int(np.searchsorted(eots, p)), "before": tokenizer.display(ids[:k]),
                "token": tokenizer.display(ids[k:k + 1]), "after": tokenizer.display(ids[k + 1:])}

    rows, random_rows = [], []
    for n in range(d_mlp):
        docs_seen: set[int] = set()
        for value, g in zip(best_v[:, n].tolist(), best_i[:, n].tolist(), strict=True):
            if value <= 0 or len(docs_seen) == top_k:
                break
            ctx = context(g)
            if ctx["document"] in docs_seen:
                continue
            docs_seen.add(ctx["document"])
            rows.append({"neuron": n, "rank": len(docs_seen) - 1, "activation": value, **ctx})
        for j, (key, value, g) in enumerate(zip(rand_k[:, n].tolist(), rand_v[:, n].tolist(), rand_i[:, n].tolist(),
                                                 strict=True)):
            if key >= 0:
                random_rows.append({"neuron": n, "sample": j, "activation": value, **context(g)})
    top = pd.DataFrame(rows)
    distinct = top.groupby("neuron")["token"].agg(lambda t: t.str.strip().str.lower().nunique())
    summary = pd.DataFrame({"neuron": np.arange(d_mlp),
                            "density": (fired.double() / n_seen).numpy(),
                            "mean_activation": (total / n_seen).numpy(),
                            "max_activation": best_v[0].clamp(min=0).numpy()})
    summary["distinct_top_tokens"] = summary["neuron"].map(distinct).fillna(0).astype(int)
    histogram = pd.DataFrame({"left": edges[:-1], "right": edges[1:], "count": hist})
    histogram.loc[0, "count"] = zeros  # the first bin holds the exact zeros (the ReLU's)
    return {"top_contexts": top, "random_contexts": pd.DataFrame(random_rows), "summary": summary,
            "histogram": histogram, "tokens": n_seen}


def checkpoint_path(profile: str) -> Path:
    return work_dir() / "lm" / profile / CHECKPOINT


def write_artifact(profile: str, cfg: LMConfig, result: TrainResult, tokenizer, inputs=None,
                   val_split: TokenSplit | None = None, neuron_tokens: int = 262_144) -> Path:
    """The run as ``cache/lm/<profile>-model/`` (with the neurons' statistics on ``val_split`` if given)."""
    import pandas as pd

    from . import store

    with store.write("lm", profile, "model", config=cfg, inputs=inputs) as w:
        save_weights(result.model, w.dir / WEIGHTS_FILE)
        pd.DataFrame(result.history).to_parquet(w.dir / "loss_curve.parquet", index=False)
        samples = sample_completions(result.model, tokenizer)
        (w.dir / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
        if val_split is not None:
            stats = neuron_statistics(result.model, val_split, tokenizer, n_tokens=neuron_tokens)
            stats["top_contexts"].to_parquet(w.dir / "neuron_top_contexts.parquet", index=False)
            stats["random_contexts"].to_parquet(w.dir / "neuron_random_contexts.parquet", index=False)
            stats["summary"].to_parquet(w.dir / "neuron_summary.parquet", index=False)
            stats["histogram"].to_parquet(w.dir / "mlp_activation_histogram.parquet", index=False)
            w.metrics["mlp_zero_fraction"] = round(float(stats["histogram"]["count"].iloc[0]
                                                        / stats["histogram"]["count"].sum()), 4)
            w.metrics["mlp_neurons_never_firing"] = int((stats["summary"]["density"] == 0).sum())
            w.info["neuron_statistics_tokens"] = stats["tokens"]
        w.metrics.update({
            "val_loss": round(result.val_loss, 4),
            "train_loss": round(result.history[-1]["train_loss"], 4),
            "train_tokens": cfg.train_tokens,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(result.train_seconds, 1),
            "parameters": sum(p.numel() for p in result.model.parameters()),
        })
        w.info["threads"] = torch.get_num_threads()
        w.wall_time_s = result.train_seconds
    return store.artifact_path("lm", profile, "model")


# --- the command ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def run(args: argparse.Namespace) -> int:
    from . import store, tokenizer
    from .data import TokenDataset

    torch.set_num_threads(args.threads)
    profile = args.profile_config
    cfg = profile.lm
    train_ds = TokenDataset.open(args.profile, "train")
    val_ds = TokenDataset.open(args.profile, "val")
    inputs = []
    try:
        inputs.append(store.load("tokens", args.profile, profile.corpus.name, verify=False, check_inputs=False))
    except store.CacheError:
        pass
    ckpt = checkpoint_path(args.profile)
    if args.fresh and ckpt.exists():
        ckpt.unlink()
    print(f"train-lm ({args.profile}): {cfg.steps:,} steps x {cfg.tokens_per_step:,} tokens = "
          f"{cfg.train_tokens / 1e6:.1f}M tokens of {len(train_ds) / 1e6:.1f}M in the train split, "
          f"{args.threads} threads; checkpoints in {ckpt}")
    result = train(cfg, TokenSplit(train_ds.tokens, "train"), TokenSplit(val_ds.tokens, "val"), checkpoint=ckpt,
                   progress=not args.no_progress)
    path = write_artifact(args.profile, cfg, result, tokenizer.load(), inputs, TokenSplit(val_ds.tokens, "val"),
                          neuron_tokens=min(524_288, 128 * cfg.tokens_per_step))
    print(f"val loss {result.val_loss:.3f} nats after {cfg.train_tokens / 1e6:.1f}M tokens "
          f"({result.tokens_per_s:,.0f} tokens/s, {result.train_seconds / 60:.1f} min); wrote {path}")
    if not math.isfinite(result.val_loss):
        raise UserError("the validation loss is not finite: training diverged (lower lm.lr)")
    return 0
