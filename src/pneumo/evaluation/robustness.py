"""Robustness validation: the validation images again, under shifts that a shortcut model fails.

A random-patient validation split comes from the same hospital, period and film framing as the
training data, so a model that reads *how a film is framed* (tight collimation, cut shoulders,
burned-in text) as a sign of pneumonia scores 0.98 there and fails on children filmed
differently. This module re-reads every validation image under controlled, deterministic
shifts and scores the model on each, so runs can be chosen on what transfers, not only on what
matches.

Each shift is a pure function of the decoded grayscale image and a random generator seeded by
the file name and the shift's name: the same image always gets the same shift, whatever the
order or the batch. Shifts work on the decoded image, before :func:`pneumo.core.preprocess.preprocess`,
so they reach the model exactly as a differently framed upload would.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pneumo.core import image_ops as ops
from pneumo.core import progress
from pneumo.core.bundle import is_positive
from pneumo.evaluation.metrics import (
    compute_metrics,
    evaluation_report,
    expected_calibration_error,
    select_threshold,
)
from pneumo.evaluation.report import format_ci

log = logging.getLogger(__name__)

ShiftFn = Callable[[Image.Image, np.random.Generator], Image.Image]
#: P(pneumonia) for a list of decoded images (one inference path: see :func:`predictor_prob_fn`).
ProbFn = Callable[[list[Image.Image]], np.ndarray]

#: Metrics summarized over shifts (worst case and mean drop).
SUMMARY_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy")


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(7.0, 12.0))
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small burned-in annotations in a random corner, as many films carry (side marker, date, site)."""
    return ops.burn_text(image, rng)


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=1.2 * image.size[1] / 224))


