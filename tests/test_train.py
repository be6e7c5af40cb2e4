"""``aeval.train`` end to end on a tiny synthetic dataset (STU-Net tiny, 16^3 patches, 2 iterations per
epoch): the CPU run and its files, validation Dice against a numpy recomputation, exact resume, a NaN loss,
W&B offline, the CLI, and two gloo processes (``trainer=ddp_cpu``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import CONF_DIR, FAST_PLAN
from hydra import compose, initialize_config_dir
from matplotlib import image as mpimg
from omegaconf import DictConfig, OmegaConf
from test_preprocess import write_unified_dataset

from aeval.data.datamodule import AEvalDataModule
from aeval.fit import train
from aeval.keys import run_hash
from aeval.labels import FLARE22_ORGANS
from aeval.module import NonFiniteLossError, STUNetModule

REPO = Path(__file__).resolve().parents[1]
CASES = [{"shape": (40, 40, 32), "spacing": (1.5, 1.5, 2.0)}] * 3  # 2 train + 1 validation case
ITERATIONS = 2
EPOCHS = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A unified ``flare22`` dataset; its plan and cache are built by the first run and reused."""
    root = tmp_path_factory.mktemp("train_data")
    write_unified_dataset(root / "unified", "flare22", CASES)
    return root


@pytest.fixture(scope="module", autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # `trainer.deterministic=true` sets it for the process


def compose_train(data_root: Path, log_dir: Path, *overrides: str) -> DictConfig:
    settings = [f"paths.data_root={data_root}/unified", f"paths.preprocessed_root={data_root}/preprocessed",
                f"paths.log_dir={log_dir}", "model=stu_tiny", "trainer=cpu", "logger=none",
                "plan.patch_size=[16,16,16]", f"data.iterations_per_epoch={ITERATIONS}", "data.num_workers=0",
                f"trainer.max_epochs={EPOCHS}", "preprocess_workers=1", "trainer.deterministic=true", FAST_PLAN,
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=[*settings, *overrides])


class LearningRates(L.Callback):
    """(epoch, step, lr) at every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


class RankBatches(L.Callback):
    """Each process appends the patches it trains and validates on to ``rank{r}.txt`` (picklable for
    ``ddp_spawn``)."""

    def _write(self, trainer, stage: str, batch) -> None:
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.txt"
        with path.open("a") as out:
            out.write(f"{stage} {trainer.current_epoch} {batch['case']} {float(batch['image'].double().sum()):.6f}\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._write(trainer, "val", batch)


@pytest.fixture(scope="module")
def two_epochs(data_root, tmp_path_factory):
    """One uninterrupted CPU run of two epochs."""
    cfg = compose_train(data_root, tmp_path_factory.mktemp("two_epochs"))
    rates = LearningRates()
    return cfg, train(cfg, [rates]), rates.seen


def reference_validation_dice(cfg: DictConfig, checkpoint: Path, batch_size: int) -> dict[str, float]:
    """Per-organ Dice over the validation patches, recomputed with numpy from the checkpoint's predictions."""
    plan_dir = Path(cfg.paths.preprocessed_root) / "flare22"
    plan = json.loads((plan_dir / "plans.json").read_text())
    data = {**OmegaConf.to_container(cfg.data, resolve=True), "batch_size": batch_size}
    datamodule = AEvalDataModule([plan_dir / "flare22"], plan, seed=cfg.seed, **data)
    module = STUNetModule.load_from_checkpoint(checkpoint, map_location="cpu")
    module.eval()
    module.setup("validate")  # the same CPU memory format as in training
    inter, pred, true = (np.zeros(14, np.int64) for _ in range(3))
    for batch in datamodule.val_dataloader():
        with torch.no_grad():
            prediction = module.net(module._input(batch))[0].argmax(1).numpy()
        target = batch["target"][:, 0].numpy()
        for c in range(1, 14):
            inter[c] += np.sum((prediction == c) & (target == c))
            pred[c] += np.sum(prediction == c)
            true[c] += np.sum(target == c)
    return {name: 2 * inter[c] / (pred[c] + true[c]) for c, name in enumerate(FLARE22_ORGANS, 1) if true[c]}


def assert_logged_dice_matches(metrics: dict[str, float], reference: dict[str, float]) -> None:
    logged = {k.removeprefix("val/dice_"): v for k, v in metrics.items() if k.startswith("val/dice_")}
    assert logged.pop("mean") == pytest.approx(np.mean(list(reference.values())), abs=1e-6)
    assert logged.keys() == reference.keys() and len(reference) >= 3
    for name, value in reference.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name


def test_cpu_run_writes_checkpoints_result_and_follows_the_poly_schedule(two_epochs):
    cfg, result, rates = two_epochs
    run_dir = Path(cfg.paths.log_dir) / "train" / "individual" / "flare22" / "stu_tiny" / run_hash(cfg)
    assert result.run_dir == run_dir and (run_dir / "config.yaml").exists()
    stored = json.loads((run_dir / "result.json").read_text())
    assert stored["epochs"] == EPOCHS and stored["global_step"] == EPOCHS * ITERATIONS
    assert result.last_checkpoint == run_dir / "checkpoints" / "last.ckpt" and result.last_checkpoint.exists()
    assert result.best_checkpoint == run_dir / "checkpoints" / "best.ckpt" and result.best_checkpoint.exists()
    assert np.isfinite(stored["metrics"]["train/loss_epoch"]) and 0 <= stored["metrics"]["val/dice_mean"] <= 1
    # poly: lr * (1 - epoch / max_epochs)^0.9 for every batch of the epoch
    assert [(e, s) for e, s, _ in rates] == [(e, e * ITERATIONS + i) for e in range(EPOCHS) for i in range(ITERATIONS)]
    for epoch, _, lr in rates:
        assert lr == pytest.approx(0.01 * (1 - epoch / EPOCHS) ** 0.9, rel=1e-12)
    checkpoint = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == EPOCHS * ITERATIONS
    assert checkpoint["hyper_parameters"]["run_key"] == {"protocol": "individual", "train": "flare22",
                                                         "model": "stu_tiny", "run": run_hash(cfg)}
    assert checkpoint["hyper_parameters"]["plan"]["patch_size"] == [16, 16, 16]


def test_validation_dice_per_organ_matches_numpy(two_epochs):
    cfg, result, _ = two_epochs
    reference = reference_validation_dice(cfg, result.last_checkpoint, batch_size=cfg.data.batch_size)
    assert_logged_dice_matches(result.metrics, reference)


def test_resume_after_an_interrupted_epoch_is_exact(two_epochs, data_root, tmp_path):
    cfg, uninterrupted, uninterrupted_rates = two_epochs
    stopped = train(compose_train(data_root, tmp_path, "trainer.max_steps=2"))  # stops after epoch 1 of 2
    assert (stopped.epochs, stopped.global_step) == (1, ITERATIONS)
    rates = LearningRates()
    resumed = train(compose_train(data_root, tmp_path), [rates])  # same run folder: resumes from last.ckpt
    assert (resumed.epochs, resumed.global_step) == (EPOCHS, EPOCHS * ITERATIONS)
    assert rates.seen == uninterrupted_rates[ITERATIONS:]  # only epoch 2 ran, at epoch 2's rate and steps
    a = torch.load(uninterrupted.last_checkpoint, map_location="cpu", weights_only=False)
    b = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] == b["optimizer_states"][0]["param_groups"][0]["lr"]
    # same seeds per epoch, restored momentum: bitwise equal weights and optimizer state on the CPU
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for index, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer_states"][0]["state"][index]["momentum_buffer"])
    # a finished run returns its stored result without training again
    again = LearningRates()
    assert train(compose_train(data_root, tmp_path), [again]).global_step == EPOCHS * ITERATIONS
    assert again.seen == []


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    compute_loss = STUNetModule.compute_loss

    def nan_in_second_epoch(self, outputs, targets):
        loss = compute_loss(self, outputs, targets)
        return loss * float("nan") if self.training and self.current_epoch == 1 else loss

    monkeypatch.setattr(STUNetModule, "compute_loss", nan_in_second_epoch)
    cfg = compose_train(data_root, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan .*at epoch 1 \(0-based\), step 2.*last\.ckpt"):
        train(cfg)
    run_dir = Path(cfg.run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, ITERATIONS)  # the end of epoch 1 of 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert not (run_dir / "result.json").exists()


def test_wandb_runs_offline_without_network_or_prompt(data_root, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_DISABLE_CODE", "NETRC"):
        monkeypatch.setenv(name, "")  # recorded, so the values the run sets are undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings: not configured
    cfg = compose_train(data_root, tmp_path / "logs", "logger=wandb", "trainer.max_epochs=1")
    result = train(cfg)
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not list((tmp_path / "logs" / "wandb").glob("run-*"))
    history = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss_epoch", b"val/dice_mean", b"val/dice_liver", b"lr-SGD", b"val/overlay"):
        assert key in history, key
    overlays = list((runs[0] / "files" / "media" / "images").rglob("overlay_*.png"))
    assert len(overlays) == 1
    assert mpimg.imread(overlays[0]).shape[:2] == (16, 48)  # image | labels | prediction, 16^3 patch
    assert result.metrics["val/dice_mean"] >= 0


def test_cli_trains_and_writes_the_result(data_root, tmp_path):
    overrides = [f"paths.data_root={data_root}/unified", f"paths.preprocessed_root={data_root}/preprocessed",
                 f"paths.log_dir={tmp_path}", "model=stu_tiny", "trainer=cpu", "logger=csv",
                 "plan.patch_size=[16,16,16]", FAST_PLAN, "data.iterations_per_epoch=1", "data.num_workers=0",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    completed = subprocess.run([sys.executable, "-m", "aeval.train", *overrides], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run_dir,) = (tmp_path / "train" / "individual" / "flare22" / "stu_tiny").iterdir()
    stored = json.loads((run_dir / "result.json").read_text())
    assert (stored["epochs"], stored["global_step"]) == (1, 1)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert OmegaConf.load(run_dir / "config.yaml").plan.patch_size == [16, 16, 16]  # the resolved config
    assert list((run_dir / "csv").rglob("metrics.csv"))
    assert f"trained individual-flare22-stu_tiny-{run_dir.name}" in completed.stdout + completed.stderr


def test_ddp_cpu_two_processes_draw_different_patches_and_gather_the_dice(data_root, tmp_path):
    cfg = compose_train(data_root, tmp_path, "trainer=ddp_cpu", "trainer.max_epochs=1",
                        "trainer.deterministic=false")
    result = train(cfg, [RankBatches()])
    assert (result.epochs, result.global_step) == (1, ITERATIONS)  # steps per process
    lines = {rank: (Path(cfg.run_dir) / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    train_patches = {rank: [line for line in lines[rank] if line.startswith("train")] for rank in (0, 1)}
    val_patches = {rank: [line for line in lines[rank] if line.startswith("val")] for rank in (0, 1)}
    assert len(train_patches[0]) == len(train_patches[1]) == ITERATIONS
    assert not set(train_patches[0]) & set(train_patches[1])  # each process samples its own patches
    assert len(val_patches[0]) == len(val_patches[1]) == 1  # the two validation patches, one per process
    assert val_patches[0] != val_patches[1]
    # the logged Dice is over both processes' patches: recompute over all of them, one patch per batch
    assert_logged_dice_matches(result.metrics, reference_validation_dice(cfg, result.last_checkpoint, batch_size=1))
