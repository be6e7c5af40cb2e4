"""``python -m aeval.train``: plan -> preprocess -> fit STU-Net with Lightning, resumable.

The run folder is keyed by protocol / training sets / model, so re-running the same command resumes
from ``checkpoints/last.ckpt`` (epoch, step, optimizer and lr schedule restored) and a finished run
returns at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.data.datamodule import AEvalDataModule
from aeval.data.plan import plan_datasets
from aeval.data.preprocess import preprocess_dataset
from aeval.module import NonFiniteLossError, STUNetModule
from aeval.nifti import write_text_atomic
from aeval.tracking import build_loggers


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    metrics: dict[str, float]


def prepare_training_data(train_sets: list[str], paths: DictConfig, plan_overrides: dict[str, Any],
                          workers: int) -> tuple[dict[str, Any], list[Path]]:
    """Plan over the union of the training sets and fill the preprocessing cache (both idempotent)."""
    plan_dir = plan_datasets(train_sets, Path(paths.data_root), Path(paths.preprocessed_root),
                             **{k: v for k, v in plan_overrides.items() if v is not None})
    plan = json.loads((plan_dir / "plans.json").read_text())
    caches = [preprocess_dataset(Path(paths.data_root) / name, plan_dir / "plans.json", plan_dir / name,
                                 num_workers=workers) for name in train_sets]
    return plan, caches


def run_key(cfg: DictConfig) -> dict[str, str]:
    """What identifies this run's result cells: protocol, training set(s), model."""
    return {"protocol": cfg.protocol.name, "train": "+".join(cfg.train_sets), "model": f"stu_{cfg.model.size}"}


def resume_checkpoint(cfg: DictConfig) -> str | None:
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def train(cfg: DictConfig) -> TrainResult:
    """Everything ``python -m aeval.train`` does, callable from Python (the grid and protocols use it)."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_sets = list(cfg.train_sets)
    plan, caches = prepare_training_data(train_sets, cfg.paths, OmegaConf.to_container(cfg.plan, resolve=True),
                                         cfg.preprocess_workers)
    datamodule = AEvalDataModule(caches, plan, seed=cfg.seed, **OmegaConf.to_container(cfg.data, resolve=True))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    module = STUNetModule(model=OmegaConf.to_container(cfg.model, resolve=True), plan=plan,
                          optim=OmegaConf.to_container(cfg.optim, resolve=True),
                          max_epochs=trainer_cfg["max_epochs"], run_key=run_key(cfg))
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/dice_mean",
                                  mode="max", save_last=True, save_top_k=1, auto_insert_metric_name=False)
    loggers = build_loggers(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None)
    callbacks = [checkpoints] + ([LearningRateMonitor("epoch")] if loggers else [])
    trainer_cfg.pop("_target_", None)
    if trainer_cfg.get("precision", "").startswith("bf16") and not bf16_supported(trainer_cfg):
        trainer_cfg["precision"] = "32-true"
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=loggers or False, default_root_dir=run_dir)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg))
    for logger in loggers:
        logger.finalize("success")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    best = Path(checkpoints.best_model_path) if checkpoints.best_model_path else None
    result = TrainResult(run_dir, best, run_dir / "checkpoints" / "last.ckpt", metrics)
    write_text_atomic(run_dir / "result.json", json.dumps(
        {"best_checkpoint": str(best) if best else None, "last_checkpoint": str(result.last_checkpoint),
         "epochs": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics}, indent=2))
    return result


def bf16_supported(trainer_cfg: dict[str, Any]) -> bool:
    """bf16 autocast where the hardware has it: CUDA with bf16, or a CPU with AMX / AVX-512 BF16."""
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@hydra.main(version_base=None, config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        console.print(f"[red]training stopped: {err}; last good checkpoint: "
                      f"{last if last.exists() else 'none yet'}[/red]", highlight=False)
        sys.exit(1)
    console.print(f"trained {cfg.run_name}: best {result.best_checkpoint}, last {result.last_checkpoint}",
                  highlight=False)


if __name__ == "__main__":
    main()
