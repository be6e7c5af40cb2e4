"""Record the protocols table (Table 9 layout) and joint-vs-marginal on the synthetic A-Eval-mini, on CPU.

    .venv/bin/python experiments/protocols/run_synthetic.py [hydra overrides]

Runs ``experiment=protocols_demo`` (tiny STU-Net, the demo's epochs and patch) under
``outputs/protocols_demo`` and copies the report into this folder with the machine, date and wall time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aeval.orchestration.grid import run_grid

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def main(overrides: list[str]) -> int:
    torch.set_num_threads(int(os.environ.get("AEVAL_THREADS", "1")))
    with initialize_config_dir(config_dir=str(ROOT / "aeval" / "conf"), version_base=None):
        cfg = compose("grid", overrides=["experiment=protocols_demo", "paths.root_dir=outputs/protocols_demo",
                                         "logger=none", *overrides])
    start = time.time()
    outcome = run_grid(cfg)
    minutes = (time.time() - start) / 60
    if outcome.report_dir is None:
        return 1
    for name in ("grid.md", "grid.csv"):
        shutil.copyfile(outcome.report_dir / name, HERE / name)
    shutil.copyfile(outcome.report_dir / "joint_vs_marginal" / "grid.md", HERE / "joint_vs_marginal.md")
    for png in outcome.report_dir.glob("heatmap*.png"):
        shutil.copyfile(png, HERE / png.name)
    run = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": platform.node(), "cpu": cpu_model(),
           "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_at_end": os.getloadavg(), "wall_minutes": round(minutes, 1),
           "command": "python experiments/protocols/run_synthetic.py " + " ".join(overrides),
           "settings": {"model": f"stu_{cfg.model.size}", "max_epochs": cfg.trainer.max_epochs,
                        "iterations_per_epoch": cfg.data.iterations_per_epoch, "patch": list(cfg.plan.patch_size),
                        "inference": OmegaConf.to_container(cfg.inference), "synthetic": OmegaConf.to_container(
                            cfg.grid.synthetic)},
           "missing_cells": [list(m) for m in outcome.missing], "failures": outcome.failures.failures}
    (HERE / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"recorded in {HERE} ({minutes:.1f} min)")
    return outcome.failures.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
