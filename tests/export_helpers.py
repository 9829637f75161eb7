"""Helpers for the ONNX export, backend and bench tests: a tiny seeded bundle, its export, synthetic X-rays.

Test modules import :func:`exported_tiny_bundle_fixture` (the session fixture ``exported_tiny_bundle``),
so the whole suite pays for one real ONNX export (~5-15 s on 2 shared cores), not one per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from model_helpers import tiny_bundle
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.core.preprocess import PreprocessConfig
from pneumo.inference.runners import ONNX_FILE

#: timm's smallest EfficientNet (~0.1 M parameters): the same block types as Lite0, exported in seconds.
TINY_ARCH = "test_efficientnet"


@pytest.fixture(scope="session", name="exported_tiny_bundle")
def exported_tiny_bundle_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle exported with ``pneumo export onnx`` (so the CLI command is exercised too).

    Each importing module registers its own copy of this fixture; the memo makes them share one export.
    """
    if "bundle" not in _EXPORTED:
        folder = tiny_bundle(tmp_path_factory.mktemp("exported") / "bundle", arch=TINY_ARCH, head="spread",
                             export=False, preprocess=PreprocessConfig(64, (0.5,) * 3, (0.5,) * 3),
                             temperature=1.5, name="tiny-onnx-test")[0]  # fmt: skip
        result = CliRunner().invoke(app, ["export", "onnx", "--model", str(folder), "--opset", "18"])
        assert result.exit_code == 0, result.output
        assert result.output.strip().endswith(ONNX_FILE)
        _EXPORTED["bundle"] = folder
    return _EXPORTED["bundle"]


_EXPORTED: dict[str, Path] = {}
