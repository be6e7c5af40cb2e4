"""``python -m aeval.grid``: the A-Eval grid. One model per training set, each evaluated on every test set,
then the report (Table 3 layout, heatmaps) and a W&B summary run.

Every job is keyed like its cells (protocol / training set / model), so a re-run reuses finished
checkpoints and skips finished cells; a failing job is reported and the others go on. Model-size sweeps
are Hydra multiruns: ``python -m aeval.grid -m model=stu_s,stu_b,stu_l,stu_h``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.data.registry import load_dataset_config
from aeval.data.synthetic import generate_mini
from aeval.errors import FailureLog
from aeval.evaluate import cell_finished, evaluate, metric_key
from aeval.predict import load_model
from aeval.prepare import prepare, summary_table
from aeval.report import build_report, cell_dir, read_cells
from aeval.train import run_key, train

CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class GridOutcome:
    report_dir: Path | None
    missing: list[tuple[str, str]] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)


def job_config(cfg: DictConfig, train_set: str) -> DictConfig:
    """The training config of one grid row: the same settings with ``dataset`` swapped."""
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    dataset = OmegaConf.load(CONF_DIR / "dataset" / f"{train_set}.yaml")
    job.dataset = dataset
    job.train_sets = [train_set]
    return job


def run_job(job: DictConfig, test_sets: Sequence[str], failures: FailureLog) -> dict[str, Any]:
    """Train (or reuse) one model and evaluate it on every test set; returns the cell summaries."""
    key = run_key(job)
    metric = metric_key(job.metric.name, job.metric.classes)
    pending = [t for t in test_sets if not cell_finished(
        cell_dir(job.paths.results_root, key["protocol"], key["train"], key["model"], t, metric))]
    if not pending:
        console.print(f"[green]{key['train']}[/green]: every cell exists, skipped", highlight=False)
        return {}
    result = train(job)  # a run already trained to max_epochs returns its stored result at once
    model = load_model(result.best_checkpoint or result.last_checkpoint)
    evaluation = evaluate(model, list(pending), job.paths.data_root, job.paths.results_root, key=key,
                          metric=job.metric.name, classes=job.metric.classes,
                          inference=OmegaConf.to_container(job.inference, resolve=True), failures=failures)
    summaries = {}
    for cell in evaluation.written:
        summary = json.loads((cell / "summary.json").read_text())
        summaries[summary["test"]] = summary
    log_job_to_wandb(job, summaries)
    return summaries


def log_job_to_wandb(job: DictConfig, summaries: dict[str, Any]) -> None:
    """Add the job's test results to its W&B run (the training run, if one is open), then close it."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is None:
        return
    for test, summary in summaries.items():
        wandb.run.summary[f"test/{test}/dsc"] = summary["mean_dsc"]
        wandb.run.summary[f"test/{test}/nsd"] = summary["mean_nsd"]
    wandb.finish()


def prepare_synthetic(cfg: DictConfig, failures: FailureLog) -> None:
    """Write the synthetic A-Eval-mini (unless already there) and convert the grid's datasets."""
    raw_root = Path(cfg.paths.raw_root)
    if not raw_root.exists():
        generate_mini(raw_root, OmegaConf.to_container(cfg.grid.synthetic, resolve=True))
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    names = list(dict.fromkeys([*cfg.grid.train_sets, *cfg.grid.test_sets]))
    datasets = {name: load_dataset_config(name, paths) for name in names}
    summaries, convert_failures = prepare(datasets, cfg.paths.data_root, num_workers=1)
    console.print(summary_table(summaries))
    for line in convert_failures.failures:
        failures.add(line, None)


