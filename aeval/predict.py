"""``python -m aeval.predict`` / ``aeval-predict``: segment NIfTI files with a checkpoint, written in each input's
original geometry.

    aeval-predict ckpt_path=outputs/.../last.ckpt input=scans/ output=preds/
    aeval-predict ckpt_path=checkpoint_final.pth plan=plans.json input=ct.nii.gz output=preds/ to_labels=aeval8

Our Lightning checkpoints carry their plan; official STU-Net checkpoints (``.model`` / ``.pth``) come with their
nnU-Net plan, or an aeval ``plans.json`` and ``size`` (see :func:`aeval.models.load.load_model`).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from aeval.cpu import set_torch_threads
from aeval.entry import hydra_entry
from aeval.errors import FailureLog
from aeval.models.load import load_model
from aeval.prediction import list_inputs, predict_files

log = logging.getLogger(__name__)


def predict_job(cfg: DictConfig) -> int:
    """Segment every input; a bad input is one line and the others go on (exit code 2)."""
    set_torch_threads(cfg.inference.get("threads"))  # null: OMP_NUM_THREADS, else the free cores
    failures = FailureLog()
    model = load_model(cfg.ckpt_path, plan=cfg.get("plan"), size=cfg.get("size"), label_system=cfg.get("model_labels"),
                       configuration=cfg.get("configuration"), reorient=cfg.get("reorient"))
    written = predict_files(model, list_inputs(cfg.input, failures), cfg.output, to_system=cfg.get("to_labels"),
                            inference=OmegaConf.to_container(cfg.inference, resolve=True), failures=failures)
    log.info("%d segmentation(s) written to %s; %s", len(written), cfg.output, failures.summary())
    return failures.exit_code()


main = hydra_entry("predict", predict_job)

if __name__ == "__main__":
    main()
