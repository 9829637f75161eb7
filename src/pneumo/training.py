"""Transfer-learning training (Lightning): the study's recipe, ending in a model bundle.

Phase 1 trains the new head on a frozen ImageNet backbone; phase 2 unfreezes the last
``unfreeze_stages`` stages at a lower learning rate (:class:`StagedUnfreeze`). The best epoch
by validation ROC AUC is kept; its temperature, decision threshold and OOD statistics are fitted
on the validation split (carved by patient), and everything is written as a bundle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

from pneumo.data import AugmentConfig, XrayDataModule, balanced_sampler, build_augment, dataset_summary, label_names
from pneumo.errors import PneumoError
from pneumo.models import count_parameters, create_model, freeze_backbone, get_spec, stage_modules

log = logging.getLogger(__name__)

OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax, "adamw": torch.optim.AdamW}


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in the bundle and loadable from YAML."""

    data: str = ""
    out: str = "runs/run"
    arch: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    label_mode: str = "binary"
    frozen_epochs: int = 2
    finetune_epochs: int = 4
    unfreeze_stages: int = 2
    batch_size: int = 32
    optimizer: str = "adam"
    # Pooled EfficientNet-Lite0 features have sum |x| ~ 270, so one Adam step of lr moves a logit by
    # up to ~270 * lr: 3e-4 converges within the frozen phase without oscillating.
    lr: float = 3e-4
    finetune_lr: float = 1e-4
    weight_decay: float = 1e-5
    scheduler: str = "cosine"
    patience: int = 2
    label_smoothing: float = 0.1
    balance: str = "weighted_loss"
    # Plausible for AP chest films: small rotations, zoom and shifts, exposure changes; no flips
    # (a mirrored chest puts the heart on the wrong side, which the test population never shows).
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(rotation_deg=10, zoom=0.15, shift=0.1, hflip=0.0, brightness=0.2,
                                              contrast=0.2)
    )  # fmt: skip
    val_fraction: float = 0.15
    seed: int = 0
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.95
    # Mixup (Zhang et al., 2018) on the network's input, which is the cached activations on a CPU:
    # the mixing coefficient is drawn from Beta(mixup, mixup); 0 turns it off.
    mixup: float = 0.0
    # Score the finished bundle on the robustness validation (pneumo.robustness), into run.json.
    robustness: bool = True
    feature_cache: bool = True
    cache_views: int = 1
    cache_dir: str | None = None
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    name: str = ""

    @property
    def epochs(self) -> int:
        return self.frozen_epochs + self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PneumoError(
                f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}.", code="bad_config"
            )
        data = dict(data)
        if isinstance(data.get("augment"), dict):
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


class StagedUnfreeze(Callback):
    """At epoch ``at_epoch``, make the last ``stages`` backbone stages trainable (phase 2).

    Their parameters sit in the optimizer from the start, in a group with the fine-tuning
    learning rate; while frozen they have no gradient, so Adam leaves them untouched.
    """

    def __init__(self, model: nn.Module, at_epoch: int, stages: int) -> None:
        self.model, self.at_epoch, self.stages = model, at_epoch, stages

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.at_epoch and self.stages > 0:
            freeze_backbone(self.model, self.stages)
            log.info("Epoch %d: unfroze the last %d stages", self.at_epoch, self.stages)


