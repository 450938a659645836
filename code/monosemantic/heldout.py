"""``monosemantic heldout``: the one held-out text set for unit-level claims, stratified by corpus source.

The book's evaluation standard (shared/DESIGN.md) asks for one held-out set of at least 5M tokens in which
every source of the corpus is present, never seen in LM training, SAE training or the analysis's
explanation text. The val split alone is 0.5M tokens and misses several sources, and there is no time to
retrain on a new split; but the training runs read only part of the train split, at positions that are a
function of their configs. So the set is made of text they provably never read:

- every window of the val split (never trained on), and
- windows of the train split whose every token lies outside every window the LM trained on
  (:func:`lm_windows`: the starts :func:`monosemantic.lm_train.batch_starts` draws at each step) and every
  window the SAE harvest ran through the model (:func:`harvest_windows`: the windows
  :func:`monosemantic.harvest.harvest_to_disk` reads), inside documents that no explanation window of the
  analysis touched (:func:`explanation_windows`: :func:`monosemantic.harvest.spread_windows`), so that no
  unit is scored on a document its explanation was learned from.

Each function redraws its windows by calling the training code's own functions with the configs the
artifacts recorded, so a change there changes this set too. Train windows are whole ``seq_len`` windows
that stay inside one document (never crossing an <|endoftext|> into another): each window has exactly one
source and one document, the unit of the bootstrap over documents. Val windows are the split's consecutive
windows (:func:`monosemantic.harvest.split_windows`, the ones ``evaluate`` reads), each labelled with the
document it starts in. The train windows are sampled per source (seeded): every source gets at least
``min(available, floor_tokens)``, the rest goes to sources in proportion to their share of the corpus, up
to what each has (:func:`allocate`).

The explanation windows are spread evenly (one every ~7,000 tokens in the cpu profile), so they touch every
long document: sources made of a few long documents (gcc's translations, Shakespeare's plays, Chinese
poetry collections) have little or no text in untouched documents. Such a source is topped up to its floor
from the touched documents, with windows at least ``fallback_gap`` tokens away from any explanation window,
and those windows are marked (``explained_document``) so that a claim can leave them out.

Artifact ``heldout/<profile>-windows`` (small, committed): ``windows.parquet`` (split, start, source,
document, explained_document), ``sources.parquet`` (per source: corpus tokens, tokens never seen, tokens
available in whole windows, tokens and windows selected, documents they come from) and metrics (held-out
tokens, sources, the smallest source, what was excluded and why). The tokens themselves stay in the
shards: :func:`load_windows` reads them::

    windows, sources, documents = heldout.load_windows("cpu")   # (W, 128) token ids, (W,) sources, (W,) documents
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .config import ConfigError, StageConfig, UserError, check_positive

DEFAULT_PROFILE = "cpu"
WINDOWS_FILE = "windows.parquet"
SOURCES_FILE = "sources.parquet"


class HeldoutError(UserError):
    """A held-out set that cannot be made or read; one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class HeldoutConfig(StageConfig):
    """How the held-out windows are chosen (which tokens are unseen follows from the upstream artifacts)."""

    STAGE: ClassVar[str] = "heldout"

    seq_len: int = 0
    """Tokens per window (0: the LM's context length, 128 for the one-layer model)."""
    target_tokens: int = 5_000_000
    """Held-out tokens in all, the val split's windows included; more only where floors demand it."""
    floor_tokens: int = 100_000
    """Each source gets at least this many held-out tokens, or all it has if fewer."""
    seed: int = 0
    """Seed of the per-source sampling of train windows."""
    fallback: bool = True
    """A source with fewer than ``floor_tokens`` in unexplained documents (one whose documents are long, so
    that the evenly spread explanation windows touch nearly all of them) is topped up to the floor from the
    documents the explanation text touched, with windows at least ``fallback_gap`` tokens away from any
    explanation window, marked ``explained_document`` in ``windows.parquet``. False: it keeps what it has."""
    fallback_gap: int = 1024
    """Tokens between a fallback window and the nearest explanation window (8 of the LM's contexts)."""

    def __post_init__(self) -> None:
        if self.seq_len < 0:
            raise ConfigError(f"HeldoutConfig: seq_len must be >= 0 (0: the LM's context), got {self.seq_len}")
        if self.fallback_gap < 0:
            raise ConfigError(f"HeldoutConfig: fallback_gap must be >= 0, got {self.fallback_gap}")
        check_positive(self, "target_tokens", "floor_tokens", integer=True)
        if self.floor_tokens > self.target_tokens:
            raise ConfigError(f"HeldoutConfig: floor_tokens ({self.floor_tokens}) exceeds target_tokens "
                              f"({self.target_tokens})")


