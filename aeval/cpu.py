"""The CPU this process may use: how many cores, how many torch threads each worker process gets, and the
allocator setting that keeps CPU inference off the page-fault path.

One helper for every stage (train, predict, evaluate, score, the grid): worker processes x torch threads
must not exceed the cores (nor, on a shared machine, the cores other work leaves free), or OpenMP threads
fight over them (measured on the 2-core machine: one case took
252 s with PyTorch's default threads next to other work, 46 s with one thread). An explicit
``OMP_NUM_THREADS`` or a config value (``torch_threads``, ``inference.threads``) wins over the default.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

# glibc mallopt parameters and defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# after predicting: where glibc's dynamic mmap threshold settles in a process that frees large blocks
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; the trim threshold follows at twice it)
GLIBC_SETTLED_MMAP_THRESHOLD = 32 << 20
# While predicting on a CPU: blocks up to this size come from the heap and are reused, not mmap'ed afresh
# (and zero-filled page by page by the kernel) for every activation tensor (STU-Net-S at 128^3: 134 MB per
# sample and stage-0 tensor); full-volume buffers above it still get their own mapping, returned when freed.
INFERENCE_MMAP_THRESHOLD = 256 << 20
# ... and while blending a large volume in a band, where peak memory counts more: STU-Net-S's 128^3 forward then
# peaks 180 MiB lower for ~10 % more time (one forward, one thread: 1255 -> 1072 MiB, 6.3 -> 6.9 s)
BAND_MMAP_THRESHOLD = 128 << 20
INFERENCE_TRIM_THRESHOLD = 512 << 20


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores() -> int:
    """The cores not busy with other work: this process's cores less the 1-minute load average beyond the one
    core this process itself keeps busy (at least 1). On a shared machine a thread more than the free cores
    costs far more than it brings (OpenMP threads wait on each other): measured 6.7 s with one thread, 13.5 s
    with two, for the same prediction on 2 cores at load 6."""
    cores = available_cores()
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        others = 0.0
    return max(1, min(cores, int(cores - others + 0.5)))


def default_workers(requested: int | None, jobs: int | None = None) -> int:
    """Worker processes: ``requested`` when set (0 and 1: this process), else one per free core
    (:func:`free_cores`), at most one per job."""
    if requested is not None:
        return max(1, int(requested))
    workers = free_cores()
    return max(1, min(workers, jobs)) if jobs is not None else workers


def threads_per_worker(requested: int | None = None, workers: int = 1) -> int:
    """Torch intra-op threads for each of ``workers`` processes: ``requested`` when set (>= 1), else
    ``OMP_NUM_THREADS`` when the user exported it, else the free cores divided among the workers (>= 1)."""
    if requested is not None and int(requested) > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, free_cores() // max(1, int(workers)))


def set_torch_threads(requested: int | None = None, workers: int = 1) -> int:
    """Set this process's torch threads (:func:`threads_per_worker`) and return the number."""
    import torch

    threads = threads_per_worker(requested, workers)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug("torch threads: %d (%d worker process(es), %d core(s))", threads, workers, available_cores())
    return threads


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix/vector units (AMX or AVX-512-BF16) that oneDNN uses; without them
    PyTorch's bf16 convolutions fall back to a slow reference path (measured ~100x slower than fp32)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextlib.contextmanager
def inference_allocator(enabled: bool = True, mmap_threshold: int = INFERENCE_MMAP_THRESHOLD) -> Iterator[None]:
    """glibc serves blocks above its mmap threshold (at most 32 MiB by default) with fresh mmaps, so every
    activation tensor of a 3-D network costs page faults and kernel zero-filling: measured 1.5-1.65x of a
    STU-Net-S forward on one core. Inside this context they come from the heap and are reused; on exit the
    thresholds go to where glibc's own dynamic threshold settles (32 MiB, trim 64 MiB) and free heap memory
    is returned. Blocks of ``mmap_threshold`` bytes and more still get their own mappings. No-op without glibc
    or when not ``enabled``."""
    libc = _libc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, INFERENCE_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_SETTLED_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_SETTLED_MMAP_THRESHOLD)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def limit_worker_threads(workers: int) -> None:
    """Initializer of worker processes: at most cores / ``workers`` threads each (OpenMP of libraries
    imported later via ``OMP_NUM_THREADS``, torch's pool when torch is already imported); an
    ``OMP_NUM_THREADS`` the user exported stays."""
    threads = threads_per_worker(None, workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def release_free_heap() -> None:
    """Hand the heap's free pages back (glibc ``malloc_trim``): between windows, so that blocks kept for
    reuse inside one window's forward do not add up across windows into a higher peak."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
