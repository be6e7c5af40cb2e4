"""Every verb logs through Hydra's job_logging (conf/hydra/job_logging/aeval.yaml): piped output gets one plain
``[level] message`` line per record, never wrapped, and the job's folder keeps the whole log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_bad_input_is_one_plain_line_and_the_job_log_keeps_it(tmp_path):
    missing = tmp_path / ("a_long_folder_name_" * 8) / "cells.csv"  # longer than any console width
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "aeval.report", f"cells={missing}", f"out={tmp_path / 'out'}",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == [f"[error] {missing}: file not found"] and proc.stderr == ""
    log = (run_dir / "report.log").read_text()
    assert f"[ERROR] - {missing}: file not found" in log

