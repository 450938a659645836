"""What machine a result was made on, in the words the manifests and benchmarks use."""

from __future__ import annotations

import functools
import os
import platform
import re
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
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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


def describe() -> dict:
    """Hardware and software a manifest records."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": cpu_bf16_unit(),
        "gpu": cuda_device(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def slug() -> str:
    """A folder-safe name for this machine's kind, e.g. ``cpu-amd-epyc-2c`` or ``gpu-nvidia-h100-80gb-hbm3``."""
    gpu = cuda_device()
    return slug_text(f"gpu-{gpu}" if gpu else f"cpu-{cpu_model()}-{os.cpu_count()}c")


def slug_text(name: str) -> str:
    """``name`` made folder-safe: lower case, (R) and (TM) dropped, runs of other characters as one ``-``."""
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
