"""The Kermany dataset on disk: discovery, labels and patient-level splits (no torch).

The Kermany chest X-ray data come as ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. The
file names carry the patient (``person12_bacteria_45.jpeg``, ``IM-0117-0001.jpeg``) and several
patients have more than one film, some of them exact duplicates, so a validation split made by
image would let the model be validated on patients it trained on. :func:`patient_split` splits
by patient, stratified by class, and :func:`train_val_samples` uses it whenever the official
``val/`` folder is too small to be useful (the Kaggle release ships only 16 images there).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumo.core.decode import IMAGE_EXTENSIONS
from pneumo.core.errors import DataError

logger = logging.getLogger(__name__)

#: Label names per label mode; a sample's ``label`` indexes into these.
LABEL_MODES: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "3class": ("NORMAL", "BACTERIA", "VIRUS"),
}
#: Class folders of the Kaggle layout.
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
SPLITS = ("train", "val", "test")

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One image file with its label and the patient it belongs to.

    ``kind`` is ``"normal"``, ``"bacteria"``, ``"virus"`` or ``"pneumonia"`` (subtype not in the
    file name); it is kept in both label modes so splits can stratify by pneumonia type.
    """

    path: Path
    label: int
    patient: str
    kind: str


def label_names(label_mode: str) -> tuple[str, ...]:
    """The class names of ``label_mode``, or a :class:`DataError` naming the valid modes."""
    try:
        return LABEL_MODES[label_mode]
    except KeyError:
        raise DataError(
            f"Unknown label_mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}.", code="unknown_label_mode"
        ) from None


def patient_id(filename: str) -> str:
    """The patient a Kermany file name belongs to.

    ``person12_bacteria_45.jpeg`` -> ``person12``; ``IM-0117-0001.jpeg`` and
    ``IM-0429-0001-0002.jpeg`` -> ``IM-0117`` / ``IM-0429``; ``NORMAL2-IM-0657-0001.jpeg`` ->
    ``NORMAL2-IM-0657``. Any other name is its own patient (its stem), the safe default: an
    unknown name can never merge two patients, only fail to group one patient's films.
    """
    stem = Path(filename).stem
    match = _PERSON.match(stem) or _IM.match(stem)
    return match.group(1) if match else stem


def _kind(class_dir: str, filename: str) -> str:
    if class_dir == "NORMAL":
        return "normal"
    name = filename.lower()
    bacteria, virus = "bacteria" in name, "virus" in name
    if bacteria != virus:
        return "bacteria" if bacteria else "virus"
    return "pneumonia"


def _label(kind: str, label_mode: str, path: Path) -> int:
    if label_mode == "binary":
        return 0 if kind == "normal" else 1
    if kind == "pneumonia":
        raise DataError(
            f"{path} is in PNEUMONIA/ but its name says neither 'bacteria' nor 'virus', so label_mode='3class' "
            "cannot label it; rename it (e.g. personN_bacteria_M.jpeg), remove it or use label_mode='binary'.",
            code="unknown_pneumonia_type",
        )
    return ("normal", "bacteria", "virus").index(kind)


def _listing(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(entries[:10]) + (" ..." if len(entries) > 10 else "") if entries else "nothing"


def discover(root: Path | str, split: str | None = None, label_mode: str = "binary") -> list[Sample]:
    """List the labelled images of a dataset folder, sorted for determinism.

    Args:
        root: a Kaggle root (``root/train``, ``root/val``, ``root/test``, each with ``NORMAL/``
            and ``PNEUMONIA/``) when ``split`` is given, else a folder holding ``NORMAL/`` and
            ``PNEUMONIA/`` directly.
        split: ``"train"``, ``"val"``, ``"test"`` or ``None``.
        label_mode: ``"binary"`` or ``"3class"`` (pneumonia type from the file name).

    Raises:
        DataError: the layout is wrong, a class folder has no images, or (3class) a pneumonia
            file name has no type.
    """
    label_names(label_mode)  # fail early on an unknown mode
    root = Path(root)
    if split is not None and split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)} or None.", code="unknown_split")
    folder = root / split if split else root
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder; expected {folder}/NORMAL and {folder}/PNEUMONIA.", code="bad_layout"
        )
    missing = [c for c in CLASS_DIRS if not (folder / c).is_dir()]
    if missing:
        hint = ""
        if split is None and any((folder / name).is_dir() for name in SPLITS):
            hint = (
                " It looks like a Kaggle root: choose a split (pneumo evaluate --split train; in Python split='train')."
            )
        raise DataError(
            f"{folder} has no {' or '.join(m + '/' for m in missing)} folder (it holds {_listing(folder)}); "
            f"expected one sub-folder per class: {', '.join(c + '/' for c in CLASS_DIRS)}.{hint}",
            code="bad_layout",
        )
    samples: list[Sample] = []
    for class_dir in CLASS_DIRS:
        files = sorted(
            p
            for p in (folder / class_dir).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"{folder / class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "every class needs at least one.",
                code="empty_class",
            )
        for path in files:
            kind = _kind(class_dir, path.name)
            samples.append(Sample(path, _label(kind, label_mode, path), patient_id(path.name), kind))
    logger.info("Found %d images in %s (%s).", len(samples), folder, dataset_summary(samples, label_mode)["counts"])
    return samples


def _patient_strata(samples: Sequence[Sample]) -> dict[str, str]:
    """Each patient's stratum: the kind most of its images have (ties -> alphabetical, for determinism)."""
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for s in samples:
        kinds[s.patient][s.kind] += 1
    return {p: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for p, c in kinds.items()}


