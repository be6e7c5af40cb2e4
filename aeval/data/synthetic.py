"""Synthetic A-Eval-mini: phantom abdomens written in each dataset's official RAW layout.

The real converters run on these files exactly as on real downloads, so the whole pipeline (convert, plan,
train, evaluate, report) can be exercised on a laptop in minutes. Every case is rendered in world
coordinates (mm) from one phantom anatomy with per-case variation; each dataset then sees it through its
own acquisition profile (field of view, spacing, orientation, dtype, contrast phase, noise, HU offset,
MR contrast) and its own label numbering, so training on one dataset and testing on another is a real
domain shift, not a copy.

Per-dataset profile (documented choice; the real datasets vary more):

=========  =========  ===========================  ===============  ========================================
dataset    axcodes    image / label dtype          spacing (mm)     intensity
=========  =========  ===========================  ===============  ========================================
FLARE22    L,P,S      int16 / uint8                ~6 x 6 x 5-7.5   mixed phases, noise 14 HU
AMOS CT    L,A,S      float32 / uint16             ~6 x 6 x 7.5     portal (some arterial), noise 22, +15 HU
AMOS MR    L,A,S      float32 / uint16             ~7 x 7 x 8       T2-like, bias field, Rician noise
WORD       R,A,S      uint16 + scl_inter -1024     ~6 x 6 x 6       portal, noise 9, -10 HU
                      / int16
TotalSeg   R,A,S      int32 / uint8 masks          ~6 isotropic     native/arterial/portal/delayed, noise 16
BTCV       L,P,S      int16 / float32              ~6 x 6 x 7       portal, noise 18, -5 HU
TS v2      R,A,S      int16 / uint8 masks          ~6 isotropic     native/arterial/portal/delayed, noise 12
TS MR      L,P,S      float32 / uint8 masks        ~7 x 7 x 6       T2-like, bias field, Rician noise
=========  =========  ===========================  ===============  ========================================

FLARE22 is L,P,S like NIfTIs converted from DICOM by ITK; AMOS L,A,S like the real ``amos_0013`` label;
TotalSegmentator R,A,S like its example files; WORD stores unsigned values with a -1024 rescale like
many DICOM conversions. FLARE22 and BTCV fields of view cover the abdomen, AMOS CT and WORD reach the
pelvis (bladder, prostate, femoral heads), AMOS MR only the upper abdomen. Of every five TotalSegmentator
cases of a split, the third is centred on the thorax and the fifth on the pelvis (organs cut off or
absent). TotalSegmentator v2 (117 structure files, ``TotalSegmentatorV2/``) and TotalSegmentator MRI (50
files, ``mri.nii.gz``, ``TotalSegmentatorMRI/``) have the same folder layout with their own ``meta.csv``; WORD
also writes its test split (``imagesTs``/``labelsTs``, which the 2025 edition tests on). Datasets added later
draw from their own random streams, so the older datasets' files stay byte-identical for a seed.
The anatomy frame is RAS+ in mm with 0 at the kidney hila; each case sits at a random scanner
position, so no stage can rely on absolute world coordinates.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from aeval.labels import COMPOSITE_ORGANS, get_system
from aeval.nifti import atomic_path, save_nifti, write_text_atomic

# --- configuration ------------------------------------------------------------------------------------

DEFAULT_CASES: dict[str, dict[str, int]] = {
    "flare22": {"train": 6, "val": 4, "unlabeled": 4},
    "amos_ct": {"train": 6, "val": 4},
    "amos_mr": {"train": 4, "val": 3},
    "word": {"train": 6, "val": 4, "test": 3},
    "totalseg": {"train": 8, "val": 4, "test": 2},
    "btcv": {"train": 4},
    "totalseg_v2": {"train": 6, "test": 3},  # new datasets go last: DATASET_INDEX seeds each case's stream
    "totalseg_mr": {"train": 4, "test": 3},
}


@dataclass
class SyntheticConfig:
    """What to generate; mirrored by ``conf/mini/default.yaml``."""

    seed: int = 0
    size_scale: float = 1.0  # multiplies the voxel counts (and divides the spacing) of every volume
    cases: dict[str, dict[str, int]] = field(
        default_factory=lambda: {dataset: dict(splits) for dataset, splits in DEFAULT_CASES.items()})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> SyntheticConfig:
        """Defaults overridden by ``values`` (a dict or OmegaConf node); unknown keys are an error."""
        values = dict(values or {})
        unknown = set(values) - {"seed", "size_scale", "cases"}
        if unknown:
            raise ValueError(f"unknown synthetic config keys: {sorted(unknown)}")
        config = cls()
        config.seed = int(values.get("seed", config.seed))
        config.size_scale = float(values.get("size_scale", config.size_scale))
        for dataset, splits in dict(values.get("cases") or {}).items():
            if dataset not in DEFAULT_CASES:
                raise ValueError(f"unknown synthetic dataset '{dataset}'; known: {', '.join(DEFAULT_CASES)}")
            for split, count in dict(splits).items():
                if split not in DEFAULT_CASES[dataset]:
                    raise ValueError(f"dataset '{dataset}' has no split '{split}'; known: "
                                     f"{', '.join(DEFAULT_CASES[dataset])}")
                config.cases[dataset][split] = int(count)
        if config.size_scale <= 0:
            raise ValueError("size_scale must be positive")
        return config


@dataclass(frozen=True)
class DatasetProfile:
    """How one dataset acquires and stores the phantom."""

    name: str
    label_system: str
    modality: str
    axcodes: str
    inplane_shape: tuple[int, int]
    z_spacings: tuple[float, ...]  # one is drawn per case; 0 = isotropic (the in-plane spacing)
    z_range: tuple[float, float]  # anatomy z-extent covered (mm; 0 = kidney hilum level, + = head)
    fov_margin: tuple[float, float]  # field of view / body width
    image_dtype: str
    label_dtype: str
    phases: dict[str, float] = field(default_factory=lambda: {"portal": 1.0})
    noise_hu: float = 15.0
    hu_offset: float = 0.0
    image_inter: float = 0.0  # stored = value - inter with scl_inter = inter (DICOM-style rescale)
    regions: tuple[str, ...] = ("abdomen",)  # field-of-view centre per case, cycled


PROFILES: dict[str, DatasetProfile] = {
    "flare22": DatasetProfile(
        "flare22", "flare22", "CT", "LPS", (64, 64), (5.0, 6.0, 7.5), (-115.0, 170.0), (1.08, 1.25), "int16",
        "uint8", phases={"portal": 0.5, "arterial": 0.25, "delayed": 0.25}, noise_hu=14.0),
    "amos_ct": DatasetProfile(
        "amos_ct", "amos", "CT", "LAS", (64, 64), (7.5,), (-245.0, 165.0), (1.12, 1.3), "float32", "uint16",
        phases={"portal": 0.8, "arterial": 0.2}, noise_hu=22.0, hu_offset=15.0),
    "amos_mr": DatasetProfile(
        "amos_mr", "amos", "MR", "LAS", (60, 50), (8.0,), (-90.0, 165.0), (1.05, 1.15), "float32", "uint16"),
    "word": DatasetProfile(
        "word", "word", "CT", "RAS", (64, 64), (6.0,), (-245.0, 160.0), (1.1, 1.2), "uint16", "int16",
        noise_hu=9.0, hu_offset=-10.0, image_inter=-1024.0),
    "totalseg": DatasetProfile(
        "totalseg", "totalseg_v1", "CT", "RAS", (60, 52), (0.0,), (-135.0, 165.0), (1.05, 1.2), "int32",
        "uint8",
        phases={"native": 0.3, "arterial": 0.2, "portal": 0.4, "delayed": 0.1}, noise_hu=16.0, hu_offset=5.0,
        regions=("abdomen", "abdomen", "thorax", "abdomen", "pelvis")),
    "btcv": DatasetProfile(
        "btcv", "btcv", "CT", "LPS", (64, 64), (7.0,), (-110.0, 165.0), (1.15, 1.35), "int16", "float32",
        noise_hu=18.0, hu_offset=-5.0),
    "totalseg_v2": DatasetProfile(
        "totalseg_v2", "totalseg_v2", "CT", "RAS", (60, 52), (0.0,), (-135.0, 165.0), (1.05, 1.2), "int16",
        "uint8", phases={"native": 0.3, "arterial": 0.2, "portal": 0.4, "delayed": 0.1}, noise_hu=12.0,
        regions=("abdomen", "abdomen", "thorax", "abdomen", "pelvis")),
    "totalseg_mr": DatasetProfile(
        "totalseg_mr", "totalseg_mr", "MR", "LPS", (56, 48), (6.0,), (-110.0, 165.0), (1.05, 1.2), "float32",
        "uint8", regions=("abdomen", "abdomen", "abdomen", "pelvis")),
}
# Where each TotalSegmentator-layout dataset lives, its image file, its case-id pool and its random streams.
TOTALSEG_LAYOUTS = {
    "totalseg": ("TotalSegmentator", "ct.nii.gz", 1204, 104),
    "totalseg_v2": ("TotalSegmentatorV2", "ct.nii.gz", 1228, 105),
    "totalseg_mr": ("TotalSegmentatorMRI", "mri.nii.gz", 616, 106),
}
# z-extent of the off-centre TotalSegmentator fields of view
REGION_Z_RANGES = {"thorax": (75.0, 375.0), "pelvis": (-320.0, -20.0)}
REGION_STUDY_TYPES = {"abdomen": "ct abdomen", "thorax": "ct thorax", "pelvis": "ct pelvis"}

# --- tissues and their intensities --------------------------------------------------------------------

PHASES = ("native", "arterial", "portal", "delayed")
# CT attenuation (HU) per phase: native, arterial, portal venous, delayed.
CT_HU: dict[str, tuple[float, float, float, float]] = {
    "air": (-1000, -1000, -1000, -1000), "fat": (-100, -100, -100, -100), "muscle": (50, 55, 60, 58),
    "cortical_bone": (900, 900, 900, 900), "marrow": (250, 250, 250, 250), "disc": (80, 80, 80, 80),
    "csf": (10, 10, 10, 10), "lung": (-850, -850, -850, -850), "liver": (55, 75, 115, 95),
    "spleen": (48, 115, 120, 100), "kidney": (35, 170, 175, 150), "pancreas": (45, 115, 100, 80),
    "adrenal": (30, 60, 70, 55), "bile": (8, 8, 8, 8), "gi_wall": (45, 80, 90, 75),
    "gastric_fluid": (12, 12, 12, 12), "bowel_gas": (-850, -850, -850, -850), "stool": (-60, -60, -60, -60),
    "bowel": (35, 60, 70, 60), "artery": (45, 320, 170, 120), "vein": (45, 70, 150, 120),
    "portal_blood": (45, 120, 175, 130), "heart_blood": (45, 310, 160, 120), "myocardium": (45, 100, 110, 95),
    "urine": (8, 8, 8, 8), "prostate": (40, 60, 70, 65), "table": (120, 120, 120, 120),
}
# MR signal (arbitrary units) of a T2-weighted-like scan: fluid and fat bright, flowing blood and bone dark,
# liver darker than spleen and kidney -- a brightness order unlike CT's.
MR_SIGNAL: dict[str, float] = {
    "air": 0, "fat": 650, "muscle": 160, "cortical_bone": 15, "marrow": 480, "disc": 600, "csf": 1100,
    "lung": 25, "liver": 230, "spleen": 520, "kidney": 620, "pancreas": 330, "adrenal": 300, "bile": 1050,
    "gi_wall": 280, "gastric_fluid": 950, "bowel_gas": 5, "stool": 250, "bowel": 420, "artery": 50,
    "vein": 70, "portal_blood": 90, "heart_blood": 80, "myocardium": 200, "urine": 1100, "prostate": 480,
    "table": 0,
}
TISSUES = tuple(CT_HU)
TISSUE_ID = {name: i for i, name in enumerate(TISSUES)}

# --- anatomy: named structures (TotalSegmentator spelling where it has the structure) ------------------

VERTEBRAE = tuple(f"vertebrae_T{i}" for i in range(1, 13)) + tuple(f"vertebrae_L{i}" for i in range(1, 6))
RIBS = tuple(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13))
STRUCTURES: tuple[str, ...] = (
    "liver", "spleen", "kidney_right", "kidney_left", "pancreas", "aorta", "inferior_vena_cava",
    "adrenal_gland_right", "adrenal_gland_left", "gallbladder", "esophagus", "stomach", "duodenum",
    "portal_vein_and_splenic_vein", "small_bowel", "colon", "rectum", "urinary_bladder", "prostate_uterus",
    "femur_head_left", "femur_head_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "heart_myocardium",
    "heart_atrium_left", "heart_ventricle_left", "heart_atrium_right", "heart_ventricle_right", "trachea",
) + VERTEBRAE + RIBS
STRUCTURE_ID = {name: i + 1 for i, name in enumerate(STRUCTURES)}
SKELETON = frozenset(VERTEBRAE + RIBS + ("femur_head_left", "femur_head_right", "femur_left", "femur_right",
                                        "hip_left", "hip_right", "sacrum"))
# A structure absent from a system under its own name may be part of a coarser one there.
PART_OF = {"femur_head_left": "femur_left", "femur_head_right": "femur_right"}


def structure_lookup(system: str) -> np.ndarray:
    """``lut[structure id] = label id`` of ``system``, matched by name (0 where the system lacks it)."""
    ids = {name: i for i, name in get_system(system).names.items()}
    for composite, parts in COMPOSITE_ORGANS.items():
        for part in parts:
            if composite in ids and part not in ids:
                ids[part] = ids[composite]
    lut = np.zeros(len(STRUCTURES) + 1, dtype=np.int32)
    for name, sid in STRUCTURE_ID.items():
        lut[sid] = ids.get(name, ids.get(PART_OF.get(name, ""), 0))
    return lut


# --- shapes ---------------------------------------------------------------------------------------------

@dataclass
class Ellipsoid:
    """A rotated ellipsoid whose surface is smoothly perturbed (random low-frequency bumps)."""

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    bumps: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))  # amplitude, wave vector (3), phase

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radii.max() * (1 + np.abs(self.bumps[:, 0]).sum())
        return self.centre - reach, self.centre + reach

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, cz = self.centre.tolist()  # python floats keep the float32 arithmetic in float32
        d = (x - cx, y - cy, z - cz)
        axes = (self.rotation / self.radii).tolist()
        u = [axes[0][k] * d[0] + axes[1][k] * d[1] + axes[2][k] * d[2] for k in range(3)]
        surface = 1.0
        for amp, wx, wy, wz, phase in self.bumps.tolist():
            surface = surface + amp * np.sin(wx * u[0] + wy * u[1] + wz * u[2] + phase)
        return u[0] * u[0] + u[1] * u[1] + u[2] * u[2] < surface * surface


@dataclass
class Tube:
    """A tube of varying radius along a smooth curve through control points (vessels, bowel, ribs)."""

    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)
    step_mm: float = 12.0
    haustra: float = 0.0  # relative radius modulation along the length (colon)

    def __post_init__(self) -> None:
        pts = np.asarray(self.points, dtype=float)
        radii = np.asarray(self.radii, dtype=float)
        step = max(self.step_mm, float(radii.min()))  # fat tubes need fewer, longer segments
        ends = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])  # Catmull-Rom through every point
        path, path_radii = [], []
        for i in range(len(pts) - 1):
            p0, p1, p2, p3 = ends[i:i + 4]
            t = np.linspace(0.0, 1.0, max(1, int(np.ceil(np.linalg.norm(p2 - p1) / step))),
                            endpoint=False)[:, None]
            path.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                               + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
            path_radii.append(radii[i] + (radii[i + 1] - radii[i]) * t[:, 0])
        self.path = np.vstack([*path, pts[-1:]])
        self.path_radii = np.concatenate([*path_radii, radii[-1:]])
        if self.haustra:
            length = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(self.path, axis=0), axis=1))]
            self.path_radii = self.path_radii * (1 + self.haustra * np.sin(2 * np.pi * length / 28.0))

    def segments(self) -> Iterator[tuple[np.ndarray, np.ndarray, float, float]]:
        for i in range(len(self.path) - 1):
            yield self.path[i], self.path[i + 1], float(self.path_radii[i]), float(self.path_radii[i + 1])


@dataclass
class HalfSpace:
    """Points on the negative side of a plane, within a box (lobes split by a fissure)."""

    point: np.ndarray
    normal: np.ndarray
    box: tuple[np.ndarray, np.ndarray]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.box

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        n, p = self.normal, self.point
        return (x - p[0]) * n[0] + (y - p[1]) * n[1] + (z - p[2]) * n[2] < 0


@dataclass
class BodySection:
    """The body outline: a superellipse cross-section (wider at the pelvis) shrunk by ``inset`` mm."""

    rx: float
    ry: float
    inset: float = 0.0
    exponent: float = 2.4

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        big = np.array([self.rx * 1.2, self.ry * 1.2, 1e5])
        return -big, big

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        widen = 1 + 0.08 * np.exp(-(((z + 190) / 70) ** 2)) + 0.05 * np.exp(-(((z - 230) / 90) ** 2))
        rx = np.maximum(self.rx * widen - self.inset, 1.0)
        ry = max(self.ry - self.inset, 1.0)
        return np.abs(x / rx) ** self.exponent + np.abs(y / ry) ** self.exponent < 1


@dataclass
class Paint:
    """Set ``tissue`` (and the structure label) where ``shape`` is.

    label: a structure name; None keeps the labels (tissue texture inside an organ); "" clears them.
    within: only voxels whose current structure is one of these names ("" = unlabelled).
    organ: confined to the body cavity and never over bone.
    """

    shape: Any
    tissue: str
    label: str | None = None
    within: tuple[str, ...] | None = None
    organ: bool = False


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix of extrinsic rotations about x, then y, then z (degrees)."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --- the phantom anatomy ----------------------------------------------------------------------------------

class _Anatomy:
    """Draws one patient: body size, organ sizes, positions, rotations and shape bumps."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.rx = 160.0 * rng.uniform(0.86, 1.12)
        self.ry = 110.0 * rng.uniform(0.86, 1.14)
        self.scale = np.array([self.rx / 160.0, self.ry / 110.0, rng.uniform(0.93, 1.07)])
        self.size = float(np.mean(self.scale))
        self.fat = rng.uniform(8.0, 28.0) * self.size
        self.wall = rng.uniform(8.0, 13.0)

    def at(self, x: float, y: float, z: float, jitter: float = 0.0) -> np.ndarray:
        return np.array([x, y, z]) * self.scale + self.rng.normal(0.0, jitter, 3)

    def path(self, points: Sequence[Sequence[float]], jitter: float = 4.0) -> np.ndarray:
        base = np.array(points, dtype=float) * self.scale
        return base + self.rng.normal(0.0, jitter, 3) + self.rng.normal(0.0, jitter / 3, base.shape)

    def ellipsoid(self, centre, radii, angles=(0.0, 0.0, 0.0), vary: float = 0.12, bumps: int = 3,
                  jitter: float = 6.0, rot_jitter: float = 8.0) -> Ellipsoid:
        rng = self.rng
        size = self.size * rng.uniform(1 - vary, 1 + vary) * rng.uniform(1 - vary / 3, 1 + vary / 3, 3)
        rotation = _rotation(np.asarray(angles) + rng.normal(0.0, rot_jitter, 3))
        amplitudes = rng.uniform(0.04, 0.12, bumps)
        phases = rng.uniform(0, 2 * np.pi, bumps)
        waves = np.column_stack([amplitudes, rng.normal(0.0, 1.6, (bumps, 3)), phases])
        return Ellipsoid(self.at(*centre, jitter), np.asarray(radii, dtype=float) * size, rotation, waves)

    def tube(self, points, radii, jitter: float = 4.0, haustra: float = 0.0) -> Tube:
        size = self.size * self.rng.uniform(0.9, 1.1)
        radii = np.broadcast_to(np.asarray(radii, float) * size, (len(points),))
        return Tube(self.path(points, jitter), radii, haustra=haustra)

    def small_bowel(self) -> Tube:
        """A random walk of loops in the lower central abdomen, inside the colon frame."""
        rng = self.rng
        lo, hi = np.array([-55.0, -5.0, -135.0]), np.array([55.0, 80.0, -15.0])
        point, direction, points = rng.uniform(lo, hi), rng.normal(size=3), []
        for _ in range(26):
            points.append(point.copy())
            direction = direction / np.linalg.norm(direction) + rng.normal(0.0, 0.7, 3)
            direction /= np.linalg.norm(direction)
            point = point + 22.0 * direction
            below, above = point < lo, point > hi
            point = np.where(below, 2 * lo - point, np.where(above, 2 * hi - point, point))
            direction = np.where(below | above, -direction, direction)
        return Tube(np.array(points) * self.scale, np.full(len(points), 11.0 * self.size))

    def paints(self, with_table: bool) -> list[Paint]:
        """Everything to draw, in painting order (later paints overwrite earlier ones)."""
        out = [
            Paint(BodySection(self.rx, self.ry), "fat", ""),
            Paint(BodySection(self.rx, self.ry, self.fat), "muscle", ""),
            Paint(self.cavity(), "fat", ""),
        ]
        out += self._musculoskeletal()
        out += self._thorax()
        out += self._bowel_and_pelvis()
        out += self._upper_abdomen()
        out += self._vessels()
        if with_table:  # a curved 12 mm shell under the patient's back
            centre = np.array([0.0, -self.ry - 260.0, 0.0])
            out.append(Paint(Ellipsoid(centre, np.array([230.0, 240.0, 1e4])), "table", ""))
            out.append(Paint(Ellipsoid(centre, np.array([218.0, 228.0, 1e4])), "air", ""))
        return out

    def cavity(self) -> BodySection:
        """Inside the abdominal wall: where organs may be."""
        return BodySection(self.rx, self.ry, self.fat + self.wall)

    def _musculoskeletal(self) -> list[Paint]:
        e, t = self.ellipsoid, self.tube
        out = []
        for side, s in (("left", -1), ("right", 1)):
            out.append(Paint(t([[s * 32, -88, 420], [s * 32, -86, 0], [s * 30, -80, -200]], 21, jitter=2),
                             "muscle", f"autochthon_{side}"))
            psoas = [[s * 35, -42, 30], [s * 48, -35, -80], [s * 70, -20, -170], [s * 80, 0, -230]]
            out.append(Paint(t(psoas, [8, 19, 24, 18], jitter=3), "muscle", f"iliopsoas_{side}"))
        pitch = 36.0 * self.scale[2]
        for level, name in enumerate(reversed(VERTEBRAE)):  # L5 first, upwards
            z = (-4 + level) * 36.0
            body = e((0, -45, z), (20, 17, 13.5), vary=0.04, bumps=0, jitter=1.5, rot_jitter=2)
            out.append(Paint(body, "cortical_bone", name))
            marrow = Ellipsoid(body.centre, body.radii * 0.72, body.rotation)
            out.append(Paint(marrow, "marrow", None, (name,)))
            out.append(Paint(e((0, -78, z), (21, 13, 11), vary=0.04, bumps=0, jitter=1.5, rot_jitter=2),
                             "cortical_bone", name))
            out.append(Paint(e((0, -98, z - 6), (5, 14, 9), vary=0.05, bumps=0, jitter=1.5, rot_jitter=3),
                             "cortical_bone", name))
            out.append(Paint(e((0, -68, z), (38 if level > 4 else 30, 6, 6), vary=0.05, bumps=0, jitter=1.5,
                               rot_jitter=2), "cortical_bone", name))
            disc_centre = body.centre + np.array([0.0, 0.0, pitch / 2])
            out.append(Paint(Ellipsoid(disc_centre, np.array([19.0, 16.0, 3.2]) * self.size), "disc", ""))
        out.append(Paint(Tube(self.path([[0, -73, 460], [0, -72, 0], [0, -70, -170]], 1.0),
                              np.full(3, 8.0 * self.size), step_mm=40.0), "csf", ""))
        for i in range(1, 13):
            z0 = (40.0 + (12 - i) * 27.0) * self.scale[2] + self.rng.normal(0.0, 2.0)
            reach = np.radians(150.0 if i <= 10 else 95.0)
            for side, s in (("left", -1), ("right", 1)):
                phi = np.linspace(np.radians(22), reach, 7)
                frac = 0.86 - 0.08 * (i <= 2)
                pts = np.column_stack([s * self.rx * frac * np.sin(phi), -self.ry * frac * np.cos(phi),
                                       z0 - 55.0 * (phi / np.radians(150.0)) ** 2])
                rib = Tube(pts, np.full(len(pts), 5.5), step_mm=40.0)
                out.append(Paint(rib, "cortical_bone", f"rib_{side}_{i}"))
        out.append(Paint(e((0, -62, -190), (48, 20, 42), angles=(-25, 0, 0), vary=0.05, bumps=1, jitter=3),
                         "cortical_bone", "sacrum"))
        for side, s in (("left", -1), ("right", 1)):
            hip = e((s * 100, -25, -160), (11, 55, 55), (0, s * 25, s * 35), vary=0.06, bumps=2, jitter=3)
            out.append(Paint(hip, "cortical_bone", f"hip_{side}"))
            hip_marrow = Ellipsoid(hip.centre, hip.radii * np.array([0.45, 0.85, 0.85]), hip.rotation)
            out.append(Paint(hip_marrow, "marrow", None, (f"hip_{side}",)))
            femur = [[s * 92, 8, -220], [s * 110, 4, -245], [s * 122, 8, -300], [s * 125, 10, -420]]
            out.append(Paint(t(femur, [14, 13, 14, 14], jitter=2), "cortical_bone", f"femur_{side}"))
            head = e((s * 88, 8, -218), (23, 23, 23), vary=0.06, bumps=0, jitter=2, rot_jitter=0)
            out.append(Paint(head, "cortical_bone", f"femur_head_{side}"))
            head_marrow = Ellipsoid(head.centre, head.radii * 0.7)
            out.append(Paint(head_marrow, "marrow", None, (f"femur_head_{side}",)))
        return out

    def _thorax(self) -> list[Paint]:
        e = self.ellipsoid
        out = []
        for side, s, lobes in (("left", -1, ("upper", "lower")), ("right", 1, ("upper", "middle", "lower"))):
            lung = e((s * 78, -12, 265), (68, 88, 160), vary=0.06, bumps=2, jitter=4, rot_jitter=3)
            upper = f"lung_upper_lobe_{side}"
            out.append(Paint(lung, "lung", upper, organ=True))
            box = lung.bounds()
            oblique = HalfSpace(lung.centre + np.array([0.0, 0.0, -15.0]), np.array([0.0, 0.55, 0.83]), box)
            out.append(Paint(oblique, "lung", f"lung_lower_lobe_{side}", (upper,)))
            if "middle" in lobes:
                level = lung.centre + np.array([0.0, 0.0, -5.0])
                horizontal = HalfSpace(level, np.array([0.0, -0.3, 0.95]), box)
                out.append(Paint(horizontal, "lung", "lung_middle_lobe_right", (upper,)))
        heart = e((-22, 35, 215), (62, 52, 58), angles=(0, 0, 30), vary=0.08, bumps=2)
        out.append(Paint(heart, "myocardium", "heart_myocardium", organ=True))
        chambers = (("heart_ventricle_left", (-42, 35, 200), (24, 22, 30)),
                    ("heart_ventricle_right", (-8, 62, 205), (26, 15, 30)),
                    ("heart_atrium_left", (-20, 5, 238), (25, 15, 18)),
                    ("heart_atrium_right", (22, 30, 228), (20, 18, 22)))
        for name, centre, radii in chambers:
            c = heart.centre + (np.array(centre) - np.array([-22, 35, 215])) * self.scale
            chamber = Ellipsoid(c, np.array(radii) * self.size)
            out.append(Paint(chamber, "heart_blood", name, ("heart_myocardium",)))
        out.append(Paint(self.tube([[0, -5, 480], [2, -8, 330]], 9), "air", "trachea", organ=True))
        return out

    def _bowel_and_pelvis(self) -> list[Paint]:
        e, t, rng = self.ellipsoid, self.tube, self.rng
        out = [Paint(self.small_bowel(), "bowel", "small_bowel", organ=True)]
        colon = t([[72, 18, -118], [84, 12, -40], [76, 32, 0], [55, 68, 8], [0, 80, -8], [-55, 68, 12],
                   [-84, 22, 38], [-90, 5, -40], [-84, 12, -105], [-52, 38, -140], [-15, 22, -160],
                   [0, -22, -168]], 16, haustra=0.16)
        out.append(Paint(colon, "gi_wall", "colon", organ=True))
        lumen = Tube(colon.points, colon.radii * 0.7)
        out.append(Paint(lumen, "bowel_gas" if rng.random() < 0.5 else "stool", None, ("colon",)))
        rectum = t([[0, -22, -168], [0, -48, -190], [0, -45, -228]], 15)
        out.append(Paint(rectum, "gi_wall", "rectum", organ=True))
        bladder = e((0, 48, -188), (42, 34, 30), vary=0.25, bumps=2, jitter=5)
        out.append(Paint(bladder, "urine", "urinary_bladder", organ=True))
        prostate = e((0, 22, -224), (18, 14, 16), vary=0.15)
        out.append(Paint(prostate, "prostate", "prostate_uterus", organ=True))
        return out

    def _upper_abdomen(self) -> list[Paint]:
        e, t = self.ellipsoid, self.tube
        out = []
        right = e((58, 8, 72), (72, 82, 74), angles=(0, -10, 0), vary=0.1)
        left = e((-22, 45, 95), (58, 38, 34), angles=(0, 15, 10), vary=0.15)
        out += [Paint(right, "liver", "liver", organ=True), Paint(left, "liver", "liver", organ=True)]
        for end in ([92, 22, 110], [45, 42, 135], [-12, 42, 128]):
            out.append(Paint(t([[22, -10, 150], end], [6, 3], jitter=6), "vein", None, ("liver",)))
        out.append(Paint(e((-85, -25, 72), (30, 50, 55), angles=(0, 0, -30), vary=0.15), "spleen", "spleen",
                         organ=True))
        for side, s, z, adrenal_z in (("right", 1, -12, 56), ("left", -1, 4, 64)):
            kidney = e((s * 62, -30, z), (27, 30, 54), angles=(s * 8, s * 12, s * 20), vary=0.1)
            out.append(Paint(kidney, "kidney", f"kidney_{side}", organ=True))
            hilum = kidney.centre + kidney.rotation @ (kidney.radii * np.array([-s * 0.55, 0.25, 0.0]))
            sinus = Ellipsoid(hilum, kidney.radii * np.array([0.35, 0.32, 0.4]), kidney.rotation)
            out.append(Paint(sinus, "fat", "", (f"kidney_{side}",)))
            adrenal = e((s * 40, -24, adrenal_z), (13, 8, 20), angles=(0, 0, s * 30), vary=0.15, jitter=3)
            out.append(Paint(adrenal, "adrenal", f"adrenal_gland_{side}", organ=True))
        stomach = t([[-58, 12, 112], [-56, 42, 72], [-12, 62, 40], [16, 46, 38]], [38, 36, 26, 14], jitter=5)
        out.append(Paint(stomach, "gi_wall", "stomach", organ=True))
        out.append(Paint(Tube(stomach.points, stomach.radii - 5.0), "gastric_fluid", None, ("stomach",)))
        out.append(Paint(e((-52, 40, 108), (22, 14, 18), vary=0.3, bumps=0), "bowel_gas", None, ("stomach",)))
        out.append(Paint(e((52, 56, 24), (16, 16, 32), angles=(-35, 10, 0), vary=0.2), "bile", "gallbladder",
                         organ=True))
        pancreas = t([[26, 6, 24], [0, 16, 34], [-40, 6, 44], [-74, -14, 56]], [16, 12, 12, 10], jitter=4)
        out.append(Paint(pancreas, "pancreas", "pancreas", organ=True))
        duodenum = t([[17, 45, 38], [40, 32, 40], [50, 6, 24], [50, 0, -6], [22, -6, -22], [-8, -6, -22],
                      [-24, 4, -6]], 12, jitter=3)
        out.append(Paint(duodenum, "gi_wall", "duodenum", organ=True))
        out.append(Paint(Tube(duodenum.points, duodenum.radii * 0.55), "gastric_fluid", None, ("duodenum",)))
        return out

    def _vessels(self) -> list[Paint]:
        t = self.tube
        aorta = t([[-25, -32, 420], [-16, -22, 160], [-12, -16, 40], [-10, -16, -72]], [13, 12, 11, 10], 2)
        ivc = t([[22, -10, 170], [23, -12, 60], [22, -12, -80]], [14, 13, 12], jitter=2)
        portal = t([[-75, -10, 62], [-40, -4, 40], [4, 0, 30], [26, 10, 50], [46, 16, 72]], 6.5, jitter=3)
        esophagus = t([[-3, -14, 440], [-6, -12, 200], [-24, 8, 126], [-44, 24, 108]], 8.5, jitter=2)
        out = [Paint(aorta, "artery", "aorta", organ=True),
               Paint(ivc, "vein", "inferior_vena_cava", organ=True),
               Paint(portal, "portal_blood", "portal_vein_and_splenic_vein", organ=True),
               Paint(esophagus, "gi_wall", "esophagus", organ=True)]
        for side, s in (("left", -1), ("right", 1)):
            artery = t([[-10, -16, -72], [s * 40, -8, -130], [s * 72, 4, -190]], 7, jitter=2)
            vein = t([[22, -12, -80], [s * 40 + 10, -18, -135], [s * 72, -4, -195]], 8, jitter=2)
            out.append(Paint(artery, "artery", f"iliac_artery_{side}", organ=True))
            out.append(Paint(vein, "vein", f"iliac_vena_{side}", organ=True))
        return out


