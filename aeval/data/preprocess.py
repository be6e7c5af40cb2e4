"""Preprocessing: one unified-dataset case -> arrays in the plan's space, and the way back.

Forward (nnU-Net v2 order): reorient to RAS -> crop -> normalise -> resample to the plan's target spacing.

- Reorientation is nibabel's closest-canonical transform (``io_orientation``); the transform is recorded so a
  prediction can be written back in the original array orientation.
- Crop: MR (and any non-CT image) to the bounding box of non-zero voxels, as nnU-Net does. CT background is
  air (about -1000 HU), not 0, so nnU-Net's rule would never crop a CT; we crop CT to the bounding box of
  the voxels above ``plan["crop"]["ct_threshold"]`` (-500 HU: the body and the table). The crop depends on
  the image only, so the cache holds exactly what :func:`preprocess_image` gives at inference time.
- Normalisation per the plan: ``ct`` clips to the dataset's foreground percentiles and z-scores with its
  foreground mean/std; ``zscore`` uses the image's own mean/std over the cropped box (MR, and mixed CT+MR
  plans; nnU-Net's optional non-zero mask for the statistics is not used).
- Resampling: images 3rd-order spline; labels as one-hot maps with linear interpolation and argmax. When the
  data is anisotropic (max/min spacing > 3) the low-resolution axis is resampled separately with nearest
  neighbour, as nnU-Net does.

Labels are stored as FLARE22 *codes*: 0..13 are the FLARE22 classes, codes >= 14 stand for a SET of classes
(:data:`LABEL_SETS`; WORD's single adrenal label is code 14 = {right adrenal, left adrenal}), so the set
survives for the partial-label loss. Native labels that are not FLARE22 organs become 0.

Cache layout (``preprocess_dataset``): ``{case}.npy`` image float32 (1,X,Y,Z), ``{case}_seg.npy`` codes uint8
(1,X,Y,Z), ``{case}.json`` properties, ``cache.json`` manifest; all written atomically, memory-mappable.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations
from rich.progress import Progress
from scipy import ndimage

from aeval.errors import CaseError, FailureLog
from aeval.labels import COMPOSITE_ORGANS, FLARE22_ORGANS, flare22_sets, get_system
from aeval.nifti import (
    atomic_path,
    check_same_geometry,
    load_nifti,
    read_array,
    read_label,
    remove_stale_temporaries,
    spacing_of,
    write_text_atomic,
)
from aeval.parallel import EXPECTED_CASE_ERRORS, CaseFailure, failures_of, map_cases

NUM_CLASSES = len(FLARE22_ORGANS) + 1
ANISOTROPY_THRESHOLD = 3.0
CT_BODY_THRESHOLD = -500.0
CACHE_ERRORS = (*EXPECTED_CASE_ERRORS, RuntimeError)  # torch's resampling raises RuntimeError on odd shapes
CLASS_LOCATION_SAMPLES = 1000
CACHE_MANIFEST = "cache.json"
_RAS = orientations.axcodes2ornt("RAS")
_CHUNK = 16  # output slices resampled at a time in the linear/argmax path (bounds memory)


def _set_codes() -> dict[int, frozenset[int]]:
    flare = {name: i for i, name in get_system("flare22").names.items()}
    return {NUM_CLASSES + k: frozenset(flare[p] for p in parts)
            for k, (_, parts) in enumerate(sorted(COMPOSITE_ORGANS.items()))}


# code -> the FLARE22 classes it stands for (codes < 14 are single classes).
LABEL_SETS: dict[int, frozenset[int]] = {c: frozenset({c}) for c in range(NUM_CLASSES)} | _set_codes()


class PreprocessingFailed(RuntimeError):
    """Some cases of a dataset could not be preprocessed; ``failures`` holds one line per case."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__(f"{len(failures)} case(s) failed preprocessing:\n" + "\n".join(failures))


# --- labels -> codes -----------------------------------------------------------------------------------

@cache
def code_table(system: str) -> np.ndarray:
    """``table[native_id]`` = FLARE22 code (0 for labels that are no FLARE22 organ)."""
    by_set = {classes: code for code, classes in LABEL_SETS.items()}
    table = np.zeros(get_system(system).max_id + 1, dtype=np.uint8)
    for native, classes in flare22_sets(system).items():
        table[native] = by_set[classes]
    return table


