"""Load released STU-Net weights (nnU-Net v1 ``.model``, v2 ``.pth``, plain state dicts) into an aeval model.

Rules, as the STU-Net fine-tuning scripts apply them, plus two conveniences:
- weights live under ``network_weights`` (v2), ``state_dict`` (v1, Lightning) or are the whole file;
- ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped;
- the segmentation heads (``seg_outputs.*``) are skipped, with a warning, when their shapes differ
  (another class count); the model keeps its freshly initialised heads;
- when the model has k times the file's input channels, the input convolutions' weights are tiled k times
  along the channel axis and divided by k: an input whose channels all equal the one channel the
  pretrained network saw then gives exactly the pretrained first-layer response;
- every other missing, unexpected or differently shaped tensor is refused, with all of them listed;
- nnU-Net checkpoints (v1 ``.model``, v2 ``.pth``) are loaded as they are, with a logged warning: their
  networks saw nnU-Net's axis order ((z, y, x) of the stored orientation, after the plan's transpose) while
  aeval fine-tunes in its own (RAS, nibabel (x, y, z)); the weights are not permuted. For inference in the
  official convention use ``aeval.predict`` with the model's nnU-Net plan.

Files are read with ``torch.load(weights_only=True)``. nnU-Net checkpoints also hold numpy scalars and
arrays in their training logs; those numpy types (and only those) are allowlisted. Anything else
needs ``trusted=True``, which loads the full pickle and logs why.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aeval.errors import CaseError

log = logging.getLogger(__name__)

HEAD_PREFIX = "seg_outputs."
INPUT_CONV_KEYS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")
DEFAULT_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 12


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: tensors loaded, tiled (key -> factor) and skipped (key -> reason)."""

    path: str
    source: str
    loaded: list[str] = field(default_factory=list)
    tiled: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"{self.path}: loaded {len(self.loaded)} tensors from {self.source}"
        if self.tiled:
            text += f"; tiled input channels of {', '.join(f'{k} (x{n})' for k, n in self.tiled.items())}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} ({_listing(list(self.skipped))})"
        return text


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, trusted: bool = False,
                    strip_prefixes: Sequence[str] = DEFAULT_PREFIXES, for_training: bool = True) -> LoadReport:
    """Copy the weights in ``path`` into ``model`` (in place) under the rules in the module docstring;
    ``for_training=False`` (inference in nnU-Net's own convention) drops the axis-order warning."""
    path = Path(path)
    target = _unwrap(model)
    weights, source = _extract_weights(read_checkpoint(path, trusted=trusted), path)
    weights = {_strip(k, strip_prefixes): v for k, v in weights.items()}
    if for_training and source.startswith("an nnU-Net"):
        log.warning("%s: %s, trained in nnU-Net's axis order; fine-tuning runs in aeval's RAS (x, y, z) order and "
                    "the weights are not converted", path, source)
    own = target.state_dict()
    report = LoadReport(str(path), source)

    heads = [k for k in own if k.startswith(HEAD_PREFIX)]
    file_heads = [k for k in weights if k.startswith(HEAD_PREFIX)]
    if heads and (set(heads) != set(file_heads) or any(weights[k].shape != own[k].shape for k in heads)):
        reason = _head_reason(weights, own)
        report.skipped.update(dict.fromkeys(heads, reason))
        log.warning("%s: not loading the segmentation heads (%s): %s", path, reason, _listing(heads))

    problems = [f"missing {k}" for k in own if k not in weights and k not in report.skipped]
    problems += [f"unexpected {k}" for k in weights if k not in own and not k.startswith(HEAD_PREFIX)]
    merged = dict(own)
    for key, theirs in weights.items():
        if key not in own or key in report.skipped:
            continue
        mine = own[key]
        if theirs.shape == mine.shape:
            merged[key] = theirs
        elif key in INPUT_CONV_KEYS and (factor := _tiling_factor(theirs.shape, mine.shape)):
            merged[key] = theirs.repeat(1, factor, *([1] * (theirs.dim() - 2))) / factor
            report.tiled[key] = factor
        else:
            problems.append(f"{key}: file {list(theirs.shape)} vs model {list(mine.shape)}")
            continue
        report.loaded.append(key)
    if problems:
        raise CaseError(path, f"incompatible with the model ({len(problems)} problems): {_listing(problems)}")
    if report.tiled:
        factor = next(iter(report.tiled.values()))
        log.warning("%s: the model has %d times the file's input channels: tiled %s and divided them by %d",
                    path, factor, ", ".join(report.tiled), factor)
    target.load_state_dict(merged, strict=True)
    log.info("%s", report)
    return report


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> object:
    """``torch.load`` on CPU without unpickling arbitrary objects unless ``trusted``."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, "checkpoint not found")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _blocked_globals(path, err)
        if not trusted and not blocked:
            raise CaseError(path, f"unreadable checkpoint ({_first_line(err)})") from None
        reason = (f"it needs objects outside the weights-only allowlist: {blocked}" if blocked
                  else f"the weights-only unpickler failed: {_first_line(err)}")
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CaseError(path, f"unreadable checkpoint ({type(err).__name__}: {_first_line(err)})") from None
    if not trusted:
        raise CaseError(path, f"refusing to unpickle: {reason}; pass trusted=True only if you trust it")
    log.warning("%s: loading with weights_only=False because %s (trusted=True)", path, reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CaseError(path, f"unreadable checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def _numpy_globals() -> list[tuple[object, str]]:
    """numpy scalars, arrays and dtypes as nnU-Net's logs pickle them, under numpy 1 and numpy 2 names."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    found = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(getattr(multiarray, name), f"{module}.{name}") for name in ("scalar", "_reconstruct")]
    dtypes = vars(np.dtypes).items()
    found += [(cls, f"numpy.dtypes.{name}") for name, cls in dtypes if name.endswith("DType")]
    return found


