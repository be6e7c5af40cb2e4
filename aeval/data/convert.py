"""Convert a raw download (official layout) into the unified layout every later stage reads.

The unified layout (nnU-Net v2 raw style, at ``{data_root}/{name}/``) is :mod:`aeval.dataset`'s.

Labels keep their native numbering (the label system is recorded in dataset.json) and images are copied
byte for byte, so geometry and header stay untouched. TotalSegmentator's per-structure masks are merged
into one map in class-map order, later structures overwriting earlier ones; the dataset's ``label_system``
(``totalseg_v1``, ``totalseg_v2``, ``totalseg_mr``) says which structure files a case folder holds.

WORD for the 2025 edition (``label_system: word2025``, ``split_adrenals: midline``): A-Eval 2025 split WORD's
merged adrenal label (12) into 12 = left and 17 = right with a rule it did not publish. Ours, see
:func:`split_word_adrenals`, is by the side of the body midline of each adrenal component; such labels are
rewritten (uint8), not copied.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from aeval.data.registry import DatasetSpec, RawCase
from aeval.dataset import SPLITS, UnifiedDataset
from aeval.errors import CaseError, CaseFailure, FailureLog
from aeval.labels import get_system
from aeval.nifti import (
    atomic_path,
    check_same_geometry,
    file_stamp,
    load_nifti,
    read_array,
    read_image,
    read_label,
    remove_stale_temporaries,
    save_nifti,
    spacing_of,
    write_text_atomic,
)
from aeval.parallel import map_cases

MANIFEST = ".converted.json"


@dataclass
class ConvertedCase:
    """One case written into the unified layout: its split, geometry and the labels present."""

    case: str
    split: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    orientation: str
    labels_present: list[int]
    source_key: str


@dataclass
class ConversionSummary:
    """What one dataset's conversion did: the cases written or kept, and the failures."""

    name: str
    modality: str
    label_system: str
    cases: list[ConvertedCase] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def per_split(self) -> dict[str, int]:
        return dict(Counter(c.split for c in self.cases))


def _source_key(raw: RawCase) -> str:
    """Changes when any source file of the case changes (path, size, mtime)."""
    files = [raw.image]
    if raw.label is not None:
        files += sorted(raw.label.glob("*.nii.gz")) if raw.label.is_dir() else [raw.label]
    stamps = [file_stamp(f) or {"path": str(f)} for f in files]
    return hashlib.sha1(json.dumps(stamps).encode()).hexdigest()


def merge_totalseg(folder: Path, reference: nib.Nifti1Image, system: str, *, missing_ok: bool = False) -> np.ndarray:
    """One label map from ``segmentations/<name>.nii.gz`` masks, in the class map's id order (later ids
    overwrite earlier ones). ``missing_ok`` treats an absent mask as empty (TotalSegmentator's ``--roi_subset``
    output), but a folder without any of the system's masks is still an error."""
    if not folder.is_dir():
        raise CaseError(folder, "segmentations folder not found")
    merged = np.zeros(reference.shape, dtype=np.uint8)
    names = sorted(get_system(system).names.items())
    if missing_ok and not any((folder / f"{name}.nii.gz").exists() for _, name in names):
        raise CaseError(folder, f"no mask of label system {system} (<structure>.nii.gz) in the folder")
    for label_id, name in names:
        path = folder / f"{name}.nii.gz"
        if missing_ok and not path.exists():
            continue
        mask_img = load_nifti(path)
        check_same_geometry(reference, mask_img, path)
        merged[read_array(mask_img, path) > 0] = label_id
    return merged


WORD_ADRENALS, WORD_LEFT_ADRENAL, WORD_RIGHT_ADRENAL = 12, 12, 17
WORD_KIDNEY_LEFT, WORD_KIDNEY_RIGHT = 3, 4
BODY_HU = -500.0  # voxels above this are body (or table) when the kidneys cannot give the midline


def body_midline_x(labels: np.ndarray, affine: np.ndarray, image: np.ndarray | None = None) -> float:
    """World x (RAS+, mm) of the body midline: halfway between the two kidneys' centroids when both are
    labelled (WORD labels them; they flank the spine), else the centroid of the voxels above -500 HU, else
    the volume centre."""
    def world_x(index: np.ndarray) -> float:
        return float(affine[0, :3] @ index + affine[0, 3])

    kidneys = [labels == k for k in (WORD_KIDNEY_LEFT, WORD_KIDNEY_RIGHT)]
    if all(k.any() for k in kidneys):
        return float(np.mean([world_x(np.array(ndimage.center_of_mass(k))) for k in kidneys]))
    if image is not None and (image > BODY_HU).any():
        return world_x(np.array(ndimage.center_of_mass(image > BODY_HU)))
    return world_x((np.array(labels.shape) - 1) / 2.0)


