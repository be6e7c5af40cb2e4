"""A two-cell synthetic sweep end to end: cells written, re-runs skip them, a failing cell is reported
while the other finishes, and the offline W&B files hold the grid table."""

import json
import shutil

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from aeval.data.synthetic import DEFAULT_CASES, generate_mini
from aeval.keys import run_hash
from aeval.orchestration.grid import GridRow, row_config, run_grid

pytestmark = pytest.mark.filterwarnings("ignore")


def grid_config(root, *extra):
    cases = {d: dict.fromkeys(splits, 0) for d, splits in DEFAULT_CASES.items()}
    cases["flare22"].update(train=2, val=1)
    cases["btcv"].update(train=1)
    overrides = [
        "experiment=demo", f"paths.root_dir={root}", "grid.train_sets=[flare22]", "grid.test_sets=[flare22,btcv]",
        "grid.synthetic.size_scale=0.5",
        "trainer.max_epochs=1", "data.iterations_per_epoch=2", "plan.target_spacing_override=[10,10,10]",
        "logger.wandb.group=test-sweep", *extra,
    ]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("grid", overrides=overrides)
    cfg.grid.synthetic.cases = cases
    return cfg


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: W&B must go offline, never prompt


def test_two_cell_sweep_skips_finished_cells_and_reports_failures(tmp_path, no_wandb_credentials):
    root = tmp_path / "demo"
    cfg = grid_config(root)
    # First run: BTCV's ground truth is missing, so that cell fails and the FLARE22 cell is still written.
    generate_mini(cfg.paths.raw_root, dict(cfg.grid.synthetic), progress=False)
    shutil.rmtree(cfg.paths.raw_root + "/BTCV/RawData/Training/label")
    outcome = run_grid(cfg)
    run = run_hash(row_config(cfg, GridRow("flare22", "individual", "flare22")))
    results = root / f"outputs/results/individual/flare22/stu_tiny/{run}"
    assert (results / "flare22/aeval/summary.json").exists()
    assert not (results / "btcv/aeval/summary.json").exists()
    assert outcome.missing == [(f"individual/flare22/stu_tiny/{run}", "btcv")]
    assert outcome.failures.exit_code() == 2 and any("btcv" in line for line in outcome.failures.failures)
    report = (root / "outputs/results/reports/individual/stu_tiny/aeval/grid.md").read_text()
    assert "FLARE22" in report

    # Second run with the labels back: training is reused, the finished cell is skipped, the missing one filled.
    shutil.rmtree(cfg.paths.raw_root)
    generate_mini(cfg.paths.raw_root, dict(cfg.grid.synthetic), progress=False)
    finished = results / "flare22/aeval/summary.json"
    stamp = finished.stat().st_mtime_ns
    run_result = root / f"outputs/logs/train/individual/flare22/stu_tiny/{run}/result.json"
    trained = run_result.stat().st_mtime_ns
    outcome = run_grid(cfg)
    assert outcome.missing == [] and outcome.failures.exit_code() == 0
    assert finished.stat().st_mtime_ns == stamp
    assert run_result.stat().st_mtime_ns == trained
    cell = json.loads((results / "btcv/aeval/summary.json").read_text())
    assert cell["n_cases"] == 1 and 0 <= cell["mean_dsc"] <= 1

    # W&B ran offline: one run per training job plus the summary run holding the grid table.
    runs = sorted((root / "outputs/logs/wandb").glob("offline-run-*"))
    assert len(runs) >= 3
    tables = list((root / "outputs/logs/wandb").glob("offline-run-*/files/media/table/grid_*.table.json"))
    assert tables
    table = json.loads(max(tables, key=lambda p: p.stat().st_mtime_ns).read_text())  # the second run's summary
    assert {"train", "flare22_dsc", "btcv_dsc", "mean_dsc"} <= set(table["columns"])


@pytest.mark.slow
def test_rows_in_parallel_processes_write_the_same_cells(tmp_path, no_wandb_credentials):
    """``grid.row_workers=2`` (the demo's setting): two rows in their own processes give exactly the cells of
    the rows run in turn in this process."""
    summaries = {}
    for workers in (1, 2):
        root = tmp_path / f"workers{workers}"
        cfg = grid_config(root, "grid.train_sets=[flare22,amos_ct]", "grid.test_sets=[flare22]",
                          f"grid.row_workers={workers}")
        cfg.grid.synthetic.cases["amos_ct"].update(train=2, val=1)
        outcome = run_grid(cfg)
        assert outcome.missing == [] and outcome.failures.exit_code() == 0
        summaries[workers] = {
            str(p.relative_to(root)): {k: v for k, v in json.loads(p.read_text()).items()
                                       if k in ("mean_dsc", "mean_nsd", "organs", "n_cases")}
            for p in sorted((root / "outputs/results").glob("individual/*/*/*/*/aeval/summary.json"))}
    assert len(summaries[1]) == 2 and summaries[1] == summaries[2]
