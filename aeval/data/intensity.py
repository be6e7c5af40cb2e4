"""CT foreground intensity statistics sampled exactly as nnU-Net v2 samples them, so the CT normalisation of an
aeval plan equals the one ``nnUNetv2_plan_and_preprocess`` computes from the same files.

nnU-Net 2.x (``DatasetFingerprintExtractor``): per training case, the voxels labelled > 0 inside the bounding
box of the non-zero image voxels (its crop to non-zero), taken in SimpleITK's array order ((z, y, x) of the
stored orientation, i.e. the nibabel array transposed); a fresh ``np.random.RandomState(1234)`` draws
``1e8 // num_cases`` of them with replacement. The samples of all cases are pooled in case order and
summarised with numpy in float32 (mean, std, ``np.percentile`` at 0.5 / 50 / 99.5). The order matters: the
same seed picks other voxels from the same set when they are listed in another order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NNUNET_TOTAL_SAMPLES = 100_000_000  # nnU-Net's num_foreground_voxels_for_intensitystats (10e7)
NNUNET_SEED = 1234                  # collect_foreground_intensities' default, the same for every case


def nonzero_box(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels (nnU-Net's crop; filling holes does not move it); whole image
    when every voxel is zero."""
    box = []
    for axis in range(image.ndim):
        other = tuple(a for a in range(image.ndim) if a != axis)
        hits = np.flatnonzero((image != 0).any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(None))
    return tuple(box)


def foreground_samples(image: np.ndarray, labels: np.ndarray, num_samples: int,
                       seed: int = NNUNET_SEED) -> np.ndarray:
    """``num_samples`` foreground intensities of one case drawn as nnU-Net draws them (``image`` and
    ``labels`` as nibabel stores them, not reoriented). A case without foreground gives nnU-Net's empty
    list (as a float64 array: pooled with it, nnU-Net's statistics are computed in float64)."""
    box = nonzero_box(image)
    # .T: SimpleITK's (z, y, x) array is the nibabel (x, y, z) array transposed; boolean indexing walks it in C order
    foreground = np.asarray(image[box], dtype=np.float32).T[np.asarray(labels[box]).T > 0]
    if not foreground.size:
        return np.empty(0)
    return np.random.RandomState(seed).choice(foreground, num_samples, replace=True)


def pooled_statistics(samples: Sequence[np.ndarray]) -> dict[str, float]:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry for the pooled samples of all cases
    (in case order), plus their number."""
    pooled = np.concatenate(list(samples))
    percentile_00_5, median, percentile_99_5 = np.percentile(pooled, np.array((0.5, 50.0, 99.5)))
    return {
        "mean": float(np.mean(pooled)), "median": float(median), "std": float(np.std(pooled)),
        "min": float(np.min(pooled)), "max": float(np.max(pooled)),
        "percentile_99_5": float(percentile_99_5), "percentile_00_5": float(percentile_00_5),
        "num_samples": int(pooled.size),
    }
