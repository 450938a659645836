"""``monosemantic diff``: model diffing in miniature, the pilot of the research proposal (chapter 5).

Stheno is Llama-3-8B fine-tuned on roleplay text. The proposal asks what such a fine-tune changes inside
the model, measured with sparse dictionaries. This stage asks the same of our one-layer model, cheaply:

1. **Fine-tune** the trained one-layer LM (``lm/<profile>-model``) on one corpus source, a register of
   its own (``shakespeare``: plays and poems, character dialogue in Early Modern English), for a few
   hundred steps, resumable like ``train-lm``.
2. **Losses**: both models on the base mix's held-out text and on held-out documents of that source.
3. **SAE transfer**: the base model's TopK SAE (``sae/<profile>-topk``) spliced into each model on each
   text: does a dictionary learnt on the base model still explain the fine-tuned one (FVU, CE recovered)?
4. **A crosscoder**: one TopK dictionary trained on both models' MLP activations at the same tokens,
   concatenated (512 + 512 numbers, each model's half scaled to unit mean square), with shared latents
   and one decoder half per model (Lindsey et al. 2024). A latent's *relative decoder norm*
   ``r = |d_ft| / (|d_base| + |d_ft|)`` says whose activations it writes to: ~0.5 shared by both, near 0
   the base model's only, near 1 the fine-tune's only; the cosine of its two halves says whether a shared
   latent points the same way in both.

The artifact ``diff/<profile>-finetune-<source>`` holds the losses, the transfer table, one row per
crosscoder latent (relative norm, cosine, densities on each text, top tokens) and the crosscoder's training
curve. The fine-tuned weights stay in ``cache/work/diff/<profile>-<source>/`` (not committed). ``--source
mix`` is the control: as many steps on the base model's own mix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .config import ConfigError, StageConfig, UserError, check_positive, work_dir

DEFAULT_PROFILE = "cpu"
MIX = "mix"


def pair_name(cfg: DiffConfig) -> str:
    """The fine-tuned pair: ``<source>``, with ``-0step`` for the self-pair (the base against itself) and ``-s<n>``
    for another seed of the fine-tune (the name of its work folder and of its artifacts)."""
    return cfg.source + ("-0step" if cfg.steps == 0 else "") + (f"-s{cfg.seed}" if cfg.seed else "")


def artifact_name(cfg: DiffConfig) -> str:
    """``finetune-<pair>`` (:func:`pair_name`), with ``-cc<n>`` for another crosscoder seed on the same pair."""
    return f"finetune-{pair_name(cfg)}" + (f"-cc{cfg.crosscoder_seed}" if cfg.crosscoder_seed >= 0 else "")


class DiffError(UserError):
    """A missing input or a config the stage cannot run."""


@dataclasses.dataclass(frozen=True)
class DiffConfig(StageConfig):
    STAGE: ClassVar[str] = "diff"
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = ("crosscoder_seed",)

    source: str = "shakespeare"
    """The corpus source to fine-tune on (its documents as extracted by ``monosemantic corpus``), or
    ``mix``: the base model's own training mix, the control (what fine-tuning alone changes)."""
    holdout: float = 0.15
    """Fraction of the source's documents held out (by a hash of their id) for the losses and the tables."""
    steps: int = 300
    lr: float = 3e-4
    """Constant after a 20-step warmup: a fine-tune, not a new schedule."""
    batch_size: int = 32
    eval_windows: int = 64
    """Windows of the model's context per text for the losses, the SAE transfer and the latent tables."""
    harvest_tokens: int = 1_000_000
    """Crosscoder training activations: paired rows of both models, half from each text."""
    n_features: int = 4096
    k: int = 32
    sae_lr: float = 4e-4
    epochs: int = 2
    top_tokens: int = 6
    seed: int = 0
    crosscoder_seed: int = -1
    """-1: the crosscoder takes ``seed``, as the fine-tune does. Another value trains a second crosscoder on the
    same fine-tuned pair and the same rows, with only its initialisation and batch order drawn from this seed:
    the two crosscoders' difference is the noise floor of any statistic read off one."""

    def __post_init__(self) -> None:
        if self.crosscoder_seed == self.seed or self.crosscoder_seed < -1:
            raise ConfigError(f"diff.crosscoder_seed must be -1 (the fine-tune's seed, {self.seed}) or another "
                              f"seed >= 0, got {self.crosscoder_seed}")
        if not 0 < self.holdout < 0.5:
            raise ConfigError(f"diff.holdout must be in (0, 0.5), got {self.holdout}")
        check_positive(self, "steps", zero=True, integer=True)  # 0: the base against itself (the self-pair)
        check_positive(self, "batch_size", "eval_windows", "harvest_tokens", "n_features", "k", "epochs")
        if self.k > self.n_features:
            raise ConfigError(f"diff.k ({self.k}) must not exceed diff.n_features ({self.n_features})")