# --- rendering one case ------------------------------------------------------------------------------------

AXIS_OF = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass
class RenderedCase:
    """One synthetic case before writing: image, structure map, affine, contrast phase and body region."""

    image: np.ndarray  # stored dtype (before scl_inter)
    structures: np.ndarray  # uint8 structure ids (STRUCTURE_ID), 0 = none
    affine: np.ndarray
    phase: str
    region: str


def _affine(axcodes: str, spacing: np.ndarray, shape: tuple[int, ...], centre: np.ndarray) -> np.ndarray:
    """Diagonal affine with the axis directions of ``axcodes`` whose volume centre lies at ``centre``."""
    affine = np.eye(4)
    for i, code in enumerate(axcodes):
        axis, sign = AXIS_OF[code]
        affine[axis, i] = sign * spacing[i]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


class _Grid:
    """Anatomy-frame coordinates (mm) of every voxel, smoothly warped, with block look-up by bounds.
    The affine is diagonal (axis flips, no rotation), so each array axis is one world axis."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int], origin: np.ndarray,
                 rng: np.random.Generator):
        self.lines = [(float(affine[i, i]), float(affine[i, 3] - origin[i]), n) for i, n in enumerate(shape)]
        axes = [np.float32(step * np.arange(n) + start) for step, start, n in self.lines]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        self.warp_reach = 0.0
        coords = [x, y, z]
        for _ in range(3):  # a few smooth sinusoidal displacements: correlated deformation of the anatomy
            amplitude = rng.normal(0.0, 3.0, 3)
            wave = rng.normal(0.0, 1.0, 3)
            wave *= 2 * np.pi / (rng.uniform(180.0, 400.0) * np.linalg.norm(wave))
            phase = (wave[0] * x + wave[1] * y + wave[2] * z + rng.uniform(0, 2 * np.pi)).astype(np.float32)
            s = np.sin(phase)
            for k in range(3):
                coords[k] = coords[k] + np.float32(amplitude[k]) * s
            self.warp_reach += float(np.abs(amplitude).max())
        self.x, self.y, self.z = coords

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index ranges of the voxels whose (warped) coordinates may fall within [lo, hi]."""
        slices = []
        for (step, start, n), low, high in zip(self.lines, lo, hi, strict=True):
            a = (low - self.warp_reach - 1 - start) / step
            b = (high + self.warp_reach + 1 - start) / step
            first, last = max(int(np.ceil(min(a, b))), 0), min(int(np.floor(max(a, b))), n - 1)
            if first > last:
                return None
            slices.append(slice(first, last + 1))
        return tuple(slices)


