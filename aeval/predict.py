"""``python -m aeval.predict``: segment NIfTI files with a checkpoint, written in each input's original geometry.

Takes our Lightning checkpoints (the plan and network settings travel inside) and official STU-Net
checkpoints (``.model`` / ``.pth``) together with a ``plans.json`` and a model size.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from torch import nn

from aeval.console import console
from aeval.data.preprocess import preprocess_image, restore_to_original
from aeval.inference import SlidingWindowPredictor
from aeval.labels import remap
from aeval.models.pretrained import load_pretrained, read_checkpoint
from aeval.models.stunet import build_stunet
from aeval.nifti import CaseError, FailureLog, load_nifti, save_nifti


@dataclass
class LoadedModel:
    """A network ready for inference with the plan that preprocesses its inputs."""

    net: nn.Module
    plan: dict[str, Any]
    label_system: str


def load_model(ckpt_path: str | Path, *, plan: dict[str, Any] | str | Path | None = None, size: str | None = None,
               label_system: str | None = None) -> LoadedModel:
    """Our Lightning checkpoint (self-describing), or an official STU-Net one with ``plan`` and ``size``."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if hparams and "plan" in hparams and "state_dict" in checkpoint:
        model_cfg, run_plan = hparams["model"], hparams["plan"]
        pools = model_cfg.get("pool_op_kernel_sizes") or run_plan["pool_op_kernel_sizes"]
        net = build_stunet(model_cfg["size"], model_cfg.get("in_channels", 1), model_cfg.get("num_classes", 14),
                           pool_op_kernel_sizes=pools)
        weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(weights)
        return LoadedModel(net, run_plan, label_system or hparams.get("label_space", "flare22"))
    if plan is None or size is None:
        raise ValueError(f"{ckpt_path}: not an aeval checkpoint; an official STU-Net checkpoint needs "
                         "plan=<plans.json> and size=<s|b|l|h>")
    run_plan = plan if isinstance(plan, dict) else json.loads(Path(plan).read_text())
    raw = read_checkpoint(ckpt_path)
    weights = raw.get("network_weights") or raw.get("state_dict") or raw if isinstance(raw, dict) else {}
    heads = [v for k, v in weights.items() if k.endswith("seg_outputs.0.weight")]
    if not heads:
        raise ValueError(f"{ckpt_path}: no STU-Net segmentation head (seg_outputs.0.weight) in the checkpoint")
    num_classes = int(heads[0].shape[0])
    net = build_stunet(size, 1, num_classes, pool_op_kernel_sizes=run_plan["pool_op_kernel_sizes"])
    load_pretrained(net, ckpt_path)
    return LoadedModel(net, run_plan, label_system or "totalseg_104_alpha")


def case_name(path: Path) -> str:
    """``amos_0001_0000.nii.gz`` -> ``amos_0001`` (nnU-Net's channel suffix dropped)."""
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    return name[:-5] if name.endswith("_0000") else name


def list_inputs(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not source.exists():
        raise FileNotFoundError(f"{source}: input not found")
    return [source]


def predict_files(model: LoadedModel, inputs: Sequence[Path], output_dir: str | Path, *, to_system: str | None = None,
                  inference: dict[str, Any] | None = None, skip_existing: bool = False,
                  failures: FailureLog | None = None) -> list[Path]:
    """Segment every input; a bad input is one failure line and the others go on. Returns written files."""
    failures = failures if failures is not None else FailureLog()
    settings = {"overlap": 0.5, "mirror_axes": (0, 1, 2), "precision": "auto", **(inference or {})}
    predictor = SlidingWindowPredictor(model.net, model.plan["patch_size"], overlap=settings["overlap"],
                                       mirror_axes=tuple(settings["mirror_axes"] or ()),
                                       precision=settings["precision"],
                                       sw_batch_size=int(settings.get("sw_batch_size", 1)),
                                       device=settings.get("device"))
    output_dir = Path(output_dir)
    written = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("predict", total=len(inputs))
        for path in inputs:
            target = output_dir / f"{case_name(path)}.nii.gz"
            if skip_existing and target.exists():
                written.append(target)
            else:
                with failures.case(path):
                    written.append(predict_file(predictor, model, path, target, to_system))
            progress.advance(task)
    return written


def predict_file(predictor: SlidingWindowPredictor, model: LoadedModel, path: Path, target: Path,
                 to_system: str | None = None) -> Path:
    img = load_nifti(path)
    image, properties = preprocess_image(img, model.plan)
    try:
        logits = predictor(torch.from_numpy(image))
    except ValueError as err:
        raise CaseError(path, str(err)) from None
    segmentation = restore_to_original(logits, properties)
    del logits
    if to_system:
        segmentation = remap(segmentation, model.label_system, to_system)
    return save_nifti(segmentation.astype(np.uint8), img.affine, target, header=img.header)


@hydra.main(version_base=None, config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    failures = FailureLog(printer=lambda line: console.print(f"[red]{line}[/red]", highlight=False))
    try:
        model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"),
                           label_system=cfg.get("model_labels"))
        inputs = list_inputs(cfg.input)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        console.print(f"[red]{err}[/red]", highlight=False)
        sys.exit(2)
    written = predict_files(model, inputs, cfg.output, to_system=cfg.get("to_labels"),
                            inference=OmegaConf.to_container(cfg.inference, resolve=True), failures=failures)
    console.print(f"{len(written)} segmentation(s) written to {cfg.output}; {failures.summary()}", highlight=False)
    sys.exit(failures.exit_code())


if __name__ == "__main__":
    main()
