"""The one-layer transformer language model whose MLP neurons the book studies.

Read bottom-up, nanoGPT style: hook points, attention, MLP, block, the config, then the model (the fused
unembedding + cross-entropy it trains with is :mod:`monosemantic.lm_loss`), which is also an
:class:`~monosemantic.activations.ActivationSource` (with GPT-2's tokenizer), so
``get_activations(model, "The cat sat on the mat", token=" mat")`` works.

The architecture is the anchor's ("Monosemanticity at Home", jnward/monosemanticity-repro,
``transformer.py``; itself a one-layer version of Anthropic's "Towards Monosemanticity" model):

    tokens -> token embedding + learned position embedding                      (B, T, 128)
           -> LayerNorm -> 8-head causal self-attention -> + residual
           -> LayerNorm -> Linear 128->512 -> ReLU -> Linear 512->128 -> + residual
           -> final LayerNorm -> Linear 128->50304 (with bias, not tied)    logits (B, T, 50304)

Our default is the standard form of attention (an output projection W_O, scores scaled by
1/sqrt(d_head)); ``LMArchitecture.anchor_quirks=True`` reproduces the anchor's two departures from it: heads
concatenated with no W_O, and scores scaled by 1/sqrt(d_model).

Every intermediate tensor passes through a :class:`HookPoint` named after what it holds, TransformerLens
style (``blocks.0.mlp.hook_post`` = the 512 MLP activations after the ReLU, the SAE's input). A hook can
read a tensor or replace it (the SAE engineer splices reconstructions in through
``blocks.0.mlp.hook_post``).

Speed: on a CPU, a training token costs ~40 MFLOP, 97% of it in the 128 x 50,304 unembedding and its
cross-entropy. :class:`LinearCrossEntropy` computes both in chunks of tokens, never materialising the
(tokens, 50,304) logits, and computes the gradients during the forward pass (the loss is the last node
of the graph, so they are known then). In fp32 (what ``auto`` picks on CPUs without bf16 units) a chunk
is ~1,024 tokens whose logits become probabilities in place in one reused buffer; in bf16 a chunk is
``loss_chunk`` tokens and the softmax part is compiled into one fused kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, StageConfig, check_positive
from .lm_loss import FP32_CPU_CHUNK_BYTES, LinearCrossEntropy, loss_chunk_tokens  # noqa: F401 (re-exported)
from .tokenizer import N_VOCAB  # GPT-2's tokens; ids from here up to vocab_size are padding

HookFn = Callable[[torch.Tensor, str], torch.Tensor | None]


# --- hook points ------------------------------------------------------------------------------------

class HookPoint(nn.Module):
    """An identity module around a tensor, so it can be read or replaced without changing the maths.

    Its ``name`` is its attribute path in the model (``blocks.0.mlp.hook_post``), set by the model after
    construction. Each hook is called as ``fn(tensor, name)``; a hook that returns a tensor replaces the
    value flowing on (same shape), one that returns None only reads it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.fns: list[HookFn] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            out = fn(x, self.name)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook at {self.name} returned shape {tuple(out.shape)}, "
                                     f"expected {tuple(x.shape)}")
                x = out
        return x


class _StopForward(Exception):
    """Raised by run_with_cache once the last hook asked for has been read (skips the unembedding)."""


# --- the transformer block --------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, anchor_quirks: bool):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # the anchor's Q, K, V have no bias
        # the anchor concatenates the heads and adds them to the residual as they are (no W_O)
        self.out = None if anchor_quirks else nn.Linear(d_model, d_model)
        # ... and scales scores by 1/sqrt(d_model) = 1/sqrt(128) where the standard is 1/sqrt(d_head = 16)
        self.scale = 1 / math.sqrt(d_model if anchor_quirks else self.d_head)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_z = HookPoint()  # the heads' outputs, concatenated (before W_O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q = q.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, nh, T, hs)
        z = self.hook_z(z.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        return z if self.out is None else self.out(z)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_mlp)
        self.fc_out = nn.Linear(d_mlp, d_model)
        self.hook_pre = HookPoint()  # (B, T, d_mlp) before the ReLU
        self.hook_post = HookPoint()  # (B, T, d_mlp) after the ReLU: the neurons, the SAE's input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hook_pre(self.fc_in(x))  # (B, T, d_mlp)
        h = self.hook_post(F.relu(h))  # (B, T, d_mlp)
        return self.fc_out(h)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, anchor_quirks: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, anchor_quirks)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_mlp)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)  # (B, T, C)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))  # (B, T, C)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))  # (B, T, C)


