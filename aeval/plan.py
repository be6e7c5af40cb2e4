"""The plan: what preprocessing and the network need, fixed once per training-set union (nnU-Net v2's
``plans.json``, in aeval's RAS convention).

:mod:`aeval.data.planner` derives one from a dataset fingerprint; the preprocessing cache, the data module, the
LightningModule and the predictor read it; a checkpoint carries it as a plain dict. :class:`Plan` is the one
place that knows its keys: :meth:`Plan.from_dict` validates once (a missing or malformed key is one
:class:`~aeval.errors.CaseError` naming the file), :meth:`Plan.to_dict` gives the JSON back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aeval.errors import CaseError

__all__ = ["CT_BODY_THRESHOLD", "Plan"]

CT_BODY_THRESHOLD = -500.0  # HU: CT cases are cropped to the voxels above it (the body and the table)
REQUIRED = ("hash", "datasets", "target_spacing", "normalization", "patch_size", "pool_op_kernel_sizes")


@dataclass(frozen=True)
class Plan:
    """An aeval plan. Axis order is RAS throughout.

    Args:
        hash: content hash of everything that shapes the cache and the network (the cache checks it).
        datasets: ``{name, modality, label_system}`` of each training set the plan was made for.
        target_spacing: resampling target in mm.
        normalization: ``{"scheme": "ct", "clip": [lo, hi], "mean", "std"}`` or ``{"scheme": "zscore"}``.
        patch_size: training and sliding-window patch in voxels.
        pool_op_kernel_sizes: STU-Net's five pooling strides.
        crop: ``{"ct_threshold": HU, "other": "nonzero"}``: the body crop before resampling.
        extra: every other key of ``plans.json`` (fingerprint digest, median shape, ...), kept for the round trip.
    """

    hash: str
    datasets: tuple[dict[str, str], ...]
    target_spacing: tuple[float, float, float]
    normalization: dict[str, Any]
    patch_size: tuple[int, int, int]
    pool_op_kernel_sizes: tuple[tuple[int, int, int], ...]
    crop: dict[str, Any] = field(default_factory=lambda: {"ct_threshold": CT_BODY_THRESHOLD, "other": "nonzero"})
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike = "plan") -> Plan:
        """The plan of a ``plans.json`` mapping.

        Raises:
            CaseError: naming ``source`` when a key is missing or malformed (not an aeval plan).
        """
        if isinstance(data, Plan):
            return data
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise CaseError(source, f"not an aeval plan (missing {', '.join(missing)}); training writes one "
                            "(plans.json under paths.preprocessed_root), or pass an nnU-Net plan")
        try:
            own = {f.name for f in fields(cls)} - {"extra"}
            return cls(
                hash=str(data["hash"]),
                datasets=tuple({k: str(v) for k, v in d.items()} for d in data["datasets"]),
                target_spacing=_triple(data["target_spacing"], float),
                normalization=dict(data["normalization"]),
                patch_size=_triple(data["patch_size"], int),
                pool_op_kernel_sizes=tuple(_triple(p, int) for p in data["pool_op_kernel_sizes"]),
                crop=dict(data.get("crop") or {"ct_threshold": CT_BODY_THRESHOLD, "other": "nonzero"}),
                extra={k: v for k, v in data.items() if k not in own},
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise CaseError(source, f"malformed plan ({type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Plan:
        """The plan in a ``plans.json`` file (a CaseError naming it when unreadable or not a plan)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise CaseError(path, f"unreadable plan ({type(err).__name__}: {err})") from None
        return cls.from_dict(data, path)

    def to_dict(self) -> dict[str, Any]:
        """The ``plans.json`` mapping (what :meth:`from_dict` reads back to an equal plan)."""
        return {
            **self.extra,
            "hash": self.hash,
            "datasets": [dict(d) for d in self.datasets],
            "target_spacing": list(self.target_spacing),
            "normalization": dict(self.normalization),
            "patch_size": list(self.patch_size),
            "pool_op_kernel_sizes": [list(p) for p in self.pool_op_kernel_sizes],
            "crop": dict(self.crop),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @property
    def modalities(self) -> set[str]:
        return {d["modality"] for d in self.datasets}

    @property
    def ct_threshold(self) -> float:
        return float(self.crop.get("ct_threshold", CT_BODY_THRESHOLD))

    def get(self, key: str, default: Any = None) -> Any:
        """A bookkeeping key of ``plans.json`` outside the typed fields (e.g. ``fingerprint_digest``)."""
        return self.extra.get(key, default)


def _triple(values: Any, kind: type) -> tuple:
    out = tuple(kind(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values, got {list(values)}")
    return out
