"""Staged unfreezing as Lightning designed it: a ``BaseFinetuning`` callback, and early stopping after it.

Phase 1 trains the head on a frozen backbone; at ``at_epoch`` the last stages join the optimizer
as a new parameter group with the fine-tuning learning rate (``unfreeze_and_add_param_group``).
``train_bn=False`` throughout: no BatchNorm layer trains, neither its scale and shift nor its
running statistics, which keep their ImageNet values (Keras' fine-tuning guide advises this for
small datasets: batch statistics of 32 X-rays are noisy).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping
from torch import nn
from torch.optim import Optimizer

log = logging.getLogger(__name__)


class StagedFinetuning(BaseFinetuning):
    """Freeze ``frozen`` and ``unfrozen`` before training; at epoch ``at_epoch`` unfreeze ``unfrozen`` at ``lr``.

    Args:
        frozen: modules that never train (the backbone's first stages).
        unfrozen: modules that train from ``at_epoch`` on (the last stages); empty for a head-only run.
        at_epoch: first epoch of phase 2 (the number of frozen epochs).
        lr: learning rate of their parameter group.
    """

    def __init__(self, frozen: list[nn.Module], unfrozen: list[nn.Module], at_epoch: int, lr: float) -> None:
        super().__init__()
        self.frozen, self.unfrozen, self.at_epoch, self.lr = frozen, unfrozen, at_epoch, lr

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(self.frozen + self.unfrozen, train_bn=False)

    def finetune_function(self, pl_module: L.LightningModule, current_epoch: int, optimizer: Optimizer) -> None:
        if current_epoch != self.at_epoch or not self.unfrozen:
            return
        self.unfreeze_and_add_param_group(self.unfrozen, optimizer, lr=self.lr, train_bn=False)
        # unfreeze_and_add_param_group leaves BatchNorm parameters requiring gradients (just outside the
        # optimizer) and their statistics tracked; freezing them again is what train_bn=False means here.
        self.freeze([m for m in self.unfrozen if isinstance(m, nn.modules.batchnorm._BatchNorm)], train_bn=False)
        _schedule_new_group(pl_module.trainer, self.lr)
        log.info("Epoch %d: unfroze %d modules of the last stages at lr %g", current_epoch, len(self.unfrozen), self.lr)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # Lightning's freeze stops a frozen BatchNorm from *updating* its statistics, but in training mode
        # it still normalizes with the batch's; eval mode makes every BatchNorm use the ImageNet statistics,
        # as at inference. Lightning sets the module back to training mode after each validation, hence
        # every epoch.
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _schedule_new_group(trainer: L.Trainer, lr: float) -> None:
    """Let the LR schedulers created before phase 2 drive the parameter group it added."""
    for config in trainer.lr_scheduler_configs:
        scheduler: Any = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(lr)
        if hasattr(scheduler, "min_lrs"):
            scheduler.min_lrs.append(scheduler.min_lrs[-1])
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr.append(lr)


class EarlyStoppingAfter(EarlyStopping):
    """Early stopping that only starts counting once fine-tuning has begun (epoch ``start_epoch``)."""

    def __init__(self, start_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_epoch = start_epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_validation_end(trainer, pl_module)
