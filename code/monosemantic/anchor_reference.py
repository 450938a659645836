"""A faithful fp32 re-creation of the anchor's language model and training step, for benchmarks only.

The anchor is "Monosemanticity at Home" (jnward/monosemanticity-repro): ``transformer.py`` for the model,
``train_transformer.py`` for the loop. Written again here from reading them, keeping what costs time:

- one ``Head`` module per attention head (8 of them), each with its own bias-free key, query and value
  ``nn.Linear``, attention computed by hand (``q @ k^T``, a ``tril`` mask, softmax, ``@ v``), scores scaled
  by 1/sqrt(d_model) (not 1/sqrt(head size)), heads concatenated with no output projection;
- a ReLU MLP 128 -> 512 -> 128 with biases, pre-LayerNorms, a final LayerNorm, an untied unembedding
  ``nn.Linear(128, 50304)`` with bias, and ``F.cross_entropy`` on the full (B*T, 50304) fp32 logits;
- PyTorch's default initialisation, ``torch.optim.AdamW(lr=...)`` with its defaults, and the step
  ``loss = model(x, y); optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()``.

The SAE (``autoencoder.py``, ``train_autoencoder.py``) is re-created the same way at the end: nn.Linear
encoder and decoder, pre-encoder bias, ReLU, MSE + 3e-3 L1, Adam lr 1e-4, its decoder normalisation; and
then the loop that trained the anchor's published SAE, which lives in ``neuron_resampling.ipynb`` (cell 9:
the settings; cell 11: the loop and its resampling block; cell 17: the per-neuron resampling and the
optimizer-state reset), as :func:`anchor_train_sae`. ``monosemantic.sae`` with ``resample_rule="anchor"``
(and ``init="anchor-linear"``, ``decoder_norm_axis="input"``) is tested against it step for step.

Nothing here is used to train the book's model or SAE; :mod:`monosemantic.lm` and :mod:`monosemantic.sae` are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class AnchorMLP(nn.Module):
    def __init__(self, n_embed: int):
        super().__init__()
        self.hidden = nn.Linear(n_embed, 4 * n_embed)
        self.relu = nn.ReLU()
        self.proj = nn.Linear(4 * n_embed, n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.relu(self.hidden(x)))


class AnchorHead(nn.Module):
    def __init__(self, head_size: int, n_embed: int, context_length: int):
        super().__init__()
        self.key = nn.Linear(n_embed, head_size, bias=False)
        self.query = nn.Linear(n_embed, head_size, bias=False)
        self.value = nn.Linear(n_embed, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(context_length, context_length)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        w = q @ k.transpose(-2, -1) * (1 / math.sqrt(C))  # (B, T, T), scaled by the model width
        w = w.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        w = F.softmax(w, dim=-1)
        return w @ self.value(x)  # (B, T, hs)


class AnchorMultiHeadAttention(nn.Module):
    def __init__(self, n_head: int, n_embed: int, context_length: int):
        super().__init__()
        self.heads = nn.ModuleList([AnchorHead(n_embed // n_head, n_embed, context_length) for _ in range(n_head)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, C), no output projection


class AnchorBlock(nn.Module):
    def __init__(self, n_head: int, n_embed: int, context_length: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embed)
        self.attn = AnchorMultiHeadAttention(n_head, n_embed, context_length)
        self.ln2 = nn.LayerNorm(n_embed)
        self.mlp = AnchorMLP(n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AnchorTransformer(nn.Module):
    def __init__(self, n_head: int = 8, n_embed: int = 128, n_layer: int = 1, context_length: int = 128,
                 vocab_size: int = 50304):
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, n_embed)
        self.position_embed = nn.Embedding(context_length, n_embed)
        self.h = nn.ModuleList([AnchorBlock(n_head, n_embed, context_length) for _ in range(n_layer)])
        self.layer_norm = nn.LayerNorm(n_embed)
        self.lm_head = nn.Linear(n_embed, vocab_size)
        self.register_buffer("pos_idxs", torch.arange(context_length))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        x = self.token_embed(idx) + self.position_embed(self.pos_idxs[:T])
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.layer_norm(x))  # (B, T, V) fp32
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def forward_embedding(self, idx: torch.Tensor) -> torch.Tensor:
        """The MLP hidden activations (B, T, 512): what the anchor harvests for its SAE."""
        B, T = idx.shape
        x = self.token_embed(idx) + self.position_embed(self.pos_idxs[:T])
        block = self.h[0]
        x = x + block.attn(block.ln1(x))
        return block.mlp.relu(block.mlp.hidden(block.ln2(x)))


def make_anchor(vocab_size: int = 50304, lr: float = 5e-4) -> tuple[AnchorTransformer, torch.optim.Optimizer]:
    model = AnchorTransformer(vocab_size=vocab_size)
    return model, torch.optim.AdamW(model.parameters(), lr=lr)


def anchor_train_step(model: AnchorTransformer, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                      y: torch.Tensor) -> float:
    """One step as train_transformer.py takes it (loss.item() included: it logs every step)."""
    _, loss = model(x, y)
    value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


# --- the anchor's SAE (autoencoder.py, and the step of train_autoencoder.py) -------------------------------

class AnchorSparseAutoencoder(nn.Module):
    """512 -> 4096 -> 512, as the anchor builds it: ``nn.Linear`` encoder and decoder (PyTorch's default
    initialisation, fp32), the decoder's bias subtracted from the input before encoding (the pre-encoder
    bias), ReLU. ``forward`` returns (x_hat, ``F.mse_loss``, sum over features of |f| meaned over the batch),
    the L1 unweighted: the anchor's loops multiply it by ``lambda_reg``."""

    def __init__(self, d_in: int = 512, n_features: int = 4096):
        super().__init__()
        self.encoder = nn.Linear(d_in, n_features)
        self.relu = nn.ReLU()
        self.decoder = nn.Linear(n_features, d_in)

    def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, recon loss, unweighted L1); the anchor's ``forward(x_in, compute_loss=True)``."""
        f = self.encode(x_in)  # (B, n_features)
        x = self.decoder(f)  # (B, d_in)
        return x, F.mse_loss(x, x_in), f.abs().sum(dim=-1).mean()

    def encode(self, x_in: torch.Tensor) -> torch.Tensor:
        return self.relu(self.encoder(x_in - self.decoder.bias))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # As the anchor's code has it: decoder.weight is (d_in, n_features) and it is normalised along dim=1,
        # i.e. each *input coordinate*'s row across the features, not each feature's direction (a column).
        self.decoder.weight.data = F.normalize(self.decoder.weight.data, p=2, dim=1)


