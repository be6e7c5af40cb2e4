"""Failures as data: a bad input is one line naming the file and the problem, and a batch carries on.

:class:`CaseError` is an expected problem with one input (it pickles, so worker processes can return it);
:class:`CaseFailure` is the record a batch keeps of one (path and problem as plain strings);
:class:`FailureLog` collects a batch's records, logs each as one line and gives the exit code. Only the
exceptions in :data:`EXPECTED_CASE_ERRORS` become per-case failures; anything else (a bug, an out-of-memory
error) propagates.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["EXPECTED_CASE_ERRORS", "EXPECTED_COMPUTE_ERRORS", "CaseError", "CaseFailure", "FailureLog"]

log = logging.getLogger("aeval")


class CaseError(Exception):
    """A problem with one input file; ``str(err)`` is the one line shown to the user."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from (path, problem) when a worker process returns or raises it
        return type(self), (self.path, self.problem)


# What a bad input file raises besides CaseError (nibabel/gzip/zlib/numpy on truncated or foreign files).
EXPECTED_CASE_ERRORS: tuple[type[BaseException], ...] = (CaseError, OSError, ValueError, EOFError)
# A per-case computation on odd input (torch's resampling of an odd shape, scipy on a degenerate mask) raises
# RuntimeError too; the stages that run such computations per case (the cache, scoring) catch these.
EXPECTED_COMPUTE_ERRORS: tuple[type[BaseException], ...] = (*EXPECTED_CASE_ERRORS, RuntimeError)


@dataclass(frozen=True)
class CaseFailure:
    """One case that failed: the file and the problem, as plain strings (picklable, printable)."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    @classmethod
    def of(cls, err: BaseException, path: str | os.PathLike) -> CaseFailure:
        """The record of ``err`` raised while on ``path`` (a CaseError keeps its own path)."""
        if isinstance(err, CaseError):
            return cls(err.path, err.problem)
        return cls(str(path), f"{type(err).__name__}: {err}")

    def as_error(self) -> CaseError:
        return CaseError(self.path, self.problem)


class FailureLog:
    """The per-case failures of a batch command: each is logged as one line when it happens and the batch
    carries on; :meth:`exit_code` is non-zero when anything failed. ``quiet`` records without logging (a
    caller that reports the lines itself)."""

    def __init__(self, quiet: bool = False):
        self.records: list[CaseFailure] = []
        self.quiet = quiet

    @property
    def failures(self) -> list[str]:
        """The failure lines, ``"<path>: <problem>"``."""
        return [str(record) for record in self.records]

    def add(self, failure: CaseFailure | BaseException | str, path: str | os.PathLike | None = None) -> None:
        """Record one failure: a record, an exception raised on ``path``, or a problem line (about ``path``,
        or about the batch as a whole when ``path`` is None)."""
        if isinstance(failure, CaseFailure):
            record = failure
        elif isinstance(failure, str):
            record = CaseFailure(str(path) if path is not None else "", failure)
        else:
            record = CaseFailure.of(failure, path if path is not None else "")
        self.records.append(record)
        if not self.quiet:
            log.error("%s", record)

    def extend(self, failures: list[CaseFailure]) -> None:
        for failure in failures:
            self.add(failure)

    def merge(self, other: FailureLog) -> None:
        """Take over the records of another log (already logged there, so not again)."""
        self.records.extend(other.records)

    @contextmanager
    def case(self, path: str | os.PathLike) -> Iterator[None]:
        """Run one case; an expected input problem becomes a failure record instead of a traceback."""
        try:
            yield
        except EXPECTED_CASE_ERRORS as err:
            self.add(CaseFailure.of(err, path))

    def summary(self) -> str:
        if not self.records:
            return "no failures"
        return f"{len(self.records)} failed:\n" + "\n".join(f"  {line}" for line in self.failures)

    def exit_code(self, code: int = 2) -> int:
        return code if self.records else 0
