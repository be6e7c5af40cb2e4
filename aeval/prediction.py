"""The predict stage: read, preprocess, predict (sliding window + mirror TTA), restore and write NIfTI files.

The network's work is :class:`~aeval.inference.SlidingWindowPredictor`'s; a model comes from
:func:`aeval.models.load.load_model`. Every output is in its input's original shape, affine and header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aeval.console import console
from aeval.data.nnunet_preprocess import nnunet_gaussian, preprocess_nnunet, restore_nnunet
from aeval.data.preprocess import preprocess_image
from aeval.data.restore import restore_to_original
from aeval.errors import CaseError, FailureLog
from aeval.inference import SlidingWindowPredictor
from aeval.labels import remap
from aeval.models.load import LoadedModel, known_system
from aeval.nifti import is_nifti, load_nifti, nifti_case_name, nifti_cases, save_nifti

# conf/inference keys, passed to SlidingWindowPredictor as they are.
INFERENCE_SETTINGS = ("overlap", "mirror_axes", "precision", "sw_batch_size", "device", "stitch_device",
                      "network_batch_size")
DEFAULT_INFERENCE = {"overlap": 0.5, "mirror_axes": (0, 1, 2), "precision": "auto", "sw_batch_size": 1}


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
    """The predictor for ``model`` with the conf/inference settings (defaults: overlap 0.5, 8 flips, auto)."""
    settings = {**DEFAULT_INFERENCE, **{k: v for k, v in (inference or {}).items() if v is not None}}
    unknown = sorted(set(settings) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown inference setting(s) {', '.join(unknown)}; known: {', '.join(INFERENCE_SETTINGS)}")
    settings["mirror_axes"] = tuple(settings["mirror_axes"] or ())
    if model.convention == "nnunet":  # nnU-Net's window positions and Gaussian: the windows nnU-Net blends
        settings.update(importance_map=nnunet_gaussian(model.patch_size), tiling="nnunet")
    return SlidingWindowPredictor(model.net, model.patch_size, **settings)


def predict_files(model: LoadedModel, inputs: Sequence[Path], output_dir: str | Path, *, to_system: str | None = None,
                  inference: Mapping[str, Any] | None = None, skip_existing: bool = False,
                  failures: FailureLog | None = None) -> list[Path]:
    """Segment every input into ``output_dir/<case>.nii.gz``; a bad input is one failure line and the others
    go on. Returns the files written (or, with ``skip_existing``, found)."""
    failures = failures if failures is not None else FailureLog()
    if to_system is not None:
        known_system(to_system, Path("to_labels"))
    predictor = make_predictor(model, inference)
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


