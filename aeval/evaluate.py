"""``python -m aeval.evaluate`` / ``aeval-evaluate``: predict and score a checkpoint on every test set.

    aeval-evaluate ckpt_path=<run>/checkpoints/best.ckpt test_sets=[flare22,amos_ct,word,totalseg,btcv]

Cells are keyed by the run the checkpoint records (protocol / training sets / model / run hash); finished cells
are skipped and predictions on disk reused, so a crashed evaluation resumes where it stopped.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from aeval.cpu import set_torch_threads
from aeval.entry import hydra_entry
from aeval.errors import FailureLog
from aeval.evaluation import checkpoint_key, evaluate
from aeval.models.load import load_model

log = logging.getLogger(__name__)


def evaluate_job(cfg: DictConfig) -> int:
    """Evaluate one checkpoint on the test sets; the exit code is 2 when any case failed."""
    set_torch_threads(cfg.inference.get("threads"))  # null: OMP_NUM_THREADS, else the free cores
    model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"), label_system=cfg.get("model_labels"),
                       configuration=cfg.get("configuration"), reorient=cfg.get("reorient"))
    key = checkpoint_key(model, {"protocol": cfg.protocol_name, "train": cfg.train_name, "model": cfg.model_name,
                                 "run": cfg.get("run")}, cfg.ckpt_path)
    failures = FailureLog()
    result = evaluate(model, list(cfg.test_sets), cfg.paths.data_root, cfg.paths.results_root, key=key,
                      metric=cfg.metric.name, classes=cfg.metric.classes,
                      inference=OmegaConf.to_container(cfg.inference, resolve=True),
                      overwrite=cfg.overwrite, num_workers=cfg.num_workers, failures=failures)
    log.info("%d cell(s) written, %d skipped; %s", len(result.written), len(result.skipped), failures.summary())
    return failures.exit_code()


main = hydra_entry("evaluate", evaluate_job)

if __name__ == "__main__":
    main()