def present_values(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a non-negative integer array, counted a slab at a time (a full-volume
    ``bincount`` would first copy the volume to 8-byte integers)."""
    if labels.size == 0:
        return np.zeros(0, dtype=np.intp)
    counts = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    for slab in _slabs(labels):
        counts += np.bincount(slab.ravel(), minlength=counts.size)
    return np.flatnonzero(counts)


def _slabs(array: np.ndarray, voxels: int = 1 << 22):
    step = max(1, voxels // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        yield array[start:start + step]


def to_codes(labels: np.ndarray, system: str) -> np.ndarray:
    """Native labels -> FLARE22 codes; ``ValueError`` naming the values when one is not in ``system``."""
    label_system = get_system(system)
    if labels.size and (labels.min() < 0 or labels.max() > label_system.max_id):
        label_system.check_values(labels)
    label_system.check_values(present_values(labels))
    table = code_table(system)
    codes = np.empty(labels.shape, dtype=np.uint8)
    for out, slab in zip(_slabs(codes), _slabs(labels), strict=True):
        out[...] = table[slab]
    return codes


def codes_to_classes(codes: np.ndarray | torch.Tensor):
    """Hard FLARE22 classes from codes: set codes become 0, like :func:`aeval.labels.to_flare22` does."""
    if isinstance(codes, torch.Tensor):
        return codes.masked_fill(codes >= NUM_CLASSES, 0)
    return np.where(codes < NUM_CLASSES, codes, 0).astype(codes.dtype, copy=False)


# --- geometry ------------------------------------------------------------------------------------------

def ras_transform(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform taking the array to the closest RAS orientation."""
    return orientations.io_orientation(affine)


def to_ras(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    return orientations.apply_orientation(array, np.asarray(transform))


def from_ras(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
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


def _move_z(shape: Sequence[int], z_axis: int | None) -> tuple[list[int], int]:
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
    moved_out, first = _move_z(new_shape, z_axis)
    moved = torch.from_numpy(np.ascontiguousarray(np.moveaxis(labels, first, 0)))
    channels = [lambda lo, hi, v=int(v): (moved[lo:hi] == v).float() for v in values]
    index = resampled_argmax(channels, [labels.shape[first]], moved_out, z_axis)
    return np.moveaxis(values.astype(labels.dtype)[index], 0, first)


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


# --- forward -------------------------------------------------------------------------------------------

def _image_modality(plan: dict[str, Any], modality: str | None) -> str:
    if modality is not None:
        return modality
    modalities = {d["modality"] for d in plan["datasets"]}
    return modalities.pop() if len(modalities) == 1 else "mixed"


def _forward(data: np.ndarray, img: nib.Nifti1Image, plan: dict[str, Any], modality: str | None,
             labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    transform = ras_transform(img.affine)
    spacing = spacing_of(img)
    ras_spacing = [float(s) for s in ras_order(spacing, transform)]
    data = to_ras(data, transform)
    modality = _image_modality(plan, modality)
    bbox = crop_bbox(data, modality, plan.get("crop", {}).get("ct_threshold", CT_BODY_THRESHOLD))
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    cropped = data[box]
    normalised, stats = normalise(cropped, plan["normalization"])
    target = [float(s) for s in plan["target_spacing"]]
    new_shape = resampled_shape(cropped.shape, ras_spacing, target)
    z_axis = separate_z_axis(ras_spacing, target)
    image = resample_image(normalised, new_shape, z_axis)[None]
    properties = {
        "plan_hash": plan["hash"],
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
        "normalization": {"scheme": plan["normalization"]["scheme"], **stats},
    }
    seg = None
    if labels is not None:
        labels = to_ras(labels, transform)
        inside = labels[box]
        properties["foreground_outside_crop"] = int(np.count_nonzero(labels)) - int(np.count_nonzero(inside))
        seg = resample_labels(np.ascontiguousarray(inside), new_shape, z_axis)[None]
    return image, seg, properties


def preprocess_image(image: nib.Nifti1Image | str | os.PathLike, plan: dict[str, Any],
                     modality: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One image -> float32 (1,X,Y,Z) in the plan's space, and the properties that undo it.

    ``modality`` (CT/MR) picks the crop rule; by default the plan's modality."""
    path = image if isinstance(image, str | os.PathLike) else (image.get_filename() or "<image>")
    img = load_nifti(image) if isinstance(image, str | os.PathLike) else image
    data = read_array(img, path, np.float32)
    if not np.isfinite(data).all():
        raise CaseError(path, "image contains NaN or infinite intensities")
    array, _, properties = _forward(data, img, plan, modality)
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


def preprocess_case(image_path: str | os.PathLike, label_path: str | os.PathLike | None, plan: dict[str, Any],
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
    image, seg, properties = _forward(data, img, plan, modality, codes)
    properties["label_system"] = label_system
    properties["label_sets"] = {str(c): sorted(s) for c, s in LABEL_SETS.items() if c >= NUM_CLASSES}
    if seg is not None:
        properties["class_locations"] = _class_locations(seg[0], zlib.crc32(Path(image_path).name.encode()))
    return image, seg, properties


# --- inverse -------------------------------------------------------------------------------------------

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


def restore_to_original(logits: torch.Tensor | np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Logits/probabilities (C,X,Y,Z) in preprocessed space -> uint8 class map in the original array
    geometry: linear resampling to the cropped region and argmax, a few slices at a time (memory stays
    far below C x the full volume; a GPU tensor is resampled on its GPU), pasted into the full volume,
    RAS reorientation undone."""
    _check_preprocessed_shape(logits.shape[1:], properties, "logits")
    z_axis = properties["z_axis"]
    moved_out, first = _move_z(properties["shape_after_crop"], z_axis)

    def channel(c: int) -> Callable[[int, int], torch.Tensor]:
        def slab(lo: int, hi: int) -> torch.Tensor:
            index = [slice(None)] * 3
            index[first] = slice(lo, hi)
            part = logits[c][tuple(index)]
            if isinstance(part, torch.Tensor):
                return part.detach().float().movedim(first, 0)
            return torch.from_numpy(np.array(part, dtype=np.float32)).movedim(first, 0)
        return slab

    index = resampled_argmax([channel(c) for c in range(logits.shape[0])], [logits.shape[1 + first]],
                             moved_out, z_axis)
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


# --- the cache -----------------------------------------------------------------------------------------

def _source_stamp(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array))


def _array_ok(path: Path, shape: Sequence[int], dtype: np.dtype) -> bool:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == tuple(shape) and array.dtype == dtype


def cached_properties(cache_dir: Path, case: str, plan_hash: str,
                      sources: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The case's properties if its cache is complete, readable and built with ``plan_hash`` (and, when
    given, from these exact source files); ``None`` when it must be (re)built."""
    try:
        properties = json.loads((cache_dir / f"{case}.json").read_text())
    except (OSError, ValueError):
        return None
    if properties.get("plan_hash") != plan_hash:
        return None
    if sources is not None and properties.get("sources") != sources:
        return None
    shape = [1, *properties["shape_after_resample"]]
    if not _array_ok(cache_dir / f"{case}.npy", shape, np.dtype(np.float32)):
        return None
    if properties.get("labelled") and not _array_ok(cache_dir / f"{case}_seg.npy", shape, np.dtype(np.uint8)):
        return None
    return properties


def case_files(dataset_dir: Path, case: str) -> tuple[Path, Path | None]:
    image = dataset_dir / "imagesTr" / f"{case}_0000.nii.gz"
    label = dataset_dir / "labelsTr" / f"{case}.nii.gz"
    return image, (label if label.exists() else None)


def cache_case(dataset_dir: Path, case: str, plan: dict[str, Any], cache_dir: Path,
               dataset: dict[str, Any]) -> dict[str, Any]:
    """Preprocess one training case of a unified dataset into ``cache_dir`` (properties JSON written last,
    after the old one is removed, so a half-written case never looks valid)."""
    image_path, label_path = case_files(dataset_dir, case)
    image, seg, properties = preprocess_case(image_path, label_path, plan, dataset["label_system"],
                                             dataset["modality"])
    properties.update(case=case, dataset=dataset["name"], labelled=seg is not None,
                      sources={"image": _source_stamp(image_path), "label": _source_stamp(label_path)})
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / f"{case}.json").unlink(missing_ok=True)
    _save_npy(cache_dir / f"{case}.npy", image)
    if seg is not None:
        _save_npy(cache_dir / f"{case}_seg.npy", seg)
    else:
        (cache_dir / f"{case}_seg.npy").unlink(missing_ok=True)
    write_text_atomic(cache_dir / f"{case}.json", json.dumps(properties, separators=(",", ":")))
    return properties


def load_or_rebuild_case(cache_dir: Path, case: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Properties of a cached case; a missing, corrupt or stale case is rebuilt from the source dataset
    recorded in the cache manifest."""
    properties = cached_properties(cache_dir, case, plan["hash"])
    if properties is not None:
        return properties
    manifest = json.loads((cache_dir / CACHE_MANIFEST).read_text())
    dataset = {key: manifest[key] for key in ("name", "modality", "label_system")}
    return cache_case(Path(manifest["dataset_dir"]), case, plan, cache_dir, dataset)


def _cache_job(job: tuple[Path, str, dict, Path, dict]) -> str:
    dataset_dir, case, plan, cache_dir, dataset = job
    cache_case(dataset_dir, case, plan, cache_dir, dataset)
    return case


def training_cases(dataset_dir: Path) -> list[str]:
    splits = dataset_dir / "splits.json"
    if splits.exists():
        return list(json.loads(splits.read_text()).get("train", []))
    images = (dataset_dir / "imagesTr").glob("*_0000.nii.gz")
    return sorted(p.name.removesuffix("_0000.nii.gz") for p in images)


def preprocess_dataset(dataset_dir: str | os.PathLike, plan_path: str | os.PathLike,
                       out_dir: str | os.PathLike | None = None, num_workers: int = 1, *,
                       failures: FailureLog | None = None, progress: Progress | None = None) -> Path:
    """Fill the cache of a unified dataset's training cases for a plan; returns the cache folder
    (default ``{plan folder}/{dataset name}``).

    Idempotent: a case whose cache matches the plan hash and its source files' size/mtime is skipped; a
    changed plan or a corrupt file rebuilds it. A failing case (e.g. labels outside the dataset's label
    system) does not stop the others; the failures are added to ``failures`` when given, else raised
    together as :class:`PreprocessingFailed` at the end."""
    dataset_dir, plan_path = Path(dataset_dir), Path(plan_path)
    plan = json.loads(plan_path.read_text())
    dataset = json.loads((dataset_dir / "dataset.json").read_text())
    dataset_info = {k: dataset[k] for k in ("name", "modality", "label_system")}
    cache_dir = Path(out_dir) if out_dir is not None else plan_path.parent / dataset["name"]
    cases = training_cases(dataset_dir)
    todo = []
    for case in cases:
        image, label = case_files(dataset_dir, case)
        sources = {"image": _source_stamp(image) if image.exists() else None, "label": _source_stamp(label)}
        if cached_properties(cache_dir, case, plan["hash"], sources) is None:
            todo.append(case)
    jobs = [(dataset_dir, case, plan, cache_dir, dataset_info) for case in todo]
    remove_stale_temporaries(cache_dir)  # left by a run that was killed while writing
    results = map_cases(_cache_job, jobs, num_workers=num_workers, context="spawn",
                        initializer=torch.set_num_threads, initargs=(1,), expected=CACHE_ERRORS,
                        path_of=lambda job: case_files(job[0], job[1])[0], description=f"preprocess {dataset['name']}",
                        progress=progress)
    errors = [str(failure) for failure in failures_of(results)]
    failed = {job[1] for job, result in zip(jobs, results, strict=True) if isinstance(result, CaseFailure)}
    done = [case for case in cases if case not in failed]
    labelled = [case for case in done if case_files(dataset_dir, case)[1] is not None]
    manifest = {**dataset_info, "dataset_dir": str(dataset_dir.resolve()), "plan_hash": plan["hash"],
                "cases": done, "labelled_cases": labelled}
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_dir / CACHE_MANIFEST, json.dumps(manifest, indent=1))
    print(f"preprocess {dataset['name']}: {len(jobs) - len(errors)} built, {len(cases) - len(jobs)} up to "
          f"date, {len(errors)} failed -> {cache_dir}", flush=True)
    if errors:
        if failures is None:
            raise PreprocessingFailed(errors)
        for message in errors:
            failures.add(message)
    return cache_dir
