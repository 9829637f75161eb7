"""Transfer-learning training (Lightning): the study's recipe, ending in a model bundle.

Phase 1 trains the new head on a frozen ImageNet backbone; phase 2 unfreezes the last
``unfreeze_stages`` stages at a lower learning rate (:class:`~pneumo.modeling.finetuning.StagedFinetuning`,
Lightning's ``BaseFinetuning``). Lightning gets the data as a DataModule: the images
(:class:`~pneumo.modeling.data.XrayDataModule`) or, on a CPU, their cached frozen-prefix outputs
(:class:`~pneumo.modeling.feature_cache.CachedViewsDataModule`). The best epoch by validation ROC AUC
is kept; its temperature, decision threshold and OOD statistics are fitted on the validation split
(carved by patient), and everything is written as a bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

from pneumo.core import progress as bars
from pneumo.core.bundle import BundleMeta, ThresholdRule
from pneumo.core.dataset import dataset_summary, label_names
from pneumo.core.errors import PneumoError
from pneumo.core.framing import FramingConfig
from pneumo.evaluation.compare import read_metrics_csv
from pneumo.modeling.config import TrainConfig
from pneumo.modeling.data import XrayDataModule, XrayDataset
from pneumo.modeling.feature_cache import CachedViewsDataModule, split_model
from pneumo.modeling.finetuning import EarlyStoppingAfter, StagedFinetuning
from pneumo.modeling.models import (
    count_parameters,
    create_model,
    get_spec,
    logits_and_features,
    stage_modules,
    stage_split,
)

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax, "adamw": torch.optim.AdamW}


class XrayClassifier(L.LightningModule):
    """The training system: it is handed the network to run (a whole model or a cached-feature suffix).

    Args:
        net: what ``forward`` runs.
        head: the modules trained from the first epoch (the optimizer starts with them only;
            :class:`StagedFinetuning` adds the unfrozen stages later).
        config: the run's settings (optimizer, learning rates, schedule, label smoothing).
        n_classes: outputs of the head.
        positive: indices of the labels that mean pneumonia (``BundleMeta.positive_indices``).
    """

    def __init__(
        self, net: nn.Module, head: list[nn.Module], config: TrainConfig, n_classes: int, positive: list[int]
    ) -> None:
        super().__init__()
        self.net, self.config, self.positive = net.to(memory_format=torch.channels_last), config, positive
        self._head_params = [p for module in head for p in module.parameters()]
        self.loss = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.val_auc = BinaryAUROC()
        self.val_acc = MulticlassAccuracy(num_classes=n_classes, average="micro")

    def setup(self, stage: str) -> None:
        # The class weights come from the DataModule's training split, known once Lightning set it up.
        weights = getattr(getattr(self.trainer, "datamodule", None), "class_weights", None)
        self.loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=self.config.label_smoothing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # channels_last halves the cost of depthwise convolutions on CPU (measured)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.config.mixup > 0:
            lam = float(np.random.default_rng().beta(self.config.mixup, self.config.mixup))
            perm = torch.randperm(len(y), device=y.device)
            logits = self(lam * x + (1.0 - lam) * x[perm])
            loss = lam * self.loss(logits, y) + (1.0 - lam) * self.loss(logits, y[perm])
        else:
            loss = self.loss(self(x), y)
        # sync_dist: under DDP the epoch mean covers every rank's batches, not rank 0's alone (one reduce per epoch).
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        p_pneumonia = logits.softmax(1)[:, self.positive].sum(1)
        is_pneumonia = torch.isin(y, torch.tensor(self.positive, device=y.device)).long()
        self.val_auc.update(p_pneumonia, is_pneumonia)
        self.val_acc.update(logits, y)
        self.log("val_loss", self.loss(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val_auc", self.val_auc.compute(), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc.compute(), sync_dist=True)
        self.val_auc.reset()
        self.val_acc.reset()

    def configure_optimizers(self) -> Any:
        cfg = self.config
        optimizer = OPTIMIZERS[cfg.optimizer](self._head_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.scheduler == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        if cfg.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.3, patience=1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_auc"}}
        return optimizer


class EpochTimer(Callback):
    """Logs each epoch's wall seconds (training and validation) as ``epoch_seconds``: where a recipe's time goes."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so it is counted.
        pl_module.log("epoch_seconds", time.perf_counter() - self._started, sync_dist=True)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel; True if it was set.

    glibc serves every block over its mmap threshold (32 MB at most) with a fresh ``mmap`` and unmaps
    it when freed. A training step allocates and frees hundreds of MB of such activations, so every
    step faults them in again, page by page: measured on the 2-core machine (EfficientNet-Lite1, 240 px,
    batch 32, full fine-tuning; ``benchmarks/train_allocator.py``), 1.1 million page faults and 2.1 s of
    kernel time in a 3.1 s step; with ``mmap`` off and no trimming, 27,000 faults and 1.9 s (head only:
    1.10 -> 0.51 s). jemalloc with its defaults was slower (4.3 s). The process keeps its peak memory
    until it exits, so ``pneumo train`` calls this (a training process), not :func:`fit` (a library
    call inside someone else's process). A no-op on other C libraries and systems.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _validate(config: TrainConfig) -> None:
    if config.optimizer not in OPTIMIZERS:
        raise PneumoError(f"Unknown optimizer {config.optimizer!r}; use {', '.join(OPTIMIZERS)}.", code="bad_config")
    if config.scheduler not in ("cosine", "plateau", "none"):
        raise PneumoError(f"Unknown scheduler {config.scheduler!r}; use cosine, plateau or none.", code="bad_config")
    if config.epochs < 1:
        raise PneumoError("Train for at least one epoch (frozen_epochs + finetune_epochs >= 1).", code="bad_config")
    if not config.data:
        raise PneumoError("No training data: pass --data DATA_ROOT.", code="bad_config")
    if config.threshold_rule not in set(ThresholdRule):
        known = ", ".join(ThresholdRule)
        raise PneumoError(f"Unknown threshold rule {config.threshold_rule!r}; use {known}.", code="bad_config")
    if config.threshold_rule == ThresholdRule.ROBUST and not config.robustness:
        raise PneumoError("threshold_rule 'robust' needs the robustness validation (robustness: true).",
                          code="bad_config")  # fmt: skip
    if config.calibration not in ("platt", "temperature"):
        raise PneumoError(f"Unknown calibration {config.calibration!r}; use platt or temperature.", code="bad_config")
    if config.framing not in ("none", "lungbox-v1"):
        raise PneumoError(f"Unknown framing {config.framing!r}; use none or lungbox-v1.", code="bad_config")
    if config.mixup < 0:
        raise PneumoError(f"mixup must be >= 0 (the Beta parameter; 0 = off), got {config.mixup}.", code="bad_config")


def fit(config: TrainConfig) -> Path | None:
    """Train according to ``config`` and write the bundle into ``config.out``; returns its folder.

    In a multi-process (DDP) run only global rank 0 writes the bundle (others return None).
    """
    from pneumo.modeling.finalize import finalize  # it imports the export and quantization stack

    _validate(config)
    started = time.perf_counter()
    L.seed_everything(config.seed if config.train_seed is None else config.train_seed, workers=True)
    spec = get_spec(config.arch)
    labels = list(label_names(config.label_mode))
    framing = FramingConfig(method="lungbox-v1" if config.framing == "lungbox-v1" else "none")
    preprocess_config = dataclasses.replace(spec.preprocess, framing=framing)
    meta = BundleMeta(
        arch=config.arch,
        timm_name=spec.timm_name,
        labels=labels,
        positive_labels=[name for name in labels if name != "NORMAL"],
        preprocess=preprocess_config,
        name=config.name or f"pneumo-{config.arch}",
    )
    model = create_model(config.arch, len(labels), pretrained=config.pretrained, weights=config.weights)
    # The cache splits at the same depth whether or not phase 2 runs, so a head-only run reuses
    # the cached features of a fine-tuning run (and vice versa).
    split_depth = min(config.unfreeze_stages, len(stage_modules(model)) - 1)
    frozen, unfrozen, head = stage_split(model, config.unfreeze_stages if config.finetune_epochs > 0 else 0)
    images = XrayDataModule(
        config.data, preprocess_config, config.label_mode, config.batch_size, config.num_workers,
        config.val_fraction, config.seed, config.augment, config.balance,
    )  # fmt: skip
    net: nn.Module = model
    dm: L.LightningDataModule = images
    if config.feature_cache:
        prefix, net = split_model(model, split_depth)
        key = {"arch": config.arch, "weights": config.weights, "pretrained": config.pretrained,
               "unfreeze": split_depth, "size": spec.preprocess.input_size, "framing": config.framing}  # fmt: skip
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        dm = CachedViewsDataModule(images, prefix, config.cache_views, key, cache_dir=cache_dir, progress=log.info)

    system = XrayClassifier(net, head, config, len(labels), meta.positive_indices)
    out = Path(config.out)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val_auc", mode="max", save_weights_only=True, filename="best"
    )
    callbacks: list[Callback] = [
        checkpoint,
        StagedFinetuning(frozen, unfrozen, at_epoch=config.frozen_epochs, lr=config.finetune_lr),
        EarlyStoppingAfter(config.frozen_epochs, monitor="val_auc", mode="max", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
        EpochTimer(),
    ]
    if bars.enabled():  # Lightning's own bar, on stderr like every other bar (its default writes to stdout)
        callbacks.append(RichProgressBar(console_kwargs={"stderr": True}))
    precision: Any = config.precision  # Lightning types it as a Literal; the CLI passes a plain string
    trainer = L.Trainer(
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=precision,
        callbacks=callbacks,
        logger=CSVLogger(out, name="logs", version=""),
        log_every_n_steps=10,
        enable_model_summary=False,
        enable_progress_bar=bars.enabled(),
        num_sanity_val_steps=0,
    )
    fit_started = time.perf_counter()
    trainer.fit(system, datamodule=dm)
    cache_seconds = getattr(dm, "build_seconds", 0.0)
    fit_seconds = time.perf_counter() - fit_started - cache_seconds
    if not trainer.is_global_zero:
        return None
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        system.load_state_dict(state)
    model.cpu().eval()
    record = {
        "config": config.to_dict(),
        "split": images.split_description,
        "train_data": dataset_summary(images.train_samples, config.label_mode),
        "val_data": dataset_summary(images.val_samples, config.label_mode),
        "epochs_run": trainer.current_epoch,  # after fit: the number of completed epochs (early stop included)
        **_epoch_record(out),
        "trainable_parameters_phase2": sum(p.numel() for m in head + unfrozen for p in m.parameters()),
        "parameters": count_parameters(model),
        "cache_seconds": round(cache_seconds, 1),
        "fit_seconds": round(fit_seconds, 1),
    }
    if isinstance(dm, CachedViewsDataModule):
        suffix: Any = net
        feature_fn = lambda split: dm.logits_and_features(suffix, split)  # noqa: E731
    else:
        feature_fn = _image_features(model, images)
    return finalize(model, meta, config, images.val_samples, images.split_description, feature_fn, record,
                    started=started, train_samples=images.train_samples)  # fmt: skip


def _epoch_record(out: Path) -> dict[str, Any]:
    """``best_epoch`` (highest validation AUC) and ``epoch_seconds`` from the run's metrics.csv, read once."""
    series = read_metrics_csv(out / "logs" / "metrics.csv")
    aucs = series.get("val_auc", [])
    return {
        "best_epoch": max(aucs, key=lambda pair: pair[1])[0] if aucs else None,
        "epoch_seconds": [round(seconds, 2) for _, seconds in series.get("epoch_seconds", [])],
    }


def _image_features(model: nn.Module, dm: XrayDataModule) -> Any:
    @torch.inference_mode()
    def feature_fn(split: str) -> tuple[np.ndarray, np.ndarray]:
        samples = dm.train_samples if split == "train" else dm.val_samples
        loader = DataLoader(XrayDataset(samples, dm.preprocess_config, label_mode=dm.label_mode), batch_size=64)
        model.eval()
        batches = bars.track(loader, f"features of the {split} images", total=len(loader))
        logits, feats = zip(*(logits_and_features(model, images) for images, _ in batches), strict=True)
        return torch.cat(logits).numpy(), torch.cat(feats).numpy()

    return feature_fn
