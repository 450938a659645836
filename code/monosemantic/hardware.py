"""What machine a result was made on, in the words the manifests and benchmarks use."""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import platform
import re
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# the flags that decide how fast the matrix products are (a manifest records those the CPU has)
SIMD_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                        "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16"})


def cpu_bf16_unit() -> str | None:
    """'amx' (Intel AMX tiles), 'avx512_bf16' (AMD Zen 4 / Intel Cooper Lake), or None."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def cuda_device() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken CUDA install is just "no GPU" here
        pass
    return None


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or no C library to load)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def return_free_memory() -> bool:
    """Give the free pages inside the C heap back to the system (glibc's ``malloc_trim(0)``); False where
    there is no such call. A loop that keeps a small result per batch between each batch's large temporaries
    fragments glibc's heap: the kept results pin it, its free space is never returned, and a 40,000-window
    pass over the held-out text grew by gigabytes (several GB a minute) until the kernel killed it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap, not fresh maps (the most glibc's
#                                 own adaptive threshold ever reaches)
HEAP_TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top kept for the next allocation, up to this


@functools.cache
def keep_freed_memory() -> bool:
    """Let the C heap keep freed memory for the next allocation instead of handing it back to the system at
    once (glibc ``mallopt``: allocations up to 32 MB from the heap, up to 512 MB of free top kept); False
    where there is no glibc. A training step frees and allocates the same few MB-sized tensors every step;
    by default glibc returns many of them, and each step's first writes fault the pages in again, zeroed by
    the kernel: on a 2-core virtual machine 1,700 (ReLU) and 2,400 (TopK) page faults a step, a third of
    the SAE step (ReLU 78 -> 57 ms, TopK 57 -> 35 ms); with the setting, 280 and none. Process-wide and
    idempotent: the CLI calls it once, :func:`monosemantic.sae.train` too.
    :func:`return_free_memory` still gives everything free back when a long loop asks."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   HEAP_TRIM_THRESHOLD))


def trimmed(items: Iterable, every: int = 32) -> Iterator:
    """``items``, giving free heap memory back (:func:`return_free_memory`) after every ``every`` of them: wrap
    the batches of a long loop that keeps per-batch results. Costs about a millisecond per call."""
    for n, item in enumerate(items, 1):
        yield item
        if n % every == 0:
            return_free_memory()


def describe() -> dict:
    """Hardware and software a manifest records."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": cpu_bf16_unit(),
        "cpu_flags": sorted(cpu_flags() & SIMD_FLAGS),
        "gpu": cuda_device(),
        "compute_dtype": dtype_decisions(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def simd_level(flags: Collection[str] | None = None) -> str:
    """The widest vector unit the CPU's matrix products can use: ``amx``, ``avx512bf16``, ``avx512``, ``avx2``,
    ``avx``, ``sve``, ``neon``, or ``""`` when the flags (default: this CPU's) say none of them."""
    flags = cpu_flags() if flags is None else flags
    for level, flag in (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"),
                        ("avx", "avx"), ("sve", "sve"), ("neon", "asimd")):
        if flag in flags:
            return level
    return ""


def slug() -> str:
    """A folder-safe name for this machine's kind, e.g. ``cpu-amd-epyc-2c-avx2`` or
    ``gpu-nvidia-h100-80gb-hbm3``. A CPU's ends with :func:`simd_level`: a cloud "AMD EPYC" with 2 cores may
    be a Zen 4 with AVX-512 BF16 or an older one with AVX2 only, 2-30x apart on the same products."""
    gpu = cuda_device()
    return slug_text(f"gpu-{gpu}" if gpu else f"cpu-{cpu_model()}-{os.cpu_count()}c-{simd_level()}")


def slug_text(name: str) -> str:
    """``name`` made folder-safe: lower case, (R) and (TM) dropped, runs of other characters as one ``-``."""
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


# --- the compute dtype: one policy for every stage ------------------------------------------------------------
#
# bf16 is fast on GPUs, on Intel AMX, on AVX-512 BF16 and on recent Arm, and emulated (~28x slower than fp32)
# on AVX2-only CPUs. CPU flags alone do not tell which (an AVX-512 machine without BF16 may still have a fast
# oneDNN path; an Arm machine exposes other flags), so ``auto`` is decided by timing the stage's own matrix
# shapes in both dtypes once per machine, and the answer is kept in a small JSON file.

# bf16 rounds to 8 bits of mantissa; choose it only when it clearly pays for that
BF16_MIN_SPEEDUP = 1.25
# each timed product is cut to about this many FLOPs (rows dropped), so an emulated bf16 costs ~0.1 s a shape
_MEASURE_FLOPS = 2e8
DTYPE_CACHE_ENV = "MONOSEMANTIC_DTYPE_CACHE"

Shape = tuple[int, int, int]  # (m, k, n) of one (m, k) @ (k, n) product

_decisions: dict[str, dict] = {}  # what this process decided, by stage label: goes into every manifest
# (device, threads, shapes) -> (entry, decision): a forward pass that asks on every call costs a dict lookup,
# not a machine description and a file read
_memo: dict[tuple, tuple[dict, dict]] = {}


def dtype_cache_path() -> Path:
    """Where decided dtypes are kept: ``$MONOSEMANTIC_DTYPE_CACHE``, else ``~/.cache/monosemantic/dtype.json``
    (per machine, since the home folder is; the key also names the machine, torch and thread count)."""
    env = os.environ.get(DTYPE_CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "monosemantic" / "dtype.json"


def measure_matmuls(shapes: Sequence[Shape], dtype, device: str = "cpu") -> float:
    """Seconds for one pass of ``(m, k) @ (k, n)`` over ``shapes`` in ``dtype`` (best of two after a warm-up),
    each shape's rows cut so it costs about 2e8 FLOPs. Used by :func:`auto_dtype`; tests inject their own."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    total = 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        m = max(8, min(m, int(_MEASURE_FLOPS / (2 * k * n))))
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)  # (m, k)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)  # (k, n)
        a @ b
        sync()
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
        total += best
    return total


def auto_dtype(label: str, shapes: Sequence[Shape], device="cpu", *, measure=None):
    """The compute dtype for a stage's ``shapes`` on ``device``: ``torch.bfloat16`` when its products run at
    least 1.25x faster than in float32, else ``torch.float32``. Measured once per machine, torch version,
    thread count and shape set; the answer is kept in :func:`dtype_cache_path` and recorded under ``label``
    for this process's manifests. ``measure(shapes, dtype, device) -> seconds`` replaces the timing."""
    import torch

    dev = str(torch.device(device))
    if dev == "cuda":
        dev = "cuda:0"
    shapes = [tuple(int(v) for v in s) for s in shapes]
    memo_key = (dev, torch.get_num_threads(), tuple(shapes))
    known_entry = _memo.get(memo_key) if measure is None else None
    if known_entry is None:
        machine = slug_text(f"gpu-{cuda_device()}") if dev.startswith("cuda") else slug()
        key = f"{machine}|{dev}|torch {torch.__version__}|threads {torch.get_num_threads()}|{shapes}"
        entry = None
        if measure is None:
            path = dtype_cache_path()
            known = _read_json(path)
            entry = known.get(key)
        if entry is None:
            timer = measure or measure_matmuls
            fp32 = float(timer(shapes, torch.float32, dev))
            bf16 = float(timer(shapes, torch.bfloat16, dev))
            entry = {"dtype": "bfloat16" if bf16 * BF16_MIN_SPEEDUP <= fp32 else "float32",
                     "fp32_s": fp32, "bf16_s": bf16, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if measure is None:
                known[key] = entry
                _write_json(path, known)
        known_entry = (entry, {"device": dev, "shapes": [list(s) for s in shapes], **entry})
        if measure is None:
            _memo[memo_key] = known_entry
    entry, decision = known_entry
    if _decisions.get(label) is not decision:
        _decisions[label] = decision
    return torch.bfloat16 if entry["dtype"] == "bfloat16" else torch.float32


def resolve_dtype(name: str, label: str, shapes: Sequence[Shape], device="cpu"):
    """A config's dtype field as a torch dtype: ``"float32"`` or ``"bfloat16"`` as given, ``"auto"`` through
    :func:`auto_dtype`. The one place every stage turns its ``dtype`` setting into a compute dtype."""
    import torch

    if name == "auto":
        return auto_dtype(label, shapes, device)
    if name not in ("float32", "bfloat16"):
        from .config import ConfigError

        raise ConfigError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    _decisions.setdefault(label, {"dtype": name, "forced": True})
    return getattr(torch, name)


def dtype_decisions() -> dict[str, dict]:
    """The compute dtypes this process chose, by stage label (a copy)."""
    return {k: dict(v) for k, v in _decisions.items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:  # a read-only home only costs a re-measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
