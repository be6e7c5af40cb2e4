"""Convert a raw download (official layout) into the unified layout every later stage reads.

Unified layout, nnU-Net v2 raw style, at ``{data_root}/{name}/``::

    imagesTr/{case}_0000.nii.gz   labelsTr/{case}.nii.gz     (training split)
    imagesTs/{case}_0000.nii.gz   labelsTs/{case}.nii.gz     (test split: A-Eval's validation sets)
    dataset.json   {"name", "modality", "label_system", "channel_names", "labels", "numTraining", "numTest", ...}
    splits.json    {"train": [...], "test": [...]}

Labels keep their native numbering (the label system is recorded in dataset.json) and images are copied
byte for byte, so geometry and header stay untouched. TotalSegmentator's per-structure masks are merged
into one map in class-map order, later structures overwriting earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from aeval.data.registry import DatasetSpec, RawCase
from aeval.labels import get_system
from aeval.nifti import (
    CaseError,
    FailureLog,
    atomic_path,
    check_same_geometry,
    load_nifti,
    read_array,
    read_image,
    read_label,
    save_nifti,
    spacing_of,
    write_text_atomic,
)

SPLIT_FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
MANIFEST = ".converted.json"


@dataclass
class ConvertedCase:
    case: str
    split: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    orientation: str
    labels_present: list[int]
    source_key: str


@dataclass
class ConversionSummary:
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
    parts = []
    for f in files:
        st = f.stat() if f.exists() else None
        parts.append(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


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


def convert_case(raw: RawCase, spec: DatasetSpec, out_dir: Path) -> ConvertedCase:
    """Validate one raw case and write it into the unified layout (atomically). Raises CaseError."""
    image_folder, label_folder = SPLIT_FOLDERS[raw.split]
    data, image = read_image(raw.image)
    present: list[int] = []
    if raw.label is not None:
        if spec.layout == "totalseg":
            labels = merge_totalseg(raw.label, image, spec.label_system)
        else:
            labels, label_img = read_label(raw.label)
            check_same_geometry(image, label_img, raw.label)
        try:
            get_system(spec.label_system).check_values(labels, what=str(raw.label))
        except ValueError as err:
            raise CaseError(raw.label, str(err).split(": ", 1)[1]) from None
        present = [int(v) for v in np.unique(labels) if v]
        label_out = out_dir / label_folder / f"{raw.case}.nii.gz"
        if spec.layout == "totalseg":
            save_nifti(labels, image.affine, label_out, header=image.header)
        else:
            _copy_atomic(raw.label, label_out)
    _copy_atomic(raw.image, out_dir / image_folder / f"{raw.case}_0000.nii.gz")
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


def _convert_or_error(args: tuple[RawCase, DatasetSpec, Path]) -> ConvertedCase | CaseError:
    raw, spec, out_dir = args
    try:
        return convert_case(raw, spec, out_dir)
    except CaseError as err:
        return err
    except (OSError, ValueError, EOFError) as err:
        return CaseError(raw.image, f"{type(err).__name__}: {err}")


def convert_dataset(spec: DatasetSpec, data_root: Path, *, num_workers: int = 1, failures: FailureLog | None = None,
                    progress=None) -> ConversionSummary:
    """Convert every case of ``spec`` into ``data_root/spec.name``; unchanged cases are skipped."""
    failures = failures or FailureLog()
    out_dir = Path(data_root) / spec.name
    summary = ConversionSummary(spec.name, spec.modality, spec.label_system)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    todo, done = [], {}
    for raw in spec.find_cases():
        previous = manifest.get(raw.case)
        image_folder, label_folder = SPLIT_FOLDERS[raw.split]
        outputs_exist = (out_dir / image_folder / f"{raw.case}_0000.nii.gz").exists() and (
            raw.label is None or (out_dir / label_folder / f"{raw.case}.nii.gz").exists())
        if previous and outputs_exist and previous["source_key"] == _source_key(raw) and previous["split"] == raw.split:
            done[raw.case] = ConvertedCase(**{**previous, "spacing": tuple(previous["spacing"]),
                                              "shape": tuple(previous["shape"])})
            summary.skipped += 1
        else:
            todo.append(raw)
    task = progress.add_task(f"convert {spec.name}", total=len(todo)) if progress is not None else None
    jobs = [(raw, spec, out_dir) for raw in todo]
    if num_workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(num_workers) as pool:
            results = list(_tick(pool.map(_convert_or_error, jobs), progress, task))
    else:
        results = list(_tick(map(_convert_or_error, jobs), progress, task))
    for raw, result in zip(todo, results, strict=True):
        if isinstance(result, CaseError):
            failures.add(result)
            summary.failed.append(str(result))
            manifest.pop(raw.case, None)
        else:
            done[raw.case] = result
    summary.cases = sorted(done.values(), key=lambda c: (c.split, c.case))
    if summary.cases:
        _write_metadata(spec, out_dir, summary)
        write_text_atomic(manifest_path, json.dumps({c.case: c.__dict__ for c in summary.cases}, indent=1))
    return summary


def _tick(results, progress, task):
    for result in results:
        if progress is not None:
            progress.advance(task)
        yield result


def _write_metadata(spec: DatasetSpec, out_dir: Path, summary: ConversionSummary) -> None:
    system = get_system(spec.label_system)
    splits = {split: [c.case for c in summary.cases if c.split == split] for split in SPLIT_FOLDERS}
    dataset = {
        "name": spec.name,
        "description": f"{spec.name} converted by aeval from {spec.raw_dir}",
        "modality": spec.modality,
        "label_system": spec.label_system,
        "channel_names": {"0": spec.modality},
        "labels": {"background": 0, **{name: i for i, name in sorted(system.names.items())}},
        "numTraining": len(splits["train"]),
        "numTest": len(splits["test"]),
        "labelled": spec.has_labels(),
        "file_ending": ".nii.gz",
    }
    write_text_atomic(out_dir / "dataset.json", json.dumps(dataset, indent=2))
    write_text_atomic(out_dir / "splits.json", json.dumps(splits, indent=2))
