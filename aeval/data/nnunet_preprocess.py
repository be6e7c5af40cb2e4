"""nnU-Net's preprocessing and export, reimplemented (numpy/scipy/torch) for official checkpoints.

An official network only predicts well on arrays prepared exactly as in its training, so this follows
nnU-Net v2's ``DefaultPreprocessor`` and ``convert_predicted_logits_to_segmentation_with_correct_shape``:

- axis order: nnU-Net reads NIfTI through SimpleITK, whose array is nibabel's array transposed (2, 1, 0)
  with the spacing reversed; it does not reorient. ``reorient="ras"`` first applies nibabel's
  ``as_closest_canonical``, as TotalSegmentator does before it hands a file to nnU-Net;
- ``transpose_forward`` of the plan, then the crop to the bounding box of the non-zero voxels (holes filled;
  a CT full of air is not cropped), normalisation (CT: clip to the foreground 0.5/99.5 percentiles, then
  (x - mean) / std; z-score, optionally inside the non-zero mask), then resampling to the plan's spacing:
  skimage-style spline of ``order`` (clipped to the input's range), and with anisotropy > 3 each slice
  in-plane and the low-resolution axis with ``order_z``;
- back: the network output linearly resampled to the cropped shape (separate-z as above), argmax, pasted
  into the uncropped volume, ``transpose_backward``, back to nibabel order (and orientation).

Equality with nnU-Net itself is tested in ``tests/test_nnunet_parity.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from aeval.data.geometry import from_ras, ras_order, ras_transform, resampled_argmax, to_ras
from aeval.errors import CaseError
from aeval.nifti import read_array, spacing_of
from aeval.slabs import LogitSlabs, channel_readers

ANISO_THRESHOLD = 3.0
EPS = 1e-8


# --- geometry ------------------------------------------------------------------------------------------

def nnunet_array(data: np.ndarray, img: nib.Nifti1Image, reorient: str = "none"
                 ) -> tuple[np.ndarray, list[float], np.ndarray | None]:
    """nibabel's (x, y, z) array -> the array and spacing nnU-Net's SimpleITK reader gives ((z, y, x)), after
    nibabel's closest-canonical reorientation when ``reorient == "ras"``; returns the RAS transform used."""
    spacing = list(spacing_of(img))
    transform = None
    if reorient == "ras":
        transform = ras_transform(img.affine)
        data = to_ras(data, transform)
        spacing = [float(s) for s in ras_order(spacing, transform)]
    elif reorient != "none":
        raise ValueError(f"reorient must be 'none' or 'ras', got {reorient!r}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), [float(s) for s in spacing[::-1]], transform


def nonzero_bbox(data: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """nnU-Net's crop: bounding box ``[[lo, hi), ...]`` of the non-zero voxels after hole filling, and the
    filled mask (the whole volume when nothing is non-zero)."""
    mask = data != 0
    if not mask.all():
        mask = ndimage.binary_fill_holes(mask)
    bbox = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(data.shape[axis])])
    return bbox, mask


def separate_z(current: Sequence[float], new: Sequence[float], force: bool | None = None,
               first: str = "current") -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the low-resolution axis to resample on its own, or None.

    The spacing that is checked first is ``current`` (v2 everywhere; v1 in preprocessing) or ``new``."""
    def lowres(spacing: Sequence[float]) -> np.ndarray:
        spacing = np.asarray(spacing, dtype=float)
        return np.flatnonzero(spacing.max() / spacing == 1)

    def anisotropic(spacing: Sequence[float]) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > ANISO_THRESHOLD)

    order = (current, new) if first == "current" else (new, current)
    if force is not None:
        axis = lowres(current) if force else None
    elif anisotropic(order[0]):
        axis = lowres(order[0])
    elif anisotropic(order[1]):
        axis = lowres(order[1])
    else:
        axis = None
    return int(axis[0]) if axis is not None and len(axis) == 1 else None


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """nnU-Net's ``compute_new_shape``."""
    return [int(round(s / t * n)) for s, t, n in zip(spacing, target, shape, strict=True)]


def _resize(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """skimage ``resize(order, mode='edge', anti_aliasing=False)``: a grid-mode zoom clipped to the input range."""
    shape = tuple(int(n) for n in shape)
    if tuple(volume.shape) == shape:
        return volume.astype(np.float32, copy=True)
    zoom = [n / m for n, m in zip(shape, volume.shape, strict=True)]
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True, output=np.float32)
    if order > 0:
        np.clip(out, volume.min(), volume.max(), out=out)
    return out


