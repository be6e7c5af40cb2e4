"""Geometry of preprocessing: reorientation to RAS, the crop, and resampling (nnU-Net v2's rules).

- Reorientation is nibabel's closest-canonical transform (``io_orientation``); the transform is recorded so a
  prediction can be written back in the original array orientation.
- Crop: MR (and any non-CT image) to the bounding box of non-zero voxels, as nnU-Net does. CT background is
  air (about -1000 HU), not 0, so nnU-Net's rule would never crop a CT; CT is cropped to the bounding box of
  the voxels above the plan's ``crop.ct_threshold`` (-500 HU: the body and the table).
- Resampling: images 3rd-order spline; labels as one-hot maps with linear interpolation and argmax. When the
  data is anisotropic (max/min spacing > 3) the low-resolution axis is resampled separately with nearest
  neighbour, as nnU-Net does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations
from scipy import ndimage

from aeval.data.label_codes import present_values
from aeval.plan import CT_BODY_THRESHOLD

ANISOTROPY_THRESHOLD = 3.0


_RAS = orientations.axcodes2ornt("RAS")


_CHUNK = 16  # output slices resampled at a time in the linear/argmax path (bounds memory)


def ras_transform(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform taking the array to the closest RAS orientation."""
    return orientations.io_orientation(affine)


