"""A Stheno run rehearsed at Llama-3-8B's layer shapes on the machine at hand (issue 19, item 4).

The run a user makes on a rented GPU is ``monosemantic llama run --model <Stheno> --profile gpu``. Stheno's
weights cannot be had offline, so :func:`rehearse` makes a stand-in with its exact layer shapes and runs that
same pipeline on it, timing every stage and reading its peak memory:

- **build**: a ``LlamaForCausalLM`` with random weights and L3-8B-Stheno's ``config.json``
  (:data:`STHENO_CONFIG`: hidden 4,096, MLP 14,336, 32 heads, 8 KV heads, vocabulary 128,256, bf16 weights,
  untied unembedding) but ``n_layers`` decoder layers, written as the hub holds Stheno: bf16 safetensors
  shards and ``model.safetensors.index.json`` (:func:`monosemantic.llama.save_folder`), with a byte-level
  BPE tokenizer in ``tokenizer.json`` (:func:`stand_in_tokenizer`: GPT-2's 50,257 tokens, the one the
  project has offline, where Stheno has Llama-3's 128,256);
- **load**: :func:`~monosemantic.llama.load_model` reads the folder back; its logits must equal the
  in-memory model's (a known answer: the same bf16 weights, computed in float32);
- **bench**: :func:`~monosemantic.llama_cost.benchmark` on this machine: the FLOP/s the cost model divides by;
- **harvest**, then **train, evaluate, analyse** (:func:`~monosemantic.llama_data.harvest` and
  :func:`~monosemantic.llama_eval.train_and_store`, the two calls of ``llama run``) with the gpu profile's
  config, only the token budgets (and the SAE's width) cut to what this machine affords, in a cache of its
  own under ``cache/work/rehearsal/`` so that nothing of it reaches the committed cache or the book's runs;
- **browser**: the feature browser's data of that run (:func:`monosemantic.browser.write`).

Each stage's wall time and peak resident memory (``VmHWM``, reset at every stage's start through
``/proc/self/clear_refs``) are written beside the cost model's prediction for the same shapes
(:func:`~monosemantic.llama_cost.forward_flops_per_token`, :func:`~monosemantic.llama_cost.sae_flops_per_activation`
over the FLOP/s just measured, :func:`~monosemantic.llama_train.memory_plan`) to the artifact
``llama/<profile>-rehearsal-stheno-<n>-layers`` (``stages.parquet``; the sizes and checks in its manifest).
Only that summary is committed. ``scripts/stheno-rehearsal`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from .config import ConfigError, StageConfig, UserError, check_positive

# The fields of L3-8B-Stheno-v3.2's config.json (Llama-3-8B-Instruct's architecture), spelled as the hub's file
# spells them (transformers 4: rope_theta and torch_dtype at the top), which the loader converts on reading.
# The rehearsal sets num_hidden_layers; bos/eos are Llama-3's ids, which the stand-in tokenizer does not use.
STHENO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02,
    "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16", "use_cache": True,
}
RUN_PROFILE = "gpu"  # the profile whose Llama config the rehearsal runs (with its token budgets cut)
TOKENIZER = "GPT-2's byte-level BPE (50,257 tokens) in place of Llama-3's (128,256)"
SCRIPT = "scripts/stheno-rehearsal"
TINY_FIELDS: dict[str, Any] = dict(  # RehearsalConfig.tiny
    hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, max_shard_size="4MB",
    seq_len=32, batch_size=4, harvest_tokens=620, shard_tokens=124, expansion=2, sae_batch=64, memory_gb=1.0,
    eval_tokens=62, explain_tokens=310, heldout_tokens=124, n_boot=20, bench=False)


class RehearsalError(UserError, RuntimeError):
    """A stage of the rehearsal failed; the artifact records the stages it passed."""


@dataclasses.dataclass(frozen=True)
class RehearsalConfig(StageConfig):
    """The stand-in model and the budgets of the rehearsed run. Every field of the run not named here is the
    gpu profile's (k = 64, bf16 activation shards, ``dtype: auto``, the last layer's ``mlp.hook_post``)."""

    STAGE: ClassVar[str] = "llama"

    n_layers: int = 2
    """Decoder layers of the stand-in (Stheno has 32). The harvest reads the last one's MLP input."""
    hidden_size: int = STHENO_CONFIG["hidden_size"]
    intermediate_size: int = STHENO_CONFIG["intermediate_size"]
    num_attention_heads: int = STHENO_CONFIG["num_attention_heads"]
    num_key_value_heads: int = STHENO_CONFIG["num_key_value_heads"]
    vocab_size: int = STHENO_CONFIG["vocab_size"]
    """The shapes: Stheno's unless a test shrinks them."""
    max_shard_size: str = "1GB"
    """Largest weight shard of the folder (the hub's Stheno: four of up to 5 GB; 1 GB splits the 2-layer
    stand-in's 3 GB of bf16 weights into several, so loading reads an index as it does for Stheno)."""
    seq_len: int = 1024
    """Tokens per window: the gpu profile's."""
    batch_size: int = 2
    """Windows per forward pass (the gpu profile's 16 would hold 16 x 1,024 x 128,256 fp32 logits, 8 GB, while
    evaluating on this CPU)."""
    harvest_tokens: int = 4092
    """Activations harvested: 4 windows of 1,023 (the first position of each is skipped)."""
    shard_tokens: int = 2046
    """Activations per shard file: two windows, so that the harvest writes and the trainer reads several."""
    expansion: int = 1
    """SAE width = expansion x 14,336. The gpu profile's 8x needs ~55 GB (:func:`memory_plan`); 1x fits 24 GB."""
    sae_batch: int = 1024
    sae_epochs: float = 1.0
    memory_gb: float = 12.0
    """The SAE's memory budget on this machine (the width check of :func:`choose_width`)."""
    eval_tokens: int = 1023
    explain_tokens: int = 1023
    heldout_tokens: int = 1023
    """Held-out tokens of the evaluation, train-text tokens of the analysis's dashboards, held-out tokens of its
    scores: one window each."""
    n_boot: int = 200
    """Bootstrap replicates of the evaluation's intervals (one window: one document)."""
    bench: bool = True
    """Measure this machine's throughput first (:func:`~monosemantic.llama_cost.benchmark`) for the predictions."""
    bench_seconds: float = 2.0
    """Least time the benchmark spends timing each forward pass."""
    probe_tokens: int = 16
    """Tokens of the text whose logits the loaded folder must reproduce."""

    def __post_init__(self) -> None:
        check_positive(self, "n_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "seq_len", "batch_size", "harvest_tokens", "shard_tokens",
                       "expansion", "sae_batch", "eval_tokens", "explain_tokens", "heldout_tokens", "n_boot",
                       "probe_tokens", integer=True)
        check_positive(self, "sae_epochs", "memory_gb", "bench_seconds")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("RehearsalConfig: heads must divide hidden_size, KV heads must divide heads")

    @classmethod
    def tiny(cls, **changes: Any) -> RehearsalConfig:
        """Stheno's config.json shrunk to seconds (width 64, MLP 96, Llama-3's vocabulary kept) with budgets to
        match: the tests' rehearsal, and ``scripts/stheno-rehearsal --shape tiny``'s."""
        return cls(**{**TINY_FIELDS, **changes})

    @property
    def name(self) -> str:
        """The artifact's name: ``rehearsal-stheno-2-layers``."""
        return f"rehearsal-stheno-{self.n_layers}-layers"

    @property
    def stheno_shapes(self) -> bool:
        return all(getattr(self, k) == STHENO_CONFIG[k] for k in
                   ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"))

    def model_config(self) -> dict[str, Any]:
        """The stand-in's ``config.json`` fields: Stheno's, with these shapes and layers."""
        return {**STHENO_CONFIG, "num_hidden_layers": self.n_layers, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "vocab_size": self.vocab_size}

    def run_config(self, folder: Path, base):
        """The Llama run rehearsed: ``base`` (the gpu profile's ``LlamaConfig``) on ``folder``, with this
        machine's budgets."""
        keep = ("seq_len", "batch_size", "harvest_tokens", "shard_tokens", "expansion", "sae_batch", "sae_epochs",
                "memory_gb", "eval_tokens", "explain_tokens", "heldout_tokens", "n_boot")
        return base.replace(model=str(folder), **{k: getattr(self, k) for k in keep})


# --- measuring a stage: wall time and peak resident memory ------------------------------------------------------

def _status_gb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in GB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def rss_gb() -> float:
    """Resident memory of this process now, GB."""
    now = _status_gb("VmRSS")
    return now if now is not None else peak_rss_gb()


def peak_rss_gb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak` (or its start), GB."""
    peak = _status_gb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def reset_peak() -> bool:
    """Reset the peak to the current resident memory (Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``); False
    where that is not possible, and the peak stays the process's since its start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Stage:
    """One measured stage; ``parent`` is the stage it ran inside ("" at the top)."""

    stage: str
    parent: str
    depth: int
    parent_index: int  # the enclosing stage's position in Meter.stages (-1 at the top)
    start_rss_gb: float
    peak_rss_gb: float
    seconds: float = 0.0
    passed: bool = False
    error: str = ""


class Meter:
    """Times stages and reads each one's peak memory; stages nest (a model load inside the harvest), and an
    enclosing stage's peak includes its inner stages' (each start resets the kernel's peak, so the enclosing
    ones take the maximum so far first)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self._open: list[Stage] = []
        self.per_stage_peaks = True
        self.unmeasured: list[str] = []  # functions :meth:`around` did not find

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        peak = peak_rss_gb()
        for s in self._open:
            s.peak_rss_gb = max(s.peak_rss_gb, peak)
        self.per_stage_peaks = reset_peak() and self.per_stage_peaks
        now = rss_gb()
        s = Stage(name, self._open[-1].stage if self._open else "", len(self._open),
                  self.stages.index(self._open[-1]) if self._open else -1, now, now)
        self.stages.append(s)
        self._open.append(s)
        start = time.perf_counter()
        try:
            yield s
            s.passed = True
        except BaseException as e:
            s.error = one_line(e)
            raise
        finally:
            s.seconds = time.perf_counter() - start
            s.peak_rss_gb = max(s.peak_rss_gb, peak_rss_gb())
            self._open.pop()
            for outer in self._open:
                outer.peak_rss_gb = max(outer.peak_rss_gb, s.peak_rss_gb)

    @contextlib.contextmanager
    def around(self, function: str, name: str) -> Iterator[None]:
        """Inside the block, every call of the Llama path's ``function`` (``load_model``, ``trained``, ...) is a
        stage called ``name``: the name is rebound, for the block only, in each ``monosemantic.llama*`` module
        that holds it (they import each other's functions by name). A function the path no longer has is
        listed in :attr:`unmeasured`, and its time stays in the enclosing stage."""
        import importlib
        import pkgutil

        from . import llama

        for m in pkgutil.iter_modules(sys.modules[__package__].__path__):  # all of them now: one imported inside
            if m.name.startswith("llama"):  # the block would keep the wrapper for good
                importlib.import_module(f"{__package__}.{m.name}")
        try:
            original = getattr(llama, function)
        except AttributeError:
            self.unmeasured.append(function)
            yield
            return

        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return original(*args, **kwargs)

        modules = [m for key, m in list(sys.modules.items())
                   if key.startswith("monosemantic.llama") and vars(m).get(function) is original]
        for m in modules:
            setattr(m, function, measured)
        try:
            yield
        finally:
            for m in modules:
                setattr(m, function, original)


def _load_average() -> float | None:
    """The machine's 1-minute load average (how many processes wanted a core), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def private_cache(path: Path) -> Iterator[Path]:
    """Inside the block every artifact and work file goes to ``path`` (``$MONOSEMANTIC_CACHE``)."""
    old = os.environ.get("MONOSEMANTIC_CACHE")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["MONOSEMANTIC_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("MONOSEMANTIC_CACHE", None)
        else:
            os.environ["MONOSEMANTIC_CACHE"] = old


# --- the stand-in model -------------------------------------------------------------------------------------------

def stand_in_tokenizer():
    """A Hugging Face fast tokenizer (``tokenizer.json``) built offline from the GPT-2 BPE files the project
    ships (:func:`monosemantic.tokenizer.bpe_files`): byte-level BPE like Llama-3's, so tokens map back to bytes
    the same way, with ``<|endoftext|>`` (50256) as EOS; 50,257 tokens where Llama-3 has 128,256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import EOT, bpe_files

    vocab_bpe, encoder_json = bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split and byte map
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT,
                                   model_max_length=STHENO_CONFIG["max_position_embeddings"])


def folder_name(cfg: RehearsalConfig) -> str:
    """The stand-in's folder (its name is the run's model slug: ``l3-8b-stheno-v3-2-2-layers-random``)."""
    return f"L3-8B-Stheno-v3.2-{cfg.n_layers}-layers-random"


def probe_ids(cfg: RehearsalConfig, tokenizer) -> torch.Tensor:
    """(1, probe_tokens) tokens of a fixed text: the input whose logits the loaded folder must reproduce."""
    text = "The rehearsal loads the sharded folder and must give back the logits of the model it wrote. " * 4
    ids = tokenizer.encode(text)[:cfg.probe_tokens]
    return torch.tensor([ids])


@torch.no_grad()
def build_folder(cfg: RehearsalConfig, folder: Path) -> dict[str, Any]:
    """Write the stand-in (random weights, seeded) as a sharded bf16 Hugging Face folder; return its sizes, the
    probe tokens and their logits computed from the saved (bf16-rounded) weights in float32."""
    from transformers import AutoConfig, LlamaForCausalLM

    from . import llama

    folder.mkdir(parents=True, exist_ok=True)
    hub_config = json.dumps(cfg.model_config(), indent=2) + "\n"
    (folder / "config.json").write_text(hub_config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(folder))  # the config as the loader will read it
    for w in model.parameters():  # Stheno's weights are bf16 (buffers such as RoPE's frequencies stay fp32:
        w.data = w.data.to(torch.bfloat16)  # the loader computes them, it does not read them)
    tokenizer = stand_in_tokenizer()
    llama.save_folder(llama.LlamaSource(model, tokenizer, folder.name), folder, max_shard_size=cfg.max_shard_size)
    (folder / "config.json").write_text(hub_config)  # the hub's spelling, not the one transformers writes
    for w in model.parameters():  # the saved weights, computed in float32 (as the check below loads them)
        w.data = w.data.float()
    ids = probe_ids(cfg, tokenizer)
    logits = model(input_ids=ids, use_cache=False).logits  # (1, T, vocab)
    n_params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    del model
    gc.collect()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    return {"probe_ids": ids, "reference_logits": logits, "n_params": n_params, "params_per_layer": per_layer,
            "n_shards": len(shards), "shard_files": shards, "n_tensors": len(index["weight_map"]),
            "weights_bytes": int(index["metadata"]["total_size"]),
            "folder_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file())}


@torch.no_grad()
def check_folder(cfg: RehearsalConfig, folder: Path, built: dict[str, Any]) -> dict[str, Any]:
    """Load the folder as the run does (:func:`monosemantic.llama.load_model`, float32) and check it: the
    logits of the probe against the in-memory model's, the config, the hook and its width."""
    from . import llama

    source = llama.load_model(str(folder), device="cpu", dtype="float32")
    try:
        logits = source.forward(built["probe_ids"]).logits.float().cpu()
        diff = float((logits - built["reference_logits"]).abs().max())
        hook = source.default_hook
        checks = {"logits_max_abs_diff": diff,
                  "loaded_params": sum(p.numel() for p in source.model.parameters()),
                  "loaded_layers": source.n_layers, "default_hook": hook, "hook_width": source.width(hook),
                  "tokenizer_class": type(source.tokenizer).__name__, "tokenizer_vocab": len(source.tokenizer)}
    finally:
        del source
        gc.collect()
    return checks


# --- the rehearsal --------------------------------------------------------------------------------------------

def predictions(cfg: RehearsalConfig, run_cfg, throughput: dict[str, Any] | None, n_params: int, n_features: int,
                train_activations: int) -> dict[str, tuple[float | None, float | None, str]]:
    """What the cost model says each stage takes at these shapes: stage -> (seconds, GB, basis)."""
    from . import llama

    fwd = llama.forward_flops_per_token(cfg.n_layers, cfg.hidden_size, cfg.intermediate_size,
                                        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.seq_len)
    sae = llama.sae_flops_per_activation(cfg.intermediate_size, n_features)
    plan = llama.memory_plan(cfg.intermediate_size, n_features, cfg.sae_batch)
    weights = 4 * n_params / 1e9
    out: dict[str, tuple[float | None, float | None, str]] = {
        "build": (None, weights, "fp32 weights"), "load": (None, weights, "fp32 weights"),
        "load model": (None, weights, "fp32 weights")}
    rate = throughput or {}
    out["harvest"] = (run_cfg.harvest_tokens * fwd / rate["forward_flop_per_s"] if rate else None, None,
                      f"{fwd / 1e9:.2f} GFLOP/token x tokens / measured FLOP/s (self time)")
    out["train SAE"] = (train_activations * sae / rate["sae_flop_per_s"] if rate else None, plan.total_gb,
                        f"{sae / 1e9:.2f} GFLOP/activation / measured FLOP/s; memory_plan")
    return out


def _run_facts(cfg: RehearsalConfig, run_cfg, inner, pages: dict[str, int]) -> dict[str, Any]:
    """What the rehearsed run left in its private cache: the harvest's shards, the SAE, the browser's pages,
    the run's own artifact (``inner``); read while that cache is the current one."""
    import pandas as pd

    from . import llama

    shards = llama.Shards(llama.run_dir(RUN_PROFILE, run_cfg) / "acts")
    info, hw = inner.manifest.get("info", {}), inner.manifest["hardware"]
    history = pd.read_parquet(inner.file("history.parquet"))
    return {
        "hook": info.get("hook"), "activation_width": shards.width, "activation_rows": shards.rows,
        "activation_shards": len(shards.files), "activation_bytes": sum(p.stat().st_size for p, _ in shards.files),
        "n_features": int(info.get("sae_config", {}).get("n_features", cfg.expansion * shards.width)),
        "model_dtype": info.get("model", {}).get("dtype"),
        "sae_dtype": hw.get("compute_dtype", {}).get("sae", {}).get("dtype"),
        "train_activations": int(inner.metrics.get("train_activations", 0)),
        "train_loop_seconds": round(float(history["seconds"].max()), 2),  # the SAE's steps alone (its curve's clock)
        "dtype_measurements": hw.get("compute_dtype", {}),  # what dtype "auto" measured, on its first run here
        "browser_units": int(pages.get("units", 0)), "browser_bytes": int(pages.get("bytes", 0)),
        "pipeline_artifact": inner.key,
        "pipeline_metrics": {k: inner.metrics[k] for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered",
                                                           "harvest_seconds", "train_seconds", "eval_seconds",
                                                           "analysis_seconds") if k in inner.metrics},
        "pipeline_files": {k: v["bytes"] for k, v in inner.manifest["files"].items()}}


def _stage_table(meter: Meter, pred: dict[str, tuple[float | None, float | None, str]]) -> Any:
    """One row per measured stage with its own time (less its inner stages'), peak memory and prediction."""
    import pandas as pd

    rows = []
    for i, s in enumerate(meter.stages):
        inner_s = sum(c.seconds for c in meter.stages if c.parent_index == i)
        p_s, p_gb, basis = pred.get(s.stage, (None, None, ""))
        rows.append({"stage": s.stage, "parent": s.parent, "depth": s.depth, "seconds": round(s.seconds, 2),
                     "self_seconds": round(s.seconds - inner_s, 2), "peak_rss_gb": round(s.peak_rss_gb, 3),
                     "start_rss_gb": round(s.start_rss_gb, 3),
                     "predicted_seconds": None if p_s is None else round(p_s, 2),
                     "predicted_gb": None if p_gb is None else round(p_gb, 3), "basis": basis,
                     "passed": s.passed, "error": s.error})
    return pd.DataFrame(rows)


def _metrics(cfg: RehearsalConfig, run_cfg, table, built: dict[str, Any], facts: dict[str, Any],
             throughput: dict[str, Any] | None, total: float, failure: str) -> dict[str, Any]:
    """The manifest's headline numbers: sizes, checks, and measured against predicted time and memory."""
    top = table[table["depth"] == 0] if len(table) else table

    def own(stage: str, column: str) -> float | None:
        hit = table[table["stage"] == stage] if len(table) else table
        return None if not len(hit) or hit[column].isna().all() else float(hit[column].iloc[0])

    m: dict[str, Any] = {
        "completed": not failure and "browser" in set(top.loc[top["passed"], "stage"]) if len(top) else False,
        "stages_passed": int(table["passed"].sum()) if len(table) else 0, "stages": len(table),
        "total_seconds": round(total, 1),
        "peak_rss_gb": round(float(table["peak_rss_gb"].max()), 3) if len(table) else 0.0,
        "baseline_rss_gb": round(float(table["start_rss_gb"].iloc[0]), 3) if len(table) else 0.0,  # before any
        "n_layers": cfg.n_layers, "d_model": cfg.hidden_size, "d_mlp": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len, "stheno_shapes": cfg.stheno_shapes,
        "n_features": facts.get("n_features", cfg.expansion * cfg.intermediate_size), "expansion": cfg.expansion,
        "k": run_cfg.k, "harvest_tokens": cfg.harvest_tokens,
        # the cost model's disk: activations x width x the shards' bytes per value
        "activation_predicted_bytes": cfg.harvest_tokens * cfg.intermediate_size
        * getattr(torch, run_cfg.store_dtype).itemsize}
    m.update({k: built[k] for k in ("n_params", "params_per_layer", "n_shards", "n_tensors", "weights_bytes",
                                    "folder_bytes") if k in built})
    m.update({k: facts[k] for k in ("activation_width", "activation_shards", "activation_bytes", "train_activations",
                                    "browser_units", "train_loop_seconds") if k in facts})
    if "checks" in facts:
        m["logits_max_abs_diff"] = facts["checks"]["logits_max_abs_diff"]
        width = facts.get("activation_width", facts["checks"]["hook_width"])
        m["width_is_intermediate_size"] = width == cfg.intermediate_size
    if throughput:
        m.update({k: throughput[k] for k in ("forward_flop_per_s", "sae_flop_per_s")})
    for stage, key, column in (("harvest", "harvest", "self_seconds"), ("train SAE", "train", "seconds")):
        if own(stage, column) is not None:
            m[f"{key}_seconds"] = own(stage, column)
        if own(stage, "predicted_seconds") is not None:
            m[f"{key}_predicted_seconds"] = own(stage, "predicted_seconds")
    if own("train SAE", "predicted_gb") is not None:
        m["train_predicted_gb"] = own("train SAE", "predicted_gb")
        m["train_peak_rss_gb"] = own("train SAE", "peak_rss_gb")
    return m


def rehearse(cfg: RehearsalConfig, base, *, profile: str = "cpu",
             throughput: dict[str, Any] | None = None, progress: bool = True, command: str | None = None,
             keep: bool = True, log=print):
    """Build the stand-in, run the gpu profile's pipeline on it stage by stage, and write the artifact
    ``llama/<profile>-<cfg.name>`` (returned, loaded). ``base``: the gpu profile's ``LlamaConfig``, the run
    rehearsed (:meth:`RehearsalConfig.run_config`). ``throughput``: a benchmark row to predict from instead
    of measuring one. ``keep=False`` deletes the scratch folder afterwards (the stand-in's weights, its
    activations, the run's own artifact and SAE, its browser pages). A failing stage stops the run; the
    artifact still records what passed, then :class:`RehearsalError` says which stage failed."""
    from . import browser, hardware, llama, store
    from .config import work_dir

    scratch = work_dir() / "rehearsal" / f"{profile}-{cfg.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    folder = scratch / folder_name(cfg)
    run_cfg = cfg.run_config(folder, base)
    meter = Meter()
    built: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    failure = ""
    load_start = _load_average()
    start = time.perf_counter()
    try:
        with meter.stage("build"):
            built = build_folder(cfg, folder)
        log(f"rehearsal: {built['n_params'] / 1e9:.2f}B parameters in {built['n_shards']} shards, {folder}")
        with meter.stage("load"):
            facts["checks"] = check_folder(cfg, folder, built)
        log(f"rehearsal: the folder loads; logits differ from the in-memory model's by at most "
            f"{facts['checks']['logits_max_abs_diff']:.3g}")
        if throughput is None and cfg.bench:
            with meter.stage("bench"):
                throughput = llama.benchmark(n_layers=cfg.n_layers, seq_len=256, batch=1,
                                             sae_features=cfg.expansion * cfg.intermediate_size, sae_batch=256,
                                             steps=2, seconds=cfg.bench_seconds, write=False)
        with private_cache(scratch / "cache"):  # the two calls of `llama run`, each stage inside them measured
            with meter.stage("harvest"), meter.around("load_model", "load model"):
                llama.harvest(run_cfg, RUN_PROFILE, progress=progress)
            with (meter.stage("train, evaluate, analyse"), meter.around("load_model", "load model"),
                  meter.around("trained", "train SAE"), meter.around("evaluate_many", "evaluate"),
                  meter.around("analyze_features", "analyse")):
                inner = llama.train_and_store(run_cfg, RUN_PROFILE, progress=progress)
            with meter.stage("browser"):
                pages = browser.write(inner, scratch / "browser", reuse=False)
            facts.update(_run_facts(cfg, run_cfg, inner, pages))
    except Exception as e:  # noqa: BLE001 (recorded, then raised as one line below)
        failure = one_line(e)
        log(f"rehearsal: failed: {failure}")
    total = time.perf_counter() - start

    planned = max(1, int(cfg.sae_epochs * cfg.harvest_tokens) // cfg.sae_batch) * cfg.sae_batch  # as llama.train
    pred = predictions(cfg, run_cfg, throughput, built.get("n_params", 0),
                       facts.get("n_features", cfg.expansion * cfg.intermediate_size),
                       facts.get("train_activations") or planned)
    table = _stage_table(meter, pred)
    with store.write("llama", profile, cfg.name, config=cfg,
                     command=command or f"{SCRIPT} --profile {profile}") as w:
        w.wall_time_s = total
        table.to_parquet(w.dir / "stages.parquet", index=False)
        w.metrics.update(_metrics(cfg, run_cfg, table, built, facts, throughput, total, failure))
        w.info.update({
            "failure": failure, "run_config": run_cfg.to_dict(), "run_profile": RUN_PROFILE,
            "model_config": cfg.model_config(), "tokenizer": TOKENIZER, "throughput": throughput or {},
            "peaks_per_stage": meter.per_stage_peaks, "unmeasured_functions": meter.unmeasured,
            "load_average": {"start": load_start, "end": _load_average()},  # other work sharing the cores
            "hardware": hardware.describe(), "scratch": str(scratch),
            **{k: v for k, v in facts.items() if k != "checks"}, "checks": facts.get("checks", {}),
            "shard_files": built.get("shard_files", [])})
    art = store.load("llama", profile, cfg.name)
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    if failure:
        failed = max((s for s in meter.stages if s.error), key=lambda s: s.depth, default=None)  # the innermost
        raise RehearsalError(f"the rehearsal stopped{f' in {failed.stage!r}' if failed else ''}: {failure} "
                             f"(passed: {', '.join(table.loc[table['passed'], 'stage'])}; see {art.key})")
    return art


def stage_table(art) -> Any:
    """The artifact's stages for a reader: one row per stage (inner ones indented), wall time, peak memory, and
    the cost model's prediction where it makes one."""
    import pandas as pd

    t = pd.read_parquet(art.file("stages.parquet"))

    def num(v: Any, fmt: str) -> str:
        return "—" if v is None or pd.isna(v) else fmt.format(v)

    return pd.DataFrame({
        "stage": ["\u2003" * int(d) + s for s, d in zip(t["stage"], t["depth"], strict=True)],
        "wall time (s)": [num(v, "{:,.0f}") for v in t["seconds"]],
        "predicted (s)": [num(v, "{:,.0f}") for v in t["predicted_seconds"]],
        "peak memory (GB)": [num(v, "{:.1f}") for v in t["peak_rss_gb"]],
        "predicted (GB)": [num(v, "{:.1f}") for v in t["predicted_gb"]],
        "passed": ["yes" if p else "no" for p in t["passed"]]})


# --- command line (scripts/stheno-rehearsal) ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from .config import PROFILES

    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, help=f"decoder layers of the stand-in (default {RehearsalConfig.n_layers})")
    p.add_argument("--tokens", type=int, help="activations to harvest (default "
                                              f"{RehearsalConfig.harvest_tokens:,}: 4 windows)")
    p.add_argument("--expansion", type=int, help=f"SAE width / MLP width (default {RehearsalConfig.expansion})")
    p.add_argument("--memory-gb", type=float, help=f"SAE memory budget (default {RehearsalConfig.memory_gb:g})")
    p.add_argument("--shape", choices=("stheno", "tiny"), default="stheno",
                   help="stheno: Llama-3-8B's layers (minutes); tiny: the tests' (seconds, filed under tiny)")
    p.add_argument("--profile", choices=PROFILES, help="profile the artifact is filed under (default: cpu; tiny "
                                                       "for --shape tiny)")
    p.add_argument("--keep", action="store_true", help="keep the stand-in model, activations and run in "
                                                       "cache/work/rehearsal/ (about 6 GB at 2 layers)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    base = RehearsalConfig.tiny() if args.shape == "tiny" else RehearsalConfig()
    changes = {"n_layers": args.layers, "harvest_tokens": args.tokens, "expansion": args.expansion,
               "memory_gb": args.memory_gb}
    cfg = base.replace(**{k: v for k, v in changes.items() if v is not None})
    profile = args.profile or ("tiny" if args.shape == "tiny" else "cpu")
    command = " ".join([SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    try:
        from . import profiles  # this command line resolves the rehearsed profile; rehearse() takes its config

        art = rehearse(cfg, profiles.get(RUN_PROFILE).llama, profile=profile, progress=not args.no_progress,
                       command=command, keep=args.keep)
    except UserError as e:
        print(f"{SCRIPT}: {e}", file=sys.stderr)
        return 1
    print(stage_table(art).to_string(index=False))
    print(f"{SCRIPT}: wrote {art.key} ({art.metrics['total_seconds']:.0f} s, peak {art.metrics['peak_rss_gb']:.1f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
