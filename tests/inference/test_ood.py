"""The "not a chest X-ray" gate: statistics, persistence, and refusals through Predictor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from app_helpers import encode
from bad_inputs import xray_like
from conftest import noise_image, synthetic_xray
from model_helpers import SURFACE_META, tiny_bundle
from PIL import Image

from pneumo.core.bundle import OOD_FILE, BundleMeta, read_meta
from pneumo.core.errors import BundleError, InvalidImageError, NotAChestXrayError
from pneumo.evaluation.robustness import SHIFTS
from pneumo.inference import Prediction, Predictor
from pneumo.inference.ood import OodGate
from pneumo.modeling.ood_fit import fit_ood, refit_gate

#: The required fields of a bundle.json, for schema checks of the ood section.
_META = {"arch": "a", "timm_name": "a", "labels": ["NORMAL", "PNEUMONIA"], "preprocess": {"input_size": 64}}


def _low_rank(n: int, seed: int, dim: int = 48, rank: int = 6) -> np.ndarray:
    """Features whose variance lies mostly in ``rank`` directions, with a little noise elsewhere."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).normal(size=(rank, dim))
    return 3.0 + rng.normal(size=(n, rank)) * [5, 4, 3, 2, 1.5, 1] @ basis + 0.1 * rng.normal(size=(n, dim))


@pytest.fixture(scope="module")
def gate() -> OodGate:
    return fit_ood(_low_rank(600, 0), _low_rank(400, 1), quantile=0.99, n_components=6)


def test_threshold_refuses_about_one_minus_quantile_of_new_in_distribution_data(gate: OodGate) -> None:
    assert gate.info["val_refusal_rate"] <= 0.01
    fresh = _low_rank(4000, 2)
    assert np.mean(~gate.accepts(fresh)) < 0.03
    assert 0.7 < gate.info["train_score_median"] < 1.3  # score ~1 for a typical training vector


def test_far_along_the_leading_directions_is_refused(gate: OodGate) -> None:
    shifted = _low_rank(200, 3) + 40.0 * np.random.default_rng(0).normal(size=48) / np.sqrt(48)
    assert not gate.accepts(shifted).any()


def test_off_the_training_subspace_is_refused_even_when_small(gate: OodGate) -> None:
    """A shift orthogonal to the leading directions, tiny next to their spread, is still far: the PPCA residual
    term sees it where a distance on the leading components alone would not."""
    data = _low_rank(200, 4)
    direction = np.random.default_rng(9).normal(size=48)
    direction -= gate.components.T @ (gate.components @ direction)  # orthogonal to the kept directions
    moved = data + 2.0 * direction / np.linalg.norm(direction)
    assert np.linalg.norm(moved - data, axis=1).mean() < 0.2 * np.linalg.norm(data - data.mean(0), axis=1).mean()
    assert not gate.accepts(moved).any()
    leading_only = ((moved - gate.mean) @ gate.components.T) ** 2 / gate.variances
    baseline = ((data - gate.mean) @ gate.components.T) ** 2 / gate.variances
    assert np.allclose(leading_only.sum(1), baseline.sum(1))  # invisible to the leading directions


def test_check_refuses_blank_images_whatever_their_features(gate: OodGate) -> None:
    typical = gate.mean  # the most typical features there are
    assert gate.check(typical, xray_like(), "a.png") == (pytest.approx(0.0, abs=1e-9), None)
    _, reason = gate.check(typical, Image.new("L", (80, 80), 128), "flat.png")
    assert reason is not None and "flat.png is blank" in reason
    far = gate.mean + 100.0
    _, reason = gate.check(far, xray_like())
    assert reason is not None and reason.startswith("The image does not look like a frontal chest X-ray")
    assert f"{gate.threshold:.2f}" in reason


def test_save_load_round_trip_keeps_scores_and_is_small(gate: OodGate, tmp_path: Path) -> None:
    meta_ood = gate.save(tmp_path)
    json.dumps(meta_ood.model_dump())  # goes into bundle.json
    loaded = OodGate.load(tmp_path, meta_ood)
    probe = _low_rank(50, 5)
    assert np.allclose(loaded.score(probe), gate.score(probe), rtol=1e-4)
    assert loaded.threshold == gate.threshold
    assert loaded.info["quantile"] == 0.99
    assert loaded.min_pixel_std == gate.min_pixel_std
    assert "min_pixel_std" not in loaded.info


