"""NIfTI reading and writing with the project's two rules: bad input is one clear line naming the file,
and nothing is ever left half-written (write to a temporary name in the same folder, then rename)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from aeval.errors import CaseError

log = logging.getLogger(__name__)
TEMP_MARK = ".tmp"

_UMASK = os.umask(0)
os.umask(_UMASK)


def load_nifti(path: str | os.PathLike, *, ndim: int = 3) -> nib.Nifti1Image:
    """Open a NIfTI image and check it is readable and ``ndim``-dimensional (data is read lazily)."""
    path = Path(path)
    if not path.exists():
        raise CaseError(path, "file not found")
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as err:  # nibabel raises many types for corrupt files
        raise CaseError(path, f"unreadable NIfTI ({type(err).__name__}: {err})") from None
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != ndim:
        raise CaseError(path, f"expected a {ndim}-D image, got shape {tuple(shape)}")
    return img


def read_array(img: nib.Nifti1Image, path: str | os.PathLike, dtype=None) -> np.ndarray:
    """The voxel data (scaled, as ``dtype`` if given); a truncated or corrupt payload is a CaseError."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise CaseError(path, f"unreadable voxel data ({type(err).__name__}: {err})") from None
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """An intensity image as float32, refusing NaN/inf values."""
    img = load_nifti(path)
    data = read_array(img, path, np.float32)
    if not np.isfinite(data).all():
        raise CaseError(path, "image contains NaN or infinite intensities")
    return data, img


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A label map as integers (non-integer values are an error)."""
    img = load_nifti(path)
    data = read_array(img, path)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or np.any(data != np.round(data)):
            raise CaseError(path, "label map has non-integer values")
    return data.astype(np.int32 if data.dtype.itemsize > 1 or data.dtype.kind == "f" else data.dtype), img


def check_same_geometry(
    image: nib.Nifti1Image, label: nib.Nifti1Image, label_path: str | os.PathLike, atol: float = 1e-3
) -> None:
    """Image and label must share shape and affine (within ``atol`` mm)."""
    if tuple(image.shape[:3]) != tuple(label.shape[:3]):
        raise CaseError(label_path, f"shape {tuple(label.shape)} does not match image shape {tuple(image.shape)}")
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise CaseError(label_path, "affine does not match the image's affine")


def spacing_of(img: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel size in array-axis order, from the header zooms (what the published scoring uses)."""
    return tuple(float(z) for z in img.header.get_zooms()[:3])


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f"{TEMP_MARK}{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the permissions open() would
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike,
               header: nib.Nifti1Header | None = None) -> Path:
    """Write atomically; with ``header`` the original header (qform/sform codes, units) is kept."""
    img = nib.Nifti1Image(data, affine, header=header)
    if header is not None:
        img.set_data_dtype(data.dtype)
        img.header.set_slope_inter(1, 0)
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def file_stamp(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Path, size and modification time of a file (None for no file): a cached result stays valid while its
    source files' stamps are unchanged (conversion, the fingerprint and the preprocessing cache all check it)."""
    if path is None or not Path(path).exists():
        return None
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def remove_stale_temporaries(folder: str | os.PathLike, older_than: float = 60.0) -> list[Path]:
    """Delete the hidden temporaries (``.name.XXXX.tmp...``) that :func:`atomic_path` leaves when a process is
    killed mid-write; a stage calls it on the folders it writes. Files touched in the last ``older_than``
    seconds are kept: another process may be writing them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than
    removed = []
    for path in folder.glob(f".*.*{TEMP_MARK}*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # renamed or removed by its writer meanwhile
            continue
    if removed:
        log.warning("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))
    return removed


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | os.PathLike) -> bool:
    """A NIfTI file by its name, in any letter case (``.NII.GZ`` too); hidden and temporary files are not."""
    name = Path(path).name
    return name.lower().endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def nifti_case_name(path: str | os.PathLike) -> str:
    """``amos_0013_0000.nii.gz`` (or ``.NII.GZ``) -> ``amos_0013``: the suffix and nnU-Net's channel dropped."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[: -len("_0000")] if name.endswith("_0000") else name


def nifti_cases(paths: list[Path]) -> tuple[dict[str, Path], list[CaseError]]:
    """The files by case name, and one error per case that two files claim (``x.nii.gz`` and
    ``x_0000.nii.gz``): such a case is left out rather than one of the files picked silently."""
    by_case: dict[str, list[Path]] = {}
    for path in sorted(paths):
        by_case.setdefault(nifti_case_name(path), []).append(path)
    errors = [CaseError(found[0], f"case '{case}' has {len(found)} files: {', '.join(p.name for p in found)}; "
                        "keep one") for case, found in by_case.items() if len(found) > 1]
    return {case: found[0] for case, found in by_case.items() if len(found) == 1}, errors
