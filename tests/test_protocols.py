"""Protocols 2-4 on a tiny synthetic A-Eval-mini: a pseudo-label round labels every unlabelled case in its
image's geometry (exactly what the evaluation predictor gives), WORD's missing classes are filled only where
WORD leaves voxels unlabelled, a two-round joint protocol resumes at round 2, round keys follow what shapes a
round, and the Table 9 sweep is keyed and reported like the paper's table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONF_DIR, FAST_PLAN
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aeval.data.planner import plan_hash
from aeval.data.prepare import prepare
from aeval.data.preprocess import preprocess_image
from aeval.data.synthetic import generate_mini
from aeval.errors import FailureLog
from aeval.labels import flare22_sets, get_system, remap
from aeval.models.load import LoadedModel, load_model
from aeval.models.stunet import build_stunet
from aeval.nifti import read_label
from aeval.orchestration.grid import GridRow, grid_rows, report_runs, report_spec, row_config, row_key, run_grid
from aeval.prediction import make_predictor, predict_files
from aeval.protocols import rounds as rounds_module
from aeval.protocols.pseudo_label import case_confidence, complete_labels, write_pseudo_labels
from aeval.protocols.rounds import ROUND_MARKER, RoundRunner
from aeval.protocols.run import protocol_plan, run_protocol
from aeval.results import write_cell

ROOT = Path(__file__).resolve().parents[1]
WORD = {name: i for i, name in get_system("word").names.items()}
TINY_MINI = {"seed": 0, "size_scale": 0.5,
             "cases": {"flare22": {"train": 2, "val": 1, "unlabeled": 2}, "amos_ct": {"train": 0, "val": 0},
                       "amos_mr": {"train": 0, "val": 0}, "word": {"train": 2, "val": 1},
                       "totalseg": {"train": 0, "val": 0, "test": 0}, "btcv": {"train": 0}}}
FAST_TRAINING = ["model=stu_tiny", "trainer=cpu", "logger=none", "inference=fast", "trainer.max_epochs=1",
                 "trainer.precision=32-true", "trainer.enable_progress_bar=false", "data.iterations_per_epoch=2",
                 "data.num_workers=0", "data.val_cases=1", "plan.patch_size=[32,32,32]", "preprocess_workers=1",
                 FAST_PLAN]



@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """FLARE22 (2 labelled, 2 unlabelled, 1 test) and WORD (2 training, 1 test), converted."""
    root = tmp_path_factory.mktemp("protocols")
    paths = {"root_dir": str(root), "raw_root": str(root / "data_root/raw"),
             "data_root": str(root / "data_root/unified")}
    generate_mini(paths["raw_root"], TINY_MINI, progress=False)
    names = ["flare22", "flare22_unlabeled", "word"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        datasets = compose("prepare", overrides=[f"paths.root_dir={root}"]).datasets
    _, failures = prepare({n: OmegaConf.to_container(datasets[n], resolve=True) for n in names}, paths["data_root"])
    assert not failures.failures
    return root


def config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("grid", overrides=[f"paths.root_dir={root}", *FAST_TRAINING, *overrides])


def label_of(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


# --- pseudo-labelling ---------------------------------------------------------------------------------

def test_pseudo_label_protocol_labels_every_unlabelled_case(mini, tmp_path):
    cfg = config(mini, "protocol=pseudo_label", "dataset=flare22", "protocol.test_sets=[flare22]")
    outcome = run_protocol(cfg)
    assert not outcome.failures.failures
    teacher, student = outcome.rounds
    data_root = Path(cfg.paths.data_root)
    assert student.train_sets[0] == "flare22" and student.train_sets[1].startswith("flare22_unlabeled_pl_")
    pl_dir = data_root / student.train_sets[1]
    source = data_root / "flare22_unlabeled"
    cases = json.loads((source / "splits.json").read_text())["train"]
    meta = json.loads((pl_dir / "dataset.json").read_text())
    assert (meta["label_system"], meta["modality"], meta["numTraining"]) == ("flare22", "CT", len(cases))
    assert meta["pseudo_labels"]["complete"] and meta["pseudo_labels"]["teacher_key"] == teacher.key
    assert json.loads((pl_dir / "splits.json").read_text()) == {"train": cases, "test": []}
    # the evaluation predictor run independently with the teacher gives the same labels
    reference = predict_files(load_model(teacher.checkpoint), [source / "imagesTr" / f"{c}_0000.nii.gz" for c in cases],
                              tmp_path / "reference", inference=OmegaConf.to_container(cfg.inference))
    assert len(reference) == len(cases) == 2
    for case in cases:
        image = nib.load(str(source / "imagesTr" / f"{case}_0000.nii.gz"))
        labels, label_img = label_of(pl_dir / "labelsTr" / f"{case}.nii.gz")
        assert labels.shape == image.shape and np.allclose(label_img.affine, image.affine)
        assert labels.dtype == np.uint8 and labels.max() <= 13
        np.testing.assert_array_equal(labels, label_of(tmp_path / "reference" / f"{case}.nii.gz")[0])
    # round 2 trained on labelled + pseudo-labelled, and the final cells are keyed pseudo_label / flare22
    trained = OmegaConf.load(student.run_dir / "config.yaml")
    assert list(trained.train_sets) == student.train_sets
    cell = Path(cfg.paths.results_root) / f"pseudo_label/flare22/stu_tiny/{outcome.run_key.run}/flare22/aeval"
    assert outcome.cells == [cell]
    summary = json.loads((cell / "summary.json").read_text())
    assert (summary["protocol"], summary["train"], summary["test"]) == ("pseudo_label", "flare22", "flare22")
    assert summary == json.loads((student.run_dir / "results" / cell.relative_to(cfg.paths.results_root)
                                  / "summary.json").read_text())


def test_case_confidence_is_the_mean_max_probability_on_predicted_foreground():
    logits = torch.zeros(3, 2, 1, 1)
    logits[:, 0, 0, 0] = torch.tensor([0.0, 2.0, 0.0])   # foreground (class 1)
    logits[:, 1, 0, 0] = torch.tensor([3.0, 0.0, 1.0])   # background
    p = np.exp(2.0) / (np.exp(2.0) + 2)
    assert case_confidence(logits) == pytest.approx(p)
    assert case_confidence(torch.zeros(3, 2, 1, 1).index_fill_(0, torch.tensor([0]), 1.0)) == 1.0


def random_teacher() -> LoadedModel:
    """An untrained tiny STU-Net with a hand-made CT plan: confident on some voxels, not on others."""
    torch.manual_seed(0)
    pools = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2
    plan = {"datasets": [{"name": "flare22", "modality": "CT", "label_system": "flare22"}], "axis_order": "RAS",
            "target_spacing": [12.0, 12.0, 12.0], "crop": {"ct_threshold": -500.0, "other": "nonzero"},
            "normalization": {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 50.0, "std": 80.0},
            "patch_size": [32, 32, 32], "pool_op_kernel_sizes": pools}
    plan["hash"] = plan_hash(plan)
    return LoadedModel(build_stunet("tiny", 1, 14, pools).eval(), plan, "flare22")


def test_confidence_rule_keeps_the_cases_above_the_threshold(mini, tmp_path):
    teacher = random_teacher()
    source = Path(mini) / "data_root/unified/flare22_unlabeled"
    cases = json.loads((source / "splits.json").read_text())["train"]
    fast = {"mirror_axes": []}
    everything = write_pseudo_labels(teacher, source, tmp_path / "all_pl", inference=fast, confidence_threshold=0.0)
    scores = json.loads((everything / "confidence.json").read_text())
    predictor = make_predictor(teacher, fast)
    for case in cases:  # independently: the predictor's logits in the preprocessed space
        image, _ = preprocess_image(source / "imagesTr" / f"{case}_0000.nii.gz", teacher.plan)
        probabilities = torch.softmax(predictor(torch.from_numpy(image)), 0)
        best, label = probabilities.max(0)
        assert scores[case] == pytest.approx(float(best[label > 0].mean()), rel=1e-5)
    assert json.loads((everything / "splits.json").read_text())["train"] == cases
    low, high = sorted(scores.values())
    assert low < high
    kept = write_pseudo_labels(teacher, source, tmp_path / "kept_pl", inference=fast,
                               confidence_threshold=(low + high) / 2)
    meta = json.loads((kept / "dataset.json").read_text())
    assert json.loads((kept / "splits.json").read_text())["train"] == [c for c in cases if scores[c] == high]
    assert meta["pseudo_labels"]["dropped_by_confidence"] == [c for c in cases if scores[c] == low]
    assert meta["pseudo_labels"]["complete"] and meta["numTraining"] == 1


# --- joint: completing WORD ------------------------------------------------------------------------

def test_complete_labels_fills_only_what_word_leaves_unlabelled():
    native = np.zeros((8, 4, 1), np.int32)
    native[0:2] = WORD["liver"]
    native[2] = WORD["colon"]
    native[4:6] = WORD["adrenal_glands"]
    prediction = np.zeros((8, 4, 1), np.uint8)
    prediction[0, :2] = 5          # aorta predicted inside WORD's liver: WORD knows better
    prediction[2, :2] = 6          # IVC inside WORD's colon: labelled voxels, not filled
    prediction[3, :2] = 5          # aorta in WORD's background: filled
    prediction[3, 2:] = 1          # liver in WORD's background: WORD annotates liver, not filled
    prediction[4, 3] = 8           # left adrenal inside the adrenal label
    prediction[5, 0] = 7           # right adrenal inside it
    prediction[7, 3] = 7           # an adrenal prediction outside every WORD label: not filled
    merged = complete_labels(native, "word", prediction, np.eye(4))
    expected = np.zeros_like(prediction)
    expected[0:2] = 1
    expected[3, :2] = 5
    # adrenal voxels: the teacher's class, else that of the nearest adrenal prediction ((5,0) right, (4,3)
    # left, (7,3) right; no ties)
    expected[4, :, 0] = [7, 7, 8, 8]
    expected[5, :, 0] = [7, 7, 8, 8]
    np.testing.assert_array_equal(merged[..., 0], expected[..., 0])


def test_complete_labels_splits_an_unpredicted_adrenal_by_side():
    """No adrenal predicted anywhere: each WORD adrenal component goes to the patient's side it lies on
    (RAS+ world x: larger is right, as the real TotalSegmentator labels show in test_labels), relative to the
    centre of WORD's labelled organs."""
    native = np.zeros((9, 3, 3), np.int32)
    native[3:6] = WORD["liver"]
    native[1, 1, 1] = WORD["adrenal_glands"]
    native[7, 1, 1] = WORD["adrenal_glands"]
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])   # array axis 0 points to the patient's left (world x decreases)
    merged = complete_labels(native, "word", np.zeros_like(native, dtype=np.uint8), affine)
    assert merged[1, 1, 1] == 7 and merged[7, 1, 1] == 8   # world x -1 (right of the centre, x -4) and -7
    assert merged[4, 1, 1] == 1


