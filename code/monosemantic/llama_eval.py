"""A Llama run measured by the one-layer model's code: :func:`monosemantic.metrics.run_evaluation` for the
SAE's fidelity (FVU, L0, dead latents, CE loss recovered, with intervals over held-out documents) and
:func:`monosemantic.analysis.analyze` for its features and the layer's neurons (dashboards, explain-then-predict
and specificity scores, logit effects). Both read the model through :class:`LayerModel`, so the manifest's
numbers have the names and the definitions of the one-layer SAEs'. :func:`train_and_store` runs the whole
thing and writes ``llama/<profile>-<run>``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from .llama import LlamaConfig, LlamaError, LlamaSource, Splice, load_model, parse_hook
from .llama_data import Shards, corpus_texts, dist_info, run_dir, token_stream
from .llama_train import trained

# --- the model as the shared stages read one -------------------------------------------------------------------


class AnalysisTokenizer:
    """A Llama tokenizer as :func:`monosemantic.analysis.analyze` reads one: bytes and text of tokens, the
    document separator (EOS: :func:`~monosemantic.llama_data.windows` ends every document with it) and the
    real vocabulary size."""

    def __init__(self, source: LlamaSource):
        self.source = source
        self.eot_id = int(getattr(source.tokenizer, "eos_token_id", None) or 0)
        self.n_vocab = len(source.tokenizer) if hasattr(source.tokenizer, "__len__") else source.model.config.vocab_size

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        return self.source.token_bytes(ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self.source.token_strings(ids)


class LayerModel:
    """One hook of a Llama model as the one-layer model's stages read their LM: the analysis
    (``config``, ``run_with_cache``, ``logit_effects``, ``n_vocab``) and the evaluation (``parameters``,
    ``model(ids).logits``, ``with model.hooks({hook: fn})``). Each window of T tokens runs after ``prefix``
    EOS tokens, which take the attention sink's outlier activations (as the harvest's ``skip_first`` positions
    do, which the SAE never saw) and are never returned, spliced or scored: activations and logits are the
    window's T positions only."""

    def __init__(self, source: LlamaSource, hook: str, window: int, prefix: int = 1):
        self.source, self.hook, self.prefix = source, hook, prefix
        tokenizer = AnalysisTokenizer(source)
        self.eos, self.n_vocab = tokenizer.eot_id, tokenizer.n_vocab
        self.config = SimpleNamespace(context_length=window, d_mlp=source.width(hook),
                                      vocab_size=source.model.config.vocab_size)
        self._splice: Callable[[torch.Tensor, str], torch.Tensor] | None = None

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.source.model.parameters()

    def _prefixed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)  # (B, T)
        return torch.cat([ids.new_full((ids.shape[0], self.prefix), self.eos), ids], dim=1)  # (B, prefix + T)

    def run_with_cache(self, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The hook's activations (B, T, d) float32 on the CPU, under every name asked for."""
        acts = self.source.run_with_hooks(self._prefixed(ids), [self.hook])[self.hook][:, self.prefix:].cpu()
        return dict.fromkeys(names, acts)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        """``.logits`` (B, T, vocab) of the window's positions, with the splice of :meth:`hooks` in place."""
        splice: dict[str, Splice] | None = None
        if self._splice is not None:
            fn, p = self._splice, self.prefix

            def window_only(x: torch.Tensor) -> torch.Tensor:  # the prefix's positions pass through
                return torch.cat([x[:, :p], fn(x[:, p:], self.hook).to(x.dtype)], dim=1)
            splice = {self.hook: window_only}
        logits = self.source.forward(self._prefixed(ids), splice=splice).logits
        return SimpleNamespace(logits=logits[:, self.prefix:])

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, Callable[[torch.Tensor, str], torch.Tensor]]) -> Iterator[None]:
        """Inside the block, forward passes replace the hook's activation (B, T, d) at the window's positions
        by ``fn(activation, hook)``, as the one-layer LM's ``hooks`` does."""
        if set(fns) - {self.hook}:
            raise LlamaError(f"this model reads {self.hook} only, not {', '.join(sorted(set(fns) - {self.hook}))}")
        self._splice = fns.get(self.hook)
        try:
            yield
        finally:
            self._splice = None

    @torch.no_grad()
    def logit_effects(self, directions: torch.Tensor) -> torch.Tensor:
        """(n, vocab) direct effect on the logits of writing each direction into the layer: for the MLP's
        hidden layer through ``down_proj``, then the final RMSNorm's gain (not its data-dependent scale)
        and the unembedding. Only the direct path: exact for the last layer, partial for earlier ones."""
        layer, site = parse_hook(self.hook, self.source.n_layers)
        d = directions.float().to(self.source.device)  # the weights may live on a GPU; the result comes back
        if site == "mlp.hook_post":
            d = d @ self.source.model.model.layers[layer].mlp.down_proj.weight.float().t()
        elif site == "mlp.hook_pre":
            raise LlamaError("logit effects need a site that writes into the residual stream or the MLP output")
        d = d * self.source.model.model.norm.weight.float()
        return (d @ self.source.model.lm_head.weight.float().t()).cpu()


