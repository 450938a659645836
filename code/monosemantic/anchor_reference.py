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
encoder and decoder, pre-encoder bias, ReLU, MSE + 3e-3 L1, Adam lr 1e-4, its decoder normalisation.

Nothing here is used to train the book's model or SAE; :mod:`monosemantic.lm` and :mod:`monosemantic.sae` are.
"""

from __future__ import annotations

import math

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
    bias), ReLU, loss = ``F.mse_loss`` + l1_coeff * (sum over features of |f|, mean over the batch)."""

    def __init__(self, d_in: int = 512, n_features: int = 4096, l1_coeff: float = 3e-3):
        super().__init__()
        self.l1_coeff = l1_coeff
        self.encoder = nn.Linear(d_in, n_features)
        self.relu = nn.ReLU()
        self.decoder = nn.Linear(n_features, d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, recon loss, weighted L1 loss); the anchor returns the L1 unweighted, its loop weights it."""
        f = self.relu(self.encoder(x - self.decoder.bias))  # (B, n_features)
        x_hat = self.decoder(f)  # (B, d_in)
        return x_hat, F.mse_loss(x_hat, x), self.l1_coeff * f.abs().sum(dim=-1).mean()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # As the anchor's code has it: decoder.weight is (d_in, n_features) and it is normalised along dim=1,
        # i.e. each *input coordinate*'s row across the features, not each feature's direction (a column).
        # Kept as it is: the cost is the same either way, and this is a re-creation, not our recipe.
        self.decoder.weight.copy_(F.normalize(self.decoder.weight, dim=1))


def make_anchor_sae(d_in: int = 512, n_features: int = 4096, lr: float = 1e-4
                    ) -> tuple[AnchorSparseAutoencoder, torch.optim.Optimizer]:
    sae = AnchorSparseAutoencoder(d_in, n_features)
    return sae, torch.optim.Adam(sae.parameters(), lr=lr)


def anchor_sae_step(sae: AnchorSparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One SAE step as train_autoencoder.py takes it (batch 896 in its setting): zero_grad, forward,
    backward, Adam, decoder normalisation, and its three losses read back for its progress bar."""
    optimizer.zero_grad()
    _, recon_loss, reg_loss = sae(x)
    loss = recon_loss + reg_loss
    loss.backward()
    optimizer.step()
    sae.normalize_decoder()
    recon_loss.item()
    reg_loss.item()
    return loss.item()