# --- joint: resuming -------------------------------------------------------------------------------

def joint_config(root: Path, *overrides: str):
    return config(root, "protocol=joint", "protocol.labelled=[flare22]", "protocol.fill_missing=[word]",
                  "protocol.unlabeled=null", "protocol.test_sets=[word]", *overrides)


def test_joint_protocol_resumes_at_round_two(mini, monkeypatch):
    first = run_protocol(joint_config(mini, "protocol.stop_after_round=1"))
    assert [r.skipped for r in first.rounds] == [False] and first.cells == []
    round1 = first.rounds[0]
    marker_stamp = (round1.run_dir / ROUND_MARKER).stat().st_mtime_ns
    checkpoint_stamp = round1.checkpoint.stat().st_mtime_ns

    trained = []
    real_train = rounds_module.train

    def recording_train(job):
        trained.append(Path(job.run_dir))
        return real_train(job)

    monkeypatch.setattr(rounds_module, "train", recording_train)
    cfg = joint_config(mini)
    second = run_protocol(cfg)
    assert [r.skipped for r in second.rounds] == [True, False]
    assert second.rounds[0].key == round1.key and trained == [second.rounds[1].run_dir]
    assert (round1.run_dir / ROUND_MARKER).stat().st_mtime_ns == marker_stamp
    assert round1.checkpoint.stat().st_mtime_ns == checkpoint_stamp
    assert second.cells == [Path(cfg.paths.results_root) / f"joint/joint/stu_tiny/{second.run_key.run}/word/aeval"]

    # round 2's WORD: WORD's own labels, teacher's aorta/IVC only in WORD background, adrenal split
    completed = Path(cfg.paths.data_root) / second.rounds[1].train_sets[1]
    assert completed.name.startswith("word_pl_")
    word = Path(cfg.paths.data_root) / "word"
    single = {v: next(iter(s)) for v, s in flare22_sets("word").items() if len(s) == 1}
    for case in json.loads((word / "splits.json").read_text())["train"]:
        native, native_img = read_label(word / "labelsTr" / f"{case}.nii.gz")
        merged, merged_img = label_of(completed / "labelsTr" / f"{case}.nii.gz")
        teacher, _ = label_of(completed / "teacher" / f"{case}.nii.gz")
        assert merged.shape == native.shape and np.allclose(merged_img.affine, native_img.affine)
        for value, cls in single.items():
            assert (merged[native == value] == cls).all()
        adrenal = native == WORD["adrenal_glands"]
        assert adrenal.any() and np.isin(merged[adrenal], [7, 8]).all()
        assert (merged[adrenal & np.isin(teacher, [7, 8])] == teacher[adrenal & np.isin(teacher, [7, 8])]).all()
        background = native == 0
        filled = background & np.isin(teacher, [5, 6])
        np.testing.assert_array_equal(merged[background], np.where(filled, teacher, 0)[background])
        np.testing.assert_array_equal(merged[(native > 0) & ~adrenal],
                                      remap(native, "word", "flare22")[(native > 0) & ~adrenal])

    trained.clear()
    third = run_protocol(cfg)
    assert trained == [] and [r.skipped for r in third.rounds] == [True, True]