# --- the source's text -----------------------------------------------------------------------------------

def source_documents(source: str) -> list[tuple[str, str]]:
    """(doc id, text) of one corpus source, as ``monosemantic corpus`` extracted it."""
    from .corpus import read_extracted, text_dir

    path = text_dir() / f"{source}.jsonl.gz"
    if not path.is_file():
        raise DiffError(f"no extracted text for source {source!r} ({path}); build the corpus first with "
                        "`monosemantic corpus --profile <profile>` (the source must be in its mix)")
    try:
        return list(read_extracted(path))
    except (OSError, EOFError, gzip.BadGzipFile, json.JSONDecodeError, ValueError) as e:
        raise DiffError(f"{path} is damaged ({type(e).__name__}); delete it and rerun `monosemantic corpus`") from None


def source_tokens(source: str, holdout: float, tokenizer, profile: str = DEFAULT_PROFILE) -> dict[str, np.ndarray]:
    """The source's documents tokenised and joined by <|endoftext|>, split into ``train`` and ``val`` by a
    hash of the document id (:func:`monosemantic.corpus.is_val` with fraction ``holdout``); for ``mix``,
    the profile's token shards themselves."""
    from .corpus import is_val
    from .data import DTYPE, TokenDataset

    if source == MIX:
        return {split: TokenDataset.open(profile, split).tokens for split in ("train", "val")}

    docs = source_documents(source)
    parts: dict[str, list[int]] = {"train": [], "val": []}
    for doc_id, text in docs:
        split = "val" if is_val(source, doc_id, holdout) else "train"
        parts[split] += tokenizer.encode(text) + [tokenizer.eot_id]
    if not parts["train"] or not parts["val"]:
        raise DiffError(f"source {source!r} has {len(docs)} documents, too few to hold out "
                        f"{holdout:.0%} and train on the rest; pick a larger source (diff.source)")
    return {k: np.asarray(v, dtype=DTYPE) for k, v in parts.items()}


# --- fine-tuning -------------------------------------------------------------------------------------------

