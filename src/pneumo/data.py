"""Dataset discovery, labels, patient-level splits, augmentation, Dataset and DataModule.

The Kermany chest X-ray data come as ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. The
file names carry the patient (``person12_bacteria_45.jpeg``, ``IM-0117-0001.jpeg``) and several
patients have more than one film, some of them exact duplicates, so a validation split made by
image would let the model be validated on patients it trained on. :func:`patient_split` splits
by patient, stratified by class, and :func:`train_val_samples` uses it whenever the official
``val/`` folder is too small to be useful (the Kaggle release ships only 16 images there).

Images reach the model through :mod:`pneumo.io` and :mod:`pneumo.preprocess`, the same path as
inference; augmentation is applied only to training samples, between ``to_unit_tensor`` and
``normalize``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from pneumo import preprocess
from pneumo.errors import DataError, InvalidImageError
from pneumo.io import read_image
from pneumo.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

#: Label names per label mode; a sample's ``label`` indexes into these.
LABEL_MODES: dict[str, tuple[str, ...]] = {
    "binary": ("NORMAL", "PNEUMONIA"),
    "3class": ("NORMAL", "BACTERIA", "VIRUS"),
}
#: Class folders of the Kaggle layout.
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
#: Files read as images (by extension; the content is checked later by :mod:`pneumo.io`).
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".dcm"})
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


@dataclass
class AugmentConfig:
    """Training-time augmentation, after the seed's Keras ImageDataGenerator settings, plus framing.

    ``zoom`` and ``shift`` are fractions (scale in ``[1 - zoom, 1 + zoom]``, translation up to
    ``shift`` of the side); ``hflip`` is a probability; ``brightness``/``contrast`` are the
    ColorJitter factors. ``enabled=False`` turns all of it off.

    The framing fields break the shortcut "a tightly framed film is pneumonia" (see
    :mod:`pneumo.robustness`): ``crop_scale`` > 0 takes a random crop of at least that share of
    the area, with an aspect ratio up to ``aspect`` (or its inverse), and squashes it back to the
    input size, as the dataset squashed its films; ``pad`` > 0 adds black margins of up to that
    fraction of each side, half of the time. The photometric fields imitate other machines:
    ``gamma`` (exponent in ``[1 - gamma, 1 + gamma]``), ``blur`` (max Gaussian sigma, pixels),
    ``noise`` (max Gaussian std, unit intensities) and ``text`` (probability of burned-in text).
    All default to off, so older configurations mean what they meant.
    """

    rotation_deg: float = 10.0
    zoom: float = 0.1
    shift: float = 0.08
    hflip: float = 0.5
    brightness: float = 0.15
    contrast: float = 0.15
    crop_scale: float = 0.0
    aspect: float = 1.0
    pad: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    text: float = 0.0
    enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        return cls(**data)


class _Augment:
    """Random augmentation of a (1, H, W) tensor in [0, 1]; a class (not a lambda) so workers can pickle it."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.transform = transform

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        # Clone first: torchvision returns its input unchanged when no transform fires, and the
        # caller must be free to keep (or cache) the tensor it passed in.
        out = tensor.clone()
        return self.transform(out) if self.transform is not None else out

    def __repr__(self) -> str:
        return f"_Augment({self.transform!r})"


class _RandomGamma:
    """``x ** g`` with ``g`` uniform in ``[1 - amount, 1 + amount]`` (torchvision has no random gamma)."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        g = 1.0 + (2.0 * float(torch.rand(())) - 1.0) * self.amount
        return tensor.clamp(0.0, 1.0) ** g

    def __repr__(self) -> str:
        return f"_RandomGamma({self.amount})"


class _RandomNoise:
    """Additive Gaussian noise of a random std up to ``sigma``, clipped to [0, 1]."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        std = float(torch.rand(())) * self.sigma
        return (tensor + torch.randn_like(tensor) * std).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"_RandomNoise({self.sigma})"


class _RandomText:
    """Burned-in text (side markers, dates) in a random corner with probability ``p``.

    Drawn with Pillow on the 8-bit image because torchvision draws no text; the words and
    placement come from torch's generator, so a seeded run is reproducible.
    """

    _WORDS = ("R", "L", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "2016-11-02", "09:15", "DX", "CHEST")

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if float(torch.rand(())) >= self.p:
            return tensor
        from PIL import Image, ImageDraw, ImageFont

        _, h, w = tensor.shape
        image = Image.fromarray((tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy(), mode="L")
        draw = ImageDraw.Draw(image)
        n_words = 1 + int(torch.randint(3, ()))
        words = " ".join(self._WORDS[int(torch.randint(len(self._WORDS), ()))] for _ in range(n_words))
        font = ImageFont.load_default(size=max(8, round(h * (0.035 + 0.04 * float(torch.rand(()))))))
        left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
        margin = round(0.03 * min(w, h))
        x = margin if float(torch.rand(())) < 0.5 else max(margin, w - (right - left) - margin)
        y = margin if float(torch.rand(())) < 0.5 else max(margin, h - (bottom - top) - margin)
        draw.text((x, y), words, fill=200 + int(torch.randint(56, ())), font=font)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)

    def __repr__(self) -> str:
        return f"_RandomText({self.p})"


def build_augment(cfg: AugmentConfig, size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random transform for (1, H, W) tensors in [0, 1] that returns a new tensor of the same size.

    Geometric changes fill with black, the background of a radiograph. When ``cfg.enabled`` is
    false (or every strength is zero) the transform returns a copy of its input. ``size`` is the
    output side for the framing steps (the input's side when ``None``).
    """
    from torchvision.transforms import v2

    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if cfg.enabled:
        if cfg.pad > 0:
            steps.append(v2.RandomApply([v2.RandomZoomOut(fill=0.0, side_range=(1.0, 1.0 + 2 * cfg.pad))], p=0.5))
        if cfg.crop_scale > 0 or cfg.pad > 0:
            if size is None:
                raise DataError("build_augment needs the input size for crop/pad augmentation.", code="bad_config")
            scale = (cfg.crop_scale, 1.0) if cfg.crop_scale > 0 else (1.0, 1.0)
            ratio = (1.0 / cfg.aspect, cfg.aspect) if cfg.aspect > 1 else (1.0, 1.0)
            steps.append(v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True))
        if cfg.rotation_deg or cfg.zoom or cfg.shift:
            steps.append(
                v2.RandomAffine(
                    degrees=cfg.rotation_deg,
                    translate=(cfg.shift, cfg.shift) if cfg.shift else None,
                    scale=(1.0 - cfg.zoom, 1.0 + cfg.zoom) if cfg.zoom else None,
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill=0.0,
                )
            )
        if cfg.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.brightness or cfg.contrast:
            steps.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None))
        if cfg.gamma > 0:
            steps.append(_RandomGamma(cfg.gamma))
        if cfg.blur > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, cfg.blur))], p=0.3))
        if cfg.noise > 0:
            steps.append(v2.RandomApply([_RandomNoise(cfg.noise)], p=0.3))
        if cfg.text > 0:
            steps.append(_RandomText(cfg.text))
    return _Augment(v2.Compose(steps) if steps else None)


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
        tensor = preprocess.to_unit_tensor(preprocess.resize(image, size))
        if self.augment is not None:
            tensor = self.augment(tensor)
        return preprocess.normalize(tensor, self.config), sample.label


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
