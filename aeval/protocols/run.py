"""Run one protocol: every round (finished ones skipped), then the final model's cells.

``python -m aeval.train protocol=pseudo_label|multimodal|joint ...`` comes here; the grid
(:mod:`aeval.orchestration.grid`) does too for its protocol rows (Table 9).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

from aeval.errors import FailureLog
from aeval.protocols import ProtocolPlan, joint, multimodal, pseudo_label
from aeval.protocols.rounds import ProtocolOutcome, run_rounds

log = logging.getLogger(__name__)

PLANS: dict[str, Callable[[DictConfig], ProtocolPlan]] = {
    "pseudo_label": pseudo_label.plan, "multimodal": multimodal.plan, "joint": joint.plan}


def protocol_plan(cfg: DictConfig) -> ProtocolPlan:
    """The rounds of the protocol ``cfg.protocol.name`` names."""
    name = cfg.protocol.name
    if name not in PLANS:
        raise ValueError(f"protocol {name!r} has no rounds to run; known: {', '.join(PLANS)} "
                         "(protocol=individual trains one model)")
    return PLANS[name](cfg)


def run_protocol(cfg: DictConfig, *, test_sets: list[str] | None = None,
                 failures: FailureLog | None = None) -> ProtocolOutcome:
    """Every round of ``cfg.protocol`` (finished rounds skipped), then the final model's cells on the
    protocol's test sets (or ``test_sets``)."""
    failures = failures if failures is not None else FailureLog()
    plan = protocol_plan(cfg)
    log.info("protocol %s (%s): %d round(s)", plan.protocol, plan.train, len(plan.rounds))
    outcome = run_rounds(cfg, plan, test_sets=test_sets, failures=failures)
    cells = ", ".join(str(c) for c in outcome.cells) or "none (stopped before the last round)"
    log.info("protocol %s (%s): %d round(s); cells: %s; %s", plan.protocol, plan.train, len(outcome.rounds), cells,
             outcome.failures.summary())
    return outcome
