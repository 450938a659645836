"""The one SAE trainer (:func:`train`), for one process or several (DDP): Adam, the decoder renormalised after
every step, dead latents tracked and handled by resampling or AuxK, checkpoints and resumption."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .. import checkpoint as checkpoint_io
from .. import hardware
from ..config import ConfigError
from .model import SAE, SAEConfig, TrainOutput, geometric_median, never_fired, resample_dead

# --- training -------------------------------------------------------------------------------------------

def _resample_due(cfg: SAEConfig, step: int) -> bool:
    """Whether dead features are resampled right after optimizer update number ``step`` (1-based)."""
    if not cfg.resample_every or cfg.architecture != "relu":
        return False
    if cfg.resample_rule == "anchor":
        # cell 11 tests `if step and step % resample_frequency == 0` on its 0-based step after that step's
        # update: after updates 1,001, 2,001, ..., 99,001 of its 100,000
        s = step - 1
        return s > 0 and s % cfg.resample_every == 0 and s < cfg.n_steps * cfg.resample_until
    return step % cfg.resample_every == 0 and step <= int(cfg.n_steps * cfg.resample_until) and step < cfg.n_steps


class TrainResult(NamedTuple):
    sae: SAE
    history: list[dict[str, float]]  # one row per logged interval: step, n_activations, loss, mse, l1,
    #                                  l0, fvu, aux, dead_fraction, resampled, seconds


def _batches(source: Tensor | Iterable[Tensor], batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Batches of exactly ``batch_size`` rows. A tensor is walked in shuffled epochs (seeded); an iterable's
    chunks of any size are re-cut, and it may be endless (a streaming activation buffer)."""
    if isinstance(source, Tensor):
        if source.ndim != 2 or source.shape[0] == 0:
            raise ConfigError(f"activations must be a non-empty (N, d_in) tensor, got shape {tuple(source.shape)}")
        n = source.shape[0]
        while True:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n - batch_size + 1, batch_size):
                yield source[order[start:start + batch_size]]
            if n < batch_size:  # tiny sources: sample with replacement
                yield source[torch.randint(n, (batch_size,), generator=gen)]
    else:
        pending: list[Tensor] = []
        have = 0
        for chunk in source:
            chunk = chunk.reshape(-1, chunk.shape[-1])
            pending.append(chunk)
            have += chunk.shape[0]
            while have >= batch_size:
                flat = torch.cat(pending)
                yield flat[:batch_size]
                rest = flat[batch_size:]
                pending, have = ([rest] if rest.shape[0] else []), rest.shape[0]


def make_optimizer(sae: SAE, fused: bool = True) -> torch.optim.Optimizer:
    """Adam at ``cfg.lr``, fused: one pass over the parameters and both moments instead of a dozen (at
    batch 896 the update of 4.2M parameters is a large share of a step). ``fused=False`` for FSDP's sharded
    parameters."""
    return torch.optim.Adam(sae.parameters(), lr=sae.cfg.lr, fused=fused)


