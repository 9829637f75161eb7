"""The PyTorch backend of :class:`~pneumo.serving.inference.Predictor` (imported only when it is used).

It has the ONNX runner's contract, NumPy batch in, NumPy ``(logits, features)`` out, so the
Predictor never touches a tensor and the serving path imports torch only when this backend runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo.modeling.models import logits_and_features


class TorchRunner:
    """Run an eval-mode network on ``device``: (N, 3, S, S) float32 -> logits (N, C), features (N, F)."""

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        logits, features = logits_and_features(self.model, x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()
