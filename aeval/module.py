"""The LightningModule: STU-Net trained the nnU-Net way (Dice+CE with deep supervision, SGD Nesterov,
poly learning rate), validated with per-organ Dice in the FLARE22 training space.

On the CPU the network and its inputs use the ``channels_last_3d`` memory format (oneDNN's fast layout for
3-D convolutions; a training step of STU-Net tiny measured 1.2-1.8x faster than contiguous); on GPUs the
layout is left as nnU-Net trains (contiguous)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from aeval.labels import FLARE22_ORGANS
from aeval.models.pretrained import load_pretrained
from aeval.models.stunet import build_stunet

OPTIMIZERS = ("sgd", "adamw")  # sgd: the recipe (Nesterov, poly); adamw: the CPU demo


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's weights: 1, 1/2, 1/4, ... with the lowest resolution switched off, normalised to sum 1."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def poly_factor(epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly decay: the learning rate of (0-based) ``epoch`` is ``lr * (1 - epoch/max_epochs)^exponent``;
    epochs past the end keep the last epoch's value (never zero or negative)."""
    max_epochs = max(1, int(max_epochs))
    return (1 - min(max(int(epoch), 0), max_epochs - 1) / max_epochs) ** exponent


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """Poly learning rate as a closed form of the epoch, like nnU-Net's ``PolyLRScheduler``: the rate never
    depends on the history of steps, and restoring a checkpoint re-applies the rate of the restored epoch.
    ``max_epochs`` comes from the configuration, not the checkpoint, so a run resumed with more epochs
    follows the new schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_epochs: int, exponent: float = 0.9,
                 last_epoch: int = -1) -> None:
        self.max_epochs, self.exponent = int(max_epochs), float(exponent)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        factor = poly_factor(self.last_epoch, self.max_epochs, self.exponent)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in ("max_epochs", "exponent")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("max_epochs", "exponent")})
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


def organ_dice_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, num_classes - 1)`` voxel counts per foreground class: intersection, predicted, true.
    Summed over validation batches (and processes) they give each organ's Dice over all its voxels."""
    classes = torch.arange(1, num_classes, device=prediction.device).view(-1, *([1] * prediction.dim()))
    pred_1h, target_1h = prediction.unsqueeze(0) == classes, target.unsqueeze(0) == classes
    dims = tuple(range(1, prediction.dim() + 1))
    return torch.stack([(pred_1h & target_1h).sum(dims), pred_1h.sum(dims), target_1h.sum(dims)])


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Per-class Dice ``2|P∩G| / (|P| + |G|)`` from :func:`organ_dice_counts`; NaN where the organ is absent
    from the ground truth (partially labelled sets and small patches miss organs; those are not scored)."""
    inter, pred, true = counts.double()
    return torch.where(true > 0, 2 * inter / (pred + true).clamp_min(1), torch.nan)


class STUNetModule(L.LightningModule):
    """Wraps :class:`~aeval.models.stunet.STUNet`; everything needed to rebuild the network and its
    preprocessing (model settings, plan) and the run's key (protocol, training sets, model) is saved in
    the checkpoint's hyper-parameters, so a checkpoint alone can be evaluated."""

    def __init__(self, model: dict[str, Any], plan: dict[str, Any], optim: dict[str, Any] | None = None,
                 max_epochs: int = 1000, label_space: str = "flare22", run_key: dict[str, str] | None = None,
                 channels_last: bool | str = "auto") -> None:
        super().__init__()
        self.save_hyperparameters()
        optim = {"lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5, "nesterov": True, "poly_exponent": 0.9,
                 **(optim or {})}
        self.optim = optim
        pools = model.get("pool_op_kernel_sizes") or plan.get("pool_op_kernel_sizes")
        self.net = build_stunet(model["size"], model.get("in_channels", 1), model.get("num_classes", 14),
                                pool_op_kernel_sizes=pools, deep_supervision=True)
        if model.get("pretrained"):
            load_pretrained(self.net, model["pretrained"])
        self.num_classes = self.net.num_classes
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                               smooth_nr=1e-5, smooth_dr=1e-5)
        self.ds_weights = deep_supervision_weights(len(self.net.pool_op_kernel_sizes))
        self.class_names = list(FLARE22_ORGANS)[: self.num_classes - 1]
        self._val_counts = torch.zeros(3, self.num_classes - 1, dtype=torch.float64)
        self._channels_last = False

    def setup(self, stage: str) -> None:
        """Pick the memory format once the device is known (before optimisers and DDP see the weights)."""
        choice = self.hparams.channels_last
        on_cpu = self._trainer is None or self.trainer.strategy.root_device.type == "cpu"
        self._channels_last = bool(on_cpu if choice == "auto" else choice)
        if self._channels_last:  # 1x1x1 kernels stay as they are: their two layouts differ only in strides
            for layer in self.net.modules():
                if isinstance(layer, nn.Conv3d) and max(layer.kernel_size) > 1:
                    layer.to(memory_format=torch.channels_last_3d)

    def _input(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch["image"]
        return image.contiguous(memory_format=torch.channels_last_3d) if self._channels_last else image

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.net(x)

    def compute_loss(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Weighted Dice+CE over the deep-supervision outputs (targets full resolution first)."""
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, logits, target in zip(self.ds_weights, outputs, targets, strict=False):
            if weight:
                total = total + weight * self.loss(logits.float(), target)
        return total

    def _switched_off_heads(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Zero times the outputs of weight-0 heads: keeps those heads in the graph with a zero gradient, as
        DDP requires every parameter to be used (nnU-Net gives them a 1e-6 weight for the same reason)."""
        unused = [o.float().sum() for w, o in zip(self.ds_weights, outputs, strict=False) if not w]
        return 0 * torch.stack(unused).sum() if unused else outputs[0].new_zeros((), dtype=torch.float32)

    def _targets(self, batch: dict[str, Any], outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if "targets_ds" in batch:
            return list(batch["targets_ds"])
        target = batch["target"].float()
        return [target if o.shape[2:] == target.shape[2:] else
                nn.functional.interpolate(target, size=o.shape[2:], mode="nearest-exact") for o in outputs]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self.net(self._input(batch))
        loss = self.compute_loss(outputs, self._targets(batch, outputs)) + self._switched_off_heads(outputs)
        # decided together by all processes, so that every DDP rank stops instead of one hanging
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            raise NonFiniteLossError(
                f"loss became {loss.item()} (on this or another process) at epoch {self.current_epoch} "
                f"(0-based), step {self.global_step}, batch {batch_idx} of cases {batch.get('case')}; "
                "training stopped, checkpoints/last.ckpt still holds the last completed epoch")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["image"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_counts = torch.zeros(3, self.num_classes - 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self.net(self._input(batch))
        loss = self.compute_loss(outputs, self._targets(batch, outputs))
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
        prediction = outputs[0].argmax(1)
        target = batch["target"][:, 0].long()
        self._val_counts += organ_dice_counts(prediction, target, self.num_classes).to(self._val_counts)
        if batch_idx == 0:
            self._log_overlay(batch["image"][0, 0], target[0], prediction[0])

    def on_validation_epoch_end(self) -> None:
        counts = self.all_gather(self._val_counts)
        if counts.dim() == 3:  # gathered from several processes
            counts = counts.sum(0)
        dice = dice_from_counts(counts)
        present = ~torch.isnan(dice)
        # every process holds the same gathered counts; sync_dist only averages equal values
        for name, value in zip(self.class_names, dice, strict=True):
            if not torch.isnan(value):
                self.log(f"val/dice_{name}", value.float(), sync_dist=True)
        mean = dice[present].mean() if present.any() else torch.zeros((), dtype=dice.dtype, device=dice.device)
        self.log("val/dice_mean", mean.float(), prog_bar=True, sync_dist=True)

    def _log_overlay(self, image: torch.Tensor, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """A mid-slice picture (image | ground truth | prediction) for loggers that take images (W&B)."""
        log_image = getattr(self.logger, "log_image", None)
        if log_image is None or self.trainer.sanity_checking:
            return
        z = int((target > 0).sum((0, 1)).argmax()) if target.any() else target.shape[-1] // 2
        picture = overlay_panels(image[..., z].float().cpu().numpy(), target[..., z].cpu().numpy(),
                                 prediction[..., z].cpu().numpy())
        log_image(key="val/overlay", images=[picture], caption=[f"epoch {self.current_epoch}, z={z}"],
                  step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        name = o.get("name", "sgd")
        if name not in OPTIMIZERS:
            raise ValueError(f"optim.name: unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
        if name == "adamw":  # not the paper's recipe: learns in hundreds of steps (CPU demo)
            optimizer = torch.optim.AdamW(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=o["lr"], momentum=o["momentum"],
                                        nesterov=o["nesterov"], weight_decay=o["weight_decay"])
        scheduler = PolyLR(optimizer, self.hparams.max_epochs, o["poly_exponent"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


_PALETTE = np.array([[0, 0, 0], [220, 60, 60], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                     [0, 128, 128], [220, 190, 255], [170, 110, 40]], dtype=np.float32) / 255


def overlay_panels(image: np.ndarray, target: np.ndarray, prediction: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Three RGB panels side by side: the slice, the slice with labels, the slice with the prediction."""
    lo, hi = np.percentile(image, (1, 99)) if image.size else (0, 1)
    gray = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, -1)

    def tint(labels: np.ndarray) -> np.ndarray:
        colours = _PALETTE[np.clip(labels, 0, len(_PALETTE) - 1)]
        mask = (labels > 0)[..., None]
        return np.where(mask, (1 - alpha) * gray + alpha * colours, gray)

    panels = [gray, tint(target), tint(prediction)]
    return (np.concatenate([np.rot90(p) for p in panels], axis=1) * 255).astype(np.uint8)
