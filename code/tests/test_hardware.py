"""The compute-dtype policy: ``auto`` decided by measurement (injected here), kept per machine, recorded."""

from __future__ import annotations

import json

import pytest
import torch

from monosemantic import hardware
from monosemantic.config import ConfigError
from monosemantic.lm import LMConfig
from monosemantic.sae import SAEConfig

SHAPES = [(64, 32, 128), (64, 128, 32)]


def fake_timer(fp32_s: float, bf16_s: float, calls: list | None = None):
    def measure(shapes, dtype, device):
        if calls is not None:
            calls.append((tuple(map(tuple, shapes)), dtype, device))
        return bf16_s if dtype == torch.bfloat16 else fp32_s
    return measure


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Each test starts with no decision in memory and its own cache file."""
    monkeypatch.setenv(hardware.DTYPE_CACHE_ENV, str(tmp_path / "dtype.json"))
    monkeypatch.setattr(hardware, "_memo", {})
    monkeypatch.setattr(hardware, "_decisions", {})


def test_slow_bf16_chooses_float32():  # an AVX2-only CPU: bf16 emulated, ~28x slower
    assert hardware.auto_dtype("sae", SHAPES, measure=fake_timer(0.01, 0.28)) == torch.float32
    assert hardware.dtype_decisions()["sae"]["dtype"] == "float32"


def test_fast_bf16_chooses_bfloat16():  # AMX / AVX-512 BF16 / a GPU: bf16 about twice as fast
    assert hardware.auto_dtype("sae", SHAPES, measure=fake_timer(0.02, 0.01)) == torch.bfloat16


def test_bf16_must_clearly_pay_for_its_rounding():
    # 10% faster is not enough to lose 16 bits of mantissa; 1.25x is the bar
    assert hardware.auto_dtype("a", SHAPES, measure=fake_timer(1.10, 1.00)) == torch.float32
    assert hardware.auto_dtype("b", SHAPES, measure=fake_timer(1.25, 1.00)) == torch.bfloat16


def test_measured_once_per_machine_and_kept_in_a_file(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(hardware, "measure_matmuls", fake_timer(0.01, 0.5, calls))
    assert hardware.auto_dtype("sae", SHAPES) == torch.float32
    assert len(calls) == 2  # fp32 and bf16, once each
    assert hardware.auto_dtype("sae", SHAPES) == torch.float32
    assert len(calls) == 2  # remembered in this process
    monkeypatch.setattr(hardware, "_memo", {})  # a new process: read back from the file, not measured again
    monkeypatch.setattr(hardware, "measure_matmuls", fake_timer(0.5, 0.01, calls))
    assert hardware.auto_dtype("sae", SHAPES) == torch.float32
    assert len(calls) == 2
    kept = json.loads((tmp_path / "dtype.json").read_text())
    (entry,) = kept.values()
    assert entry["dtype"] == "float32" and entry["bf16_s"] == 0.5
    # other shapes are another question, measured on their own (and answered by the new timer)
    assert hardware.auto_dtype("lm", [(8, 8, 8)]) == torch.bfloat16
    assert len(calls) == 4


def test_an_unreadable_cache_file_is_measured_again(monkeypatch, tmp_path):
    (tmp_path / "dtype.json").write_text("{not json")
    monkeypatch.setattr(hardware, "measure_matmuls", fake_timer(0.02, 0.01))
    assert hardware.auto_dtype("sae", SHAPES) == torch.bfloat16


def test_forced_dtypes_are_kept_and_bad_ones_refused():
    assert hardware.resolve_dtype("float32", "x", SHAPES) == torch.float32
    assert hardware.resolve_dtype("bfloat16", "y", SHAPES) == torch.bfloat16
    assert hardware.dtype_decisions()["y"] == {"dtype": "bfloat16", "forced": True}
    with pytest.raises(ConfigError, match="dtype must be 'auto', 'float32' or 'bfloat16'"):
        hardware.resolve_dtype("float16", "z", SHAPES)


@pytest.mark.parametrize(("fp32_s", "bf16_s", "want"), [(0.01, 0.3, torch.float32), (0.02, 0.01, torch.bfloat16)])
def test_every_stage_asks_the_same_policy(monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(hardware, "measure_matmuls", fake_timer(fp32_s, bf16_s))
    assert LMConfig(d_model=32, n_heads=4, d_mlp=128, vocab_size=256).compute_dtype("cpu") == want
    assert SAEConfig(d_in=16, n_features=64, dtype="auto").compute_dtype("cpu") == want
    assert SAEConfig(d_in=16, n_features=64, dtype="float32").compute_dtype("cpu") == torch.float32
    from monosemantic.harvest import resolve_dtype as harvest_dtype
    from monosemantic.llama import resolve_dtype as llama_dtype

    assert harvest_dtype("auto", "cpu") == str(want).removeprefix("torch.")
    assert llama_dtype("auto", torch.device("cpu"), 64, 96) == want
    assert {"lm", "sae", "forward", "llama"} <= set(hardware.dtype_decisions())


@pytest.mark.parametrize(("fp32_s", "bf16_s", "want"), [(0.01, 0.3, torch.float32), (0.02, 0.01, torch.bfloat16)])
def test_the_lm_runs_in_the_chosen_dtype(monkeypatch, fp32_s, bf16_s, want):
    monkeypatch.setattr(hardware, "measure_matmuls", fake_timer(fp32_s, bf16_s))
    cfg = LMConfig(vocab_size=64, context_length=8, d_model=16, n_heads=2, d_mlp=32, compile=False, loss_chunk=0)
    from monosemantic.lm import Transformer

    model = Transformer(cfg)
    seen = []
    model.blocks[0].mlp.hook_pre.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model(torch.randint(0, 64, (2, 8)))
    assert seen == [want]


def test_manifests_record_the_choice_and_the_cpu_flags():
    hardware.auto_dtype("sae", SHAPES, measure=fake_timer(0.01, 0.3))
    info = hardware.describe()
    assert info["compute_dtype"]["sae"]["dtype"] == "float32"
    assert info["compute_dtype"]["sae"]["bf16_s"] == 0.3
    assert set(info["cpu_flags"]) <= hardware.SIMD_FLAGS
    assert ("avx2" in info["cpu_flags"]) == ("avx2" in hardware.cpu_flags())


def test_the_real_measurement_is_short_and_positive():
    seconds = hardware.measure_matmuls([(4096, 512, 4096)], torch.float32, "cpu")
    assert 0 < seconds < 60  # a hang guard only: the product is cut to ~2e8 FLOPs


def test_trimmed_yields_every_item_and_returns_free_memory_every_so_many(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "return_free_memory", lambda: calls.append(1) or True)
    assert list(hardware.trimmed(range(10), every=4)) == list(range(10))
    assert len(calls) == 2  # after items 4 and 8


def test_returning_free_memory_is_real_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert hardware.return_free_memory() is True


def test_the_heap_keeps_freed_memory_where_there_is_glibc():
    # both mallopt settings accepted (glibc answers 0 to a value it refuses), and asking again changes nothing
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallopt"):
        pytest.skip("no glibc here")
    assert hardware.keep_freed_memory() is True
    assert hardware.keep_freed_memory() is True
