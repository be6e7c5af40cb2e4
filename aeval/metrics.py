"""DSC and NSD as the A-Eval benchmark computes them, fast enough to score a whole grid.

NSD is DeepMind's surface Dice (``surface-distance``: ``compute_surface_distances`` followed by
``compute_surface_dice_at_tolerance``), reimplemented so that it gives the same numbers (to rounding)
while never touching more of the volume than the organs' own bounding boxes:

* Surface elements ("surfels") sit on the grid of voxel corners: each 2×2×2 block of voxels gets an
  8-bit neighbour code, and every code other than 0 and 255 is a surfel whose area comes from the
  marching-cubes triangulation of the block (scaled to the voxel spacing). The per-code areas are
  derived below from the geometry of the block; the ambiguous configurations are resolved the way
  DeepMind's table resolves them (checked against that table in the tests).
* A surfel counts as overlapping when the nearest surfel of the other surface is within τ mm. The
  reference computes two distance transforms over the bounding box of both masks, which one stray voxel
  blows up to the whole volume. Here each mask is split into tight clusters (a stray voxel gets a box
  of its own) and only surfel positions are searched: offsets of up to two voxels are looked up on a
  dense grid around each cluster, the remaining surfels ask a k-d tree over the other surface, and every
  accepted distance is measured with exactly the arithmetic of ``scipy.ndimage.distance_transform_edt``.

:func:`score_case` applies the benchmark's rules on top (empty masks, the slice crop, the tolerances),
in mode ``aeval`` exactly as the published A-Eval script does, in mode ``flare22`` as that script meant;
``aeval10`` and ``aeval2025_script`` are the same two readings for the ten organs of the 2025 edition.
:class:`OrganDice` is the same per-case DSC (and optionally NSD) as a torchmetrics ``Metric`` for
validation during training (``from aeval.metrics import OrganDice``; torch is imported only then).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from aeval.labels import AEVAL8_ORGANS, AEVAL10_ORGANS, AEVAL2025_ORGANS

METRIC_MODES = ("aeval", "flare22", "aeval10", "aeval2025_script")
CLASS_SPACES = {"aeval8": AEVAL8_ORGANS, "aeval10": AEVAL10_ORGANS, "aeval2025": AEVAL2025_ORGANS}
# The class spaces each mode scores; the first is its default, the one a cell folder's name leaves out.
MODE_CLASSES = {
    "aeval": ("aeval8", "aeval10"),
    "flare22": ("aeval8", "aeval10"),
    "aeval10": ("aeval2025",),
    "aeval2025_script": ("aeval2025",),
}
# What each mode is, for metric cards and error messages.
MODE_DESCRIPTIONS = {
    "aeval": "the published 2023 A-Eval script reproduced exactly (FLARE22's tolerance list and crop ids indexed "
             "by the 8-class ids): numbers comparable to the 2023 paper",
    "flare22": "what the 2023 script meant: FLARE22's tolerance by organ name, slice crop for esophagus only",
    "aeval10": "the ten organs of the 2025 edition as the benchmark means them: FLARE22's tolerance by organ "
               "name, slice crop for esophagus only",
    "aeval2025_script": "what the 2025 repository's unchanged 2023 script does to the 2025 numbering (tolerance "
                        "list and crop ids by id, class_list 1..8): numbers comparable to the 2025 README; "
                        "left adrenal and esophagus are not scored",
}

# FLARE22's NSD tolerances (mm) by organ, and the organs it scores only on the GT's labelled slices.
FLARE22_TOLERANCE_MM = {
    "liver": 5.0, "kidney_right": 3.0, "kidney_left": 3.0, "spleen": 3.0, "pancreas": 5.0, "aorta": 2.0,
    "inferior_vena_cava": 2.0, "adrenal_gland_right": 2.0, "adrenal_gland_left": 2.0, "gallbladder": 2.0,
    "esophagus": 3.0, "stomach": 5.0, "duodenum": 7.0,
}
FLARE22_SLICE_CROPPED = frozenset({"aorta", "inferior_vena_cava", "esophagus"})

# The published A-Eval script keeps FLARE22's per-class list and crop ids (5 aorta, 6 IVC, 10 esophagus)
# but indexes them with the remapped class ids, and scores ``class_list`` 1..8 only (2023 and 2025 alike).
AEVAL_SCRIPT_TOLERANCE_BY_ID = (0, 5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3)
AEVAL_SCRIPT_CROPPED_IDS = frozenset({5, 6, 10})
AEVAL_SCRIPT_CLASS_LIST = tuple(range(1, 9))


@dataclass(frozen=True)
class OrganRule:
    """How one class is scored: NSD tolerance and whether both masks are cut to the GT's slices."""

    organ: str
    label: int
    tolerance_mm: float
    slice_crop: bool