def make_anchor_sae(d_in: int = 512, n_features: int = 4096, lr: float = 1e-4
                    ) -> tuple[AnchorSparseAutoencoder, torch.optim.Optimizer]:
    sae = AnchorSparseAutoencoder(d_in, n_features)
    return sae, torch.optim.Adam(sae.parameters(), lr=lr)


def anchor_sae_step(sae: AnchorSparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    lambda_reg: float = 3e-3) -> float:
    """One SAE step as train_autoencoder.py takes it (batch 896 in its setting): zero_grad, forward,
    backward, Adam, decoder normalisation, and its three losses read back for its progress bar."""
    optimizer.zero_grad()
    _, recon_loss, reg_loss = sae(x)
    reg_loss = reg_loss * lambda_reg
    loss = recon_loss + reg_loss
    loss.backward()
    optimizer.step()
    sae.normalize_decoder()
    recon_loss.item()
    reg_loss.item()
    return loss.item()


# --- the run behind the anchor's published SAE: neuron_resampling.ipynb ------------------------------------

# Cell 9's settings (the loop itself is cell 11)
TRAIN_STEPS = 100_000
LAMBDA_REG = 0.003
BATCH_SIZE = 896
NEURON_RESAMPLING_SAMPLES = 10_240  # its dead-detection window reads 10_240 // 896 = 11 batches: 9,856 rows
RESAMPLE_FREQUENCY = 1000
LR = 1e-4

Choose = Callable[[np.ndarray, int], np.ndarray]
"""(dist (N,) float32 summing to 1, n) -> n distinct row indices, drawn in order."""


def _numpy_choice(dist: np.ndarray, n: int) -> np.ndarray:
    return np.random.choice(dist.shape[0], n, p=dist, replace=False)  # cell 11, numpy's global generator


