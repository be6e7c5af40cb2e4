"""Thread and worker defaults (aeval.cpu): worker processes x torch threads never exceed the cores this process
may use (its affinity mask, the reference), an exported OMP_NUM_THREADS or an explicit setting wins, and every
stage (train, predict, evaluate, score) goes through the one helper."""

from __future__ import annotations

import os

import pytest
import torch

from aeval import cpu


@pytest.fixture
def cores(monkeypatch):
    """``cores(n)``: n cores in the affinity mask, an idle machine (load 1: this process) unless ``load``."""
    def set_cores(n: int, load: float = 1.0) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return set_cores


@pytest.mark.parametrize(("n_cores", "load", "free"), [(2, 1.0, 2), (2, 6.0, 1), (8, 3.2, 6), (8, 0.0, 8),
                                                       (16, 40.0, 1), (4, 2.6, 2)])
def test_free_cores_leave_out_the_load_of_others(cores, n_cores, load, free):
    cores(n_cores, load)
    assert cpu.free_cores() == free
    assert cpu.threads_per_worker() == free and cpu.default_workers(None) == free


@pytest.mark.parametrize("n_cores", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("workers", [None, 1, 2, 3, 5])
def test_workers_times_threads_within_cores(cores, n_cores, workers):
    cores(n_cores)
    assert cpu.available_cores() == n_cores
    n_workers = cpu.default_workers(workers, jobs=4)
    threads = cpu.threads_per_worker(None, n_workers)
    assert threads >= 1
    assert n_workers * threads <= max(n_cores, n_workers)  # more workers than cores: one thread each
    if workers is None:
        assert n_workers == min(n_cores, 4) and n_workers * threads <= n_cores


def test_affinity_mask_not_cpu_count(cores, monkeypatch):
    cores(3)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu.threads_per_worker() == 3 and cpu.default_workers(None) == 3


def test_explicit_settings_and_omp_num_threads_win(cores, monkeypatch):
    cores(8)
    assert cpu.threads_per_worker(3, workers=4) == 3  # a config value (torch_threads, inference.threads)
    assert cpu.default_workers(2, jobs=10) == 2 and cpu.default_workers(0) == 1  # 0: in this process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.threads_per_worker(None, workers=1) == 1
    assert cpu.threads_per_worker(4) == 4  # the config beats the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert cpu.threads_per_worker(None, workers=2) == 4


def test_set_torch_threads_and_worker_initializer(cores, monkeypatch):
    cores(2)
    previous = torch.get_num_threads()
    try:
        assert cpu.set_torch_threads(None, workers=2) == 1 and torch.get_num_threads() == 1
        assert cpu.set_torch_threads(None) == 2 and torch.get_num_threads() == 2
        cpu.limit_worker_threads(2)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(previous)


def test_stages_use_the_helper(cores, monkeypatch, tmp_path):
    """predict_files sets the process's threads from inference.threads; score_folder picks its workers and
    each worker's threads; train's torch_threads goes through the same function."""
    import inspect

    from aeval import fit, prediction, scoring

    assert "set_torch_threads(cfg.get(\"torch_threads\"))" in inspect.getsource(fit.train)
    assert "set_torch_threads" in inspect.getsource(prediction.predict_files)
    calls = {}
    from aeval.errors import CaseFailure

    def fake_map(fn, args, **kw):
        calls.update(kw)
        return [CaseFailure(str(job[1]), "not scored here") for job in args]
    monkeypatch.setattr(scoring, "map_cases", fake_map)
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    import nibabel as nib
    import numpy as np
    for name in ("a", "b", "c"):
        for folder in ("gt", "pred"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / folder / f"{name}.nii.gz")
    cores(2)
    scoring.score_folder(tmp_path / "pred", tmp_path / "gt", "aeval8", "aeval8", progress=False, quiet=True)
    assert calls["num_workers"] == 2 and calls["initializer"] is cpu.limit_worker_threads
    assert calls["initargs"] == (2,)
    scoring.score_folder(tmp_path / "pred", tmp_path / "gt", "aeval8", "aeval8", num_workers=1, progress=False,
                         quiet=True)
    assert calls["num_workers"] == 1


def test_allocator_context_is_safe_without_glibc(monkeypatch):
    monkeypatch.setattr(cpu, "_libc", lambda: None)
    with cpu.inference_allocator():
        pass
    with cpu.inference_allocator(enabled=False):
        pass
