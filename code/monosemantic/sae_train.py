"""SAEs on the one-layer model: ``monosemantic harvest``, ``train-sae`` and ``export-sae``.

The pipeline of chapter 3, for one profile::

    monosemantic harvest   --profile cpu    # MLP activations of the train split (and the val split) -> cache/work
    monosemantic train-sae --profile cpu    # the anchor's recipe (literal and fixed), TopK, frontiers, width sweep
    monosemantic export-sae --profile cpu --recipe topk --out my_sae/   # SAELens's on-disk format

``harvest`` runs the model once over random windows of the train split and writes every position's 512
MLP activations (``blocks.0.mlp.hook_post``) as fp16 rows in ``cache/work/activations/``; the SAEs then
train from that file in shuffled epochs (:class:`~monosemantic.harvest.ArraySource`), so the ~20 SAEs of
the sweeps share one harvest and an interrupted run resumes on exactly its batches. The val split is
harvested too, for the feature densities (dead and ultra-low-density features are counted on it).

Every SAE is evaluated on held-out tokens (:mod:`monosemantic.metrics`): reconstruction, L0, dead and
ultra-low fractions over ``density_activations`` val activations, and the cross-entropy loss recovered
with the SAE spliced into the model over ``eval_windows`` val windows. Artifacts:

- ``sae/<profile>-anchor``: the anchor's recipe literally (ReLU + L1 3e-3, Adam 1e-4, batch 896, nn.Linear
  initialisation, its decoder normalisation, its resampling every 1,000 steps for the whole run), weights
  committed (fp16, SAELens layout), training curve (with the features resampled per interval), per-feature
  density; its metrics include ``resampled_total``;
- ``sae/<profile>-anchor-fixed``: the anchor's loss, optimiser, batch and schedule with the fixes: unit
  feature directions, Gao et al.'s initialisation, Anthropic's resampling over the first half; the same files;
- ``sae/<profile>-topk``: the better recipe (TopK + AuxK), the same files;
- ``sae/<profile>-sweep``: one row per sweep run (L1 coefficients, k values, dictionary widths) with its
  metrics, curves and density histograms; the sweep's weights stay in ``cache/work/`` (a 32,768-feature
  SAE is 64 MB in fp16).

Each run is staged in ``cache/work/sae/<profile>/runs/<name>/`` (checkpoint while training, result when
done), so re-running the command skips finished runs and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from . import sae as sae_mod
from .config import ConfigError, StageConfig, UserError, check_positive, work_dir
from .gaussian_null import NAME as GAUSSIAN_NULL
from .harvest import HOOK, ArraySource, harvest_to_disk, open_rows, sequential_windows
from .sae import SAE, SAEConfig

DEFAULT_PROFILE = "cpu"
RECIPES = ("anchor", "anchor-fixed", "topk")
"""The SAEs written as artifacts of their own (``sae/<profile>-<recipe>``), each a field of SAEStageConfig."""
RANDOM_MODEL = "random-model"
"""The control SAE: the ``topk`` recipe on the MLP activations of a randomly initialised copy of the LM
(``sae/<profile>-random-model``; the unit set of the same name in :mod:`monosemantic.analysis`)."""
RANDOM_MODEL_SEED = 0
"""The seed of that random LM (:func:`monosemantic.lm.random_lm`), recorded in the artifact."""
D_IN = 512  # the one-layer model's MLP width (checked against the model when it is loaded)


@dataclasses.dataclass(frozen=True)
class HarvestConfig(StageConfig):
    """Which activations the SAEs train and are evaluated on."""

    STAGE: ClassVar[str] = "activations"

    train_activations: int = 8_000_000
    """Rows harvested from the train split (every position of random 128-token windows)."""
    val_activations: int = 1_000_000
    """Rows harvested from the val split, for feature densities (dead / ultra-low-density fractions)."""
    seq_len: int = 128
    seed: int = 0
    hook: str = HOOK

    def __post_init__(self) -> None:
        check_positive(self, "train_activations", "val_activations", "seq_len", integer=True)


@dataclasses.dataclass(frozen=True)
class SAEStageConfig(StageConfig):
    """Every SAE of chapter 3 for one profile: the two recipes and the sweeps."""

    STAGE: ClassVar[str] = "sae"
    VERSION: ClassVar[int] = 1

    harvest: HarvestConfig = HarvestConfig()
    anchor: SAEConfig = SAEConfig(init="anchor-linear", init_encoder_transpose=False, b_dec_init="init",
                                  decoder_norm_axis="input", resample_rule="anchor", resample_until=1.0,
                                  dead_window=10_240)
    """The anchor's recipe literally (jnward/monosemanticity-repro, neuron_resampling.ipynb): ReLU + 3e-3 L1,
    Adam 1e-4, batch 896, nn.Linear init, decoder normalised per input coordinate, its resampling rule."""
    anchor_fixed: SAEConfig = SAEConfig()
    """The anchor's loss, optimiser and batch with the fixes: unit feature directions, transposed-encoder init,
    geometric-median decoder bias, Anthropic's resampling rule over the first half of the run."""
    topk: SAEConfig = SAEConfig(architecture="topk", k=24)
    """Our recipe: TopK (Gao et al. 2024) with AuxK, transposed-encoder init."""
    l1_coeffs: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 6e-3, 1.2e-2)
    """The L1 frontier: the fixed anchor recipe (``anchor_fixed``) at these coefficients (4,096 features)."""
    ks: tuple[int, ...] = (8, 16, 24, 32, 64)
    """The TopK frontier: these k (4,096 features)."""
    widths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384, 32768)
    """The dictionary-size sweep, with the TopK recipe (1x to 64x the 512 neurons)."""
    sweep_activations: int = 2_000_000
    """Training activations of each frontier and sweep run (the two main runs use ``harvest``'s all)."""
    eval_windows: int = 256
    """Val windows (of ``seq_len`` tokens) for the spliced cross-entropy, MSE, FVU and L0."""

    def recipe(self, name: str) -> SAEConfig:
        """The SAEConfig of recipe ``name`` (one of ``RECIPES``)."""
        return getattr(self, name.replace("-", "_"))

    def __post_init__(self) -> None:
        if {self.anchor.architecture, self.anchor_fixed.architecture} != {"relu"} or self.topk.architecture != "topk":
            raise ConfigError("SAEStageConfig: anchor and anchor_fixed must be relu SAEs and topk a topk SAE")
        if min(self.widths, default=1) < 1 or min(self.ks, default=1) < 1 or min(self.l1_coeffs, default=1) <= 0:
            raise ConfigError("SAEStageConfig: widths and ks must be positive integers, l1_coeffs positive")


