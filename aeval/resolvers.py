"""The OmegaConf resolvers the configs use; registered once when :mod:`aeval` is imported.

- ``${join:${train_sets}}``: ``flare22+amos_ct+totalseg``, the folder name of a run on several datasets.
- ``${model_name:${model.size}}``: ``stu_l``, the model's name in folders and cells (:func:`aeval.keys.model_name`).
- ``${run_hash:}``: the run's hash (:func:`aeval.keys.run_hash`) from the config it appears in.
- ``${slurm_gpus:${trainer.accelerator},${trainer.devices}}``: GPUs a SLURM job asks for (0 for CPU runs).
- ``${plus:${data.num_workers},2}``: integer sum (CPUs of a job: loader workers plus the main processes);
  ``${max_one:...}``: at least 1 (SLURM tasks of a CPU job).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from aeval.keys import model_name, run_hash

__all__ = ["register"]


def slurm_gpus(accelerator: Any, devices: Any) -> int:
    """GPUs a SLURM job asks for: the trainer's devices, 0 on CPU."""
    if str(accelerator) == "cpu":
        return 0
    try:
        return max(int(devices), 1)  # -1 ("all visible") cannot be asked of SLURM: set trainer.devices=N
    except (TypeError, ValueError):
        return 1


def register() -> None:
    """Register the resolvers (idempotent)."""
    resolvers = {"join": lambda items: "+".join(map(str, items)),
                 "model_name": lambda size: model_name(str(size)),
                 "run_hash": lambda *, _root_: run_hash(_root_),
                 "slurm_gpus": slurm_gpus,
                 "max_one": lambda value: max(int(value), 1),
                 "plus": lambda *values: sum(int(v) for v in values)}
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
