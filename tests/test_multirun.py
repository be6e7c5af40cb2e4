"""Sweeps as a user runs them: real Hydra multiruns of ``aeval.train`` and ``aeval.grid`` (basic launcher and
``submitit_local``, each job in its own process), every job runs, a failing job leaves the others' cells, the
multirun exits non-zero, and the multirun-end report holds every job's cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_PLAN
from omegaconf import OmegaConf

from aeval.results import read_cells

pytestmark = pytest.mark.filterwarnings("ignore")

FAST = ["experiment=demo", "logger=none", "grid.synthetic.size_scale=0.5", "trainer.max_epochs=1",
        "data.iterations_per_epoch=2", "plan.target_spacing_override=[10,10,10]", FAST_PLAN,
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# A small A-Eval-mini: FLARE22 and BTCV cases only (every other dataset is absent, so it is skipped).
CASES = ("grid.synthetic.cases={flare22: {train: 2, val: 1, unlabeled: 0}, amos_ct: {train: 0, val: 0}, "
         "amos_mr: {train: 0, val: 0}, word: {train: 0, val: 0}, totalseg: {train: 0, val: 0, test: 0}, "
         "btcv: {train: 1}}")


def run(verb: str, root: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", f"aeval.{verb}", *overrides, f"paths.root_dir={root}"],
                          cwd=root.parent, capture_output=True, text=True, timeout=timeout, env=env)


def sweep_dirs(root: Path, verb: str) -> list[Path]:
    return sorted((root / "outputs" / "logs" / verb / "multiruns").iterdir())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The small mini, generated and converted once by the prepare CLI."""
    root = tmp_path_factory.mktemp("sweeps") / "work"
    mini = ("mini.cases={flare22: {train: 3, val: 1, unlabeled: 0}, amos_ct: {train: 0, val: 0}, "
            "amos_mr: {train: 0, val: 0}, word: {train: 0, val: 0}, totalseg: {train: 0, val: 0, test: 0}, "
            "btcv: {train: 0}}")
    done = run("prepare", root, "synthetic=true", mini, "mini.size_scale=0.5", "only=[flare22]")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root


def test_train_multirun_over_seeds_gives_one_run_per_seed_and_reruns_nothing(converted):
    overrides = ["-m", "seed=1,2", "model=stu_tiny", "trainer=cpu", "logger=none", "plan.patch_size=[16,16,16]",
                 "data.iterations_per_epoch=2", "data.num_workers=0", "data.val_cases=1", "trainer.max_epochs=1",
                 "preprocess_workers=1", "trainer.enable_progress_bar=false", FAST_PLAN]
    first = run("train", converted, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted((converted / "outputs/logs/train/individual/flare22/stu_tiny").iterdir())
    assert len(runs) == 2
    weights = [torch.load(r / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
               for r in runs]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert sorted(OmegaConf.load(r / "config.yaml").seed for r in runs) == [1, 2]
    stamps = {r: (r / "result.json").stat().st_mtime_ns for r in runs}

    again = run("train", converted, *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r: (r / "result.json").stat().st_mtime_ns for r in runs} == stamps
    assert (again.stdout + again.stderr).count("already trained") == 2


def test_grid_multirun_runs_every_job_and_reports_them_together(tmp_path):
    root = tmp_path / "work"
    done = run("grid", root, "-m", "seed=1,2", *FAST, CASES, "grid.train_sets=[flare22]",
               "grid.test_sets=[flare22,btcv]")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = [c for c in read_cells(root / "outputs/results") if c["organ"] is None]
    assert len(cells) == 4 and len({c["run"] for c in cells}) == 2  # two jobs x two test sets
    (sweep,) = sweep_dirs(root, "grid")
    report = (sweep / "report" / "grid.md").read_text()
    for run_hash in {c["run"] for c in cells}:
        assert f"run {run_hash}" in report
    assert sorted(json.loads((sweep / j / "outcome.json").read_text())["exit_code"] for j in ("0", "1")) == [0, 0]


def test_grid_rows_as_submitit_jobs_a_failed_row_keeps_the_others(tmp_path):
    """The 2x2 grid as two local submitit processes: WORD has no data, so its row fails; FLARE22's cells are
    written, the multirun exits non-zero and the report (after the last job) holds FLARE22's row."""
    root = tmp_path / "work"
    done = run("grid", root, "-m", "hydra/launcher=submitit_local", "grid.row=flare22,word", *FAST, CASES,
               "grid.train_sets=[flare22,word]", "grid.test_sets=[flare22,btcv]")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    cells = [c for c in read_cells(root / "outputs/results") if c["organ"] is None]
    assert {(c["train"], c["test"]) for c in cells} == {("flare22", "flare22"), ("flare22", "btcv")}
    (sweep,) = sweep_dirs(root, "grid")
    outcomes = {json.loads((sweep / j / "outcome.json").read_text())["overrides"][0]:
                json.loads((sweep / j / "outcome.json").read_text())["exit_code"] for j in ("0", "1")}
    assert outcomes["grid.row=flare22"] == 0 and outcomes["grid.row=word"] != 0
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2  # two submitit job processes
    report = (sweep / "report" / "grid.md").read_text()
    assert "| FLARE22 |" in report and "individual/word/stu_tiny/" in report.split("### Missing cells")[1]
    assert "grid.row=word" in output and "1 failed" in output
    failed = next(json.loads((sweep / j / "outcome.json").read_text()) for j in ("0", "1")
                  if json.loads((sweep / j / "outcome.json").read_text())["exit_code"])
    assert any("grid row word failed" in line for line in failed["errors"])  # why, in the job's outcome
