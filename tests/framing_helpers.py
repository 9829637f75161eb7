"""Builders for the framing tests: a synthetic chest film, and a localizer graph with a fixed answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pneumo.core.framing import Box


def synthetic_chest(width: int = 240, height: int = 220) -> tuple[Image.Image, Box]:
    """A chest-like film on a black background, and the box of its two lungs.

    What the localizer keys on, in cartoon: a thorax widening downwards with a thin chest wall,
    two dark lungs (narrow apices, wide bases), a bright spine and mediastinum, a heart, ribs and
    clavicles across, a bright abdomen under the diaphragm. The lungs sit well inside the frame,
    so the tested crops never cut them.
    """
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    body = (np.abs(x - 0.5) < 0.27 + 0.12 * np.sqrt(np.clip(y - 0.04, 0, 1))) & (y > 0.04)
    pixels = np.where(body, 150.0, 15.0)
    pixels += body * 70.0 * np.exp(-(((x - 0.5) / 0.06) ** 2))
    lungs = np.zeros_like(body)
    for cx in (0.32, 0.68):
        t = np.clip((y - 0.14) / 0.66, 0, 1)
        lungs |= (y > 0.14) & (y < 0.80) & (np.abs(x - cx) < 0.035 + 0.085 * np.sqrt(t))
    heart = ((x - 0.57) / 0.11) ** 2 + ((y - 0.68) / 0.12) ** 2 < 1
    lungs &= ~heart
    pixels[lungs] = 55.0
    pixels[heart & body] = 185.0
    pixels += 30.0 * (body & (np.sin((y + (x - 0.5) ** 2) * 2 * np.pi * 10) > 0.85))  # ribs
    pixels[(y > 0.80) & body] = 200.0
    pixels += 50.0 * (body & (np.abs(y - (0.12 + 0.15 * (x - 0.5) ** 2)) < 0.012))  # clavicles
    pixels += np.random.default_rng(0).normal(0.0, 4.0, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").filter(ImageFilter.GaussianBlur(1.5))
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    return image, Box(cols[0] / width, rows[0] / height, (cols[-1] + 1) / width, (rows[-1] + 1) / height)


def constant_graph(path: Path, outputs: tuple[float, float, float, float, float], size: int = 64) -> Path:
    """A localizer graph that answers ``outputs`` whatever the input (to test the arithmetic around it)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    zeros = helper.make_tensor("zeros", TensorProto.FLOAT, [size * size, 5], np.zeros(size * size * 5).tolist())
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [5], list(outputs))
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["thumbnail"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "zeros"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["box_found"]),
        ],
        "constant_localizer",
        [helper.make_tensor_value_info("thumbnail", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("box_found", TensorProto.FLOAT, ["batch", 5])],
        [zeros, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
