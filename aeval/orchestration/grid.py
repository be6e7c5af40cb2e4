"""The A-Eval grid: rows of training (one model per training set, or one per protocol for Table 9), each model
evaluated on every test set, then one report over the rows' cells.

A grid job runs its rows in turn (all of them, or the one ``grid.row`` names), so
``python -m aeval.grid`` runs the whole grid in one process, and ``python -m aeval.grid -m experiment=grid
hydra/launcher=slurm`` runs the rows as parallel jobs whose report the multirun-end callback writes
(:mod:`aeval.orchestration.multirun`). Rows are keyed like their cells (:class:`aeval.keys.RunKey`): a re-run
reuses finished checkpoints and skips finished cells; a failing row is reported and the others go on.
"""

from __future__ import annotations

import json
import logging
import logging.config
import multiprocessing
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from aeval.console import console
from aeval.data.prepare import prepare, summary_table
from aeval.data.synthetic import generate_mini
from aeval.errors import CaseFailure, FailureLog
from aeval.evaluation import evaluate
from aeval.fit import folder_lock, train
from aeval.keys import RunKey, model_name, run_hash
from aeval.metrics import metric_key
from aeval.models.load import load_model
from aeval.nifti import write_text_atomic
from aeval.protocols.run import protocol_plan, run_protocol
from aeval.reporting.build import build_report
from aeval.results import missing_cells, read_cells

log = logging.getLogger(__name__)
GRID_RUNS_JSON = "grid_runs.json"


@dataclass(frozen=True)
class GridRow:
    """One training row: a protocol, the dataset it swaps in (protocol 1 rows) and extra config values."""

    name: str
    protocol: str
    dataset: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass
class GridOutcome:
    """What a grid run leaves: the report folder, its runs, the missing cells and the failures."""

    report_dir: Path | None
    runs: list[RunKey] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)


@dataclass(frozen=True)
class ReportSpec:
    """What a grid report covers and where it goes (stored per job, so a multirun can merge them)."""

    results_root: str
    metric: str
    tests: tuple[str, ...]
    report_dir: str
    title: str
    paper: str | None = None
    compare_marginal: bool = False


def grid_rows(cfg: DictConfig) -> list[GridRow]:
    """``grid.rows`` (Table 9: one per protocol) or one row per ``grid.train_sets``; ``grid.row`` keeps one."""
    if cfg.grid.get("rows"):
        rows = []
        for index, r in enumerate(cfg.grid.rows):
            if not isinstance(r, Mapping | DictConfig) or not r.get("name") or not r.get("protocol"):
                raise ValueError(f"grid.rows[{index}]: needs a name and a protocol (and optionally dataset, set); "
                                 f"got {r}")
            rows.append(GridRow(str(r["name"]), str(r["protocol"]), r.get("dataset"),
                                tuple((str(k), v) for k, v in (r.get("set") or {}).items())))
    else:
        rows = [GridRow(str(t), str(cfg.protocol.name), str(t)) for t in cfg.grid.train_sets]
    wanted = cfg.grid.get("row")
    if wanted is None:
        return rows
    names = [str(w) for w in wanted] if isinstance(wanted, ListConfig | list | tuple) else [str(wanted)]
    unknown = [n for n in names if n not in {r.name for r in rows}]
    if unknown:
        raise ValueError(f"grid.row: unknown row(s) {', '.join(unknown)}; known: {', '.join(r.name for r in rows)}")
    return [r for r in rows if r.name in names]


