"""The one inference path (``pneumo.inference.predictor.Predictor``) on a tiny random bundle."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_xray
from model_helpers import tiny_bundle, tiny_model
from torch import nn

from pneumo.core.bundle import read_meta, write_meta
from pneumo.core.errors import InvalidImageError, PneumoError
from pneumo.inference import Prediction, Predictor, iter_image_files
from pneumo.modeling.torch_backend import torch_predictor


def _png(name: str, pneumonia: bool = False) -> bytes:
    buffer = io.BytesIO()
    synthetic_xray(name, pneumonia, size=72).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model()


@pytest.fixture
def bundle(tmp_path: Path, model: nn.Module) -> Path:
    return tiny_bundle(tmp_path / "bundle", model, threshold=0.5)[0]


def _with(bundle: Path, **changes: float) -> Predictor:
    meta = read_meta(bundle)
    for key, value in changes.items():
        setattr(meta, key, value)
    write_meta(bundle, meta)
    return torch_predictor(bundle, check_ood=False)


def test_predict_bytes_and_path_agree(bundle: Path, tmp_path: Path) -> None:
    data = _png("same-image", True)
    path = tmp_path / "film.png"
    path.write_bytes(data)
    predictor = torch_predictor(bundle, check_ood=False)
    from_bytes, from_path = predictor.predict(data), predictor.predict(path)
    assert from_bytes.probability == from_path.probability
    assert from_path.source == str(path) and from_bytes.source is None
    assert from_path.format == "png"
    assert 0.0 < from_path.probability < 1.0
    assert from_path.probabilities["PNEUMONIA"] == pytest.approx(from_path.probability)
    assert sum(from_path.probabilities.values()) == pytest.approx(1.0)
    assert predictor.predict(data, name="upload.png").source == "upload.png"


def test_label_follows_the_bundle_threshold(bundle: Path) -> None:
    data = _png("threshold")
    p = torch_predictor(bundle, check_ood=False).predict(data).probability
    at = _with(bundle, threshold=p).predict(data)  # p >= threshold: pneumonia
    assert at.label == "PNEUMONIA" and at.threshold == p
    above = _with(bundle, threshold=math.nextafter(p, 1.0)).predict(data)
    assert above.label == "NORMAL" and above.probability == p
    assert _with(bundle, threshold=0.0).predict(data).label == "PNEUMONIA"
    assert _with(bundle, threshold=1.0 + 1e-9).predict(data).label == "NORMAL"


def test_predict_many_keeps_order_and_puts_errors_in_place(bundle: Path, tmp_path: Path) -> None:
    good = [tmp_path / f"good{i}.png" for i in range(4)]
    for i, path in enumerate(good):
        path.write_bytes(_png(f"many{i}", i % 2 == 0))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    sources: list[str | Path | bytes] = [
        good[0], text, good[1], tmp_path / "missing.png", good[2], truncated, good[3].read_bytes()
    ]  # fmt: skip
    predictor = torch_predictor(bundle, check_ood=False)
    results = predictor.predict_many(sources, batch_size=2)
    assert len(results) == len(sources)
    kinds = [type(r) for r in results]
    assert [k is Prediction for k in kinds] == [True, False, True, False, True, False, True]
    for index in (1, 3, 5):
        error = results[index]
        assert isinstance(error, PneumoError)
        assert error.code and error.message and error.to_dict() == {"code": error.code, "message": error.message}
    assert isinstance(results[1], InvalidImageError)
    # Each good result is the one its own input gets alone (batching changes nothing but float noise).
    for index, source in zip((0, 2, 4, 6), (good[0], good[1], good[2], good[3])):
        alone = predictor.predict(source)
        result = results[index]
        assert isinstance(result, Prediction)
        assert result.probability == pytest.approx(alone.probability, abs=1e-5)
    assert results[0].source == str(good[0])  # type: ignore[union-attr]
    assert len({r.probability for r in results if isinstance(r, Prediction)}) == 4


def test_temperature_changes_probabilities_not_the_ranking(bundle: Path) -> None:
    images = [_png(f"rank{i}", i % 3 == 0) for i in range(6)]
    cold = [r.probability for r in _with(bundle, temperature=1.0).predict_many(images)]  # type: ignore[union-attr]
    warm = [r.probability for r in _with(bundle, temperature=3.0).predict_many(images)]  # type: ignore[union-attr]
    assert not np.allclose(cold, warm, atol=1e-3)
    assert list(np.argsort(cold)) == list(np.argsort(warm))
    # Binary temperature scaling divides the log-odds by T.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for c, w in zip(cold, warm):
        assert logit(w) == pytest.approx(logit(c) / 3.0, rel=1e-4, abs=1e-6)
    # Nearer 0.5 at a higher temperature.
    assert all(abs(w - 0.5) < abs(c - 0.5) for c, w in zip(cold, warm))


def test_describe_and_threshold_come_from_the_bundle(bundle: Path) -> None:
    predictor = _with(bundle, threshold=0.37)
    assert predictor.threshold == 0.37
    info = predictor.describe()
    assert info["threshold"] == 0.37 and info["arch"] == "efficientnet_lite0" and info["backend"] == "torch"
    assert predictor.preprocess_config.input_size == 64


def test_iter_image_files_lists_everything_but_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    for name in ("b.jpeg", "a.png", "notes.txt", "sub/c.dcm", "sub/deeper/d", ".hidden.jpeg", ".git/e.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    single = tmp_path / "sub" / "c.dcm"
    files = iter_image_files([tmp_path, single])
    names = [str(p.relative_to(tmp_path)) for p in files]
    assert names == ["a.png", "b.jpeg", "notes.txt", "sub/c.dcm", "sub/deeper/d", "sub/c.dcm"]
    assert iter_image_files([tmp_path / "no-such-file.png"]) == [tmp_path / "no-such-file.png"]


def test_a_probability_on_the_other_side_of_50_percent_from_its_label_is_flagged_borderline(tmp_path: Path) -> None:
    """An operating point away from 50%: answers whose probability reads against their label say so."""
    from pneumo.core.bundle import Calibration

    folder = tiny_bundle(tmp_path / "b", head="spread", threshold=0.8, threshold_rule="chosen for the test")[0]
    meta = read_meta(folder)
    meta.calibration = Calibration(method="platt", slope=1.0, intercept=0.0)
    write_meta(folder, meta)
    results = Predictor(folder, check_ood=False).predict_many([_png(f"b{i}", i % 2 == 1) for i in range(24)])
    answers = [r for r in results if isinstance(r, Prediction)]
    assert len(answers) == 24
    for answer in answers:
        assert answer.borderline is (0.5 <= answer.probability < 0.8)
        assert answer.label == ("PNEUMONIA" if answer.probability >= 0.8 else "NORMAL")
        assert answer.operating_point == "chosen for the test"
    assert any(a.borderline for a in answers) and not all(a.borderline for a in answers)  # the band is exercised
