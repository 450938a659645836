"""The activation buffer: it serves the model's own MLP activations, mixes windows, and is reproducible."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from monosemantic import harvest
from monosemantic import sae as sae_mod
from monosemantic.harvest import HOOK, ActivationBuffer, HarvestError, random_windows, sequential_windows
from monosemantic.lm import LMConfig, Transformer

SEQ = 16
D_MLP = 64


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=97, context_length=SEQ, d_model=32, n_heads=4, d_mlp=D_MLP, compile=False,
                   dtype="float32")
    return Transformer(cfg).eval()


def tokens(n: int = 20_000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, size=n).astype(np.uint16)


def buffer(model: Transformer, toks: np.ndarray, seed: int = 0, **kw) -> ActivationBuffer:
    kw = {"capacity": 512, "batch_size": 64, "dtype": "float32", "track": True, **kw}
    return ActivationBuffer(model, random_windows(toks, SEQ, seed=seed, batch=8), seed=seed, **kw)


def test_served_rows_are_the_models_activations_at_their_window_and_position():
    model, toks = tiny_model(), tokens()
    buf = buffer(model, toks)
    for batch in itertools.islice(buf, 12):  # 12 x 64 rows: past the first refill
        origin = buf.last_origin  # (64, 3): window number, position, start token
        assert batch.shape == (64, D_MLP) and batch.dtype == torch.float32
        starts = origin[:, 2].numpy()
        ids = torch.from_numpy(toks[starts[:, None] + np.arange(SEQ)].astype(np.int64))  # (64, SEQ)
        expected = model.run_with_cache(ids, [HOOK])[HOOK]  # (64, SEQ, D_MLP)
        torch.testing.assert_close(batch, expected[torch.arange(64), origin[:, 1]], rtol=0, atol=1e-6)


def test_rows_are_served_at_most_once_and_the_first_half_buffer_is_a_permutation_of_the_first_windows():
    model, toks = tiny_model(), tokens()
    buf = buffer(model, toks, capacity=512, batch_size=64)
    it = iter(buf)
    seen = torch.cat([buf.last_origin for _ in itertools.islice(it, 4)])  # the first 256 = half the buffer
    keys = seen[:, 0] * SEQ + seen[:, 1]
    assert keys.unique().numel() == keys.numel()  # no row twice
    assert int(seen[:, 0].max()) < 512 // SEQ  # all from the windows of the first fill
    more = torch.cat([seen] + [buf.last_origin for _ in itertools.islice(it, 40)])
    keys = more[:, 0] * SEQ + more[:, 1]
    assert keys.unique().numel() == keys.numel()


def test_a_batch_mixes_many_windows():
    buf = buffer(tiny_model(), tokens(), capacity=2048, batch_size=64)
    for _ in itertools.islice(buf, 5):
        windows = buf.last_origin[:, 0].unique().numel()
        assert windows >= 40  # 64 rows from 128 windows of 16: ~50 distinct expected, 4 if unshuffled


def test_same_seed_same_batches_other_seed_other_batches():
    model, toks = tiny_model(), tokens()
    a = list(itertools.islice(buffer(model, toks, seed=3, track=False), 10))
    b = list(itertools.islice(buffer(model, toks, seed=3, track=False), 10))
    c = list(itertools.islice(buffer(model, toks, seed=4, track=False), 10))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_buffer_is_a_source_for_sae_train():
    buf = buffer(tiny_model(), tokens(), track=False)
    cfg = sae_mod.SAEConfig(d_in=D_MLP, n_features=128, batch_size=64, n_steps=5, resample_every=0, log_every=5)
    result = sae_mod.train(cfg, buf, device="cpu", progress=False)
    assert result.history[-1]["step"] == 5 and np.isfinite(result.history[-1]["mse"])


def test_bad_sizes_nan_and_short_tokens_are_one_line_errors():
    model, toks = tiny_model(), tokens()
    with pytest.raises(HarvestError, match="at least twice"):
        buffer(model, toks, capacity=100, batch_size=64)
    with pytest.raises(HarvestError, match="too few"):
        next(random_windows(toks[:5], SEQ))
    with pytest.raises(HarvestError, match="need"):
        sequential_windows(toks[:100], SEQ, n_windows=10)
    with torch.no_grad():
        model.blocks[0].mlp.fc_in.weight[0, 0] = float("nan")
    with pytest.raises(HarvestError, match="NaN or inf") as err:
        next(iter(buffer(model, toks)))
    assert "\n" not in str(err.value)


def test_sequential_windows_are_consecutive_with_shifted_targets():
    toks = tokens(1000)
    batches = sequential_windows(toks, SEQ, n_windows=5, batch=2)
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]
    x = torch.cat([b[0] for b in batches]).reshape(-1)
    y = torch.cat([b[1] for b in batches]).reshape(-1)
    assert torch.equal(x, torch.from_numpy(toks[:80].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(toks[1:81].astype(np.int64)))


def test_bf16_forward_is_close_and_the_models_dtype_is_restored_even_on_error():
    model, toks = tiny_model(), tokens()
    exact = next(iter(buffer(model, toks, seed=5)))
    approx = next(iter(buffer(model, toks, seed=5, dtype="bfloat16")))
    assert model.arithmetic.dtype == "float32"
    assert not torch.equal(exact, approx)
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.02)
    with pytest.raises(RuntimeError), harvest.forward_dtype(model, "bfloat16"):
        assert model.arithmetic.dtype == "bfloat16"
        raise RuntimeError
    assert model.arithmetic.dtype == "float32"


def test_split_windows_spread_rows_and_window_batches():
    from monosemantic.harvest import split_windows, spread_rows, window_batches

    tokens = np.arange(11, dtype=np.uint16)
    x, y = split_windows(tokens, 3)  # 10 usable inputs: three whole windows
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert spread_rows(10, 4).tolist() == [0, 3, 6, 9]
    assert spread_rows(10, 0).tolist() == spread_rows(10, 12).tolist() == list(range(10))
    batches = window_batches(x, y, np.array([2, 0, 1]), batch=2)
    assert [b[0][:, 0].tolist() for b in batches] == [[6, 0], [3]]