class _Step(nn.Module):
    """:meth:`SAE.training_forward` as a module's ``forward``: DDP and FSDP act on ``forward`` (gradient
    averaging, gathering the sharded weights), so data-parallel training wraps this instead of the SAE."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, dead_mask: Tensor | None, dtype: torch.dtype) -> TrainOutput:
        return self.sae.training_forward(x, dead_mask, dtype)


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, batch: Tensor, dead_mask: Tensor | None = None,
               dtype: torch.dtype = torch.float32, step: nn.Module | None = None) -> TrainOutput:
    """One optimizer step on ``batch`` (B, d_in): :meth:`SAE.training_forward`, backward, Adam, decoder rows
    renormalised. ``dead_mask`` (n_features,) switches on AuxK (TopK). ``step``: a DDP- or FSDP-wrapped
    :class:`_Step` of ``sae`` for data-parallel training. The benchmark times this."""
    out = step(batch, dead_mask, dtype) if step is not None else sae.training_forward(batch, dead_mask, dtype)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    sae.normalize_decoder()
    return out


Parallel = Literal["ddp", "fsdp"]


class _Ranks(NamedTuple):
    rank: int
    world: int  # processes training together (1: no data parallelism)


def _ranks(parallel: Parallel | None) -> _Ranks:
    if parallel is None:
        return _Ranks(0, 1)
    import torch.distributed as td

    if not td.is_initialized():
        raise ConfigError(f"{parallel} training needs a process group: start the processes with torchrun")
    return _Ranks(td.get_rank(), td.get_world_size())


def _wrap(sae: SAE, parallel: Parallel, device: torch.device) -> nn.Module:
    """The training step of ``sae`` for data-parallel processes: DDP averages the gradients of the ranks'
    slices of a global batch, so W processes make the one-process update on it; FSDP (``fully_shard``) also
    shards the weights, gradients and Adam moments over the ranks, for SAEs that do not fit one device."""
    step = _Step(sae)
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for p in sae.parameters():  # FSDP shards flat storage
        p.data = p.data.contiguous()
    return fully_shard(step)


def _over_ranks(x: Tensor, how: Literal["cat", "max", "mean"]) -> Tensor:
    """``x`` from every rank: concatenated along dim 0, or their elementwise max or mean."""
    import torch.distributed as td

    if how == "cat":
        parts = [torch.empty_like(x) for _ in range(td.get_world_size())]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    out = x.clone()
    td.all_reduce(out, op=td.ReduceOp.MAX if how == "max" else td.ReduceOp.SUM)
    return out if how == "max" else out / td.get_world_size()


@runtime_checkable
class IndexedSource(Protocol):
    """A source whose batches are a function of the step (e.g. ``harvest.ArraySource``: seeded shuffled
    epochs over a memmap), which is what makes a resumed run see the batches an uninterrupted one sees."""

    def batch(self, step: int) -> Tensor:
        """The (batch_size, d_in) batch of optimizer step ``step`` (0-based)."""
        ...


def train(cfg: SAEConfig, source: Tensor | Iterable[Tensor] | IndexedSource, *,
          device: torch.device | str | None = None, progress: bool = True, sae: SAE | None = None,
          desc: str | None = None, checkpoint: Path | None = None, checkpoint_every: int = 500,
          log: Callable[[str], None] = print, parallel: Parallel | None = None) -> TrainResult:
    """Train an SAE on ``source``: an :class:`IndexedSource` (``source.batch(step)``), an (N, d_in) tensor
    (shuffled epochs) or an iterable of (*, d_in) batches (e.g. a streaming activation buffer). Adam, decoder
    renormalised after every step, dead latents tracked over ``cfg.dead_window`` activations and
    handled by resampling (``resample_every``, ``resample_rule``) or AuxK (TopK). Deterministic on CPU for
    a given ``cfg.seed`` and source. Returns the SAE and the curve; its ``resampled`` column counts the
    features resampled in each logged interval.

    Source batches are consumed in order: one per step and, under ``resample_rule="anchor"``, the
    ``dead_window // batch_size`` batches of each dead-detection window, which are not trained on (the
    anchor draws them from its training iterator). Batch ``i`` of an indexed source is ``source.batch(i)``.

    ``checkpoint``: a file written (atomically) every ``checkpoint_every`` steps and when SIGINT or SIGTERM
    arrives (then training stops with ``KeyboardInterrupt``), deleted when training completes. With an
    indexed source a run finds its checkpoint and resumes exactly: same weights, same curve as a run never
    stopped. Other sources cannot replay their batches, so they are checkpointed but never resumed.

    ``parallel`` (``ddp`` or ``fsdp``), in each of W processes of a ``torch.distributed`` group (``torchrun``):
    every process reads its ``batch_size / W`` rows of each global batch from ``source``, and together they
    make the one-process update on the global batch (:func:`_wrap`); ``b_dec`` starts from the whole first
    global batch and a latent counts as firing when it fired on any process. Two differences: AuxK's
    normaliser is the variance of each process's residual, so with dead latents the update differs slightly,
    and the curve's ``fvu`` is the mean of the processes' own (its other columns are the one-process ones).
    Resampling and checkpoints are one-process only.
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hardware.keep_freed_memory()
    ranks = _ranks(parallel)
    parallel = parallel if ranks.world > 1 else None
    if parallel is not None:
        if cfg.batch_size % ranks.world:
            raise ConfigError(f"the SAE batch {cfg.batch_size} is not divisible by {ranks.world} processes")
        if cfg.resample_every or checkpoint is not None:
            raise ConfigError("data-parallel SAE training has no resampling and no checkpoints: train a TopK SAE "
                              "(AuxK) with resample_every=0")
        if parallel == "fsdp" and cfg.decoder_norm_axis == "input":
            raise ConfigError("FSDP shards the decoder by rows: it cannot normalise along decoder_norm_axis='input'")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    sae = sae if sae is not None else SAE(cfg)
    sae.to(device)
    indexed = isinstance(source, IndexedSource) and not isinstance(source, Tensor)
    if indexed:
        def next_batch(i: int) -> Tensor | None:
            return source.batch(i)
    else:
        batches = _batches(source, cfg.batch_size // ranks.world, gen)

        def next_batch(i: int) -> Tensor | None:
            return next(batches, None)

    optimizer = make_optimizer(sae)
    compute_dtype = cfg.compute_dtype(device)
    since_fired = torch.zeros(cfg.n_features, dtype=torch.long, device=device)  # activations since last fire
    pool: collections.deque[Tensor] = collections.deque()
    pool_rows = 0
    anthropic_pool = bool(cfg.resample_every) and cfg.architecture == "relu" and cfg.resample_rule == "anthropic"
    history: list[dict[str, float]] = []
    sums: dict[str, float] = collections.defaultdict(float)
    n_in_interval, resampled, seconds, step = 0, 0, 0.0, 0
    drawn = 0  # source batches consumed: one per step, plus the anchor rule's dead-detection windows

    state = None
    if checkpoint is not None and checkpoint.is_file():
        if indexed:
            state = checkpoint_io.load(checkpoint, cfg.config_hash(), {"step", "sae", "optimizer", "generator"},
                                       what="SAE", fix="delete it to start afresh", log=log)
        else:
            log(f"not resuming from {checkpoint}: resuming needs an indexed source (one with .batch(step)); "
                "starting afresh")
    if state is not None:
        sae.load_state_dict(state["sae"])
        sae.to(device)
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        since_fired = state["since_fired"].to(device)
        pool = collections.deque(t.to(device) for t in state["pool"])
        pool_rows = sum(t.shape[0] for t in pool)
        history, step, seconds = state["history"], state["step"], state["seconds"]
        sums.update(state["sums"])
        n_in_interval, resampled = state["n_in_interval"], state["resampled"]
        drawn = state.get("drawn", step)  # checkpoints from before the anchor rule: one batch per step
        log(f"resuming SAE training from {checkpoint} at step {step:,}")

    def save_checkpoint() -> None:
        if checkpoint is not None:
            checkpoint_io.save(checkpoint, {
                "config": cfg.to_dict(), "config_hash": cfg.config_hash(), "step": step,
                "sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                "since_fired": since_fired.cpu(), "pool": [t.cpu() for t in pool], "history": history,
                "sums": dict(sums), "n_in_interval": n_in_interval, "resampled": resampled, "drawn": drawn,
                "seconds": seconds + time.perf_counter() - start})

    def draw() -> Tensor | None:
        """The next source batch (B, d_in) float32 on ``device``, or None when a finite stream has ended."""
        nonlocal drawn
        batch = next_batch(drawn)
        if batch is None:
            return None
        drawn += 1
        return batch.to(device, torch.float32)

    batch = draw() if step < cfg.n_steps else None
    if batch is None and state is None:
        raise ConfigError(f"the activation source gave fewer than batch_size = {cfg.batch_size} rows")
    if batch is not None and batch.shape[1] != cfg.d_in:
        raise ConfigError(f"activations have width {batch.shape[1]} but SAEConfig.d_in is {cfg.d_in}")
    if state is None:
        first = batch if parallel is None else _over_ranks(batch, "cat")  # the whole first global batch
        with torch.no_grad():
            if cfg.b_dec_init == "geometric_median":
                sae.b_dec.copy_(geometric_median(first))
            elif cfg.b_dec_init == "mean":
                sae.b_dec.copy_(first.mean(0))
            elif cfg.b_dec_init == "zeros" and cfg.init != "gao":  # "gao" draws it as zeros already
                sae.b_dec.zero_()
    step_module = None
    if parallel is not None:
        step_module = _wrap(sae, parallel, device)
        optimizer = make_optimizer(sae, fused=parallel != "fsdp")  # over the wrapped (FSDP: sharded) weights

    def interval_means() -> dict[str, float]:
        """The logged losses' means since the last row (over every process's slice of the batches)."""
        means = {k: v / n_in_interval for k, v in sums.items()}
        if parallel is not None:
            values = _over_ranks(torch.tensor(list(means.values()), dtype=torch.float64, device=device), "mean")
            means = dict(zip(means, values.tolist(), strict=True))
        return means

    bar = tqdm(total=cfg.n_steps, initial=step, desc=desc or f"SAE {cfg.architecture} {cfg.d_in}->{cfg.n_features}",
               disable=not progress or ranks.rank > 0, mininterval=1.0, leave=False)
    stop_signal: list[int] = []
    # Ctrl-C and SIGTERM only raise a flag, honoured between steps, so a checkpoint never holds half a step
    previous = checkpoint_io.catch_stop_signals(stop_signal) if checkpoint is not None else {}
    start = time.perf_counter()
    try:
        while step < cfg.n_steps:
            if batch is None:
                try:
                    batch = draw()
                except KeyboardInterrupt:  # raised by the source between steps: the state is whole
                    save_checkpoint()
                    raise
                if batch is None:  # a finite stream ran out: stop here, the curve says where
                    break
            if anthropic_pool:
                pool.append(batch)
                pool_rows += batch.shape[0]
                while pool_rows - pool[0].shape[0] >= cfg.resample_pool:
                    pool_rows -= pool.popleft().shape[0]
            dead_mask = since_fired >= cfg.dead_window
            out = train_step(sae, optimizer, batch, dead_mask if cfg.architecture == "topk" else None, compute_dtype,
                             step_module)

            with torch.no_grad():
                fired = out.fired if parallel is None else _over_ranks(out.fired.to(torch.int32), "max").bool()
                since_fired += batch.shape[0] * ranks.world
                since_fired[fired] = 0
                resid = (batch - out.recon).pow(2).sum()
                total = (batch - batch.mean(0)).pow(2).sum().clamp_min(1e-12)
                for name, value in (("loss", out.loss), ("mse", out.mse), ("l1", out.l1), ("aux", out.aux),
                                    ("l0", out.l0), ("fvu", resid / total)):
                    sums[name] += float(value.detach())
            n_in_interval += 1
            step += 1
            batch = None
            bar.update(1)

            if _resample_due(cfg, step):
                if cfg.resample_rule == "anchor":
                    # cell 11: a fresh window drawn from the stream and not trained on, encoded by the SAE as it
                    # is now (a finite stream that ends inside it leaves a shorter window, or none)
                    window = [b for b in (draw() for _ in range(cfg.dead_window // cfg.batch_size)) if b is not None]
                    inputs = torch.cat(window) if window else None
                    dead_now = never_fired(sae, inputs) if window else None
                else:
                    inputs = torch.cat(list(pool))
                    dead_now = since_fired >= min(cfg.dead_window, cfg.resample_every * cfg.batch_size)
                if dead_now is not None:
                    resampled += resample_dead(sae, optimizer, inputs, dead_now, generator=gen)
                    since_fired[dead_now] = 0

            if step % cfg.log_every == 0 or step == cfg.n_steps:
                row = {"step": step, "n_activations": step * cfg.batch_size}
                row.update(interval_means())
                row["dead_fraction"] = float((since_fired >= cfg.dead_window).float().mean())
                row["resampled"] = resampled
                row["seconds"] = seconds + time.perf_counter() - start
                history.append(row)
                bar.set_postfix(mse=f"{row['mse']:.4g}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
                sums.clear()
                n_in_interval, resampled = 0, 0
            if stop_signal:
                save_checkpoint()
                raise KeyboardInterrupt(f"SAE training stopped at step {step:,}"
                                        + (f"; {checkpoint} resumes it" if checkpoint is not None else ""))
            if step % checkpoint_every == 0 and step < cfg.n_steps:
                save_checkpoint()
    finally:
        checkpoint_io.restore_signals(previous)
        bar.close()
    if n_in_interval:  # the stream ended between two logged intervals
        history.append({"step": step, "n_activations": step * cfg.batch_size, **interval_means(),
                        "dead_fraction": float((since_fired >= cfg.dead_window).float().mean()),
                        "resampled": resampled, "seconds": seconds + time.perf_counter() - start})
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    if parallel == "fsdp":  # every process gathers the whole SAE back from the shards
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sae.state_dict().items()}
        sae = SAE(cfg)
        sae.load_state_dict({k: v.cpu() for k, v in full.items()})
        sae.to(device)
    sae.eval()
    return TrainResult(sae, history)
