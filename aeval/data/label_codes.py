"""Labels as FLARE22 *codes*, what the preprocessing cache stores and the losses read.

Codes 0..13 are the FLARE22 classes; codes >= 14 stand for a SET of classes (:data:`LABEL_SETS`; WORD's single
adrenal label is code 14 = {right adrenal, left adrenal}), so the set survives for the partial-label loss.
Native labels that are not FLARE22 organs become 0.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from aeval.labels import COMPOSITE_ORGANS, FLARE22_ORGANS, flare22_sets, get_system

NUM_CLASSES = len(FLARE22_ORGANS) + 1


def _set_codes() -> dict[int, frozenset[int]]:
    flare = {name: i for i, name in get_system("flare22").names.items()}
    return {NUM_CLASSES + k: frozenset(flare[p] for p in parts)
            for k, (_, parts) in enumerate(sorted(COMPOSITE_ORGANS.items()))}


# code -> the FLARE22 classes it stands for (codes < 14 are single classes).
LABEL_SETS: dict[int, frozenset[int]] = {c: frozenset({c}) for c in range(NUM_CLASSES)} | _set_codes()


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