def row_config(cfg: DictConfig, row: GridRow) -> DictConfig:
    """The training config of one row: the composed config with the row's dataset and protocol swapped in (both
    composed by Hydra under ``datasets`` and ``protocols``), then the row's settings (dotted keys)."""
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if row.dataset:
        if row.dataset not in job.datasets:
            raise ValueError(f"grid row {row.name}: unknown dataset {row.dataset!r}; known: {', '.join(job.datasets)}")
        job.dataset = job.datasets[row.dataset]
        job.train_sets = [row.dataset]
    if row.protocol != job.protocol.name:
        if row.protocol not in job.protocols:
            raise ValueError(f"grid row {row.name}: unknown protocol {row.protocol!r}; "
                             f"known: {', '.join(job.protocols)}")
        job.protocol = job.protocols[row.protocol]
    for dotted, value in row.settings:
        OmegaConf.update(job, dotted, value, merge=False, force_add=True)
    return job


def row_key(job: DictConfig) -> RunKey:
    """The run a row's cells are keyed by (known before it runs, so a failed row shows as missing cells)."""
    if job.protocol.name == "individual":
        return RunKey.of(job)
    plan = protocol_plan(job)
    return RunKey(plan.protocol, plan.train, model_name(job.model.size), run_hash(job))


def run_row(job: DictConfig, tests: Sequence[str], failures: FailureLog) -> RunKey:
    """Train (or reuse) the row's model and write its missing cells on ``tests``."""
    key = row_key(job)
    if job.protocol.name != "individual":
        run_protocol(job, test_sets=list(tests), failures=failures)
        return key
    metric = metric_key(job.metric.name, job.metric.classes)
    pending = [c.test for c in missing_cells(job.paths.results_root, [key.cell(t, metric) for t in tests])]
    if not pending:
        log.info("%s: every cell exists, skipped", key.train)
        return key
    result = train(job)  # a run already trained to max_epochs returns its stored result at once
    model = load_model(result.best_checkpoint or result.last_checkpoint)
    evaluation = evaluate(model, pending, job.paths.data_root, job.paths.results_root, key=key,
                          metric=job.metric.name, classes=job.metric.classes,
                          inference=OmegaConf.to_container(job.inference, resolve=True), failures=failures)
    summaries = {}
    for cell in evaluation.written:
        summary = json.loads((cell / "summary.json").read_text())
        summaries[summary["test"]] = summary
    log_job_to_wandb(summaries)
    return key


def log_job_to_wandb(summaries: Mapping[str, Any]) -> None:
    """Add the row's test results to its W&B run (the training run, if one is open), then close it."""
    import wandb

    if wandb.run is None:
        return
    for test, summary in summaries.items():
        wandb.run.summary[f"test/{test}/dsc"] = summary["mean_dsc"]
        wandb.run.summary[f"test/{test}/nsd"] = summary["mean_nsd"]
    wandb.finish()


def _dataset_names(value: Any, known: set[str]) -> set[str]:
    """Every dataset name mentioned anywhere in a (protocol) config value."""
    if isinstance(value, str):
        return {value} & known
    if isinstance(value, Mapping):
        return set().union(*(_dataset_names(v, known) for v in value.values()))
    if isinstance(value, Iterable):
        return set().union(*(_dataset_names(v, known) for v in value))
    return set()


def prepare_synthetic(cfg: DictConfig, rows: Sequence[GridRow], failures: FailureLog) -> None:
    """Write the synthetic A-Eval-mini (unless already there) and convert every dataset the rows read; one job
    at a time, since the parallel jobs of a multirun share these folders."""
    known = set(cfg.datasets)
    names = {r.dataset for r in rows if r.dataset} | {str(t) for t in cfg.grid.test_sets}
    for row in rows:
        protocol = row_config(cfg, row).protocol
        names |= _dataset_names(OmegaConf.to_container(protocol, resolve=True), known)
    raw_root = Path(cfg.paths.raw_root)
    with folder_lock(raw_root.parent):
        if not raw_root.exists():
            generate_mini(raw_root, OmegaConf.to_container(cfg.grid.synthetic, resolve=True))
        datasets = {n: OmegaConf.to_container(cfg.datasets[n], resolve=True) for n in sorted(names)}
        summaries, convert_failures = prepare(datasets, cfg.paths.data_root, num_workers=1)
    console.print(summary_table(summaries))
    failures.merge(convert_failures)