# --- the windows each training run read ---------------------------------------------------------------------

class SeenWindows(NamedTuple):
    """Windows some run read: ``starts`` (W,) int64 first tokens, each window ``span`` tokens long."""

    kind: str  # "lm", "harvest" or "explanation"
    starts: np.ndarray
    span: int


def lm_windows(n_tokens: int, cfg) -> SeenWindows:
    """Every window the LM of ``cfg`` (:class:`monosemantic.lm.LMConfig`) trained on, over a train split of
    ``n_tokens``: ``steps x batch_size`` windows of ``context_length + 1`` tokens (inputs and targets)."""
    from .lm_train import batch_starts

    starts = [batch_starts(n_tokens, cfg, step) for step in range(cfg.steps)]
    return SeenWindows("lm", np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64),
                       cfg.context_length + 1)


def harvest_windows(tokens: np.ndarray, cfg) -> SeenWindows:
    """Every train window the SAE harvest of ``cfg`` (:class:`monosemantic.sae_train.HarvestConfig`) ran
    through the model: the windows :func:`monosemantic.harvest.harvest_to_disk` reads for
    ``train_activations`` rows, whole batches of them (the last batch's surplus went through the model too)."""
    from .harvest import harvest_windows as drawn

    starts, _ = drawn(tokens, cfg.seq_len, cfg.seed, cfg.train_activations)
    return SeenWindows("harvest", starts, cfg.seq_len)


def explanation_windows(tokens: np.ndarray, seq_len: int, explain_tokens: int) -> SeenWindows:
    """The analysis's explanation text: :func:`monosemantic.harvest.spread_windows` of the train split."""
    from .harvest import spread_windows

    _, starts = spread_windows(tokens, seq_len, explain_tokens)
    return SeenWindows("explanation", starts.astype(np.int64), seq_len)


def covered(n_tokens: int, windows: list[SeenWindows]) -> np.ndarray:
    """(n_tokens,) bool: the tokens inside any of ``windows``."""
    mask = np.zeros(n_tokens, dtype=bool)
    for w in windows:
        for s in w.starts.tolist():
            mask[s:s + w.span] = True
    return mask


# --- choosing the windows ---------------------------------------------------------------------------------

def explained_documents(lengths: np.ndarray, explained: np.ndarray) -> np.ndarray:
    """(D,) bool: the documents (of ``lengths``, in order) holding a token of the (N,) bool mask ``explained``."""
    if not len(lengths):
        return np.zeros(0, dtype=bool)
    return np.add.reduceat(explained, np.cumsum(lengths) - lengths) > 0


