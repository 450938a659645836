"""SAELens's on-disk format both ways: our cfg.json keeps its metadata in SAELens 6, and an SAE folder in
SAELens's layout (6.x, or pre-6.0) with no "monosemantic" key loads in ours with the same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from monosemantic import sae as S
from monosemantic.config import ConfigError

META = {"hook_name": "blocks.0.mlp.hook_post", "model_name": "monosemantic-lm-tiny"}


def _sae(architecture: str = "topk", seed: int = 0) -> S.SAE:
    """A small SAE with every weight random (b_enc and b_dec too, so each bias is checked)."""
    sae = S.SAE(S.SAEConfig(d_in=8, n_features=32, architecture=architecture, k=3, aux_k=8, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in S.WEIGHT_NAMES:
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g))
    return sae.eval()


def _saelens6_cfg(sae: S.SAE, dtype: str = "float32") -> dict:
    """cfg.json exactly as SAELens 6 saves an inference SAE (sae_lens/saes/sae.py SAEConfig.to_dict, with
    StandardSAEConfig's or TopKSAEConfig's fields), written out by hand: the known answer for our writer."""
    cfg = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_features, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None, **META},
           "architecture": "standard" if sae.cfg.architecture == "relu" else "topk"}
    if sae.cfg.architecture == "topk":
        cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    return cfg


def _write(folder, cfg: dict, tensors: dict) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / S.SAE_WEIGHTS_FILENAME))
    (folder / S.SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    return folder


def _weights(sae: S.SAE) -> dict:
    return {name: getattr(sae, name).detach().clone() for name in S.WEIGHT_NAMES}


def _saelens6_keeps_metadata(cfg: dict) -> bool:
    """SAELens >= 6's test (loading/pretrained_sae_loaders.py, handle_config_defaulting): a cfg.json whose
    sae_lens_version (top level or in metadata) is missing or under 6.0.0 is read as pre-6.0, and its nested
    metadata is dropped."""
    version = cfg.get("sae_lens_version") or cfg.get("metadata", {}).get("sae_lens_version")
    return bool(version) and int(str(version).split(".")[0]) >= 6


def _x(d_in: int = 8, n: int = 64) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_our_cfg_json_is_saelens6s_plus_one_key_and_keeps_its_metadata(tmp_path, architecture):
    sae = _sae(architecture)
    folder = S.save(sae, tmp_path / "ours", dtype=torch.float32, metadata=META)
    cfg = json.loads((folder / S.SAE_CFG_FILENAME).read_text())
    ours = cfg.pop(S.OUR_CFG_KEY)
    assert cfg == _saelens6_cfg(sae)  # SAELens's keys and values exactly; ours only under one key
    assert ours == sae.cfg.to_dict()
    assert _saelens6_keeps_metadata(cfg)
    assert S.read_metadata(folder)["hook_name"] == META["hook_name"]
    assert S.read_metadata(folder)["model_name"] == META["model_name"]


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_a_saelens6_folder_without_our_key_loads_with_the_same_numbers(tmp_path, architecture):
    sae = _sae(architecture)
    folder = _write(tmp_path / "saelens", _saelens6_cfg(sae), _weights(sae))
    assert S.OUR_CFG_KEY not in json.loads((folder / S.SAE_CFG_FILENAME).read_text())
    again = S.load(folder)
    assert (again.cfg.d_in, again.cfg.n_features, again.cfg.architecture) == (8, 32, architecture)
    assert architecture == "relu" or again.cfg.k == 3
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(again(x).recon, sae(x).recon, rtol=1e-6, atol=1e-6)
    assert S.read_metadata(folder)["hook_name"] == META["hook_name"]


def test_a_float16_saelens_folder_loads_within_fp16_rounding(tmp_path):
    sae = _sae("relu")
    half = {k: v.half() for k, v in _weights(sae).items()}
    again = S.load(_write(tmp_path / "fp16", _saelens6_cfg(sae, "float16"), half))
    assert again.W_enc.dtype == torch.float32 and torch.equal(again.W_enc, half["W_enc"].float())
    with torch.no_grad():
        torch.testing.assert_close(again.encode(_x()), sae.encode(_x()), rtol=1e-2, atol=1e-2)


def test_our_folder_round_trips_through_the_saelens_layout_and_back(tmp_path):
    """Ours -> strip our key -> load -> save again: the same weights, the same metadata."""
    sae = _sae("topk")
    folder = S.save(sae, tmp_path / "ours", dtype=torch.float32, metadata=META)
    cfg = json.loads((folder / S.SAE_CFG_FILENAME).read_text())
    del cfg[S.OUR_CFG_KEY]
    (folder / S.SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    back = S.save(S.load(folder), tmp_path / "back", dtype=torch.float32, metadata=S.read_metadata(folder))
    again = S.load(back)
    assert all(torch.equal(getattr(again, n), getattr(sae, n)) for n in S.WEIGHT_NAMES)
    assert {k: S.read_metadata(back)[k] for k in META} == META


def test_a_pre6_saelens_folder_loads(tmp_path):
    """SAELens 5's flat cfg.json: hook_point, activation_fn_str + activation_fn_kwargs, boolean normalisation,
    and a scaling_factor of ones in the weights (none applied)."""
    sae = _sae("topk")
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 32, "dtype": "float32", "device": "cpu",
           "model_name": "gpt2-small", "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
           "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "context_size": 128,
           "dataset_path": "Skylion007/openwebtext", "normalize_activations": False, "prepend_bos": True,
           "sae_lens_training_version": "3.0.0"}
    folder = _write(tmp_path / "pre6", cfg, {**_weights(sae), "scaling_factor": torch.ones(32)})
    again = S.load(folder)
    assert (again.cfg.architecture, again.cfg.k) == ("topk", 3)
    with torch.no_grad():
        assert torch.equal(again.encode(_x()), sae.encode(_x()))
    meta = S.read_metadata(folder)
    assert meta["hook_name"] == "blocks.0.hook_resid_pre" and meta["model_name"] == "gpt2-small"
    assert meta["context_size"] == 128 and "activation_fn_kwargs" not in meta


def test_apply_b_dec_to_input_false_is_folded_into_b_enc(tmp_path):
    """SAELens without b_dec subtracted: f = relu(x @ W_enc + b_enc), which ours computes exactly up to rounding."""
    sae = _sae("relu")
    w = _weights(sae)
    folder = _write(tmp_path / "nob", _saelens6_cfg(sae) | {"apply_b_dec_to_input": False}, w)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(S.load(folder).encode(x), (x @ w["W_enc"] + w["b_enc"]).relu(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,match", [
    ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported"),
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations 'expected_average_only_in'"),
    ({"reshape_activations": "hook_z"}, "reshape_activations 'hook_z' is not supported"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm True is not supported"),
])
def test_what_we_cannot_compute_is_one_line_naming_it(tmp_path, change, match):
    sae = _sae("topk")
    folder = _write(tmp_path / "bad", _saelens6_cfg(sae) | change, _weights(sae))
    with pytest.raises(ConfigError, match=match) as err:
        S.load(folder)
    assert "\n" not in str(err.value)


def test_a_pre6_activation_or_scaling_we_cannot_compute_is_one_line(tmp_path):
    sae = _sae("relu")
    flat = {"d_in": 8, "d_sae": 32, "dtype": "float32", "hook_point": "blocks.0.hook_resid_pre"}
    with pytest.raises(ConfigError, match="activation_fn 'tanh-relu' is not supported"):
        S.load(_write(tmp_path / "a", flat | {"activation_fn_str": "tanh-relu"}, _weights(sae)))
    with pytest.raises(ConfigError, match="scaling_factor is not supported"):
        S.load(_write(tmp_path / "b", flat, {**_weights(sae), "scaling_factor": torch.full((32,), 2.0)}))
    with pytest.raises(ConfigError, match=r"W_enc has shape \(32, 8\), expected \(8, 32\)"):
        S.load(_write(tmp_path / "c", flat, _weights(sae) | {"W_enc": sae.W_enc.detach().t()}))


def test_a_folder_saved_before_the_version_was_recorded_loads_and_exports_with_its_metadata(tmp_path):
    """The committed cache's cfg.json: our key, metadata without sae_lens_version (SAELens 6 drops it)."""
    sae = _sae("topk")
    folder = S.save(sae, tmp_path / "old", metadata=META)  # fp16, as the cache stores it
    cfg = json.loads((folder / S.SAE_CFG_FILENAME).read_text())
    cfg["metadata"] = dict(META)
    for key in ("reshape_activations", "rescale_acts_by_decoder_norm"):  # keys the cache's files lack
        del cfg[key]
    (folder / S.SAE_CFG_FILENAME).write_text(json.dumps(cfg))
    assert not _saelens6_keeps_metadata(cfg)
    old = S.load(folder)
    out = S.export(folder, tmp_path / "exported")
    exported = json.loads((out / S.SAE_CFG_FILENAME).read_text())
    assert _saelens6_keeps_metadata(exported) and exported["dtype"] == "float16"
    assert {k: exported["metadata"][k] for k in META} == META
    new = S.load(out)
    assert new.cfg == old.cfg == sae.cfg
    assert all(torch.equal(getattr(new, n), getattr(old, n)) for n in S.WEIGHT_NAMES)


def test_sae_lens_itself_reads_our_export_with_its_metadata(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    for architecture in ("relu", "topk"):
        sae = _sae(architecture)
        folder = S.save(sae, tmp_path / architecture, dtype=torch.float32, metadata=META)
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        assert theirs.cfg.metadata.hook_name == META["hook_name"]
        assert theirs.cfg.metadata.model_name == META["model_name"]
        x = _x()
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x).recon, rtol=1e-5, atol=1e-5)
