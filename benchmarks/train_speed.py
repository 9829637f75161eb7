"""Training cost per architecture on this machine: seconds per image and per epoch, written as JSON.

For every registered architecture it times a full fine-tuning step (forward + backward of the
whole network, batch 8, native input size). For the EfficientNets it also times what
``pneumo train`` does by default on a CPU: the frozen prefix once per image (the feature cache)
and a forward + backward of the last two stages on cached features. An epoch is the training
part of the patient-level split of the Kermany training set (4,433 images).

    python benchmarks/train_speed.py --json benchmarks/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pneumo.modeling.feature_cache import split_model
from pneumo.modeling.models import REGISTRY, create_model, freeze_backbone

TRAIN_IMAGES = 4433


def _per_image(step: object, batch: int, repeats: int) -> float:
    step()  # type: ignore[operator]  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()  # type: ignore[operator]
    return (time.perf_counter() - start) / (repeats * batch)


def measure(arch: str, batch: int, repeats: int) -> dict[str, float | str]:
    spec = REGISTRY[arch]
    size = spec.preprocess.input_size
    model = create_model(arch, 2, pretrained=False).train().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def full_step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    result: dict[str, float | str] = {"arch": arch, "input_size": size}
    full = _per_image(full_step, batch, repeats)
    result["full_finetune_s_per_image"] = round(full, 4)
    result["full_finetune_epoch_min"] = round(full * TRAIN_IMAGES / 60, 1)
    if arch.startswith("efficientnet"):
        prefix, suffix = split_model(model, 2)
        freeze_backbone(model, 2)
        with torch.no_grad():
            cache = _per_image(lambda: prefix.eval()(x), batch, repeats)
            cached = prefix(x).clone()

        def suffix_step() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(suffix(cached), y).backward()

        tail = _per_image(suffix_step, batch, repeats)
        result["cache_s_per_image"] = round(cache, 4)
        result["cached_last2_s_per_image"] = round(tail, 4)
        result["cached_last2_epoch_min"] = round(tail * TRAIN_IMAGES / 60, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/train_speed.json"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--archs", nargs="*", default=sorted(REGISTRY))
    args = parser.parse_args()
    rows = [measure(arch, args.batch, args.repeats) for arch in args.archs]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0], "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__},
        "train_images_per_epoch": TRAIN_IMAGES,
        "results": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'arch':20s} {'full s/img':>10s} {'full epoch min':>15s} {'cached-last-2 epoch min':>24s}")
    for row in rows:
        print(f"{row['arch']:20s} {row['full_finetune_s_per_image']:>10} {row['full_finetune_epoch_min']:>15} "
              f"{row.get('cached_last2_epoch_min', '-'):>24}")  # fmt: skip


if __name__ == "__main__":
    main()