def _paint(grid: _Grid, paints: list[Paint], cavity_shape: BodySection) -> tuple[np.ndarray, np.ndarray]:
    """Structure ids and tissue ids of every voxel; each paint touches only the block its shape can reach."""
    shape = grid.x.shape
    structures = np.zeros(shape, dtype=np.uint8)
    tissue = np.full(shape, TISSUE_ID["air"], dtype=np.uint8)
    cavity = bone = np.zeros(shape, dtype=bool)
    is_skeleton = np.zeros(256, dtype=bool)
    is_skeleton[[STRUCTURE_ID[n] for n in SKELETON]] = True
    cavity_set = False
    for paint in paints:
        if paint.organ and not cavity_set:  # organs are confined to the cavity inside the abdominal wall
            cavity_set = True
            cavity = cavity_shape.inside(grid.x, grid.y, grid.z)
            bone = is_skeleton[structures]
        pieces = paint.shape.segments() if isinstance(paint.shape, Tube) else [None]
        for piece in pieces:
            if piece is None:
                lo, hi = paint.shape.bounds()
            else:
                a, b, ra, rb = piece
                reach = max(ra, rb)
                lo, hi = np.minimum(a, b) - reach, np.maximum(a, b) + reach
            box = grid.block(np.asarray(lo), np.asarray(hi))
            if box is None:
                continue
            x, y, z = grid.x[box], grid.y[box], grid.z[box]
            if piece is None:
                mask = paint.shape.inside(x, y, z)
            else:
                mask = _in_segment(x, y, z, *piece)
            if paint.within is not None:
                allowed = np.zeros(256, dtype=bool)
                allowed[[STRUCTURE_ID.get(n, 0) for n in paint.within]] = True
                mask &= allowed[structures[box]]
            if paint.organ:
                mask &= cavity[box] & ~bone[box]
            tissue[box][mask] = TISSUE_ID[paint.tissue]
            if paint.label is not None:
                structures[box][mask] = STRUCTURE_ID.get(paint.label, 0)
    return structures, tissue


