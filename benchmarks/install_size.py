"""Install size of each way to install pneumo: ``du -sh`` of a fresh virtualenv, from the built wheel.

    python benchmarks/install_size.py                         # base and [app]
    python benchmarks/install_size.py --torch torch==2.14.1+cpu --torch torchvision==0.29.1+cpu \
        --index-url https://download.pytorch.org/whl/cpu      # + [train] on CPU-only torch

torch and torchvision must come from the same index (PyPI's torchvision does not load against a
CPU-only torch), hence both are given.

Each profile gets a new virtualenv (pip's compiled .pyc files included, as a user gets them) and
writes its size, its largest packages and the install time to ``benchmarks/results/install_size.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return (
        int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])
        / 1024
    )


def largest(site: Path, n: int = 8) -> dict[str, float]:
    sizes = {child.name: du_mb(child) for child in site.iterdir() if not child.name.endswith(".dist-info")}
    return {k: round(v, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:n]}


def install(folder: Path, requirements: list[str]) -> dict:
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    empty = du_mb(folder)
    python = folder / "bin" / "python"
    started = time.perf_counter()
    for requirement in requirements:  # one pip call per entry; an entry may hold several words
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *requirement.split()], check=True)  # fmt: skip
    seconds = time.perf_counter() - started
    site = next((folder / "lib").glob("python3*/site-packages"))
    return {"venv_mb": round(du_mb(folder)), "empty_venv_mb": round(empty), "install_seconds": round(seconds),
            "requirements": requirements, "largest_mb": largest(site)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--torch", action="append", default=[], help="CPU-only torch requirement (repeat for torchvision)"
    )
    parser.add_argument("--index-url", default=None, help="extra index for the --torch requirements")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "install_size.json")
    args = parser.parse_args()
    # Profiles measured by hand earlier (noted as such) are kept; those measured now are replaced.
    results: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["python"] = sys.version.split()[0]
    with tempfile.TemporaryDirectory(prefix="pneumo-size-") as tmp:
        dist = Path(tmp) / "dist"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
                       check=True)  # fmt: skip
        shutil.rmtree(ROOT / "build", ignore_errors=True)
        wheel = str(next(dist.glob("pneumo-*.whl")))
        profiles = {"base": [wheel], "app": [f"{wheel}[app]"]}
        if args.torch:
            extra = ["--extra-index-url", args.index_url] if args.index_url else []
            profiles["train_cpu_torch"] = [" ".join([*args.torch, *extra]), f"{wheel}[train]"]
        for name, requirements in profiles.items():
            results[name] = install(Path(tmp) / name, requirements)
            print(name, results[name]["venv_mb"], "MB", flush=True)
    for profile in ("base", "app", "train_cpu_torch"):
        if profile in results:
            results[profile]["requirements"] = [r.replace(f"{tmp}/dist/", "") for r in results[profile]["requirements"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
