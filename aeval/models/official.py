"""Official STU-Net checkpoints with their nnU-Net plans: the network, the plan dict, the label names.

nnU-Net v2: ``fold_N/checkpoint_final.pth`` (weights under ``network_weights``) with ``plans.json`` and
``dataset.json`` of the model folder. nnU-Net v1: ``*.model`` (weights under ``state_dict``) with its
``*.model.pkl`` (found beside the checkpoint when no plan is given) or the dataset's ``plans.pkl``.
The STU-Net size is read from the weights (stage widths and blocks per stage); a ``size`` given by the user
must agree. v1 networks averaged softmax probabilities (not logits) over windows and flips and exported
the resampled probabilities; :class:`SoftmaxOutput` makes the predictor do the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aeval.data.nnunet_plans import DEFAULT_CONFIGURATION, REORIENT_MODES, is_nnunet_plan, read_nnunet_plan
from aeval.errors import CaseError
from aeval.models.pretrained import DEFAULT_PREFIXES, load_pretrained, read_checkpoint
from aeval.models.stunet import STUNET_SIZES, build_stunet

log = logging.getLogger(__name__)
FIRST_CONV = "conv_blocks_context.0.0.conv1.weight"


class SoftmaxOutput(nn.Module):
    """Wraps a network so that it returns softmax probabilities (nnU-Net v1 averaged those, not logits)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def deep_supervision(self) -> bool:
        return self.net.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.net.deep_supervision = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.softmax(out if isinstance(out, torch.Tensor) else out[0], dim=1)


def _weights(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    weights = {}
    if isinstance(checkpoint, Mapping):
        weights = checkpoint.get("network_weights") or checkpoint.get("state_dict") or checkpoint
    out = {}
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        for prefix in DEFAULT_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    if FIRST_CONV not in out or "seg_outputs.0.weight" not in out:
        raise CaseError(path, "not an STU-Net checkpoint (no conv_blocks_context.0.0.conv1 / seg_outputs.0 weights)")
    return out


def stunet_size(weights: Mapping[str, torch.Tensor], path: Path, requested: str | None = None) -> str:
    """The STU-Net size whose stage-0 width and blocks per stage the weights have."""
    width = int(weights[FIRST_CONV].shape[0])
    blocks = len({k.split(".")[2] for k in weights if k.startswith("conv_blocks_context.0.")})
    found = [name for name, (dims, depth) in STUNET_SIZES.items() if dims[0] == width and depth[0] == blocks]
    if not found:
        raise CaseError(path, f"no STU-Net size has stage-0 width {width} and {blocks} block(s) per stage")
    if requested is not None and requested not in found:
        raise CaseError(path, f"size={requested} does not fit the weights (they are STU-Net {found[0]})")
    return found[0]


def default_plan_path(ckpt_path: Path) -> Path | None:
    """v1: ``model_final_checkpoint.model.pkl`` beside the ``.model``; v2: ``plans.json`` of the model folder."""
    for candidate in (ckpt_path.with_name(ckpt_path.name + ".pkl"), ckpt_path.parent.parent / "plans.json",
                      ckpt_path.parent / "plans.json"):
        if candidate.is_file() and is_nnunet_plan(candidate):
            return candidate
    return None


def load_official(ckpt_path: str | Path, plan: Mapping[str, Any] | str | Path | None = None, *,
                  configuration: str | None = None, size: str | None = None, dataset_json: str | Path | None = None,
                  reorient: str = "none") -> tuple[nn.Module, dict[str, Any]]:
    """An official STU-Net checkpoint and its nnU-Net plan -> (network ready for the predictor, plan dict).

    The plan dict records ``convention: nnunet``, the reorientation mode and the size; errors are
    :class:`CaseError` lines naming the file."""
    ckpt_path = Path(ckpt_path)
    if reorient not in REORIENT_MODES:
        raise CaseError(ckpt_path, f"reorient must be one of {', '.join(REORIENT_MODES)}, got {reorient!r}")
    checkpoint = read_checkpoint(ckpt_path)
    weights = _weights(checkpoint, ckpt_path)
    if plan is None:
        plan = default_plan_path(ckpt_path)
        if plan is None:
            raise CaseError(ckpt_path, "not an aeval checkpoint; an official checkpoint needs plan=<nnU-Net plans.json "
                            "| plans.pkl | *.model.pkl> (or an aeval plans.json and size=<s|b|l|h>)")
    plan_dict = read_nnunet_plan(plan, configuration=configuration or DEFAULT_CONFIGURATION,
                                 dataset_json=dataset_json, checkpoint=checkpoint if isinstance(checkpoint, Mapping)
                                 else None)
    size = stunet_size(weights, ckpt_path, size)
    in_channels, num_classes = int(weights[FIRST_CONV].shape[1]), int(weights["seg_outputs.0.weight"].shape[0])
    if in_channels != len(plan_dict["normalization"]):
        raise CaseError(ckpt_path, f"the weights take {in_channels} input channel(s), the plan normalises "
                        f"{len(plan_dict['normalization'])}")
    labels = plan_dict["labels"]
    if labels and len(labels) != num_classes:
        raise CaseError(ckpt_path, f"the weights predict {num_classes} classes, the dataset.json names {len(labels)}")
    mirror = checkpoint.get("inference_allowed_mirroring_axes") if isinstance(checkpoint, Mapping) else None
    trainer = checkpoint.get("trainer_name") if isinstance(checkpoint, Mapping) else None
    del checkpoint, weights  # load_pretrained reads the file again: keep one copy alive, not two
    try:
        net = build_stunet(size, in_channels, num_classes, pool_op_kernel_sizes=plan_dict["pool_op_kernel_sizes"])
    except ValueError as err:
        raise CaseError(ckpt_path, str(err)) from None
    load_pretrained(net, ckpt_path, for_training=False)
    plan_dict.update(reorient=reorient, size=size, num_classes=num_classes, trainer_name=trainer,
                     inference_allowed_mirroring_axes=list(mirror) if mirror is not None else None)
    log.info("%s: STU-Net %s, nnU-Net v%d plan %s (%s), patch %s, spacing %s", ckpt_path, size,
             plan_dict["nnunet_version"], plan_dict["source"], plan_dict["configuration"], plan_dict["patch_size"],
             plan_dict["spacing"])
    return (SoftmaxOutput(net) if plan_dict["average"] == "probabilities" else net), plan_dict