def _in_segment(x, y, z, a, b, ra, rb) -> np.ndarray:
    """Inside the capsule around segment a-b whose radius goes linearly from ra to rb."""
    (ax, ay, az), (bx, by, bz) = a.tolist(), b.tolist()
    ux, uy, uz = bx - ax, by - ay, bz - az
    length2 = ux * ux + uy * uy + uz * uz or 1e-9
    dx, dy, dz = x - ax, y - ay, z - az
    t = np.clip((dx * ux + dy * uy + dz * uz) * (1.0 / length2), 0.0, 1.0)
    ex, ey, ez = dx - t * ux, dy - t * uy, dz - t * uz
    r = ra + t * (rb - ra)
    return ex * ex + ey * ey + ez * ez < r * r


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], knots: int = 5) -> np.ndarray:
    """Unit-scale random field varying over about a fifth of the volume (texture, bias): a sum of a few
    separable products of smooth random curves, cheap to evaluate."""
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(3):
        curves = [np.interp(np.linspace(0, knots - 1, n), np.arange(knots), rng.normal(0.0, 1.0, knots))
                  for n in shape]
        cx, cy, cz = (np.float32(curve) for curve in curves)
        out += cx[:, None, None] * cy[None, :, None] * cz
    return out * np.float32(1 / np.sqrt(3))


