"""The predict stage: read, preprocess, predict (sliding window + mirror TTA), restore and write NIfTI files.

The network's work is :class:`~aeval.inference.SlidingWindowPredictor`'s; a model comes from
:func:`aeval.models.load.load_model`. Every output is in its input's original shape, affine and header.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aeval.console import console
from aeval.cpu import set_torch_threads
from aeval.data.nnunet_preprocess import nnunet_gaussian, nnunet_rows_axis, preprocess_nnunet, restore_nnunet
from aeval.data.preprocess import preprocess_image
from aeval.data.restore import restore_to_original, rows_axis
from aeval.errors import CaseError, FailureLog
from aeval.inference import SlidingWindowPredictor
from aeval.labels import remap
from aeval.models.load import LoadedModel, known_system
from aeval.nifti import is_nifti, load_nifti, nifti_case_name, nifti_cases, save_nifti

# conf/inference keys, passed to SlidingWindowPredictor as they are (a key left out takes the predictor's default,
# which conf/inference/default.yaml repeats for users to read; a test keeps the two equal).
INFERENCE_SETTINGS = ("overlap", "mirror_axes", "precision", "sw_batch_size", "device", "stitch_device",
                      "network_batch_size", "accumulate", "cpu_allocator")
PROCESS_SETTINGS = ("threads",)  # conf/inference keys read here, not by the predictor


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
    """The predictor for ``model`` with the conf/inference settings (the predictor's defaults for the others).

    An official checkpoint mirrors only along the axes its ``inference_allowed_mirroring_axes`` allow (nnU-Net's
    array axes, which are the predictor's in nnU-Net's convention), in nnU-Net's order."""
    settings = {k: v for k, v in (inference or {}).items() if v is not None and k not in PROCESS_SETTINGS}
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown inference setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(INFERENCE_SETTINGS + PROCESS_SETTINGS)}")
    if "mirror_axes" in settings:
        settings["mirror_axes"] = tuple(settings["mirror_axes"])
    if model.convention == "nnunet":  # nnU-Net's window positions and Gaussian: the windows nnU-Net blends
        requested = settings.get("mirror_axes", predictor_defaults()["mirror_axes"])
        settings["mirror_axes"] = allowed_mirror_axes(requested, model.plan.get("inference_allowed_mirroring_axes"))
        settings.update(importance_map=nnunet_gaussian(model.patch_size, min_weight=None), tiling="nnunet")
    return SlidingWindowPredictor(model.net, model.patch_size, **settings)


def predictor_defaults() -> dict[str, Any]:
    """The predictor's own defaults of the conf/inference keys (what a key left out gets)."""
    parameters = inspect.signature(SlidingWindowPredictor).parameters
    return {name: parameters[name].default for name in INFERENCE_SETTINGS}


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
        known_system(to_system, Path("to_labels"))
    predictor = make_predictor(model, inference)
    threads = (inference or {}).get("threads")
    if threads is not None:  # else the process keeps its threads (a training run set them; aeval.predict sets them)
        set_torch_threads(threads)
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
        # the logits arrive in final slabs along the axis the restore reads (a band of them for a large volume)
        axis = nnunet_rows_axis(properties) if nnunet else rows_axis(properties)
        try:
            logits = predictor.slabs(torch.from_numpy(image), axis)
        except ValueError as err:
            raise CaseError(path, str(err)) from None
        segmentation = restore_nnunet(logits, properties) if nnunet else restore_to_original(logits, properties)
        del logits, image
    except (MemoryError, torch.OutOfMemoryError):  # host or GPU: this case is too large, the next may fit
        raise CaseError(path, "out of memory (try inference.stitch_device=cpu or fewer mirror_axes)") from None
    if to_system:
        segmentation = remap(segmentation, model.label_system, to_system)
    return save_nifti(segmentation.astype(np.uint8, copy=False), img.affine, target, header=img.header)


