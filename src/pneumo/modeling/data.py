"""Dataset discovery, labels, patient-level splits, augmentation, Dataset and DataModule.

The Kermany chest X-ray data come as ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. The
file names carry the patient (``person12_bacteria_45.jpeg``, ``IM-0117-0001.jpeg``) and several
patients have more than one film, some of them exact duplicates, so a validation split made by
image would let the model be validated on patients it trained on. :func:`patient_split` splits
by patient, stratified by class, and :func:`train_val_samples` uses it whenever the official
``val/`` folder is too small to be useful (the Kaggle release ships only 16 images there).

Images reach the model through :mod:`pneumo.core.io` and :mod:`pneumo.core.preprocess`, the same path as
inference; augmentation is applied only to training samples, between ``to_unit_array`` and
``normalize``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from pneumo.core import preprocess
from pneumo.core.errors import DataError, InvalidImageError
from pneumo.core.io import IMAGE_EXTENSIONS, read_image
from pneumo.core.preprocess import PreprocessConfig
from pneumo.modeling.augment import build_augment
from pneumo.modeling.config import AugmentConfig

logger = logging.getLogger(__name__)

#: Label names per label mode; a sample's ``label`` indexes into these.
LABEL_MODES: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "3class": ("NORMAL", "BACTERIA", "VIRUS"),
}
#: Class folders of the Kaggle layout.
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
#: Files read as images (by extension; the content is checked later by :mod:`pneumo.core.io`).
SPLITS = ("train", "val", "test")
BALANCE_MODES = ("weighted_loss", "sampler", "none")

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
        if split is None and (folder / "train").is_dir():
            hint = " It looks like a Kaggle root: pass split='train' (or 'val', 'test')."
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


class XrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples decoded and preprocessed exactly as at inference, with optional augmentation.

    Args:
        samples: the images to serve.
        preprocess_config: input size and normalization (the bundle's).
        augment: applied to the (1, S, S) [0, 1] tensor before normalization; ``None`` for none.
        label_mode: the labels' mode, to check every label is in range.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocess_config: PreprocessConfig,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        label_mode: str = "binary",
    ) -> None:
        self.samples = list(samples)
        self.config = preprocess_config
        self.augment = augment
        self.label_names = label_names(label_mode)
        bad = [s for s in self.samples if not 0 <= s.label < len(self.label_names)]
        if bad:
            raise DataError(
                f"{bad[0].path} has label {bad[0].label}, outside label_mode {label_mode!r} "
                f"({len(self.label_names)} classes); discover() the samples with the same label_mode.",
                code="label_out_of_range",
            )

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        size = self.config.input_size
        try:
            image = read_image(sample.path, draft_size=size).image
        except InvalidImageError as err:
            raise type(err)(f"{sample.path}: {err.message}", code=err.code) from err
        pixels = preprocess.to_unit_array(preprocess.resize(image, size))
        if self.augment is not None:  # torchvision augments tensors; normalize is the Predictor's (NumPy)
            pixels = self.augment(torch.from_numpy(pixels)).numpy()
        return torch.from_numpy(preprocess.normalize(pixels, self.config)), sample.label


def _counts(samples: Sequence[Sample], n_classes: int) -> list[int]:
    counts = Counter(s.label for s in samples)
    return [counts.get(c, 0) for c in range(n_classes)]


def class_weights(samples: Sequence[Sample], n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights for a weighted loss, scaled to mean 1 (so the loss scale stays put)."""
    counts = _counts(samples, n_classes)
    if min(counts) == 0:
        raise DataError(f"Class counts are {counts}: every class needs a training image.", code="empty_class")
    inverse = 1.0 / torch.tensor(counts, dtype=torch.float32)
    return inverse / inverse.mean()


def balanced_sampler(samples: Sequence[Sample], seed: int | None = None) -> WeightedRandomSampler:
    """A sampler drawing each class equally often (with replacement), one epoch = ``len(samples)`` draws."""
    counts = Counter(s.label for s in samples)
    weights = [1.0 / counts[s.label] for s in samples]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True, generator=generator)


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


