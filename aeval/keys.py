"""What identifies a run and a result cell: the one owner of model names, run hashes and cell keys.

A run's identity is what changes its weights: protocol / training sets / model / a short hash of the resolved
training settings (model, trainer, data, optim, plan, seed, loss; not paths, loggers or reporting). So re-running
a command resumes the same run, and a sweep over ``seed`` or ``optim.lr`` gets one run per value. A cell adds the
test set and the metric mode to its run's key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["CellKey", "RunKey", "digest", "model_name", "run_hash", "training_settings"]

RUN_HASH_LENGTH = 8
# What a protocol config holds besides its settings: its name, where it is tested, how far a run goes.
PROTOCOL_NOT_HASHED = ("name", "test_sets", "evaluate_every_round", "stop_after_round")
TRAINING_SETTINGS = ("module", "model", "trainer", "data", "optim", "scheduler", "plan", "seed", "loss", "callbacks")
# Settings that change how a run is shown, where it runs or how fast it goes, not what it learns.
# ``trainer.max_steps`` pauses a run (it resumes from last.ckpt), so it is not part of what the run is.
NOT_HASHED = {"trainer": ("_target_", "accelerator", "strategy", "enable_progress_bar", "log_every_n_steps",
                          "enable_model_summary", "max_steps", "num_sanity_val_steps"),
              "data": ("num_workers", "augment_on")}


MODEL_SIZES = ("tiny", "s", "b", "l", "h")  # STU-Net's sizes (aeval.models.stunet builds each); tiny is for CPUs


def model_name(size: str) -> str:
    """``s`` -> ``stu_s`` (the name cells, run folders and reports use); ``stu_s`` stays as it is."""
    size = str(size).lower()
    return size if size.startswith("stu_") else f"stu_{size}"


def model_size(name: str) -> str:
    """``stu_s`` -> ``s``: the inverse of :func:`model_name` (a bare size stays as it is)."""
    return model_name(name).removeprefix("stu_")


def digest(value: Any, length: int = 12) -> str:
    """A short, stable hash of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def training_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The part of a training config that shapes the weights (what run hashes and round keys cover)."""
    settings = {}
    for name in TRAINING_SETTINGS:
        value = cfg.get(name)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_HASHED.get(name, ())}
        settings[name] = value
    return settings


def protocol_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A protocol's settings that change its final model (rounds, pools, thresholds, modality ...)."""
    protocol = cfg.get("protocol")
    protocol = OmegaConf.to_container(protocol, resolve=True) if OmegaConf.is_config(protocol) else protocol or {}
    return {k: v for k, v in protocol.items() if k not in PROTOCOL_NOT_HASHED}


def run_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The short hash in a run's folder name (``${run_hash:}`` in ``train.yaml``). The protocol's name and the
    training sets are left out (they name the folders above it), so the rows of one grid share their run hash;
    a protocol's own settings are in (``-m protocol.confidence_threshold=0.5,0.9`` gives two runs)."""
    settings = training_settings(cfg)
    extra = protocol_settings(cfg)
    return digest({**settings, "protocol": extra} if extra else settings, RUN_HASH_LENGTH)


@dataclass(frozen=True)
class RunKey:
    """protocol / training sets / model / run hash: the run a result cell came from."""

    protocol: str
    train: str
    model: str
    run: str

    @classmethod
    def of(cls, cfg: DictConfig) -> RunKey:
        """The key of the training run a composed ``train.yaml`` config describes."""
        return cls(str(cfg.protocol.name), "+".join(map(str, cfg.train_sets)), model_name(cfg.model.size),
                   run_hash(cfg))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunKey:
        return cls(*(str(values[name]) for name in ("protocol", "train", "model", "run")))

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def cell(self, test: str, metric: str) -> CellKey:
        return CellKey(self.protocol, self.train, self.model, self.run, test, metric)


@dataclass(frozen=True)
class CellKey:
    """A run's key plus the test set and metric mode (:func:`aeval.metrics.metric_key`)."""

    protocol: str
    train: str
    model: str
    run: str
    test: str
    metric: str

    @property
    def run_key(self) -> RunKey:
        return RunKey(self.protocol, self.train, self.model, self.run)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)
