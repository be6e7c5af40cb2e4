"""``python -m aeval.predict``: segment NIfTI files with a checkpoint, written in each input's original geometry.

Takes our Lightning checkpoints (the plan, network settings and run key travel inside) and official STU-Net
checkpoints (``.model`` / ``.pth``) together with an aeval ``plans.json`` and a model size. The work is
:class:`~aeval.inference.SlidingWindowPredictor`'s; this module reads, preprocesses, restores and writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from aeval.console import console
from aeval.cpu import set_torch_threads
from aeval.data.nnunet_plans import is_nnunet_plan
from aeval.data.nnunet_preprocess import nnunet_gaussian, preprocess_nnunet, restore_nnunet
from aeval.data.preprocess import preprocess_image, restore_to_original
from aeval.entry import hydra_entry
from aeval.errors import CaseError, FailureLog
from aeval.inference import SlidingWindowPredictor
from aeval.labels import get_system, match_system, remap
from aeval.models.checks import check_finite, check_fits
from aeval.models.official import load_official
from aeval.models.pretrained import load_pretrained, read_checkpoint
from aeval.models.stunet import build_stunet
from aeval.nifti import is_nifti, load_nifti, nifti_case_name, nifti_cases, save_nifti

# What preprocessing and the predictor read from a plan (an aeval plans.json; see aeval.data.plan).
PLAN_KEYS = ("hash", "datasets", "target_spacing", "normalization", "patch_size", "pool_op_kernel_sizes")
# conf/inference keys, passed to SlidingWindowPredictor as they are.
INFERENCE_SETTINGS = ("overlap", "mirror_axes", "precision", "sw_batch_size", "device", "stitch_device",
                      "network_batch_size", "accumulate", "cpu_allocator")
# conf/inference keys read here, not by the predictor
PROCESS_SETTINGS = ("threads",)
DEFAULT_INFERENCE = {"overlap": 0.5, "mirror_axes": (0, 1, 2), "precision": "auto", "sw_batch_size": 1}


@dataclass
class LoadedModel:
    """A network ready for inference, the plan that preprocesses its inputs, the label system of its
    output, and the run key recorded at training time (empty for official checkpoints)."""

    net: nn.Module
    plan: dict[str, Any]
    label_system: str
    run_key: dict[str, str] = field(default_factory=dict)

    @property
    def convention(self) -> str:
        """``aeval`` (RAS, nibabel order, aeval's crop) or ``nnunet`` (official checkpoints: nnU-Net's order)."""
        return self.plan.get("convention", "aeval")


def check_plan(plan: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    missing = [key for key in PLAN_KEYS if key not in plan]
    if missing:
        raise CaseError(source, f"not an aeval plan (missing {', '.join(missing)}); "
                        "training writes one (plans.json under paths.preprocessed_root), or pass an nnU-Net plan")
    return dict(plan)


def load_model(ckpt_path: str | Path, *, plan: Mapping[str, Any] | str | Path | None = None,
               size: str | None = None, label_system: str | None = None, configuration: str | None = None,
               reorient: str | None = None) -> LoadedModel:
    """Our Lightning checkpoint (self-describing); an official STU-Net one with its nnU-Net plan (``plans.json``
    v2, ``plans.pkl`` / ``*.model.pkl`` v1; found beside the checkpoint when not given), predicted in nnU-Net's
    convention; or an official one with an aeval ``plans.json`` and ``size`` (aeval's convention).

    Errors are :class:`CaseError` lines naming the checkpoint or plan file."""
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, Mapping) and "plan" in hparams and "state_dict" in checkpoint:
        model_cfg, run_plan = hparams["model"], check_plan(hparams["plan"], ckpt_path)
        pools = model_cfg.get("pool_op_kernel_sizes") or run_plan["pool_op_kernel_sizes"]
        net = build_stunet(model_cfg["size"], model_cfg.get("in_channels", 1), model_cfg.get("num_classes", 14),
                           pool_op_kernel_sizes=pools)
        weights = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        check_fits(net.state_dict(), weights, ckpt_path)
        check_finite(weights, ckpt_path)
        net.load_state_dict(weights)
        system = label_system or hparams.get("label_space") or "flare22"
        run_key = {k: str(v) for k, v in (hparams.get("run_key") or {}).items()}
        return LoadedModel(net, run_plan, _known_system(system, ckpt_path), run_key)
    if plan is None or is_nnunet_plan(plan):
        del checkpoint
        net, nnunet_plan = load_official(ckpt_path, plan, configuration=configuration, size=size,
                                         reorient=reorient or "none")
        check_finite(net.state_dict(), ckpt_path)
        return LoadedModel(net, nnunet_plan, _official_system(label_system, nnunet_plan, ckpt_path))
    if size is None:
        raise CaseError(ckpt_path, "not an aeval checkpoint; an official STU-Net checkpoint with an aeval plan "
                        "needs size=<s|b|l|h>")
    if isinstance(plan, Mapping):
        run_plan = check_plan(plan, "plan")
    else:
        try:
            run_plan = check_plan(json.loads(Path(plan).read_text()), plan)
        except (OSError, ValueError) as err:
            raise CaseError(plan, f"unreadable plan ({type(err).__name__}: {err})") from None
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
        net = build_stunet(size, 1, num_classes, pool_op_kernel_sizes=run_plan["pool_op_kernel_sizes"])
    except ValueError as err:
        raise CaseError(ckpt_path, str(err)) from None
    load_pretrained(net, ckpt_path)
    check_finite(net.state_dict(), ckpt_path)
    return LoadedModel(net, run_plan, _known_system(label_system or "totalseg_104_alpha", ckpt_path))


def _official_system(requested: str | None, plan: Mapping[str, Any], source: Path) -> str:
    """The label system of an official model: the user's, else the known system its dataset.json labels
    are, else TotalSegmentator's alphabetical 104 classes (STU-Net's release) when the class count fits."""
    if requested:
        return _known_system(requested, source)
    labels = plan.get("labels") or {}
    matched = match_system(labels) if plan.get("nnunet_version") == 2 else None
    if matched:
        return matched
    if plan["num_classes"] == get_system("totalseg_104_alpha").max_id + 1:
        return "totalseg_104_alpha"
    raise CaseError(source, f"cannot tell the label system of these {plan['num_classes']} classes; set "
                    "model_labels=<system>")


def _known_system(name: str, source: Path) -> str:
    try:
        get_system(name)
    except KeyError as err:
        raise CaseError(source, err.args[0]) from None
    return name


def list_inputs(source: str | Path, failures: FailureLog | None = None) -> list[Path]:
    """A NIfTI file, or the NIfTI files of a folder (any letter case; hidden and temporary files left out).
    Two files of one case (``x.nii.gz`` and ``x_0000.nii.gz``) would write one output: that case is a failure
    line in ``failures`` (raised without one) and left out."""
    source = Path(source)
    if source.is_dir():
        files, duplicates = nifti_cases([p for p in source.iterdir() if is_nifti(p)])
        if not files and not duplicates:
            raise CaseError(source, "no NIfTI files (.nii.gz/.nii) in the folder")
        for err in duplicates:
            if failures is None:
                raise err
            failures.add(err)
        return sorted(files.values())
    if not source.exists():
        raise CaseError(source, "input not found")
    return [source]


def make_predictor(model: LoadedModel, inference: Mapping[str, Any] | None = None) -> SlidingWindowPredictor:
    """The predictor for ``model`` with the conf/inference settings (defaults: overlap 0.5, 8 flips, auto).

    An official checkpoint mirrors only along the axes its ``inference_allowed_mirroring_axes`` allow (nnU-Net's
    array axes, which are the predictor's in nnU-Net's convention), in nnU-Net's order."""
    settings = {**DEFAULT_INFERENCE, **{k: v for k, v in (inference or {}).items()
                                        if v is not None and k not in PROCESS_SETTINGS}}
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown inference setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(INFERENCE_SETTINGS + PROCESS_SETTINGS)}")
    settings["mirror_axes"] = tuple(settings["mirror_axes"] or ())
    if model.convention == "nnunet":  # nnU-Net's window positions and Gaussian: the windows nnU-Net blends
        settings["mirror_axes"] = allowed_mirror_axes(settings["mirror_axes"],
                                                      model.plan.get("inference_allowed_mirroring_axes"))
        settings.update(importance_map=nnunet_gaussian(model.plan["patch_size"], min_weight=None), tiling="nnunet")
    return SlidingWindowPredictor(model.net, model.plan["patch_size"], **settings)


