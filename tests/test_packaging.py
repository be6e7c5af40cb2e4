"""The package as a user installs it: the wheel carries the configs and the paper's tables, declares the console
scripts, and (slow) installed without ``-e`` into a fresh virtual environment its CLIs start from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("prepare", "train", "evaluate", "predict", "score", "report", "grid", "export")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy, as a fresh clone has it: no build/ left over, nothing written in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "outputs", "multirun",
                                                                 "data_root", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("aeval-*.whl")
    return path


def test_wheel_carries_configs_tables_scripts_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "aeval" / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    assert {"aeval/conf/__init__.py", "aeval/paper/table3_cells.csv", "aeval/paper/table9_cells.csv"} <= names
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(info).decode()
    for verb in VERBS:
        assert f"aeval-{verb} = aeval.{verb}:main" in entry_points
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_answers_from_any_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1800)  # the CPU wheel first, as the Makefile does
    subprocess.run([*pip, str(wheel)], check=True, timeout=1800)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for verb in VERBS:
        shown = subprocess.run([str(venv / "bin" / f"aeval-{verb}"), "--cfg", "job"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, f"aeval-{verb}: {shown.stderr[-2000:]}"
        assert "paths:" in shown.stdout
    completion = subprocess.run([str(venv / "bin" / "aeval-train"), "-sc", "install=bash"], cwd=elsewhere, env=env,
                                capture_output=True, text=True, timeout=300)
    assert completion.returncode == 0 and "aeval-train" in completion.stdout