# --- config -----------------------------------------------------------------------------------------
#
# Split as the field splits it (SAELens, sparsify): what the model *is* (:class:`LMArchitecture`, saved with its
# weights), how its forward pass *computes* (:class:`LMArithmetic`, the same results to bf16 rounding), and how it
# was *trained* (:class:`LMConfig`, the stage's config, recorded in the artifact's manifest; it holds the other
# two's fields flat, so the hashes of artifacts made before the split stand).

@dataclasses.dataclass(frozen=True)
class LMArchitecture:
    """What the one-layer model is: shapes and attention form (the anchor's, jnward/monosemanticity-repro
    transformer.py). Saved with the weights (safetensors metadata ``architecture``)."""

    vocab_size: int = 50304
    """GPT-2's 50,257 tokens padded to a multiple of 64, so the unembedding tiles well (nanoGPT, anchor)."""
    context_length: int = 128
    d_model: int = 128
    n_heads: int = 8
    d_mlp: int = 512
    """Neurons in the MLP hidden layer: what the SAEs decompose."""
    anchor_quirks: bool = False
    """True: attention as the anchor wrote it (no output projection W_O, scores scaled by 1/sqrt(d_model)).
    False: the standard form (W_O, 1/sqrt(d_head))."""

    def __post_init__(self) -> None:
        check_positive(self, "vocab_size", "context_length", "d_model", "n_heads", "d_mlp", integer=True)
        if self.d_model % self.n_heads:
            raise ConfigError(f"lm.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LMArchitecture:
        """From an architecture's dict, or from a whole :class:`LMConfig`'s (its other fields ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class LMArithmetic:
    """How the model's forward pass computes: the autocast dtype and the fused loss (results agree to bf16
    rounding). Not saved with the weights: a model loads with the defaults, and a run sets its own."""

    dtype: str = "auto"
    """Autocast dtype of the forward pass, "bfloat16", "float32" or "auto" (whichever of the two runs this
    model's products faster on this machine, measured once: :func:`monosemantic.hardware.auto_dtype`; bf16 is
    emulated and ~28x slower on AVX2-only CPUs). Weights and Adam state stay fp32."""
    loss_chunk: int = 128
    """Tokens per chunk of the fused unembedding + cross-entropy (0: plain logits + F.cross_entropy). On a CPU
    a chunk is at least ~256 MB of logits in fp32 and ~32 MB in bf16 (:func:`loss_chunk_tokens`: 1,024 and
    256 tokens at vocab 50,304), where the steps ran fastest; the value here is for GPUs."""
    compile: bool = True
    """torch.compile the fused softmax kernel of the bf16 path (and nothing else: the rest gains little on a
    CPU; the fp32 path uses PyTorch's own softmax kernel, in place, and compiles nothing)."""
    rows: int = 32 * 128
    """Tokens of the products that ``auto`` is measured on (a training batch)."""

    def __post_init__(self) -> None:
        check_positive(self, "rows", integer=True)
        if self.loss_chunk < 0:
            raise ConfigError("lm.loss_chunk must be >= 0")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"lm.dtype must be 'auto', 'bfloat16' or 'float32', got {self.dtype!r}")

    def replace(self, **changes: Any) -> LMArithmetic:
        return dataclasses.replace(self, **changes)

    def forward_shapes(self, arch: LMArchitecture, rows: int | None = None) -> list[tuple[int, int, int]]:
        """The (m, k, n) of the model's largest products for ``rows`` tokens (default: ``self.rows``):
        attention's q/k/v, the MLP's two, and the unembedding over one loss chunk."""
        m = rows or self.rows
        d, f = arch.d_model, arch.d_mlp
        return [(m, d, 3 * d), (m, d, f), (m, f, d), (min(m, self.loss_chunk or m), d, arch.vocab_size)]

    def compute_dtype(self, arch: LMArchitecture, device: torch.device | str = "cpu") -> torch.dtype:
        """``dtype`` as a torch dtype on ``device`` (``auto`` decided once per machine)."""
        from . import hardware

        return hardware.resolve_dtype(self.dtype, "lm", self.forward_shapes(arch), device)


