"""What the memory allocator costs a training step on this machine, written as JSON.

``pneumo train`` calls :func:`pneumo.modeling.training.keep_freed_memory` (glibc: no mmap, no
trimming) because a batch's activations are larger than glibc's largest mmap threshold and every
step faulted them in again. This times one training step of EfficientNet-Lite1 (240 px, batch 32,
channels-last, BatchNorm in inference mode as in the recipe) for each trainable part, under glibc's
default, with the kept memory, and with jemalloc preloaded when it is installed. Each setting runs
in its own process (an allocator is chosen at process start, and a heap shaped by one setting
changes the faults of the next). Page faults and kernel time come from
``getrusage``.

    python benchmarks/train_allocator.py --json benchmarks/results/train_allocator.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")

_CHILD = """
import json, resource, sys, time, torch
from pneumo.modeling.models import create_model, freeze_backbone
from pneumo.modeling.training import keep_freed_memory
mode, arch, size, batch, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if mode == "kept":
    keep_freed_memory()
model = create_model(arch, 2, pretrained=False).to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (batch,))
rows = []
for stages in json.loads(sys.argv[6]):
    freeze_backbone(model, stages)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    rows.append({"trainable_stages": stages, "s_per_step": round((time.perf_counter() - start) / steps, 3),
                 "page_faults_per_step": (after.ru_minflt - before.ru_minflt) // steps,
                 "kernel_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
                 "peak_rss_mb": after.ru_maxrss // 1024})
print(json.dumps(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_allocator.json"))
    parser.add_argument("--arch", default="efficientnet_lite1")
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="*", default=[99, 5, 0], help="trainable stages (99: all)")
    args = parser.parse_args()
    modes = ["default", "kept"] + (["jemalloc"] if JEMALLOC.is_file() else [])
    results = {}
    for mode in modes:
        env = {**os.environ, **({"LD_PRELOAD": str(JEMALLOC)} if mode == "jemalloc" else {})}
        results[mode] = []
        for stages in args.stages:  # a process each: what one setting leaves in the heap changes the next one's faults
            argv = [mode, args.arch, str(args.size), str(args.batch), str(args.steps), json.dumps([stages])]
            cmd = [sys.executable, "-c", _CHILD, *argv]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[mode] += json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, results[mode][-1], flush=True)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
        "settings": vars(args) | {"json": str(args.json)},
        "results": results,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