def _check_mode(mode: str, classes: str | None) -> str:
    if mode not in METRIC_MODES:
        raise ValueError(f"unknown metric mode '{mode}'; known: {', '.join(METRIC_MODES)}")
    classes = classes or MODE_CLASSES[mode][0]
    if classes not in CLASS_SPACES:
        raise ValueError(f"unknown class space '{classes}'; known: {', '.join(CLASS_SPACES)}")
    if classes not in MODE_CLASSES[mode]:
        raise ValueError(f"metric mode '{mode}' scores class space {' or '.join(MODE_CLASSES[mode])}, "
                         f"not '{classes}'")
    return classes


def _script_rule(organ: str, label: int) -> OrganRule:
    return OrganRule(organ, label, float(AEVAL_SCRIPT_TOLERANCE_BY_ID[label]), label in AEVAL_SCRIPT_CROPPED_IDS)


def _flare22_rule(organ: str, label: int) -> OrganRule:
    return OrganRule(organ, label, FLARE22_TOLERANCE_MM[organ], organ in FLARE22_SLICE_CROPPED)


@cache
def scoring_rules(mode: str = "aeval", classes: str | None = None) -> tuple[OrganRule, ...]:
    """The rule of every scored class of ``classes`` under metric ``mode`` (``classes=None``: the mode's own).

    ``aeval``: the 8 organs get the script's tolerance and crop by their 8-class id (liver 5, kidney_right
    3, spleen 3, pancreas 5, gallbladder 2 + crop, esophagus 2 + crop, stomach 2, kidney_left 2). The
    adrenals of ``aeval10`` were never scored by that script and get FLARE22's rule (2 mm, no crop).
    ``flare22`` and ``aeval10``: FLARE22's rule by organ name (esophagus 3 mm + crop, stomach 5, kidneys 3, ...).
    ``aeval2025_script``: the script's rule by id on the 2025 numbering, ids 1..8 only (spleen 5, kidneys 3,
    gallbladder 5, liver 2 + crop, stomach 2 + crop, pancreas 2, right adrenal 2; left adrenal and esophagus
    are left out).
    """
    classes = _check_mode(mode, classes)
    rules = []
    for label, organ in enumerate(CLASS_SPACES[classes], start=1):
        if mode == "aeval2025_script":
            if label in AEVAL_SCRIPT_CLASS_LIST:
                rules.append(_script_rule(organ, label))
        elif mode == "aeval" and organ in AEVAL8_ORGANS:
            rules.append(_script_rule(organ, label))
        else:
            rules.append(_flare22_rule(organ, label))
    return tuple(rules)


def unscored_organs(mode: str, classes: str | None = None) -> tuple[str, ...]:
    """Organs of the class space that ``mode`` leaves out (``aeval2025_script``: left adrenal, esophagus)."""
    scored = {rule.organ for rule in scoring_rules(mode, _check_mode(mode, classes))}
    return tuple(o for o in CLASS_SPACES[_check_mode(mode, classes)] if o not in scored)


def metric_key(mode: str, classes: str | None = None) -> str:
    """How a cell's metric folder is named: the mode, plus the class space when it is not the mode's default
    (``aeval``, ``aeval-aeval10``, ``flare22``, ``aeval10``, ``aeval2025_script``)."""
    default = MODE_CLASSES.get(mode, ("aeval8",))[0]
    classes = classes or default
    return mode if classes == default else f"{mode}-{classes}"


def parse_metric_key(key: str) -> tuple[str, str]:
    """``(mode, classes)`` of a cell folder name written by :func:`metric_key`; ValueError for another name."""
    mode, _, classes = key.partition("-")
    if mode not in METRIC_MODES:
        raise ValueError(f"'{key}' is not a metric mode; known: {', '.join(METRIC_MODES)}")
    return mode, _check_mode(mode, classes or None)


