"""Cache the frozen part of a backbone so fine-tuning the last stages is affordable on a CPU.

When only the last stages of a backbone are trained, the frozen stages compute the same thing
every epoch. On a 2-core CPU they are ~75% of EfficientNet-Lite0's cost, so we run them once per
image and *view*: view 0 is the plain image, views 1..K are random augmentations (offline
augmentation, as in Keras' ``flow_from_directory`` with a fixed number of passes). Each training
epoch then picks one view per image at random and trains the last stages on the cached tensors.

Lightning and timm have no such cache (they assume a GPU), hence this small module. A model is
split into a frozen ``prefix`` and a trainable ``suffix``; the two compose to exactly the
model's ``forward`` (tested), so the trained weights are saved and used like any other model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.models.efficientnet import EfficientNet
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pneumo.core import progress as bars
from pneumo.core.dataset import Sample
from pneumo.core.errors import PneumoError
from pneumo.core.preprocess import PreprocessConfig
from pneumo.modeling.data import XrayDataModule, XrayDataset, balanced_sampler, build_augment
from pneumo.modeling.models import logits_and_features

log = logging.getLogger(__name__)


class _Pooled(nn.Module):
    """Whole backbone up to the pooled features (the prefix of a fully frozen model)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_and_features(self.model, x)[1]


class Suffix(nn.Module):
    """The trainable end of a model: ``features`` gives pooled features, ``forward`` the logits."""

    def __init__(self, model: Any, first_block: int | None) -> None:
        super().__init__()
        self.model = model
        self.first_block = first_block  # None: the input is already pooled features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_block is None:
            return x
        for block in self.model.blocks[self.first_block :]:
            x = block(x)
        x = self.model.bn2(self.model.conv_head(x))
        return self.model.forward_head(x, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(self.features(x))


def split_model(model: nn.Module, trainable_stages: int) -> tuple[nn.Module, Suffix]:
    """Split ``model`` into a frozen prefix and a suffix holding its last ``trainable_stages`` stages.

    Stages are those of :func:`pneumo.modeling.models.stage_modules`. Any timm model splits at the pooled
    features (``trainable_stages=0``); EfficientNets split between any two blocks.

    Raises:
        PneumoError: the split is not supported for this architecture.
    """
    if trainable_stages == 0:
        return _Pooled(model), Suffix(model, None)
    if isinstance(model, EfficientNet) and trainable_stages <= len(model.blocks):
        first = len(model.blocks) - trainable_stages
        prefix = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:first])
        return prefix, Suffix(model, first)
    raise PneumoError(
        f"The feature cache can fine-tune {trainable_stages} stages of EfficientNet models only, not of "
        f"{type(model).__name__}; train it without the cache (--feature-cache false) or with --unfreeze-stages 0.",
        code="feature_cache_unsupported",
    )


class CachedViews(Dataset[tuple[torch.Tensor, int]]):
    """Cached prefix outputs; each access returns a random view (training) or view 0 (validation)."""

    def __init__(self, views: torch.Tensor, labels: Sequence[int], random_view: bool) -> None:
        self.views = views  # (V, N, C, H, W) float16
        self.labels = list(labels)
        self.random_view = random_view and views.shape[0] > 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = int(torch.randint(self.views.shape[0], ()).item()) if self.random_view else 0
        return self.views[view, index].float(), self.labels[index]


def _cache_key(parts: dict[str, Any], samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for sample in samples:  # the views depend on the images only, so runs with other label modes share them
        digest.update(f"{sample.path}\n".encode())
    return digest.hexdigest()[:20]


@torch.inference_mode()
def build_views(
    prefix: nn.Module,
    samples: Sequence[Sample],
    config: PreprocessConfig,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    n_augmented: int,
    *,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: Path | None = None,
    key_parts: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    label_mode: str = "binary",
) -> torch.Tensor:
    """Run ``prefix`` over every sample once plain and ``n_augmented`` times augmented.

    Returns a float16 tensor (1 + n_augmented, N, ...). With ``cache_dir`` each view is stored as
    safetensors under a key of ``key_parts``, the sample list and (for augmented views) the
    augmentation, and reused by later runs: a run without augmentation reuses the plain view of
    a run with it.
    """
    prefix.eval().to(memory_format=torch.channels_last)
    views = []
    for view in range(1 + n_augmented):
        parts = {**(key_parts or {}), "view": view, "seed": seed, "augment": repr(augment) if view else None}
        path = Path(cache_dir) / f"view-{_cache_key(parts, samples)}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            views.append(load_file(str(path))["view"])
            continue
        torch.manual_seed(seed * 1000 + view)  # each augmented view is reproducible
        dataset = XrayDataset(list(samples), config, augment if view > 0 else None, label_mode)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        chunks = []
        kind = "augmented" if view else "plain"
        with bars.task(f"caching features, view {view + 1}/{1 + n_augmented} ({kind})", len(samples)) as advance:
            for step, (images, _) in enumerate(loader):
                # channels_last: ~1.8x faster depthwise convolutions on CPU (measured on EfficientNet-Lite0).
                chunks.append(prefix(images.contiguous(memory_format=torch.channels_last)).to(torch.float16))
                advance(len(images))
                if progress is not None and step % 20 == 19:
                    progress(f"view {view + 1}/{1 + n_augmented}: {(step + 1) * batch_size}/{len(samples)} images")
        views.append(torch.cat(chunks).contiguous())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"view": views[-1].contiguous()}, str(path))
        if progress is not None:
            progress(f"cached view {view + 1}/{1 + n_augmented} of {len(samples)} images")
    return torch.stack(views)


