"""The way back: network output in the plan's space -> labels in the original image's shape and orientation
(resampled, un-cropped, un-reoriented).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aeval.data.geometry import from_ras, move_z, resample_labels, resampled_argmax
from aeval.slabs import LogitSlabs, channel_readers


def _paste_back(cropped: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    full = np.zeros(properties["ras_shape"], dtype=np.uint8)
    full[tuple(slice(lo, hi) for lo, hi in properties["crop_bbox"])] = cropped
    restored = from_ras(full, np.asarray(properties["ras_transform"], dtype=float))
    if list(restored.shape) != list(properties["original"]["shape"]):
        raise ValueError(f"restored shape {restored.shape} differs from the original shape "
                         f"{properties['original']['shape']}")
    return restored


def _check_preprocessed_shape(shape: Sequence[int], properties: dict[str, Any], what: str) -> None:
    if list(shape) != list(properties["shape_after_resample"]):
        raise ValueError(f"{what} has spatial shape {list(shape)}, expected the preprocessed shape "
                         f"{properties['shape_after_resample']}")


def rows_axis(properties: dict[str, Any]) -> int:
    """The axis :func:`restore_to_original` reads logits along, a few rows at a time: the plan's separately
    resampled z axis, else axis 0 (what a predictor handing over logits in slabs must slab along)."""
    return move_z(properties["shape_after_crop"], properties["z_axis"])[1]


def restore_to_original(logits: torch.Tensor | np.ndarray | LogitSlabs, properties: dict[str, Any]) -> np.ndarray:
    """Logits/probabilities (C,X,Y,Z) in preprocessed space -> uint8 class map in the original array
    geometry: linear resampling to the cropped region and argmax, a few slices at a time (memory stays
    far below C x the full volume; a GPU tensor is resampled on its GPU; :class:`LogitSlabs` are read as they
    arrive), pasted into the full volume, RAS reorientation undone."""
    _check_preprocessed_shape(logits.shape[1:], properties, "logits")
    moved_out, first = move_z(properties["shape_after_crop"], properties["z_axis"])
    index = resampled_argmax(channel_readers(logits, first), [logits.shape[1 + first]], moved_out,
                             properties["z_axis"])
    return _paste_back(np.moveaxis(index, 0, first), properties)


def restore_labels(seg: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """An already-argmaxed label map ((X,Y,Z) or (1,X,Y,Z), preprocessed space) -> original geometry."""
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 else seg
    _check_preprocessed_shape(seg.shape, properties, "label map")
    if seg.min() < 0 or seg.max() > 255:
        raise ValueError("label values must fit uint8")
    cropped = resample_labels(seg.astype(np.uint8), properties["shape_after_crop"], properties["z_axis"])
    return _paste_back(cropped, properties)