def metric_card(key: str) -> list[str]:
    """Markdown lines that say what metric ``key`` (a cell folder name) is: mode, organs, tolerances, crops."""
    try:
        mode, classes = parse_metric_key(key)
    except ValueError:
        return [f"- `{key}`: not an aeval metric mode (cells from elsewhere)."]
    rules = ", ".join(f"{r.organ} {r.tolerance_mm:g} mm" + (" + crop" if r.slice_crop else "")
                      for r in scoring_rules(mode, classes))
    lines = [f"- `{key}` (mode `{mode}`, classes `{classes}`): {MODE_DESCRIPTIONS[mode]}.",
             f"  NSD tolerance per organ: {rules}."]
    left_out = unscored_organs(mode, classes)
    if left_out:
        lines.append(f"  Not scored: {', '.join(left_out)}.")
    return lines


# --- surfel areas per neighbour code ------------------------------------------------------------------
#
# Corner p = (p0, p1, p2) of a 2×2×2 block carries bit 1 << (4*p0 + 2*p1 + p2); a set bit means the
# voxel is inside the mask. The surface crosses every block edge whose two corners differ, at the edge
# midpoint (marching cubes on a binary mask). On each block face these crossing points are joined into
# segments; a face with two diagonal inside corners is ambiguous: either the inside corners are cut off
# separately or the outside ones are. The segments close into loops, each loop is fanned into triangles.

_CORNERS = tuple(itertools.product((0, 1), repeat=3))  # index == bit position

# Ambiguous faces: cut off the minority side's corners (the smaller surface). With 4 corners inside and 4
# outside the reference table separates the inside corners, except for these codes (of the shape "three
# corners of a face plus the corner opposite the middle one"), where it separates the outside ones.
_TIES_SEPARATING_OUTSIDE = frozenset({30, 45, 57, 75, 89, 106, 108, 120, 154, 156, 169, 201})


def _face_cycles() -> list[list[tuple[int, int, int]]]:
    cycles = []
    for axis in range(3):
        u, v = (a for a in range(3) if a != axis)
        for side in (0, 1):
            cycle = []
            for pu, pv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[u], corner[v] = side, pu, pv
                cycle.append(tuple(corner))
            cycles.append(cycle)
    return cycles


def _surface_loops(code: int) -> list[list[np.ndarray]]:
    """Closed loops of edge midpoints (in corner coordinates) bounding the inside corners of ``code``."""
    inside = {c for i, c in enumerate(_CORNERS) if code >> i & 1}
    n_inside = len(inside)
    separate_inside = n_inside < 4 or (n_inside == 4 and code not in _TIES_SEPARATING_OUTSIDE)
    links: dict[frozenset, list[frozenset]] = {}
    for cycle in _face_cycles():
        state = [c in inside for c in cycle]
        edges = [frozenset((cycle[i], cycle[(i + 1) % 4])) for i in range(4)]
        crossing = [i for i in range(4) if state[i] != state[(i + 1) % 4]]
        if len(crossing) == 2:
            pairs = [(edges[crossing[0]], edges[crossing[1]])]
        elif len(crossing) == 4:  # ambiguous face: cut off each corner of the separated side
            pairs = [(edges[i - 1], edges[i]) for i in range(4) if state[i] == separate_inside]
        else:
            pairs = []
        for a, b in pairs:
            links.setdefault(a, []).append(b)
            links.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in links:
        if start in seen:
            continue
        loop, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = [e for e in links[current] if e != previous and e not in seen]
            if not following:
                break
            previous, current = current, following[0]
            loop.append(current)
            seen.add(current)
        loops.append([np.mean([np.array(c, float) for c in edge], axis=0) for edge in loop])
    return loops


def _fan_area_vectors(loop: list[np.ndarray]) -> list[np.ndarray]:
    """Area vectors (half cross products) of the fan triangulation of ``loop``.

    A non-planar loop has several fans of different area; like the reference table, take the fan of
    largest area, and among equal ones the apex with the smallest (x2, x1, x0)."""
    best = None
    for apex in range(len(loop)):
        ring = loop[apex:] + loop[:apex]
        vectors = [np.cross(ring[i] - ring[0], ring[i + 1] - ring[0]) / 2 for i in range(1, len(ring) - 1)]
        key = (-round(sum(np.linalg.norm(v) for v in vectors), 9), tuple(ring[0][::-1]))
        if best is None or key < best[0]:
            best = (key, vectors)
    return best[1]


