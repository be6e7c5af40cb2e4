"""``python -m aeval.protocols.run``: run one protocol (every round, then its cells), or the Table 9 sweep.

    python -m aeval.protocols.run protocol=pseudo_label dataset=flare22
    python -m aeval.protocols.run protocol=multimodal modality=ct_mr
    python -m aeval.protocols.run protocol=joint model=stu_l [protocol.partial_labels=marginal]
    python -m aeval.protocols.run experiment=protocols        # Table 9: every protocol, one report

The config is the grid's (``conf/grid.yaml``: training settings + metric + inference); a sweep is selected
by ``grid.rows``. Re-running resumes: finished rounds, checkpoints and cells are reused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aeval.console import console
from aeval.errors import FailureLog
from aeval.grid import GridOutcome, failures_line, job_config, prepare_synthetic, run_job
from aeval.protocols import ProtocolPlan, joint, multimodal, pseudo_label
from aeval.protocols.rounds import CONF_DIR, ProtocolOutcome, run_plan
from aeval.report import build_report, read_cells

PLANS: dict[str, Callable[[DictConfig], ProtocolPlan]] = {
    "pseudo_label": pseudo_label.plan, "multimodal": multimodal.plan, "joint": joint.plan}
# Every dataset some protocol reads, converted before a synthetic sweep.
PROTOCOL_DATASETS = ("flare22_unlabeled", "amos_mr")


def protocol_plan(cfg: DictConfig) -> ProtocolPlan:
    name = cfg.protocol.name
    if name not in PLANS:
        raise ValueError(f"protocol {name!r} has no rounds to run; known: {', '.join(PLANS)} "
                         "(protocol=individual is `python -m aeval.train`)")
    return PLANS[name](cfg)


def run_protocol(cfg: DictConfig, *, test_sets: list[str] | None = None,
                 failures: FailureLog | None = None) -> ProtocolOutcome:
    """Every round of ``cfg.protocol`` (finished rounds skipped), then the final model's cells on the
    protocol's test sets (or ``test_sets``)."""
    failures = failures if failures is not None else FailureLog(printer=_red)
    plan = protocol_plan(cfg)
    console.print(f"protocol {plan.protocol} ({plan.train}): {len(plan.rounds)} round(s)", markup=False,
                  highlight=False)
    return run_plan(cfg, plan, test_sets=test_sets, failures=failures)


def _red(line: str) -> None:
    console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)


# --- Table 9 -------------------------------------------------------------------------------------------

def protocol_option(name: str) -> dict[str, Any]:
    """``conf/protocol/{name}.yaml`` as it lands in the root config (files may be ``@package _global_``)."""
    path = CONF_DIR / "protocol" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(p.stem for p in path.parent.glob('*.yaml'))}")
    content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if "@package _global_" in path.read_text().split("\n", 1)[0]:
        return content
    return {"protocol": content}


def row_config(cfg: DictConfig, row: Mapping[str, Any]) -> DictConfig:
    """The config of one sweep row: ``dataset`` swapped (as the grid does), the protocol option merged in,
    then the row's ``set`` values (dotted keys)."""
    job = job_config(cfg, row["dataset"]) if row.get("dataset") else \
        OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    job.pop("protocol", None)
    job = OmegaConf.merge(job, protocol_option(row["protocol"]))
    for dotted, value in (row.get("set") or {}).items():
        OmegaConf.update(job, dotted, value, force_add=True)
    return job


def row_key(job: DictConfig) -> tuple[str, str]:
    if job.protocol.name == "individual":
        return "individual", "+".join(job.train_sets)
    plan = protocol_plan(job)
    return plan.protocol, plan.train


