"""Where a result came from: the software versions and the hardware, recorded in bundles and benchmarks.

Versions come from the module itself when it is already loaded (torch's carries its build tag,
e.g. ``+cu128``), else from the installed distribution's metadata (``importlib.metadata``), never
by importing a package: recording them never loads torch into a serving process.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: Distributions whose versions decide a result (training, export, inference, decoding).
TRACKED = ("torch", "timm", "lightning", "onnxruntime", "numpy", "pillow", "pydicom")


def software_versions(packages: tuple[str, ...] = TRACKED) -> dict[str, str]:
    """``{"pneumo", "python", and each installed package of ``packages``: version}``; absent ones are left out."""
    import pneumo

    found = {"pneumo": pneumo.__version__, "python": platform.python_version()}
    for name in packages:
        loaded = sys.modules.get(name.replace("pillow", "PIL"))
        if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
            found[name] = loaded.__version__  # e.g. torch's local build tag (2.9.1+cu128), which metadata drops
            continue
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def hardware_info() -> dict[str, Any]:
    """CPU model, usable cores, and the GPU when torch is already loaded and sees one."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model() or platform.processor() or platform.machine(),
        "cores": available_cores(),
        "machine": platform.machine(),
    }
    torch = sys.modules.get("torch")  # never import torch just to describe the machine
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None