class _EarlyStoppingAfter(EarlyStopping):
    """Early stopping that only starts counting once fine-tuning has begun."""

    def __init__(self, start_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_epoch = start_epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_validation_end(trainer, pl_module)


class XrayClassifier(L.LightningModule):
    """The training system: it is handed the network to run (a whole model or a cached-feature suffix)."""

    def __init__(
        self,
        net: nn.Module,
        head: list[nn.Parameter],
        body: list[nn.Parameter],
        config: TrainConfig,
        n_classes: int,
        positive: list[int],
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net, self.config, self.positive = net.to(memory_format=torch.channels_last), config, positive
        self._groups = [{"params": head, "lr": config.lr}, {"params": body, "lr": config.finetune_lr}]
        self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=config.label_smoothing)
        self.val_auc = BinaryAUROC()
        self.val_acc = MulticlassAccuracy(num_classes=n_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # channels_last halves the cost of depthwise convolutions on CPU (measured)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        # Every BatchNorm stays in inference mode, also once its stage is unfrozen: its scale and
        # shift train, its running statistics stay ImageNet's. Keras' fine-tuning guide advises this
        # for small datasets (batch statistics of 32 X-rays are noisy), and Lightning restores
        # module modes after each validation, so setting it here holds for the whole run.
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

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
        optimizer = OPTIMIZERS[cfg.optimizer](self._groups, weight_decay=cfg.weight_decay)
        if cfg.scheduler == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        if cfg.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.3, patience=1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_auc"}}
        return optimizer


def _validate(config: TrainConfig) -> None:
    if config.optimizer not in OPTIMIZERS:
        raise PneumoError(f"Unknown optimizer {config.optimizer!r}; use {', '.join(OPTIMIZERS)}.", code="bad_config")
    if config.scheduler not in ("cosine", "plateau", "none"):
        raise PneumoError(f"Unknown scheduler {config.scheduler!r}; use cosine, plateau or none.", code="bad_config")
    if config.epochs < 1:
        raise PneumoError("Train for at least one epoch (frozen_epochs + finetune_epochs >= 1).", code="bad_config")
    if not config.data:
        raise PneumoError("No training data: pass --data DATA_ROOT.", code="bad_config")
    if config.mixup < 0:
        raise PneumoError(f"mixup must be >= 0 (the Beta parameter; 0 = off), got {config.mixup}.", code="bad_config")


def fit(config: TrainConfig) -> Path | None:
    """Train according to ``config`` and write the bundle into ``config.out``; returns its folder.

    In a multi-process (DDP) run only global rank 0 writes the bundle (others return None).
    """
    from pneumo.reporting import finish_run

    _validate(config)
    L.seed_everything(config.seed, workers=True)
    spec = get_spec(config.arch)
    n_classes = len(label_names(config.label_mode))
    model = create_model(config.arch, n_classes, pretrained=config.pretrained, weights=config.weights)
    stages = stage_modules(model)
    # The cache splits at the same depth whether or not phase 2 runs, so a head-only run reuses
    # the cached features of a fine-tuning run (and vice versa).
    split_depth = min(config.unfreeze_stages, len(stages) - 1)
    unfreeze = split_depth if config.finetune_epochs > 0 else 0
    freeze_backbone(model, 0)  # phase 1: head only
    head = [p for p in model.parameters() if p.requires_grad]
    freeze_backbone(model, unfreeze)
    body = [p for p in model.parameters() if p.requires_grad and all(p is not h for h in head)]
    freeze_backbone(model, 0)

    dm = XrayDataModule(
        config.data, spec.preprocess, config.label_mode, config.batch_size, config.num_workers,
        config.val_fraction, config.seed, config.augment, config.balance,
    )  # fmt: skip
    dm.setup("fit")
    positive = [i for i, name in enumerate(label_names(config.label_mode)) if name != "NORMAL"]
    started = time.perf_counter()
    net, train_loader, val_loader, feature_fn = _loaders(model, dm, config, spec.preprocess, split_depth)
    cache_seconds = time.perf_counter() - started

    system = XrayClassifier(net, head, body, config, n_classes, positive, dm.class_weights)
    out = Path(config.out)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="val_auc", mode="max", save_weights_only=True, filename="best"
    )
    callbacks: list[Callback] = [
        checkpoint,
        StagedUnfreeze(model, config.frozen_epochs, unfreeze),
        _EarlyStoppingAfter(config.frozen_epochs, monitor="val_auc", mode="max", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
    ]
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
        num_sanity_val_steps=0,
    )
    trainer.fit(system, train_dataloaders=train_loader, val_dataloaders=val_loader)
    fit_seconds = time.perf_counter() - started - cache_seconds
    if not trainer.is_global_zero:
        return None
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        system.load_state_dict(state)
    model.cpu().eval()
    record = {
        "config": config.to_dict(),
        "split": dm.split_description,
        "train_data": dataset_summary(dm.train_samples, config.label_mode),
        "val_data": dataset_summary(dm.val_samples, config.label_mode),
        "epochs_run": trainer.current_epoch,  # after fit: the number of completed epochs (early stop included)
        "best_epoch": _best_epoch(out),
        "trainable_parameters_phase2": sum(p.numel() for p in head + body),
        "parameters": count_parameters(model),
        "cache_seconds": round(cache_seconds, 1),
        "fit_seconds": round(fit_seconds, 1),
    }
    return finish_run(model, spec, config, dm, feature_fn, record)


def _best_epoch(out: Path) -> int | None:
    metrics = out / "logs" / "metrics.csv"
    if not metrics.is_file():
        return None
    import csv

    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val_auc")]
    return int(max(rows, key=lambda r: float(r["val_auc"]))["epoch"]) if rows else None


def _loaders(
    model: nn.Module, dm: XrayDataModule, config: TrainConfig, preprocess: Any, split_depth: int
) -> tuple[nn.Module, DataLoader[Any], DataLoader[Any], Any]:
    """The network Lightning trains, its loaders, and a function giving (logits, features) for samples."""
    if not config.feature_cache:
        feature_fn = _image_features(model, dm, preprocess)
        return model, dm.train_dataloader(), dm.val_dataloader(), feature_fn

    from pneumo.feature_cache import CachedViews, build_views, split_model

    prefix, suffix = split_model(model, split_depth)
    augment = build_augment(config.augment, preprocess.input_size) if config.augment.enabled else None
    n_aug = config.cache_views if augment is not None else 0
    key = {"arch": config.arch, "weights": config.weights, "pretrained": config.pretrained, "unfreeze": split_depth,
           "size": preprocess.input_size}  # fmt: skip
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    common: dict[str, Any] = {"seed": config.seed, "batch_size": config.batch_size, "cache_dir": cache_dir,
                              "progress": log.info, "key_parts": key, "label_mode": config.label_mode}  # fmt: skip
    train_views = build_views(prefix, dm.train_samples, preprocess, augment, n_aug, **common)
    val_views = build_views(prefix, dm.val_samples, preprocess, None, 0, **common)
    train_labels = [s.label for s in dm.train_samples]
    train = CachedViews(train_views, train_labels, random_view=True)
    val = CachedViews(val_views, [s.label for s in dm.val_samples], random_view=False)
    sampler = balanced_sampler(dm.train_samples, config.seed) if config.balance == "sampler" else None
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler)
    val_loader = DataLoader(val, batch_size=config.batch_size * 2)

    @torch.inference_mode()
    def cached_features(split: str) -> tuple[np.ndarray, np.ndarray]:
        views = train_views[0] if split == "train" else val_views[0]
        suffix.eval()
        feats = torch.cat([suffix.features(chunk.float()) for chunk in views.split(64)])
        return model.get_classifier()(feats).numpy(), feats.numpy()  # type: ignore[operator]

    return suffix, train_loader, val_loader, cached_features


def _image_features(model: nn.Module, dm: XrayDataModule, preprocess: Any) -> Any:
    @torch.inference_mode()
    def feature_fn(split: str) -> tuple[np.ndarray, np.ndarray]:
        from pneumo.data import XrayDataset

        samples = dm.train_samples if split == "train" else dm.val_samples
        loader = DataLoader(XrayDataset(samples, preprocess, label_mode=dm.label_mode), batch_size=64)
        net: Any = model.eval()
        logits, feats = [], []
        for images, _ in loader:
            f = net.forward_head(net.forward_features(images), pre_logits=True)
            feats.append(f)
            logits.append(net.get_classifier()(f))
        return torch.cat(logits).numpy(), torch.cat(feats).numpy()

    return feature_fn