def patient_split(
    samples: Sequence[Sample], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split samples into train and validation by patient, stratified by class.

    Every patient goes wholly to one side. Patients are grouped by their majority ``kind``
    (normal / bacteria / virus); within each group they are shuffled (seeded) and moved to
    validation while that brings the group's validation *image* count closer to
    ``val_fraction`` of its images. Counting images, not patients, matters: pneumonia patients
    have more films than normal ones, and a split by patient count drifts the class ratio.
    A group of two or more patients always gives at least one to each side.

    Returns:
        ``(train, val)``, each in the input's order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive); got {val_fraction}.", code="bad_fraction")
    n_images = Counter(s.patient for s in samples)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for patient, stratum in sorted(_patient_strata(samples).items()):
        by_stratum[stratum].append(patient)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for stratum in sorted(by_stratum):
        patients = [by_stratum[stratum][i] for i in rng.permutation(len(by_stratum[stratum]))]
        if len(patients) < 2:
            continue
        target = val_fraction * sum(n_images[p] for p in patients)
        chosen, count = [], 0
        for patient in patients[:-1]:  # the last one stays in train whatever happens
            if abs(count + n_images[patient] - target) < abs(count - target):
                chosen.append(patient)
                count += n_images[patient]
        val_patients.update(chosen or patients[:1])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def train_val_samples(
    root: Path | str,
    label_mode: str = "binary",
    val_fraction: float = 0.15,
    seed: int = 0,
    min_val_images: int = 100,
) -> tuple[list[Sample], list[Sample], str]:
    """Training and validation samples of a dataset root, and a sentence saying how they were split.

    Uses ``root/val`` when it holds at least ``min_val_images`` images; otherwise carves about
    ``val_fraction`` of the images, whole patients at a time (:func:`patient_split`), out of
    ``root/train`` (or out of ``root`` itself when it holds ``NORMAL/`` and ``PNEUMONIA/``).
    """
    root = Path(root)
    split = "train" if (root / "train").is_dir() else None
    train = discover(root, split, label_mode)
    if split and (root / "val").is_dir():
        val = discover(root, "val", label_mode)
        if len(val) >= min_val_images:
            shared = {s.patient for s in train} & {s.patient for s in val}
            if shared:
                logger.warning("%d patients are in both train/ and val/ (e.g. %s).", len(shared), min(shared))
            return train, val, "official val/"
        reason = f"; official val/ has only {len(val)} images (< {min_val_images})"
    else:
        reason = ""
    train, val = patient_split(train, val_fraction, seed)
    description = f"carved {val_fraction * 100:g}% by patient from {split or root.name} (seed {seed}){reason}"
    logger.info("Validation split: %s.", description)
    return train, val, description


def _counts(samples: Sequence[Sample], n_classes: int) -> list[int]:
    counts = Counter(s.label for s in samples)
    return [counts.get(c, 0) for c in range(n_classes)]


def dataset_summary(samples: Sequence[Sample], label_mode: str) -> dict[str, Any]:
    """Counts per class and per kind and the number of patients: the training-data record of a bundle."""
    names = label_names(label_mode)
    return {
        "label_mode": label_mode,
        "n_images": len(samples),
        "n_patients": len({s.patient for s in samples}),
        "counts": dict(zip(names, _counts(samples, len(names)), strict=True)),
        "kinds": dict(sorted(Counter(s.kind for s in samples).items())),
    }


def layout(root: Path | str) -> dict[str, Path]:
    """The labelled folders of a dataset root: ``{"train": ..., "val": ..., "test": ...}`` (those present) for a
    Kaggle root, ``{"": root}`` for a folder holding ``NORMAL/`` and ``PNEUMONIA/`` itself.

    Raises:
        DataError: ``root`` is not a folder, or holds neither layout (the message lists what it holds).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.", code="bad_layout")
    if all((root / c).is_dir() for c in CLASS_DIRS):
        return {"": root}
    found = {s: root / s for s in SPLITS if all((root / s / c).is_dir() for c in CLASS_DIRS)}
    if not found:
        raise DataError(
            f"{root} holds {_listing(root)}; expected train/NORMAL and train/PNEUMONIA (the Kaggle layout, "
            "optional val/ and test/ alike) or NORMAL/ and PNEUMONIA/ directly.",
            code="bad_layout",
        )
    return found


def inspect_root(root: Path | str) -> dict[str, Any]:
    """What a dataset root holds, split by split: images per class and kind, patients, films per patient,
    files with identical bytes, and patients found in more than one split (a leak between them).

    Raises:
        DataError: as :func:`layout`, or a class folder without images.
    """
    import hashlib

    report: dict[str, Any] = {"root": str(root), "splits": {}}
    patients: dict[str, set[str]] = {}
    for split, folder in layout(root).items():
        samples = discover(folder, None, "binary")
        summary = dataset_summary(samples, "binary")
        per_patient = Counter(s.patient for s in samples)
        digests = Counter(hashlib.sha1(s.path.read_bytes()).hexdigest() for s in samples)
        summary["patients_with_several_films"] = sum(1 for n in per_patient.values() if n > 1)
        summary["duplicate_files"] = sum(n - 1 for n in digests.values() if n > 1)
        report["splits"][split or "."] = summary
        patients[split or "."] = set(per_patient)
    names = sorted(patients)
    report["shared_patients"] = {
        f"{a}+{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1 :]
    }
    return report
