"""Every config a user can name composes: each ``experiment=`` file (as ``--cfg job`` shows it, resolved), each
launcher (as ``--cfg hydra`` shows it), with the SLURM defaults taken from the trainer and the loader."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import aeval  # noqa: F401  (registers the resolvers the configs use, as every aeval command does)

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("grid", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = composed(f"experiment={experiment}", "paths.root_dir=/data/aeval")
    job = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (run hash, joins, paths)
    assert job["run_dir"].startswith("/data/aeval/outputs/logs/train/")
    assert set(job["grid"]["test_sets"]) <= set(job["datasets"])
    rows = job["grid"]["rows"] or [{"protocol": job["protocol"]["name"], "dataset": t}
                                   for t in job["grid"]["train_sets"]]
    for row in rows:
        assert row["protocol"] in job["protocols"] and row.get("dataset", "flare22") in job["datasets"]


def test_fan_out_experiments_sweep_over_rows_and_sizes():
    grid = composed("experiment=grid", hydra=True).hydra.sweeper.params
    assert grid == {"grid.row": "flare22,amos_ct,word,totalseg"}
    sizes = composed("experiment=model_sizes", hydra=True).hydra.sweeper.params
    assert sizes["model"] == "stu_s,stu_b,stu_l,stu_h" and sizes["grid.row"] == grid["grid.row"]


@pytest.mark.parametrize(("trainer", "gpus"), [("gpu", 1), ("cpu", 0), ("default", 1)])
def test_slurm_launcher_takes_gpus_and_cpus_from_the_run(trainer, gpus):
    launcher = composed("hydra/launcher=slurm", f"trainer={trainer}", "data.num_workers=6", hydra=True).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (gpus, max(gpus, 1), 8)
    assert launcher.nodes == 1 and launcher.timeout_min >= 24 * 60 and launcher.max_num_timeout > 0
    ddp = composed("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", hydra=True).hydra.launcher
    assert (ddp.gpus_per_node, ddp.tasks_per_node) == (4, 4)


def test_submitit_local_launcher_composes():
    launcher = composed("hydra/launcher=submitit_local", hydra=True).hydra.launcher
    assert launcher._target_.endswith("LocalLauncher")


def test_multirun_callbacks_are_registered():
    callbacks = composed(hydra=True).hydra.callbacks
    assert callbacks.job_outcomes._target_ == "aeval.entry.JobOutcomes"
    assert callbacks.grid_report._target_ == "aeval.orchestration.multirun.GridReport"


def test_run_hash_covers_what_changes_the_weights_and_nothing_else():
    from aeval.keys import run_hash

    def hashed(*overrides: str) -> str:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            return run_hash(compose("train", overrides=list(overrides)))

    base = hashed()
    for changes in (["seed=1"], ["optim.lr=0.001"], ["optim=adamw"], ["loss=marginal"], ["trainer.max_epochs=10"],
                    ["model=stu_s"], ["data.batch_size=4"], ["plan.patch_size=[64,64,64]"]):
        assert hashed(*changes) != base, changes
    for same in (["paths.root_dir=/elsewhere"], ["logger=csv"], ["trainer.enable_progress_bar=false"],
                 ["data.num_workers=0"], ["data.augment_on=gpu"], ["trainer.max_steps=5"], ["dataset=amos_ct"],
                 ["trainer=gpu"]):
        assert hashed(*same) == base, same
    pseudo = ["protocol=pseudo_label"]
    assert hashed(*pseudo, "protocol.confidence_threshold=0.5") != hashed(*pseudo, "protocol.confidence_threshold=0.9")
    assert hashed(*pseudo, "protocol.stop_after_round=1") == hashed(*pseudo)