def layer_model(cfg: LlamaConfig, source: LlamaSource) -> LayerModel:
    """The run's hook read in windows of ``seq_len - skip_first`` tokens after ``skip_first`` EOS tokens."""
    return LayerModel(source, source.hook_name(cfg.layer, cfg.site), cfg.seq_len - cfg.skip_first,
                      prefix=cfg.skip_first)


# --- held-out text ---------------------------------------------------------------------------------------------

SPREAD_READ = 16  # held-out text read, in multiples of what is measured: the pool HeldOut.spread draws from


class HeldOut(NamedTuple):
    """Held-out windows: consecutive windows of documents that neither the harvest nor the SAE saw."""

    x: torch.Tensor  # (W, T) int64 tokens, T = seq_len - skip_first
    y: torch.Tensor  # (W, T) int64 next tokens
    documents: np.ndarray  # (W,) the document each window starts in (the unit of the bootstrap)

    def first(self, n_tokens: int) -> HeldOut:
        """The first windows holding at least ``n_tokens`` tokens (all of them when there are fewer)."""
        n = math.ceil(n_tokens / self.x.shape[1])
        return HeldOut(self.x[:n], self.y[:n], self.documents[:n])

    def spread(self, n_tokens: int) -> HeldOut:
        """Windows holding at least ``n_tokens`` tokens, spread over as many documents as they can be: the first
        window starting in each document, in stream order, then each document's second, and so on (fixed by
        the text alone, before anything is measured); kept in stream order. Long documents no longer fill the
        sample, so a bootstrap over documents has many to resample."""
        n = min(math.ceil(n_tokens / self.x.shape[1]), len(self.x))
        docs = np.asarray(self.documents)
        starts = np.r_[0, np.flatnonzero(np.diff(docs)) + 1]  # windows are in stream order: runs of one document
        rank = np.arange(len(docs)) - np.repeat(starts, np.diff(np.r_[starts, len(docs)]))
        keep = np.sort(np.lexsort((np.arange(len(docs)), rank))[:n])
        return HeldOut(self.x[keep], self.y[keep], docs[keep])


def heldout_windows(cfg: LlamaConfig, source: LlamaSource, profile: str, texts: Iterable[str] | None = None) -> HeldOut:
    """Held-out text in windows, up to :data:`SPREAD_READ` times ``max(eval_tokens, heldout_tokens)`` tokens (the
    evaluation and the analysis take :meth:`HeldOut.spread` of them): the corpus's validation split
    (documents the harvest, which reads the train split, never saw), each document then EOS as the harvest
    packs them; with explicit ``texts``, what follows the windows a one-process harvest of ``harvest_tokens``
    read (whole batches of ``batch_size`` windows)."""
    from .harvest import split_windows
    from .intervals import window_documents

    T = cfg.seq_len - cfg.skip_first
    # enough text for HeldOut.spread to reach many documents (all of a small validation split)
    n_windows = SPREAD_READ * math.ceil(max(cfg.eval_tokens, cfg.heldout_tokens) / T)
    harvested = math.ceil(math.ceil(cfg.harvest_tokens / T) / cfg.batch_size) * cfg.batch_size  # windows
    skip = harvested * cfg.seq_len if texts is not None else 0
    stream = token_stream(source, texts if texts is not None else corpus_texts(profile, "val"),
                          skip + n_windows * T + 1)[skip:]
    if len(stream) < T + 1:
        raise LlamaError("no text left for evaluation after the harvested windows; lower harvest_tokens")
    x, y = split_windows(stream, T)
    x, y = x[:n_windows], y[:n_windows]
    eos = getattr(source.tokenizer, "eos_token_id", None)
    docs = window_documents(stream, np.arange(len(x)) * T, -1 if eos is None else int(eos))
    return HeldOut(x, y, docs)


# --- evaluation and analysis ---------------------------------------------------------------------------------

class EvalResult(NamedTuple):
    metrics: dict[str, Any]  # metrics.METRIC_NAMES, <headline metric>_low/_high, n_documents
    evaluation: Any  # monosemantic.metrics.Evaluation: density, histogram, per-window sums


