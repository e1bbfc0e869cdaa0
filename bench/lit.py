"""The LightningModule: a timm ResNet with attention blocks, trained by cross-entropy.

Everything comes from the resolved config (a plain nested dict):

- ``model``: ``name`` (a ``modules.build_backbone`` name); every other key is passed to
  ``build_backbone`` (``cifar_stem``, ``stride_in_1x1``, ``drop_path_rate``, ...);
- ``attention.placements``: the list given to ``modules.inject``;
- ``optim``: ``_target_`` (the optimizer class), ``name`` (its label) and its keyword
  arguments;
- ``schedule``: given to ``bench.schedules.build_scheduler``, stepped every optimizer step;
- ``loss.label_smoothing``;
- ``trainer.channels_last`` and ``trainer.compile``.

Weight decay skips norms, biases (every parameter with fewer than two dimensions) and the
parameters a block lists in its ``no_weight_decay()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from bench.config import optimizer_spec
from bench.schedules import build_scheduler
from modules import build_backbone, inject


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that some submodule marks with ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        marked = getattr(module, "no_weight_decay", None)
        if callable(marked):
            names |= {f"{prefix}.{local}" if prefix else local for local in marked()}
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: ``decay`` and ``no_decay`` (norms, biases, marked parameters).

    Shared parameters appear once (``named_parameters`` deduplicates); frozen ones are left
    out.
    """
    marked = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or name in marked
        (no_decay if skip else decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_model(model_cfg: Mapping[str, Any], placements: list, num_classes: int):
    """The backbone with its attention placements; returns ``(model, injection summary)``."""
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    model = build_backbone(model_cfg["name"], num_classes=num_classes, **options)
    summary = inject(model, list(placements))
    return model, summary


class LitClassifier(pl.LightningModule):
    """Image classifier built from the resolved run config (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any], num_classes: int):
        super().__init__()
        # The config is logged by bench.train in a dashboard-friendly shape.
        self.save_hyperparameters(logger=False)
        self.model, self.attention_summary = build_model(
            config["model"], config["attention"]["placements"], num_classes
        )
        self._compiled = False
        # FLOPs of one training step on this device, for Lightning's ThroughputMonitor
        # (bench.train sets it from bench.profile's count); None: no FLOPs metrics.
        self.flops_per_batch: int | None = None
        self.channels_last = bool(config["trainer"].get("channels_last", False))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        smoothing = config.get("loss", {}).get("label_smoothing", 0.0)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        if self.hparams.config["trainer"].get("compile", False) and not self._compiled:
            # In place, so parameter names (and checkpoints) stay those of the eager model;
            # here rather than in __init__ so profiling the built model stays eager.
            self.model.compile()
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss(self.criterion(logits, y), weight=len(y))
        self.val_acc(logits, y)
        self.val_acc5(logits, y)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/acc5", self.val_acc5, on_epoch=True)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer over the model's parameter groups (no schedule)."""
        cls, options = optimizer_spec(self.hparams.config["optim"])
        groups = param_groups(self.model, options.pop("weight_decay", 0.0))
        return cls(groups, **options)

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        # estimated_stepping_batches sets up the train loader, which num_training_batches
        # needs; both already account for limit_train_batches and the number of devices.
        _ = self.trainer.estimated_stepping_batches
        steps_per_epoch = math.ceil(
            self.trainer.num_training_batches / self.trainer.accumulate_grad_batches
        )
        scheduler = build_scheduler(
            optimizer,
            self.hparams.config["schedule"],
            steps_per_epoch=steps_per_epoch,
            max_epochs=self.trainer.max_epochs,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
