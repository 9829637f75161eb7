"""The robustness validation: every shift really applied, deterministic, scored against the plain images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_xray
from model_helpers import tiny_bundle
from PIL import Image

from pneumo.core.dataset import patient_id, train_val_samples
from pneumo.evaluation import robustness
from pneumo.evaluation.metrics import compute_metrics
from pneumo.modeling.augment import build_augment
from pneumo.modeling.config import AugmentConfig


@pytest.fixture
def film() -> Image.Image:
    return synthetic_xray("IM-0001-0001.jpeg", pneumonia=False, size=200)


@pytest.mark.parametrize("shift", [s for s in robustness.SHIFTS if s != "clean"])
def test_every_shift_changes_the_image_and_leaves_the_input_alone(film: Image.Image, shift: str) -> None:
    before = np.asarray(film).copy()
    out = robustness.shift_image(film, shift, "IM-0001-0001.jpeg")
    assert out.mode == "L"
    assert np.array_equal(np.asarray(film), before)
    changed = out.size != film.size or not np.array_equal(np.asarray(out), before)
    assert changed, f"{shift} returned the image unchanged"


@pytest.mark.parametrize("shift", list(robustness.SHIFTS))
def test_shifts_are_deterministic_per_file(film: Image.Image, shift: str) -> None:
    a = robustness.shift_image(film, shift, "IM-0001-0001.jpeg")
    b = robustness.shift_image(film.copy(), shift, "IM-0001-0001.jpeg")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_framing_shifts_cut_and_pad_what_they_say(film: Image.Image) -> None:
    w, h = film.size
    assert robustness.shift_image(film, "crop_top_bottom_12", "k").size == (w, h - 2 * round(0.12 * h))
    assert robustness.shift_image(film, "crop_left_right_10", "k").size == (w - 2 * round(0.1 * w), h)
    padded = np.asarray(robustness.shift_image(film, "pad_12", "k"))
    dy, dx = round(0.125 * h), round(0.125 * w)
    assert padded.shape == (h + 2 * dy, w + 2 * dx)
    assert padded[:dy].max() == 0 and padded[:, :dx].max() == 0  # black margins
    assert np.array_equal(padded[dy : dy + h, dx : dx + w], np.asarray(film))


def test_text_is_burned_into_a_corner(film: Image.Image) -> None:
    diff = np.asarray(robustness.shift_image(film, "text", "k"), dtype=int) - np.asarray(film, dtype=int)
    rows, _ = np.nonzero(diff)
    h = diff.shape[0]
    assert rows.size > 20
    near_top, near_bottom = rows.max() < h / 2, rows.min() > h / 2
    assert near_top or near_bottom  # one corner band, not spread over the film


def _framing_shortcut(images: list[Image.Image]) -> np.ndarray:
    """A 'model' that reads framing only: the brighter the top rows (no black collimation), the likelier pneumonia."""
    return np.array([np.asarray(im, dtype=float)[: max(1, im.size[1] // 10)].mean() / 255.0 for im in images])


def test_report_finds_the_shift_a_shortcut_model_fails_and_computes_the_drop() -> None:
    names = [f"IM-{i:04d}-0001.jpeg" for i in range(20)] + [f"person{i}_bacteria_1.jpeg" for i in range(20)]
    images = [(n, synthetic_xray(n, n.startswith("person"), size=96)) for n in names]
    y = np.array([int(n.startswith("person")) for n in names])
    probs = robustness.shifted_probabilities(_framing_shortcut, images, ["clean", "pad_12", "text", "noise"])
    report = robustness.robustness_report(y, probs, threshold=0.3, n_boot=50)

    assert set(report["shifts"]) == {"clean", "pad_12", "text", "noise"}
    for shift, prob in probs.items():
        expected = compute_metrics(y, prob, 0.3)
        assert report["shifts"][shift]["specificity"] == pytest.approx(expected["specificity"])
        assert report["shifts"][shift]["roc_auc"] == pytest.approx(expected["roc_auc"])
    # Black padding darkens the top rows: every film falls below the threshold, sensitivity collapses.
    sens = report["summary"]["sensitivity"]
    assert sens["worst_shift"] == "pad_12" and sens["worst"] == pytest.approx(0.0)
    values = [report["shifts"][s]["sensitivity"] for s in ("pad_12", "text", "noise")]
    assert sens["mean"] == pytest.approx(np.mean(values))
    assert sens["mean_drop"] == pytest.approx(report["shifts"]["clean"]["sensitivity"] - np.mean(values))
    assert "ci" in report["shifts"]["noise"] and report["shifts"]["noise"]["ci"]["accuracy"] is not None


def test_threshold_table_compares_rules_on_clean_and_pooled_images() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 30)
    clean = np.clip(y * 0.6 + rng.uniform(0, 0.4, 60), 0, 1)
    probs = {"clean": clean, "tight": np.clip(clean + 0.3, 0, 1)}  # the shift raises every probability
    rows = robustness.pooled_threshold_table(y, probs, [("youden", 0.95)])
    by_source = {r["chosen_on"]: r for r in rows}
    assert by_source["pooled"]["threshold"] > by_source["clean"]["threshold"]
    assert by_source["pooled"]["worst_specificity"] >= by_source["clean"]["worst_specificity"]


def test_evaluate_bundle_scores_only_children_of_the_validation_split(tiny_dataset: Path, tmp_path: Path) -> None:
    bundle, _ = tiny_bundle(tmp_path / "bundle", threshold=0.5)
    report = robustness.evaluate_bundle(bundle, tiny_dataset, shifts=["clean", "crop_sides_10"], n_boot=20)
    train, val, _ = train_val_samples(tiny_dataset, "binary", 0.15, 0)
    assert report["shifts"]["clean"]["n_images"] == len(val)
    assert {patient_id(s.path.name) for s in train}.isdisjoint({patient_id(s.path.name) for s in val})
    assert len(report["probabilities"]["crop_sides_10"]) == len(val)
    assert report["probabilities"]["clean"] != report["probabilities"]["crop_sides_10"]


def test_framing_augmentation_keeps_the_size_and_changes_the_framing() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 64, 64)
    original = x.clone()
    augment = build_augment(AugmentConfig(rotation_deg=0, zoom=0, shift=0, hflip=0, brightness=0, contrast=0,
                                          crop_scale=0.5, aspect=1.5, pad=0.2), 64)  # fmt: skip
    outs = [augment(x) for _ in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert sum(not torch.equal(o, original) for o in outs) >= 6
    assert torch.equal(x, original)  # the input is never modified


def test_framing_augmentation_needs_the_size() -> None:
    from pneumo.core.errors import DataError

    with pytest.raises(DataError, match="input size"):
        build_augment(AugmentConfig(crop_scale=0.5))


def test_photometric_augmentation_stays_in_range_and_text_burns_in() -> None:
    torch.manual_seed(1)
    x = torch.full((1, 64, 64), 0.3)
    cfg = AugmentConfig(rotation_deg=0, zoom=0, shift=0, hflip=0, brightness=0, contrast=0, gamma=0.5, noise=0.1,
                        blur=1.0, text=1.0)  # fmt: skip
    out = build_augment(cfg, 64)(x)
    assert out.shape == x.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.7  # white text on a gray film


def test_new_augmentation_fields_default_to_off() -> None:
    cfg = AugmentConfig()
    assert (cfg.crop_scale, cfg.pad, cfg.gamma, cfg.blur, cfg.noise, cfg.text) == (0, 0, 0, 0, 0, 0)
    assert repr(build_augment(cfg)) == repr(build_augment(cfg, 224))
