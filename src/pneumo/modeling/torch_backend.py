"""The PyTorch backend of :class:`~pneumo.inference.Predictor`, registered by importing this module.

It has the ONNX runner's contract, NumPy batch in, NumPy ``(logits, features)`` out, so the
Predictor never touches a tensor. The inference package never imports the training stack: this
module registers ``backend="torch"`` with :func:`pneumo.inference.runners.register_backend` when it
is imported, and :func:`torch_predictor` is the way in for code that wants eager PyTorch
(the reference the ONNX graphs are checked against, Grad-CAM, a GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pneumo.core.bundle import Backend, BundleMeta, read_meta, resolve_bundle
from pneumo.core.decode import DEFAULT_LIMITS, Limits
from pneumo.inference.predictor import Predictor
from pneumo.inference.runners import register_backend
from pneumo.modeling.models import logits_and_features
from pneumo.modeling.weights import load_bundle, load_model


class TorchRunner:
    """Run an eval-mode network on ``device``: (N, 3, S, S) float32 -> logits (N, C), features (N, F)."""

    kind = str(Backend.TORCH)

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        logits, features = logits_and_features(self.model, x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


def _cpu_runner(bundle: Path, meta: BundleMeta) -> TorchRunner:
    return TorchRunner(load_model(bundle, meta))


register_backend(Backend.TORCH, _cpu_runner)


def torch_predictor(
    bundle: str | Path | None = None,
    *,
    device: str = "cpu",
    check_ood: bool = True,
    limits: Limits = DEFAULT_LIMITS,
    meta: BundleMeta | None = None,
) -> Predictor:
    """A Predictor answering with the bundle's eager PyTorch network on ``device`` (e.g. ``"cuda"``)."""
    folder = resolve_bundle(bundle)
    meta = meta if meta is not None else read_meta(folder)
    runner = TorchRunner(load_model(folder, meta), device)
    return Predictor(folder, meta=meta, runner=runner, check_ood=check_ood, limits=limits)


def model_flops(bundle: str | Path | None = None) -> int:
    """FLOPs of one forward pass on one image (2 per multiply-add), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    meta, model = load_bundle(bundle)
    size = meta.preprocess.input_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())