def split_word_adrenals(labels: np.ndarray, affine: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """WORD labels in the 2025 style: each 26-connected component of label 12 (both adrenals) becomes 17
    (right adrenal) when its centroid lies right of :func:`body_midline_x` (world x larger in RAS+), else stays
    12 (left adrenal). aeval's rule; A-Eval's own is unpublished. Labels that already hold a 17 are returned
    unchanged (already post-processed)."""
    adrenals = labels == WORD_ADRENALS
    if (labels == WORD_RIGHT_ADRENAL).any() or not adrenals.any():
        return labels
    midline = body_midline_x(labels, affine, image)
    components, n = ndimage.label(adrenals, structure=np.ones((3, 3, 3), bool))
    centroids = np.array(ndimage.center_of_mass(adrenals, components, range(1, n + 1))).reshape(n, 3)
    right = centroids @ affine[0, :3] + affine[0, 3] > midline
    out = labels.copy()
    out[np.isin(components, np.flatnonzero(right) + 1)] = WORD_RIGHT_ADRENAL
    return out


def convert_case(raw: RawCase, spec: DatasetSpec, out_dir: Path) -> ConvertedCase:
    """Validate one raw case and write it into the unified layout (atomically). Raises CaseError."""
    data, image = read_image(raw.image)
    present: list[int] = []
    if raw.label is not None:
        if spec.layout == "totalseg":
            labels = merge_totalseg(raw.label, image, spec.label_system)
        else:
            labels, label_img = read_label(raw.label)
            check_same_geometry(image, label_img, raw.label)
        rewritten = spec.layout == "totalseg"
        if spec.split_adrenals:
            split = split_word_adrenals(labels, image.affine, data)
            rewritten, labels = split is not labels, split
        try:
            get_system(spec.label_system).check_values(labels, what=str(raw.label))
        except ValueError as err:
            raise CaseError(raw.label, str(err).split(": ", 1)[1]) from None
        present = [int(v) for v in np.unique(labels) if v]
    unified = UnifiedDataset(out_dir)
    image_out, label_out = unified.image(raw.case, raw.split), unified.label(raw.case, raw.split)
    try:  # image first, label last: a case is complete or absent (a label alone would look labelled)
        _copy_atomic(raw.image, image_out)
        if raw.label is not None:
            if spec.layout == "totalseg":
                save_nifti(labels, image.affine, label_out, header=image.header)
            elif rewritten:
                save_nifti(labels.astype(np.uint8), label_img.affine, label_out, header=label_img.header)
            else:
                _copy_atomic(raw.label, label_out)
    except BaseException:
        image_out.unlink(missing_ok=True)
        label_out.unlink(missing_ok=True)
        raise
    return ConvertedCase(
        case=raw.case, split=raw.split, spacing=spacing_of(image), shape=tuple(int(s) for s in data.shape),
        orientation="".join(nib.aff2axcodes(image.affine)), labels_present=present, source_key=_source_key(raw),
    )


def _copy_atomic(source: Path, target: Path) -> None:
    if source.name.endswith(".nii.gz"):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:  # an uncompressed or other-format source is rewritten as .nii.gz with its header
        img = nib.load(str(source))
        save_nifti(np.asanyarray(img.dataobj), img.affine, target, header=img.header)


def _convert_one(args: tuple[RawCase, DatasetSpec, Path]) -> ConvertedCase:
    return convert_case(*args)


def convert_dataset(spec: DatasetSpec, data_root: Path, *, num_workers: int = 1, failures: FailureLog | None = None,
                    progress=None) -> ConversionSummary:
    """Convert every case of ``spec`` into ``data_root/spec.name``; unchanged cases are skipped."""
    failures = failures or FailureLog()
    out_dir = Path(data_root) / spec.name
    summary = ConversionSummary(spec.name, spec.modality, spec.label_system)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    todo, done = [], {}
    unified = UnifiedDataset(out_dir)
    found = spec.find_cases()
    for split in spec.splits:  # a configured split that finds nothing is a wrong layout, not an empty split
        if not any(raw.split == split for raw in found):
            problem = f"dataset '{spec.name}': no {split} cases (looked for {spec.describe_split(split)})"
            failures.add(CaseError(spec.raw_dir, problem))
            summary.failed.append(f"{spec.raw_dir}: {problem}")
    for raw in found:
        previous = manifest.get(raw.case)
        outputs_exist = unified.image(raw.case, raw.split).exists() and (
            raw.label is None or unified.label(raw.case, raw.split).exists())
        if previous and outputs_exist and previous["source_key"] == _source_key(raw) and previous["split"] == raw.split:
            done[raw.case] = ConvertedCase(**{**previous, "spacing": tuple(previous["spacing"]),
                                              "shape": tuple(previous["shape"])})
            summary.skipped += 1
        else:
            todo.append(raw)
    for folder in ["", *(f for pair in SPLITS.values() for f in pair)]:
        remove_stale_temporaries(out_dir / folder)  # left by a run that was killed while writing
    results = map_cases(_convert_one, [(raw, spec, out_dir) for raw in todo], num_workers=num_workers,
                        path_of=lambda job: job[0].image, description=f"convert {spec.name}", progress=progress)
    for raw, result in zip(todo, results, strict=True):
        if isinstance(result, CaseFailure):
            failures.add(result.as_error())
            summary.failed.append(str(result))
            manifest.pop(raw.case, None)
        else:
            done[raw.case] = result
    summary.cases = sorted(done.values(), key=lambda c: (c.split, c.case))
    if summary.cases:
        _write_metadata(spec, out_dir, summary)
        write_text_atomic(manifest_path, json.dumps({c.case: c.__dict__ for c in summary.cases}, indent=1))
    return summary


def _write_metadata(spec: DatasetSpec, out_dir: Path, summary: ConversionSummary) -> None:
    splits = {split: [c.case for c in summary.cases if c.split == split] for split in SPLITS}
    UnifiedDataset(out_dir).write_metadata(splits, name=spec.name, modality=spec.modality,
                                           description=f"{spec.name} converted by aeval from {spec.raw_dir}",
                                           label_system=spec.label_system, labelled=spec.has_labels())