def _low_resolution(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    small = image.resize((max(16, w * 2 // 5), max(16, h * 2 // 5)), Image.Resampling.BILINEAR)
    return small.resize((w, h), Image.Resampling.BILINEAR)


def _gamma(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ops.to_image(ops.gamma(ops.to_pixels(image), 0.65 if rng.random() < 0.5 else 1.5))


def _contrast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = ops.to_pixels(image)
    factor = 0.65 if rng.random() < 0.5 else 1.35
    return ops.to_image(pixels.mean() + factor * (pixels - pixels.mean()))


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ops.to_image(ops.add_noise(ops.to_pixels(image), 10.0 / 255.0, rng))


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=15)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


#: The shifts, by name. ``clean`` is the plain validation image; the crops, pads and the mirror image
#: change the framing (the cue the default model of round 1 was found to use), the rest acquisition.
#: Round 6 added ``pad_left_right_15`` (an aspect change) and ``hflip``: summaries over all shifts
#: are over 17 since then (15 before).
SHIFTS: dict[str, ShiftFn] = {
    "clean": lambda image, rng: image,
    "crop_top_bottom_12": lambda image, rng: ops.crop_fraction(image, 0.12, 0.12, 0.0, 0.0),
    "crop_top_bottom_20": lambda image, rng: ops.crop_fraction(image, 0.20, 0.20, 0.0, 0.0),
    "crop_sides_10": lambda image, rng: ops.crop_fraction(image, 0.10, 0.10, 0.10, 0.10),
    "crop_left_right_10": lambda image, rng: ops.crop_fraction(image, 0.0, 0.0, 0.10, 0.10),
    "pad_12": lambda image, rng: ops.pad_fraction(image, 0.125, 0.125),
    "pad_top_bottom_15": lambda image, rng: ops.pad_fraction(image, 0.15, 0.0),
    "pad_left_right_15": lambda image, rng: ops.pad_fraction(image, 0.0, 0.15),
    "hflip": lambda image, rng: ImageOps.mirror(image),
    "rotate_10": _rotate,
    "text": _text,
    "tight_with_text": lambda image, rng: _text(ops.crop_fraction(image, 0.12, 0.12, 0.0, 0.0), rng),
    "blur": _blur,
    "low_resolution": _low_resolution,
    "gamma": _gamma,
    "contrast": _contrast,
    "noise": _noise,
    "jpeg_q15": _jpeg,
}


#: The shifts that change only how a film is framed: a model that reads the lungs answers the same under them.
FRAMING_SHIFTS = (
    "crop_top_bottom_12", "crop_top_bottom_20", "crop_sides_10", "crop_left_right_10",
    "pad_12", "pad_top_bottom_15", "pad_left_right_15", "hflip",
)  # fmt: skip
#: Of those, the pads and crops the issue-19 target names (a 10% pad, a 12% top/bottom crop) and their kin.
PAD_CROP_SHIFTS = tuple(s for s in FRAMING_SHIFTS if s != "hflip")


def shift_image(image: Image.Image, shift: str, key: str) -> Image.Image:
    """``image`` under ``shift``, deterministic in (``shift``, ``key``); never modifies ``image``."""
    rng = np.random.default_rng(zlib.crc32(f"{shift}:{key}".encode()))
    return SHIFTS[shift](image, rng)


def predictor_prob_fn(
    predictor: Any,
    gate: Any = None,
    gate_scores: list[np.ndarray] | None = None,
    logits: list[np.ndarray] | None = None,
) -> ProbFn:
    """P(pneumonia) through a :class:`pneumo.inference.predictor.Predictor` (its preprocessing, backend, calibration).

    With an OOD ``gate`` (:class:`pneumo.inference.ood.OodGate`), the gate's score of every image is
    appended to ``gate_scores`` on the way, from the same forward pass; with ``logits``, the raw
    logits (what a calibration is fitted on).
    """

    def prob_fn(images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([predictor.prepare_image(image) for image in images])
        raw, features = predictor.forward(batch)
        if gate is not None and gate_scores is not None:
            gate_scores.append(gate.score(features))
        if logits is not None:
            logits.append(raw)
        return np.asarray(predictor.meta.probability(raw), dtype=np.float64)

    return prob_fn


def with_tta(prob_fn: ProbFn, views: Sequence[str]) -> ProbFn:
    """Test-time augmentation: the mean P(pneumonia) over the image and its ``views`` (names of :data:`SHIFTS`).

    The views are deterministic (seeded by the view name only), so the same image always gets
    the same answer.
    """

    def tta_prob_fn(images: list[Image.Image]) -> np.ndarray:
        outs = [prob_fn(images)] + [prob_fn([shift_image(im, view, "tta") for im in images]) for view in views]
        return np.mean(outs, axis=0)

    return tta_prob_fn


def shifted_probabilities(
    prob_fn: ProbFn,
    images: Sequence[tuple[str, Image.Image]],
    shifts: Sequence[str] = tuple(SHIFTS),
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """P(pneumonia) of every (key, image) under every shift: shift -> array in input order."""
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise KeyError(f"Unknown shifts {unknown}; known: {', '.join(SHIFTS)}")
    out: dict[str, np.ndarray] = {}
    with progress.task(f"robustness ({len(shifts)} shifts)", len(shifts) * len(images)) as advance:
        for shift in shifts:
            probs = []
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                probs.append(prob_fn([shift_image(image, shift, key) for key, image in chunk]))
                advance(len(chunk))
            out[shift] = np.concatenate(probs) if probs else np.zeros(0)
            log.info("robustness: %s done", shift)
    return out


def _balanced_accuracy(metrics: Mapping[str, Any]) -> float | None:
    sens, spec = metrics.get("sensitivity"), metrics.get("specificity")
    return None if sens is None or spec is None else (sens + spec) / 2


def robustness_report(
    y_true: np.ndarray, probs: Mapping[str, np.ndarray], threshold: float, *, n_boot: int = 500
) -> dict[str, Any]:
    """Metrics with bootstrap CIs per shift, plus the worst case and the mean drop over shifts.

    ``summary[metric]`` holds ``clean`` (the unshifted value), ``worst`` and ``worst_shift``
    (the lowest value over the shifts, clean excluded), ``mean`` (over the shifts) and
    ``mean_drop`` / ``worst_drop`` (clean minus mean / worst). Metrics are at the bundle's
    ``threshold``: a shift that moves probabilities across it costs accuracy even when the
    ranking (ROC AUC) survives.
    """
    per_shift: dict[str, dict[str, Any]] = {}
    for shift, prob in probs.items():
        report = evaluation_report(
            y_true, prob, threshold, n_boot=n_boot, ci_metrics=("accuracy", "sensitivity", "specificity", "roc_auc")
        )
        report["balanced_accuracy"] = _balanced_accuracy(report)
        per_shift[shift] = {k: v for k, v in report.items() if k != "confusion_matrix"}
    shifted = {k: v for k, v in per_shift.items() if k != "clean"}
    summary: dict[str, Any] = {}
    for metric in SUMMARY_METRICS:
        values = {k: v[metric] for k, v in shifted.items() if v.get(metric) is not None}
        if not values:
            continue
        worst_shift = min(values, key=lambda k: values[k])
        clean = per_shift.get("clean", {}).get(metric)
        mean = float(np.mean(list(values.values())))
        summary[metric] = {
            "clean": clean,
            "worst": values[worst_shift],
            "worst_shift": worst_shift,
            "mean": mean,
            "mean_drop": None if clean is None else clean - mean,
            "worst_drop": None if clean is None else clean - values[worst_shift],
        }
    pooled_y = np.concatenate([y_true] * len(probs))
    return {
        "threshold": threshold,
        "shifts": per_shift,
        "summary": summary,
        "framing": framing_consistency(y_true, probs, threshold),
        # The calibration error over every condition pooled (each shift's is in its entry).
        "ece_pooled": expected_calibration_error(pooled_y, np.concatenate(list(probs.values()))),
    }


def pooled_threshold_table(
    y_true: np.ndarray, probs: Mapping[str, np.ndarray], rules: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """How threshold rules behave: each rule chosen on the clean images and on all shifts pooled.

    For each (rule, target sensitivity) and each source (``clean`` / ``pooled``), the threshold and
    the worst-case sensitivity, specificity and balanced accuracy it gives over the shifts, and the
    mean balanced accuracy over the shifts (clean excluded), the score the selection rule uses.
    """
    pooled_y = np.concatenate([y_true] * len(probs))
    pooled_p = np.concatenate(list(probs.values()))
    rows = []
    for rule, target in rules:
        for source, (y, p) in {"clean": (y_true, probs["clean"]), "pooled": (pooled_y, pooled_p)}.items():
            threshold = select_threshold(y, p, rule, target)
            per = {k: compute_metrics(y_true, v, threshold) for k, v in probs.items()}
            rows.append(
                {
                    "rule": rule if rule != "sensitivity" else f"sensitivity>={target}",
                    "chosen_on": source,
                    "threshold": threshold,
                    "clean_sensitivity": per["clean"]["sensitivity"],
                    "clean_specificity": per["clean"]["specificity"],
                    "worst_sensitivity": min(m["sensitivity"] for m in per.values()),
                    "worst_specificity": min(m["specificity"] for m in per.values()),
                    "worst_balanced_accuracy": min(_balanced_accuracy(m) or 0.0 for m in per.values()),
                    "mean_balanced_accuracy": float(
                        np.mean([_balanced_accuracy(m) or 0.0 for k, m in per.items() if k != "clean"])
                    ),
                }
            )
    return rows


# The threshold rule of MODEL_CARD.md, stated before the issue-9 runs: the candidates and how they read.
ROBUST_RULE_CANDIDATES = {
    ("youden", "clean"): "Youden's J on the clean validation",
    ("youden", "pooled"): "Youden's J on the pooled robustness validation (clean + every shift)",
    ("sensitivity>=0.95", "pooled"): "sensitivity >= 0.95 on the pooled robustness validation (clean + every shift)",
}


def robust_threshold(y_true: np.ndarray, probs: Mapping[str, np.ndarray], min_sensitivity: float = 0.95) -> dict:
    """The ``robust`` threshold rule: the candidate with the best mean balanced accuracy over the shifts.

    Candidates are Youden's J on the clean validation, Youden's J on all shifts pooled and
    "sensitivity >= 0.95" on all shifts pooled (:func:`pooled_threshold_table`); only those keeping the
    clean sensitivity at ``min_sensitivity`` or more are eligible (a screening tool must not trade
    missed pneumonia for robustness; if none does, all are). Returns the chosen row of the table, with ``description``.
    """
    rows = pooled_threshold_table(y_true, probs, [("youden", 0.95), ("sensitivity", 0.95)])
    candidates = [r for r in rows if (r["rule"], r["chosen_on"]) in ROBUST_RULE_CANDIDATES]
    eligible = [r for r in candidates if r["clean_sensitivity"] >= min_sensitivity] or candidates
    chosen = max(eligible, key=lambda r: r["mean_balanced_accuracy"])
    return {**chosen, "description": ROBUST_RULE_CANDIDATES[(chosen["rule"], chosen["chosen_on"])]}


def framing_consistency(y_true: np.ndarray, probs: Mapping[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """How much the answers move when only the framing changes (pads, crops, an aspect change, the mirror image).

    For each framing shift and each class (healthy and pneumonia films alike): the change in the share
    called PNEUMONIA against the clean films (``rate_change``, shifted minus clean) and the mean absolute
    change in probability (``mean_abs_dp``). The summary gives the largest healthy-film rate change
    under the pads and crops (``worst_normal_rate_change``, signed, with its shift: the target of issue
    19 is at most 0.03), the largest in absolute value over every framing shift, and ``mean_abs_dp``
    over every framing shift and film.
    """
    y = np.asarray(y_true)
    clean = probs["clean"]
    shifts: dict[str, dict[str, Any]] = {}
    for shift in (s for s in FRAMING_SHIFTS if s in probs):
        entry: dict[str, Any] = {}
        for name, mask in (("normal", y == 0), ("pneumonia", y == 1)):
            if not mask.any():
                continue
            before, after = is_positive(clean[mask], threshold), is_positive(probs[shift][mask], threshold)
            entry[name] = {
                "rate_change": float(after.mean() - before.mean()),
                "mean_abs_dp": float(np.abs(probs[shift][mask] - clean[mask]).mean()),
                "n": int(mask.sum()),
            }
        shifts[shift] = entry
    summary: dict[str, Any] = {}
    normal = {k: v["normal"]["rate_change"] for k, v in shifts.items() if "normal" in v}
    pad_crop = {k: v for k, v in normal.items() if k in PAD_CROP_SHIFTS}
    if pad_crop:
        worst = max(pad_crop, key=lambda k: abs(pad_crop[k]))
        summary.update(worst_normal_rate_change=pad_crop[worst], worst_normal_shift=worst)
    if normal:
        worst = max(normal, key=lambda k: abs(normal[k]))
        summary.update(worst_normal_rate_change_all=normal[worst], worst_normal_shift_all=worst)
    if shifts:
        summary["mean_abs_dp"] = float(np.mean([np.abs(probs[k] - clean).mean() for k in shifts]))
    return {"shifts": shifts, "summary": summary}


def markdown_table(report: Mapping[str, Any]) -> str:
    """One row per shift: accuracy, sensitivity, specificity and ROC AUC with 95% CIs."""
    header = "| shift | accuracy | sensitivity | specificity | ROC AUC |\n|---|---|---|---|---|\n"
    rows = []
    for shift, m in report["shifts"].items():
        cells = [format_ci(m.get(k), m.get("ci", {}).get(k)) for k in ("accuracy", "sensitivity", "specificity")]
        cells.append(format_ci(m.get("roc_auc"), m.get("ci", {}).get("roc_auc")))
        rows.append(f"| {shift} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def load_images(samples: Sequence[Any], input_size: int) -> list[tuple[str, Image.Image]]:
    """Decode samples once (:func:`pneumo.core.decode.read_image`, as the model sees them), keyed by file name."""
    from pneumo.core.decode import read_image

    return [(s.path.name, read_image(s.path, draft_size=input_size).image) for s in progress.track(samples, "decoding")]


def evaluate_bundle(
    bundle: Any,
    data: Any,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    shifts: Sequence[str] = tuple(SHIFTS),
    n_boot: int = 500,
    tta: Sequence[str] = (),
) -> dict[str, Any]:
    """The robustness validation of a bundle on the patient-level validation split of ``data``.

    The split is carved exactly as ``pneumo train`` carves it (same ``val_fraction`` and ``seed``),
    so a bundle trained on ``data`` is never scored on a child it trained on.
    """
    from pneumo.core.dataset import train_val_samples
    from pneumo.inference.predictor import Predictor

    _, val, description = train_val_samples(data, "binary", val_fraction, seed)
    predictor = Predictor(bundle, check_ood=False)
    images = load_images(val, predictor.preprocess_config.input_size)
    y_true = np.array([s.label for s in val])
    prob_fn = predictor_prob_fn(predictor)
    probs = shifted_probabilities(with_tta(prob_fn, tta) if tta else prob_fn, images, shifts)
    report = robustness_report(y_true, probs, predictor.threshold, n_boot=n_boot)
    report["tta"] = list(tta)
    report["split"] = description
    report["model"] = {"name": predictor.meta.name, "version": predictor.meta.version, "backend": predictor.backend}
    report["probabilities"] = {k: [round(float(x), 6) for x in v] for k, v in probs.items()}
    report["labels"] = y_true.tolist()
    return report
