"""Issue 12: every failure a real download, a cluster or a typo produces ends in one line, nothing is lost, and
a re-run repairs what an interrupted run left (the matrix is in experiments/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, FAST_INTENSITY_SAMPLES, FAST_PLAN, write_nifti
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_preprocess import write_unified_dataset

import aeval.data.convert as convert_module
import aeval.results as results_module
import aeval.scoring as score_module
from aeval.data.convert import convert_dataset
from aeval.data.planner import fingerprint_datasets
from aeval.data.prepare import prepare
from aeval.data.registry import DatasetSpec
from aeval.errors import CaseError, FailureLog
from aeval.fit import resume_checkpoint, train
from aeval.keys import CellKey
from aeval.models.load import load_model
from aeval.models.stunet import build_stunet
from aeval.parallel import WORKER_DIED
from aeval.prediction import list_inputs
from aeval.reporting.build import build_report
from aeval.results import cell_finished, read_cells, write_cell
from aeval.scoring import score_folder
from aeval.tracking import ensure_wandb_mode
from aeval.validate import ConfigError, check_output_folder, check_train_config

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 10, 8)
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def dataset_config(name: str, raw_root: Path) -> dict:
    dataset = OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")
    cfg = OmegaConf.merge({"paths": {"raw_root": str(raw_root)}}, {"d": dataset})
    return OmegaConf.to_container(cfg, resolve=True)["d"]


def pair(image_path: Path, label_path: Path | None, seed: int, max_label: int = 13, label_affine=AFFINE) -> None:
    rng = np.random.default_rng(seed)
    write_nifti(image_path, rng.normal(0, 100, SHAPE).astype(np.int16), AFFINE)
    if label_path is not None:
        write_nifti(label_path, rng.integers(0, max_label + 1, SHAPE).astype(np.uint8), label_affine)


def flare_raw(raw: Path, test_folder: str = "Validation", n_test: int = 2) -> Path:
    train = raw / "FLARE22/Training/FLARE22_LabeledCase50"
    for i in (1, 2):
        pair(train / f"images/FLARE22_Tr_{i:04d}_0000.nii.gz", train / f"labels/FLARE22_Tr_{i:04d}.nii.gz", i)
    for i in range(1, n_test + 1):
        folder = raw / "FLARE22" / test_folder
        pair(folder / f"images/FLARE22_Ts_{i:04d}_0000.nii.gz", folder / f"labels/FLARE22_Ts_{i:04d}.nii.gz", 10 + i)
    return raw


# --- worker pools: one bad case, a killed worker ------------------------------------------------------------

def test_prepare_default_workers_one_bad_case_the_rest_converted(tmp_path):
    workers = OmegaConf.load(CONF_DIR / "prepare.yaml").num_workers
    assert workers == 2  # the default a new user runs with
    raw = flare_raw(tmp_path / "raw")
    train = raw / "FLARE22/Training/FLARE22_LabeledCase50"
    pair(train / "images/FLARE22_Tr_0003_0000.nii.gz", None, 3)  # label missing
    pair(train / "images/FLARE22_Tr_0004_0000.nii.gz", train / "labels/FLARE22_Tr_0004.nii.gz", 4,
         label_affine=np.diag([1.0, 1.0, 4.0, 1.0]))  # label on another grid
    summaries, failures = prepare({"flare22": dataset_config("flare22", raw)}, tmp_path / "u", num_workers=workers)
    converted = sorted(c.case for c in summaries[0].cases)
    assert converted == ["FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Ts_0001", "FLARE22_Ts_0002"]
    assert len(failures.failures) == 2 and failures.exit_code() == 2
    assert any(line.endswith("labels/FLARE22_Tr_0003.nii.gz: file not found") for line in failures.failures)
    assert any("FLARE22_Tr_0004.nii.gz: affine does not match" in line for line in failures.failures)
    out = tmp_path / "u/flare22"
    assert not list(out.rglob("FLARE22_Tr_0003*")) and not list(out.rglob("FLARE22_Tr_0004*"))


def test_fingerprint_with_two_workers_names_the_bad_case(tmp_path):
    root = tmp_path / "unified"
    dataset = write_unified_dataset(root, "flare22", [{"shape": (12, 12, 8), "spacing": (1.0, 1.0, 2.0)}] * 3)
    (dataset / "labelsTr/flare22_001.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(RuntimeError, match=r"1 failed:\n  .*labelsTr/flare22_001.nii.gz: unreadable"):
        fingerprint_datasets([dataset], num_workers=2, max_intensity_samples=FAST_INTENSITY_SAMPLES)


def _score_pair_killing_case_1(pred_path, gt_path, *args):
    if "case_001" in Path(gt_path).name:
        os._exit(137)  # an OOM kill of this worker
    return REAL_SCORE_PAIR(pred_path, gt_path, *args)


REAL_SCORE_PAIR = score_module._score_pair


def _score_folders(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for i in range(n):
        labels = np.zeros((10, 10, 6), np.uint8)
        labels[2:6, 2:6, 1:5] = 1 + i % 8
        write_nifti(gt_dir / f"case_{i:03d}.nii.gz", labels, AFFINE)
        write_nifti(pred_dir / f"case_{i:03d}.nii.gz", labels, AFFINE)
    return pred_dir, gt_dir


def test_score_survives_a_killed_worker(tmp_path, monkeypatch):
    pred_dir, gt_dir = _score_folders(tmp_path)
    monkeypatch.setattr(score_module, "_score_pair", _score_pair_killing_case_1)  # inherited by forked workers
    result = score_folder(pred_dir, gt_dir, "aeval8", "aeval8", out_dir=tmp_path / "out", num_workers=2,
                          progress=False, quiet=True)
    assert sorted({r["case"] for r in result.rows}) == ["case_000", "case_002", "case_003"]
    assert [str(f) for f in result.failures] == [f"{pred_dir / 'case_001.nii.gz'}: {WORKER_DIED}"]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert (summary["n_cases"], summary["n_failed"], summary["n_expected"]) == (3, 1, 4)
    assert summary["mean_dsc"] == 1.0


# --- nothing half-written -----------------------------------------------------------------------------------

def test_a_failed_label_write_leaves_no_image_behind(tmp_path, monkeypatch):
    raw = flare_raw(tmp_path / "raw", n_test=1)
    copy = convert_module._copy_atomic

    def disk_full_on_one_label(source, target):
        if target.name == "FLARE22_Tr_0002.nii.gz":
            raise OSError(errno.ENOSPC, "No space left on device")
        copy(source, target)

    monkeypatch.setattr(convert_module, "_copy_atomic", disk_full_on_one_label)
    failures = FailureLog(quiet=True)
    summary = convert_dataset(DatasetSpec.from_config(dataset_config("flare22", raw)), tmp_path / "u",
                              failures=failures)
    assert sorted(c.case for c in summary.cases) == ["FLARE22_Tr_0001", "FLARE22_Ts_0001"]
    assert len(failures.failures) == 1 and "No space left on device" in failures.failures[0]
    out = tmp_path / "u/flare22"
    assert not list(out.rglob("FLARE22_Tr_0002*"))  # neither the image nor the label
    assert json.loads((out / "splits.json").read_text())["train"] == ["FLARE22_Tr_0001"]


def test_stale_temporaries_are_removed_on_the_next_run(tmp_path):
    raw = flare_raw(tmp_path / "raw", n_test=1)
    images = tmp_path / "u/flare22/imagesTr"
    images.mkdir(parents=True)
    stale = images / ".FLARE22_Tr_0001_0000.k3j2.tmp.nii.gz"
    fresh = images / ".FLARE22_Tr_0002_0000.x8q1.tmp.nii.gz"  # maybe another process is writing it
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    convert_dataset(DatasetSpec.from_config(dataset_config("flare22", raw)), tmp_path / "u")
    assert not stale.exists() and fresh.exists()


def test_cases_csv_without_summary_is_not_a_finished_cell(tmp_path, monkeypatch):
    key = CellKey("individual", "flare22", "stu_l", "r1", "btcv", "aeval")
    write_atomic = results_module.write_text_atomic

    def disk_full_on_summary(path, text):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_atomic(path, text)

    monkeypatch.setattr(results_module, "write_text_atomic", disk_full_on_summary)
    rows = [{"case": "a", "organ": "liver", "dsc": 0.9, "nsd": 0.8}]
    with pytest.raises(OSError):
        write_cell(tmp_path, key, {"mean_dsc": 0.9, "mean_nsd": 0.8, "n_cases": 1}, rows)
    folder = tmp_path / "individual/flare22/stu_l/r1/btcv/aeval"
    assert (folder / "cases.csv").exists() and not (folder / "summary.json").exists()
    assert not cell_finished(tmp_path, key) and read_cells(tmp_path) == []  # re-run redoes it; report ignores it
    assert not list(folder.glob(".*tmp*"))


# --- checkpoints ----------------------------------------------------------------------------------------------

def test_a_truncated_last_ckpt_is_set_aside_and_the_newest_readable_one_resumes(tmp_path, caplog):
    folder = tmp_path / "run/checkpoints"
    folder.mkdir(parents=True)
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(3)}}, folder / "best.ckpt")
    torch.save({"epoch": 5, "state_dict": {"w": torch.ones(300)}}, folder / "last.ckpt")
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # killed during the copy
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "ckpt_path": None})
    assert resume_checkpoint(cfg) == str(folder / "best.ckpt")
    assert not (folder / "last.ckpt").exists() and len(list(folder.glob("last.ckpt.corrupt-*"))) == 1
    assert "unreadable checkpoint" in caplog.text
    (folder / "best.ckpt").write_bytes(b"PK\x03\x04 not really")
    assert resume_checkpoint(cfg) is None  # nothing readable: starts over
    assert "training starts over" in caplog.text


def _tiny_plan() -> dict:
    return {"hash": "x", "datasets": [{"name": "flare22", "modality": "CT", "label_system": "flare22"}],
            "target_spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "zscore"}, "patch_size": [16, 16, 16],
            "pool_op_kernel_sizes": [[2, 2, 2]] * 5}


def _lightning_checkpoint(path: Path, weights: dict) -> Path:
    torch.save({"hyper_parameters": {"model": {"size": "tiny", "num_classes": 14}, "plan": _tiny_plan()},
                "state_dict": {f"net.{k}": v for k, v in weights.items()}}, path)
    return path


def test_nan_weights_are_refused(tmp_path):
    weights = build_stunet("tiny", 1, 14).state_dict()
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    with pytest.raises(CaseError, match=r"nan\.ckpt: \d+ of \d+ weight tensors hold NaN/inf values"):
        load_model(_lightning_checkpoint(tmp_path / "nan.ckpt", nan))
    torch.save({"network_weights": nan}, tmp_path / "official.pth")
    with pytest.raises(CaseError, match="official.pth: .*NaN/inf"):
        load_model(tmp_path / "official.pth", plan=_tiny_plan(), size="tiny")
    assert load_model(_lightning_checkpoint(tmp_path / "ok.ckpt", weights)).label_system == "flare22"


def test_a_tampered_checkpoint_names_the_keys(tmp_path):
    weights = build_stunet("tiny", 1, 14).state_dict()
    weights.pop("seg_outputs.0.weight")
    weights["conv_blocks_context.0.0.conv1.weight"] = torch.zeros(4, 2, 3, 3, 3)
    with pytest.raises(CaseError) as err:
        load_model(_lightning_checkpoint(tmp_path / "t.ckpt", weights))
    line = str(err.value)
    assert len(line.splitlines()) == 1 and line.startswith(str(tmp_path / "t.ckpt"))
    assert "1 missing: seg_outputs.0.weight" in line
    assert "conv_blocks_context.0.0.conv1.weight [4, 2, 3, 3, 3] vs model [4, 1, 3, 3, 3]" in line


# --- W&B without network ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("network", ["unreachable", "hanging"])
def test_wandb_key_without_network_logs_offline_at_once(monkeypatch, caplog, network):
    def no_network(request, timeout):
        if network == "hanging":  # a resolver or firewall that never answers
            time.sleep(30)
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "fake" * 10)
    start = time.monotonic()
    assert ensure_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    assert time.monotonic() - start < 4
    assert caplog.text.count("unreachable: logging offline") == 1
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice is kept, no check
    assert ensure_wandb_mode() == "online"


# --- layouts that found nothing ------------------------------------------------------------------------------

def test_flare22_tuning_folder_is_the_test_split(tmp_path):
    raw = flare_raw(tmp_path / "raw", test_folder="Tuning", n_test=2)
    summaries, failures = prepare({"flare22": dataset_config("flare22", raw)}, tmp_path / "u")
    assert failures.exit_code() == 0 and summaries[0].per_split() == {"train": 2, "test": 2}


def test_a_split_that_finds_nothing_and_a_raw_root_without_datasets_fail(tmp_path):
    raw = flare_raw(tmp_path / "raw", test_folder="Validation_renamed")
    summaries, failures = prepare({"flare22": dataset_config("flare22", raw)}, tmp_path / "u")
    assert summaries[0].per_split() == {"train": 2} and failures.exit_code() == 2
    assert failures.failures == [f"{raw / 'FLARE22'}: dataset 'flare22': no test cases (looked for "
                                 "Validation/images/*_0000.nii.gz or Tuning/images/*_0000.nii.gz)"]
    datasets = {name: dataset_config(name, tmp_path / "elsewhere") for name in ("flare22", "word")}
    summaries, failures = prepare(datasets, tmp_path / "u2")
    assert summaries == [] and failures.exit_code() == 2
    assert "none of the datasets ['flare22', 'word'] found here; set paths.raw_root" in failures.failures[0]


# --- file names -------------------------------------------------------------------------------------------------

def test_upper_case_suffixes_are_scored_and_predicted(tmp_path):
    pred_dir, gt_dir = _score_folders(tmp_path, n=2)
    for path in pred_dir.iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", ".NII.GZ")))
    result = score_folder(pred_dir, gt_dir, "aeval8", "aeval8", progress=False, quiet=True)
    assert result.failures == [] and result.summary["n_cases"] == 2
    assert [p.name for p in list_inputs(pred_dir)] == ["case_000.NII.GZ", "case_001.NII.GZ"]


def test_two_files_of_one_case_are_one_line_and_that_case_fails(tmp_path):
    pred_dir, gt_dir = _score_folders(tmp_path, n=3)
    write_nifti(pred_dir / "case_001_0000.nii.gz", np.zeros((10, 10, 6), np.uint8), AFFINE)
    result = score_folder(pred_dir, gt_dir, "aeval8", "aeval8", progress=False, quiet=True)
    assert sorted({r["case"] for r in result.rows}) == ["case_000", "case_002"]
    assert [str(f) for f in result.failures] == [f"{pred_dir / 'case_001.nii.gz'}: case 'case_001' has 2 files: "
                                                 "case_001.nii.gz, case_001_0000.nii.gz; keep one"]
    failures = FailureLog(quiet=True)
    assert [p.name for p in list_inputs(pred_dir, failures)] == ["case_000.nii.gz", "case_002.nii.gz"]
    assert len(failures.failures) == 1
    with pytest.raises(CaseError, match="has 2 files"):
        list_inputs(pred_dir)


# --- the report ---------------------------------------------------------------------------------------------------

def test_a_cell_with_a_failed_case_is_marked_and_counted(tmp_path):
    rows = [{"case": "a", "organ": "liver", "dsc": 0.9, "nsd": 0.8}]
    for test, counts in (("flare22", {"n_cases": 4, "n_failed": 0, "n_expected": 4}),
                         ("btcv", {"n_cases": 3, "n_failed": 1, "n_expected": 4})):
        write_cell(tmp_path / "results", CellKey("individual", "amos_ct", "stu_l", "r1", test, "aeval"),
                   {"mean_dsc": 0.9, "mean_nsd": 0.8, **counts}, rows)
    report = build_report(read_cells(tmp_path / "results"), tmp_path / "report", figures=False)
    assert "| AMOS CT | 90.00 / 80.00 | 90.00 / 80.00 (n = 3/4) |" in report.text
    assert "Incomplete cells (1, scored on the cases that did not fail; re-run them to complete): " \
           "AMOS CT → BTCV n = 3/4" in report.text
    import csv

    with open(tmp_path / "report/grid.csv", newline="") as handle:
        grid = list(csv.DictReader(handle))
    assert grid[0]["btcv_n"] == "3/4" and grid[0]["flare22_n"] == "4/4" and grid[0]["incomplete"] == "1"
    assert next(r for r in grid if r["label"] == "column mean")["incomplete"] == "1"


# --- configuration checked before the work ------------------------------------------------------------------------

def train_config(tmp_path: Path, *overrides: str):
    data_root = tmp_path / "unified"
    if not (data_root / "flare22").exists():
        write_unified_dataset(data_root, "flare22", [{"shape": (12, 12, 8), "spacing": (1.0, 1.0, 2.0)}] * 2)
    settings = [f"paths.data_root={data_root}", f"paths.preprocessed_root={tmp_path / 'pre'}",
                f"paths.log_dir={tmp_path / 'logs'}", "model=stu_tiny", "trainer=cpu", "logger=none", FAST_PLAN]
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("train", overrides=[*settings, *overrides])


@pytest.mark.parametrize(("override", "message"), [
    ("data.iterations_per_epoch=-5", "data.iterations_per_epoch=-5: it must be an integer >= 1"),
    ("plan.patch_size=[0,32,32]", "plan.patch_size=[0, 32, 32]: it must be three integers >= 1"),
    ("trainer.max_epochs=-3", "trainer.max_epochs=-3: it must be an integer >= 1"),
    ("optim.lr=-1", "optim.lr=-1: it must be a number > 0"),
    ("data.batch_size=0", "data.batch_size=0: it must be an integer >= 1"),
    ("optim._target_=torch.optim.Adamm", "optim._target_=torch.optim.Adamm: cannot be imported"),
    ("optim._target_=torch.nn.Linear", "optim._target_=torch.nn.Linear: not a torch.optim.optimizer.Optimizer"),
    ("trainer.precision=fp16", "trainer.precision=fp16: unknown; known: 32-true"),
    ("model.size=xl", "model.size=xl: unknown; known: b, h, l, s, tiny"),
    ("data.augment_on=tpu", "data.augment_on=tpu: unknown; known: cpu, gpu"),
    ("train_sets=[flare23]", "train_sets: unknown dataset 'flare23'; known: amos_ct"),
    ("train_sets=[word]", "train_sets: dataset 'word' is not converted"),
])
def test_bad_training_config_is_one_line_before_any_work(tmp_path, override, message):
    cfg = train_config(tmp_path, override)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
    assert not (tmp_path / "pre").exists() and not (tmp_path / "logs").exists()  # nothing planned or written


def test_the_shipped_configs_pass_the_check(tmp_path):
    check_train_config(train_config(tmp_path))
    check_train_config(train_config(tmp_path, "optim=adamw", "trainer.precision=bf16-mixed", "model=stu_h"))
    check_train_config(train_config(tmp_path, "loss=marginal"))


def test_an_unknown_optimizer_choice_is_hydras_one_line_listing_the_options(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not find 'optim/adam'") as err:
        train_config(tmp_path, "optim=adam")
    assert "adamw" in str(err.value) and "sgd" in str(err.value)


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"out=.*file.txt: exists and is not a folder"):
        check_output_folder(tmp_path / "file.txt")
    check_output_folder(tmp_path / "new")


def test_cli_train_on_an_unconverted_dataset_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aeval.train", "dataset=word", f"paths.data_root={tmp_path / 'u'}",
                           f"paths.log_dir={tmp_path / 'logs'}", "logger=none", f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert "Traceback" not in output
    assert "train_sets: dataset 'word' is not converted" in output