def _run_one_row(job: DictConfig, row: GridRow, tests: Sequence[str], failures: FailureLog) -> None:
    """One row; a failure becomes a line (one failed row must not stop the grid)."""
    try:
        run_row(job, tests, failures)
    except Exception as err:  # any error of a row is reported, the grid goes on
        failures.add(f"grid row {row.name} failed: {type(err).__name__}: {err}", None)
        log_job_to_wandb({})


def _row_process(job: dict, row: GridRow, tests: list[str], log_config: dict | None) -> list[CaseFailure]:
    """A row in a worker process of :func:`run_rows`; returns its failure records (the parent logs them). The
    worker logs through the parent job's logging config (Hydra's job_logging), so its lines look the same."""
    if log_config:
        logging.config.dictConfig(log_config)
    failures = FailureLog(quiet=True)
    _run_one_row(OmegaConf.create(job), row, tests, failures)
    return failures.records


def run_rows(cfg: DictConfig, rows: Sequence[GridRow], tests: Sequence[str], failures: FailureLog) -> list[RunKey]:
    """The rows in turn, or ``grid.row_workers`` of them at a time in their own processes (rows are
    independent: each trains from its own seed and writes its own cells, so the cells are the same; on a
    small CPU give each process ``torch_threads`` = cores / row_workers). Returns the rows' keys."""
    jobs, keys = [], []
    for row in rows:
        try:
            job = row_config(cfg, row)
            keys.append(row_key(job))
            jobs.append((row, job))
        except Exception as err:  # a bad row is reported, the others go on
            failures.add(f"grid row {row.name} failed: {type(err).__name__}: {err}", None)
    workers = min(int(cfg.grid.get("row_workers") or 1), len(jobs))
    if workers <= 1:
        for row, job in jobs:
            _run_one_row(job, row, tests, failures)
        return keys
    context = multiprocessing.get_context("spawn")  # no forked copies of torch/OpenMP state or W&B threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        log_config = _job_logging()
        futures = {pool.submit(_row_process, OmegaConf.to_container(job, resolve=False), row, list(tests),
                               log_config): row for row, job in jobs}
        for future, row in futures.items():
            try:
                failures.extend(future.result())
            except Exception as err:  # a worker that died
                failures.add(f"grid row {row.name} failed: {type(err).__name__}: {err}")
    return keys


def _job_logging() -> dict | None:
    """This job's logging config (Hydra's ``job_logging``, resolved), for worker processes."""
    if not HydraConfig.initialized():
        return None
    return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)


def report_spec(cfg: DictConfig) -> ReportSpec:
    """What the grid's report covers, from the config (picklable, for the multirun-end callback)."""
    return ReportSpec(str(cfg.paths.results_root), metric_key(cfg.metric.name, cfg.metric.classes),
                      tuple(str(t) for t in cfg.grid.test_sets), str(cfg.grid.report_dir), str(cfg.grid.title),
                      cfg.grid.get("paper"), bool(cfg.grid.get("compare_marginal")))


def run_grid(cfg: DictConfig) -> GridOutcome:
    """Every row (or the one ``grid.row`` names), then the report over the rows' cells. The rows' keys are
    stored in the job's output folder for the multirun-end report."""
    failures = FailureLog()
    rows = grid_rows(cfg)
    if cfg.grid.get("synthetic"):
        prepare_synthetic(cfg, rows, failures)
    tests = [str(t) for t in cfg.grid.test_sets]
    runs = run_rows(cfg, rows, tests, failures)
    spec = report_spec(cfg)
    if HydraConfig.initialized():
        write_text_atomic(Path(HydraConfig.get().runtime.output_dir) / GRID_RUNS_JSON, json.dumps(
            {"spec": spec.__dict__, "runs": [r.as_dict() for r in runs]}, indent=2))
    if cfg.grid.get("row") is not None:  # one row of a fanned-out grid: the multirun-end callback reports
        return GridOutcome(None, runs, [], failures)
    outcome = report_runs(spec, runs, failures)
    if outcome.report_dir and cfg.get("logger") and "wandb" in cfg.logger:
        log_summary_to_wandb(cfg, outcome.report_dir)
    return outcome