def anchor_activation_batches(model: AnchorTransformer, token_batches: Iterable[torch.Tensor],
                              context_length: int = 128) -> Iterator[torch.Tensor]:
    """What the anchor's SAE trains on (cell 11): for each (B, T) token batch of its shuffled 128-token
    sequences, the MLP activations (B, 512) at one random position of each sequence ("only take one sample
    per batch element to avoid local similarities")."""
    for xb in token_batches:
        with torch.no_grad():
            x_embedding = model.forward_embedding(xb)  # (B, T, 512)
        random_idxs = torch.randint(context_length, (xb.shape[0],))
        yield x_embedding[range(xb.shape[0]), random_idxs, :]


@torch.no_grad()
def resample_autoencoder_weights(autoencoder: AnchorSparseAutoencoder, sample: torch.Tensor, neuron_idx: int,
                                 scale: float) -> None:
    """Cell 17, for one dead neuron: its encoder row becomes the sample's unit direction times ``scale``
    (0.2 x the mean norm of the live encoder rows), its encoder bias 0, its decoder column the unit
    direction. The anchor reads ``scale`` from a global that cell 11 sets; here it is an argument."""
    autoencoder(sample)  # cell 17 computes the losses before and after the change, for prints it left
    unit_sample = sample / torch.norm(sample)  # commented out; kept, as they are part of its cost
    sample_scaled = unit_sample * scale
    autoencoder.encoder.weight.data[neuron_idx, :] = sample_scaled
    autoencoder.encoder.bias.data[neuron_idx] = 0.0
    autoencoder.decoder.weight.data[:, neuron_idx] = unit_sample
    autoencoder(sample)


def reset_optimizer_state_for_neuron(neuron_idx: int, optimizer: torch.optim.Optimizer) -> None:
    """Cell 17: zero Adam's two moments of one neuron's encoder row, encoder bias and decoder column,
    finding each parameter by the order in which Adam created its state (encoder weight, encoder bias,
    decoder weight, decoder bias). The decoder bias is left alone, and so is ``state['step']`` ("I can't
    update state['step'] because it's shared for all weights"), so the reset rows keep the bias correction
    of a run thousands of steps old."""
    for i, (_param, param_state) in enumerate(optimizer.state.items()):
        n_features, n_embed = optimizer.param_groups[0]["params"][0].shape
        if i == 0:  # encoder weights
            param_state["exp_avg"][neuron_idx, :] = torch.zeros(n_embed)
            param_state["exp_avg_sq"][neuron_idx, :] = torch.zeros(n_embed)
        elif i == 1:  # encoder bias
            param_state["exp_avg"][neuron_idx] = 0.0
            param_state["exp_avg_sq"][neuron_idx] = 0.0
        elif i == 2:  # decoder weights
            param_state["exp_avg"][:, neuron_idx] = torch.zeros(n_embed)
            param_state["exp_avg_sq"][:, neuron_idx] = torch.zeros(n_embed)