@torch.no_grad()
def evaluate_many(cfg: LlamaConfig, source: LlamaSource, saes, held: HeldOut) -> list[EvalResult]:
    """The one-layer SAEs' evaluation (:func:`monosemantic.metrics.run_evaluations`) on the held-out windows,
    with each SAE spliced into the running model at the run's hook (the clean and ablated passes shared): MSE,
    FVU, L0, dead and ultra-low fractions, the four CE losses and the loss recovered against zero- and
    mean-ablation, and 95% intervals of the headline metrics over held-out documents
    (:func:`monosemantic.metrics.metric_intervals`; none when the windows come from one document). The model
    runs in its own dtype, the SAEs in float32."""
    from . import metrics
    from .evaluation import headline_metrics
    from .harvest import window_batches

    model = layer_model(cfg, source)
    saes = [sae.to(source.device).eval() for sae in saes]
    windows = window_batches(held.x, held.y, np.arange(len(held.x)), cfg.batch_size)
    n_documents = int(len(np.unique(held.documents)))
    out = []
    for ev in metrics.run_evaluations(model, saes, windows, hook=model.hook, dtype="model"):
        intervals = {}
        if n_documents > 1:  # a bootstrap over one document has nothing to resample
            cis = metrics.metric_intervals(ev, held.documents, n_boot=cfg.n_boot, seed=cfg.seed)
            intervals = {k: v for k, v in headline_metrics(cis).items() if k not in ev.metrics}
        out.append(EvalResult({**ev.metrics, **intervals, "n_documents": n_documents}, ev))
    return out


def evaluate(cfg: LlamaConfig, source: LlamaSource, sae, held: HeldOut) -> EvalResult:
    """:func:`evaluate_many` of one SAE."""
    return evaluate_many(cfg, source, [sae], held)[0]


def analysis_config(cfg: LlamaConfig):
    """The one-layer analysis's settings, sized for a Llama run (its explanation and held-out text)."""
    from .analysis import AnalysisConfig

    return AnalysisConfig(explain_tokens=cfg.explain_tokens, batch_windows=cfg.batch_size, top_contexts=12)


def analyze_features(cfg: LlamaConfig, profile: str, source: LlamaSource, sae, *, progress: bool = True,
                     held: HeldOut | None = None, texts: Iterable[str] | None = None) -> dict[str, Any]:
    """:func:`monosemantic.analysis.analyze` on this run's layer: the SAE's features (set ``topk``) and the
    layer's neurons (``neurons``), read on the first ``explain_tokens`` of the train text (``texts`` instead
    when given) and scored on the first ``heldout_tokens`` of the held-out windows (:func:`heldout_windows`)."""
    from . import analysis

    hook = source.hook_name(cfg.layer, cfg.site)
    held = held if held is not None else heldout_windows(cfg, source, profile)
    explain = token_stream(source, texts if texts is not None else corpus_texts(profile, "train"), cfg.explain_tokens)
    acfg = analysis_config(cfg)
    sets = [analysis.UnitSet.from_sae(analysis.MAIN_SAE, sae)]
    if cfg.site.startswith("mlp."):
        sets.insert(0, analysis.UnitSet.neurons(source.width(hook)))
    if cfg.site.startswith("mlp."):
        # a gated MLP's neurons take both signs: its half-neurons, k per token, are a neuron baseline with the
        # SAE's L0 (and its width when the SAE is 2x)
        sets.append(analysis.UnitSet.neuron_topk(analysis.NEURON_TOPK, source.width(hook), sae.cfg.k))
    if acfg.random_dictionary:  # the chance control: the SAE's width, k and centre, random directions
        sets.append(analysis.UnitSet.random_dictionary(analysis.RANDOM_DICTIONARY, sae.cfg.d_in, sae.cfg.n_features,
                                                       sae.cfg.k, seed=cfg.seed, centre=sae.b_dec))
    return analysis.analyze(layer_model(cfg, source), AnalysisTokenizer(source), sets, explain,
                            held.spread(cfg.heldout_tokens).x.numpy(), acfg, progress=progress)


# --- the whole run (harvest -> train -> evaluate -> analyse -> cache) --------------------------------------------

def artifact_name(cfg: LlamaConfig, n_features: int) -> str:
    return f"{cfg.run_name}-topk{cfg.k}-{n_features}"


PAIRED_METRICS = ("ce_loss_recovered", "ce_loss_recovered_mean_ablation", "fvu")
"""What a run with another width is compared on, paired with its profile's own run (``<metric>_minus_own``)."""


