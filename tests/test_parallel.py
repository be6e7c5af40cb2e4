"""aeval.parallel.map_cases: per-case failures as data, a dead worker costs only its case, bugs propagate."""

from __future__ import annotations

import os
import pickle

import pytest

from aeval.errors import CaseError, CaseFailure
from aeval.parallel import WORKER_DIED, failures_of, map_cases


def square_or_fail(n: int) -> int:
    if n == 3:
        raise CaseError(f"/data/case{n}.nii.gz", "label on another grid")
    if n == 4:
        raise ValueError("bad value")
    if n == 5:
        os._exit(137)  # what an OOM kill looks like to the pool
    if n == 6:
        raise TypeError("a bug")
    return n * n


def test_case_failure_pickles_and_prints_one_line():
    failure = pickle.loads(pickle.dumps(CaseFailure("/x.nii.gz", "file not found")))
    assert str(failure) == "/x.nii.gz: file not found"
    assert str(failure.as_error()) == "/x.nii.gz: file not found"


@pytest.mark.parametrize("workers", [1, 2])
def test_expected_problems_become_failures_in_order(workers):
    results = map_cases(square_or_fail, [1, 2, 3, 4, 7], num_workers=workers, path_of=lambda n: f"case{n}",
                        context="fork", show_progress=False)
    assert results[:2] == [1, 4] and results[4] == 49
    assert results[2] == CaseFailure("/data/case3.nii.gz", "label on another grid")
    assert results[3] == CaseFailure("case4", "ValueError: bad value")
    assert len(failures_of(results)) == 2


def test_a_killed_worker_fails_only_its_case_and_the_rest_go_on(caplog):
    items = [1, 2, 5, 7, 8, 9]
    results = map_cases(square_or_fail, items, num_workers=2, path_of=lambda n: f"case{n}", context="fork",
                        show_progress=False)
    assert results == [1, 4, CaseFailure("case5", WORKER_DIED), 49, 64, 81]
    assert "worker process died" in caplog.text


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bug_propagates(workers):
    with pytest.raises(TypeError, match="a bug"):
        map_cases(square_or_fail, [1, 6, 2], num_workers=workers, context="fork", show_progress=False)
