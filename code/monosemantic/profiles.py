"""The three profiles, each a set of stage configs, in one place.

- ``tiny``: seconds on one CPU core; what the tests and CI run end to end.
- ``cpu``:  the committed default, at reduced scale; the whole pipeline takes hours on a 2-core CPU (the
           README and the book's appendix A give each profile's wall time, summed from the manifests).
- ``gpu``:  the anchor's scale (~819M LM tokens, >= 90M SAE activations) and beyond, on one H100.

Each stage module defines its config dataclass; this module picks its numbers per profile. A stage
reads its config with ``profiles.get("cpu").lm`` and nothing else.
"""

from __future__ import annotations

import dataclasses

from .analysis import AnalysisConfig
from .config import check_profile
from .corpus import CorpusConfig
from .diffing import DiffConfig
from .heldout import HeldoutConfig
from .llama import LlamaConfig
from .lm import LMConfig
from .sae import SAEConfig
from .sae_train import HarvestConfig, SAEStageConfig
from .toy import RecoveryConfig, SuperpositionConfig, ToyConfig


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    toy: ToyConfig  # chapter 2's synthetic experiments (superposition, dictionary recovery)
    # one field per stage, added as stages land (each a StageConfig subclass)
    corpus: CorpusConfig  # the text corpus and its token shards
    llama: LlamaConfig  # Llama-family models (SmolLM2 here, Stheno on a rented GPU)
    lm: LMConfig  # the one-layer language model and its training
    sae: SAEStageConfig  # SAEs on the one-layer model's MLP: harvest, three recipes, frontiers, width sweep
    analysis: AnalysisConfig  # features and neurons measured alike: dashboards, scores, splitting
    diff: DiffConfig  # chapter 5's pilot: a fine-tune of the LM diffed with a crosscoder
    heldout: HeldoutConfig = HeldoutConfig()  # the held-out windows for unit-level claims (>= 5M tokens)


def get(name: str) -> Profile:
    """The profile called ``name`` (``tiny``, ``cpu`` or ``gpu``)."""
    check_profile(name)
    return _PROFILES[name]()


def _tiny() -> Profile:
    return Profile(name="tiny", toy=_toy_tiny(), llama=LlamaConfig(
        model="random:tiny", dtype="float32", seq_len=32, batch_size=4, harvest_tokens=2048, shard_tokens=512,
        expansion=4, k=4, sae_batch=128, sae_epochs=2, eval_tokens=256), corpus=_corpus_tiny(),
        lm=LMConfig(context_length=32, d_model=32, n_heads=4, d_mlp=128, steps=40, batch_size=8, lr=3e-3,
                    lr_final=3e-4, warmup_steps=5, eval_interval=20, eval_batches=2, checkpoint_interval=20,
                    compile=False), sae=_sae_tiny(),
                   analysis=AnalysisConfig(explain_tokens=16_384, top_contexts=4, interval_samples=2,
                                           batch_windows=32, min_firings=3),  # seconds
                   diff=DiffConfig(source="numpy-docs", steps=8, batch_size=4, eval_windows=4, harvest_tokens=2048,
                                   n_features=256, k=4, epochs=1),
                   heldout=HeldoutConfig(target_tokens=32_768, floor_tokens=2_048, fallback_gap=64))


def _cpu() -> Profile:
    return Profile(name="cpu", toy=_toy_cpu(), llama=LlamaConfig(  # SmolLM2-135M: ~2 h on 2 cores (harvest 76 min)
        # 2x: with these settings and this harvest a 4x SAE left 55% of its latents never firing on 65,790
        # held-out activations (2x: 1.7%), fewer live latents than 2x has, at the same FVU (0.105 vs 0.106),
        # in 4.2x the training time (chapter 4's width table); 8x on 200k tokens had left 67% dead
        model="smollm2", seq_len=256, batch_size=8, harvest_tokens=2_000_000, shard_tokens=32_768,
        expansion=2, k=32, sae_batch=1024, sae_lr=4e-4, sae_epochs=1.5,
        # the first 32,768 held-out tokens span 21 documents (16,384: 11), the units of the CE interval
        eval_tokens=32_768,
        # AuxK stronger than the default (Gao et al.'s weight 1/32, our 100k window): on a 2x SAE, 1.7% of
        # latents never fired on 65,790 held-out activations against 10.6% (`monosemantic llama sweep
        # --profile cpu --expansion 2`)
        aux_coeff=1 / 8, dead_window=25_000), corpus=_corpus_cpu(),
        # the anchor's model on 2% of its tokens (16.4M: ~50 min on 2 quiet cores, two hours or more on a busy
        # machine), so a 4x higher lr, dropped 10x later (at 3/4, where the anchor drops at 1/4)
        lm=LMConfig(steps=4_000, lr=2e-3, lr_final=2e-4, lr_drop_at=0.75, eval_interval=250,
                    checkpoint_interval=100), sae=_sae_cpu(),
        analysis=AnalysisConfig(),  # 2M explanation tokens + the 0.5M val split: a few minutes
        diff=DiffConfig())  # 1.2M fine-tuning tokens of Shakespeare, a 1M-row crosscoder: ~15 min