@cache
def _code_area_vectors() -> np.ndarray:
    """(256, T, 3): the triangles' area vectors per code in voxel units, zero-padded."""
    per_code = [[v for loop in _surface_loops(code) for v in _fan_area_vectors(loop)] for code in range(256)]
    out = np.zeros((256, max(map(len, per_code)), 3))
    for code, vectors in enumerate(per_code):
        if vectors:
            out[code, : len(vectors)] = vectors
    return out


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area (mm²) of the surfel of each of the 256 neighbour codes at voxel size ``spacing``."""
    s0, s1, s2 = (float(s) for s in spacing)
    # an area vector's component along an axis scales with the voxel face across that axis
    scaled = _code_area_vectors() * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(scaled, axis=-1).sum(axis=-1)


# --- surfels of a mask, restricted to where the mask is ------------------------------------------------

Box = tuple[slice, slice, slice]


def _tight_clusters(mask: np.ndarray, origin: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split ``mask`` (a box of the volume at ``origin``) into tight sub-boxes separated by empty slabs,
    so that stray voxels far from the organ never make one huge box. Returns (origin, sub-mask) pairs."""
    out, stack = [], [(origin, mask)]
    while stack:
        origin, mask = stack.pop()
        plane = mask.any(axis=2)
        occupied = [np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0)),
                    np.flatnonzero(mask.any(axis=(0, 1)))]
        if any(o.size == 0 for o in occupied):
            continue
        tight = tuple(slice(o[0], o[-1] + 1) for o in occupied)
        origin = origin + np.array([o[0] for o in occupied])
        mask = mask[tight]
        for axis, o in enumerate(occupied):
            breaks = np.flatnonzero(np.diff(o) > 1)
            if breaks.size:
                o = o - o[0]
                starts = np.concatenate([[0], o[breaks + 1]])
                stops = np.concatenate([o[breaks] + 1, [o[-1] + 1]])
                for start, stop in zip(starts, stops, strict=True):
                    index = [slice(None)] * 3
                    index[axis] = slice(start, stop)
                    shift = np.zeros(3, int)
                    shift[axis] = start
                    stack.append((origin + shift, mask[tuple(index)]))
                break
        else:
            out.append((origin, mask))
    return out


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code of every voxel corner of a zero-padded box; corner i lies between voxels i-1 and i."""
    padded = np.zeros(tuple(n + 2 for n in mask.shape), np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    codes = padded[:, :, :-1] | (padded[:, :, 1:] << 1)
    codes = codes[:, :-1] | (codes[:, 1:] << 2)
    return codes[:-1] | (codes[1:] << 4)


@dataclass
class Surface:
    """Surfels of one mask: corner indices in the volume (n, 3), their areas (mm²), the voxel count, and
    per cluster of the mask its slice of the surfel arrays and its corner box ``(first, stop, lo, hi)``."""

    points: np.ndarray
    areas: np.ndarray
    voxels: int
    clusters: list[tuple[int, int, np.ndarray, np.ndarray]]

    @property
    def empty(self) -> bool:
        return self.voxels == 0


def _no_surface() -> Surface:
    return Surface(np.zeros((0, 3), np.int64), np.zeros(0), 0, [])


def mask_surface(labels: np.ndarray, value: int, box: Box | None, area_table: np.ndarray) -> Surface:
    """Surfels of ``labels == value`` inside ``box`` (everything outside the box counts as background)."""
    if box is None or any(s.stop <= s.start for s in box):
        return _no_surface()
    mask = labels[box] == value
    voxels = int(np.count_nonzero(mask))
    if not voxels:
        return _no_surface()
    points, areas, clusters, first = [], [], [], 0
    for origin, sub in _tight_clusters(mask, np.array([s.start for s in box])):
        codes = _neighbour_codes(sub)
        flat = np.flatnonzero((codes - np.uint8(1)) < 254)  # codes 1..254: mixed blocks
        points.append(np.stack(np.unravel_index(flat, codes.shape), axis=1) + origin)
        areas.append(area_table[codes.ravel()[flat]])
        clusters.append((first, first + flat.size, origin, origin + np.array(codes.shape)))
        first += flat.size
    return Surface(np.concatenate(points), np.concatenate(areas), voxels, clusters)


_PEEL_RADIUS = 2  # voxels: offsets checked on a dense grid before falling back to the k-d tree
_PEEL_MIN_SURFELS = 256  # smaller clusters (stray voxels) go straight to the tree


def _edt_distance(delta: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lengths (mm) of integer corner offsets, with distance_transform_edt's arithmetic:
    sqrt(((Δ0·s0)² + (Δ1·s1)²) + (Δ2·s2)²)."""
    scaled = delta.astype(np.float64) * spacing
    squared = scaled * scaled
    return np.sqrt(squared[..., 0] + squared[..., 1] + squared[..., 2])


