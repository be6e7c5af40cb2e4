"""Protocol rounds, stored by content key and resumed.

A protocol is a list of :class:`Round`\\ s. A round trains one model on several datasets; some of them are
pseudo-labelled by an earlier round's model (:class:`PseudoLabelled`). Each round's key is a hash of what
produces it — the protocol, its datasets (a pseudo-labelled one by its teacher round's key), its config
settings and the training settings — so changing a later round, or adding one, keeps the earlier ones.

On disk (``R`` = ``{paths.log_dir}/protocols/{protocol}/{train}/stu_{size}``)::

    R/round{i}-{key}/                 the round's training run (checkpoints/, config.yaml, result.json)
    R/round{i}-{key}/round.json       written last: the round is finished
    R/round{i}-{key}/results/...      cells of the round's model (evaluate layout), final round always
    {paths.data_root}/{source}_pl_{key}/   a pseudo-labelled unified dataset (complete when dataset.json says so)

A re-run skips finished rounds and resumes the first unfinished one (an interrupted training continues from
its ``last.ckpt``, a half-written pseudo-label dataset from the cases already predicted). The final round's
cells are copied to ``{paths.results_root}/{protocol}/{train}/{model}/{run}/...`` (:mod:`aeval.results`), where
reports read them; ``run`` is the hash of the training settings (:func:`aeval.keys.run_hash`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aeval.errors import FailureLog
from aeval.evaluation import evaluate
from aeval.fit import train
from aeval.keys import RunKey, digest, model_name, run_hash, training_settings
from aeval.models.load import load_model
from aeval.nifti import atomic_path, write_text_atomic
from aeval.protocols import ProtocolPlan, PseudoLabelled
from aeval.protocols.pseudo_label import is_complete, write_pseudo_labels

log = logging.getLogger(__name__)

ROUND_MARKER = "round.json"


@dataclass
class RoundRecord:
    """One trained round: its key, run folder, training sets and checkpoint."""

    index: int
    name: str
    key: str
    run_dir: Path
    train_sets: list[str]
    checkpoint: Path
    skipped: bool


@dataclass
class ProtocolOutcome:
    """What running a protocol left: its rounds, the final model's cells and the failures."""

    plan: ProtocolPlan
    rounds: list[RoundRecord] = field(default_factory=list)
    cells: list[Path] = field(default_factory=list)
    failures: FailureLog = field(default_factory=FailureLog)
    run_key: RunKey | None = None