def _ct_image(tissue: np.ndarray, phase: str, profile: DatasetProfile,
              rng: np.random.Generator) -> np.ndarray:
    """HU of the contrast phase, per-case tissue jitter, partial-volume blur, texture, noise, offset."""
    column = PHASES.index(phase)
    lut = np.array([CT_HU[name][column] for name in TISSUES], dtype=np.float32)
    soft = (lut > -200) & (lut < 400)
    lut[soft] += rng.normal(0.0, 6.0, int(soft.sum())).astype(np.float32)
    image = lut[tissue]
    image = ndimage.gaussian_filter(image, 0.6, truncate=2.0)
    image += 7.0 * _smooth_field(rng, tissue.shape)
    noise = profile.noise_hu * rng.uniform(0.8, 1.2)
    image += rng.normal(0.0, noise, tissue.shape).astype(np.float32)
    image += profile.hu_offset + rng.normal(0.0, 4.0)
    return np.clip(image, -1024, 3071)


def _mr_image(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T2-like signal with per-scan gain, a smooth bias field and Rician noise (no HU, no fixed scale)."""
    lut = np.array([MR_SIGNAL[name] for name in TISSUES], dtype=np.float32)
    lut *= rng.uniform(0.9, 1.1, lut.shape).astype(np.float32)
    image = ndimage.gaussian_filter(lut[tissue], 0.7, truncate=2.0)
    image *= 1 + 0.08 * _smooth_field(rng, tissue.shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in tissue.shape], indexing="ij")
    coef = rng.normal(0.0, 0.22, 6)
    bias = np.exp(coef[0] * grids[0] + coef[1] * grids[1] + coef[2] * grids[2] + coef[3] * grids[0] ** 2
                  + coef[4] * grids[1] ** 2 - 0.3 * (grids[0] ** 2 + grids[1] ** 2))
    image *= bias * rng.uniform(0.6, 1.5)  # arbitrary units: every scan has its own gain
    sigma = 22.0
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)  # magnitude image: Rician noise, never negative


def render_case(profile: DatasetProfile, rng: np.random.Generator, region: str = "abdomen",
                size_scale: float = 1.0) -> RenderedCase:
    """One phantom patient seen through ``profile``: stored image array, structure map and affine."""
    anatomy = _Anatomy(rng)
    z_range = REGION_Z_RANGES.get(region, profile.z_range)
    nx, ny = (max(8, round(n * size_scale)) for n in profile.inplane_shape)
    fov_x = 2 * anatomy.rx * 1.08 * rng.uniform(*profile.fov_margin)
    inplane = fov_x / nx
    z_spacing = float(rng.choice(profile.z_spacings)) / size_scale or inplane
    extent = (z_range[1] - z_range[0]) * anatomy.scale[2] + rng.uniform(-20.0, 20.0)
    nz = max(8, round(extent / z_spacing))
    spacing = np.array([inplane, inplane, z_spacing])
    centre = np.array([rng.normal(0.0, 8.0), rng.normal(5.0, 8.0),
                       np.mean(z_range) * anatomy.scale[2] + rng.normal(0.0, 6.0)])
    scanner_origin = np.array([rng.uniform(-30, 30), rng.uniform(-250, -120), rng.uniform(-900, -300)])
    affine = _affine(profile.axcodes, spacing, (nx, ny, nz), centre + scanner_origin)
    grid = _Grid(affine, (nx, ny, nz), scanner_origin, rng)
    structures, tissue = _paint(grid, anatomy.paints(with_table=profile.modality == "CT"), anatomy.cavity())
    phases = list(profile.phases)
    phase = str(rng.choice(phases, p=np.array(list(profile.phases.values())) / sum(profile.phases.values())))
    if profile.modality == "MR":
        phase = "t2"
        image = _mr_image(tissue, rng).astype(profile.image_dtype)
    else:
        hu = _ct_image(tissue, phase, profile, rng)
        stored = hu - profile.image_inter
        if np.dtype(profile.image_dtype).kind in "iu":
            stored = np.rint(stored)
        image = stored.astype(profile.image_dtype)
    return RenderedCase(image, structures, affine, phase, region)


# --- writing the raw layouts -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedCase:
    """One case to write: which dataset and split, its file stem and where its files go."""

    dataset: str
    split: str
    index: int
    case_id: str
    image: Path
    label: Path | None  # a file, or (TotalSegmentator) the segmentations folder
    region: str = "abdomen"


def _header(affine_code: int = 1) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["qform_code"] = affine_code
    header["sform_code"] = affine_code
    return header


def _write_image(image: np.ndarray, affine: np.ndarray, path: Path, inter: float) -> None:
    if not inter:
        save_nifti(image, affine, path, header=_header())
        return
    img = nib.Nifti1Image(image, affine, header=_header())
    img.set_data_dtype(image.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1.0, inter)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _write_masks(labels: np.ndarray, names: Mapping[int, str], affine: np.ndarray, folder: Path) -> int:
    """TotalSegmentator's folder of binary uint8 masks, one per structure of the class map. The masks share
    one header, so it is encoded once and each file is that header plus the mask's voxels, gzipped
    (mtime 0, like nibabel, so the bytes are deterministic); each file is written atomically."""
    template = nib.Nifti1Image(np.zeros(labels.shape, dtype=np.uint8), affine, header=_header())
    template.set_data_dtype(np.uint8)
    template.header.set_slope_inter(1, 0)
    template.set_qform(affine, code=1)
    template.set_sform(affine, code=1)
    encoded = template.to_bytes()
    prefix = encoded[:len(encoded) - labels.size]
    for label_id, name in names.items():
        voxels = (labels == label_id).astype(np.uint8).tobytes(order="F")
        with atomic_path(folder / f"{name}.nii.gz") as tmp:
            tmp.write_bytes(gzip.compress(prefix + voxels, compresslevel=1, mtime=0))
    return len(names)


def _sample_ids(rng: np.random.Generator, pool: Sequence[int], count: int) -> list[int]:
    if count > len(pool):
        raise ValueError(f"cannot draw {count} case ids from a pool of {len(pool)}")
    return sorted(int(i) for i in rng.choice(np.asarray(pool), size=count, replace=False))


def plan_cases(raw_root: Path, config: SyntheticConfig) -> list[PlannedCase]:
    """Every file to write, named as the official downloads name them."""
    cases, c = [], config.cases
    id_rng = np.random.default_rng([config.seed, 7919])
    flare = raw_root / "FLARE22"
    labelled = flare / "Training/FLARE22_LabeledCase50"
    for i in range(1, c["flare22"]["train"] + 1):
        stem = f"FLARE22_Tr_{i:04d}"
        cases.append(PlannedCase("flare22", "train", i, stem, labelled / f"images/{stem}_0000.nii.gz",
                                 labelled / f"labels/{stem}.nii.gz"))
    for i in range(1, c["flare22"]["val"] + 1):
        stem = f"FLARE22_Ts_{i:04d}"
        cases.append(PlannedCase("flare22", "val", i, stem, flare / f"Validation/images/{stem}_0000.nii.gz",
                                 flare / f"Validation/labels/{stem}.nii.gz"))
    for i in range(1, c["flare22"]["unlabeled"] + 1):
        block = (i - 1) // 1000
        folder = f"FLARE22_UnlabeledCase{block * 1000 + 1}-{block * 1000 + 1000}"
        stem = f"Case_{i:05d}"
        image = flare / f"Training/{folder}/{stem}_0000.nii.gz"
        cases.append(PlannedCase("flare22", "unlabeled", i, stem, image, None))
    amos = raw_root / "AMOS/amos22"
    ct_ids = _sample_ids(id_rng, range(1, 501), c["amos_ct"]["train"] + c["amos_ct"]["val"])
    mr_ids = _sample_ids(id_rng, range(501, 601), c["amos_mr"]["train"] + c["amos_mr"]["val"])
    for dataset, ids in (("amos_ct", ct_ids), ("amos_mr", mr_ids)):
        chosen = id_rng.permutation(ids)
        n_train = c[dataset]["train"]
        for split, group, (img_dir, lbl_dir) in (("train", chosen[:n_train], ("imagesTr", "labelsTr")),
                                                ("val", chosen[n_train:], ("imagesVa", "labelsVa"))):
            for i, number in enumerate(sorted(group), start=1):
                stem = f"amos_{number:04d}"
                cases.append(PlannedCase(dataset, split, i, stem, amos / img_dir / f"{stem}.nii.gz",
                                         amos / lbl_dir / f"{stem}.nii.gz"))
    word = raw_root / "WORD/WORD-V0.1.0"
    n_word, n_val = c["word"]["train"], c["word"]["train"] + c["word"]["val"]
    for split, numbers, (img_dir, lbl_dir) in (
            ("train", range(1, n_word + 1), ("imagesTr", "labelsTr")),
            ("val", range(n_word + 1, n_val + 1), ("imagesVal", "labelsVal")),
            ("test", range(n_val + 1, n_val + c["word"].get("test", 0) + 1), ("imagesTs", "labelsTs"))):
        for i, number in enumerate(numbers, start=1):
            stem = f"word_{number:04d}"
            cases.append(PlannedCase("word", split, i, stem, word / img_dir / f"{stem}.nii.gz",
                                     word / lbl_dir / f"{stem}.nii.gz"))
    ts = raw_root / "TotalSegmentator"
    ts_counts = c["totalseg"]
    ts_ids = id_rng.permutation(_sample_ids(id_rng, range(0, 1204), sum(ts_counts.values())))
    regions = PROFILES["totalseg"].regions
    offset = 0
    for split in ("train", "val", "test"):
        for i, number in enumerate(sorted(ts_ids[offset:offset + ts_counts[split]]), start=1):
            stem = f"s{number:04d}"
            region = regions[(i - 1) % len(regions)]
            folder = ts / stem
            cases.append(PlannedCase("totalseg", split, i, stem, folder / "ct.nii.gz",
                                     folder / "segmentations", region))
        offset += ts_counts[split]
    btcv = raw_root / "BTCV/RawData/Training"
    btcv_numbers = [*range(1, 11), *range(21, 41)]
    btcv_numbers += list(range(41, 41 + max(0, c["btcv"]["train"] - len(btcv_numbers))))
    for i, number in enumerate(btcv_numbers[:c["btcv"]["train"]], start=1):
        cases.append(PlannedCase("btcv", "train", i, f"img{number:04d}", btcv / f"img/img{number:04d}.nii.gz",
                                 btcv / f"label/label{number:04d}.nii.gz"))
    for dataset in ("totalseg_v2", "totalseg_mr"):  # after every older dataset, each with its own id stream
        cases += _plan_totalseg(raw_root, dataset, c[dataset], np.random.default_rng([config.seed, 7919,
                                                                                       DATASET_INDEX[dataset]]))
    return cases


def _plan_totalseg(raw_root: Path, dataset: str, counts: Mapping[str, int],
                   id_rng: np.random.Generator) -> list[PlannedCase]:
    folder_name, image_name, pool, _ = TOTALSEG_LAYOUTS[dataset]
    ids = id_rng.permutation(_sample_ids(id_rng, range(0, pool), sum(counts.values())))
    regions = PROFILES[dataset].regions
    cases, offset = [], 0
    for split, count in counts.items():
        for i, number in enumerate(sorted(ids[offset:offset + count]), start=1):
            folder = raw_root / folder_name / f"s{number:04d}"
            cases.append(PlannedCase(dataset, split, i, folder.name, folder / image_name, folder / "segmentations",
                                     regions[(i - 1) % len(regions)]))
        offset += count
    return cases


DATASET_INDEX = {name: i for i, name in enumerate(DEFAULT_CASES)}
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}


def case_rng(seed: int, case: PlannedCase) -> np.random.Generator:
    """An independent stream per case: changing one count never changes the other cases."""
    return np.random.default_rng([seed, DATASET_INDEX[case.dataset], SPLIT_INDEX[case.split], case.index])


def write_case(case: PlannedCase, config: SyntheticConfig) -> dict[str, Any]:
    """Render one case and write its image and labels; returns what the summary lists about it."""
    profile = PROFILES[case.dataset]
    rendered = render_case(profile, case_rng(config.seed, case), case.region, config.size_scale)
    _write_image(rendered.image, rendered.affine, case.image, profile.image_inter)
    files = 1
    if case.label is not None:
        lut = structure_lookup(profile.label_system)
        labels = lut[rendered.structures]
        if profile.name in TOTALSEG_LAYOUTS:
            files += _write_masks(labels, get_system(profile.label_system).names, rendered.affine, case.label)
        else:
            save_nifti(labels.astype(profile.label_dtype), rendered.affine, case.label, header=_header())
            files += 1
    spacing = [round(float(s), 3) for s in np.abs(np.diag(rendered.affine)[:3])]
    return {"dataset": case.dataset, "split": case.split, "case": case.case_id,
            "shape": list(rendered.image.shape), "spacing": spacing, "phase": rendered.phase,
            "region": case.region, "files": files}


def _write_amos_json(raw_root: Path, cases: list[PlannedCase]) -> None:
    """AMOS's own dataset.json: label names and the training/validation file lists."""
    amos = [c for c in cases if c.dataset in ("amos_ct", "amos_mr")]
    if not amos:
        return
    names = {"spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney",
             "gallbladder": "gall bladder", "esophagus": "esophagus", "liver": "liver", "stomach": "stomach",
             "aorta": "aorta", "inferior_vena_cava": "postcava", "pancreas": "pancreas",
             "adrenal_gland_right": "right adrenal gland", "adrenal_gland_left": "left adrenal gland",
             "duodenum": "duodenum", "urinary_bladder": "bladder", "prostate_uterus": "prostate/uterus"}
    labels = {"0": "background"} | {str(i): names[n] for i, n in get_system("amos").names.items()}

    def entries(split: str) -> list[dict[str, str]]:
        chosen = sorted((c for c in amos if c.split == split), key=lambda c: c.case_id)
        return [{"image": f"./{c.image.parent.name}/{c.image.name}",
                 "label": f"./{c.label.parent.name}/{c.label.name}"} for c in chosen]

    training, validation = entries("train"), entries("val")
    content = {
        "name": "AMOS", "description": "synthetic AMOS-mini (aeval phantom), AMOS22 layout",
        "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": labels,
        "numTraining": len(training), "numValidation": len(validation), "numTest": 0,
        "training": training, "validation": validation, "test": [],
    }
    write_text_atomic(raw_root / "AMOS/amos22/dataset.json", json.dumps(content, indent=4))


def _write_totalseg_meta(raw_root: Path, cases: list[PlannedCase], seed: int, dataset: str = "totalseg") -> None:
    folder, _, _, stream = TOTALSEG_LAYOUTS[dataset]
    ts = sorted((c for c in cases if c.dataset == dataset), key=lambda c: c.case_id)
    if not ts:
        return
    modality = PROFILES[dataset].modality.lower()
    rng = np.random.default_rng([seed, stream])
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\n")
    writer.writerow(["image_id", "age", "gender", "institute", "study_type", "split"])
    for c in ts:
        writer.writerow([c.case_id, int(rng.integers(20, 90)), "f" if rng.random() < 0.5 else "m",
                         str(rng.choice(list("ABCDEFGH"))), f"{modality} {c.region}", c.split])
    write_text_atomic(raw_root / folder / "meta.csv", buffer.getvalue())


def generate_mini(raw_root: str | Path, config: SyntheticConfig | Mapping[str, Any] | None = None, *,
                  progress: bool = True) -> dict[str, Any]:
    """Write the synthetic A-Eval-mini under ``raw_root`` in each dataset's official raw layout.

    Deterministic by ``config.seed``. Returns a summary: cases per dataset and split, files written, seconds.
    """
    if not isinstance(config, SyntheticConfig):
        config = SyntheticConfig.from_mapping(config)
    raw_root = Path(raw_root)
    start = time.perf_counter()
    cases = plan_cases(raw_root, config)
    results = list(_with_progress(cases, lambda c: write_case(c, config), progress))
    _write_amos_json(raw_root, cases)
    for dataset in TOTALSEG_LAYOUTS:
        _write_totalseg_meta(raw_root, cases, config.seed, dataset)
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        counts.setdefault(r["dataset"], {}).setdefault(r["split"], 0)
        counts[r["dataset"]][r["split"]] += 1
    return {
        "raw_root": str(raw_root), "seed": config.seed, "size_scale": config.size_scale, "cases": counts,
        "files": sum(r["files"] for r in results), "seconds": round(time.perf_counter() - start, 2),
        "case_details": results,
    }


def _with_progress(items: list, work: Callable[[Any], Any], show: bool) -> Iterator[Any]:
    if not show:
        yield from map(work, items)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]synthetic A-Eval-mini"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns) as bar:
        task = bar.add_task("", total=len(items))
        for item in items:
            bar.update(task, description=f"{item.dataset} {item.case_id}")
            yield work(item)
            bar.advance(task)