def _gpu() -> Profile:
    return Profile(name="gpu", toy=_toy_gpu(), llama=LlamaConfig(  # L3-8B-Stheno on one rented H100: ~230 GB of shards
        model="Sao10K/L3-8B-Stheno-v3.2", seq_len=1024, batch_size=16, harvest_tokens=8_000_000,
        shard_tokens=32_768, store_dtype="bfloat16", expansion=8, k=64, sae_batch=4096, sae_epochs=2,
        eval_tokens=65_536), corpus=_corpus_gpu(),
        lm=LMConfig(steps=200_000, batch_size=32, lr=5e-4, lr_final=5e-5, lr_drop_at=0.25, eval_interval=2_000,
                    checkpoint_interval=10_000, loss_chunk=4096),  # the anchor's 819M tokens and schedule
        sae=_sae_gpu(), analysis=AnalysisConfig(explain_tokens=10_000_000, top_contexts=20),
        diff=DiffConfig(steps=2_000, harvest_tokens=20_000_000, n_features=16_384, k=32))


def _sae_tiny() -> SAEStageConfig:  # the tiny LM: 128 neurons, context 32
    relu = SAEConfig(d_in=128, n_features=512, batch_size=128, n_steps=64, resample_every=20, resample_pool=1024,
                     dead_window=2048, log_every=16)
    # the literal recipe at this scale: a window of 8 batches, resampled after updates 21, 41 and 61
    anchor = relu.replace(**{**_LITERAL, "resample_every": 20, "dead_window": 1024})
    topk = relu.replace(architecture="topk", k=8, aux_k=64, lr=1e-3)
    return SAEStageConfig(harvest=HarvestConfig(train_activations=8192, val_activations=2048, seq_len=32),
                          anchor=anchor, anchor_fixed=relu, topk=topk, l1_coeffs=(1e-3, 1e-2), ks=(4, 8),
                          widths=(256, 512), sweep_activations=4096, eval_windows=8)


# The anchor's SAE recipe (jnward/monosemanticity-repro: autoencoder.py, neuron_resampling.ipynb cells 9, 11
# and 17): ReLU, 3e-3 L1, Adam 1e-4, batch 896, resampling every 1,000 steps; we keep its numbers and compute
# in the stage's dtype policy. _LITERAL is the rest of its algorithm: nn.Linear's initialisation, the decoder
# normalised per input coordinate, and its resampling rule (dead = no firing on a fresh 10,240 // 896 = 11-batch
# window; for the whole run). The fixed variant keeps Gao et al.'s init, unit feature directions and
# Anthropic's rule over the first half. Ours: TopK k = 24 (L0 under the 30) with AuxK, Adam 4e-4
# (Gao et al.'s 2e-4 / sqrt(n / 2^14) at 4,096 latents), batch 1,024.
_LITERAL = dict(init="anchor-linear", init_encoder_transpose=False, b_dec_init="init", decoder_norm_axis="input",
                resample_rule="anchor", resample_every=1000, resample_until=1.0, dead_window=10_240)
_ANCHOR_FIXED_SAE = SAEConfig(architecture="relu", l1_coeff=3e-3, lr=1e-4, batch_size=896, dtype="auto")
_ANCHOR_SAE = _ANCHOR_FIXED_SAE.replace(**_LITERAL)
_TOPK_SAE = SAEConfig(architecture="topk", k=24, lr=4e-4, batch_size=1024, dtype="auto", resample_every=0)


def _sae_cpu() -> SAEStageConfig:  # the three main SAEs on 6M activations, the 17 frontier and width runs on 1M each
    n = 6_000_000
    # L1 frontier: our MLP activations are small (E|x|^2 = 5.7 against the d_in = 512 that input-normalised
    # SAEs assume), so the anchor's 3e-3 silences almost every feature here; 3e-4 is about what 3e-3 means on
    # normalised inputs (3e-3 / sqrt(512 / 5.7)), and the grid brackets both
    return SAEStageConfig(harvest=HarvestConfig(train_activations=n, val_activations=1_000_000),
                          anchor=_ANCHOR_SAE.with_activations(n), anchor_fixed=_ANCHOR_FIXED_SAE.with_activations(n),
                          topk=_TOPK_SAE.with_activations(n), l1_coeffs=(1e-4, 2e-4, 3e-4, 1e-3, 3e-3),
                          sweep_activations=1_000_000, eval_windows=256)