def test_stored_statistics_stay_small_for_1280_d_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = fit_ood(rng.normal(size=(300, 1280)), rng.normal(size=(50, 1280)))
    big.save(tmp_path)
    assert big.components.shape == (64, 1280)
    assert (tmp_path / OOD_FILE).stat().st_size < 400_000  # vs 6.5 MB for a full 1280 x 1280 covariance


def test_load_errors_are_bundle_errors(gate: OodGate, tmp_path: Path) -> None:
    meta_ood = gate.save(tmp_path)
    with pytest.raises(BundleError, match=r"ood\.method"):  # the schema names the field
        BundleMeta.from_dict({**_META, "ood": {**meta_ood.model_dump(), "method": "magic"}})
    with pytest.raises(BundleError, match=r"lacks ood\.safetensors"):
        OodGate.load(tmp_path / "elsewhere", meta_ood)
    with pytest.raises(BundleError, match=r"does not match bundle\.json"):
        OodGate.load(tmp_path, meta_ood.model_copy(update={"components": meta_ood.components - 1}))
    (tmp_path / OOD_FILE).write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes, not safetensors
    with pytest.raises(BundleError, match="incomplete or malformed"):
        OodGate.load(tmp_path, meta_ood)
    with pytest.raises(BundleError, match="refit"):
        gate.score(np.zeros((1, 12)))


