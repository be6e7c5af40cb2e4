"""What a job of a Hydra run or multirun leaves in its output folder, so whoever launched it (in this process or
on another machine) learns how it ended: ``outcome.json`` with the exit code and the job's overrides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aeval.nifti import write_text_atomic

__all__ = ["OUTCOME_JSON", "job_outcomes", "write_outcome"]

OUTCOME_JSON = "outcome.json"


def write_outcome(output_dir: str | Path, exit_code: int, overrides: Sequence[str], errors: Sequence[str] = ()
                  ) -> Path:
    """The job's exit code, its overrides and the error lines it logged."""
    return write_text_atomic(Path(output_dir) / OUTCOME_JSON, json.dumps(
        {"exit_code": exit_code, "overrides": list(overrides), "errors": list(errors)}, indent=2) + "\n")


def job_outcomes(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job folder of a multirun (those holding ``.hydra/``) with its outcome; ``exit_code`` is None for a
    job that left none (killed, or never started)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    outcomes = []
    for folder in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name):
        try:
            record = json.loads((folder / OUTCOME_JSON).read_text())
        except (OSError, ValueError):
            record = {"exit_code": None, "overrides": []}
        outcomes.append({**record, "dir": str(folder)})
    return outcomes
