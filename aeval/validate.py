"""Check a run's configuration before any expensive work: a typo or an out-of-range number is one line naming
the key (an unknown name lists the known ones), raised as :class:`ConfigError` (a ``ValueError``, which the
entry points turn into that line and exit code 2), not an error after planning and preprocessing, and never
a silent fallback. (A typo in a group choice, ``optim=adam``, is Hydra's own one-line error listing the options.)"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aeval.dataset import DATASET_JSON, UnifiedDataset
from aeval.keys import MODEL_SIZES, model_size
from aeval.labels import LABEL_SYSTEMS

__all__ = ["ConfigError", "check_output_folder", "check_train_config", "known_datasets"]

DATASET_CONFIGS = Path(__file__).resolve().parent / "conf" / "dataset"
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line naming the key."""


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def _number(cfg: Mapping[str, Any], key: str, ok: Callable[[float], bool], rule: str, *, integer: bool = False,
            optional: bool = True) -> None:
    value = _get(cfg, key)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{key}: missing; it must be {rule}")
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise ConfigError(f"{key}={value!r}: not {'an integer' if integer else 'a number'}; it must be {rule}")
    if not ok(value):
        raise ConfigError(f"{key}={value}: it must be {rule}")


def _choice(cfg: Mapping[str, Any], key: str, known: Sequence[str], normalise: Callable[[str], str] = str) -> None:
    value = _get(cfg, key)
    if value is not None and normalise(str(value)) not in known:
        raise ConfigError(f"{key}={value}: unknown; known: {', '.join(known)}")


def _check_target(cfg: Mapping[str, Any], key: str, base: type) -> None:
    """``<key>._target_`` must name an importable subclass of ``base`` (an optimizer, a loss module)."""
    from hydra.utils import get_class

    target = _get(cfg, f"{key}._target_")
    if target is None:
        return
    try:
        cls = get_class(str(target))
    except Exception as err:  # Hydra wraps the import error; its first line is the useful part
        raise ConfigError(f"{key}._target_={target}: cannot be imported ({str(err).splitlines()[0]})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}._target_={target}: not a {base.__module__}.{base.__qualname__}")


def known_datasets(data_root: str | os.PathLike | None) -> list[str]:
    """Datasets with a config in ``conf/dataset`` and datasets converted under ``data_root``."""
    names = {p.stem for p in DATASET_CONFIGS.glob("*.yaml")}
    if data_root is not None and Path(data_root).is_dir():
        names |= {p.parent.name for p in Path(data_root).glob(f"*/{DATASET_JSON}")}
    return sorted(names)


def _check_datasets(cfg: Mapping[str, Any]) -> None:
    train_sets = _get(cfg, "train_sets")
    if not train_sets:
        raise ConfigError("train_sets: empty; name at least one dataset")
    data_root = _get(cfg, "paths.data_root")
    known = known_datasets(data_root)
    for name in train_sets:
        if not isinstance(name, str):
            continue  # a protocol's pseudo-labelled set, resolved by the protocol
        if name not in known:
            raise ConfigError(f"train_sets: unknown dataset '{name}'; known: {', '.join(known)}")
        if data_root is not None and not UnifiedDataset.at(data_root, name).exists():
            raise ConfigError(f"train_sets: dataset '{name}' is not converted (no {Path(data_root) / name}/"
                              f"dataset.json); run `python -m aeval.prepare only=[{name}]`")


def _check_patch_size(cfg: Mapping[str, Any]) -> None:
    patch = _get(cfg, "plan.patch_size")
    if patch is None:
        return
    values = list(patch) if not isinstance(patch, str | int) else None
    if values is None or len(values) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                     for n in values):
        raise ConfigError(f"plan.patch_size={patch}: it must be three integers >= 1 (or null for the automatic plan)")


def check_train_config(cfg: Mapping[str, Any], *, datasets: bool = True) -> None:
    """Raise :class:`ConfigError` for the first unusable value of a training config (``aeval/conf/train.yaml``).
    ``datasets=False`` skips the check that the training sets are converted (a protocol converts them)."""
    import torch  # only for the training check (the optimizer and loss base classes)

    if datasets:
        _check_datasets(cfg)
    _choice(cfg, "model.size", sorted(MODEL_SIZES), model_size)
    _check_target(cfg, "optim", torch.optim.Optimizer)
    _check_target(cfg, "loss", torch.nn.Module)
    _choice(cfg, "trainer.precision", PRECISIONS)
    _choice(cfg, "data.augment_on", ["cpu", "gpu"])
    _choice(cfg, "dataset.label_system", LABEL_SYSTEMS)
    _number(cfg, "trainer.max_epochs", lambda v: v >= 1, "an integer >= 1", integer=True)
    _number(cfg, "data.iterations_per_epoch", lambda v: v >= 1, "an integer >= 1", integer=True)
    _number(cfg, "data.batch_size", lambda v: v >= 1, "an integer >= 1", integer=True)
    _number(cfg, "data.num_workers", lambda v: v >= 0, "an integer >= 0", integer=True)
    _number(cfg, "data.oversample_foreground", lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
    _number(cfg, "data.val_cases", lambda v: v >= 0, "a fraction in [0, 1) or a case count >= 0")
    _number(cfg, "optim.lr", lambda v: v > 0, "a number > 0")
    _number(cfg, "optim.weight_decay", lambda v: v >= 0, "a number >= 0")
    _number(cfg, "optim.momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _number(cfg, "scheduler.poly_exponent", lambda v: v >= 0, "a number >= 0")
    _number(cfg, "preprocess_workers", lambda v: v >= 1, "an integer >= 1", integer=True)
    _number(cfg, "trainer.gradient_clip_val", lambda v: v > 0, "a number > 0 (or null for no clipping)")
    _check_patch_size(cfg)


def check_output_folder(path: str | os.PathLike | None, key: str = "out") -> None:
    """``key`` must name a folder or a path that can become one, not an existing file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{key}={path}: exists and is not a folder; name a folder for the outputs")
