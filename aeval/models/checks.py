"""Checks on a checkpoint's weights before a network uses them: a refusal is one line naming the file and what
is wrong (the first mismatching keys and shapes; tensors with NaN/inf), never torch's bare "Error(s) in
loading state_dict" or a network that predicts background everywhere."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from aeval.errors import CaseError

__all__ = ["check_finite", "check_fits"]

MAX_LISTED = 3


def _first(items: list[str]) -> str:
    return ", ".join(items[:MAX_LISTED]) + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def check_fits(own: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
               source: str | os.PathLike) -> None:
    """Raise a CaseError naming the missing, unexpected and differently shaped keys of ``weights``."""
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {list(weights[k].shape)} vs model {list(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    problems = [f"{len(found)} {what}: {_first(found)}"
                for what, found in (("missing", missing), ("unexpected", unexpected), ("differently shaped", shapes))
                if found]
    if problems:
        raise CaseError(source, f"weights do not fit the model ({'; '.join(problems)})")


def check_finite(weights: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Raise a CaseError when any floating-point tensor holds NaN or inf (a diverged or damaged checkpoint)."""
    bad = [k for k, v in weights.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CaseError(source, f"{len(bad)} of {len(weights)} weight tensors hold NaN/inf values ({_first(bad)}); "
                        "refusing a checkpoint that cannot predict")
