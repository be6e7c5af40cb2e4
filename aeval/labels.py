"""Label systems of the A-Eval datasets and the name-based mappings between them.

Every system is a table ``id -> organ name``; all mappings (to the 8 or 10 evaluation organs, to the
FLARE22 training space) go through the names, so no id table is ever written twice. Organ names
follow TotalSegmentator's spelling (``kidney_right``, ``inferior_vena_cava``...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import numpy as np

FLARE22_ORGANS = (
    "liver", "kidney_right", "spleen", "pancreas", "aorta", "inferior_vena_cava",
    "adrenal_gland_right", "adrenal_gland_left", "gallbladder", "esophagus", "stomach",
    "duodenum", "kidney_left",
)
AMOS_ORGANS = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "duodenum",
    "urinary_bladder", "prostate_uterus",
)
WORD_ORGANS = (
    "liver", "spleen", "kidney_left", "kidney_right", "stomach", "gallbladder", "esophagus", "pancreas",
    "duodenum", "colon", "small_bowel", "adrenal_glands", "rectum", "urinary_bladder", "femur_head_left",
    "femur_head_right",
)
BTCV_ORGANS = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left",
)
AEVAL8_ORGANS = (
    "liver", "kidney_right", "spleen", "pancreas", "gallbladder", "esophagus", "stomach", "kidney_left",
)
# aeval's own ten-class space (kept for the existing ``aeval10`` cells): the 2023 eight, then right and left
# adrenal. NOT the 2025 edition's numbering -- a file written by the 2025 A-Eval tooling is ``aeval2025``.
AEVAL10_ORGANS = AEVAL8_ORGANS + ("adrenal_gland_right", "adrenal_gland_left")
# The 2025 edition's evaluation numbering (``AEval_label`` of its ``label_systems.py``).
AEVAL2025_ORGANS = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "esophagus",
)
# WORD as the 2025 edition uses it: label 12 becomes the left adrenal and a new 17 the right one (A-Eval
# post-processed WORD with an unpublished rule; aeval's converter has its own, see aeval.data.convert).
WORD2025_ORGANS = (*WORD_ORGANS[:11], "adrenal_gland_left", *WORD_ORGANS[12:], "adrenal_gland_right")

# Structures that stand for several FLARE22 classes at once (WORD does not split the adrenals).
COMPOSITE_ORGANS = {"adrenal_glands": ("adrenal_gland_right", "adrenal_gland_left")}


@dataclass(frozen=True)
class LabelSystem:
    """A numbering of structures; id 0 is always background."""

    name: str
    names: dict[int, str] = field(repr=False)

    @property
    def max_id(self) -> int:
        return max(self.names)

    def id_of(self, organ: str) -> int | None:
        return next((i for i, n in self.names.items() if n == organ), None)

    def check_values(self, values: np.ndarray, what: str = "label map") -> None:
        """Raise ``ValueError`` naming the system and the values when a label is not in it."""
        present = np.unique(values)
        unknown = [int(v) for v in present if v != 0 and int(v) not in self.names]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise ValueError(f"{what}: values {shown} are not labels of system '{self.name}'")


def _numbered(organs: tuple[str, ...]) -> dict[int, str]:
    return {i + 1: name for i, name in enumerate(organs)}


def _load_json(filename: str) -> dict:
    return json.loads(resources.files("aeval.label_data").joinpath(filename).read_text())


@cache
def _systems() -> dict[str, LabelSystem]:
    ts_maps = _load_json("totalsegmentator_class_maps.json")
    alpha = {int(k): v for k, v in _load_json("totalsegmentator_104_alphabetical.json").items() if int(k)}
    tables = {
        "flare22": _numbered(FLARE22_ORGANS),
        "amos": _numbered(AMOS_ORGANS),
        "word": _numbered(WORD_ORGANS),
        "word2025": _numbered(WORD2025_ORGANS),
        "btcv": _numbered(BTCV_ORGANS),
        "totalseg_v1": {int(k): v for k, v in ts_maps["total_v1"].items()},
        "totalseg_v2": {int(k): v for k, v in ts_maps["total"].items()},
        "totalseg_mr": {int(k): v for k, v in ts_maps["total_mr"].items()},
        "totalseg_104_alpha": alpha,
        "aeval8": _numbered(AEVAL8_ORGANS),
        "aeval10": _numbered(AEVAL10_ORGANS),
        "aeval2025": _numbered(AEVAL2025_ORGANS),
    }
    return {name: LabelSystem(name, table) for name, table in tables.items()}


LABEL_SYSTEMS = tuple(_systems.__wrapped__().keys())


def get_system(name: str) -> LabelSystem:
    """The label system of that name (KeyError listing the known ones otherwise)."""
    systems = _systems()
    if name not in systems:
        raise KeyError(f"unknown label system '{name}'; known: {', '.join(systems)}")
    return systems[name]


@cache
def _lookup_table(source: str, target: str) -> np.ndarray:
    """``lut[source_id] = target_id`` (0 where the source structure has no single target class)."""
    src, dst = get_system(source), get_system(target)
    target_ids = {name: i for i, name in dst.names.items()}
    lut = np.zeros(src.max_id + 1, dtype=np.uint8)
    for i, name in src.names.items():
        lut[i] = target_ids.get(name, 0)
    return lut


def remap(labels: np.ndarray, source: str, target: str) -> np.ndarray:
    """Map a label map from one system to another by organ name (uint8; unmapped labels become 0).

    Raises ``ValueError`` naming the system and the values when ``labels`` holds ids outside ``source``.
    """
    labels = np.asarray(labels)
    system = get_system(source)
    if labels.size:
        if labels.min() < 0 or labels.max() > system.max_id:
            system.check_values(labels)
        present = np.flatnonzero(np.bincount(labels.ravel().astype(np.intp)))
        system.check_values(present)
    return _lookup_table(source, target)[labels.astype(np.intp, copy=False)]


def to_aeval8(labels: np.ndarray, system: str) -> np.ndarray:
    """The 8 A-Eval organs of the 2023 paper (liver, kidney_right, spleen, pancreas, gallbladder,
    esophagus, stomach, kidney_left); every other label becomes 0."""
    return remap(labels, system, "aeval8")


def to_aeval10(labels: np.ndarray, system: str) -> np.ndarray:
    """aeval's ten classes: the 8 organs plus right and left adrenal, in aeval's order (not the 2025
    edition's: see :func:`to_aeval2025`). WORD's merged adrenal label cannot be split and becomes 0."""
    return remap(labels, system, "aeval10")


def to_aeval2025(labels: np.ndarray, system: str) -> np.ndarray:
    """The 2025 A-Eval numbering (1 spleen, 2 kidney_right, 3 kidney_left, 4 gallbladder, 5 liver, 6 stomach,
    7 pancreas, 8/9 adrenal right/left, 10 esophagus). WORD needs ``word2025`` (split adrenals) here."""
    return remap(labels, system, "aeval2025")


# --- FLARE22 training space -------------------------------------------------------------------------

def flare22_sets(system: str) -> dict[int, frozenset[int]]:
    """For each label of ``system``, the set of FLARE22 classes it stands for (only labels that stand
    for at least one). WORD's ``adrenal_glands`` -> {7, 8}."""
    flare_ids = {name: i for i, name in get_system("flare22").names.items()}
    sets = {}
    for i, name in get_system(system).names.items():
        parts = COMPOSITE_ORGANS.get(name, (name,))
        classes = frozenset(flare_ids[p] for p in parts if p in flare_ids)
        if classes:
            sets[i] = classes
    return sets


def annotated_classes(system: str) -> frozenset[int]:
    """The FLARE22 classes whose voxels a dataset in ``system`` labels (WORD: no aorta, no IVC)."""
    return frozenset().union(*flare22_sets(system).values())


def background_set(system: str) -> frozenset[int]:
    """What an unlabelled voxel of ``system`` may be: background or any class it does not annotate."""
    return frozenset({0}) | (frozenset(range(1, len(FLARE22_ORGANS) + 1)) - annotated_classes(system))


def to_flare22(labels: np.ndarray, system: str) -> np.ndarray:
    """Hard FLARE22-space targets: labels with exactly one FLARE22 class keep it, everything else -> 0.
    Use :func:`flare22_sets` for the set-valued (partial-label) targets."""
    return remap(labels, system, "flare22")


def match_system(labels: dict[str, int]) -> str | None:
    """The known system whose id -> name table is exactly ``labels`` (an nnU-Net dataset.json's ``labels``,
    name -> id, background included or not), or None."""
    table = {int(i): name for name, i in labels.items() if int(i) != 0}
    return next((name for name, system in _systems().items() if system.names == table), None)