def whole_windows(lengths: np.ndarray, ok: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every window of ``seq_len`` tokens inside a run of ``ok`` tokens (an (N,) bool mask) within one document,
    packed from the start of each run: ``(starts, documents)``, (C,) int64 each, starts ascending.
    ``lengths``: (D,) the split's document lengths in order (their <|endoftext|> included)."""
    ends = np.cumsum(lengths)
    n = int(ends[-1]) if len(ends) else 0
    if len(ok) != n:
        raise HeldoutError(f"the mask covers {len(ok)} tokens, the documents {n}")
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    doc_start = np.zeros(n, dtype=bool)
    doc_start[ends - lengths] = True
    doc_end = np.zeros(n, dtype=bool)
    doc_end[ends - 1] = True
    # runs of ok tokens, cut at every document boundary: no window spans two documents
    run_starts = np.flatnonzero(ok & (~np.concatenate([[False], ok[:-1]]) | doc_start))
    run_ends = np.flatnonzero(ok & (~np.concatenate([ok[1:], [False]]) | doc_end)) + 1  # exclusive
    per = (run_ends - run_starts) // seq_len  # whole windows in each run
    first = np.repeat(np.cumsum(per) - per, per)  # the number of each window's run's first window
    starts = np.repeat(run_starts, per) + seq_len * (np.arange(int(per.sum())) - first)
    return starts.astype(np.int64), np.searchsorted(ends, starts, side="right").astype(np.int64)


def allocate(available: np.ndarray, fixed: np.ndarray, share: np.ndarray, total: int, floor: int) -> np.ndarray:
    """How many windows each source gets, val windows (``fixed``, always all taken) included: (S,) int64.

    Each source gets ``clip(lam * share * total, min(available + fixed, floor), available + fixed)`` and at
    least its ``fixed`` windows, with ``lam`` the one scale at which the sources add up to ``total`` (or
    everything, when the sources hold less). Rounded down, the windows left over go one each to the sources
    with the largest remainders that still have some."""
    cap = available + fixed
    low = np.maximum(np.minimum(cap, floor), fixed)
    share = share / share.sum()

    def filled(lam: float) -> np.ndarray:
        return np.clip(lam * share * total, low, cap)

    if cap.sum() <= total:
        return cap.astype(np.int64)
    if low.sum() >= total:
        return low.astype(np.int64)
    lo, hi = 0.0, 1.0
    while filled(hi).sum() < total:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if filled(mid).sum() < total else (lo, mid)
    want = filled(hi)
    out = np.floor(want).astype(np.int64)
    left = total - int(out.sum())
    order = np.argsort(-(want - out), kind="stable")
    for i in order:
        if left <= 0:
            break
        if out[i] < cap[i]:
            out[i] += 1
            left -= 1
    return out


def sample(sources: np.ndarray, tiers: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """Indices of ``counts[s]`` candidates of each source ``s``, drawn uniformly without replacement (seeded),
    all of tier 0 before any of tier 1; sorted. ``sources``, ``tiers``: (C,) int per candidate."""
    rng = np.random.default_rng(seed)
    chosen = []
    for s in range(len(counts)):
        mine = np.flatnonzero(sources == s)
        keys = tiers[mine] + rng.random(len(mine))  # one draw per candidate, whatever counts[s] is
        chosen.append(mine[np.argsort(keys, kind="stable")[: int(counts[s])]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


class Choice(NamedTuple):
    """The train windows chosen, and the per-source counts behind them ((S,) int64 arrays)."""

    starts: np.ndarray  # (W,) int64 first tokens, ascending
    documents: np.ndarray  # (W,) int64 the document of each
    fallback: np.ndarray  # (W,) bool: in a document the explanation text touched (the fallback)
    counts: np.ndarray  # windows of each source, its val windows included
    available: np.ndarray  # whole windows of never-seen tokens in unexplained documents
    spare: np.ndarray  # fallback windows there are (in explained documents, far from explanation text)
    val_windows: np.ndarray  # val windows of each source
    unseen_tokens: np.ndarray  # train tokens outside every training and explanation window
    explained: np.ndarray  # (D,) bool: documents an explanation window touched
    seen_tokens: int  # train tokens inside a training window
    explained_tokens: int  # never-seen train tokens excluded because their document was explained
    partial_tokens: int  # never-seen tokens of unexplained documents in runs too short for a window


def choose(lengths: np.ndarray, doc_sources: np.ndarray, trained: list[SeenWindows],
           explanation: list[SeenWindows], val_sources: np.ndarray, share: np.ndarray, cfg: HeldoutConfig,
           seq_len: int) -> Choice:
    """Choose the train windows (module docstring) of a train split of documents ``lengths`` (D,) whose
    sources are ``doc_sources`` (D,) numbers into ``share`` (S,) (each source's share of the corpus), given
    the windows the training runs read (``trained``), the explanation windows and the source of each val
    window (``val_sources``, (V,))."""
    S, T, n = len(share), seq_len, int(lengths.sum())
    seen = covered(n, trained)
    in_explanation = covered(n, explanation)
    explained = explained_documents(lengths, in_explanation)
    in_explained = np.repeat(explained, lengths)
    strict_ok = ~seen & ~in_explained
    starts, docs = whole_windows(lengths, strict_ok, T)
    tiers = np.zeros(len(starts), dtype=np.int64)
    if cfg.fallback:
        g = cfg.fallback_gap
        near = covered(n, [SeenWindows("gap", np.maximum(w.starts - g, 0), w.span + 2 * g) for w in explanation])
        fb_starts, fb_docs = whole_windows(lengths, ~seen & in_explained & ~near, T)
        starts, docs = np.concatenate([starts, fb_starts]), np.concatenate([docs, fb_docs])
        tiers = np.concatenate([tiers, np.ones(len(fb_starts), dtype=np.int64)])
    doc_first = np.cumsum(lengths) - lengths
    unseen = np.bincount(doc_sources, weights=np.add.reduceat(~seen & ~in_explanation, doc_first) if n else None,
                         minlength=S).astype(np.int64)
    cand_src = doc_sources[docs]
    available = np.bincount(cand_src[tiers == 0], minlength=S)
    spare = np.bincount(cand_src[tiers == 1], minlength=S)
    fixed = np.bincount(val_sources, minlength=S)
    floor = -(-cfg.floor_tokens // T)
    top_up = np.minimum(spare, np.maximum(0, floor - available - fixed))  # fallback only up to the floor
    counts = allocate(available + top_up, fixed, share, -(-cfg.target_tokens // T), floor)
    picked = sample(cand_src, tiers, counts - fixed, cfg.seed)
    order = np.argsort(starts[picked], kind="stable")
    picked = picked[order]
    return Choice(starts[picked], docs[picked], tiers[picked] == 1, counts, available, spare, fixed, unseen,
                  explained, int(seen.sum()), int((~seen & in_explained).sum()),
                  int(strict_ok.sum()) - int(available.sum()) * T)


# --- the stage ------------------------------------------------------------------------------------------

def _harvest_configs(profile: str, stage_harvest) -> list[Any]:
    """Every SAE harvest config of ``profile`` on record, one per distinct config: the profile's, each
    activations artifact's (``mlp``, and the GPU run's ``mlp-gpu``) and the one each SAE artifact records."""
    from . import store
    from .sae_train import HarvestConfig

    recorded = [a.config for a in store.list_artifacts("activations") if a.profile == profile]
    recorded += [a.config.get("harvest") for a in store.list_artifacts("sae") if a.profile == profile]
    configs = {stage_harvest.config_hash(): stage_harvest}
    for fields in recorded:
        if isinstance(fields, dict) and {"train_activations", "seq_len", "seed"} <= fields.keys():
            cfg = HarvestConfig(**{f.name: fields[f.name] for f in dataclasses.fields(HarvestConfig)
                                   if f.name in fields})
            configs.setdefault(cfg.config_hash(), cfg)
    return list(configs.values())


def _explain_tokens(profile: str, analysis_cfg) -> list[int]:
    """The explanation-text sizes on record: the profile's and the analysis artifact's (distinct)."""
    from . import store

    sizes = {int(analysis_cfg.explain_tokens)}
    for art in store.list_artifacts("analysis"):
        if art.profile == profile and "explain_tokens" in art.config:
            sizes.add(int(art.config["explain_tokens"]))
    return sorted(sizes)


def run_stage(profile: str, cfg: HeldoutConfig, prof, log=print):
    """Make ``heldout/<profile>-windows`` (module docstring); returns the artifact. ``prof``: the resolved
    profile, whose SAE harvest and analysis configs say which train windows were trained on or explained."""
    import pandas as pd

    from . import corpus, store
    from .config import CORPUS_NAME
    from .data import TokenDataset
    from .harvest import split_windows
    from .lm import LMConfig

    lm_art = store.load("lm", profile, "model")
    lm_cfg = LMConfig(**lm_art.config)
    T = cfg.seq_len or lm_cfg.context_length
    tokens_art = store.load("tokens", profile, CORPUS_NAME, verify=False, check_inputs=False)
    corpus_art = store.load("corpus", profile, CORPUS_NAME, verify=False, check_inputs=False)
    inputs = [lm_art, tokens_art]
    try:
        inputs.append(store.load("activations", profile, "mlp", verify=False))
    except store.CacheError:
        pass  # its config is also recorded in the SAE artifacts and the profile (read below)
    doc_sources = corpus.load_document_sources(profile)
    names, S = doc_sources.names, len(doc_sources.names)
    table = pd.read_parquet(corpus_art.file("sources.parquet")).set_index("source")
    if list(table.index) != names:
        raise HeldoutError(f"{corpus_art.key} lists other sources than the document-source index; recompute "
                           f"it with `monosemantic corpus --profile {profile} --document-sources`")
    train = TokenDataset.open(profile, "train")
    val = TokenDataset.open(profile, "val")
    tokens, val_tokens = np.asarray(train.tokens), np.asarray(val.tokens)
    n = len(tokens)
    lengths = corpus.document_lengths(tokens, train.eot_id)
    val_lengths = corpus.document_lengths(val_tokens, val.eot_id)
    src = doc_sources["train"]

    # the val split: every window, labelled by the document it starts in
    val_x, _ = split_windows(val_tokens, T)
    val_starts = np.arange(len(val_x), dtype=np.int64) * T
    val_docs = np.searchsorted(np.cumsum(val_lengths), val_starts, side="right")
    val_src = doc_sources["val"][val_docs]

    # the train split: what the runs read, from the configs they recorded; then the choice
    harvests = _harvest_configs(profile, prof.sae.harvest)
    explains = _explain_tokens(profile, prof.analysis)
    trained = [lm_windows(n, lm_cfg)] + [harvest_windows(tokens, h) for h in harvests]
    explanation = [explanation_windows(tokens, T, e) for e in explains]
    c = choose(lengths, src, trained, explanation, val_src, table["tokens"].to_numpy(np.float64), cfg, T)
    log(f"heldout ({profile}): {c.seen_tokens / n:.1%} of the {n / 1e6:.1f}M train tokens are inside an LM or SAE "
        f"training window; {c.explained.sum():,} of {len(lengths):,} documents hold explanation text; "
        f"{c.available.sum():,} whole {T}-token windows remain in the others ({c.spare.sum():,} in the explained "
        "ones as fallback)")

    t_src = src[c.documents]
    windows = pd.DataFrame({
        "split": np.array(["train"] * len(c.starts) + ["val"] * len(val_starts)),
        "start": np.concatenate([c.starts, val_starts]),
        "source": np.array(names, dtype=object)[np.concatenate([t_src, val_src])],
        "document": np.concatenate([c.documents, val_docs]),
        "explained_document": np.concatenate([c.fallback, np.zeros(len(val_starts), dtype=bool)]),
    })
    n_docs = np.array([len(np.unique(c.documents[t_src == s])) + len(np.unique(val_docs[val_src == s]))
                       for s in range(S)])
    val_source_tokens = np.bincount(doc_sources["val"], weights=val_lengths, minlength=S).astype(np.int64)
    per_source = pd.DataFrame({
        "source": names,
        "corpus_tokens": table["tokens"].to_numpy(np.int64),
        "train_tokens": np.bincount(src, weights=lengths, minlength=S).astype(np.int64),
        "val_tokens": val_source_tokens,
        "unseen_tokens": c.unseen_tokens + val_source_tokens,  # outside every training and explanation window
        "available_tokens": (c.available + c.val_windows) * T,  # whole windows: unexplained documents, val
        "fallback_available_tokens": c.spare * T,
        "selected_tokens": c.counts * T,
        "selected_windows": c.counts,
        "val_windows": c.val_windows,
        "fallback_windows": np.bincount(t_src[c.fallback], minlength=S),
        "documents": n_docs,
    })
    counts = c.counts
    with store.write("heldout", profile, "windows", config=cfg, inputs=inputs) as w:
        windows.to_parquet(w.dir / WINDOWS_FILE, index=False)
        per_source.to_parquet(w.dir / SOURCES_FILE, index=False)
        w.metrics.update({
            "heldout_tokens": int(len(windows) * T),
            "heldout_windows": int(len(windows)),
            "train_tokens_selected": int(len(c.starts) * T),
            "val_tokens_selected": int(len(val_starts) * T),
            "fallback_tokens_selected": int(c.fallback.sum() * T),
            "seq_len": T,
            "n_sources": int((counts > 0).sum()),
            "corpus_sources": S,
            "min_source_tokens": int(counts.min() * T),
            "min_source": names[int(np.argmin(counts))],
            "documents": int(n_docs.sum()),
            "sources_without_heldout_text": [s for s, k in zip(names, counts, strict=True) if k == 0],
            "sources_below_floor": [s for s, k in zip(names, counts * T, strict=True) if 0 < k < cfg.floor_tokens],
            "sources_with_fallback": [s for s, k in zip(names, per_source["fallback_windows"], strict=True) if k],
            # what was excluded from the train split, and why
            "train_tokens_available": int(c.available.sum() * T),
            "excluded_train_tokens_in_training_windows": c.seen_tokens,
            "excluded_train_tokens_in_explained_documents": c.explained_tokens,
            "excluded_train_documents_explained": int(c.explained.sum()),
            "excluded_train_tokens_in_partial_windows": c.partial_tokens,
        })
        w.info.update({
            "lm_windows": {"steps": lm_cfg.steps, "batch_size": lm_cfg.batch_size, "seed": lm_cfg.seed,
                           "span": lm_cfg.context_length + 1},
            "harvest_windows": [h.to_dict() for h in harvests],
            "explanation_tokens": explains,
            "windows": "train: whole windows inside one document, of tokens outside every LM and SAE-harvest "
                       "training window, in documents no explanation window touched (fallback: in touched "
                       f"documents, >= {cfg.fallback_gap} tokens from any explanation window, only to bring a "
                       "source up to the floor); val: every consecutive window of the split "
                       "(harvest.split_windows), labelled by the document it starts in",
            "excluded": "training windows: tokens inside any window the LM trained on (context + 1 tokens) or "
                        "the SAE harvest ran through the model; explained documents: every token of a document "
                        "an explanation window touched; partial windows: the ends of runs shorter than a window",
        })
    return store.load("heldout", profile, "windows")


class HeldoutWindows(NamedTuple):
    windows: np.ndarray  # (W, seq_len) uint16 token ids
    sources: np.ndarray  # (W,) source names (object)
    documents: np.ndarray  # (W,) the document each window lies in, "<split>:<number>" (the bootstrap's groups)


def windows_table(profile: str, cfg: HeldoutConfig | None = None, explain_tokens: int | None = None):
    """``windows.parquet`` of ``heldout/<profile>-windows``: one row per window (split, start, source,
    document, explained_document), train windows by start, then val. ``explain_tokens``: the caller's
    explanation text (:class:`monosemantic.analysis.AnalysisConfig`); a one-line error unless the set was
    made keeping that text's documents out."""
    import pandas as pd

    from . import store

    art = store.load("heldout", profile, "windows", config=cfg)
    if explain_tokens is not None and explain_tokens not in art.manifest.get("info", {}).get("explanation_tokens", []):
        raise HeldoutError(f"{art.key} was made around explanation text of "
                           f"{art.manifest.get('info', {}).get('explanation_tokens')} tokens, not {explain_tokens}; "
                           f"remake it with `monosemantic heldout --profile {profile}`")
    table = pd.read_parquet(art.file(WINDOWS_FILE))
    table.attrs["seq_len"] = int(art.metrics["seq_len"])
    return table


def load_windows(profile: str, cfg: HeldoutConfig | None = None, explain_tokens: int | None = None) -> HeldoutWindows:
    """The held-out windows of ``profile``: ``(windows (W, seq_len) uint16, sources (W,) names, documents (W,)
    labelled within their split)``, in
    :func:`windows_table`'s order. One-line errors when the artifact is missing or stale (for ``cfg`` or
    ``explain_tokens``, as in :func:`windows_table`) or the token shards are missing."""
    from . import store
    from .data import TokenDataError, TokenDataset

    table = windows_table(profile, cfg, explain_tokens)
    seq_len = table.attrs["seq_len"]
    out = np.zeros((len(table), seq_len), dtype=np.uint16)
    for split in ("train", "val"):
        rows = np.flatnonzero(table["split"].to_numpy() == split)
        if not len(rows):
            continue
        try:
            tokens = TokenDataset.open(profile, split).tokens
        except (TokenDataError, store.CacheError) as e:
            raise HeldoutError(f"the held-out windows need the {split} token shard: {e}") from None
        starts = table["start"].to_numpy()[rows]
        if starts.max() + seq_len > len(tokens):
            raise HeldoutError(f"heldout/{profile}-windows points past the end of the {split} shard; remake it "
                               f"with `monosemantic heldout --profile {profile}`")
        out[rows] = tokens[starts[:, None] + np.arange(seq_len)[None, :]]
    documents = (table["split"].astype(str) + ":" + table["document"].astype(str)).to_numpy()
    return HeldoutWindows(out, table["source"].to_numpy(), documents)


# --- the command ----------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-tokens", type=int, default=None, help="held-out tokens in all (default: the profile's)")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    cfg = args.profile_config.heldout
    if args.target_tokens is not None:
        cfg = cfg.replace(target_tokens=args.target_tokens)
    art = run_stage(args.profile, cfg, args.profile_config)
    m = art.metrics
    table = pd.read_parquet(art.file(SOURCES_FILE))
    print(f"{'source':<18} {'corpus':>11} {'unseen':>11} {'available':>11} {'selected':>10} {'windows':>8} "
          f"{'fallback':>8} {'docs':>6}")
    for r in table.itertuples():
        print(f"{r.source:<18} {r.corpus_tokens:>11,} {r.unseen_tokens:>11,} {r.available_tokens:>11,} "
              f"{r.selected_tokens:>10,} {r.selected_windows:>8,} {r.fallback_windows:>8,} {r.documents:>6,}")
    print(f"held-out: {m['heldout_tokens']:,} tokens ({m['train_tokens_selected']:,} never-seen train, "
          f"{m['fallback_tokens_selected']:,} of them fallback, + {m['val_tokens_selected']:,} val) in "
          f"{m['heldout_windows']:,} windows of {m['documents']:,} documents, {m['n_sources']} of "
          f"{m['corpus_sources']} sources; the smallest: {m['min_source']} ({m['min_source_tokens']:,} tokens) "
          f"-> {art.path}")
    if m["sources_with_fallback"]:
        print(f"topped up from explained documents (>= {cfg.fallback_gap} tokens from explanation text): "
              f"{', '.join(m['sources_with_fallback'])}")
    if m["sources_without_heldout_text"]:
        print(f"no held-out text at all for: {', '.join(m['sources_without_heldout_text'])}")
    if m["sources_below_floor"]:
        print(f"fewer than {cfg.floor_tokens:,} held-out tokens for: {', '.join(m['sources_below_floor'])}")
    return 0