def _peel_offsets(spacing: np.ndarray, tolerance_mm: float) -> np.ndarray:
    r = _PEEL_RADIUS
    offsets = np.array(list(itertools.product(range(-r, r + 1), repeat=3)))
    length = _edt_distance(offsets, spacing)
    keep = length <= tolerance_mm
    return offsets[keep][np.argsort(length[keep], kind="stable")]


def _within_tolerance(source: Surface, target: Surface, spacing: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """For each surfel of ``source``: is the nearest surfel of ``target`` at most τ mm away?

    First the offsets within a few voxels are looked up on a dense grid around each large cluster (most
    surfels of a reasonable prediction resolve there); the rest ask a k-d tree for their nearest target
    surfel, re-measured with the EDT's arithmetic."""
    close = np.zeros(len(source.points), bool)
    unresolved = np.ones(len(source.points), bool)
    offsets = _peel_offsets(spacing, tolerance_mm)
    r = _PEEL_RADIUS
    for first, stop, lo, hi in source.clusters:
        if stop - first < _PEEL_MIN_SURFELS or not len(offsets):
            continue
        lo_grid, hi_grid = lo - r, hi + r
        shape = tuple(hi_grid - lo_grid)
        inside = np.all((target.points >= lo_grid) & (target.points < hi_grid), axis=1)
        grid = np.zeros(int(np.prod(shape)), bool)
        grid[np.ravel_multi_index(tuple((target.points[inside] - lo_grid).T), shape)] = True
        todo = np.arange(first, stop)
        local = np.ravel_multi_index(tuple((source.points[first:stop] - lo_grid).T), shape)
        for step in offsets @ np.array([shape[1] * shape[2], shape[2], 1]):
            hit = grid.take(local + step)
            if hit.any():
                close[todo[hit]] = True
                todo, local = todo[~hit], local[~hit]
                if not todo.size:
                    break
        unresolved[first:stop] = False
        unresolved[todo] = True
    rest = np.flatnonzero(unresolved)
    if rest.size:
        tree = cKDTree(target.points * spacing, balanced_tree=False, compact_nodes=False)
        _, nearest = tree.query(source.points[rest] * spacing, k=1,
                                distance_upper_bound=tolerance_mm * (1 + 1e-9) + 1e-9)
        found = nearest < len(target.points)
        rest, nearest = rest[found], nearest[found]
        close[rest] = _edt_distance(source.points[rest] - target.points[nearest], spacing) <= tolerance_mm
    return close


def surface_dice(gt: Surface, pred: Surface, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Surface Dice at τ of two surfaces (NaN when both are empty, 0 when one is)."""
    if gt.empty and pred.empty:
        return float("nan")
    if gt.empty or pred.empty:
        return 0.0
    spacing = np.asarray(spacing, np.float64)
    overlap = (gt.areas[_within_tolerance(gt, pred, spacing, tolerance_mm)].sum()
               + pred.areas[_within_tolerance(pred, gt, spacing, tolerance_mm)].sum())
    return float(overlap / (gt.areas.sum() + pred.areas.sum()))


def _bounding_box(mask: np.ndarray) -> Box | None:
    boxes = ndimage.find_objects(mask.view(np.uint8), max_label=1)
    return boxes[0] if boxes else None


def normalized_surface_dice(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Sequence[float],
                            tolerance_mm: float) -> float:
    """DeepMind's surface Dice at ``tolerance_mm`` of two 3-D boolean masks, spacing in array-axis order.

    Equal to ``compute_surface_dice_at_tolerance(compute_surface_distances(gt, pred, spacing), τ)`` of the
    ``surface-distance`` package; NaN when both masks are empty, 0 when exactly one is."""
    pred_mask, gt_mask = np.asarray(pred_mask, bool), np.asarray(gt_mask, bool)
    if pred_mask.shape != gt_mask.shape or pred_mask.ndim != 3:
        raise ValueError(f"need two 3-D masks of one shape, got {pred_mask.shape} and {gt_mask.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing needs 3 values, got {tuple(spacing)}")
    table = surfel_area_table(spacing)
    gt = mask_surface(gt_mask.view(np.uint8), 1, _bounding_box(gt_mask), table)
    pred = mask_surface(pred_mask.view(np.uint8), 1, _bounding_box(pred_mask), table)
    return surface_dice(gt, pred, spacing, tolerance_mm)


# --- one case ------------------------------------------------------------------------------------------

def _crop_z(box: Box | None, z_start: int, z_stop: int) -> Box | None:
    if box is None:
        return None
    return box[0], box[1], slice(max(box[2].start, z_start), min(box[2].stop, z_stop))


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], mode: str = "aeval",
               classes: str | None = None) -> dict[str, dict[str, float]]:
    """DSC and NSD of every scored class of ``classes`` (None: the mode's own class space) for one case:
    ``{organ: {"dsc": .., "nsd": ..}}``.

    Both label maps are already in the evaluation space (0 background, 1..8 or 1..10), spacing in
    array-axis order (the GT header's zooms). Rules, per class:
    GT and prediction empty → 1, 1; GT empty, prediction not → 0, 0; for a slice-cropped class both masks
    are cut to ``[:, :, zmin:zmax]`` of the GT's third-axis extent (upper bound exclusive, as published:
    the top GT slice is dropped) and a GT on one slice (an empty crop) → 0, 0; else DSC and NSD at the
    class's tolerance (a GT with an empty prediction → 0, 0).
    """
    rules = scoring_rules(mode, classes)
    n_classes = len(CLASS_SPACES[_check_mode(mode, classes)])
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be 3-D of one shape")
    if len(spacing) != 3:
        raise ValueError(f"spacing needs 3 values, got {tuple(spacing)}")
    for name, labels in (("prediction", pred), ("ground truth", gt)):
        if labels.dtype.kind not in "iub":
            raise ValueError(f"{name} labels must be integers, got {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() > n_classes):
            raise ValueError(f"{name} has labels outside 0..{n_classes} (not in the {classes} space)")
    pred, gt = pred.astype(np.uint8, copy=False), gt.astype(np.uint8, copy=False)
    gt_boxes = ndimage.find_objects(gt, max_label=n_classes)
    pred_boxes = ndimage.find_objects(pred, max_label=n_classes)
    table = surfel_area_table(spacing)
    scores = {}
    for rule in rules:
        gt_box, pred_box = gt_boxes[rule.label - 1], pred_boxes[rule.label - 1]
        if gt_box is None:
            scores[rule.organ] = {"dsc": 1.0, "nsd": 1.0} if pred_box is None else {"dsc": 0.0, "nsd": 0.0}
            continue
        if rule.slice_crop:
            z_start, z_stop = gt_box[2].start, gt_box[2].stop - 1  # the script's exclusive upper bound
            if z_stop <= z_start:
                scores[rule.organ] = {"dsc": 0.0, "nsd": 0.0}
                continue
            gt_box, pred_box = _crop_z(gt_box, z_start, z_stop), _crop_z(pred_box, z_start, z_stop)
        gt_surface = mask_surface(gt, rule.label, gt_box, table)
        pred_surface = mask_surface(pred, rule.label, pred_box, table)
        intersection = 0
        if not pred_surface.empty:
            common = tuple(slice(max(g.start, p.start), min(g.stop, p.stop))
                           for g, p in zip(gt_box, pred_box, strict=True))
            if all(s.stop > s.start for s in common):
                intersection = int(np.count_nonzero((gt[common] == rule.label) & (pred[common] == rule.label)))
        dsc = 2.0 * intersection / (gt_surface.voxels + pred_surface.voxels)
        nsd = surface_dice(gt_surface, pred_surface, spacing, rule.tolerance_mm)
        scores[rule.organ] = {"dsc": dsc, "nsd": nsd}
    return scores


def empty_flags(pred: np.ndarray, gt: np.ndarray, classes: str = "aeval8") -> dict[str, dict[str, bool]]:
    """Which organs are absent from the ground truth and from the prediction (whole volume, evaluation space):
    ``{organ: {"gt_empty": .., "pred_empty": ..}}``. Stored next to the scores because the rules score a
    both-empty pair as 1, which other tools drop; the report needs to tell such pairs apart."""
    organs = CLASS_SPACES[classes]
    counts = [np.bincount(np.asarray(a).ravel().astype(np.intp, copy=False), minlength=len(organs) + 1)
              for a in (gt, pred)]
    return {organ: {"gt_empty": bool(counts[0][i] == 0), "pred_empty": bool(counts[1][i] == 0)}
            for i, organ in enumerate(organs, start=1)}


# --- validation metric for training ---------------------------------------------------------------------

def __getattr__(name: str):
    # OrganDice is built on first use so that scoring never pays for importing torch/torchmetrics.
    if name == "OrganDice":
        return _organ_dice_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _organ_dice_class() -> type:
    import torch
    from torchmetrics import Metric

    class OrganDice(Metric):
        """Per-organ Dice (and optionally NSD) averaged over cases, with the benchmark's empty-mask rules.

        ``update(preds, target)`` takes label maps ``(B, X, Y, Z)`` (or class scores ``(B, C, X, Y, Z)``,
        reduced by argmax) whose labels 1..len(organs) are ``organs``. Every case adds one DSC per organ:
        1 when both are empty, 0 when only the ground truth is, else 2|P∩G|/(|P|+|G|). With ``nsd=True`` it
        also adds the surface Dice at the organ's FLARE22 tolerance (spacing per call or fixed). The states
        are per-organ sums with ``dist_reduce_fx="sum"``, so the result under DDP equals the result on one
        process over all cases. ``compute()`` returns ``{"dsc": mean, "dsc/<organ>": ..., "nsd": ...}``.
        """

        full_state_update = False
        higher_is_better = True
        is_differentiable = False

        def __init__(self, organs: Sequence[str] = AEVAL8_ORGANS, nsd: bool = False,
                     spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     tolerances_mm: Mapping[str, float] | None = None, **kwargs):
            super().__init__(**kwargs)
            self.organs = tuple(organs)
            self.nsd = nsd
            self.spacing = tuple(float(s) for s in spacing)
            tolerances = {**FLARE22_TOLERANCE_MM, **(tolerances_mm or {})}
            missing = [o for o in self.organs if o not in tolerances] if nsd else []
            if missing:
                raise ValueError(f"no NSD tolerance for {', '.join(missing)}; pass tolerances_mm")
            self.tolerances = tuple(tolerances.get(o, 0.0) for o in self.organs)
            n = len(self.organs)
            self.add_state("dsc_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("nsd_sum", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("cases", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

        def update(self, preds: torch.Tensor, target: torch.Tensor, spacing: Sequence[float] | None = None) -> None:
            if preds.ndim == target.ndim + 1:
                preds = preds.argmax(dim=1)
            if preds.shape != target.shape:
                raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
            dims = tuple(range(1, target.ndim))
            dsc = torch.empty(target.shape[0], len(self.organs), dtype=torch.float64, device=target.device)
            for i in range(len(self.organs)):  # one organ at a time: memory stays at one volume
                p, g = preds == i + 1, target == i + 1
                p_sum, g_sum = p.sum(dims).double(), g.sum(dims).double()
                inter = (p & g).sum(dims).double()
                dsc[:, i] = torch.where(p_sum + g_sum == 0, 1.0, 2 * inter / (p_sum + g_sum).clamp_min(1))
            self.dsc_sum += dsc.sum(0)
            self.cases += preds.shape[0]
            if self.nsd:
                self.nsd_sum += self._surface_dice(preds, target, spacing or self.spacing).to(self.nsd_sum.device)

        def _surface_dice(self, preds: torch.Tensor, target: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
            total = torch.zeros(len(self.organs), dtype=torch.float64)
            pred_np, gt_np = preds.detach().cpu().numpy(), target.detach().cpu().numpy()
            for p, g in zip(pred_np, gt_np, strict=True):
                for i, tol in enumerate(self.tolerances):
                    pm, gm = p == i + 1, g == i + 1
                    if not gm.any():
                        total[i] += 0.0 if pm.any() else 1.0
                    else:
                        total[i] += normalized_surface_dice(pm, gm, spacing, tol)
            return total

        def compute(self) -> dict[str, torch.Tensor]:
            cases = self.cases.clamp_min(1)
            out = {"dsc": (self.dsc_sum / cases).mean()}
            out.update({f"dsc/{o}": v for o, v in zip(self.organs, self.dsc_sum / cases, strict=True)})
            if self.nsd:
                out["nsd"] = (self.nsd_sum / cases).mean()
                out.update({f"nsd/{o}": v for o, v in zip(self.organs, self.nsd_sum / cases, strict=True)})
            return out

    OrganDice.__module__, OrganDice.__qualname__ = __name__, "OrganDice"  # picklable as aeval.metrics.OrganDice
    return OrganDice
