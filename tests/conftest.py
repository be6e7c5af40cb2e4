"""Shared test helpers: where the real example scans live, and a writer for small NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL = SHARED / "data" / "real"
CONF_DIR = Path(__file__).resolve().parents[1] / "aeval" / "conf"

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real is not present")
# CT foreground voxels the tests' plans sample: nnU-Net's 1e8 (the default, for nnU-Net's exact statistics) costs
# ~5-10 s per fingerprint whatever the data size; tests of anything but the statistics use a small sample
FAST_INTENSITY_SAMPLES = 100_000
FAST_PLAN = f"plan.intensity_samples={FAST_INTENSITY_SAMPLES}"


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def affine_for(axcodes: str, spacing, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """An affine whose array axes point along ``axcodes`` (e.g. "LPS") with voxel sizes ``spacing`` (array order)."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, (world, sign) in enumerate(orientations.axcodes2ornt(axcodes)):
        affine[int(world), axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    return affine


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny networks on a shared 2-core machine: one OpenMP thread is several times faster under load. Session
    scope, so fixtures of every scope and the tests they feed compute with the same thread count."""
    previous, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what aeval.cpu's thread defaults (predict, score workers) respect
    yield
    torch.set_num_threads(previous)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