# --- keys ------------------------------------------------------------------------------------------

def test_round_keys_follow_what_shapes_a_round(tmp_path):
    def keys(*overrides):
        cfg = config(tmp_path, "protocol=joint", *overrides)
        return RoundRunner(cfg, protocol_plan(cfg)).keys

    base = keys()
    assert len(base) == 3 and len(set(base)) == 3
    assert keys("trainer.enable_progress_bar=true", "protocol.stop_after_round=1", "data.num_workers=3") == base
    assert keys("protocol.unlabeled=null") == base[:2]               # dropping the last round keeps the others
    assert keys("protocol.fill_missing=[]")[0] == base[0]
    assert keys("protocol.fill_missing=[]")[1] != base[1]
    assert keys("inference.mirror_axes=[0]")[0] == base[0]            # round 1 has no pseudo-labels
    assert keys("inference.mirror_axes=[0]")[1:] != base[1:]          # the teacher's predictor makes round 2's data
    assert all(a != b for a, b in zip(keys("trainer.max_epochs=2"), base, strict=True))


def test_table9_rows_are_keyed_like_the_paper(tmp_path):
    cfg = config(tmp_path, "experiment=protocols")
    keys = [(k.protocol, k.train) for k in (row_key(row_config(cfg, row)) for row in grid_rows(cfg))]
    with open(ROOT / "aeval/paper/table9_cells.csv", newline="") as f:
        paper = list(dict.fromkeys((r["protocol"], r["train"]) for r in csv.DictReader(f)))
    assert keys == paper + [("joint_marginal", "joint")]
    multimodal = row_config(cfg, GridRow("mr", "multimodal", None, (("protocol.modality", "mr"),)))
    assert [r.train_sets for r in protocol_plan(multimodal).rounds] == [("amos_mr",)]
    ct_mr = row_config(cfg, GridRow("ct_mr", "multimodal", None, (("protocol.modality", "ct_mr"),)))
    assert protocol_plan(ct_mr).rounds[0].train_sets == ("amos_ct", "amos_mr")
    assert "amos_mr" in protocol_plan(ct_mr).test_sets
    marginal = protocol_plan(row_config(cfg, GridRow("m", "joint", None, (("protocol.partial_labels", "marginal"),))))
    assert len(marginal.rounds) == 1 and marginal.rounds[0].train_sets == ("flare22", "amos_ct", "amos_mr",
                                                                           "totalseg", "word")
    assert dict(marginal.rounds[0].settings) == {"data.target_codes": True,
                                                 "loss": {"_target_": "aeval.marginal_loss.MarginalDiceCELoss"}}


