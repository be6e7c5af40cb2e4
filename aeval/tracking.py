"""Experiment tracking set-up: W&B runs offline unless the user configured it, and never prompts."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger


def wandb_configured() -> bool:
    """True when the user has W&B credentials (env key or a netrc entry written by `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def ensure_wandb_mode() -> str:
    """Pick offline mode unless the user chose a mode or has credentials; silence every prompt."""
    if "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "online" if wandb_configured() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
    return os.environ["WANDB_MODE"]


def build_loggers(logger_cfg: Mapping[str, Any] | None) -> list[Logger]:
    """Instantiate the loggers of a `logger=` config group entry (a mapping name -> _target_ config)."""
    loggers = []
    for name, cfg in (logger_cfg or {}).items():
        if not cfg or "_target_" not in cfg:
            continue
        if "wandb" in name or "Wandb" in str(cfg["_target_"]):
            ensure_wandb_mode()
            os.makedirs(cfg.get("save_dir", "."), exist_ok=True)
        loggers.append(instantiate(cfg))
    return loggers


def finish_loggers(loggers: list[Logger], status: str) -> None:
    """Flush every logger and close this process's W&B run, so a later run in the same process (the grid,
    tests) starts its own instead of appending to this one."""
    for logger in loggers:
        logger.finalize(status)
    if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=0 if status == "success" else 1)