class XrayDataModule(L.LightningDataModule):
    """Owns the data of a training run: discovery, the patient-level split, transforms and loaders.

    Args:
        root: a Kaggle root (``train/`` with optional ``val/`` and ``test/``) or a folder
            holding ``NORMAL/`` and ``PNEUMONIA/``.
        preprocess_config: the model's input size and normalization.
        label_mode: ``"binary"`` or ``"3class"``.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of the images (whole patients) carved out for validation when
            ``val/`` is missing or too small.
        seed: seed of the split (and of the balanced sampler).
        augment: training augmentation; ``None`` means the defaults of :class:`AugmentConfig`,
            ``AugmentConfig(enabled=False)`` turns it off. Never applied to val or test.
        balance: ``"weighted_loss"`` (expose :attr:`class_weights`), ``"sampler"`` (draw classes
            equally often) or ``"none"``.
        min_val_images: the least number of images for ``val/`` to be used as it is.
    """

    def __init__(
        self,
        root: Path | str,
        preprocess_config: PreprocessConfig,
        label_mode: str = "binary",
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        balance: str = "weighted_loss",
        min_val_images: int = 100,
    ) -> None:
        super().__init__()
        if balance not in BALANCE_MODES:
            raise DataError(f"Unknown balance {balance!r}; use one of {', '.join(BALANCE_MODES)}.", code="bad_balance")
        self.root = Path(root)
        self.preprocess_config = preprocess_config
        self.label_mode = label_mode
        self.label_names = label_names(label_mode)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment_config = augment if augment is not None else AugmentConfig()
        self.balance = balance
        self.min_val_images = min_val_images
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.class_weights: torch.Tensor | None = None
        self.split_description = ""
        self.train_dataset: XrayDataset | None = None
        self.val_dataset: XrayDataset | None = None
        self.test_dataset: XrayDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Discover and split once; build the test set only when asked for and ``root/test`` exists."""
        if self.train_dataset is None:
            self.train_samples, self.val_samples, self.split_description = train_val_samples(
                self.root, self.label_mode, self.val_fraction, self.seed, self.min_val_images
            )
            n_classes = len(self.label_names)
            if self.balance == "weighted_loss":
                self.class_weights = class_weights(self.train_samples, n_classes)
            augment = build_augment(self.augment_config, self.preprocess_config.input_size)
            self.train_dataset = XrayDataset(self.train_samples, self.preprocess_config, augment, self.label_mode)
            self.val_dataset = XrayDataset(self.val_samples, self.preprocess_config, None, self.label_mode)
        if stage in (None, "test") and self.test_dataset is None and (self.root / "test").is_dir():
            self.test_samples = discover(self.root, "test", self.label_mode)
            self.test_dataset = XrayDataset(self.test_samples, self.preprocess_config, None, self.label_mode)

    def summary(self) -> dict[str, Any]:
        """What the model was trained and validated on, for the bundle."""
        return {
            "root": str(self.root),
            "split": self.split_description,
            "train": dataset_summary(self.train_samples, self.label_mode),
            "val": dataset_summary(self.val_samples, self.label_mode),
            "augment": self.augment_config.to_dict(),
            "balance": self.balance,
        }

    def _loader(self, dataset: XrayDataset | None, name: str, **kwargs: Any) -> DataLoader[Any]:
        if dataset is None:
            if name == "test":
                raise DataError(f"{self.root / 'test'} does not exist: there is no test split.", code="no_test_split")
            raise DataError(f"Call setup() before asking for the {name} loader.", code="not_set_up")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        n = len(self.train_samples)
        # Dropping a ragged last batch keeps BatchNorm from ever seeing a batch of one image.
        options: dict[str, Any] = {"drop_last": n > self.batch_size}
        if self.balance == "sampler":
            options["sampler"] = balanced_sampler(self.train_samples, self.seed)
        else:
            options["shuffle"] = True
        return self._loader(self.train_dataset, "train", **options)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_dataset, "val")

    def test_dataloader(self) -> DataLoader[Any]:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, "test")
