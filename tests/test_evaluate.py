"""aeval.evaluate: cells with hand-computable scores that aeval.report reads, finished cells skipped and
unfinished ones redone, a missing test set as one failure line, and the CLI keyed by the checkpoint's run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
from conftest import affine_for
from test_predict import RUN_KEY, ellipsoids, hand_plan, identity_model, run_cli, tiny_ct_plan, tiny_module

from aeval.errors import FailureLog
from aeval.evaluation import evaluate
from aeval.keys import CellKey, RunKey
from aeval.labels import remap
from aeval.reporting.build import build_report
from aeval.results import cell_finished, read_cells

SPACING = (1.2, 1.2, 2.5)
KEY = RunKey("individual", "flare22", "stu_tiny", "0123abcd")
# FLARE22 ids: 1 liver, 3 spleen, 9 gallbladder, 13 left kidney; each spans several slices
ORGANS = [(1, (0.38, 0.42, 0.5), (0.26, 0.3, 0.34)), (3, (0.72, 0.7, 0.4), (0.14, 0.16, 0.3)),
          (9, (0.3, 0.78, 0.62), (0.12, 0.12, 0.25)), (13, (0.75, 0.3, 0.55), (0.12, 0.14, 0.3))]



def write_test_set(data_root: Path, name: str, cases: dict[str, tuple[np.ndarray, np.ndarray]],
                   label_system: str = "flare22") -> Path:
    """aeval.data.convert's unified layout, test split only: ``{case: (image, label map)}``."""
    out = data_root / name
    for folder in ("imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    affine = affine_for("LPS", SPACING)
    for case, (image, labels) in cases.items():
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), out / "imagesTs" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), out / "labelsTs" / f"{case}.nii.gz")
    (out / "dataset.json").write_text(json.dumps({"name": name, "modality": "CT", "label_system": label_system,
                                                  "numTraining": 0, "numTest": len(cases)}))
    (out / "splits.json").write_text(json.dumps({"train": [], "test": sorted(cases)}))
    return out


def organ_labels(shape=(36, 32, 14), organs=ORGANS) -> np.ndarray:
    return ellipsoids(shape, organs)


def summary_of(cell: Path) -> dict:
    return json.loads((cell / "summary.json").read_text())