def _blocked_globals(path: Path, err: BaseException) -> str:
    """The non-allowlisted globals a checkpoint needs, or '' when the failure is something else."""
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be listed ahead; the loader's message names one
        line = _first_line(err)
        prefix = "Unsupported global: GLOBAL "
        return line.removeprefix(prefix).split(" ")[0] if line.startswith(prefix) else ""
    known = {name for _, name in _numpy_globals()}
    return ", ".join(g for g in needed if g not in known)


def _extract_weights(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(obj, Mapping):
        for key, source in (("network_weights", "an nnU-Net v2 checkpoint"),
                            ("state_dict", "an nnU-Net v1 / Lightning checkpoint")):
            if isinstance(obj.get(key), Mapping):
                if key == "state_dict" and "hyper_parameters" in obj:
                    source = "a Lightning checkpoint"
                return dict(obj[key]), source
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), "a plain state dict"
    raise CaseError(path, "no weights found: expected 'network_weights' (nnU-Net v2), 'state_dict' "
                    "(nnU-Net v1) or a plain state dict of tensors")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose keys match the file: look through torch.compile and DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _strip(key: str, prefixes: Sequence[str]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _tiling_factor(theirs: torch.Size, mine: torch.Size) -> int | None:
    same_elsewhere = len(theirs) == len(mine) and theirs[0] == mine[0] and theirs[2:] == mine[2:]
    if same_elsewhere and mine[1] > theirs[1] and mine[1] % theirs[1] == 0:
        return mine[1] // theirs[1]
    return None


def _head_reason(weights: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    key = f"{HEAD_PREFIX}0.weight"
    if key in weights and key in own and weights[key].shape[0] != own[key].shape[0]:
        return f"class count differs: file {weights[key].shape[0]}, model {own[key].shape[0]}"
    return "heads in the file do not match the model's heads"


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _first_line(err: BaseException) -> str:
    """The informative line of an error: torch's weights-only failures bury it after a long preamble."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