def test_fit_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="one width"):
        fit_ood(np.zeros((10, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="quantile"):
        fit_ood(np.ones((10, 4)), np.ones((5, 4)), quantile=1.0)


def test_rank_deficient_features_give_finite_scores() -> None:
    train = np.zeros((20, 8))
    train[:, 0] = np.arange(20)
    gate = fit_ood(train, train[:5])
    assert np.isfinite(gate.score(np.ones((3, 8)))).all()


# ----------------------------------------------------------------------- through the Predictor


def _noise(seed: int) -> Image.Image:
    return noise_image(seed)


def _document(seed: int) -> Image.Image:
    page = Image.new("L", (96, 96), 250)
    rng = np.random.default_rng(seed)
    for row in range(8, 90, 8):
        page.paste(20, (6, row, int(rng.integers(30, 90)), row + 3))  # lines of "text"
    return page


def _validation_xray(index: int = 0) -> bytes:
    """One of the calibration's validation images: accepted by construction (threshold = their max)."""
    return encode(synthetic_xray(f"v{index}", index % 2 == 1), "PNG")


def test_refit_gate_writes_the_gate_into_the_bundle(gated_bundle: Path) -> None:
    meta = read_meta(gated_bundle)
    assert meta.ood is not None and meta.ood.n_train == 96 and meta.ood.n_val == 48
    assert meta.ood.threshold_sample == "validation X-rays" and meta.ood.val_refusal_rate <= 0.01
    assert (gated_bundle / OOD_FILE).is_file()
    assert meta.labels == ["NORMAL", "PNEUMONIA"]  # the rest of bundle.json is kept


def test_refit_gate_can_set_the_threshold_on_shifted_validation_images(gated_bundle: Path, tmp_path: Path) -> None:
    """As training does: the validation films under every robustness shift (clean included) are the sample to accept."""
    bundle = tmp_path / "bundle"
    shutil.copytree(gated_bundle, bundle)
    train, val = (sorted((gated_bundle.parent / split).iterdir()) for split in ("train", "val"))
    refit_gate(bundle, train, val, quantile=0.99, n_components=8)
    clean, shifted = read_meta(gated_bundle).ood, read_meta(bundle).ood
    assert clean is not None and shifted is not None
    assert shifted.n_val == len(val) * len(SHIFTS) and shifted.val_refusal_rate <= 0.01
    assert shifted.threshold_sample == "validation X-rays and their robustness shifts"
    assert shifted.threshold > clean.threshold  # the shifted films score farther from the training films


def test_predictor_accepts_new_xrays_and_refuses_other_pictures(gated_bundle: Path) -> None:
    predictor = Predictor(gated_bundle)
    assert predictor.ood_gate is not None
    new_xrays = [encode(synthetic_xray(f"new{i}", i % 2 == 0), "PNG") for i in range(24)]
    results = predictor.predict_many(new_xrays)
    assert sum(isinstance(r, Prediction) for r in results) >= 21  # ~1% expected refused; allow chance
    accepted = predictor.predict(_validation_xray())
    assert accepted.ood_score is not None and accepted.ood_score <= predictor.ood_gate.threshold
    for image, why in ((_noise(0), "threshold"), (_document(0), "threshold"), (Image.new("L", (96, 96), 255), "blank")):
        with pytest.raises(NotAChestXrayError) as caught:
            predictor.predict(encode(image, "PNG"), name="upload.png")
        assert caught.value.code == "not_a_chest_xray" and caught.value.http_status == 422
        assert "upload.png" in caught.value.message and why in caught.value.message


def test_check_ood_false_reports_the_score_but_refuses_nothing(gated_bundle: Path) -> None:
    predictor = Predictor(gated_bundle, check_ood=False)
    result = predictor.predict(encode(_noise(1), "PNG"))
    assert isinstance(result, Prediction)
    assert predictor.ood_gate is not None and result.ood_score is not None
    assert result.ood_score > predictor.ood_gate.threshold


def test_bundle_without_gate_refuses_nothing(tmp_path: Path) -> None:
    predictor = Predictor(tiny_bundle(tmp_path / "plain", head="wide", **SURFACE_META)[0])
    assert predictor.ood_gate is None
    assert predictor.predict(encode(_noise(2), "PNG")).ood_score is None


def test_predict_many_keeps_one_entry_per_input_in_order(gated_bundle: Path) -> None:
    predictor = Predictor(gated_bundle)
    xray = _validation_xray(1)
    sources = [xray, encode(_noise(3), "PNG"), b"not an image", xray, b"", encode(_document(1), "PNG")]
    results = predictor.predict_many(sources, batch_size=2)
    kinds = [type(r) for r in results]
    assert kinds == [Prediction, NotAChestXrayError, type(results[2]), Prediction, type(results[4]), NotAChestXrayError]
    assert isinstance(results[2], InvalidImageError) and results[2].code == "unsupported_format"
    assert isinstance(results[4], InvalidImageError) and results[4].code == "empty_file"


# ------------------------------------------------------------------ nothing lost: pneumo predict


def test_cli_predict_writes_a_row_per_file_in_order_and_exits_non_zero(gated_bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pneumo.cli import app

    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    files = {
        "a_xray.png": _validation_xray(2),
        "b_notes.txt": b"not an image at all",
        "c_noise.png": encode(_noise(4), "PNG"),
        "d_empty.jpeg": b"",
        "e_truncated.jpeg": (jpeg := encode(synthetic_xray("t", True, 128), "JPEG"))[: len(jpeg) // 2],
        "sub/f_xray.png": _validation_xray(3),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "rows.json"
    csv_out = tmp_path / "rows.csv"
    result = CliRunner().invoke(
        app, ["predict", str(folder), "--model", str(gated_bundle), "--json", str(out), "--csv", str(csv_out)]
    )
    assert result.exit_code == 1, result.output
    rows = json.loads(out.read_text())
    assert [Path(row["file"]).relative_to(folder).as_posix() for row in rows] == list(files)
    codes = [row.get("error", {}).get("code") for row in rows]
    assert codes == [None, "unsupported_format", "not_a_chest_xray", "empty_file", "truncated_image", None]
    assert rows[0]["ood_score"] is not None and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert len(csv_out.read_text().splitlines()) == 1 + len(files)

    noise = str(folder / "c_noise.png")
    relaxed = CliRunner().invoke(app, ["predict", noise, "--model", str(gated_bundle), "--no-ood"])
    assert relaxed.exit_code == 0, relaxed.output


def test_ood_fit_command_uses_the_patient_split(tiny_dataset: Path, tmp_path: Path) -> None:
    """``pneumo ood fit BUNDLE --data ROOT``: the one-command step the lead runs on a new bundle."""
    from typer.testing import CliRunner

    from pneumo.cli import app
    from pneumo.core.dataset import train_val_samples

    bundle = tiny_bundle(tmp_path / "bundle", head="wide", **SURFACE_META)[0]
    args = ["ood", "fit", str(bundle), "--data", str(tiny_dataset), "--components", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_train"] > 0
    train, val, _ = train_val_samples(tiny_dataset)
    meta = read_meta(bundle)
    assert meta.ood is not None
    # As training sets it: the threshold on the validation patients' films under every robustness shift.
    assert (meta.ood.n_train, meta.ood.n_val) == (len(train), len(val) * len(SHIFTS))
    assert Predictor(bundle).ood_gate is not None
