"""Official nnU-Net plans (v2 ``plans.json`` + ``dataset.json``, v1 ``plans.pkl`` / ``*.model.pkl``) read into
one plain dict that :mod:`aeval.data.nnunet_preprocess` and the predictor use.

Official STU-Net checkpoints were trained by nnU-Net, so their inputs must be prepared the way nnU-Net
prepares them (its axis order, transposes, crop, resampling and normalisation). This module only reads
the plans; it does not import nnU-Net. The dict it returns carries ``"convention": "nnunet"`` so a loaded
model records which preprocessing it needs; aeval's own plans carry no convention key (aeval's).

v1 pickles are read with a restricted unpickler that admits only numpy arrays/scalars/dtypes and
``OrderedDict`` (what nnU-Net v1 writes), never arbitrary classes.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aeval.errors import CaseError

CONVENTION = "nnunet"
DEFAULT_CONFIGURATION = "3d_fullres"
REORIENT_MODES = ("none", "ras")
# normalisation schemes we reimplement (v2 class names; v1's 'CT'/'nonCT'/'noNorm' are mapped onto them)
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization")
_V1_SCHEMES = {"CT": "CTNormalization", "nonCT": "ZScoreNormalization", "noNorm": "NoNormalization"}
_SUPPORTED_RESAMPLING = "resample_data_or_seg_to_shape"
_DATA_KWARGS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
_PROB_KWARGS = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}


def is_nnunet_plan(source: Mapping[str, Any] | str | Path) -> bool:
    """True for a v1 pickle path or a v2 plans dict/file (it has ``configurations``)."""
    if isinstance(source, Mapping):
        return "configurations" in source or "plans_per_stage" in source
    path = Path(source)
    if path.suffix == ".pkl":
        return True
    try:
        return "configurations" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and dtypes and OrderedDict; refuses every other global."""

    _MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.dtypes",
                "numpy.core.numeric", "numpy._core.numeric")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module in self._MODULES and (name in ("_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer")
                                        or name.endswith("DType")):
            import importlib
            real = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
            return getattr(importlib.import_module(real), name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an nnU-Net plans pickle")


def read_pickle(path: str | Path) -> Any:
    """A v1 ``plans.pkl`` / ``*.model.pkl`` without executing arbitrary code."""
    path = Path(path)
    try:
        return _NumpyOnly(io.BytesIO(path.read_bytes())).load()
    except OSError as err:
        raise CaseError(path, f"unreadable plans ({err.strerror or err})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise CaseError(path, f"unreadable nnU-Net v1 pickle ({type(err).__name__}: {err})") from None


def _plain(value: Any) -> Any:
    """numpy values and OrderedDicts -> JSON types (the plan dict is stored and hashed as JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _stunet_pools(pools: Sequence[Sequence[int]], source: Path) -> list[list[int]]:
    """STU-Net's five strides: v2 lists one per stage (the first is [1, 1, 1]), v1 one per pooling."""
    pools = [[int(s) for s in p] for p in pools]
    if len(pools) == 6 and pools[0] == [1, 1, 1]:
        pools = pools[1:]
    if len(pools) != 5:
        raise CaseError(source, f"STU-Net needs 5 pooling strides (six stages); the plan has {len(pools)}: {pools}")
    return pools


def _resolve(configurations: Mapping[str, Any], name: str, source: Path, seen: tuple[str, ...] = ()) -> dict:
    if name not in configurations:
        raise CaseError(source, f"no configuration {name!r} in the plans; available: {', '.join(configurations)}")
    config = dict(configurations[name])
    parent = config.get("inherits_from")
    if parent:
        if parent in seen:
            raise CaseError(source, f"circular configuration inheritance {' -> '.join((*seen, name, parent))}")
        config = {**_resolve(configurations, parent, source, (*seen, name)), **config}
    return config


def _check_resampling(config: Mapping[str, Any], source: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for role, key, default in (("data", "resampling_fn_data", _DATA_KWARGS),
                               ("probabilities", "resampling_fn_probabilities", _PROB_KWARGS)):
        name = config.get(key, _SUPPORTED_RESAMPLING)
        if name != _SUPPORTED_RESAMPLING:
            raise CaseError(source, f"{key} {name!r} is not supported (only {_SUPPORTED_RESAMPLING})")
        kwargs = {**default, **config.get(f"{key}_kwargs", {})}
        out[role] = _orders(kwargs)
    return out


def _orders(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("order", "order_z", "force_separate_z")}


def _normalizations(schemes: Sequence[str], use_mask: Sequence[bool], intensities: Mapping[str, Any],
                    source: Path) -> list[dict[str, Any]]:
    out = []
    for channel, scheme in enumerate(schemes):
        if scheme not in NORMALIZATIONS:
            raise CaseError(source, f"normalisation {scheme!r} (channel {channel}) is not supported; "
                            f"supported: {', '.join(NORMALIZATIONS)}")
        entry: dict[str, Any] = {"scheme": scheme, "use_mask": bool(use_mask[channel]) if use_mask else False}
        if scheme == "CTNormalization":
            stats = intensities.get(str(channel))
            if not stats:
                raise CaseError(source, f"CTNormalization needs foreground intensity statistics for channel {channel}")
            entry.update({k: float(stats[k]) for k in ("mean", "std", "percentile_00_5", "percentile_99_5")})
        out.append(entry)
    return out


def _finish(plan: dict[str, Any]) -> dict[str, Any]:
    plan["hash"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def read_v2_plans(plans: Mapping[str, Any], dataset_json: Mapping[str, Any] | None, configuration: str,
                  source: Path) -> dict[str, Any]:
    """A v2 ``plans.json`` (and its ``dataset.json``) -> the plan dict (see :func:`read_nnunet_plan`)."""
    config = _resolve(plans.get("configurations", {}), configuration, source)
    if len(config.get("patch_size", [])) != 3:
        raise CaseError(source, f"configuration {configuration!r} is not 3-D (patch {config.get('patch_size')})")
    pools = config.get("pool_op_kernel_sizes") or config.get("architecture", {}).get("arch_kwargs", {}).get("strides")
    if pools is None:
        raise CaseError(source, f"configuration {configuration!r} has no pool_op_kernel_sizes / architecture strides")
    labels = dict((dataset_json or {}).get("labels", {}))
    return _finish({
        "convention": CONVENTION, "nnunet_version": 2, "source": str(source), "configuration": configuration,
        "dataset_name": plans.get("dataset_name"), "plans_name": plans.get("plans_name"),
        "transpose_forward": [int(a) for a in plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(a) for a in plans.get("transpose_backward", [0, 1, 2])],
        "spacing": [float(s) for s in config["spacing"]],
        "patch_size": [int(p) for p in config["patch_size"]],
        "pool_op_kernel_sizes": _stunet_pools(pools, source),
        "normalization": _normalizations(config["normalization_schemes"], config.get("use_mask_for_norm", []),
                                         plans.get("foreground_intensity_properties_per_channel", {}), source),
        "resampling": _check_resampling(config, source),
        "average": "logits",
        "export_separate_z_first": "target",
        "labels": {str(k): v for k, v in labels.items()},
        "channel_names": dict((dataset_json or {}).get("channel_names", {})),
    })


def read_v1_plans(plans: Mapping[str, Any], configuration: str, source: Path) -> dict[str, Any]:
    """A v1 plans pickle's dict -> the plan dict. 3d_fullres is the last stage, 3d_lowres the first."""
    plans = _plain(plans)
    stages = plans.get("plans_per_stage")
    if not isinstance(stages, Mapping) or not stages:
        raise CaseError(source, "not an nnU-Net v1 plans pickle (no plans_per_stage)")
    keys = sorted(stages, key=int)
    if configuration == "3d_fullres":
        stage = stages[keys[-1]]
    elif configuration == "3d_lowres" and len(keys) > 1:
        stage = stages[keys[0]]
    else:
        raise CaseError(source, f"configuration {configuration!r} is not in these v1 plans "
                        f"({len(keys)} stage(s): 3d_fullres{', 3d_lowres' if len(keys) > 1 else ''})")
    n_channels = int(plans.get("num_modalities", len(plans.get("normalization_schemes", {})) or 1))
    raw_schemes = plans.get("normalization_schemes", {})
    schemes = [_V1_SCHEMES.get(raw_schemes.get(str(c), "nonCT"), raw_schemes.get(str(c))) for c in range(n_channels)]
    use_mask = [bool(plans.get("use_mask_for_norm", {}).get(str(c), False)) for c in range(n_channels)]
    intensities = {}
    for channel, stats in (plans.get("dataset_properties", {}).get("intensityproperties") or {}).items():
        intensities[str(channel)] = {"mean": stats["mean"], "std": stats["sd"],
                                     "percentile_00_5": stats["percentile_00_5"],
                                     "percentile_99_5": stats["percentile_99_5"]}
    classes = [int(c) for c in plans.get("all_classes", [])]
    return _finish({
        "convention": CONVENTION, "nnunet_version": 1, "source": str(source), "configuration": configuration,
        "dataset_name": None, "plans_name": None,
        "transpose_forward": [int(a) for a in plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(a) for a in plans.get("transpose_backward", [0, 1, 2])],
        "spacing": [float(s) for s in stage["current_spacing"]],
        "patch_size": [int(p) for p in stage["patch_size"]],
        "pool_op_kernel_sizes": _stunet_pools(stage["pool_op_kernel_sizes"], source),
        "normalization": _normalizations(schemes, use_mask, intensities, source),
        # v1: order 3 for images; the softmax (not the logits) is averaged and resampled with order 1 for export,
        # and the export decides separate-z on the original spacing first
        "resampling": {"data": _orders(_DATA_KWARGS), "probabilities": _orders(_PROB_KWARGS)},
        "average": "probabilities",
        "export_separate_z_first": "original",
        "labels": {"background": 0, **{f"class_{c}": c for c in classes if c}},
        "channel_names": {str(c): raw_schemes.get(str(c), "") for c in range(n_channels)},
    })


def read_nnunet_plan(plan: Mapping[str, Any] | str | Path, *, configuration: str = DEFAULT_CONFIGURATION,
                     dataset_json: Mapping[str, Any] | str | Path | None = None,
                     checkpoint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plan dict of an official nnU-Net model: spacing, patch, STU-Net strides, transposes (network axis
    order throughout), per-channel normalisation, resampling orders, label names.

    ``plan`` is a v2 ``plans.json`` (its ``dataset.json`` is read from the same folder unless given, else from
    the checkpoint's ``init_args``), a v1 ``plans.pkl`` or a v1 ``*.model.pkl`` (plans under ``plans``).
    Problems are :class:`CaseError` lines naming the file."""
    source = Path(plan) if not isinstance(plan, Mapping) else Path("plan")
    if isinstance(plan, Mapping):
        content: Any = dict(plan)
    elif source.suffix == ".pkl":
        content = read_pickle(source)
    else:
        try:
            content = json.loads(source.read_text())
        except (OSError, ValueError) as err:
            raise CaseError(source, f"unreadable plan ({type(err).__name__}: {err})") from None
    if isinstance(content, Mapping) and "plans" in content and "init" in content:
        content = content["plans"]  # a v1 *.model.pkl
    if not isinstance(content, Mapping):
        raise CaseError(source, "not an nnU-Net plan")
    if "plans_per_stage" in content:
        return read_v1_plans(content, configuration, source)
    if "configurations" not in content:
        raise CaseError(source, "not an nnU-Net plan (neither v2 'configurations' nor v1 'plans_per_stage')")
    dataset = _dataset_json(dataset_json, source, checkpoint)
    return read_v2_plans(content, dataset, configuration, source)


def _dataset_json(dataset_json: Mapping[str, Any] | str | Path | None, plans_path: Path,
                  checkpoint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(dataset_json, Mapping):
        return dict(dataset_json)
    path = Path(dataset_json) if dataset_json is not None else plans_path.parent / "dataset.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise CaseError(path, f"unreadable dataset.json ({err})") from None
    if dataset_json is not None:
        raise CaseError(path, "dataset.json not found")
    init_args = (checkpoint or {}).get("init_args") or {}
    found = init_args.get("dataset_json") if isinstance(init_args, Mapping) else None
    return dict(found) if isinstance(found, Mapping) else None