def own_run(cfg: LlamaConfig, profile: str, own: LlamaConfig):
    """The cached run of ``profile`` made with its own settings ``own``, when ``cfg`` differs from them in the
    width alone (same model, hook, harvest, training and evaluation): the run a width is compared with, paired.
    None when there is none, or when ``cfg`` is ``own``."""
    from . import store

    def but_width(c) -> dict:
        return {k: v for k, v in json.loads(json.dumps(c if isinstance(c, dict) else c.to_dict())).items()
                if k != "expansion"}

    if cfg == own or but_width(cfg) != but_width(own):
        return None
    wanted = json.loads(json.dumps(own.to_dict()))
    for a in store.list_artifacts("llama"):
        if a.profile == profile and a.config == wanted and a.name.startswith(f"{own.run_name}-topk{own.k}-"):
            return store.load("llama", profile, a.name)
    return None


def train_and_store(cfg: LlamaConfig, profile: str, *, source: LlamaSource | None = None,
                    texts: Callable[[], Iterable[str]] | None = None, fsdp: bool = False,
                    progress: bool = True, tables_in_work: bool = False, paired_with=None):
    """Train the SAE on the harvested shards, evaluate it, analyse its features and the layer's neurons, and
    write the artifact ``llama/<profile>-<name>``: metrics under the one-layer SAEs' names (the evaluation's
    :data:`monosemantic.metrics.METRIC_NAMES` with intervals, the analysis's
    :func:`monosemantic.analysis.summary_metrics`, and the measured throughputs the cost model reads), the
    analysis's tables (:data:`monosemantic.analysis.TABLES`: units, dashboards, logit effects; the browser and
    chapter 04 read them), the training curve, and the fp16 SAE (SAELens format) in ``cache/work``.
    ``texts``: a function giving the text to read instead of the corpus (the train text, then the held-out
    text after what the harvest consumed). ``tables_in_work``: keep the analysis's tables in ``cache/work`` (a
    run with other settings than its profile's, whose tables no chapter reads; the manifest records where).
    ``paired_with``: the profile's own run (:func:`own_run`) when this one differs from it in width only; both
    SAEs are then evaluated in one pass over the same windows, and the differences :data:`PAIRED_METRICS`
    (this minus that) are recorded with intervals over documents. Only rank 0 evaluates and writes."""
    import pandas as pd

    from . import analysis, store
    from . import sae as sae_mod

    out = trained(cfg, profile, fsdp=fsdp, progress=progress)
    if dist_info().rank != 0:
        return None
    source = source or load_model(cfg.model, dtype=cfg.dtype)
    shards = Shards(run_dir(profile, cfg) / "acts")
    hook = source.hook_name(cfg.layer, cfg.site)
    if source.width(hook) != out.sae.cfg.d_in:
        raise LlamaError(f"the SAE reads {out.sae.cfg.d_in} numbers but {hook} of {cfg.model} has "
                         f"{source.width(hook)}: the shards and the model do not match")
    held = heldout_windows(cfg, source, profile, texts() if texts else None)
    eval_start = time.perf_counter()
    eval_held = held.spread(cfg.eval_tokens)
    other = load_sae(paired_with) if paired_with is not None else None
    if other is not None and other.cfg.d_in != out.sae.cfg.d_in:
        raise LlamaError(f"{paired_with.key} reads {other.cfg.d_in} numbers, this SAE {out.sae.cfg.d_in}: "
                         "they cannot be compared on one hook")
    evs = evaluate_many(cfg, source, [out.sae] + ([other] if other is not None else []), eval_held)
    ev = evs[0]
    paired = {}
    if other is not None and len(np.unique(eval_held.documents)) > 1:
        from .metrics import paired_difference

        for metric in PAIRED_METRICS:
            d = paired_difference(evs[1].evaluation, ev.evaluation, eval_held.documents, metric,
                                  n_boot=cfg.n_boot, seed=cfg.seed)
            paired.update({f"{metric}_minus_own": round(d.value, 6), f"{metric}_minus_own_low": round(d.low, 6),
                           f"{metric}_minus_own_high": round(d.high, 6)})
    eval_seconds = time.perf_counter() - eval_start
    analysis_start = time.perf_counter()
    tables = analyze_features(cfg, profile, source, out.sae.cpu(), progress=progress, held=held,
                              texts=texts() if texts else None)
    analysis_seconds = time.perf_counter() - analysis_start
    name = artifact_name(cfg, out.sae.cfg.n_features)
    with store.write("llama", profile, name, config=cfg) as w:
        w.wall_time_s = shards.harvest_seconds() + out.seconds + eval_seconds + analysis_seconds
        # weights in cache/work (DESIGN: large-model SAEs commit their metrics and tables, not weights)
        sae_mod.save(out.sae, w.work_dir / "sae", metadata={"hook_name": hook, "model_name": cfg.model})
        pd.DataFrame(out.history).to_parquet(w.dir / "history.parquet", index=False)
        controls = analysis.control_tables(tables["units"], analysis_config(cfg))
        analysis.drop_control_contexts(tables)
        folder = w.work_dir if tables_in_work else w.dir
        for table in analysis.TABLES:  # chapter 04's scores and the browser
            tables[table].to_parquet(folder / f"{table}.parquet", index=False)
        for table, frame in controls.items():
            frame.to_parquet(folder / f"{table}.parquet", index=False)
        w.metrics.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in ev.metrics.items()})
        w.metrics.update(paired)
        w.metrics.update(analysis.summary_metrics(tables["units"], analysis_config(cfg)))
        w.metrics.update(analysis.control_metrics(controls["density_matched"]))
        w.metrics.update({"explain_tokens": tables["tokens"]["explain"],
                          "held_out_tokens": tables["tokens"]["held_out"]})
        if tables["mlp_mean_sq_norm"] is not None:
            w.metrics["mlp_mean_sq_norm"] = round(tables["mlp_mean_sq_norm"], 4)
        w.metrics.update({"d_in": out.sae.cfg.d_in, "k": cfg.k,
                          "train_activations": out.sae.cfg.n_steps * cfg.sae_batch,
                          "train_seconds": round(out.seconds, 1), "activations_per_s": round(out.acts_per_s, 2),
                          "harvest_seconds": round(shards.harvest_seconds(), 1),
                          "harvest_tokens_per_s": round(shards.tokens_per_s(), 2),
                          "eval_seconds": round(eval_seconds, 1), "analysis_seconds": round(analysis_seconds, 1)})
        w.info.update({"hook": hook, "model": source.info(), "memory_plan": out.plan._asdict(),
                       "analysis_config": analysis_config(cfg).to_dict(),  # the thresholds the scores used
                       "processes": dist_info().world, "sae_config": out.sae.cfg.to_dict(),
                       **({"paired_with": paired_with.key} if paired else {})})
    print(f"llama: wrote llama/{profile}-{name}: " + ", ".join(
        f"{k}={ev.metrics[k]:.4g}" for k in ("mse", "fvu", "l0", "dead_fraction", "ce_loss_recovered")))
    return store.load("llama", profile, name)