def report_runs(spec: ReportSpec, runs: Sequence[RunKey], failures: FailureLog | None = None) -> GridOutcome:
    """The report over the cells of ``runs`` on the spec's test sets (grid, model sizes and Table 9 alike);
    protocols named ``*_marginal`` go into a side-by-side comparison with ``joint`` instead of the main table."""
    failures = failures or FailureLog()
    runs = list(dict.fromkeys(runs))
    problems: list[str] = []
    cells = [c for c in read_cells(spec.results_root, problems, runs=runs)
             if c["metric"] == spec.metric and c["test"] in spec.tests] if Path(spec.results_root).is_dir() else []
    present = {(c["protocol"], c["train"], c["model"], c["run"], c["test"]) for c in cells if c["organ"] is None}
    missing = [(f"{r.protocol}/{r.train}/{r.model}/{r.run}", t) for r in runs for t in spec.tests
               if (r.protocol, r.train, r.model, r.run, t) not in present]
    outcome = GridOutcome(None, runs, missing, failures)
    main_cells = [c for c in cells if not c["protocol"].endswith("_marginal")]
    if not main_cells:
        log.error("no finished cells to report")
        return outcome
    report_dir = Path(spec.report_dir)
    report = build_report(main_cells, report_dir, paper=spec.paper, title=spec.title)
    main_tables, _, _ = report.text.partition("\n### Per organ")  # per-organ tables: see grid.md
    console.print(main_tables, highlight=False, markup=False, soft_wrap=True)
    marginal = [c for c in cells if c["train"] == "joint"]
    if spec.compare_marginal and {c["protocol"] for c in marginal} >= {"joint", "joint_marginal"}:
        comparison = build_report(marginal, report_dir / "joint_vs_marginal", figures=False,
                                  title="Joint training: the paper's rounds vs the marginal loss")
        console.print(comparison.text, highlight=False, markup=False, soft_wrap=True)
    if missing:
        lines = [f"- {run} → {test}" for run, test in missing]
        write_text_atomic(report_dir / "grid.md", report.text + "\n### Missing cells (not scored or failed)\n\n"
                          + "\n".join(lines) + "\n")
        log.warning("missing cells: %s", ", ".join(f"{r} -> {t}" for r, t in missing))
    log.info("report written to %s", report_dir)
    outcome.report_dir = report_dir
    return outcome


def log_summary_to_wandb(cfg: DictConfig, report_dir: Path) -> None:
    """A summary run of the grid: the grid as a W&B Table and the pictures as images (offline by default)."""
    import csv

    import wandb

    from aeval.tracking import ensure_wandb_mode

    ensure_wandb_mode()
    name = model_name(cfg.model.size)
    run = wandb.init(project=cfg.logger.wandb.project, dir=cfg.paths.log_dir, group=cfg.logger.wandb.group,
                     job_type="report", name=f"grid-{cfg.protocol.name}-{name}",
                     tags=["grid", cfg.protocol.name, name], reinit="finish_previous")
    with open(report_dir / "grid.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    run.log({"grid": wandb.Table(columns=rows[0], data=rows[1:])})
    run.log({path.stem: wandb.Image(str(path)) for path in sorted(report_dir.glob("*.png"))})
    run.finish()


def grid_job(cfg: DictConfig) -> int:
    """``aeval.grid``'s job: the rows, the report, a line on what is missing; the exit code."""
    outcome = run_grid(cfg)
    missing = f"{len(outcome.missing)} cell(s) missing" if outcome.missing else "all cells present"
    log.info("grid: %s; %s", missing, outcome.failures.summary())
    return outcome.failures.exit_code() or (2 if outcome.missing else 0)