@dataclasses.dataclass(frozen=True)
class LMConfig(StageConfig):
    """The ``lm`` stage: the one-layer model (:class:`LMArchitecture`'s fields), how it computes
    (:class:`LMArithmetic`'s) and how it is trained; one profile's numbers (see profiles.py)."""

    STAGE = "lm"
    VERSION = 1

    # the model: LMArchitecture's fields (documented there)
    vocab_size: int = 50304
    context_length: int = 128
    d_model: int = 128
    n_heads: int = 8
    d_mlp: int = 512
    anchor_quirks: bool = False

    # training (the anchor: 200,000 steps x 32 x 128 tokens, Adam(W) lr 5e-4, dropped to 5e-5 at step 50k)
    steps: int = 200_000
    batch_size: int = 32
    lr: float = 5e-4
    lr_final: float = 5e-5
    """The learning rate after the drop (the anchor's single step down, no decay schedule)."""
    lr_drop_at: float = 0.25
    """Fraction of training after which lr drops to lr_final (the anchor: 50,000 of 200,000 steps)."""
    warmup_steps: int = 100
    """Linear warmup from 0. The anchor has none; it initialises with PyTorch's defaults, whose N(0, 1)
    embeddings start the LayerNorms in a calmer place than GPT-2's init does with Adam's first steps."""
    weight_decay: float = 0.01
    """AdamW's default, which the anchor keeps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0: off). The anchor does not; it costs little and guards bf16 runs."""
    seed: int = 0
    eval_interval: int = 500
    """Steps between validation-loss estimates."""
    eval_batches: int = 20
    """Batches (of batch_size x context_length tokens) per validation estimate."""
    checkpoint_interval: int = 500
    """Steps between checkpoints in cache/work/lm/ (a run resumes from the last one)."""

    # how the forward pass computes: LMArithmetic's fields (documented there; the hash still tracks them)
    dtype: str = "auto"
    loss_chunk: int = 128
    compile: bool = True

    def __post_init__(self) -> None:
        check_positive(self, "steps", "batch_size", "eval_interval", "eval_batches", "checkpoint_interval",
                       integer=True)
        self.architecture  # noqa: B018 (its checks)
        if not 0 < self.lr_final <= self.lr:
            raise ConfigError(f"lm.lr_final ({self.lr_final}) must be in (0, lr = {self.lr}]")
        if not 0 <= self.lr_drop_at <= 1:
            raise ConfigError(f"lm.lr_drop_at must be a fraction in [0, 1], got {self.lr_drop_at}")
        if self.warmup_steps < 0 or self.loss_chunk < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("lm.warmup_steps, loss_chunk, grad_clip and weight_decay must be >= 0")
        self.arithmetic  # noqa: B018 (its checks)

    @property
    def architecture(self) -> LMArchitecture:
        """What the model is (saved with its weights)."""
        return LMArchitecture.from_dict(self.to_dict())

    @property
    def arithmetic(self) -> LMArithmetic:
        """How its forward pass computes, measured for a training batch."""
        return LMArithmetic(dtype=self.dtype, loss_chunk=self.loss_chunk, compile=self.compile,
                            rows=self.tokens_per_step)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    @property
    def train_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def forward_shapes(self, rows: int | None = None) -> list[tuple[int, int, int]]:
        """:meth:`LMArithmetic.forward_shapes` of this model (default rows: a training batch)."""
        return self.arithmetic.forward_shapes(self.architecture, rows)

    def compute_dtype(self, device: torch.device | str = "cpu") -> torch.dtype:
        """``dtype`` as a torch dtype on ``device`` (``auto`` decided once per machine)."""
        return self.arithmetic.compute_dtype(self.architecture, device)

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warmup, then lr, then lr_final after the drop."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr if step < round(self.lr_drop_at * self.steps) else self.lr_final


