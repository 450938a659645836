"""SAE folders on disk: SAELens 6's format (``cfg.json`` + ``sae_weights.safetensors``) with our full config
beside it; reads ours and SAELens's (6.x and pre-6.0)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from .model import SAE, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SAEConfig

# --- save / load (SAELens's format, plus our full config) ---------------------------------------------

# SAELens >= 6 picks how to read a cfg.json by ``metadata.sae_lens_version`` (sae_lens/loading/
# pretrained_sae_loaders.py, handle_config_defaulting): absent or under 6.0.0, the file is taken for a pre-6.0
# config, whose metadata is rebuilt from top-level keys, so a nested ``metadata`` (hook_name, model_name) is
# dropped. We record the version of the layout we write, not of an installed SAELens.
SAELENS_FORMAT_VERSION = "6.0.0"
# Our whole SAEConfig sits under this one key; SAELens keeps only its own config fields and ignores it.
OUR_CFG_KEY = "monosemantic"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
TO_SAELENS = {"relu": "standard", "topk": "topk"}
# Keys a pre-6.0 SAELens cfg.json kept at top level that 6.0 moved under "metadata" (LLM_METADATA_KEYS).
PRE6_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                      "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                      "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                      "hook_head_index_out")


def saelens_cfg(cfg: SAEConfig, dtype: str = "float32", metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` of ``cfg`` in SAELens 6's layout (an inference ``SAEConfig.to_dict()``: the keys of
    StandardSAEConfig, or TopKSAEConfig's with ``k``), weights stored in ``dtype``; ``metadata`` (hook_name,
    model_name, ...) goes under ``"metadata"``, our whole config under :data:`OUR_CFG_KEY`."""
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.n_features,
        "architecture": TO_SAELENS[cfg.architecture],
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,  # our encoder subtracts b_dec first
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}  # top k of the raw pre-activations
    out["metadata"] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                       **(metadata or {})}
    out[OUR_CFG_KEY] = cfg.to_dict()
    return out