def main_artifact(configs: Mapping[str, LlamaConfig] | None = None):
    """The Llama-family run the book shows: a Stheno (gpu profile) run when one is cached, else a SmolLM2 SAE
    of the cpu profile; among a profile's runs, the one made with ``configs[profile]`` (the profile's own
    settings, which the caller passes) if cached, else the widest; ``None`` when there is none. Chapter 04 and
    its browser read it."""
    from . import store

    arts = [a for a in store.list_artifacts("llama") if not a.name.startswith(("throughput-", "rehearsal-", "sweep-"))]
    if not arts:
        return None

    def not_own(a) -> bool:  # made with other settings than its profile's
        own = (configs or {}).get(a.profile)
        return own is None or a.config != json.loads(json.dumps(own.to_dict()))

    arts.sort(key=lambda a: ({"gpu": 0, "cpu": 1, "tiny": 2}.get(a.profile, 3), "smollm2" in a.name, not_own(a),
                             -a.metrics.get("n_features", 0), a.name))
    return store.load("llama", arts[0].profile, arts[0].name)


def load_sae(artifact) -> Any:
    """The SAE of a ``llama`` artifact (from the cache, or ``cache/work`` when it was too big to commit)."""
    from . import sae as sae_mod

    return sae_mod.load(artifact.file("sae/sae_weights.safetensors").parent)


def feature_units(artifact) -> Any:
    """The SAE's features as the analysis measured them: the ``topk`` rows of the artifact's ``units`` table
    (density on the explanation text, best family, its held-out share and lift, scores), with ``specific``:
    the unit passes the specificity score at the thresholds the artifact recorded."""
    import pandas as pd

    from .analysis import MAIN_SAE
    from .comparisons import passes

    m = artifact.metrics
    units = pd.read_parquet(artifact.file("units.parquet"))
    feats = units[units["set"] == MAIN_SAE].reset_index(drop=True)
    thresholds = SimpleNamespace(specificity_threshold=m["specificity_threshold"], lift_threshold=m["lift_threshold"])
    feats["specific"] = passes(feats, "specificity", thresholds)
    return feats