def resample_image(data: np.ndarray, new_shape: Sequence[int], axis: int | None, order: int = 3,
                   order_z: int = 0) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for one image channel (float32 out)."""
    new_shape = [int(n) for n in new_shape]
    if list(data.shape) == new_shape:
        return data
    data = data.astype(np.float32, copy=False)
    if axis is None:
        return _resize(data, new_shape, order)
    moved = np.moveaxis(data, axis, 0)
    plane = [n for a, n in enumerate(new_shape) if a != axis]
    slices = np.stack([_resize(moved[k], plane, order) for k in range(moved.shape[0])])
    if slices.shape[0] != new_shape[axis]:
        scale = slices.shape[0] / new_shape[axis]
        coords = scale * (np.arange(new_shape[axis]) + 0.5) - 0.5
        if order_z == 0:  # scipy's order-0 rounding of nnU-Net's map_coordinates, on the index axis alone
            index = ndimage.map_coordinates(np.arange(slices.shape[0], dtype=float), [coords], order=0, mode="nearest")
            slices = slices[index.astype(np.intp)]
        else:
            zoom = [new_shape[axis] / slices.shape[0], 1, 1]
            slices = ndimage.zoom(slices, zoom, order=order_z, mode="nearest", grid_mode=True, output=np.float32)
    return np.ascontiguousarray(np.moveaxis(slices, 0, axis))


# --- normalisation -------------------------------------------------------------------------------------

def normalise(image: np.ndarray, scheme: Mapping[str, Any], mask: np.ndarray) -> np.ndarray:
    """nnU-Net's CT / z-score / no normalisation, with its float32 arithmetic."""
    image = image.astype(np.float32, copy=True)
    if scheme["scheme"] == "CTNormalization":
        np.clip(image, scheme["percentile_00_5"], scheme["percentile_99_5"], out=image)
        image -= scheme["mean"]
        image /= max(scheme["std"], EPS)
    elif scheme["scheme"] == "ZScoreNormalization":
        if scheme.get("use_mask"):
            mean, std = image[mask].mean(), image[mask].std()
            image[mask] = (image[mask] - mean) / max(std, EPS)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(std, EPS)
    elif scheme["scheme"] != "NoNormalization":
        raise ValueError(f"unsupported normalisation {scheme['scheme']!r}")
    return image


# --- forward and back ----------------------------------------------------------------------------------

