"""The SAE itself: its config, its two architectures' forward and backward steps, AuxK, resampling and
evaluation (the package's docstring says what an SAE is here)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hardware
from ..config import ConfigError, StageConfig, check_positive
from .steps import AUX_DENSE_FRACTION, DENSE_GATHER_FRACTION, ReluStep, TopKStep  # noqa: F401 (re-exported)

Architecture = Literal["relu", "topk"]
ARCHITECTURES = ("relu", "topk")
B_DEC_INITS = ("geometric_median", "mean", "zeros", "init")
INITS = ("gao", "anchor-linear")
DECODER_NORM_AXES = ("feature", "input")
RESAMPLE_RULES = ("anthropic", "anchor")
DTYPES = ("float32", "bfloat16", "auto")
DECODES = ("auto", "sparse", "dense")

# SAELens's on-disk file names (sae_lens/constants.py), so its SAE.load_from_disk reads our folders.
SAE_CFG_FILENAME = "cfg.json"
SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"

# Anthropic's resampling recipe ("Towards Monosemanticity", appendix "Neuron resampling"): the new encoder
# row is the sampled input direction scaled to 0.2 x the mean norm of the live encoder rows.
RESAMPLE_ENCODER_SCALE = 0.2


@dataclasses.dataclass(frozen=True)
class SAEConfig(StageConfig):
    """Everything that defines an SAE and its training run. Frozen; validated on construction."""

    STAGE: ClassVar[str] = "sae"

    d_in: int = 512
    """Width of the activations the SAE reads (512 for the one-layer model's MLP, 14,336 for Llama-3-8B)."""
    n_features: int = 4096
    """Dictionary size (SAELens: ``d_sae``). Wider than ``d_in``: see chapter 2 for why."""
    architecture: Architecture = "relu"
    """``"relu"`` (L1 penalty, Bricken et al. 2023) or ``"topk"`` (k largest kept, Gao et al. 2024)."""
    k: int = 32
    """TopK only: latents kept per input (the L0 of every input)."""
    l1_coeff: float = 3e-3
    """ReLU only: weight of the L1 term (sum over features, mean over batch). The anchor's value is 3e-3."""
    lr: float = 1e-4
    """Adam learning rate (the anchor: 1e-4)."""
    batch_size: int = 896
    """Activations per step (the anchor: 896)."""
    n_steps: int = 100_000
    """Optimizer steps; ``n_activations`` = ``n_steps * batch_size`` (the anchor: 100,000 steps, ~90M)."""
    resample_every: int = 1000
    """Resample dead features every this many steps (0: never). The anchor: every 1,000 steps."""
    resample_until: float = 0.5
    """Stop resampling after this fraction of the steps, so the last resampled features can settle (the
    anchor: 1.0, it resamples for the whole run)."""
    resample_rule: Literal["anthropic", "anchor"] = "anthropic"
    """Which dead features are resampled, when, and from which inputs (:func:`resample_dead`).
    ``"anthropic"``: after every ``resample_every``-th step, the latents that have not fired on the last
    ``min(dead_window, resample_every * batch_size)`` training activations, new directions drawn from the
    last ``resample_pool`` training inputs. ``"anchor"``: the anchor's notebook (neuron_resampling.ipynb,
    cell 11): after update s + 1 for every s > 0 with s % ``resample_every`` == 0, ``dead_window //
    batch_size`` fresh batches are drawn from the stream (and not trained on), the latents that fire on none
    of them are dead, and the new directions are drawn from those same inputs."""
    resample_pool: int = 16_384
    """``"anthropic"`` rule: how many recent inputs are scored to choose the new directions of dead features."""
    dead_window: int = 1_000_000
    """A latent that has not fired in this many activations counts as dead (Gao et al.: 10M tokens). Under
    ``resample_rule="anchor"`` also the size of the fresh dead-detection window, in whole batches: the
    anchor's 10,240 samples at batch 896 are ``10_240 // 896`` = 11 batches, 9,856 activations."""
    aux_k: int = 512
    """TopK only: dead latents used by the AuxK loss (Gao et al. 2024: 512; at most ``n_features``)."""
    aux_coeff: float = 1 / 32
    """TopK only: weight of the AuxK loss (Gao et al. 2024, appendix A.2: 1/32). 0 turns AuxK off."""
    init: Literal["gao", "anchor-linear"] = "gao"
    """How the weights start. ``"gao"``: random unit decoder rows, ``W_enc`` their transpose when
    ``init_encoder_transpose`` (else uniform in +-1/sqrt(d_in)), ``b_enc`` = 0. ``"anchor-linear"``: the
    anchor's, PyTorch's ``nn.Linear`` default for both of its layers (weights and biases uniform in
    +-1/sqrt(fan_in): 1/sqrt(d_in) for the encoder, 1/sqrt(n_features) for the decoder, whose rows are then
    not unit norm until the first step), drawn in ``nn.Linear``'s order, so ``torch.manual_seed(seed)``
    before the anchor's constructor gives the same numbers."""
    init_encoder_transpose: bool = True
    """``init="gao"`` only: initialise ``W_enc`` as the transpose of ``W_dec`` (Gao et al. 2024, sec. 2.4)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros", "init"] = "geometric_median"
    """Initial ``b_dec`` from the first batch: its geometric median (Bricken et al.), mean, or zeros; or
    ``"init"``, the one ``init`` drew (zeros for ``"gao"``, nn.Linear's uniform bias for ``"anchor-linear"``)."""
    decoder_norm_axis: Literal["feature", "input"] = "feature"
    """Which unit norm the decoder is held to after every step (:meth:`SAE.normalize_decoder`).
    ``"feature"``: each feature's direction, a row of ``W_dec`` (Bricken et al.). ``"input"``: each input
    coordinate across the features, a column of ``W_dec``: what the anchor's ``F.normalize(decoder.weight,
    dim=1)`` does to its (d_in, n_features) weight (autoencoder.py)."""
    decode: Literal["auto", "sparse", "dense"] = "auto"
    """TopK only: decode with the k active rows (``embedding_bag``) or a dense matmul; ``auto`` picks the
    sparse path when ``k`` is under 1/8 of ``n_features``. Both give the same numbers (a test says so)."""
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    """Compute dtype of the matmuls (autocast; weights and Adam state stay float32). ``auto``: whichever of
    bfloat16 and float32 runs this SAE's products faster on this machine, measured once
    (:func:`monosemantic.hardware.auto_dtype`; bf16 only when it is >= 1.25x faster)."""
    seed: int = 0
    """Seed of the initial weights and of the batch order of a tensor source: same seed, same SAE."""
    log_every: int = 100
    """Steps per logged interval of the training curve."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"SAEConfig: {msg}")

        check_positive(self, "d_in", "n_features", "batch_size", "n_steps", "k", "aux_k", "dead_window",
                       "resample_pool", "log_every", integer=True)
        need(self.architecture in ARCHITECTURES,
             f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        need(self.b_dec_init in B_DEC_INITS, f"b_dec_init must be one of {', '.join(B_DEC_INITS)}, "
             f"got {self.b_dec_init!r}")
        need(self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        need(self.init == "gao" or not self.init_encoder_transpose,
             f"init_encoder_transpose is a choice of init='gao'; set it False with init={self.init!r}")
        need(self.decoder_norm_axis in DECODER_NORM_AXES, f"decoder_norm_axis must be one of "
             f"{', '.join(DECODER_NORM_AXES)}, got {self.decoder_norm_axis!r}")
        need(self.resample_rule in RESAMPLE_RULES, f"resample_rule must be one of {', '.join(RESAMPLE_RULES)}, "
             f"got {self.resample_rule!r}")
        need(self.resample_rule != "anchor" or not self.resample_every or self.dead_window >= self.batch_size,
             f"dead_window = {self.dead_window} is under batch_size = {self.batch_size}: the anchor rule "
             "checks dead_window // batch_size whole batches")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.decode in DECODES, f"decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        need(self.architecture != "topk" or self.k <= self.n_features,
             f"k = {self.k} is larger than n_features = {self.n_features}")
        need(self.l1_coeff >= 0, f"l1_coeff must be >= 0, got {self.l1_coeff}")
        need(self.aux_coeff >= 0, f"aux_coeff must be >= 0, got {self.aux_coeff}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(isinstance(self.resample_every, int) and self.resample_every >= 0,
             f"resample_every must be an integer >= 0 (0: never), got {self.resample_every!r}")
        need(0 <= self.resample_until <= 1, f"resample_until must be in [0, 1], got {self.resample_until}")

    @property
    def n_activations(self) -> int:
        """Activations seen in training."""
        return self.n_steps * self.batch_size

    def with_activations(self, n_activations: int) -> SAEConfig:
        """A copy that trains on (about) ``n_activations`` activations at this batch size."""
        return self.replace(n_steps=max(1, round(n_activations / self.batch_size)))

    @property
    def sparse_decode(self) -> bool:
        if self.architecture != "topk" or self.decode == "dense":
            return False
        return self.decode == "sparse" or self.k * 8 <= self.n_features

    def compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        b, d, n = self.batch_size, self.d_in, self.n_features
        return hardware.resolve_dtype(self.dtype, "sae", [(b, d, n), (b, n, d)], device)


class SAEOutput(NamedTuple):
    """What :meth:`SAE.forward` returns. The losses are scalars; ``loss`` is what training minimises."""

    recon: Tensor  # (B, d_in) the reconstruction x_hat
    latents: Tensor  # (B, n_features) the feature activations f (for TopK: zero outside the k kept)
    pre_acts: Tensor  # (B, n_features) encoder output before the activation function
    loss: Tensor  # mse + l1_coeff * l1 (relu) or mse + aux_coeff * aux (topk)
    mse: Tensor  # mean over batch and d_in of (x_hat - x)^2, as F.mse_loss (the anchor's reconstruction term)
    l1: Tensor  # mean over batch of sum over features |f| (unweighted; for TopK only logged)
    aux: Tensor  # AuxK loss (MSE of the residual's reconstruction by dead latents); 0 when unused



class TrainOutput(NamedTuple):
    """What :meth:`SAE.training_forward` returns: the losses of :class:`SAEOutput` and what the trainer
    logs, without the dense (B, n_features) tensors."""

    loss: Tensor  # as SAEOutput.loss
    mse: Tensor
    l1: Tensor
    aux: Tensor
    recon: Tensor  # (B, d_in) float32, detached
    fired: Tensor  # (n_features,) bool: the latent was > 0 on some input of the batch
    l0: Tensor  # mean over the batch of the number of latents > 0


def _linear_init(d_in: int, n_features: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_enc, b_enc, W_dec, b_dec) as the anchor's ``nn.Linear(d_in, n_features)`` encoder and
    ``nn.Linear(n_features, d_in)`` decoder start (autoencoder.py): ``nn.Linear.reset_parameters``, i.e.
    ``kaiming_uniform_(a=sqrt(5))`` for the weight (uniform in +-1/sqrt(fan_in)) then a uniform bias in
    +-1/sqrt(fan_in), drawn in that order, encoder first, from ``gen``. Their weights are (out, in); ours are
    stored (in, out) for the encoder and (n_features, d_in) for the decoder, so both are transposed."""
    def linear(fan_in: int, fan_out: int) -> tuple[Tensor, Tensor]:
        weight = nn.init.kaiming_uniform_(torch.empty(fan_out, fan_in), a=math.sqrt(5), generator=gen)
        bound = 1 / math.sqrt(fan_in)
        return weight, nn.init.uniform_(torch.empty(fan_out), -bound, bound, generator=gen)

    enc_w, enc_b = linear(d_in, n_features)  # (n_features, d_in), (n_features,)
    dec_w, dec_b = linear(n_features, d_in)  # (d_in, n_features), (d_in,)
    return enc_w.t().contiguous(), enc_b, dec_w.t().contiguous(), dec_b


class SAE(nn.Module):
    """A sparse autoencoder; ``cfg.architecture`` selects ReLU + L1 or TopK (+ AuxK)."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.init == "anchor-linear":
            w_enc, b_enc, w_dec, b_dec = _linear_init(cfg.d_in, cfg.n_features, gen)
        else:
            # Decoder rows: random unit directions. Encoder: their transpose (Gao et al. 2024, sec. 2.4), which
            # starts the SAE near a (scaled) identity on the span of the dictionary and avoids early dead latents.
            w_dec = F.normalize(torch.randn(cfg.n_features, cfg.d_in, generator=gen), dim=1)
            if cfg.init_encoder_transpose:
                w_enc = w_dec.t().contiguous()  # a copy, stored row-major like every other weight
            else:
                bound = 1 / math.sqrt(cfg.d_in)  # nn.Linear's default for a d_in -> n_features layer
                w_enc = (torch.rand(cfg.d_in, cfg.n_features, generator=gen) * 2 - 1) * bound
            b_enc, b_dec = torch.zeros(cfg.n_features), torch.zeros(cfg.d_in)
        self.W_enc = nn.Parameter(w_enc)  # (d_in, n_features)
        self.b_enc = nn.Parameter(b_enc)  # (n_features,)
        self.W_dec = nn.Parameter(w_dec)  # (n_features, d_in), unit-norm rows under init="gao"
        self.b_dec = nn.Parameter(b_dec)  # (d_in,)
        if device is not None:
            self.to(device)

    # --- the maths ---------------------------------------------------------------------------------------

    def pre_activations(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n_features): the encoder before its non-linearity (b_dec subtracted first)."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Dense latents (B, n_features), and for TopK the kept (values, indices), each (B, k)."""
        if self.cfg.architecture == "relu":
            return F.relu(pre), None, None
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)  # (B, k)
        values = F.relu(values)
        latents = torch.zeros_like(pre).scatter(-1, indices, values)
        return latents, values, indices

    def encode(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, n_features) feature activations."""
        return self.activate(self.pre_activations(x))[0]

    def decode(self, latents: Tensor) -> Tensor:
        """(B, n_features) -> (B, d_in), dense: latents @ W_dec + b_dec."""
        return latents @ self.W_dec + self.b_dec

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """(B, k) values at (B, k) feature indices -> (B, d_in), touching only those k rows of W_dec."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return out + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Encode, decode and score ``x`` (B, d_in). ``dead_mask`` (n_features,) bool switches on the AuxK
        loss for TopK (the trainer passes its dead-latent tracker's mask)."""
        pre = self.pre_activations(x)  # (B, n_features)
        latents, values, indices = self.activate(pre)
        if values is not None and self.cfg.sparse_decode:
            recon = self.decode_sparse(values, indices)
        else:
            recon = self.decode(latents)
        recon = recon.to(x.dtype)
        mse = F.mse_loss(recon.float(), x.float())
        l1 = latents.float().abs().sum(-1).mean()
        if self.cfg.architecture == "relu":
            aux = mse.new_zeros(())
            loss = mse + self.cfg.l1_coeff * l1
        else:
            use_aux = dead_mask is not None and self.cfg.aux_coeff > 0 and bool(dead_mask.any())
            aux = auxk_loss(self, x, recon, pre, dead_mask) if use_aux else mse.new_zeros(())
            loss = mse + self.cfg.aux_coeff * aux
        return SAEOutput(recon, latents, pre, loss, mse, l1, aux)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Hold the decoder to unit norm along ``cfg.decoder_norm_axis``, so the L1 penalty cannot be dodged
        by shrinking f and growing the decoder. ``"feature"`` (Bricken et al.): every decoder row, one
        feature's direction, has unit L2 norm. ``"input"`` (the anchor's code): its
        ``nn.Linear(n_features, d_in).weight``, shape (d_in, n_features), is normalised along dim 1, so each
        *input coordinate* is unit-norm across the features: a column of our ``W_dec``."""
        if self.cfg.decoder_norm_axis == "input":
            # F.normalize's formula and eps, as autoencoder.py's normalize_decoder_weights calls it
            self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12))  # (n_features, d_in)
        else:
            # under FSDP W_dec is a DTensor sharded by rows (features): each process holds whole rows
            w = self.W_dec.to_local() if hasattr(self.W_dec, "to_local") else self.W_dec
            w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-8))


    # --- the training step's fast path ------------------------------------------------------------------

    def training_forward(self, x: Tensor, dead_mask: Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> TrainOutput:
        """The loss of :meth:`forward` (same value, same gradients; a test says so), computed the cheap way
        for training; ``dtype`` is the matmuls' compute dtype (weights and gradients stay float32).

        - The pre-encoder bias's gradient is ``-W_enc @ (sum over the batch of dL/dpre)``: a matrix-vector
          product instead of the (B, d_in) input gradient a plain autograd backward computes (x needs none).
        - TopK never builds the dense (B, n_features) latents: the k kept are gathered from a pre-activation
          computed without autograd, decoded with ``embedding_bag``, and the encoder's backward touches only
          those B * k entries (a sparse product, O(B k d_in), not O(B n d_in)), unless k is so large
          (``DENSE_GATHER_FRACTION``) that dense matmuls in ``dtype`` are cheaper.
        - AuxK works on the dead latents' columns only: their (B, n_dead) block of the pre-activations, its
          top ``aux_k`` per row, decoded by a (B, n_dead) x (n_dead, d_in) product; its backward is three more
          products of that size. No pass over all n_features columns, so with few dead latents AuxK costs
          little. (With very many dead and a small ``aux_k``, ``AUX_DENSE_FRACTION``, its picks are gathered
          one by one with the k instead.)
        """
        if self.cfg.architecture == "relu":
            loss, mse, l1, recon, fires = ReluStep.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                           self.cfg.l1_coeff, dtype)
            return TrainOutput(loss, mse, l1, mse.new_zeros(()), recon, fires > 0, fires.sum() / x.shape[0])

        cfg = self.cfg
        use_aux = dead_mask is not None and cfg.aux_coeff > 0 and bool(dead_mask.any())
        dead = dead_mask.nonzero()[:, 0] if use_aux else torch.zeros(0, dtype=torch.long, device=x.device)
        loss, mse, aux, recon, indices, values = TopKStep.apply(
            x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, dead, cfg.k, cfg.aux_k, cfg.aux_coeff, dtype)
        with torch.no_grad():
            l1 = values.sum(-1).mean()
            live = values > 0  # (B, k)
            fired = torch.zeros(cfg.n_features, dtype=torch.bool, device=x.device)
            fired[indices[live]] = True
            l0 = live.sum(-1).float().mean()
        return TrainOutput(loss, mse, l1, aux, recon, fired, l0)

def auxk_loss(sae: SAE, x: Tensor, recon: Tensor, pre: Tensor, dead_mask: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024, appendix A.2): reconstruct the residual ``e = x - x_hat`` from the
    ``aux_k`` largest pre-activations among the dead latents only; returns the MSE of that reconstruction
    (mean over batch and d_in, the same scale as the main MSE term, so the 1/32 weight means what it does
    in the paper, where both terms are normalised alike). The residual is a fixed target (detached), so
    the gradient reaches only the dead latents' encoder and decoder rows: they learn to explain what the
    live ones miss.

    x, recon: (B, d_in); pre: (B, n_features) pre-activations; dead_mask: (n_features,) bool.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre.new_zeros((), dtype=torch.float32)
    k_aux = min(sae.cfg.aux_k, n_dead)
    residual = (x - recon).detach().float()  # (B, d_in)
    masked = pre.masked_fill(~dead_mask, float("-inf"))  # only dead latents compete
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)  # (B, k_aux)
    values = F.relu(values)
    e_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values.to(sae.W_dec.dtype), mode="sum")
    return F.mse_loss(e_hat.float(), residual)


@torch.no_grad()
def never_fired(sae: SAE, inputs: Tensor, chunk: int = 4096) -> Tensor:
    """(n_features,) bool: the latents that are > 0 on none of ``inputs`` (N, d_in). The anchor's dead test
    (neuron_resampling.ipynb, cell 11: a density of exactly 0 over its fresh window)."""
    fired = torch.zeros(sae.cfg.n_features, dtype=torch.bool, device=sae.W_dec.device)
    for part in inputs.split(chunk):
        fired |= (sae.encode(part.to(sae.W_dec.device, torch.float32)) > 0).any(0)
    return ~fired


@torch.no_grad()
def resample_dead(sae: SAE, optimizer: torch.optim.Optimizer, inputs: Tensor, dead_mask: Tensor,
                  generator: torch.Generator | None = None) -> int:
    """Give dead features new directions (Bricken et al. 2023, "Neuron resampling"); returns how many.

    For each dead feature, draw an input with probability proportional to its squared reconstruction loss
    under the current SAE, without replacement; its unit direction becomes the decoder row, and the encoder
    column is the same direction scaled to ``0.2 x`` the mean norm of the live features' encoder columns; the
    encoder bias is 0. Adam's moments (not its step count) for exactly those rows and columns are zeroed;
    ``b_dec`` and its moments are not touched. Under ``decoder_norm_axis="feature"`` live features are not
    touched at all; under ``"input"`` the decoder is renormalised afterwards, which rescales every feature.

    The anchor's rule (``resample_rule="anchor"``, neuron_resampling.ipynb cells 11 and 17) is this same
    algorithm: its loss is the per-input MSE (mean over ``d_in``), squared, whose normalised weights are those
    of the squared summed error; it pairs the dead features in ascending order with the inputs in the order
    they were drawn, as we do. It draws with ``np.random.choice(p=..., replace=False)``, we with
    ``torch.multinomial(replacement=False)``: the same distribution, another random stream.

    inputs: (N, d_in) the inputs to draw from (the rule decides which: recent training inputs, or the
    anchor's fresh window); dead_mask: (n_features,) bool.
    """
    dead = dead_mask.nonzero().squeeze(1)
    n_dead = dead.numel()
    if n_dead == 0:
        return 0  # the anchor still renormalises its (already normalised) decoder here: a no-op but rounding
    anchor = sae.cfg.resample_rule == "anchor"
    inputs = inputs.to(sae.W_dec.device, torch.float32)
    losses = []
    for chunk in inputs.split(4096):
        err = (sae(chunk).recon.float() - chunk).pow(2)  # (n, d_in)
        losses.append(err.mean(-1) if anchor else err.sum(-1))
    if anchor:
        # cell 11: squared_loss = np.square(per-input MSE); dist = squared_loss / squared_loss.sum(), float32
        squared = torch.cat(losses).pow(2)
        weights = (squared / squared.sum()).cpu().double()
    else:
        weights = torch.cat(losses).pow(2).cpu().double()  # probability ~ squared loss
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    # more dead features than inputs with a non-zero loss: draw with replacement (the anchor's
    # np.random.choice raises here; at 4,096 features and 9,856 inputs it cannot happen)
    replace = n_dead > int((weights > 0).sum())
    picked = torch.multinomial(weights, n_dead, replacement=replace, generator=generator)
    directions = F.normalize(inputs[picked.to(inputs.device)], dim=1)  # (n_dead, d_in) the raw inputs' directions

    live = ~dead_mask
    enc_norms = sae.W_enc.norm(dim=0)  # (n_features,)
    # no live feature at all: the anchor's mean over an empty set is nan; we take 1
    scale = enc_norms[live].mean() if bool(live.any()) else enc_norms.new_tensor(1.0)
    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = directions.t() * (RESAMPLE_ENCODER_SCALE * scale)
    sae.b_enc[dead] = 0.0

    # Adam's running moments for the changed rows would carry the dead features' old gradients: reset them.
    for param, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    if sae.cfg.decoder_norm_axis == "input":
        # the new rows are unit directions, but the input-axis norm couples every feature: renormalise, as
        # cell 11 does after its loop (``autoencoder.normalize_decoder_weights()``)
        sae.normalize_decoder()
    return n_dead


@torch.no_grad()
def geometric_median(x: Tensor, n_iter: int = 50, eps: float = 1e-6) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``x`` (N, d) (Weiszfeld)."""
    x = x.double()
    median = x.mean(0)
    for _ in range(n_iter):
        dist = (x - median).norm(dim=1).clamp_min(eps)
        w = 1 / dist
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            median = new
            break
        median = new
    return median.float()


# --- evaluation helpers -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(sae: SAE, x: Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Reconstruction and sparsity of ``sae`` on ``x`` (N, d_in): mse (as in training), fvu (fraction of
    variance unexplained), l0 (mean active latents), l1, dead_fraction (latents that never fire on x)
    and the per-latent firing frequency (a (n_features,) tensor, under ``"frequency"``)."""
    resid = total = l0 = l1 = 0.0
    fires = torch.zeros(sae.cfg.n_features, device=sae.W_dec.device)
    mean = x.float().mean(0).to(sae.W_dec.device)
    for chunk in x.split(batch_size):
        chunk = chunk.to(sae.W_dec.device, torch.float32)
        out = sae(chunk)
        resid += float((out.recon.float() - chunk).pow(2).sum())
        total += float((chunk - mean).pow(2).sum())
        active = out.latents > 0
        l0 += float(active.sum())
        l1 += float(out.latents.abs().sum())
        fires += active.sum(0)
    n = x.shape[0]
    return {"mse": resid / (n * sae.cfg.d_in), "fvu": resid / max(total, 1e-12), "l0": l0 / n, "l1": l1 / n,
            "dead_fraction": float((fires == 0).float().mean()), "frequency": (fires / n).cpu()}