@dataclasses.dataclass(frozen=True)
class Run:
    """One SAE to train: its name (a folder name), its sweep family, and its config."""

    name: str
    family: str  # "main" (the RECIPES), "l1", "k" or "width"
    cfg: SAEConfig


def plan(stage: SAEStageConfig) -> list[Run]:
    """Every run of the stage, main runs first. Runs that would repeat another's config are listed once."""
    sweep = stage.sweep_activations
    runs = [Run(name, "main", stage.recipe(name)) for name in RECIPES]
    for c in stage.l1_coeffs:
        runs.append(Run(f"l1-{c:g}", "l1", stage.anchor_fixed.replace(l1_coeff=c).with_activations(sweep)))
    for k in stage.ks:
        runs.append(Run(f"k-{k}", "k", stage.topk.replace(k=k).with_activations(sweep)))
    for n in stage.widths:
        # each size from its own seed: dictionaries initialised from one seed share their first rows, which
        # would make the feature-splitting matches across sizes partly an echo of the initialisation
        cfg = stage.topk.replace(n_features=n, k=min(stage.topk.k, n), aux_k=min(stage.topk.aux_k, n),
                                 seed=stage.topk.seed + n)
        runs.append(Run(f"width-{n}", "width", cfg.with_activations(sweep)))
    return runs


# --- harvest -----------------------------------------------------------------------------------------

def _harvest_files(art) -> tuple[Path, Path]:
    return art.work_path / "train.f16", art.work_path / "val.f16"


def run_harvest(profile: str, cfg: HarvestConfig, progress: bool = True):
    """Write the train and val activations (artifact ``activations/<profile>-mlp``); returns the artifact.
    Resumes a partial harvest (kept in ``cache/work/activations/<profile>/partial/``)."""
    from . import store
    from .data import TokenDataset
    from .lm import load_pretrained

    model = load_pretrained(profile)
    lm_art = store.load("lm", profile, "model")
    partial = work_dir() / "activations" / profile / "partial"
    if (partial / "config_hash").is_file() and (partial / "config_hash").read_text() != (
            cfg.config_hash() + lm_art.content_hash):
        shutil.rmtree(partial)  # another config or model: its rows are not ours
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "config_hash").write_text(cfg.config_hash() + lm_art.content_hash)
    start = time.perf_counter()
    for split, n in (("train", cfg.train_activations), ("val", cfg.val_activations)):
        tokens = TokenDataset.open(profile, split).tokens
        harvest_to_disk(model, tokens, n, partial / f"{split}.f16", seq_len=cfg.seq_len, seed=cfg.seed,
                        hook=cfg.hook, progress=progress)
    seconds = time.perf_counter() - start
    with store.write("activations", profile, "mlp", config=cfg, inputs=[lm_art]) as w:
        for split in ("train", "val"):
            shutil.move(partial / f"{split}.f16", w.work_dir / f"{split}.f16")
        w.metrics.update({"train_activations": cfg.train_activations, "val_activations": cfg.val_activations,
                          "d_in": model.config.d_mlp, "harvest_seconds": round(seconds, 1)})
    shutil.rmtree(partial, ignore_errors=True)
    return store.load("activations", profile, "mlp", verify=False)


