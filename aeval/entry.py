"""What every command-line verb shares: compose the config with Hydra, run one job function, exit with its code.

A job function takes the composed config and returns an exit code (0 = success). It never exits the process:
in a multirun every job runs, whatever the launcher, and the process exits once Hydra has returned, with the
highest code of all jobs. An expected problem (a bad file or config value) is one line and code 2; anything
else one line and code 1 (``HYDRA_FULL_ERROR=1`` adds the traceback). Each job leaves ``outcome.json`` in its
output folder, so the multirun-end callback (:class:`JobOutcomes`) also learns the codes of jobs that ran in
other processes (``hydra/launcher=submitit_local``, ``slurm``, ``joblib``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from aeval.errors import CaseError
from aeval.jobs import job_outcomes, write_outcome

__all__ = ["JobOutcomes", "hydra_entry", "run_job"]

log = logging.getLogger("aeval")
EXPECTED_ERRORS = (CaseError, ValueError, FileNotFoundError, KeyError)
_multirun_codes: list[int] = []  # filled by JobOutcomes in the process that launched the jobs


class ErrorLines(logging.Handler):
    """Collects the error lines logged while a job runs, for its ``outcome.json``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0] if record.getMessage() else "")


def run_job(job: Callable[[DictConfig], int | None], cfg: DictConfig) -> int:
    """``job(cfg)``'s exit code; an exception becomes one logged line and a non-zero code."""
    try:
        return int(job(cfg) or 0)
    except EXPECTED_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("%s", message, exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
        return 2
    except Exception as err:  # a bug or a crash in a library: one line here, the traceback on request
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            log.exception("%s: %s", type(err).__name__, err)
        else:
            log.error("%s: %s (set HYDRA_FULL_ERROR=1 for the traceback)", type(err).__name__, err)
        return 1


def _record_outcome(code: int, errors: list[str]) -> None:
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        write_outcome(hydra_cfg.runtime.output_dir, code, hydra_cfg.overrides.task, errors)


def hydra_entry(verb: str, job: Callable[[DictConfig], int | None]) -> Callable[[], None]:
    """The ``main`` of ``python -m aeval.<verb>`` and the ``aeval-<verb>`` console script (config
    ``aeval/conf/<verb>.yaml``, found through the package, so a wheel install works from any folder)."""
    codes: list[int] = []

    @hydra.main(version_base=None, config_path="conf", config_name=verb)
    def task(cfg: DictConfig) -> int:
        errors = ErrorLines()
        logging.getLogger().addHandler(errors)
        try:
            code = run_job(job, cfg)
        finally:
            logging.getLogger().removeHandler(errors)
        codes.append(code)
        _record_outcome(code, errors.lines)
        return code

    def main() -> None:
        os.environ["HYDRA_MAIN_MODULE"] = f"aeval.{verb}"  # the job's name and config package: the verb's
        codes.clear()
        _multirun_codes.clear()
        task()
        code = max([*codes, *_multirun_codes], default=0)
        if code:
            raise SystemExit(code)

    main.__doc__ = f"Run ``aeval.{verb}`` from the command line (Hydra overrides as arguments)."
    return main


class JobOutcomes(Callback):
    """At the end of a multirun: one line per failed job and the exit code of the whole multirun."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = job_outcomes(sweep_dir)
        failed = [o for o in outcomes if o["exit_code"] != 0]
        for outcome in failed:
            status = "left no outcome (killed?)" if outcome["exit_code"] is None else f"exit {outcome['exit_code']}"
            errors = outcome.get("errors") or []
            if errors:
                status += f": {errors[0]}" + (f" (+{len(errors) - 1} more in its log)" if len(errors) > 1 else "")
            log.error("job %s %s: %s", Path(outcome["dir"]).name, " ".join(outcome["overrides"]), status)
        log.info("multirun: %d job(s), %d failed; outputs in %s", len(outcomes), len(failed), sweep_dir)
        _multirun_codes.append(max([o["exit_code"] or 1 for o in failed], default=0))