# --- overview montage ---------------------------------------------------------------------------------------

def _overview_cases(raw_root: Path) -> list[tuple[str, Path, Path | None, str]]:
    """(title, image, label file or segmentations folder, modality) of one case per dataset flavour."""
    def first(pattern: str, keep: Callable[[Path], bool] = lambda p: True) -> Path | None:
        return next((p for p in sorted(raw_root.glob(pattern)) if keep(p)), None)

    def amos_number(p: Path) -> int:
        return int(p.name.split("_")[1].split(".")[0])

    picks: list[tuple[str, Path, Path | None, str]] = []
    flare = first("FLARE22/Training/FLARE22_LabeledCase50/images/*_0000.nii.gz")
    if flare:
        label = flare.parents[1] / "labels" / flare.name.replace("_0000", "")
        picks.append(("FLARE22 train", flare, label, "CT"))
    unlabeled = first("FLARE22/Training/FLARE22_UnlabeledCase*/*_0000.nii.gz")
    if unlabeled:
        picks.append(("FLARE22 unlabelled", unlabeled, None, "CT"))
    for title, keep, modality in (("AMOS CT", lambda p: amos_number(p) <= 500, "CT"),
                                  ("AMOS MR", lambda p: amos_number(p) > 500, "MR")):
        image = first("AMOS/amos22/imagesTr/amos_*.nii.gz", keep)
        if image:
            picks.append((title, image, image.parents[1] / "labelsTr" / image.name, modality))
    word = first("WORD/WORD-V0.1.0/imagesTr/word_*.nii.gz")
    if word:
        picks.append(("WORD", word, word.parents[1] / "labelsTr" / word.name, "CT"))
    meta = raw_root / "TotalSegmentator/meta.csv"
    if meta.exists():
        rows = list(csv.DictReader(meta.open(), delimiter=";"))
        for study in REGION_STUDY_TYPES.values():
            row = next((r for r in rows if r["study_type"] == study), None)
            if row:
                folder = raw_root / "TotalSegmentator" / row["image_id"]
                picks.append((f"TotalSeg {study[3:]}", folder / "ct.nii.gz", folder / "segmentations", "CT"))
    btcv = first("BTCV/RawData/Training/img/img*.nii.gz")
    if btcv:
        picks.append(("BTCV", btcv, btcv.parents[1] / "label" / btcv.name.replace("img", "label"), "CT"))
    return picks