def allowed_mirror_axes(requested: Sequence[int], allowed: Sequence[int] | None) -> tuple[int, ...]:
    """The requested mirror axes a checkpoint allows, in the checkpoint's order (nnU-Net sums the flips in
    that order); all requested ones when it records none."""
    if allowed is None:
        return tuple(int(a) for a in requested)
    return tuple(int(a) for a in allowed if int(a) in {int(r) for r in requested})


def predict_files(model: LoadedModel, inputs: Sequence[Path], output_dir: str | Path, *, to_system: str | None = None,
                  inference: Mapping[str, Any] | None = None, skip_existing: bool = False,
                  failures: FailureLog | None = None) -> list[Path]:
    """Segment every input into ``output_dir/<case>.nii.gz``; a bad input is one failure line and the others
    go on. Returns the files written (or, with ``skip_existing``, found)."""
    failures = failures if failures is not None else FailureLog()
    if to_system is not None:
        _known_system(to_system, Path("to_labels"))
    predictor = make_predictor(model, inference)
    set_torch_threads((inference or {}).get("threads"))
    output_dir = Path(output_dir)
    written = []
    columns = (TextColumn("predict {task.fields[case]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("predict", total=len(inputs), case="")
        for path in inputs:
            progress.update(task, case=path.name)
            target = output_dir / f"{nifti_case_name(path)}.nii.gz"
            if skip_existing and target.exists():
                written.append(target)
            else:
                with failures.case(path):
                    written.append(predict_file(predictor, model, path, target, to_system))
            progress.advance(task)
    return written


def predict_file(predictor: SlidingWindowPredictor, model: LoadedModel, path: Path, target: Path,
                 to_system: str | None = None) -> Path:
    """One image -> uint8 label map in its original shape, affine and header (written atomically)."""
    try:
        img = load_nifti(path)
        nnunet = model.convention == "nnunet"
        if nnunet:
            image, properties = preprocess_nnunet(img, model.plan, str(path))
        else:
            image, properties = preprocess_image(img, model.plan)
        try:
            logits = predictor(torch.from_numpy(image))
        except ValueError as err:
            raise CaseError(path, str(err)) from None
        del image
        segmentation = restore_nnunet(logits, properties) if nnunet else restore_to_original(logits, properties)
        del logits
    except MemoryError:
        raise CaseError(path, "out of memory (try inference.stitch_device=cpu or fewer mirror_axes)") from None
    if to_system:
        segmentation = remap(segmentation, model.label_system, to_system)
    return save_nifti(segmentation.astype(np.uint8, copy=False), img.affine, target, header=img.header)


def print_error(line: str) -> None:
    """One red line; file names are printed as they are (no rich markup)."""
    console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)


def predict_job(cfg: DictConfig) -> int:
    failures = FailureLog(printer=print_error)
    model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"), label_system=cfg.get("model_labels"),
                       configuration=cfg.get("configuration"), reorient=cfg.get("reorient"))
    written = predict_files(model, list_inputs(cfg.input, failures), cfg.output, to_system=cfg.get("to_labels"),
                            inference=OmegaConf.to_container(cfg.inference, resolve=True), failures=failures)
    console.print(f"{len(written)} segmentation(s) written to {cfg.output}; {failures.summary()}",
                  markup=False, highlight=False, soft_wrap=True)
    return failures.exit_code()


main = hydra_entry("predict", predict_job)

if __name__ == "__main__":
    main()
