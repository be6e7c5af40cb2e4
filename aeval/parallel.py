"""Map a per-case function over a batch, in worker processes or in this one, without losing the batch.

Every stage that handles cases one by one (convert, fingerprint, preprocess, score) needs the same three
things: an expected problem with one input becomes a :class:`CaseFailure` (data, so it crosses process
boundaries), a worker that dies (an OOM kill, a segfault in a library) costs only the case it was on, and
anything else (a bug) propagates. :func:`map_cases` does all three and shows a progress bar.

When a worker dies, every case that was in flight is a suspect: the pool is replaced, the other cases go on,
and each suspect is re-run alone in a one-worker pool, so only the case that kills its worker again fails.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aeval.errors import EXPECTED_CASE_ERRORS, CaseError, CaseFailure

__all__ = ["WORKER_DIED", "failures_of", "map_cases"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

WORKER_DIED = "the worker process died while on this case (killed, e.g. out of memory, or crashed)"


def failures_of(results: Iterable[object]) -> list[CaseFailure]:
    """The failure records among :func:`map_cases`' results."""
    return [r for r in results if isinstance(r, CaseFailure)]


def _call(fn: Callable[[T], R], item: T, path: str, expected: tuple[type[BaseException], ...]) -> R | CaseFailure:
    """Run one case; an expected problem comes back as a CaseFailure instead of an exception."""
    try:
        return fn(item)
    except (CaseError, *expected) as err:
        return CaseFailure.of(err, path)


class _Bar:
    """Advances a task of the caller's rich Progress, or of a transient one of its own."""

    def __init__(self, progress: Progress | None, description: str, total: int, show: bool) -> None:
        self._own = progress is None and show and total > 0
        if self._own:
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            progress.start()
        self._progress = progress
        self._task = progress.add_task(description, total=total) if progress is not None else None

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self) -> None:
        if self._own:
            self._progress.stop()


def map_cases(fn: Callable[[T], R], items: Sequence[T], *, num_workers: int = 1,
              path_of: Callable[[T], str | os.PathLike] = str, description: str = "cases",
              progress: Progress | None = None, show_progress: bool = True,
              expected: tuple[type[BaseException], ...] = EXPECTED_CASE_ERRORS, context: str | None = None,
              initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> list[R | CaseFailure]:
    """``fn(item)`` for every item, in order: the result, or a :class:`CaseFailure` for an expected problem
    (``expected``; a :class:`CaseError` keeps its own path, others are named by ``path_of(item)``) or a
    worker that died on the item. Any other exception propagates (the pool's remaining work is cancelled).

    ``num_workers <= 1`` runs in this process. ``fn`` and the items must pickle for workers; ``context`` is
    the multiprocessing start method (default: the platform's), ``initializer`` runs in each worker.
    ``progress`` is a rich Progress to add the task to (else a transient bar of its own)."""
    items = list(items)
    paths = [str(path_of(item)) for item in items]
    bar = _Bar(progress, description, len(items), show_progress)
    try:
        if num_workers <= 1 or len(items) <= 1:
            results = []
            for item, path in zip(items, paths, strict=True):
                results.append(_call(fn, item, path, expected))
                bar.advance()
            return results
        pool_args = {"mp_context": multiprocessing.get_context(context) if context else None,
                     "initializer": initializer, "initargs": initargs}
        return _run_pool(fn, items, paths, min(num_workers, len(items)), expected, pool_args, bar)
    finally:
        bar.close()


def _run_pool(fn, items: list, paths: list[str], workers: int, expected, pool_args: dict[str, Any],
              bar: _Bar) -> list:
    results: list[Any] = [None] * len(items)
    queue = list(range(len(items)))
    suspects: list[int] = []
    while queue:  # at most `workers` cases in flight, so a dead worker implicates few
        broken = False
        with ProcessPoolExecutor(workers, **pool_args) as pool:
            running: dict[Future, int] = {}
            try:
                while queue or running:
                    while queue and len(running) < workers and not broken:
                        index = queue.pop(0)
                        running[pool.submit(_call, fn, items[index], paths[index], expected)] = index
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        index = running.pop(future)
                        try:
                            results[index] = future.result()
                            bar.advance()
                        except BrokenProcessPool:
                            broken = True
                            suspects.append(index)
                    if broken:  # the pool fails every unfinished future; the finished ones keep their result
                        for future, index in running.items():
                            try:
                                results[index] = future.result()
                                bar.advance()
                            except BrokenProcessPool:
                                suspects.append(index)
                        break
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        if broken:
            log.warning("a worker process died; %d case(s) that were in flight are retried one at a time, "
                        "the other %d go on in a fresh pool", len(suspects), len(queue))
    for index in suspects:  # alone in a fresh process each time the previous one died
        results[index] = _run_alone(fn, items[index], paths[index], expected, pool_args)
        bar.advance()
    return results


def _run_alone(fn, item, path: str, expected, pool_args: dict[str, Any]):
    with ProcessPoolExecutor(1, **pool_args) as pool:
        try:
            return pool.submit(_call, fn, item, path, expected).result()
        except BrokenProcessPool:
            return CaseFailure(path, WORKER_DIED)
