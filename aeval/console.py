"""The one rich console every command prints its tables and progress bars through, and the log handler
Hydra's ``job_logging`` config (``conf/hydra/job_logging/aeval.yaml``) installs."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

console = Console(width=None if sys.stdout.isatty() else 160)


class PlainLines(logging.Formatter):
    """``[error] message``: one line per record, whatever its length, for piped and captured output."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"[{record.levelname.lower()}] {text}"


def log_handler() -> logging.Handler:
    """Rich log lines on a terminal; plain lines (never wrapped) when stdout is a file or a pipe."""
    if sys.stdout.isatty():
        return RichHandler(console=console, show_time=False, show_path=False, rich_tracebacks=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(PlainLines("%(message)s"))
    return handler
