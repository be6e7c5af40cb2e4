"""Failures as data: a bad input is one line naming the file and the problem, and a batch carries on.

:class:`CaseError` is an expected problem with one input (it pickles, so worker processes can return it);
:class:`FailureLog` collects a batch's failure lines and gives the exit code.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["CaseError", "FailureLog"]


class CaseError(Exception):
    """A problem with one input file; ``str(err)`` is the one line shown to the user."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from (path, problem) when a worker process returns or raises it
        return type(self), (self.path, self.problem)


class FailureLog:
    """Collects per-case failures of a batch command: each is printed as one line when it happens and
    the batch carries on; :meth:`exit_code` is non-zero when anything failed."""

    def __init__(self, printer: Callable[[str], None] | None = None):
        self.failures: list[str] = []
        self._print = printer or (lambda line: print(line, flush=True))

    def add(self, err: Exception | str, path: str | os.PathLike | None = None) -> None:
        if isinstance(err, CaseError) or path is None:
            line = str(err)
        elif isinstance(err, str):
            line = f"{path}: {err}"
        else:
            line = f"{path}: {type(err).__name__}: {err}"
        self.failures.append(line)
        self._print(f"[error] {line}")

    @contextmanager
    def case(self, path: str | os.PathLike) -> Iterator[None]:
        """Run one case; any error becomes a failure line instead of a traceback."""
        try:
            yield
        except (CaseError, ValueError, OSError, RuntimeError) as err:
            self.add(err if isinstance(err, CaseError) else CaseError(path, str(err)))

    def summary(self) -> str:
        if not self.failures:
            return "no failures"
        return f"{len(self.failures)} failed:\n" + "\n".join(f"  {line}" for line in self.failures)

    def exit_code(self, code: int = 2) -> int:
        return code if self.failures else 0
