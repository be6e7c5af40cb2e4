"""``python -m aeval.train`` / ``aeval-train``: train one model (plan, preprocess, fit; resumable).

    aeval-train dataset=amos_ct model=stu_l trainer=gpu logger=wandb
    aeval-train -m seed=1,2,3                      # one run per seed (the run hash covers the seed)
    aeval-train protocol=joint model=stu_l         # protocols 2-4: every round, then the final model's cells
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from aeval.entry import hydra_entry
from aeval.fit import train
from aeval.module import NonFiniteLossError
from aeval.protocols.run import run_protocol

log = logging.getLogger(__name__)


def train_job(cfg: DictConfig) -> int:
    """Protocol 1 trains one model; protocols 2-4 run their rounds and evaluate the final model."""
    if cfg.protocol.name != "individual":
        return run_protocol(cfg).failures.exit_code()
    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        log.error("training stopped: %s; last good checkpoint: %s", err, last if last.exists() else "none yet")
        return 1
    log.info("trained %s: best %s, last %s", cfg.run_name, result.best_checkpoint, result.last_checkpoint)
    return 0


main = hydra_entry("train", train_job)

if __name__ == "__main__":
    main()
