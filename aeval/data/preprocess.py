"""Preprocessing: one case -> arrays in the plan's space (nnU-Net v2 order: reorient to RAS -> crop ->
normalise -> resample to the plan's target spacing), and the properties that undo it (:mod:`.restore`).

The crop depends on the image only, so the cache (:mod:`.cache`) holds exactly what :func:`preprocess_image`
gives at inference time. Normalisation per the plan: ``ct`` clips to the dataset's foreground percentiles and
z-scores with its foreground mean/std; ``zscore`` uses the image's own mean/std over the cropped box (MR, and
mixed CT+MR plans; nnU-Net's optional non-zero mask for the statistics is not used). The geometry is
:mod:`.geometry`'s, the label codes :mod:`.label_codes`'.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from aeval.data.geometry import (
    crop_bbox,
    ras_order,
    ras_transform,
    resample_image,
    resample_labels,
    resampled_shape,
    separate_z_axis,
    to_ras,
)
from aeval.data.label_codes import LABEL_SETS, NUM_CLASSES, present_values, to_codes
from aeval.errors import CaseError
from aeval.nifti import (
    check_same_geometry,
    load_nifti,
    read_array,
    read_label,
    spacing_of,
)
from aeval.plan import Plan

CLASS_LOCATION_SAMPLES = 1000


def normalise(image: np.ndarray, normalization: dict[str, Any]) -> tuple[np.ndarray, dict[str, float]]:
    """Apply the plan's scheme; returns the image and the statistics used."""
    if normalization["scheme"] == "ct":
        lo, hi = normalization["clip"]
        mean, std = normalization["mean"], normalization["std"]
        image = np.clip(image, lo, hi)
    elif normalization["scheme"] == "zscore":
        mean, std = float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))
    else:
        raise ValueError(f"unknown normalisation scheme {normalization['scheme']!r}")
    return ((image - mean) / max(std, 1e-8)).astype(np.float32), {"mean": mean, "std": std}


def _image_modality(plan: Plan, modality: str | None) -> str:
    if modality is not None:
        return modality
    modalities = plan.modalities
    return modalities.pop() if len(modalities) == 1 else "mixed"


def _forward(data: np.ndarray, img: nib.Nifti1Image, plan: Plan, modality: str | None,
             labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    transform = ras_transform(img.affine)
    spacing = spacing_of(img)
    ras_spacing = [float(s) for s in ras_order(spacing, transform)]
    data = to_ras(data, transform)
    modality = _image_modality(plan, modality)
    bbox = crop_bbox(data, modality, plan.ct_threshold)
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    cropped = data[box]
    normalised, stats = normalise(cropped, plan.normalization)
    target = list(plan.target_spacing)
    new_shape = resampled_shape(cropped.shape, ras_spacing, target)
    z_axis = separate_z_axis(ras_spacing, target)
    image = resample_image(normalised, new_shape, z_axis)[None]
    properties = {
        "plan_hash": plan.hash,
        "modality": modality,
        "original": {"shape": [int(n) for n in img.shape[:3]], "affine": np.asarray(img.affine).tolist(),
                     "spacing": [float(s) for s in spacing],
                     "orientation": "".join(orientations.aff2axcodes(img.affine))},
        "ras_transform": transform.astype(int).tolist(),
        "ras_shape": [int(n) for n in data.shape],
        "ras_spacing": ras_spacing,
        "crop_bbox": bbox,
        "shape_after_crop": [int(n) for n in cropped.shape],
        "target_spacing": target,
        "shape_after_resample": [int(n) for n in new_shape],
        "z_axis": z_axis,
        "normalization": {"scheme": plan.normalization["scheme"], **stats},
    }
    seg = None
    if labels is not None:
        labels = to_ras(labels, transform)
        inside = labels[box]
        properties["foreground_outside_crop"] = int(np.count_nonzero(labels)) - int(np.count_nonzero(inside))
        seg = resample_labels(np.ascontiguousarray(inside), new_shape, z_axis)[None]
    return image, seg, properties


def preprocess_image(image: nib.Nifti1Image | str | os.PathLike, plan: Plan | Mapping[str, Any],
                     modality: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One image -> float32 (1,X,Y,Z) in the plan's space, and the properties that undo it.

    ``modality`` (CT/MR) picks the crop rule; by default the plan's modality."""
    path = image if isinstance(image, str | os.PathLike) else (image.get_filename() or "<image>")
    img = load_nifti(image) if isinstance(image, str | os.PathLike) else image
    data = read_array(img, path, np.float32)
    if not np.isfinite(data).all():
        raise CaseError(path, "image contains NaN or infinite intensities")
    array, _, properties = _forward(data, img, Plan.from_dict(plan), modality)
    return array, properties


def _class_locations(seg: np.ndarray, seed: int) -> dict[str, list[int]]:
    """Up to ``CLASS_LOCATION_SAMPLES`` flat voxel indices per non-zero code (foreground oversampling)."""
    rng = np.random.default_rng(seed)
    flat = seg.ravel()
    locations = {}
    for code in (v for v in present_values(seg) if v):
        where = np.flatnonzero(flat == code)
        if where.size > CLASS_LOCATION_SAMPLES:
            where = np.sort(rng.choice(where, CLASS_LOCATION_SAMPLES, replace=False))
        locations[str(int(code))] = where.tolist()
    return locations


def preprocess_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None,
                    plan: Plan | Mapping[str, Any],
                    label_system: str, modality: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Image and (optional) label map of one case -> image float32 (1,X,Y,Z), FLARE22 codes uint8 (1,X,Y,Z),
    properties (with class locations). Labels outside ``label_system`` are a :class:`CaseError`."""
    img = load_nifti(image_path)
    data = read_array(img, image_path, np.float32)
    if not np.isfinite(data).all():
        raise CaseError(image_path, "image contains NaN or infinite intensities")
    codes = None
    if label_path is not None:
        labels, label_img = read_label(label_path)
        check_same_geometry(img, label_img, label_path)
        try:
            codes = to_codes(labels, label_system)
        except ValueError as err:
            raise CaseError(label_path, str(err)) from None
    image, seg, properties = _forward(data, img, Plan.from_dict(plan), modality, codes)
    properties["label_system"] = label_system
    properties["label_sets"] = {str(c): sorted(s) for c, s in LABEL_SETS.items() if c >= NUM_CLASSES}
    if seg is not None:
        properties["class_locations"] = _class_locations(seg[0], zlib.crc32(Path(image_path).name.encode()))
    return image, seg, properties