def load_harvest(profile: str, cfg: HarvestConfig) -> tuple[Any, np.ndarray, np.ndarray]:
    """The activations artifact and its (train, val) fp16 row memmaps; a one-line error if absent or stale."""
    from . import store

    art = store.load("activations", profile, "mlp", config=cfg, verify=False)
    d_in = art.metrics.get("d_in", D_IN)
    train_path, val_path = _harvest_files(art)
    for path in (train_path, val_path):
        if not path.is_file():
            raise UserError(f"{art.key}: {path.name} is not on this machine (activations are not committed); "
                            f"make them with `monosemantic harvest --profile {profile}`")
    return (art, open_rows(train_path, d_in, cfg.train_activations),
            open_rows(val_path, d_in, cfg.val_activations))


def harvest_rows(profile: str, stage: SAEStageConfig) -> tuple[Any, np.ndarray]:
    """(the activations artifact, its train rows) of the stage's harvest; where that harvest's rows are not on
    this machine, a re-harvest of the same windows in another precision that is (``activations/<profile>-mlp-*``,
    e.g. ``-fp32``: the moments differ in rounding only), named as the input so the artifact says which."""
    from . import store
    from .harvest import open_rows

    try:
        art, train_rows, _ = load_harvest(profile, stage.harvest)
        return art, train_rows
    except UserError as first:
        for path in sorted(store.artifact_path("activations", profile, "mlp").parent.glob(f"{profile}-mlp-*")):
            other = store.load("activations", profile, path.name.removeprefix(f"{profile}-"), verify=False)
            rows = other.work_path / "train.f16"
            if rows.is_file() and other.config.get("train_activations") == stage.harvest.train_activations:
                return other, open_rows(rows, other.metrics.get("d_in", stage.anchor.d_in),
                                        stage.harvest.train_activations)
        raise first


# --- one run -----------------------------------------------------------------------------------------

def feature_density(sae: SAE, rows: np.ndarray, batch: int | None = None) -> torch.Tensor:
    """Fraction of ``rows`` (N, d_in) on which each feature fires (> 0): (n_features,) float64
    (:func:`monosemantic.metrics.feature_density`: blocks of ``batch`` rows, sized by bytes by default)."""
    from . import metrics

    return metrics.feature_density(sae, rows, batch)


