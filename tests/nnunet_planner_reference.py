"""nnU-Net v2's own planner (``DatasetFingerprintExtractor`` + the default ``ExperimentPlanner``, what
``nnUNetv2_plan_and_preprocess`` runs before preprocessing) on exported raw datasets, and the mapping of its
axis order to aeval's RAS order.

nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` from the environment when ``nnunetv2.paths`` is first
imported, so :func:`nnunet_plan` needs them set before anything imports nnunetv2; :func:`nnunet_plan_subprocess`
runs it in a fresh interpreter with them set (``python tests/nnunet_planner_reference.py``). Used by
tests/test_nnunet_planner.py and experiments/benchmarks/nnunet_planner.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def nnunet_plan(dataset_name: str, num_samples: float | None = None, num_processes: int = 1) -> dict:
    """nnU-Net's fingerprint and plans of ``nnUNet_raw/dataset_name`` (its stdout swallowed), with the wall and
    CPU seconds of each step (CPU: this process and its finished workers). ``num_samples`` replaces nnU-Net's
    1e8 foreground voxels in all (None: nnU-Net's default)."""
    from nnunetv2 import paths

    if not paths.nnUNet_raw or not Path(paths.nnUNet_raw, dataset_name).is_dir():
        raise RuntimeError(f"nnUNet_raw={paths.nnUNet_raw}: no {dataset_name} (set nnUNet_raw and "
                           "nnUNet_preprocessed before nnunetv2 is imported)")
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    times = [(time.perf_counter(), cpu_seconds())]
    with contextlib.redirect_stdout(io.StringIO()):
        extractor = DatasetFingerprintExtractor(dataset_name, num_processes)
        extractor.show_progress_bar = False
        if num_samples is not None:
            extractor.num_foreground_voxels_for_intensitystats = num_samples
        fingerprint = extractor.run(overwrite_existing=True)
        times.append((time.perf_counter(), cpu_seconds()))
        plans, _ = plan_experiment_dataset(dataset_name)
        times.append((time.perf_counter(), cpu_seconds()))
    (w0, c0), (w1, c1), (w2, c2) = times
    return {"fingerprint": json.loads(json.dumps(fingerprint, default=_jsonable)),
            "plans": json.loads(json.dumps(plans, default=_jsonable)),
            "fingerprint_wall_s": w1 - w0, "fingerprint_cpu_s": c1 - c0, "plan_wall_s": w2 - w1, "plan_cpu_s": c2 - c1}


def cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (nnU-Net plans in a worker process)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def nnunet_plan_subprocess(raw_root: Path, preprocessed_root: Path, dataset_names: Sequence[str],
                           num_samples: float | None = None, timeout: float = 600) -> dict[str, dict]:
    """:func:`nnunet_plan` of each dataset in one fresh interpreter with nnU-Net's folders set."""
    out = Path(preprocessed_root) / "nnunet_planner_result.json"
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(preprocessed_root),
           "nnUNet_results": str(Path(preprocessed_root) / "results"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--out", str(out), *dataset_names]
    if num_samples is not None:
        command += ["--samples", str(num_samples)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"nnU-Net planner failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def to_ras(values: Sequence[float], transpose_forward: Sequence[int], affine: np.ndarray) -> list[float]:
    """Per-axis values of nnU-Net's network order (its ``transpose_forward`` of SimpleITK's (z, y, x) of the
    stored orientation) in aeval's RAS order, for images stored with ``affine``."""
    from aeval.data.geometry import ras_order, ras_transform

    sitk_order = [0.0] * 3
    for axis, value in zip(transpose_forward, values, strict=True):
        sitk_order[int(axis)] = value
    return ras_order(sitk_order[::-1], ras_transform(affine))  # SimpleITK's array is nibabel's transposed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=float, default=None)
    args = parser.parse_args()
    results = {name: nnunet_plan(name, args.samples) for name in args.datasets}
    args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
