"""A checkpoint -> a network ready for inference, with the plan that preprocesses its inputs.

Three kinds of checkpoint load: our Lightning checkpoints (plan, network settings and run key inside),
official STU-Net checkpoints with their nnU-Net plan (predicted in nnU-Net's array convention), and official
weights with an aeval plan and a size (predicted in aeval's convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aeval.data.nnunet_plans import is_nnunet_plan
from aeval.errors import CaseError
from aeval.labels import get_system, match_system
from aeval.models.checks import check_finite, check_fits
from aeval.models.official import load_official
from aeval.models.pretrained import load_pretrained, read_checkpoint
from aeval.models.stunet import build_stunet
from aeval.plan import Plan


@dataclass
class LoadedModel:
    """A network ready for inference, the plan that preprocesses its inputs, the label system of its
    output, and the run key recorded at training time (empty for official checkpoints). The plan is an aeval
    :class:`~aeval.plan.Plan`, or for an official checkpoint in nnU-Net's convention the nnU-Net plan as
    :mod:`aeval.data.nnunet_plans` reads it."""

    net: nn.Module
    plan: Plan | dict[str, Any]
    label_system: str
    run_key: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.plan, Plan) and "convention" not in self.plan:  # an aeval plans.json mapping
            self.plan = Plan.from_dict(self.plan)

    @property
    def convention(self) -> str:
        """``aeval`` (RAS, nibabel order, aeval's crop) or ``nnunet`` (official checkpoints: nnU-Net's order)."""
        return "aeval" if isinstance(self.plan, Plan) else str(self.plan.get("convention", "nnunet"))

    @property
    def patch_size(self) -> list[int]:
        patch = self.plan.patch_size if isinstance(self.plan, Plan) else self.plan["patch_size"]
        return [int(n) for n in patch]


def load_model(ckpt_path: str | Path, *, plan: Plan | Mapping[str, Any] | str | Path | None = None,
               size: str | None = None, label_system: str | None = None, configuration: str | None = None,
               reorient: str | None = None) -> LoadedModel:
    """The network of a checkpoint with the plan that preprocesses its inputs.

    Args:
        ckpt_path: our Lightning checkpoint (self-describing), or an official STU-Net ``.model`` / ``.pth``.
        plan: for an official checkpoint, its nnU-Net plan (``plans.json`` v2, ``plans.pkl`` / ``*.model.pkl``
            v1; found beside the checkpoint when not given: nnU-Net's convention), or an aeval ``plans.json``
            (aeval's convention, with ``size``).
        size: the STU-Net size of an official checkpoint used with an aeval plan.
        label_system: the label system of the network's output, where the checkpoint does not say.
        configuration: the nnU-Net configuration of a v2 plan (default ``3d_fullres``).
        reorient: ``none`` or ``ras``: how an official model's inputs were oriented at training time.

    Raises:
        CaseError: naming the checkpoint or plan file that cannot be used.
    """
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, Mapping) and "plan" in hparams and "state_dict" in checkpoint:
        return _aeval_checkpoint(ckpt_path, checkpoint, hparams, label_system)
    if plan is None or (not isinstance(plan, Plan) and is_nnunet_plan(plan)):
        del checkpoint
        net, nnunet_plan = load_official(ckpt_path, plan, configuration=configuration, size=size,
                                         reorient=reorient or "none")
        check_finite(net.state_dict(), ckpt_path)
        return LoadedModel(net, nnunet_plan, _official_system(label_system, nnunet_plan, ckpt_path))
    if size is None:
        raise CaseError(ckpt_path, "not an aeval checkpoint; an official STU-Net checkpoint with an aeval plan "
                        "needs size=<s|b|l|h>")
    return _official_with_aeval_plan(ckpt_path, checkpoint, _read_plan(plan), size, label_system)


def _aeval_checkpoint(ckpt_path: Path, checkpoint: Mapping[str, Any], hparams: Mapping[str, Any],
                      label_system: str | None) -> LoadedModel:
    """Our Lightning checkpoint: the network settings, plan, label space and run key travel inside."""
    model_cfg, plan = hparams["model"], Plan.from_dict(hparams["plan"], ckpt_path)
    pools = model_cfg.get("pool_op_kernel_sizes") or plan.pool_op_kernel_sizes
    net = build_stunet(model_cfg["size"], model_cfg.get("in_channels", 1), model_cfg.get("num_classes", 14),
                       pool_op_kernel_sizes=pools)
    weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    check_fits(net.state_dict(), weights, ckpt_path)
    check_finite(weights, ckpt_path)
    net.load_state_dict(weights)
    system = label_system or hparams.get("label_space") or "flare22"
    run_key = {k: str(v) for k, v in (hparams.get("run_key") or {}).items()}
    return LoadedModel(net, plan, known_system(system, ckpt_path), run_key)


def _read_plan(plan: Plan | Mapping[str, Any] | str | Path) -> Plan:
    return Plan.from_dict(plan, "plan") if isinstance(plan, Plan | Mapping) else Plan.read(plan)


def _official_with_aeval_plan(ckpt_path: Path, checkpoint: Any, plan: Plan, size: str,
                              label_system: str | None) -> LoadedModel:
    """Official weights predicted in aeval's convention (an aeval plan): the class count comes from the head."""
    weights = {}
    if isinstance(checkpoint, dict):
        weights = checkpoint.get("network_weights") or checkpoint.get("state_dict") or checkpoint
    heads = [v for k, v in weights.items()
             if isinstance(k, str) and k.endswith("seg_outputs.0.weight") and isinstance(v, torch.Tensor)]
    if not heads:
        raise CaseError(ckpt_path, "no STU-Net segmentation head (seg_outputs.0.weight) in the checkpoint")
    num_classes = int(heads[0].shape[0])
    del checkpoint, weights, heads  # load_pretrained reads the file again: keep one copy alive, not two
    try:
        net = build_stunet(size, 1, num_classes, pool_op_kernel_sizes=plan.pool_op_kernel_sizes)
    except ValueError as err:
        raise CaseError(ckpt_path, str(err)) from None
    load_pretrained(net, ckpt_path)
    check_finite(net.state_dict(), ckpt_path)
    return LoadedModel(net, plan, known_system(label_system or "totalseg_104_alpha", ckpt_path))


def _official_system(requested: str | None, plan: Mapping[str, Any], source: Path) -> str:
    """The label system of an official model: the user's, else the known system its dataset.json labels
    are, else TotalSegmentator's alphabetical 104 classes (STU-Net's release) when the class count fits."""
    if requested:
        return known_system(requested, source)
    labels = plan.get("labels") or {}
    matched = match_system(labels) if plan.get("nnunet_version") == 2 else None
    if matched:
        return matched
    if plan["num_classes"] == get_system("totalseg_104_alpha").max_id + 1:
        return "totalseg_104_alpha"
    raise CaseError(source, f"cannot tell the label system of these {plan['num_classes']} classes; set "
                    "model_labels=<system>")


def known_system(name: str, source: str | Path) -> str:
    """``name`` when it is a label system aeval knows, else a CaseError naming ``source``."""
    try:
        get_system(name)
    except KeyError as err:
        raise CaseError(source, err.args[0]) from None
    return name