@torch.no_grad()
def anchor_resample(autoencoder: AnchorSparseAutoencoder, optimizer: torch.optim.Optimizer,
                    embedding_iterator: Iterator[torch.Tensor],
                    neuron_resampling_samples: int = NEURON_RESAMPLING_SAMPLES, batch_size: int = BATCH_SIZE,
                    choose: Choose | None = None) -> int:
    """Cell 11's resampling block; returns how many neurons were dead (all of them are resampled).

    It draws ``neuron_resampling_samples // batch_size`` fresh batches from the *training* iterator (they
    are never trained on), encodes them with the current SAE, calls dead the neurons with density exactly 0
    on them, and scores each input by its reconstruction MSE (mean over d_in). It then draws as many inputs
    as there are dead neurons, without replacement, with probability proportional to the squared MSE, pairs
    them in the order drawn with the dead neurons in ascending order, resamples each (cell 17), resets its
    Adam moments (cell 17), and finally renormalises the decoder. ``choose`` replaces ``np.random.choice``
    (tests pass a seeded one); the rest is the anchor's code."""
    choose = choose or _numpy_choice
    activations = []
    samples = []
    _recon_losses = []
    for _ in range(neuron_resampling_samples // batch_size):
        batch = next(embedding_iterator)
        outputs = autoencoder.encode(batch)  # (B, n_features)
        x = autoencoder.decoder(outputs)
        _recon_loss = F.mse_loss(x, batch, reduction="none")
        _recon_loss = _recon_loss.mean(axis=1)
        _recon_losses.append(_recon_loss.cpu())  # "it makes the most sense to only use reconstruction loss here"
        activations.append(outputs.cpu())
        samples.append(batch.cpu())
    np_loss = np.concatenate([t.numpy() for t in _recon_losses])
    samples = np.concatenate([t.numpy() for t in samples])  # (N, d_in)
    activation_densities = torch.concat(activations)
    activation_densities = (activation_densities > 0).to(torch.float32).mean(dim=0)  # (n_features,)
    num_dead = (activation_densities == 0).sum().item()

    # now, sample inputs using squared loss as the distribution
    squared_loss = np.square(np_loss)
    dist = squared_loss / squared_loss.sum()
    sample_idxs = choose(dist, num_dead)

    dead_neuron_idxs = np.where(activation_densities.numpy() == 0)[0]
    assert len(dead_neuron_idxs) == num_dead == len(sample_idxs)
    num_neurons = activation_densities.shape[0]
    alive_neuron_idxs = np.setdiff1d(np.arange(num_neurons), dead_neuron_idxs)
    encoder_weights = autoencoder.encoder.weight.data
    avg_norm = torch.mean(torch.norm(encoder_weights[alive_neuron_idxs], dim=1))
    scale = avg_norm.item() * 0.2

    for neuron_idx, sample_idx in zip(dead_neuron_idxs, sample_idxs, strict=True):
        torch_sample = torch.from_numpy(samples[sample_idx])
        resample_autoencoder_weights(autoencoder, torch_sample, int(neuron_idx), scale)
        reset_optimizer_state_for_neuron(int(neuron_idx), optimizer)

    autoencoder.normalize_decoder()
    return num_dead


class AnchorRun(NamedTuple):
    """What :func:`anchor_train_sae` returns: cell 11's three per-step loss lists (the L1 weighted), and
    (step, neurons resampled) for each resampling, ``step`` being cell 11's 0-based one."""

    losses: list[float]
    recon_losses: list[float]
    reg_losses: list[float]
    resampled: list[tuple[int, int]]


def anchor_train_sae(autoencoder: AnchorSparseAutoencoder, optimizer: torch.optim.Optimizer,
                     batch_iterator: Iterator[torch.Tensor], train_steps: int = TRAIN_STEPS,
                     lambda_reg: float = LAMBDA_REG, neuron_resampling_samples: int = NEURON_RESAMPLING_SAMPLES,
                     resample_frequency: int = RESAMPLE_FREQUENCY, batch_size: int = BATCH_SIZE,
                     choose: Choose | None = None) -> AnchorRun:
    """Cell 11's loop: Adam (cell 9: ``torch.optim.Adam(autoencoder.parameters(), lr=1e-4)``) on MSE +
    lambda_reg x L1, the decoder normalised after every step, and after the step of every 0-based ``step``
    > 0 divisible by ``resample_frequency`` (1,000, 2,000, ..., 99,000: the whole run) the resampling block
    (:func:`anchor_resample`), which draws its window from the same ``batch_iterator``. ``batch_iterator``
    yields (batch_size, d_in) activation batches (:func:`anchor_activation_batches` makes them as the
    anchor does, from token batches)."""
    losses, recon_losses, reg_losses, resampled = [], [], [], []
    for step in range(train_steps):
        filtered_xe = next(batch_iterator)
        optimizer.zero_grad()
        outputs, recon_loss, reg_loss = autoencoder(filtered_xe)
        reg_loss = lambda_reg * reg_loss
        loss = recon_loss + reg_loss
        loss.backward()
        optimizer.step()
        autoencoder.normalize_decoder()

        losses.append(loss.item())
        recon_losses.append(recon_loss.item())
        reg_losses.append(reg_loss.item())
        if step and step % resample_frequency == 0:
            n = anchor_resample(autoencoder, optimizer, batch_iterator, neuron_resampling_samples, batch_size,
                                choose)
            resampled.append((step, n))
    return AnchorRun(losses, recon_losses, reg_losses, resampled)
