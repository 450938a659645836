"""Every stage of the tiny pipeline on a GPU against the same machine's CPU (``scripts/gpu-tiny-check``):
the metrics each stage's artifact records, compared side by side, stored as ``gpucheck/tiny-<gpu>`` (its
own stage: ``bench/`` holds the speed rows of ``make bench``)."""

from __future__ import annotations

from typing import Any

PIPELINE_CHECK = {  # stage artifact -> the metrics compared
    "lm/tiny-model": ("val_loss", "train_loss"),
    "sae/tiny-topk": ("fvu", "ce_loss_recovered", "dead_fraction"),
    "sae/tiny-anchor": ("fvu", "l0", "ce_loss_recovered"),
    "analysis/tiny-features": ("median_explain_corr_neurons", "scored_neurons"),
    "diff/tiny-finetune-numpy-docs": ("crosscoder_live", "crosscoder_fvu_mix_base"),
}


def pipeline_check_rows(gpu_root, cpu_root) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``{artifact, metric, gpu, cpu, difference}`` comparing two caches made by the same tiny pipeline
    on a GPU and on the CPU (``scripts/gpu-tiny-check``), and the GPU run's hardware. A stage missing from
    either cache raises: the check is that every stage ran on both."""
    import json
    from pathlib import Path

    from .config import UserError

    rows, hardware = [], {}
    for key, names in PIPELINE_CHECK.items():
        found = {}
        for side, root in (("gpu", gpu_root), ("cpu", cpu_root)):
            path = Path(root) / key / "manifest.json"
            if not path.is_file():
                raise UserError(f"{key} is missing from the {side} cache {root}: that stage failed there "
                                f"(see its log from scripts/gpu-tiny-check)")
            found[side] = json.loads(path.read_text())
        hardware = hardware or found["gpu"]["hardware"]
        for m in names:
            g, c = found["gpu"]["metrics"][m], found["cpu"]["metrics"][m]
            rows.append({"artifact": key, "metric": m, "gpu": g, "cpu": c, "difference": g - c,
                         "gpu_wall_s": found["gpu"].get("wall_time_s"), "cpu_wall_s": found["cpu"].get("wall_time_s")})
    return rows, hardware


def store_pipeline_check(gpu_root, cpu_root) -> str:
    """Write ``gpucheck/tiny-<gpu>`` from :func:`pipeline_check_rows` (its own stage: ``bench/`` holds the
    speed rows of ``make bench``)."""
    import json

    from . import hardware as hw
    from . import store

    rows, hardware = pipeline_check_rows(gpu_root, cpu_root)
    gpu = hardware.get("gpu") or "gpu"
    name = hw.slug_text(gpu)
    with store.write("gpucheck", "tiny", name, command="scripts/gpu-tiny-check",
                     config={"stages": sorted(PIPELINE_CHECK), "profile": "tiny"}) as w:
        (w.dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        w.wall_time_s = sum({r["artifact"]: r["gpu_wall_s"] or 0.0 for r in rows}.values())  # the GPU side's
        w.metrics["stages"] = len(PIPELINE_CHECK)
        w.metrics["largest_relative_difference"] = max(
            abs(r["difference"]) / max(abs(r["cpu"]), 1e-12) for r in rows)
        w.info["gpu_hardware"] = hardware
    return str(store.artifact_path("gpucheck", "tiny", name))