def preprocess_nnunet(img: nib.Nifti1Image, plan: Mapping[str, Any], path: str = "<image>"
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """One NIfTI image -> the float32 (1, ...) array nnU-Net feeds its network, and the properties that undo it."""
    if len(plan["normalization"]) != 1:
        raise CaseError(path, f"the model expects {len(plan['normalization'])} input channels; aeval reads one "
                        "NIfTI image per case")
    data = read_array(img, path, np.float32)
    if not np.isfinite(data).all():
        raise CaseError(path, "image contains NaN or infinite intensities")
    reorient = plan.get("reorient", "none")
    array, spacing, transform = nnunet_array(data, img, reorient)
    forward = plan["transpose_forward"]
    array = np.ascontiguousarray(array.transpose(forward))
    spacing = [spacing[a] for a in forward]
    shape_before_crop = list(array.shape)
    bbox, mask = nonzero_bbox(array)
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    cropped, mask = array[box], mask[box]
    target = [float(s) for s in plan["spacing"]]
    new_shape = new_shape_for(cropped.shape, spacing, target)
    normalised = normalise(cropped, plan["normalization"][0], mask)
    kwargs = plan["resampling"]["data"]
    axis = separate_z(spacing, target, kwargs["force_separate_z"])
    image = resample_image(normalised, new_shape, axis, kwargs["order"], kwargs["order_z"])[None]
    properties = {
        "convention": "nnunet", "plan_hash": plan["hash"], "reorient": reorient,
        "ras_transform": transform.astype(int).tolist() if transform is not None else None,
        "original_shape": [int(n) for n in img.shape[:3]],
        "spacing": spacing, "target_spacing": target,
        "shape_before_cropping": shape_before_crop, "bbox_used_for_cropping": bbox,
        "shape_after_cropping_and_before_resampling": [int(n) for n in cropped.shape],
        "shape_after_resample": [int(n) for n in new_shape],
        "transpose_backward": list(plan["transpose_backward"]),
        "export": {**plan["resampling"]["probabilities"], "first": plan.get("export_separate_z_first", "target")},
    }
    return np.ascontiguousarray(image, dtype=np.float32), properties


def nnunet_export_axis(properties: Mapping[str, Any]) -> int | None:
    """nnU-Net's separately resampled axis on the way back (``None``: all axes together)."""
    export = properties["export"]
    first = "current" if export["first"] == "target" else "new"
    return separate_z(properties["target_spacing"], properties["spacing"], export["force_separate_z"], first)


def nnunet_rows_axis(properties: Mapping[str, Any]) -> int:
    """The axis :func:`restore_nnunet` reads logits along, a few rows at a time (what a predictor handing over
    logits in slabs must slab along): the separately resampled axis, else 0."""
    axis = nnunet_export_axis(properties)
    return 0 if axis is None else axis


def restore_nnunet(logits: torch.Tensor | np.ndarray | LogitSlabs, properties: Mapping[str, Any]) -> np.ndarray:
    """Network output (K, ...) in nnU-Net's preprocessed space -> uint8 class map in the input's nibabel
    array geometry (linear resampling of the K channels and argmax a few slices at a time; fp16 logits are
    resampled as nnU-Net resamples them, rounded to fp16)."""
    if list(logits.shape[1:]) != list(properties["shape_after_resample"]):
        raise ValueError(f"logits have spatial shape {list(logits.shape[1:])}, expected "
                         f"{properties['shape_after_resample']}")
    export = properties["export"]
    if export["order"] != 1 or export["order_z"] != 0:
        raise ValueError(f"export resampling of order {export['order']} / order_z {export['order_z']} is not "
                         "supported (nnU-Net's default is 1 / 0)")
    cropped_shape = properties["shape_after_cropping_and_before_resampling"]
    lead = nnunet_rows_axis(properties)
    out_shape = [cropped_shape[lead]] + [n for a, n in enumerate(cropped_shape) if a != lead]
    readers = channel_readers(logits, lead, keep_half=True)
    index = resampled_argmax(readers, [logits.shape[1 + lead]], out_shape, nnunet_export_axis(properties))
    segmentation = np.zeros(properties["shape_before_cropping"], dtype=np.uint8)
    segmentation[tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])] = np.moveaxis(index, 0, lead)
    segmentation = segmentation.transpose(properties["transpose_backward"]).transpose(2, 1, 0)
    if properties["ras_transform"] is not None:
        segmentation = from_ras(segmentation, np.asarray(properties["ras_transform"], dtype=float))
    segmentation = np.ascontiguousarray(segmentation)
    if list(segmentation.shape) != list(properties["original_shape"]):
        raise ValueError(f"restored shape {segmentation.shape} differs from the input shape "
                         f"{properties['original_shape']}")
    return segmentation


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float = 1 / 8,
                    min_weight: float | None = 1e-3) -> torch.Tensor:
    """nnU-Net's ``compute_gaussian`` weights: a centred delta blurred with sigma = patch * ``sigma_scale``,
    scaled to max 10 and stored in fp16 (tiny corner weights underflow and are replaced by the smallest
    non-zero one), as nnU-Net 2.8 blends windows.

    Returned in fp32: with ``min_weight=None`` exactly nnU-Net's fp16 values (what fp16 blending needs to
    round as nnU-Net rounds); else scaled so that the minimum is ``min_weight`` (MONAI clamps blending
    weights to >= 1e-3; blending is invariant to the scale, so the relative weights stay nnU-Net's)."""
    delta = np.zeros(tuple(int(p) for p in patch_size))
    delta[tuple(p // 2 for p in delta.shape)] = 1
    gaussian = ndimage.gaussian_filter(delta, [p * sigma_scale for p in delta.shape], 0, mode="constant", cval=0)
    gaussian = (gaussian / (gaussian.max() / 10)).astype(np.float16)
    gaussian[gaussian == 0] = gaussian[gaussian > 0].min()
    if min_weight is None:
        return torch.from_numpy(gaussian.astype(np.float32))
    gaussian = gaussian.astype(np.float64)
    return torch.from_numpy((gaussian * (min_weight / gaussian.min())).astype(np.float32))