def run_grid(cfg: DictConfig) -> GridOutcome:
    """Every row of the grid, then the report over whatever cells exist."""
    failures = FailureLog(printer=lambda line: console.print(f"[red]{line}[/red]", highlight=False))
    if cfg.grid.get("synthetic"):
        prepare_synthetic(cfg, failures)
    for train_set in cfg.grid.train_sets:
        job = job_config(cfg, train_set)
        try:
            run_job(job, cfg.grid.test_sets, failures)
        except Exception as err:  # one failed job must not stop the grid
            failures.add(f"grid job {train_set} failed: {type(err).__name__}: {err}", None)
            log_job_to_wandb(job, {})
    return write_grid_report(cfg, failures)


def expected_cells(cfg: DictConfig) -> list[tuple[str, str]]:
    return [(train, test) for train in cfg.grid.train_sets for test in cfg.grid.test_sets]


def write_grid_report(cfg: DictConfig, failures: FailureLog | None = None) -> GridOutcome:
    failures = failures or FailureLog()
    model = f"stu_{cfg.model.size}"
    problems: list[str] = []
    cells = [c for c in read_cells(cfg.paths.results_root, problems) if c["protocol"] == cfg.protocol.name
             and c["metric"] == metric_key(cfg.metric.name, cfg.metric.classes)
             and c["train"] in cfg.grid.train_sets
             and c["test"] in cfg.grid.test_sets]
    present = {(c["train"], c["test"]) for c in cells if c["organ"] is None and c["model"] == model}
    outcome = GridOutcome(None, [pair for pair in expected_cells(cfg) if pair not in present], failures)
    if not cells:
        console.print("[red]no finished cells to report[/red]")
        return outcome
    report_dir = Path(cfg.grid.report_dir)
    report = build_report(cells, report_dir, paper=cfg.grid.get("paper"), title=cfg.grid.title)
    main_tables, _, _ = report.text.partition("\n### Per organ")  # per-organ tables: see grid.md
    console.print(main_tables, highlight=False, markup=False)
    if outcome.missing:
        console.print("missing cells: " + ", ".join(f"{t} -> {s}" for t, s in outcome.missing), highlight=False)
    console.print(f"report written to {report_dir}", highlight=False)
    outcome.report_dir = report_dir
    if cfg.get("logger") and "wandb" in cfg.logger:
        log_summary_to_wandb(cfg, report_dir, report.files)
    return outcome


def log_summary_to_wandb(cfg: DictConfig, report_dir: Path, files: Sequence[Path]) -> None:
    """A summary run of the sweep: the grid as a W&B Table and the pictures as images (offline by default)."""
    import csv

    import wandb

    from aeval.tracking import ensure_wandb_mode

    ensure_wandb_mode()
    run = wandb.init(project=cfg.logger.wandb.project, dir=cfg.paths.log_dir, group=cfg.logger.wandb.group,
                     job_type="report", name=f"grid-{cfg.protocol.name}-stu_{cfg.model.size}",
                     tags=["grid", cfg.protocol.name, f"stu_{cfg.model.size}"], reinit="finish_previous")
    with open(report_dir / "grid.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    run.log({"grid": wandb.Table(columns=rows[0], data=rows[1:])})
    run.log({path.stem: wandb.Image(str(path)) for path in files if path.suffix == ".png"})
    run.finish()


class ReportOnMultirunEnd(Callback):
    """Builds the grid report when a Hydra multirun of the grid ends (``python -m aeval.train -m experiment=grid``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_grid_report(config)


@hydra.main(version_base=None, config_path="conf", config_name="grid")
def main(cfg: DictConfig) -> None:
    if cfg.grid.get("rows"):  # experiment=protocols: one row per protocol (Table 9 layout)
        from aeval.protocols.run import run_protocols_table

        outcome = run_protocols_table(cfg)
    else:
        outcome = run_grid(cfg)
    console.print(failures_line(outcome), highlight=False)
    sys.exit(outcome.failures.exit_code())


def failures_line(outcome: GridOutcome) -> str:
    missing = f"{len(outcome.missing)} cell(s) missing" if outcome.missing else "all cells present"
    return f"grid: {missing}; {outcome.failures.summary()}"


if __name__ == "__main__":
    main()