# --- the model --------------------------------------------------------------------------------------

class LMOutput(NamedTuple):
    logits: torch.Tensor | None
    """(B, T, vocab) fp32; None when targets were given and the fused loss computed the loss without
    materialising them (training and evaluation with ``loss_chunk > 0``)."""
    loss: torch.Tensor | None
    """Mean next-token cross-entropy (nats) when targets were given, else None."""


class Transformer(nn.Module):
    """The one-layer transformer of :class:`LMArchitecture` ``config`` (``model.config``), computing as
    ``arithmetic`` says (``model.arithmetic``; default :class:`LMArithmetic`'s). An :class:`LMConfig` gives
    both (its architecture, and its arithmetic measured for its training batch)."""

    def __init__(self, config: LMArchitecture | LMConfig, arithmetic: LMArithmetic | None = None):
        super().__init__()
        if isinstance(config, LMConfig):
            config, arithmetic = config.architecture, arithmetic or config.arithmetic
        self.config = c = config
        self.arithmetic = arithmetic or LMArithmetic()
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.context_length, c.d_model)
        self.blocks = nn.ModuleList([Block(c.d_model, c.n_heads, c.d_mlp, c.anchor_quirks)])
        self.ln_final = nn.LayerNorm(c.d_model)
        self.unembed = nn.Linear(c.d_model, c.vocab_size)  # with bias, not tied to the embedding (anchor)
        self.hook_embed, self.hook_pos_embed, self.hook_final = HookPoint(), HookPoint(), HookPoint()
        self._tokenizer = None  # GPT-2 r50k, loaded on first use (see the ActivationSource part below)
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: projections into the residual stream scaled down by the number of them
            if name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * len(self.blocks)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's init
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # hook points, named by attribute path, in forward order
    @property
    def hook_points(self) -> dict[str, HookPoint]:
        order = ["hook_embed", "hook_pos_embed"]
        for i in range(len(self.blocks)):
            p = f"blocks.{i}."
            order += [p + n for n in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                                      "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
                                      "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
        order.append("hook_final")
        modules = dict(self.named_modules())
        return {name: modules[name] for name in order}

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        """idx (B, T) token ids, targets (B, T) the next tokens (optional)."""
        c, a = self.config, self.arithmetic
        B, T = idx.shape
        if T > c.context_length:
            raise ValueError(f"sequence of {T} tokens is longer than the context of {c.context_length}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        dtype = a.compute_dtype(c, idx.device)
        with torch.autocast(idx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            x = self.hook_embed(self.embed(idx)) + self.hook_pos_embed(self.pos_embed(pos))  # (B, T, C)
            for block in self.blocks:
                x = block(x)  # (B, T, C)
            x = self.hook_final(self.ln_final(x))  # (B, T, C)
            if targets is None or a.loss_chunk == 0:
                logits = self.unembed(x).float()  # (B, T, V)
        if targets is not None and a.loss_chunk > 0:
            chunk = loss_chunk_tokens(a.loss_chunk, B * T, c.vocab_size, dtype, idx.device)
            loss = LinearCrossEntropy.apply(x.reshape(B * T, -1).float(), self.unembed.weight, self.unembed.bias,
                                            targets.reshape(B * T), chunk, dtype, a.compile, torch.is_grad_enabled())
            return LMOutput(None, loss)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return LMOutput(logits, loss)

    @contextlib.contextmanager
    def hooks(self, hooks: Mapping[str, HookFn] | Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        """Attach ``{name: fn}`` for the duration of a ``with`` block (removed even on error).

        >>> with model.hooks({"blocks.0.mlp.hook_post": lambda h, name: sae(h).reconstruction}):
        ...     spliced_loss = model(idx, targets).loss
        """
        points = self.hook_points
        items = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        for name, _ in items:
            if name not in points:
                raise KeyError(f"unknown hook point {name!r}; known: {', '.join(points)}")
        try:
            for name, fn in items:
                points[name].fns.append(fn)
            yield
        finally:
            for name, fn in items:
                with contextlib.suppress(ValueError):
                    points[name].fns.remove(fn)

    @torch.no_grad()
    def run_with_cache(self, idx: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors at hook points ``names`` for tokens idx (B, T): ``{name: (B, T, d)}`` in fp32.

        The forward pass stops after the last one asked for, so reading the MLP skips the unembedding
        (97% of the model's FLOPs)."""
        order = list(self.hook_points)
        unknown = [n for n in names if n not in order]
        if unknown:
            raise KeyError(f"unknown hook point(s) {unknown}; known: {', '.join(order)}")
        last = max(order.index(n) for n in names)
        cache: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, name: str) -> None:
            cache[name] = x.detach().float()
            if name == order[last]:
                raise _StopForward

        with contextlib.suppress(_StopForward), self.hooks([(n, save) for n in dict.fromkeys(names)]):
            self(idx)
        return {n: cache[n] for n in names}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.context_length:]).logits[:, -1, :]  # (B, V)
            logits[:, N_VOCAB:] = -float("inf")  # the padding ids are never real tokens
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    # --- the ActivationSource protocol (monosemantic.activations): get_activations(model, text, token=" mat")

    @property
    def tokenizer(self) -> Any:
        """GPT-2's r50k BPE (:func:`monosemantic.tokenizer.load`) unless another was set."""
        if self._tokenizer is None:
            from . import tokenizer

            self._tokenizer = tokenizer.load()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(self.hook_points)

    @property
    def default_hook(self) -> str:
        return f"blocks.{len(self.blocks) - 1}.mlp.hook_post"

    @property
    def context_length(self) -> int:
        return self.config.context_length

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.token_strings(ids))

    def run_with_hooks(self, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.run_with_cache(ids.to(self.unembed.weight.device), names)

    # --- sizes

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token (no embeddings, biases, norms)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self, train: bool = True) -> int:
        """Model FLOPs per token (PaLM / nanoGPT count): 6 N + 12 L d T for a training step, a third of it
        for a forward pass; N = matmul parameters, T = context (attention counted as if not causal)."""
        c = self.config
        fwd_bwd = 6 * self.matmul_params() + 12 * len(self.blocks) * c.d_model * c.context_length
        return fwd_bwd if train else fwd_bwd // 3


# --- weights on disk --------------------------------------------------------------------------------

WEIGHTS_FILE = "model.safetensors"


def save_weights(model: Transformer, path: Path, dtype: torch.dtype = torch.float16) -> None:
    """Weights as safetensors (fp16 by default: half the bytes, loss unchanged to 3 decimals), with the model's
    :class:`LMArchitecture` in the metadata (``architecture``), so the file loads on its own."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"architecture": json_dumps(model.config.to_dict())})


def json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def load_weights(path: Path, config: LMArchitecture | LMConfig | None = None) -> Transformer:
    """A model (fp32, eval mode) from a safetensors file written by :func:`save_weights`; ``config`` (None: the
    architecture the file records; files written before the split record the whole :class:`LMConfig` as
    ``config``, read the same way)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    if config is None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "architecture" not in meta and "config" not in meta:
            raise ConfigError(f"{path} records no model architecture: pass the config it was trained with")
        config = LMArchitecture.from_dict(json.loads(meta.get("architecture") or meta["config"]))
    model = Transformer(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def load_pretrained(profile: str | None = None, dtype: str | None = None) -> Transformer:
    """The trained model from the cache: of ``profile``, or the largest profile present. ``dtype``: its forward
    pass's (None: the training config's, ``auto``); the stages that measure the model pass ``float32``, so that
    their numbers do not change with the machine's bf16 units."""
    from . import store

    art = store.load("lm", profile, "model") if profile else store.find("lm", "model")
    model = load_weights(art.file(WEIGHTS_FILE), LMConfig(**art.config))
    if dtype is not None:
        model.arithmetic = model.arithmetic.replace(dtype=dtype)
    model.profile = art.profile  # which run this is, for the book to say
    return model


def random_lm(config, seed: int = 0):
    """A randomly initialised copy of the LM (:class:`monosemantic.lm.Transformer` of ``config``), the same
    for the same seed: the model the ``random-model`` SAE is trained on."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(config).eval()