def _load_canonical(image_path: Path,
                    label_source: Path | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(image_path)))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    labels = None
    if label_source is not None and label_source.is_dir():
        reference = nib.load(str(image_path))
        labels = np.zeros(reference.shape, dtype=np.int32)
        for i, mask_path in enumerate(sorted(label_source.glob("*.nii.gz")), start=1):
            mask = np.asanyarray(nib.load(str(mask_path)).dataobj)
            labels[mask > 0] = i
        labels = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(labels, reference.affine)).dataobj)
    elif label_source is not None:
        labels = np.asanyarray(nib.as_closest_canonical(nib.load(str(label_source))).dataobj).astype(np.int32)
    return data, labels, np.array(img.header.get_zooms()[:3])


def render_overview(raw_root: str | Path, out_png: str | Path) -> Path:
    """A montage of one case per dataset flavour (axial slice with the most labelled structures, and the
    mid coronal slice), in radiological view with labels overlaid -- to check the phantoms by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _overview_cases(Path(raw_root))
    if not picks:
        raise FileNotFoundError(f"{raw_root}: no synthetic cases found")
    fig, axes = plt.subplots(2, len(picks), figsize=(2.6 * len(picks), 6.2), squeeze=False)
    for col, (title, image_path, label_source, modality) in enumerate(picks):
        data, labels, zooms = _load_canonical(image_path, label_source)
        if labels is not None:
            counts = [len(np.unique(labels[:, :, k])) for k in range(labels.shape[2])]
            k = int(np.argmax(counts))
        else:
            k = data.shape[2] // 2
        window = (-200, 300) if modality == "CT" else (0, float(np.percentile(data, 99.5)))
        j = data.shape[1] // 2
        axial, coronal = (slice(None, None, -1), slice(None, None, -1), k), (slice(None, None, -1), j,
                                                                               slice(None, None, -1))
        for row, (cut, aspect) in enumerate(((axial, zooms[1] / zooms[0]), (coronal, zooms[2] / zooms[0]))):
            ax = axes[row, col]
            style = {"aspect": aspect, "interpolation": "nearest"}
            ax.imshow(data[cut].T, cmap="gray", vmin=window[0], vmax=window[1], **style)
            if labels is not None:  # radiological view: patient's right on the left, anterior / head up
                overlay = labels[cut].T
                masked = np.ma.masked_equal(overlay % 20 + (overlay > 0), 0)
                ax.imshow(masked, cmap="tab20", vmin=1, vmax=20, alpha=0.35, **style)
            ax.set_axis_off()
        codes = "".join(nib.aff2axcodes(nib.load(str(image_path)).affine))
        spacing = " x ".join(f"{z:.1f}" for z in zooms)
        axes[0, col].set_title(f"{title}\n{codes}  {spacing} mm", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