class CachedViewsDataModule(L.LightningDataModule):
    """The images' DataModule seen through a frozen prefix: Lightning trains the suffix on cached views.

    ``setup`` sets the images up (discovery, patient split), then runs the prefix once over every
    training image plain and ``n_augmented`` times augmented, and over every validation image
    plain (:func:`build_views`); the loaders serve those tensors. Everything else (samples,
    labels, class weights, split) is the images' DataModule's.

    Args:
        images: the run's image DataModule (its augmentation makes the augmented views).
        prefix: the frozen part of the model (:func:`split_model`).
        n_augmented: augmented views cached per training image (0 when augmentation is off).
        key_parts: what the cached prefix outputs depend on besides the samples (architecture, weights, ...).
        cache_dir: keep views on disk here and reuse them across runs.
        progress: called with progress messages.
    """

    def __init__(
        self,
        images: XrayDataModule,
        prefix: nn.Module,
        n_augmented: int,
        key_parts: dict[str, Any],
        *,
        cache_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.images, self.prefix, self.n_augmented = images, prefix, n_augmented
        self.key_parts, self.cache_dir, self.progress = key_parts, cache_dir, progress
        self.train_views: torch.Tensor | None = None
        self.val_views: torch.Tensor | None = None
        self.build_seconds = 0.0

    @property
    def class_weights(self) -> torch.Tensor | None:
        return self.images.class_weights

    def setup(self, stage: str | None = None) -> None:
        if self.train_views is not None:
            return
        started = time.perf_counter()
        images = self.images
        images.setup("fit")
        augment = (
            build_augment(
                images.augment_config, images.preprocess_config.input_size, framed=images.preprocess_config.framed
            )
            if images.augment_config.enabled
            else None
        )
        common: dict[str, Any] = {"seed": images.seed, "batch_size": images.batch_size, "cache_dir": self.cache_dir,
                                  "progress": self.progress, "key_parts": self.key_parts,
                                  "label_mode": images.label_mode}  # fmt: skip
        n_augmented = self.n_augmented if augment is not None else 0
        config = images.preprocess_config
        self.train_views = build_views(self.prefix, images.train_samples, config, augment, n_augmented, **common)
        self.val_views = build_views(self.prefix, images.val_samples, config, None, 0, **common)
        self.build_seconds = time.perf_counter() - started

    def _views(self, split: str) -> tuple[torch.Tensor, list[int]]:
        if self.train_views is None or self.val_views is None:
            raise PneumoError("Call setup() before asking for cached views.", code="not_set_up")
        if split == "train":
            return self.train_views, [s.label for s in self.images.train_samples]
        return self.val_views, [s.label for s in self.images.val_samples]

    def train_dataloader(self) -> DataLoader[Any]:
        views, labels = self._views("train")
        images = self.images
        sampler = balanced_sampler(images.train_samples, images.seed) if images.balance == "sampler" else None
        dataset = CachedViews(views, labels, random_view=True)
        return DataLoader(dataset, batch_size=images.batch_size, shuffle=sampler is None, sampler=sampler)

    def val_dataloader(self) -> DataLoader[Any]:
        views, labels = self._views("val")
        return DataLoader(CachedViews(views, labels, random_view=False), batch_size=self.images.batch_size * 2)

    @torch.inference_mode()
    def logits_and_features(self, suffix: Suffix, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features of the plain view of ``split``'s images through the trained ``suffix``."""
        views, _ = self._views(split)
        suffix.eval()
        features = torch.cat([suffix.features(chunk.float()) for chunk in views[0].split(64)])
        classifier: Any = suffix.model.get_classifier()
        return classifier(features).numpy(), features.numpy()