def evaluate_run(model, sae: SAE, val_tokens: np.ndarray, val_rows: np.ndarray, stage: SAEStageConfig,
                 train_activations: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The issue's metric set (``metrics.METRIC_NAMES`` + ``train_activations``, ``density_tokens``) and the
    per-feature density. CE loss, MSE, FVU and L0 come from ``eval_windows`` val windows with the SAE spliced
    in; dead and ultra-low fractions from the density over all harvested val activations (more tokens)."""
    from . import metrics

    windows = sequential_windows(val_tokens, stage.harvest.seq_len, stage.eval_windows, batch=32)
    result = metrics.run_evaluation(model, sae, windows)
    density = feature_density(sae, val_rows)
    out = dict(result.metrics)
    out["dead_fraction"] = float((density == 0).double().mean())
    out["ultralow_fraction"] = float((density < metrics.ULTRALOW_DENSITY).double().mean())
    out["density_tokens"] = int(val_rows.shape[0])
    out["train_activations"] = train_activations
    return out, density


def _staging(profile: str, name: str) -> Path:
    return work_dir() / "sae" / profile / "runs" / name


def train_run(run: Run, *, profile: str, stage: SAEStageConfig, model, train_rows: np.ndarray,
              val_tokens: np.ndarray, val_rows: np.ndarray, upstream: str, progress: bool = True,
              fresh: bool = False, model_name: str | None = None) -> dict[str, Any]:
    """Train and evaluate one run, or return its staged result if it was already done with this config and
    these activations. Returns ``{"metrics", "history", "density", "folder"}`` (folder: SAELens layout)."""
    folder = _staging(profile, run.name)
    stamp = {"config_hash": run.cfg.config_hash(), "upstream": upstream, "eval_windows": stage.eval_windows}
    result_file = folder / "result.json"
    if fresh and folder.exists():
        shutil.rmtree(folder)
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("stamp") == stamp:
            return {"metrics": saved["metrics"], "history": saved["history"],
                    "density": torch.from_numpy(np.load(folder / "density.npy")), "folder": folder / "sae"}
        shutil.rmtree(folder)  # made by another config or from other activations
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.is_file() and (folder / "stamp.json").is_file() and \
            json.loads((folder / "stamp.json").read_text()) != stamp:
        checkpoint.unlink()
    (folder / "stamp.json").write_text(json.dumps(stamp))
    source = ArraySource(train_rows, run.cfg.batch_size, seed=run.cfg.seed)
    start = time.perf_counter()
    trained = _train(run.cfg, source, checkpoint, progress, desc=f"SAE {run.name}")
    # the curve's clock runs across resumes; this process's alone would overstate a resumed run's speed
    seconds = trained.history[-1]["seconds"] if trained.history else time.perf_counter() - start
    trained.sae.cpu()  # trained on the GPU when there is one; the LM it is evaluated in stays on the CPU
    metrics, density = evaluate_run(model, trained.sae, val_tokens, val_rows, stage, run.cfg.n_activations)
    metrics["train_seconds"] = round(seconds, 1)
    metrics["resampled_total"] = int(sum(row.get("resampled", 0) for row in trained.history))
    metrics["activations_per_s"] = round(run.cfg.n_activations / max(seconds, 1e-9), 1)
    sae_mod.save(trained.sae, folder / "sae", dtype=torch.float16,
                 metadata={"hook_name": stage.harvest.hook, "model_name": model_name or f"monosemantic-lm-{profile}"})
    np.save(folder / "density.npy", density.numpy())
    result_file.write_text(json.dumps({"stamp": stamp, "metrics": metrics, "history": trained.history}))
    return {"metrics": metrics, "history": trained.history, "density": density, "folder": folder / "sae"}


def _train(cfg: SAEConfig, source: ArraySource, checkpoint: Path, progress: bool, desc: str):
    """``sae.train`` with a checkpoint when this version of it takes one."""
    import inspect

    kwargs: dict[str, Any] = {"progress": progress, "desc": desc, "device": "cpu" if not torch.cuda.is_available()
                              else "cuda"}
    if "checkpoint" in inspect.signature(sae_mod.train).parameters:
        kwargs["checkpoint"] = checkpoint
    return sae_mod.train(cfg, source, **kwargs)


# --- artifacts ---------------------------------------------------------------------------------------

def _history_frame(history: list[dict[str, float]], run: str | None = None):
    import pandas as pd

    frame = pd.DataFrame(history)
    if run is not None:
        frame.insert(0, "run", run)
    return frame


def write_main(profile: str, recipe: str, stage: SAEStageConfig, result: dict[str, Any], inputs: list) -> Path:
    """``sae/<profile>-<recipe>``: SAELens files, curve, density, metrics."""
    import pandas as pd

    from . import store

    with store.write("sae", profile, recipe, config=stage, inputs=inputs) as w:
        for name in (sae_mod.SAE_CFG_FILENAME, sae_mod.SAE_WEIGHTS_FILENAME):
            shutil.copy(result["folder"] / name, w.dir / name)
        _history_frame(result["history"]).to_parquet(w.dir / "training_curve.parquet", index=False)
        pd.DataFrame({"feature": np.arange(len(result["density"])), "density": result["density"].numpy()}
                     ).to_parquet(w.dir / "feature_density.parquet", index=False)
        w.metrics.update(result["metrics"])
    return store.artifact_path("sae", profile, recipe)


def write_sweep(profile: str, stage: SAEStageConfig, runs: list[Run], results: dict[str, dict], inputs: list) -> Path:
    """``sae/<profile>-sweep``: the table of every run, their curves and density histograms; weights in work."""
    import pandas as pd

    from . import metrics as metrics_mod
    from . import store

    rows, curves, hists = [], [], []
    for run in runs:
        res = results[run.name]
        rows.append({"run": run.name, "family": run.family, "architecture": run.cfg.architecture,
                     "l1_coeff": run.cfg.l1_coeff if run.cfg.architecture == "relu" else float("nan"),
                     "k": run.cfg.k if run.cfg.architecture == "topk" else -1,
                     "batch_size": run.cfg.batch_size, "lr": run.cfg.lr, **res["metrics"]})
        curves.append(_history_frame(res["history"], run.name))
        hist = metrics_mod.density_histogram(res["density"].float())
        hists.append(pd.DataFrame({"run": run.name, "left": hist.edges[:-1].numpy(), "right": hist.edges[1:].numpy(),
                                   "count": hist.counts.numpy(), "dead": hist.n_dead}))
    with store.write("sae", profile, "sweep", config=stage, inputs=inputs) as w:
        table = pd.DataFrame(rows)
        table.to_parquet(w.dir / "sweep.parquet", index=False)
        pd.concat(curves, ignore_index=True).to_parquet(w.dir / "training_curves.parquet", index=False)
        pd.concat(hists, ignore_index=True).to_parquet(w.dir / "density_histograms.parquet", index=False)
        for run in runs:
            if run.family == "main":
                continue  # committed in their own artifacts
            dest = w.work_dir / run.name
            dest.mkdir()
            for name in (sae_mod.SAE_CFG_FILENAME, sae_mod.SAE_WEIGHTS_FILENAME):
                shutil.copy(results[run.name]["folder"] / name, dest / name)
        w.metrics["runs"] = len(runs)
        best = table[table["family"] == "k"].sort_values("ce_loss_recovered", ascending=False)
        if len(best):
            w.metrics["best_k_run"] = str(best.iloc[0]["run"])
    return store.artifact_path("sae", profile, "sweep")


# --- commands ----------------------------------------------------------------------------------------

def _stage_inputs(profile: str, stage: SAEStageConfig):
    """(the LM, [its artifact, the harvest's], train rows, val rows, val tokens) that every run of the stage
    trains and is evaluated on."""
    from . import store
    from .data import TokenDataset
    from .lm import load_pretrained

    model = load_pretrained(profile)
    if model.config.d_mlp != stage.anchor.d_in:
        raise ConfigError(f"the {profile} model has {model.config.d_mlp} MLP neurons but the SAEs read "
                          f"d_in = {stage.anchor.d_in}; fix profiles.py")
    lm_art = store.load("lm", profile, "model")
    act_art, train_rows, val_rows = load_harvest(profile, stage.harvest)
    return model, [lm_art, act_art], train_rows, val_rows, TokenDataset.open(profile, "val").tokens


def run_stage(profile: str, stage: SAEStageConfig, only: tuple[str, ...] = (*RECIPES, "sweep"),
              progress: bool = True, fresh: bool = False, log=print) -> list[Path]:
    """Train what ``only`` names (any of ``RECIPES`` and ``sweep``) and write their artifacts."""
    model, inputs, train_rows, val_rows, val_tokens = _stage_inputs(profile, stage)
    upstream = "".join(a.content_hash for a in inputs)
    runs = plan(stage)
    wanted = [r for r in runs if (r.name in only) or ("sweep" in only and r.family != "main")]
    # the sweep's table holds the main runs too (the frontier plot draws them), so it needs them
    if "sweep" in only:
        wanted = [r for r in runs if r.family == "main" or r in wanted]
    results, written, by_config = {}, [], {}
    for i, run in enumerate(wanted, 1):
        twin = by_config.get(run.cfg.config_hash())
        if twin is not None:  # e.g. width-4096 is k-24: the same config, trained once
            log(f"[{i}/{len(wanted)}] {run.name}: the same SAE as {twin}")
            results[run.name] = results[twin]
            continue
        by_config[run.cfg.config_hash()] = run.name
        log(f"[{i}/{len(wanted)}] {run.name}: {run.cfg.architecture} {run.cfg.d_in}->{run.cfg.n_features}"
            + (f" k={run.cfg.k}" if run.cfg.architecture == "topk" else f" l1={run.cfg.l1_coeff:g}")
            + f", {run.cfg.n_activations / 1e6:.1f}M activations")
        results[run.name] = train_run(run, profile=profile, stage=stage, model=model, train_rows=train_rows,
                                      val_tokens=val_tokens, val_rows=val_rows, upstream=upstream,
                                      progress=progress, fresh=fresh)
        m = results[run.name]["metrics"]
        log(f"    L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  CE recovered {m['ce_loss_recovered']:.3f}  "
            f"dead {m['dead_fraction']:.3f}  ({m['train_seconds']:.0f} s, {m['activations_per_s']:,.0f} act/s)")
        if run.name in only:
            written.append(write_main(profile, run.name, stage, results[run.name], inputs))
    if "sweep" in only:
        written.append(write_sweep(profile, stage, [r for r in runs if r.name in results], results, inputs))
    return written


@dataclasses.dataclass(frozen=True)
class SeedsConfig(StageConfig):
    """Which recipes are retrained with other seeds (``sae/<profile>-seeds``): seed 0 is each recipe's own
    artifact; the others differ from it in the seed alone (initialisation and the order of the batches)."""

    STAGE: ClassVar[str] = "sae"

    recipes: tuple[str, ...] = ("topk", "anchor-fixed")
    seeds: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ConfigError(f"SeedsConfig: unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
        if any(not isinstance(s, int) or s <= 0 for s in self.seeds):
            raise ConfigError(f"SeedsConfig: seeds must be positive integers (0 is the recipe's own run), got "
                              f"{self.seeds!r}")


SEEDS = "seeds"


def seed_run(stage: SAEStageConfig, recipe: str, seed: int) -> Run:
    """Recipe ``recipe`` with seed ``seed`` instead of its own."""
    return Run(f"{recipe}-seed{seed}", "seed", stage.recipe(recipe).replace(seed=seed))


def run_seeds(profile: str, stage: SAEStageConfig, cfg: SeedsConfig = SeedsConfig(), progress: bool = True,
              fresh: bool = False, log=print) -> Path:
    """``sae/<profile>-seeds``: ``seeds.parquet``, one row per (recipe, seed) with the training-time metrics,
    seed 0 read from the recipe's own artifact; the curves; the weights in the artifact's work folder (not
    committed: ``monosemantic evaluate`` measures them on held-out text while they are on the machine)."""
    import pandas as pd

    from . import store

    model, inputs, train_rows, val_rows, val_tokens = _stage_inputs(profile, stage)
    upstream = "".join(a.content_hash for a in inputs)
    rows, curves, results = [], [], {}
    for recipe in cfg.recipes:
        own = store.load("sae", profile, recipe, config=stage)  # seed 0: one line to say how to make it if absent
        inputs.append(own)
        rows.append({**own.metrics, "recipe": recipe, "seed": stage.recipe(recipe).seed, "run": recipe})
        for seed in cfg.seeds:
            run = seed_run(stage, recipe, seed)
            log(f"{run.name}: {run.cfg.n_activations / 1e6:.1f}M activations")
            res = train_run(run, profile=profile, stage=stage, model=model, train_rows=train_rows,
                            val_tokens=val_tokens, val_rows=val_rows, upstream=upstream, progress=progress,
                            fresh=fresh)
            m = res["metrics"]
            log(f"    L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  CE recovered {m['ce_loss_recovered']:.3f}  "
                f"dead {m['dead_fraction']:.3f}  ({m['train_seconds']:.0f} s)")
            results[run.name] = res
            rows.append({**m, "recipe": recipe, "seed": seed, "run": run.name})
            curves.append(_history_frame(res["history"], run.name))
    with store.write("sae", profile, SEEDS, config=cfg, inputs=inputs) as w:
        pd.DataFrame(rows).to_parquet(w.dir / "seeds.parquet", index=False)
        pd.concat(curves, ignore_index=True).to_parquet(w.dir / "training_curves.parquet", index=False)
        for name, res in results.items():
            dest = w.work_dir / name
            dest.mkdir()
            for f in (sae_mod.SAE_CFG_FILENAME, sae_mod.SAE_WEIGHTS_FILENAME):
                shutil.copy(res["folder"] / f, dest / f)
        w.metrics.update({"runs": len(rows), "recipes": list(cfg.recipes), "seeds": [0, *cfg.seeds]})
    return store.artifact_path("sae", profile, SEEDS)


UNIVERSALITY = "universality"


def run_universality(profile: str, log=print) -> Path:
    """``sae/<profile>-universality``: each feature's nearest feature (decoder cosine) in every other seed of
    its recipe, both ways (``baselines.seed_matches``), from the weights of ``sae/<profile>-seeds`` (in its
    work folder, on the machine that trained them) and each recipe's own artifact (seed 0); and, as a
    dictionary that shares only the activations' shape (non-negative coordinates in as many dimensions),
    between seed 0 of ``topk`` and the SAE of the randomly initialised LM when it is in the cache. Trains
    nothing; ``universality.parquet`` holds one row per (run, other, feature)."""
    import itertools

    from . import baselines, store

    seeds = store.load("sae", profile, SEEDS)
    inputs, decoders, inits, densities, groups = [seeds], {}, {}, {}, []

    def read(name: str, folder: Path) -> None:  # its trained decoder, and the one its config starts from
        sae = sae_mod.load(folder)
        decoders[name], inits[name] = sae.W_dec.detach(), sae_mod.SAE(sae.cfg).W_dec.detach()

    for recipe in seeds.config.get("recipes", []):
        own = store.load("sae", profile, recipe, check_inputs=False)
        inputs.append(own)
        read(recipe, own.path)
        densities[recipe] = _density_table(own)
        names = [recipe]
        for seed in seeds.config.get("seeds", []):
            name = f"{recipe}-seed{seed}"
            read(name, seeds.file(f"{name}/{sae_mod.SAE_WEIGHTS_FILENAME}").parent)
            density = _staging(profile, name) / "density.npy"
            if not density.is_file():
                raise UserError(f"{density} is not on this machine: retrain the seeds with `monosemantic "
                                f"train-sae --profile {profile} --recipe seeds`")
            densities[name] = np.load(density)
            names.append(name)
        groups.append(names)
    pairs = [p for names in groups for p in itertools.permutations(names, 2)]
    if not pairs:
        raise UserError(f"{seeds.key} holds no recipe with two seeds; run `monosemantic train-sae --profile "
                        f"{profile} --recipe seeds`")
    if "topk" in decoders and (store.artifact_path("sae", profile, RANDOM_MODEL) / store.MANIFEST).is_file():
        rnd = store.load("sae", profile, RANDOM_MODEL, check_inputs=False)
        inputs.append(rnd)
        read(RANDOM_MODEL, rnd.path)
        densities[RANDOM_MODEL] = _density_table(rnd)
        pairs += [("topk", RANDOM_MODEL), (RANDOM_MODEL, "topk")]
    table = baselines.seed_matches(decoders, densities, pairs, inits)
    with store.write("sae", profile, UNIVERSALITY, config={"pairs": [list(p) for p in pairs]}, inputs=inputs) as w:
        table.to_parquet(w.dir / "universality.parquet", index=False)
        alive = table[table.density > 0]
        w.metrics.update({f"median_cosine_{a}_vs_{b}": round(float(g.cosine.median()), 4)
                          for (a, b), g in alive.groupby(["run", "other"])})
    log(f"{UNIVERSALITY}: {len(pairs)} ordered pairs of dictionaries")
    return store.artifact_path("sae", profile, UNIVERSALITY)


def _density_table(art) -> np.ndarray:
    """An SAE artifact's feature densities on its density sample, by feature index."""
    import pandas as pd

    t = pd.read_parquet(art.file("feature_density.parquet")).sort_values("feature")
    return t.density.to_numpy()


def run_random_model(profile: str, stage: SAEStageConfig, progress: bool = True, fresh: bool = False,
                     log=print) -> Path:
    """``sae/<profile>-random-model``: the ``topk`` recipe, with the same data, length and evaluation, on the MLP
    activations of a randomly initialised copy of the LM (seed ``RANDOM_MODEL_SEED``): the control that tells
    what an SAE finds in activations that no training shaped (Bricken et al. 2023, "Towards Monosemanticity",
    compare features of a random transformer). Its activations are harvested from the same train windows as
    the real model's, into ``cache/work/sae/<profile>/runs/random-model-harvest/`` (not committed)."""
    from . import store
    from .data import TokenDataset
    from .lm import LMConfig, random_lm

    lm_art = store.load("lm", profile, "model")
    model = random_lm(LMConfig(**lm_art.config), RANDOM_MODEL_SEED)
    h = stage.harvest
    if model.config.d_mlp != stage.topk.d_in:
        raise ConfigError(f"the {profile} model has {model.config.d_mlp} MLP neurons but the SAEs read "
                          f"d_in = {stage.topk.d_in}; fix profiles.py")
    folder = _staging(profile, f"{RANDOM_MODEL}-harvest")
    stamp = h.config_hash() + lm_art.content_hash + f"-seed{RANDOM_MODEL_SEED}"
    done = folder / "complete"
    if fresh or not done.is_file() or done.read_text() != stamp:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.perf_counter()
        for split, n in (("train", h.train_activations), ("val", h.val_activations)):
            harvest_to_disk(model, TokenDataset.open(profile, split).tokens, n, folder / f"{split}.f16",
                            seq_len=h.seq_len, seed=h.seed, hook=h.hook, progress=progress)
        done.write_text(stamp)
        log(f"harvested the random LM's activations in {time.perf_counter() - start:.0f} s")
    train_rows = open_rows(folder / "train.f16", model.config.d_mlp, h.train_activations)
    val_rows = open_rows(folder / "val.f16", model.config.d_mlp, h.val_activations)
    run = Run(RANDOM_MODEL, "main", stage.topk)
    log(f"{RANDOM_MODEL}: topk {run.cfg.d_in}->{run.cfg.n_features} k={run.cfg.k} on a random LM (seed "
        f"{RANDOM_MODEL_SEED}), {run.cfg.n_activations / 1e6:.1f}M activations")
    result = train_run(run, profile=profile, stage=stage, model=model, train_rows=train_rows,
                       val_tokens=TokenDataset.open(profile, "val").tokens, val_rows=val_rows, upstream=stamp,
                       progress=progress, fresh=fresh, model_name=f"monosemantic-lm-{profile}-random-init")
    m = result["metrics"]
    log(f"    L0 {m['l0']:.1f}  FVU {m['fvu']:.3f}  dead {m['dead_fraction']:.3f}  ({m['train_seconds']:.0f} s)")
    result["metrics"]["model_seed"] = RANDOM_MODEL_SEED
    return write_main(profile, RANDOM_MODEL, stage, result, [lm_art])


def export(profile: str, recipe: str, out: Path) -> Path:
    """Copy a committed SAE to ``out`` in SAELens's on-disk format (cfg.json + sae_weights.safetensors)."""
    from . import store

    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; export one of {', '.join(RECIPES)}")
    art = store.load("sae", profile, recipe)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    return sae_mod.export(art.path, out)  # SAELens 6's cfg.json (the committed one may predate its version key)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    """``monosemantic harvest``."""
    _threads(args)
    art = run_harvest(args.profile, args.profile_config.sae.harvest, progress=not args.no_progress)
    print(f"harvested {art.metrics['train_activations']:,} train and {art.metrics['val_activations']:,} val "
          f"activations in {art.metrics['harvest_seconds']:.0f} s -> {art.work_path}")
    return 0


class TrainCommand:
    """``monosemantic train-sae``."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_arguments(p)
        p.add_argument("--recipe", default="all",
                       choices=(*RECIPES, RANDOM_MODEL, SEEDS, UNIVERSALITY, GAUSSIAN_NULL, "sweep", "all"),
                       help="anchor: the anchor's ReLU+L1 recipe, literally; anchor-fixed: the same with its "
                            "initialisation, decoder norm and resampling fixed; topk: ours; random-model: topk on "
                            "a randomly initialised copy of the LM (a control); seeds: topk and anchor-fixed with "
                            "seeds 1 and 2; universality: nearest features across those seeds (trains nothing); "
                            "gaussian-null: the width sweep on Gaussian data with the activations' covariance (a "
                            "control); sweep: the L1/k frontiers and the width sweep; all (default): every one")
        p.add_argument("--fresh", action="store_true", help="retrain runs that are already staged")
        p.add_argument("--seeds-of", action="append", choices=RECIPES, metavar="RECIPE",
                       help="with --recipe seeds: retrain only this recipe with other seeds (repeatable; default: "
                            f"{', '.join(SeedsConfig().recipes)})")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        _threads(args)
        stage = args.profile_config.sae
        only = (*RECIPES, "sweep") if args.recipe == "all" else (args.recipe,)
        progress = not args.no_progress
        trains_none = args.recipe in (RANDOM_MODEL, SEEDS, UNIVERSALITY, GAUSSIAN_NULL)
        paths = [] if trains_none else run_stage(args.profile, stage, only, progress=progress, fresh=args.fresh)
        if args.recipe in ("all", RANDOM_MODEL):
            paths.append(run_random_model(args.profile, stage, progress=progress, fresh=args.fresh))
        if args.recipe in ("all", SEEDS):
            seeds = SeedsConfig(recipes=tuple(args.seeds_of)) if args.seeds_of else SeedsConfig()
            paths.append(run_seeds(args.profile, stage, seeds, progress=progress, fresh=args.fresh))
        if args.recipe in ("all", SEEDS, UNIVERSALITY):
            paths.append(run_universality(args.profile))
        if args.recipe in ("all", GAUSSIAN_NULL):
            from . import gaussian_null

            act_art, train_rows = harvest_rows(args.profile, stage)
            paths.append(gaussian_null.run(args.profile, plan(stage), act_art, train_rows, progress=progress))
        for path in paths:
            print(f"wrote {path}")
        return 0


class ExportCommand:
    """``monosemantic export-sae``."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", choices=RECIPES, default="topk", help="which SAE (default: topk)")
        p.add_argument("--out", type=Path, required=True, help="an empty or new folder")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        out = export(args.profile, args.recipe, args.out)
        print(f"wrote {out}/{sae_mod.SAE_CFG_FILENAME} and {sae_mod.SAE_WEIGHTS_FILENAME} (SAELens's format: "
              f"sae_lens.SAE.load_from_disk('{out}'))")
        return 0
