"""The training stage: plan -> preprocess -> fit STU-Net with Lightning, resumable.

The run folder is keyed by protocol / training sets / model / run hash (:mod:`aeval.keys`), so re-running the
same command resumes from ``checkpoints/last.ckpt`` (epoch, step, optimizer and lr schedule restored), a
finished run returns at once, and a sweep over a training setting gets one run per value.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from aeval.cpu import cpu_has_native_bf16, set_torch_threads
from aeval.data.cache import preprocess_dataset
from aeval.data.datamodule import AEvalDataModule
from aeval.data.planner import plan_datasets
from aeval.keys import RunKey
from aeval.nifti import remove_stale_temporaries, write_text_atomic
from aeval.plan import Plan
from aeval.tracking import build_loggers, finish_loggers
from aeval.validate import check_train_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training leaves: its run folder, best and last checkpoints, final metrics."""

    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    metrics: dict[str, float]
    epochs: int = 0
    global_step: int = 0

    @classmethod
    def load(cls, run_dir: Path) -> TrainResult:
        """The result a finished run wrote to ``result.json``."""
        stored = json.loads((Path(run_dir) / "result.json").read_text())
        best = stored.get("best_checkpoint")
        return cls(Path(run_dir), Path(best) if best else None, Path(stored["last_checkpoint"]),
                   stored.get("metrics", {}), stored.get("epochs", 0), stored.get("global_step", 0))


def prepare_training_data(train_sets: list[str], paths: DictConfig, plan_overrides: dict[str, Any],
                          workers: int) -> tuple[Plan, list[Path]]:
    """Plan over the union of the training sets and fill the preprocessing cache (both idempotent)."""
    with folder_lock(Path(paths.preprocessed_root)):
        plan_dir = plan_datasets(train_sets, Path(paths.data_root), Path(paths.preprocessed_root),
                                 **{k: v for k, v in plan_overrides.items() if v is not None})
        plan = Plan.read(plan_dir / "plans.json")
        caches = [preprocess_dataset(Path(paths.data_root) / name, plan_dir / "plans.json", plan_dir / name,
                                     num_workers=workers) for name in train_sets]
    return plan, caches


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One process at a time in ``folder``: parallel jobs of a multirun (rows, sizes, seeds) share the
    converted datasets and the preprocessing cache."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` when given, else the newest readable checkpoint a previous attempt left in the run folder
    (``last.ckpt`` first). An unreadable one (truncated when a job was killed while it was written or copied)
    is set aside as ``<name>.corrupt-<time>`` with a warning, so a re-run repairs itself; with none left the
    run starts over."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ckpt_path not found")
        return str(path)
    folder = Path(cfg.run_dir) / "checkpoints"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime_ns))
    for candidate in found:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        aside = candidate.with_name(f"{candidate.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        candidate.rename(aside)
        log.warning("%s: unreadable checkpoint (%s); set aside as %s", candidate, problem, aside.name)
    if found:
        log.warning("%s: no readable checkpoint left; training starts over", folder)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable torch checkpoint, or None. Cheap: checks the zip directory and the
    pickle entry (CRC), not every tensor, so a 10 GB checkpoint costs no full read."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not pickles:
                return "no data.pkl in the archive"
            archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def checkpoint_callbacks(directory: Path, validate: bool) -> tuple[ModelCheckpoint | None, ModelCheckpoint]:
    """``best.ckpt`` by validation mean Dice (when there is validation) and ``last.ckpt`` at the end of every
    epoch (after its validation, if any), whether or not the epoch validates. Two callbacks, because one with
    a monitor refreshes ``last.ckpt`` only when the monitored value improves (Lightning >= 2.6), and
    resuming must start from the latest epoch."""
    best = ModelCheckpoint(dirpath=directory, filename="best", monitor="val/dice_mean", mode="max", save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False) if validate else None
    last = ModelCheckpoint(dirpath=directory, filename="last", monitor=None, save_top_k=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    return best, last


def finished_result(cfg: DictConfig) -> TrainResult | None:
    """The stored result when this run folder already holds a run trained to ``trainer.max_epochs``."""
    path = Path(cfg.run_dir) / "result.json"
    if cfg.get("ckpt_path") or not path.exists():
        return None
    try:
        result = TrainResult.load(path.parent)
    except (ValueError, KeyError):
        return None
    return result if result.epochs >= cfg.trainer.max_epochs and result.last_checkpoint.exists() else None


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Everything ``python -m aeval.train`` does, callable from Python (the grid and protocols use it).

    Re-running into the same ``run_dir`` resumes from its ``last.ckpt`` (epoch, step, optimizer state and
    learning rate restored); a run already trained to ``trainer.max_epochs`` returns its stored result.
    ``callbacks`` are added to the trainer's (the checkpointing and learning-rate monitor)."""
    check_train_config(cfg)  # a typo or a bad number: one line now, not after planning and preprocessing
    finished = finished_result(cfg)
    if finished is not None:
        log.info("%s: already trained (%d epochs) in %s", cfg.run_name, finished.epochs, finished.run_dir)
        return finished
    L.seed_everything(cfg.seed, workers=True)
    set_torch_threads(cfg.get("torch_threads"))  # null: OMP_NUM_THREADS, else this process's cores
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # config.yaml / result.json temporaries of a killed attempt
    train_sets = list(cfg.train_sets)
    plan, caches = prepare_training_data(train_sets, cfg.paths, OmegaConf.to_container(cfg.plan, resolve=True),
                                         cfg.preprocess_workers)
    datamodule = AEvalDataModule(caches, plan, seed=cfg.seed, **OmegaConf.to_container(cfg.data, resolve=True))
    datamodule.setup("fit")
    module = build_module(cfg, plan)
    best, last = checkpoint_callbacks(run_dir / "checkpoints", validate=bool(datamodule.val_cases))
    loggers = build_loggers(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None)
    trainer = build_trainer(cfg, [*filter(None, [best, last]), ResultWriter(run_dir), *(callbacks or [])], loggers)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg))
    except BaseException:
        finish_loggers(loggers, "failed")
        raise
    finish_loggers(loggers, "success")
    return TrainResult.load(run_dir)


