"""Experiment tracking set-up: W&B runs offline unless the user configured it, and never prompts."""

from __future__ import annotations

import logging
import netrc
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)

DEFAULT_HOST = "https://api.wandb.ai"
REACH_TIMEOUT_S = 2.0


def wandb_configured() -> bool:
    """True when the user has W&B credentials (env key or a netrc entry written by `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether the W&B host (``WANDB_BASE_URL``, default api.wandb.ai) answers an HTTP request (any status)
    within ``timeout`` seconds. Run in a thread and abandoned after the timeout: name lookup on a node without
    network can hang far longer than a socket timeout."""
    url = os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST
    outcome: list[bool] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(True)
        except urllib.error.HTTPError:  # an answer, e.g. 401 or 404: the host is there
            outcome.append(True)
        except (OSError, ValueError):  # URLError, timeouts, refused, unreachable network, a malformed URL
            outcome.append(False)

    probe = threading.Thread(target=ask, daemon=True)
    probe.start()
    probe.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def ensure_wandb_mode() -> str:
    """Pick offline mode unless the user chose a mode, or has credentials and the W&B host answers within a
    couple of seconds (a compute node without network: offline, one warning, no 90 s retry loop in
    ``wandb.init``); silence every prompt."""
    if "WANDB_MODE" not in os.environ:
        mode = "offline"
        if wandb_configured():
            if wandb_reachable():
                mode = "online"
            else:
                log.warning("W&B is configured but %s is unreachable: logging offline (`wandb sync` uploads later)",
                            os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST)
        os.environ["WANDB_MODE"] = mode
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