def _sae_gpu() -> SAEStageConfig:  # the anchor's ~90M activations (3 epochs of 30M harvested: 31 GB of fp16)
    n = 90_000_000
    return SAEStageConfig(harvest=HarvestConfig(train_activations=30_000_000, val_activations=10_000_000),
                          anchor=_ANCHOR_SAE.replace(n_steps=100_000),  # its 100,000 steps: 89.6M activations
                          anchor_fixed=_ANCHOR_FIXED_SAE.replace(dead_window=10_000_000).with_activations(n),
                          topk=_TOPK_SAE.replace(dead_window=10_000_000).with_activations(n),
                          widths=(512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
                          sweep_activations=30_000_000, eval_windows=2048)


def _toy_tiny() -> ToyConfig:
    return ToyConfig(
        superposition=SuperpositionConfig(n_features=10, n_hidden=3, densities=(1.0, 0.1, 0.01), n_seeds=1,
                                          batch_size=256, n_steps=300),
        recovery=RecoveryConfig(d=16, n_true=48, mean_active=3.0, n_train=8192, n_eval=2048, widths=(1, 3, 6),
                                l1_coeffs=(3e-3,), ks=(4,), n_steps=100, batch_size=256, lr=3e-3,
                                resample_every=50, dead_window=4096))


def _toy_cpu() -> ToyConfig:  # about 5 minutes on 2 cores
    return ToyConfig(
        superposition=SuperpositionConfig(densities=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01, 0.005, 0.002),
                                          n_seeds=2, n_steps=8000),
        recovery=RecoveryConfig(n_steps=2000))


def _toy_gpu() -> ToyConfig:  # synthetic and small: the GPU profile only trains longer
    return ToyConfig(
        superposition=SuperpositionConfig(densities=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01, 0.005, 0.002,
                                                     0.001), n_seeds=5, n_steps=20_000),
        recovery=RecoveryConfig(n_train=1_048_576, n_steps=10_000))


def _corpus_tiny() -> CorpusConfig:  # files of pinned packages already installed: no download, seconds
    return CorpusConfig(sources=(("tqdm-code", 0), ("numpy-docs", 150_000), ("licences-installed", 0)),
                        val_fraction=0.05)


# (source, max GPT-2 tokens; 0 = all of it): the cpu mix, 110.6M tokens; by kind (built): English 28%, technical
# 17%, code 24%, LaTeX 5%, non-English 23%, legal 4% (the survey's reachable 100M mix, shared/CORPUS.md)
_CPU_MIX = (
    ("gcide", 15_000_000), ("wordnet", 8_000_000), ("foldoc", 0), ("jargon", 0), ("shakespeare", 0), ("sotu", 0),
    ("moby-dick", 0), ("brown", 0), ("fortunes-en", 0),
    ("linux-docs", 10_000_000), ("python-docs", 0), ("perl-docs", 0), ("rust-docs", 2_000_000),
    ("linux-code", 9_000_000), ("gcc-code", 5_000_000), ("java-code", 3_000_000), ("go-code", 3_000_000),
    ("rust-code", 3_000_000), ("python-code", 3_000_000),
    ("latex", 0), ("sympy-docs", 0),
    ("manpages-l10n", 5_000_000), ("libreoffice-help", 4_000_000), ("debian-handbook", 3_000_000),
    ("gcc-po", 2_000_000), ("chinese-poetry", 2_500_000), ("quran-arabic", 0), ("udhr", 0), ("fortunes-l10n", 0),
    ("licences", 4_000_000), ("spdx", 0),
)


def _corpus_cpu() -> CorpusConfig:
    return CorpusConfig(sources=_CPU_MIX)


def _corpus_gpu() -> CorpusConfig:  # all the sources hold, code capped: 439M tokens (built 04:40), 65% code
    bigger = {"linux-code": 120_000_000, "gcc-code": 60_000_000, "java-code": 40_000_000, "go-code": 30_000_000,
              "rust-code": 30_000_000, "python-code": 0, "chinese-poetry": 20_000_000}
    return CorpusConfig(sources=tuple((n, bigger.get(n, 0)) for n, _ in _CPU_MIX) + (("libreoffice-ui", 0),))


_PROFILES = {"tiny": _tiny, "cpu": _cpu, "gpu": _gpu}
