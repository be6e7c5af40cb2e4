"""Every config a user can name composes: each ``experiment=`` file (as ``--cfg job`` shows it, resolved), each
launcher (as ``--cfg hydra`` shows it), with the SLURM defaults taken from the trainer and the loader."""

from __future__ import annotations

import importlib
import inspect
import re

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


# --- every key is read ---------------------------------------------------------------------------------------
# Keys of mappings the code indexes by a runtime value (a protocol's datasets by modality, the dataset registry
# by name) are not spelled in the code.
DYNAMIC_MAPPINGS = ("protocols.multimodal.datasets.", "protocol.datasets.")
VERB_OVERRIDES = {"predict": ["ckpt_path=x", "input=x", "output=x"], "score": ["pred_dir=x", "gt_dir=x"],
                  "evaluate": ["ckpt_path=x"]}
PACKAGE = CONF_DIR.parent


def _code_reads() -> tuple[str, set[str]]:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    yaml_text = "\n".join(p.read_text() for p in CONF_DIR.rglob("*.yaml"))
    interpolated = set(re.findall(r"\$\{(?:[a-z_]+:)?([A-Za-z0-9_.]+)", yaml_text))
    return source, interpolated


def _target_parameters(node: dict) -> set[str] | None:
    """The parameters ``hydra.utils.instantiate`` passes a node's keys to (None: any keyword is taken)."""
    module, _, name = node["_target_"].rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _unread(node: dict, path: str, source: str, interpolated: set[str], accepted: set[str] | None) -> list[str]:
    found = []
    for key, child in node.items():
        full = f"{path}.{key}" if path else str(key)
        if key.startswith("_") and key.endswith("_"):
            continue
        if isinstance(child, dict):
            params = _target_parameters(child) if "_target_" in child else set()
            found += _unread(child, full, source, interpolated, params)
            continue
        spelled = re.search(rf"""(\.{key}\b|["']{key}["']|\b{key}=|^\s+{key}:)""", source, re.M)
        taken = accepted is None or key in accepted
        if not (spelled or taken or full in interpolated or full.startswith(DYNAMIC_MAPPINGS)):
            found.append(full)
    return found


@pytest.mark.parametrize("verb,experiment", [(verb, None) for verb in
                                             ("train", "grid", "evaluate", "predict", "score", "report",
                                              "prepare", "export")]
                         + [("grid", e) for e in EXPERIMENTS])
def test_every_config_key_is_read_by_the_code(verb, experiment):
    """A key nobody reads is a setting that silently does nothing: each composed key is spelled in the package's
    code, taken by the ``_target_`` it configures, or interpolated by another key."""
    overrides = VERB_OVERRIDES.get(verb, []) + ([f"experiment={experiment}"] if experiment else [])
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose(verb, overrides=overrides)
    job = OmegaConf.to_container(cfg, resolve=False)
    source, interpolated = _code_reads()
    assert _unread(job, "", source, interpolated, set()) == []


def test_an_unread_key_is_caught():
    source, interpolated = _code_reads()
    node = {"trainer": {"max_epochs": 1, "max_epohcs": 1},
            "optim": {"_target_": "torch.optim.SGD", "lr": 0.01, "nesterov_momentum": 0.9}}
    assert _unread(node, "", source, interpolated, set()) == ["trainer.max_epohcs", "optim.nesterov_momentum"]


def test_inference_defaults_are_written_once():
    """conf/inference/default.yaml shows the predictor's own defaults (what a key left out gets), key for key."""
    from aeval.prediction import INFERENCE_SETTINGS, PROCESS_SETTINGS, predictor_defaults

    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "inference" / "default.yaml"))
    assert set(config) == set(INFERENCE_SETTINGS) | set(PROCESS_SETTINGS)
    defaults = predictor_defaults()
    assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in defaults} == defaults