def save(sae: SAE, folder: str | Path, *, dtype: torch.dtype = torch.float16,
         metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` (:func:`saelens_cfg`) + ``sae_weights.safetensors`` (weights in ``dtype``, fp16 for the
    cache): the layout SAELens 6's ``SAE.load_from_disk`` reads, metadata included. ``metadata`` (e.g.
    ``{"hook_name": "blocks.0.mlp.hook_post", "model_name": ...}``) is SAELens's ``SAEMetadata``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(sae, name).detach().to("cpu", dtype).contiguous() for name in WEIGHT_NAMES}
    save_file(tensors, str(folder / SAE_WEIGHTS_FILENAME))
    cfg = saelens_cfg(sae.cfg, str(dtype).removeprefix("torch."), metadata)
    (folder / SAE_CFG_FILENAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def export(src: str | Path, out: str | Path) -> Path:
    """Rewrite the SAE folder ``src`` (any layout :func:`load` reads) to ``out`` in SAELens 6's layout, weights
    in the dtype they are stored in. Folders saved before :data:`SAELENS_FORMAT_VERSION` was recorded (the
    committed cache's) load in SAELens 6 with their metadata only this way."""
    dtype = _read_cfg(src).get("dtype", "float32").removeprefix("torch.")
    return save(load(src), out, dtype=getattr(torch, dtype), metadata=read_metadata(src))


def load(folder: str | Path, device: torch.device | str = "cpu") -> SAE:
    """Read an SAE folder, weights upcast to float32: ours (:func:`save`; our config under
    :data:`OUR_CFG_KEY`) or one SAELens wrote, 6.x or pre-6.0 (:func:`_config_from_saelens`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = _read_cfg(folder)
    cfg = _config_from_ours(meta) if OUR_CFG_KEY in meta else _config_from_saelens(_as_saelens6(meta), folder)
    weights = load_file(str(folder / SAE_WEIGHTS_FILENAME))
    _check_weights(weights, folder)
    sae = SAE(cfg)
    with torch.no_grad():
        for name in WEIGHT_NAMES:
            param, saved = getattr(sae, name), weights[name]
            if saved.shape != param.shape:
                raise ConfigError(f"{folder / SAE_WEIGHTS_FILENAME}: {name} has shape {tuple(saved.shape)}, expected "
                                  f"{tuple(param.shape)} (W_enc (d_in, d_sae), W_dec (d_sae, d_in))")
            param.copy_(saved.float())
        if not meta.get("apply_b_dec_to_input", True):
            # SAELens without b_dec subtracted first: W_enc^T x + b_enc = W_enc^T (x - b_dec) + (b_enc + W_enc^T b_dec)
            sae.b_enc.copy_(sae.b_enc.double() + sae.b_dec.double() @ sae.W_enc.double())
    return sae.to(device).eval()


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """SAELens's metadata of an SAE folder (hook_name, model_name, ...; pre-6.0 configs kept them at top level)."""
    return dict(_as_saelens6(_read_cfg(folder))["metadata"])


def _read_cfg(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / SAE_CFG_FILENAME).read_text())


def _config_from_ours(meta: dict[str, Any]) -> SAEConfig:
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    return SAEConfig(**{k: v for k, v in meta[OUR_CFG_KEY].items() if k in fields})


def _as_saelens6(meta: dict[str, Any]) -> dict[str, Any]:
    """A cfg.json in SAELens 6's shape. A pre-6.0 one (flat, no ``"metadata"``) is mapped as SAELens's
    handle_pre_6_0_config maps it: hook_point -> hook_name, activation_fn_str "topk" with
    activation_fn_kwargs.k -> architecture "topk", boolean normalize_activations -> "none" /
    "expected_average_only_in", the metadata keys gathered under "metadata"."""
    if "metadata" in meta:
        return meta
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    flat = {renames.get(k, k): v for k, v in meta.items()}
    out = {k: v for k, v in flat.items() if k not in PRE6_METADATA_KEYS}
    out.setdefault("architecture", "standard")
    out.setdefault("reshape_activations", "hook_z" if "hook_z" in (flat.get("hook_name") or "") else "none")
    if flat.get("activation_fn") == "topk":
        out |= {"architecture": "topk", "k": (flat.get("activation_fn_kwargs") or {}).get("k")}
    norm = flat.get("normalize_activations")
    if norm is None or isinstance(norm, bool):  # pre-6.0's boolean: True was Anthropic's April-update scaling
        norm = "expected_average_only_in" if norm else "none"
    out["normalize_activations"] = norm
    out["metadata"] = {k: flat[k] for k in PRE6_METADATA_KEYS if k in flat}
    return out


def _config_from_saelens(cfg: dict[str, Any], folder: Path) -> SAEConfig:
    """Our config of a SAELens 6 cfg.json: architecture standard -> ``"relu"``, topk -> ``"topk"`` with its k.
    SAELens records no training run, so every other field (lr, l1_coeff, batch_size, init, seed, ...) keeps
    SAEConfig's default and describes nothing; ``dtype`` stays float32 (the file's dtype is only how the
    weights were stored). What our SAE cannot compute is one line naming it."""
    def unsupported(what: str) -> ConfigError:
        return ConfigError(f"{folder / SAE_CFG_FILENAME}: SAELens {what} is not supported (monosemantic reads standard "
                           "and topk SAEs without activation normalisation, reshaping or decoder-norm rescaling)")

    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk"):
        raise unsupported(f"architecture {arch!r}")
    if cfg.get("activation_fn", "relu") not in ("relu", "topk"):
        raise unsupported(f"activation_fn {cfg['activation_fn']!r}")
    for key, ok in (("normalize_activations", "none"), ("reshape_activations", "none"),
                    ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(key, ok) != ok:
            raise unsupported(f"{key} {cfg[key]!r}")
    topk = {"architecture": "topk", "k": cfg["k"]} if arch == "topk" else {"architecture": "relu"}
    return SAEConfig(d_in=cfg["d_in"], n_features=cfg["d_sae"], **topk)


def _check_weights(weights: dict[str, Tensor], folder: Path) -> None:
    """SAELens's four tensors, and pre-6.0's ``scaling_factor`` only when it is all ones (none was applied)."""
    scale = weights.pop("scaling_factor", None)
    if scale is not None and not bool((scale == 1).all()):
        raise ConfigError(f"{folder / SAE_WEIGHTS_FILENAME}: SAELens finetuning scaling_factor is not supported "
                          "(monosemantic reads SAEs without one)")
    if set(weights) != set(WEIGHT_NAMES):
        raise ConfigError(f"{folder / SAE_WEIGHTS_FILENAME}: expected the tensors {', '.join(WEIGHT_NAMES)}, found "
                          f"{', '.join(sorted(weights))}")