class RoundRunner:
    """Runs a :class:`ProtocolPlan` under a composed training config ``cfg``."""

    def __init__(self, cfg: DictConfig, plan: ProtocolPlan, failures: FailureLog | None = None):
        self.cfg, self.plan = cfg, plan
        self.failures = failures if failures is not None else FailureLog()
        self.inference = OmegaConf.to_container(cfg.inference, resolve=True)
        self.metric = OmegaConf.to_container(cfg.metric, resolve=True)
        self.run_key = RunKey(plan.protocol, plan.train, model_name(cfg.model.size), run_hash(cfg))
        self.root = Path(cfg.paths.log_dir) / "protocols" / plan.protocol / plan.train / self.run_key.model
        self.keys = self._round_keys()

    def _pseudo_identity(self, item: PseudoLabelled, keys: list[str]) -> dict[str, Any]:
        return {"source": item.source, "mode": item.mode, "teacher": keys[item.teacher],
                "inference": self.inference, "confidence_threshold": self.confidence_threshold}

    @property
    def confidence_threshold(self) -> float | None:
        value = self.cfg.protocol.get("confidence_threshold")
        return None if value is None else float(value)

    def _round_keys(self) -> list[str]:
        keys: list[str] = []
        training = training_settings(self.cfg)
        for index, spec in enumerate(self.plan.rounds):
            sets = [s if isinstance(s, str) else self._pseudo_identity(s, keys) for s in spec.train_sets]
            keys.append(digest({"protocol": self.plan.protocol, "train": self.plan.train, "round": index,
                                "name": spec.name, "train_sets": sets, "settings": list(spec.settings),
                                "training": training, "previous": keys[-1] if keys else None}))
        return keys

    def round_dir(self, index: int) -> Path:
        return self.root / f"round{index + 1}-{self.keys[index]}"

    def pseudo_label_name(self, item: PseudoLabelled) -> str:
        return f"{item.source}_pl_{digest(self._pseudo_identity(item, self.keys))}"

    def finished(self, index: int) -> RoundRecord | None:
        marker = self.round_dir(index) / ROUND_MARKER
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        checkpoint = Path(record.get("checkpoint", ""))
        if record.get("key") != self.keys[index] or not checkpoint.is_file():
            return None
        return RoundRecord(index, record["name"], record["key"], self.round_dir(index), record["train_sets"],
                           checkpoint, skipped=True)

    def run(self, stop_after: int | None = None) -> list[RoundRecord]:
        """Every round up to ``stop_after`` (1-based; all by default); finished ones are skipped."""
        last = len(self.plan.rounds) if stop_after is None else min(int(stop_after), len(self.plan.rounds))
        records: list[RoundRecord] = []
        for index in range(last):
            record = self.finished(index)
            if record is not None:
                log.info("round %d (%s) finished, skipped: %s", index + 1, record.name, record.run_dir)
            else:
                record = self.train_round(index, records)
            records.append(record)
            if self.cfg.protocol.get("evaluate_every_round") and index < last - 1:
                self.evaluate_round(record)
        return records

    def datasets_for(self, index: int, records: Sequence[RoundRecord]) -> list[str]:
        """The round's dataset names, writing pseudo-labelled ones that are not complete yet."""
        names = []
        for item in self.plan.rounds[index].train_sets:
            if isinstance(item, str):
                names.append(item)
                continue
            name = self.pseudo_label_name(item)
            out_dir = Path(self.cfg.paths.data_root) / name
            if not is_complete(out_dir):
                teacher = records[item.teacher]
                log.info("round %d: pseudo-labelling %s (%s) with round %d's model", index + 1, item.source,
                         item.mode, item.teacher + 1)
                write_pseudo_labels(load_model(teacher.checkpoint), Path(self.cfg.paths.data_root) / item.source,
                                    out_dir, mode=item.mode, inference=self.inference,
                                    confidence_threshold=self.confidence_threshold, failures=self.failures,
                                    provenance={"teacher_round": teacher.index + 1, "teacher_key": teacher.key,
                                                "teacher_checkpoint": str(teacher.checkpoint)})
            names.append(name)
        return names

    def round_config(self, index: int, train_sets: list[str]) -> DictConfig:
        """The training config of a round: ``cfg`` with its datasets, run folder and settings."""
        job = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=False))
        job.train_sets = list(train_sets)
        job.run_dir = str(self.round_dir(index))
        job.run_name = f"{self.plan.protocol}-{self.plan.train}-round{index + 1}-{self.run_key.model}"
        job.ckpt_path = None
        job.run_key = self.run_key.as_dict()  # the checkpoint records the cells' key: protocol, not round
        for dotted, value in self.plan.rounds[index].settings:
            OmegaConf.update(job, dotted, value, merge=False, force_add=True)
        return job

    def train_round(self, index: int, records: Sequence[RoundRecord]) -> RoundRecord:
        spec = self.plan.rounds[index]
        train_sets = self.datasets_for(index, records)
        job = self.round_config(index, train_sets)
        log.info("round %d (%s): training on %s -> %s", index + 1, spec.name, ", ".join(train_sets), job.run_dir)
        result = train(job)  # a round already trained to max_epochs returns its stored result at once
        checkpoint = result.best_checkpoint or result.last_checkpoint
        record = RoundRecord(index, spec.name, self.keys[index], Path(job.run_dir), train_sets, checkpoint, False)
        write_text_atomic(record.run_dir / ROUND_MARKER, json.dumps({
            "round": index + 1, "name": spec.name, "key": record.key, "protocol": self.plan.protocol,
            "train": self.plan.train, "train_sets": train_sets, "settings": [list(s) for s in spec.settings],
            "checkpoint": str(checkpoint), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        return record

    def evaluate_round(self, record: RoundRecord, test_sets: Sequence[str] | None = None) -> list[Path]:
        """Cells of a round's model in ``{round}/results`` (finished cells are skipped); returns them."""
        evaluation = evaluate(load_model(record.checkpoint), list(test_sets or self.plan.test_sets),
                              self.cfg.paths.data_root, record.run_dir / "results", key=self.run_key,
                              metric=self.metric["name"], classes=self.metric.get("classes", "aeval8"),
                              inference=self.inference, failures=self.failures)
        return evaluation.written + evaluation.skipped

    def publish(self, record: RoundRecord, cells: Sequence[Path]) -> list[Path]:
        """Copy a round's cells (summary.json, cases.csv) to ``paths.results_root`` under the same key."""
        published = []
        source_root = record.run_dir / "results"
        for cell in cells:
            target = Path(self.cfg.paths.results_root) / cell.relative_to(source_root)
            for path in sorted(cell.iterdir()):
                if path.is_file():
                    with atomic_path(target / path.name) as tmp:
                        tmp.write_bytes(path.read_bytes())
            published.append(target)
        return published


def run_rounds(cfg: DictConfig, plan: ProtocolPlan, *, test_sets: Sequence[str] | None = None,
             failures: FailureLog | None = None) -> ProtocolOutcome:
    """Train every round of ``plan`` (resuming), evaluate the final model and publish its cells."""
    runner = RoundRunner(cfg, plan, failures)
    outcome = ProtocolOutcome(plan, failures=runner.failures, run_key=runner.run_key)
    stop_after = cfg.protocol.get("stop_after_round")
    outcome.rounds = runner.run(stop_after)
    if len(outcome.rounds) == len(plan.rounds):
        final = outcome.rounds[-1]
        outcome.cells = runner.publish(final, runner.evaluate_round(final, test_sets))
    return outcome
