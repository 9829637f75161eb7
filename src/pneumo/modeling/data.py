"""Training data for Lightning: the Dataset and the DataModule (augmentation is :mod:`pneumo.modeling.augment`).

Images reach the model through :mod:`pneumo.core.decode` and :mod:`pneumo.core.preprocess`, the same path as
inference; augmentation is applied only to training samples, between ``to_unit_array`` and
``normalize``. Finding the images, their labels and the patient-level split is
:mod:`pneumo.core.dataset` (no torch).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from pneumo.core import preprocess
from pneumo.core.dataset import Sample, _counts, dataset_summary, discover, label_names, train_val_samples
from pneumo.core.decode import read_image
from pneumo.core.errors import DataError, InvalidImageError
from pneumo.core.preprocess import PreprocessConfig, Preprocessor
from pneumo.modeling.augment import RandomReframe, build_augment
from pneumo.modeling.config import AugmentConfig

logger = logging.getLogger(__name__)

BALANCE_MODES = ("weighted_loss", "sampler", "none")


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
        reframe: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.config = preprocess_config
        self.preprocessor = Preprocessor(preprocess_config)  # training frames with the localizer shipped in pneumo
        self.augment = augment
        self.reframe = reframe
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
        if self.reframe is not None:  # a framed bundle's framing augmentation: before the lungs are located
            image = self.reframe(image)
        crop, _ = self.preprocessor.frame(image)
        pixels = preprocess.to_unit_array(preprocess.resize(crop, size))
        if self.augment is not None:  # torchvision augments tensors; normalize is the Predictor's (NumPy)
            pixels = self.augment(torch.from_numpy(pixels)).numpy()
        return torch.from_numpy(preprocess.normalize(pixels, self.config)), sample.label


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
            framed = self.preprocess_config.framed
            augment = build_augment(self.augment_config, self.preprocess_config.input_size, framed=framed)
            reframe = RandomReframe(self.augment_config) if framed and self.augment_config.enabled else None
            self.train_dataset = XrayDataset(
                self.train_samples, self.preprocess_config, augment, self.label_mode, reframe=reframe
            )
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
