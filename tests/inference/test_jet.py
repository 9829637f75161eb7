"""The heatmap colours of the serving install equal matplotlib's ``jet`` (which only the training extra installs)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumo.inference.explain import jet_colours


def test_jet_colours_equal_matplotlib() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    heat = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    heat[0, :4] = (0.0, 1.0, 0.5, 1.0 - 1e-7)
    np.testing.assert_allclose(jet_colours(heat), matplotlib.colormaps["jet"](heat)[..., :3], atol=1e-12)


def test_jet_colours_clip_out_of_range_heat() -> None:
    assert np.array_equal(jet_colours(np.array([-0.5, 1.5])), jet_colours(np.array([0.0, 1.0])))
    assert jet_colours(np.array([0.0]))[0].tolist() == [0.0, 0.0, 0.5]  # dark blue: no evidence