def build_module(cfg: DictConfig, plan: Plan) -> L.LightningModule:
    """The LightningModule ``module._target_`` names, with the run's network, plan, optimizer and loss configs
    (kept as plain data in the checkpoint; the module instantiates the optimizer and loss from them)."""
    settings = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("model", "optim", "loss")}
    return get_class(cfg.module._target_)(
        **settings, plan=plan.to_dict(), max_epochs=int(cfg.trainer.max_epochs), run_key=run_key_of(cfg),
        channels_last=cfg.get("channels_last", "auto"), poly_exponent=float(cfg.scheduler.poly_exponent))


def run_key_of(cfg: DictConfig) -> dict[str, str]:
    """The key the checkpoint records for its cells: a protocol round's is its protocol's (``run_key``)."""
    if cfg.get("run_key"):
        return {k: str(v) for k, v in OmegaConf.to_container(cfg.run_key, resolve=True).items()}
    return RunKey.of(cfg).as_dict()


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list) -> L.Trainer:
    """``trainer`` instantiated with the built-in callbacks, the ``callbacks`` group's and the loggers; bf16 falls
    back to fp32 where the hardware has no bf16 (emulated bf16 is many times slower)."""
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if not loggers:  # monitors need a logger to write to
        extra = [c for c in extra if not isinstance(c, LearningRateMonitor)]
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision.startswith("bf16") and not bf16_supported(OmegaConf.to_container(cfg.trainer, resolve=True)):
        precision = "32-true"
    return instantiate(cfg.trainer, precision=precision, callbacks=[*callbacks, *extra], logger=loggers or False,
                       default_root_dir=cfg.run_dir)


class ResultWriter(L.Callback):
    """Writes ``result.json`` from the process that trained (rank 0): with ``ddp_spawn`` the launching
    process never sees the workers' epoch and step counters."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = self.run_dir / "checkpoints" / "best.ckpt"
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        write_text_atomic(self.run_dir / "result.json", json.dumps(
            {"best_checkpoint": str(best) if best.exists() else None,
             "last_checkpoint": str(self.run_dir / "checkpoints" / "last.ckpt"),
             "epochs": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics}, indent=2))


def bf16_supported(trainer_cfg: dict[str, Any]) -> bool:
    """bf16 autocast where the hardware has it: CUDA with bf16, or a CPU with AMX / AVX-512 BF16."""
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()