def test_cells_have_the_expected_scores_and_the_report_reads_them(tmp_path):
    """An identity-like model on images that hold their own FLARE22 labels (target spacing = image spacing,
    so the prediction is exact). ``alpha``: ground truth = image, every (case, organ) pair scores 1.
    ``beta``: ground truth in AMOS numbering, and case b0's ground truth lacks the liver the image shows:
    that pair scores 0 (empty GT, non-empty prediction), so the cell is 15/16 in DSC and NSD.
    ``gamma``: one case has NaN intensities: one failure line, the cell holds the other case and is redone
    on the next run. ``missing`` has no data: one failure line, the other cells are written."""
    data_root, results = tmp_path / "unified", tmp_path / "results"
    labels = organ_labels()
    write_test_set(data_root, "alpha", {"a0": (labels, labels), "a1": (labels[::-1].copy(), labels[::-1].copy())})
    no_liver = np.where(labels == 1, 0, labels)
    write_test_set(data_root, "beta", {"b0": (labels, remap(no_liver, "flare22", "amos")),
                                       "b1": (labels, remap(labels, "flare22", "amos"))}, label_system="amos")
    broken = labels.astype(np.float32)
    broken[3, 3, 3] = np.nan
    write_test_set(data_root, "gamma", {"g0": (broken, labels), "g1": (labels, labels)})
    model = identity_model(hand_plan("CT", [1.2, 1.2, 2.5], (16, 16, 16)), levels=(0, 1, 3, 9, 13))
    failures = FailureLog()

    result = evaluate(model, ["alpha", "missing", "beta", "gamma"], data_root, results, key=KEY,
                      inference={"mirror_axes": []}, failures=failures)

    cell = {t: results / "individual" / "flare22" / "stu_tiny" / "0123abcd" / t / "aeval"
            for t in ("alpha", "beta", "gamma")}
    assert result.written == [cell["alpha"], cell["beta"], cell["gamma"]] and result.skipped == []
    assert len(failures.failures) == 2, failures.failures  # no extra "prediction missing" line for g0
    assert failures.failures[0].startswith(str(data_root / "missing")) and "dataset.json" in failures.failures[0]
    assert str(data_root / "gamma" / "imagesTs" / "g0_0000.nii.gz") in failures.failures[1]
    assert "NaN" in failures.failures[1]
    alpha, beta, gamma = (summary_of(cell[t]) for t in ("alpha", "beta", "gamma"))
    assert alpha["mean_dsc"] == pytest.approx(1.0) and alpha["mean_nsd"] == pytest.approx(1.0)
    assert beta["mean_dsc"] == pytest.approx(15 / 16) and beta["mean_nsd"] == pytest.approx(15 / 16)
    assert beta["organs"]["liver"]["dsc"] == pytest.approx(0.5)
    assert CellKey(**{k: beta[k] for k in CellKey.__dataclass_fields__}) == KEY.cell("beta", "aeval")
    assert beta["n_cases"] == beta["n_expected"] == 2
    assert gamma["n_failed"] == 1 and gamma["n_cases"] == 1 and gamma["n_expected"] == 2
    assert not cell_finished(results, KEY.cell("gamma", "aeval")) and cell_finished(results, KEY.cell("alpha", "aeval"))
    with open(cell["beta"] / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 8  # two cases, eight A-Eval organs
    predictions = cell["beta"].parent / "predictions"
    assert sorted(p.name for p in predictions.iterdir()) == ["b0.nii.gz", "b1.nii.gz"]

    problems: list[str] = []
    cells = read_cells(results, problems)
    grid = {c["test"]: c for c in cells if c["organ"] is None}
    assert grid["alpha"]["dsc"] == pytest.approx(100) and grid["beta"]["nsd"] == pytest.approx(93.75)
    report = build_report(cells, tmp_path / "report", figures=False)
    with open(tmp_path / "report" / "grid.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["train"] == "flare22")
    assert float(row["alpha_dsc"]) == pytest.approx(100) and float(row["beta_dsc"]) == pytest.approx(93.75)
    assert "93.75" in report.text

    # Re-run: alpha and beta are finished and skipped; gamma recorded a failure and is redone, its good
    # case's prediction reused (the network never runs).
    stamps = {t: (cell[t] / "summary.json").stat().st_mtime_ns for t in ("alpha", "beta")}
    model.net.batch_sizes.clear()
    again = evaluate(model, ["alpha", "beta", "gamma"], data_root, results, key=KEY,
                     inference={"mirror_axes": []}, failures=FailureLog())
    assert again.skipped == [cell["alpha"], cell["beta"]] and again.written == [cell["gamma"]]
    assert model.net.batch_sizes == []
    assert all((cell[t] / "summary.json").stat().st_mtime_ns == stamps[t] for t in stamps)


def test_cli_keys_the_cells_by_the_checkpoints_run(tmp_path):
    plan = tiny_ct_plan(target_spacing=(2.4, 2.4, 5.0))
    module = tiny_module(plan)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "best.ckpt")
    labels = organ_labels()
    image = np.where(labels > 0, 40.0 + 10 * labels, -1000.0)
    write_test_set(tmp_path / "data_root" / "unified", "alpha", {"a0": (image, labels)})

    result = run_cli("aeval.evaluate", f"ckpt_path={tmp_path / 'best.ckpt'}", "test_sets=[alpha]",
                     "inference=fast", cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    run = RunKey.from_mapping(RUN_KEY)
    cell = tmp_path / "outputs" / "results" / run.protocol / run.train / run.model / run.run / "alpha"
    summary = summary_of(cell / "aeval")
    assert {k: summary[k] for k in ("protocol", "train", "model", "run", "test")} == {**RUN_KEY, "test": "alpha"}
    assert summary["n_cases"] == 1 and summary["n_failed"] == 0
    prediction = nib.load(cell / "predictions" / "a0.nii.gz")
    assert prediction.shape == labels.shape and prediction.get_data_dtype() == np.uint8
    # the cell scores the file it wrote: its liver DSC, recomputed from the two label maps
    predicted_liver, true_liver = np.asarray(prediction.dataobj) == 1, labels == 1
    expected = 2 * (predicted_liver & true_liver).sum() / (predicted_liver.sum() + true_liver.sum())
    assert summary["organs"]["liver"]["dsc"] == pytest.approx(expected)
    assert "1 cell(s) written" in output