def finetune_config(base, cfg: DiffConfig):
    """The base LM's config, with the fine-tune's steps, batch, constant lr and seed."""
    return base.replace(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_final=cfg.lr,
                        warmup_steps=min(20, cfg.steps), eval_interval=cfg.steps, eval_batches=4,
                        checkpoint_interval=max(1, min(100, cfg.steps // 3)), seed=cfg.seed)


def finetune(base_model, base_cfg, tokens: dict[str, np.ndarray], cfg: DiffConfig, checkpoint: Path | None,
             progress: bool = True):
    """The base model (trained as :class:`~monosemantic.lm.LMConfig` ``base_cfg`` says) trained ``cfg.steps``
    more steps on the source's train tokens (resumable)."""
    from .lm_train import TokenSplit, train

    lm_cfg = finetune_config(base_cfg, cfg)
    init = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    return train(lm_cfg, TokenSplit(tokens["train"], "train"), TokenSplit(tokens["val"], "val"),
                 checkpoint=checkpoint, progress=progress, init=init)


# --- measurements ------------------------------------------------------------------------------------------

def eval_windows(tokens: np.ndarray, seq_len: int, n_windows: int, batch: int = 32) -> list:
    """Up to ``n_windows`` consecutive windows of ``tokens`` (fewer when the text is short)."""
    from .harvest import sequential_windows

    n = min(n_windows, (len(tokens) - 1) // seq_len)
    if n < 1:
        raise DiffError(f"{len(tokens)} held-out tokens are too few for one window of {seq_len}")
    return sequential_windows(tokens, seq_len, n, batch=batch)


@torch.no_grad()
def mean_loss(model, windows) -> float:
    total, n = 0.0, 0
    for x, y in windows:
        total += float(model(x, y).loss) * x.numel()
        n += x.numel()
    return total / n


@torch.no_grad()
def _paired_rows(models, ids: torch.Tensor) -> torch.Tensor:
    """(B * T, 2 d_mlp): each model's MLP activations at the tokens ``ids`` (B, T), side by side."""
    from .harvest import HOOK

    acts = [m.run_with_cache(ids, [HOOK])[HOOK] for m in models]  # each (B, T, d)
    return torch.cat(acts, dim=-1).reshape(ids.numel(), -1)


def paired_activations(models, windows) -> torch.Tensor:
    """(tokens, 2 d_mlp): the paired rows of every window, in order."""
    return torch.cat([_paired_rows(models, x) for x, _ in windows])


@torch.no_grad()
def harvest_pairs(models, texts: list[np.ndarray], n_rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_rows`` paired rows from random windows, an equal share from each text, shuffled."""
    from .harvest import random_windows

    per_text = n_rows // len(texts)
    out = []
    for i, tokens in enumerate(texts):
        got, chunks = 0, []
        for ids, _ in random_windows(tokens, seq_len, seed=seed + i, batch=32):
            chunks.append(_paired_rows(models, ids)[: per_text - got])
            got += len(chunks[-1])
            if got >= per_text:
                break
        out.append(torch.cat(chunks))
    rows = torch.cat(out)
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]


def relative_norms(w_dec: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent of a crosscoder decoder (n_features, 2 d): r = |d_ft| / (|d_base| + |d_ft|) and the
    cosine between its two halves."""
    a, b = w_dec[:, :d].float(), w_dec[:, d:].float()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    r = nb / (na + nb).clamp_min(1e-12)
    cos = (a * b).sum(1) / (na * nb).clamp_min(1e-12)
    return r, cos


def live_latents(table):
    """The rows of a latent table (:func:`latent_table`) whose latent fired on some held-out text."""
    return table[(table[[c for c in table if c.startswith("density_")]] > 0).any(axis=1)]


def latent_kind(r: torch.Tensor, low: float = 0.1, high: float = 0.9) -> list[str]:
    """base-only (r < low), fine-tune-only (r > high), else shared."""
    return ["base-only" if v < low else "fine-tune-only" if v > high else "shared" for v in r.tolist()]


def train_crosscoder(rows: torch.Tensor, cfg: DiffConfig, progress: bool = True):
    from . import sae as S

    scfg = S.SAEConfig(d_in=rows.shape[1], n_features=cfg.n_features, architecture="topk", k=cfg.k,
                       lr=cfg.sae_lr, batch_size=1024, resample_every=0, dtype="auto",
                       seed=cfg.seed if cfg.crosscoder_seed < 0 else cfg.crosscoder_seed,
                       dead_window=min(250_000, len(rows)))
    scfg = scfg.replace(n_steps=max(1, cfg.epochs * len(rows) // scfg.batch_size))
    return S.train(scfg, rows, progress=progress, desc="crosscoder", device="cpu")


@torch.no_grad()
def latent_table(sae, rows_by_text: dict[str, torch.Tensor], tokens_by_text: dict[str, np.ndarray], d: int,
                 tokenizer, top: int):
    """One row per latent: relative decoder norm, cosine of its halves, kind, firing density on each
    text, and the tokens of its largest activations (over all texts)."""
    import pandas as pd

    r, cos = relative_norms(sae.W_dec.detach(), d)
    table = {"latent": np.arange(sae.cfg.n_features), "rel_norm": r.numpy(), "cos": cos.numpy(),
             "kind": latent_kind(r)}
    best_v = torch.full((sae.cfg.n_features, top), -1.0)
    best_t = torch.zeros((sae.cfg.n_features, top), dtype=torch.long)
    for name, rows in rows_by_text.items():
        z = torch.cat([sae.encode(b.float()) for b in rows.split(4096)])  # (N, F)
        table[f"density_{name}"] = (z > 0).float().mean(0).numpy()
        v, i = z.topk(min(top, len(z)), dim=0)  # (top, F)
        ids = torch.as_tensor(tokens_by_text[name][: len(z)].astype(np.int64))[i]  # (top, F)
        allv, allt = torch.cat([best_v, v.t()], 1), torch.cat([best_t, ids.t()], 1)
        order = allv.topk(top, dim=1).indices
        best_v, best_t = allv.gather(1, order), allt.gather(1, order)
    strings = [tokenizer.token_strings(row) for row in best_t.tolist()]
    table["top_tokens"] = [" | ".join(repr(s)[1:-1] for s, v in zip(ss, vs, strict=True) if v > 0)
                           for ss, vs in zip(strings, best_v.tolist(), strict=True)]
    table["max_act"] = best_v[:, 0].clamp_min(0).numpy()
    return pd.DataFrame(table)


# --- the stage ---------------------------------------------------------------------------------------------

def run_stage(profile: str, cfg: DiffConfig, progress: bool = True) -> Path:
    import pandas as pd

    from . import metrics, store, tokenizer
    from . import sae as sae_mod
    from .data import TokenDataset
    from .lm import LMConfig, load_weights, save_weights

    tok = tokenizer.load()
    try:
        lm_art = store.load("lm", profile, "model")
        sae_art = store.load("sae", profile, "topk")
    except store.CacheError as e:
        raise DiffError(f"{e} (the diff stage needs the trained LM and its TopK SAE)") from None
    base_cfg = LMConfig(**lm_art.config)  # how the base was trained: the fine-tune continues it
    base = load_weights(lm_art.file("model.safetensors"), base_cfg)
    seq = base.config.context_length
    ft_tokens = source_tokens(cfg.source, cfg.holdout, tok, profile)
    texts = {"mix": TokenDataset.open(profile, "val").tokens, "source": ft_tokens["val"]}
    print(f"diff ({profile}): fine-tuning on {cfg.source}: {len(ft_tokens['train']):,} train tokens, "
          f"{len(ft_tokens['val']):,} held out; {cfg.steps} steps x {cfg.batch_size} x {seq}")
    folder = work_dir() / "diff" / f"{profile}-{pair_name(cfg)}"
    if cfg.steps:
        result = finetune(base, base_cfg, ft_tokens, cfg, folder / "checkpoint.pt", progress=progress)
        tuned, finetune_seconds = result.model.eval(), result.train_seconds
    else:  # the self-pair: the crosscoder's floor when nothing changed, on the same rows and text
        tuned, finetune_seconds = copy.deepcopy(base).eval(), 0.0
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(tuned, folder / "finetuned.safetensors")
    models = {"base": base, "finetuned": tuned}

    windows = {name: eval_windows(t, seq, cfg.eval_windows) for name, t in texts.items()}
    losses = pd.DataFrame([{"model": m, "text": t, "loss": mean_loss(model, windows[t])}
                           for m, model in models.items() for t in windows])
    base_sae = sae_mod.load(sae_art.path)
    transfer = pd.DataFrame([{"model": m, "text": t, **metrics.evaluate(model, base_sae, windows[t])}
                             for m, model in models.items() for t in windows])

    rows = harvest_pairs([base, tuned], [TokenDataset.open(profile, "train").tokens, ft_tokens["train"]],
                         cfg.harvest_tokens, seq, cfg.seed)
    d = base.config.d_mlp
    scale = torch.cat([rows[:, :d].pow(2).sum(1).mean().sqrt().expand(d),
                       rows[:, d:].pow(2).sum(1).mean().sqrt().expand(d)])  # each half to unit mean square
    res = train_crosscoder(rows / scale, cfg, progress=progress)
    cc = res.sae.float().eval()
    held = {name: paired_activations([base, tuned], w) / scale for name, w in windows.items()}
    held_tokens = {name: np.concatenate([x.reshape(-1).numpy() for x, _ in w]) for name, w in windows.items()}
    table = latent_table(cc, held, held_tokens, d, tok, cfg.top_tokens)
    with torch.no_grad():
        fvu = {}
        for name, x in held.items():
            err = (cc(x).recon - x).pow(2)
            var = (x - x.mean(0)).pow(2)
            fvu[name] = {half: float(err[:, s].sum() / var[:, s].sum())
                         for half, s in (("base", slice(0, d)), ("finetuned", slice(d, 2 * d)))}

    inputs = [lm_art, sae_art]
    with store.write("diff", profile, artifact_name(cfg), config=cfg, inputs=inputs) as w:
        losses.to_parquet(w.dir / "losses.parquet", index=False)
        transfer.to_parquet(w.dir / "transfer.parquet", index=False)
        table.to_parquet(w.dir / "latents.parquet", index=False)
        pd.DataFrame(res.history).to_parquet(w.dir / "crosscoder_curve.parquet", index=False)
        live = live_latents(table)
        counts = live["kind"].value_counts()
        w.metrics.update({
            "finetune_tokens": cfg.steps * cfg.batch_size * seq,
            "finetune_seconds": round(finetune_seconds, 1),
            "crosscoder_rows": len(rows),
            "crosscoder_live": len(live),
            "latents_shared": int(counts.get("shared", 0)),
            "latents_base_only": int(counts.get("base-only", 0)),
            "latents_finetune_only": int(counts.get("fine-tune-only", 0)),
            **{f"crosscoder_fvu_{t}_{h}": round(v, 4) for t, hv in fvu.items() for h, v in hv.items()},
        })
        w.info.update({"source": cfg.source,
                       **({"lm_config": dataclasses.asdict(finetune_config(base_cfg, cfg))} if cfg.steps else {}),
                       "source_tokens": {k: len(v) for k, v in ft_tokens.items()},
                       "eval_tokens": {k: int(sum(x.numel() for x, _ in v)) for k, v in windows.items()},
                       "scale": [float(scale[0]), float(scale[-1])]})
    path = store.artifact_path("diff", profile, artifact_name(cfg))
    print(f"diff: {len(live)} live crosscoder latents: {({k: int(v) for k, v in counts.items()})}; wrote {path}")
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--source", help="corpus source to fine-tune on (default: the profile's), or `mix` for the "
                                    "control: more steps on the base model's own training mix")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="another seed of the whole run (fine-tune and crosscoder); written as "
                        "diff/<profile>-finetune-<source>-sN")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="fine-tune steps (default: the profile's); 0 diffs the base model against itself, the "
                        "crosscoder's floor (diff/<profile>-finetune-<source>-0step)")
    p.add_argument("--crosscoder-seed", type=int, default=None, metavar="N",
                   help="a second crosscoder on the same fine-tuned pair, from seed N (the noise floor); written "
                        "as diff/<profile>-finetune-<source>-ccN")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = args.profile_config.diff
    if args.source:
        cfg = cfg.replace(source=args.source)
    given = {k: getattr(args, k, None) for k in ("seed", "steps", "crosscoder_seed")}
    cfg = cfg.replace(**{k: v for k, v in given.items() if v is not None})
    run_stage(args.profile, cfg, progress=not args.no_progress)
    return 0


def summary(art) -> dict[str, Any]:
    """The artifact's tables, for the chapter."""
    import pandas as pd

    return {name: pd.read_parquet(art.file(f"{name}.parquet"))
            for name in ("losses", "transfer", "latents", "crosscoder_curve")}


REGISTER_RATIO = 10.0
"""A latent "of the register" fires over this many times as often on the source's held-out text as on the mix's."""


def run_stats(tables: dict[str, Any]) -> dict[str, float]:
    """The pilot's statistics of one run (``summary``'s tables): live latents, model-specific ones (r < 0.1,
    r > 0.9), the median cosine of the live latents' decoder halves, the same for the register's latents
    (density ratio source / mix above :data:`REGISTER_RATIO`, both densities floored at 1e-4) and for the
    others, and the fine-tune's loss change on each text."""
    live = live_latents(tables["latents"])
    ratio = (live.density_source + 1e-4) / (live.density_mix + 1e-4)
    reg, rest = live[ratio > REGISTER_RATIO], live[ratio <= REGISTER_RATIO]
    loss = tables["losses"].set_index(["model", "text"])["loss"]
    return {"live": len(live), "base_only": int((live.kind == "base-only").sum()),
            "finetune_only": int((live.kind == "fine-tune-only").sum()), "median_cos": float(live.cos.median()),
            "register": len(reg), "register_cos": float(reg.cos.median()) if len(reg) else float("nan"),
            "rest_cos": float(rest.cos.median()) if len(rest) else float("nan"),
            "loss_shift_mix": float(loss["finetuned", "mix"] - loss["base", "mix"]),
            "loss_shift_source": float(loss["finetuned", "source"] - loss["base", "source"])}