def test_protocols_report_has_the_table9_layout(tmp_path):
    cfg = config(tmp_path, "experiment=protocols", "grid.paper=null", "model=stu_l")
    keys = [row_key(row_config(cfg, row)) for row in grid_rows(cfg)]
    assert len({k.run for k in keys if k.protocol == "individual"}) == 1  # same training settings, same hash
    tests = list(cfg.grid.test_sets)
    rng = np.random.default_rng(0)
    values = {}
    for key in keys:
        for test in tests:
            dsc, nsd = rng.uniform(0.5, 0.95, 2)
            values[(key.protocol, key.train, test)] = (dsc, nsd)
            summary = {"mean_dsc": dsc, "mean_nsd": nsd, "organs": {}}
            write_cell(cfg.paths.results_root, key.cell(test, "aeval"), summary)
    outcome = report_runs(report_spec(cfg), keys, FailureLog())
    assert outcome.missing == []
    text = (outcome.report_dir / "grid.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Train"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Train \\ Test", "FLARE22", "AMOS CT", "WORD", "TotalSegmentator", "BTCV", "CT Mean ± SD", "AMOS MR",
        "All Mean ± SD"]
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows)[1:9] == ["FLARE22 w/o PL", "FLARE22 w/ PL", "AMOS CT", "AMOS MR", "AMOS CT+MR", "WORD",
                               "TotalSegmentator", "Joint"]
    ct = [100 * values[("pseudo_label", "flare22", t)][0] for t in tests[:5]]
    assert f"{np.mean(ct):.2f} ± {np.std(ct):.2f}" in rows["FLARE22 w/ PL"]
    comparison = (outcome.report_dir / "joint_vs_marginal" / "grid.md").read_text()
    assert "Joint (joint)" in comparison and "Joint (joint_marginal)" in comparison


@pytest.mark.slow
def test_protocols_sweep_end_to_end(mini):
    """A small sweep through the Table 9 runner: an individual row (trained as the grid trains it), the
    pseudo-label protocol and a two-round joint protocol, then the report; a re-run trains nothing."""
    rows = ("grid.rows=[{name: a, protocol: individual, dataset: flare22}, "
            "{name: b, protocol: pseudo_label, dataset: flare22}, "
            "{name: c, protocol: joint, set: {protocol.labelled: [flare22], protocol.unlabeled: null}}]")
    cfg = config(mini, "experiment=protocols", "grid.paper=null", "grid.test_sets=[flare22,word]", rows)
    outcome = run_grid(cfg)
    assert outcome.missing == [] and not outcome.failures.failures
    text = (outcome.report_dir / "grid.md").read_text()
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:4]
    assert labels == ["FLARE22 w/o PL", "FLARE22 w/ PL", "Joint"]
    stamps = {p: p.stat().st_mtime_ns for p in Path(cfg.paths.log_dir).rglob("*.ckpt")}
    again = run_grid(cfg)
    assert again.missing == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
