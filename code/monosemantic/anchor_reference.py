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

Nothing here is used to train the book's model; :mod:`monosemantic.lm` is that.
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