def run_protocols_table(cfg: DictConfig) -> GridOutcome:
    """Every row of ``cfg.grid.rows`` (individual rows as the grid trains them, the others through their
    protocol), each evaluated on ``cfg.grid.test_sets``, then the report over the rows' cells (Table 9
    layout when AMOS MR is a test set) and, with ``grid.compare_marginal``, joint vs joint-marginal."""
    failures = FailureLog(printer=_red)
    tests = [str(t) for t in cfg.grid.test_sets]
    if cfg.grid.get("synthetic"):
        prepare_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        prepare_cfg.grid.train_sets = sorted({*cfg.grid.get("train_sets", []), *PROTOCOL_DATASETS,
                                              *(r["dataset"] for r in cfg.grid.rows if r.get("dataset"))})
        prepare_synthetic(prepare_cfg, failures)
    keys = []
    for row in cfg.grid.rows:
        label = f"{row['protocol']} {row.get('dataset') or ''} {dict(row.get('set') or {})}".strip()
        try:
            job = row_config(cfg, row)
            keys.append(row_key(job))
            if job.protocol.name == "individual":
                run_job(job, tests, failures)
            else:
                run_protocol(job, test_sets=tests, failures=failures)
        except Exception as err:  # one failed row must not stop the sweep
            failures.add(f"protocols row {label} failed: {type(err).__name__}: {err}", None)
    return write_protocols_report(cfg, keys, failures)


def write_protocols_report(cfg: DictConfig, keys: list[tuple[str, str]], failures: FailureLog) -> GridOutcome:
    """The report over the cells of ``keys`` (protocol, train) x the sweep's test sets."""
    model = f"stu_{cfg.model.size}"
    tests = list(cfg.grid.test_sets)
    problems: list[str] = []
    cells = [c for c in read_cells(cfg.paths.results_root, problems)
             if (c["protocol"], c["train"]) in keys and c["model"] == model and c["metric"] == cfg.metric.name
             and c["test"] in tests] if Path(cfg.paths.results_root).is_dir() else []
    present = {(c["protocol"], c["train"], c["test"]) for c in cells if c["organ"] is None}
    outcome = GridOutcome(None, [(f"{p}/{t}", test) for p, t in keys for test in tests
                                 if (p, t, test) not in present], failures)
    table_keys = [k for k in keys if not k[0].endswith("_marginal")]
    main_cells = [c for c in cells if (c["protocol"], c["train"]) in table_keys]
    if not main_cells:
        console.print("[red]no finished cells to report[/red]")
        return outcome
    report_dir = Path(cfg.grid.report_dir)
    report = build_report(main_cells, report_dir, paper=cfg.grid.get("paper"), title=cfg.grid.title)
    console.print(report.text, highlight=False, markup=False)
    marginal = [c for c in cells if c["train"] == "joint"]
    if cfg.grid.get("compare_marginal") and {c["protocol"] for c in marginal} >= {"joint", "joint_marginal"}:
        comparison = build_report(marginal, report_dir / "joint_vs_marginal", figures=False,
                                  title=f"Joint training: the paper's rounds vs the marginal loss ({model})")
        console.print(comparison.text, highlight=False, markup=False)
    if outcome.missing:
        console.print("missing cells: " + ", ".join(f"{k} -> {t}" for k, t in outcome.missing), highlight=False)
    console.print(f"report written to {report_dir}", highlight=False)
    outcome.report_dir = report_dir
    return outcome


@hydra.main(version_base=None, config_path="../conf", config_name="grid")
def main(cfg: DictConfig) -> None:
    if cfg.grid.get("rows"):
        outcome = run_protocols_table(cfg)
        console.print(failures_line(outcome), highlight=False)
        sys.exit(outcome.failures.exit_code())
    result = run_protocol(cfg)
    cells = ", ".join(str(c) for c in result.cells) or "none (stopped before the last round)"
    console.print(f"protocol {result.plan.protocol} ({result.plan.train}): {len(result.rounds)} round(s); "
                  f"cells: {cells}; {result.failures.summary()}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(result.failures.exit_code())


if __name__ == "__main__":
    main()
