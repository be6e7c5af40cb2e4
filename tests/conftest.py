"""Shared test helpers: where the real example scans live, and a writer for small NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real is not present")


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path
