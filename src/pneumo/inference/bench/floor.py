"""What ``pneumo bench`` records about the machine and the model's physical floor.

The floor (the model's FLOPs against the cores' peak FP32 rate) says how far a measured
latency is from what any runtime could reach here, so a benchmark figure reads as a ratio.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from pneumo.core.environment import hardware_info, software_versions

#: FP32 FLOP per cycle and core with AVX2: two FMA units x 8 lanes x 2.
FLOPS_PER_CYCLE = 32


#: CPU features the runtimes' kernels choose by: fp32 FMA width, and int8 dot products (VNNI, AMX),
#: without which ONNX Runtime's INT8 convolutions gain little over fp32.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def machine_info() -> dict[str, Any]:
    """The hardware (:func:`~pneumo.core.environment.hardware_info`) plus what the numbers depend on right now."""
    mhz, flags = None, []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        mhz = float(next(x for x in lines if x.startswith("cpu MHz")).partition(":")[2])
        present = set(next(x for x in lines if x.startswith("flags")).partition(":")[2].split())
        flags = [flag for flag in SPEED_FLAGS if flag in present]
    except (OSError, StopIteration, ValueError):  # not Linux, or no clock or flags reported
        pass
    return {
        **hardware_info(),
        "cpu_mhz": mhz,
        "cpu_flags": flags,
        "platform": platform.platform(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def bench_versions() -> dict[str, str]:
    """Versions of everything on the inference path, and whether Pillow decodes with libjpeg-turbo."""
    from PIL import features

    versions = software_versions(("torch", "onnxruntime", "openvino", "onnx", "onnxscript", "timm", "numpy", "pillow"))
    versions["libjpeg_turbo"] = str(bool(features.check_feature("libjpeg_turbo")))
    return versions


def physical_floor(flops: int | None, cores: int, mhz: float | None) -> dict[str, Any]:
    """The fastest any runtime could go: ``flops`` at ``cores x GHz x 32`` FLOP/s (see module docstring)."""
    if flops is None:
        return {"gflops_per_image": None, "peak_gflops": None}
    if not mhz:
        return {"gflops_per_image": round(flops / 1e9, 3), "peak_gflops": None}
    peak = cores * mhz * 1e6 * FLOPS_PER_CYCLE
    return {
        "gflops_per_image": round(flops / 1e9, 3),
        "peak_gflops": round(peak / 1e9, 1),
        "assumption": f"{cores} cores x {mhz / 1e3:.2f} GHz x {FLOPS_PER_CYCLE} fp32 FLOP/cycle (AVX2, 2 FMA units)",
        "floor_ms_per_image": round(flops / peak * 1e3, 3),
        "ceiling_ips": round(peak / flops, 1),
    }


# ------------------------------------------------------------------------------------------- run