def to_ras(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """The array in RAS axis order (``ras_transform``'s flips and transposes)."""
    return orientations.apply_orientation(array, np.asarray(transform))


def from_ras(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_ras`: back to the file's own axis order."""
    back = orientations.ornt_transform(_RAS, np.asarray(transform))
    return np.ascontiguousarray(orientations.apply_orientation(array, back))


def ras_order(values: Sequence, transform: np.ndarray) -> list:
    """Per-axis values (spacing, shape) permuted from array-axis order to RAS axis order."""
    out = [None] * 3
    for axis, (ras_axis, _) in enumerate(np.asarray(transform)):
        out[int(ras_axis)] = values[axis]
    return out


def crop_bbox(image: np.ndarray, modality: str, ct_threshold: float = CT_BODY_THRESHOLD) -> list[list[int]]:
    """``[[lo, hi), ...]`` per axis: the body (CT) or the non-zero voxels (other modalities); whole image
    when nothing qualifies."""
    mask = image > ct_threshold if modality == "CT" else image != 0
    bbox = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(image.shape[axis])])
    return bbox


def _lowres_axis(spacing: Sequence[float]) -> int | None:
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() / spacing.min() <= ANISOTROPY_THRESHOLD:
        return None
    coarse = np.flatnonzero(np.isclose(spacing, spacing.max()))
    return int(coarse[0]) if coarse.size == 1 else None


def separate_z_axis(spacing: Sequence[float], target_spacing: Sequence[float]) -> int | None:
    """nnU-Net's rule: the low-resolution axis of the source spacing if it is anisotropic, else of the
    target spacing; ``None`` (resample all axes together) otherwise."""
    if max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD:
        return _lowres_axis(spacing)
    return _lowres_axis(target_spacing)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """The shape at ``target`` spacing (nnU-Net's rounding)."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True)]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def resample_image(image: np.ndarray, new_shape: Sequence[int], z_axis: int | None) -> np.ndarray:
    """3rd-order spline resampling (voxel centres aligned on the volume's extent); with ``z_axis`` the
    other two axes are resampled slice by slice and ``z_axis`` by nearest neighbour."""
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(image.shape) == new_shape:
        return image.astype(np.float32, copy=True)

    def spline(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if tuple(volume.shape) == shape:
            return volume
        scale = np.array(volume.shape, dtype=float) / np.array(shape, dtype=float)
        return ndimage.affine_transform(volume, scale, offset=0.5 * scale - 0.5, output_shape=shape, order=3,
                                        mode="nearest", output=np.float32)

    if z_axis is None:
        return spline(image.astype(np.float32, copy=False), new_shape)
    moved = np.moveaxis(image.astype(np.float32, copy=False), z_axis, 0)
    plane = tuple(n for a, n in enumerate(new_shape) if a != z_axis)
    slices = np.stack([spline(moved[k], plane) for k in range(moved.shape[0])])
    slices = slices[_nearest_index(moved.shape[0], new_shape[z_axis])]
    return np.ascontiguousarray(np.moveaxis(slices, 0, z_axis))


def _axis_weights(n_in: int, n_out: int, nearest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of 1-D linear (or nearest) interpolation, torch's align_corners=False rule."""
    if nearest:
        index = _nearest_index(n_in, n_out)
        return index, index, np.zeros(n_out, dtype=np.float32)
    source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.intp), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (source - lower).astype(np.float32)


def resampled_argmax(channels: Sequence[Callable[[int, int], torch.Tensor]], in_shape: Sequence[int],
                     out_shape: Sequence[int], z_axis: int | None) -> np.ndarray:
    """Argmax over channels after linear resampling of each to ``out_shape`` (uint8 channel index).

    ``channels[c](lo, hi)`` returns the float slab ``[lo:hi]`` along the first axis of channel ``c``, in an
    array whose first axis is ``z_axis`` when given (the caller moves it there) — that axis is then
    resampled by nearest neighbour, the others bilinearly. The output is built ``_CHUNK`` slices at a time
    with a running max, so memory stays a few slices per channel whatever the volume and class count.
    fp16 slabs are resampled in fp32 and rounded back to fp16 before the max, as nnU-Net resamples fp16 logits."""
    out_shape = tuple(int(n) for n in out_shape)
    lower, upper, weight = _axis_weights(int(in_shape[0]), out_shape[0], nearest=z_axis is not None)
    result = np.empty(out_shape, dtype=np.uint8)
    for start in range(0, out_shape[0], _CHUNK):
        rows = slice(start, min(start + _CHUNK, out_shape[0]))
        lo, hi = int(lower[rows].min()), int(upper[rows].max()) + 1
        best = best_value = None
        for c, channel in enumerate(channels):
            raw = channel(lo, hi)
            slab = raw.float()
            if best is None:  # work where the data lives (a GPU for logits straight from the network)
                a = torch.from_numpy(lower[rows] - lo).to(slab.device)
                b = torch.from_numpy(upper[rows] - lo).to(slab.device)
                w = torch.from_numpy(weight[rows]).view(-1, 1, 1).to(slab.device)
            value = slab[a] * (1 - w) + slab[b] * w
            if tuple(value.shape[1:]) != out_shape[1:]:
                value = F.interpolate(value[:, None], size=out_shape[1:], mode="bilinear",
                                      align_corners=False)[:, 0]
            if raw.dtype == torch.float16:
                value = value.half().float()
            if best is None:
                best_value, best = value.clone(), torch.zeros(value.shape, dtype=torch.uint8, device=value.device)
            else:
                better = value > best_value
                best[better] = c
                torch.maximum(best_value, value, out=best_value)
        result[rows] = best.cpu().numpy()
    return result


def move_z(shape: Sequence[int], z_axis: int | None) -> tuple[list[int], int]:
    first = 0 if z_axis is None else z_axis
    return [shape[first]] + [n for a, n in enumerate(shape) if a != first], first


def resample_labels(labels: np.ndarray, new_shape: Sequence[int], z_axis: int | None) -> np.ndarray:
    """nnU-Net's label resampling: each label as a one-hot map, linear interpolation, argmax."""
    new_shape = [int(n) for n in new_shape]
    if list(labels.shape) == new_shape:
        return labels.copy()
    values = present_values(labels)
    if values.size == 1:
        return np.full(new_shape, values[0], dtype=labels.dtype)
    moved_out, first = move_z(new_shape, z_axis)
    moved = torch.from_numpy(np.ascontiguousarray(np.moveaxis(labels, first, 0)))
    channels = [lambda lo, hi, v=int(v): (moved[lo:hi] == v).float() for v in values]
    index = resampled_argmax(channels, [labels.shape[first]], moved_out, z_axis)
    return np.moveaxis(values.astype(labels.dtype)[index], 0, first)
