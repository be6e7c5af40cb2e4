"""The 2025 edition of A-Eval: its label numbering (against the facts and the real TotalSegmentator files),
WORD's split adrenals, the two ten-organ metric modes against DeepMind's ``surface-distance``, the
TotalSegmentator v2 / MR converters, and the 2025 grid end to end on the synthetic A-Eval-mini."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import CONF_DIR, REAL, affine_for, needs_real

from aeval import labels as L
from aeval.data import synthetic as S
from aeval.data.convert import convert_dataset, split_word_adrenals
from aeval.data.prepare import prepare
from aeval.data.registry import DatasetSpec
from aeval.errors import CaseError
from aeval.metrics import metric_card, metric_key, parse_metric_key, score_case, scoring_rules, unscored_organs

sd = pytest.importorskip("surface_distance")
pytestmark = pytest.mark.filterwarnings("ignore")

# --- independent references: the facts of the issue, written out ------------------------------------------

# ``AEval_label`` of the 2025 label_systems.py.
AEVAL2025 = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
             "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 10}
# Native ids of the ten organs in TotalSegmentator's `total` (v2) and `total_mr` class maps (DESIGN §3).
NATIVE = {
    "totalseg_v2": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                    "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 15},
    "totalseg_mr": {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
                    "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 12},
}
# The unchanged script on the 2025 numbering: tolerance list [0,5,3,3,5,2,2,2,2,2,3,5,7,3] by id, crop ids
# {5, 6, 10}, class_list 1..8 -- organ: (tolerance mm, crop).
SCRIPT_2025 = {"spleen": (5, False), "kidney_right": (3, False), "kidney_left": (3, False),
               "gallbladder": (5, False), "liver": (2, True), "stomach": (2, True), "pancreas": (2, False),
               "adrenal_gland_right": (2, False)}
# What the benchmark means: FLARE22's tolerance by organ name, crop for the esophagus only.
AEVAL10 = {"spleen": (3, False), "kidney_right": (3, False), "kidney_left": (3, False), "gallbladder": (2, False),
           "liver": (5, False), "stomach": (5, False), "pancreas": (5, False), "adrenal_gland_right": (2, False),
           "adrenal_gland_left": (2, False), "esophagus": (3, True)}


def load_dataset_config(name: str, paths: dict) -> dict:
    """``datasets.<name>`` as ``aeval.prepare`` composes it, with ``paths`` set."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("prepare", overrides=[f"paths.{k}={v}" for k, v in paths.items()])
    return OmegaConf.to_container(cfg.datasets[name], resolve=True)


def reference_scores(pred: np.ndarray, gt: np.ndarray, spacing, rules: dict) -> dict:
    """The A-Eval rules with DeepMind's package: both empty 1/1, GT empty 0/0, crop [zmin:zmax) of the GT
    (top slice dropped; empty crop 0/0), prediction empty 0/0, else compute_dice_coefficient and surface Dice."""
    out = {}
    for organ, (tolerance, crop) in rules.items():
        p, g = pred == AEVAL2025[organ], gt == AEVAL2025[organ]
        if not g.any():
            out[organ] = (0.0, 0.0) if p.any() else (1.0, 1.0)
            continue
        if crop:
            z = np.flatnonzero(g.any(axis=(0, 1)))
            p, g = p[:, :, z[0]:z[-1]], g[:, :, z[0]:z[-1]]
            if not g.any():
                out[organ] = (0.0, 0.0)
                continue
        if not p.any():
            out[organ] = (0.0, 0.0)
            continue
        distances = sd.compute_surface_distances(g, p, tuple(float(s) for s in spacing))
        out[organ] = (float(sd.compute_dice_coefficient(g, p)),
                      float(sd.compute_surface_dice_at_tolerance(distances, tolerance)))
    return out


# --- label systems ------------------------------------------------------------------------------------------

def test_aeval2025_numbering_and_word2025():
    assert L.get_system("aeval2025").names == {i: organ for organ, i in AEVAL2025.items()}
    word, word2025 = L.get_system("word").names, L.get_system("word2025").names
    assert word2025[12] == "adrenal_gland_left" and word2025[17] == "adrenal_gland_right"
    assert {i: n for i, n in word2025.items() if i not in (12, 17)} == {i: n for i, n in word.items() if i != 12}
    # aeval10 (aeval's own order) is not the 2025 numbering: spleen 3 vs 1, liver 1 vs 5, esophagus 6 vs 10
    assert L.to_aeval10(np.array([3, 1, 6]), "aeval10").tolist() == [3, 1, 6]
    assert L.remap(np.array([3, 1, 6]), "aeval10", "aeval2025").tolist() == [1, 5, 10]
    # WORD 2025 maps both adrenals to single FLARE22 classes (7 right, 8 left); plain WORD to the set {7, 8}
    assert L.to_flare22(np.array([17, 12]), "word2025").tolist() == [7, 8]
    assert L.to_aeval2025(np.array([17, 12, 1]), "word2025").tolist() == [8, 9, 5]
    with pytest.raises(ValueError, match="values 17 .*'word'"):
        L.to_aeval2025(np.array([0, 17]), "word")


def _world_x(img, mask):
    return float(img.affine[0, :3] @ np.argwhere(mask).mean(0) + img.affine[0, 3])


@needs_real
@pytest.mark.parametrize("name,system", [("example_seg", "totalseg_v2"), ("example_seg_mr", "totalseg_mr")])
def test_real_totalsegmentator_files_in_the_2025_numbering(name, system):
    img = nib.load(str(REAL / f"{name}.nii.gz"))
    native = np.asanyarray(img.dataobj)
    mapped = L.to_aeval2025(native, system)
    assert set(np.unique(mapped).tolist()) == set(range(10))  # the example scans show no esophagus
    for organ, aeval_id in AEVAL2025.items():
        count = int((native == NATIVE[system][organ]).sum())
        assert int((mapped == aeval_id).sum()) == count and (count > 0) == (organ != "esophagus"), organ
    # right of the patient is +x in RAS+ world coordinates, whatever the voxel order (RAS CT, LPS MR)
    for right, left in (("kidney_right", "kidney_left"), ("adrenal_gland_right", "adrenal_gland_left")):
        assert _world_x(img, mapped == AEVAL2025[right]) > _world_x(img, mapped == AEVAL2025[left])
    assert _world_x(img, mapped == AEVAL2025["liver"]) > _world_x(img, mapped == AEVAL2025["spleen"])


# --- WORD's adrenals ------------------------------------------------------------------------------------------

def _word_raw(tmp_path, **cases):
    counts = {d: dict.fromkeys(splits, 0) for d, splits in S.DEFAULT_CASES.items()}
    counts["word"].update(cases)
    config = S.SyntheticConfig.from_mapping({"size_scale": 0.6, "cases": counts, "seed": 2})
    raw = tmp_path / "raw"
    S.generate_mini(raw, config, progress=False)
    return raw, config


def test_word2025_converter_splits_the_adrenals_by_side(tmp_path):
    raw, config = _word_raw(tmp_path, train=1, test=1)
    paths = {"raw_root": str(raw), "root_dir": str(tmp_path)}
    data = tmp_path / "unified"
    summary = convert_dataset(DatasetSpec.from_config(load_dataset_config("word2025", paths)), data)
    assert summary.per_split() == {"train": 1, "test": 1} and not summary.failed
    assert json.loads((data / "word2025/dataset.json").read_text())["labels"]["adrenal_gland_right"] == 17
    planned = {c.case_id: c for c in S.plan_cases(raw, config) if c.dataset == "word"}
    for split, folder in (("train", "labelsTr"), ("test", "labelsTs")):
        case = next(c for c in planned.values() if c.split == split)
        truth = S.render_case(S.PROFILES["word"], S.case_rng(config.seed, case), case.region, config.size_scale)
        out = np.asanyarray(nib.load(str(data / f"word2025/{folder}/{case.case_id}.nii.gz")).dataobj)
        raw_labels = np.asanyarray(nib.load(str(case.label)).dataobj)
        right = truth.structures == S.STRUCTURE_ID["adrenal_gland_right"]
        left = truth.structures == S.STRUCTURE_ID["adrenal_gland_left"]
        assert right.any() and left.any()
        assert np.array_equal(out == 17, right & (raw_labels == 12))
        assert np.array_equal(out == 12, left & (raw_labels == 12))
        assert np.array_equal(out[raw_labels != 12], raw_labels[raw_labels != 12])  # nothing else changes
    # plain WORD keeps the merged label, copied byte for byte
    convert_dataset(DatasetSpec.from_config(load_dataset_config("word", paths)), data)
    case = next(c for c in planned.values() if c.split == "train")
    assert (data / f"word/labelsTr/{case.case_id}.nii.gz").read_bytes() == case.label.read_bytes()


def test_adrenal_split_rule_is_in_world_coordinates_with_a_body_fallback():
    labels = np.zeros((20, 8, 6), np.int16)
    labels[2:4, 3:5, 2:4] = 12    # low x index
    labels[15:17, 3:5, 2:4] = 12  # high x index
    labels[0:3, 0:2, 0:2] = 4     # WORD 4 = right kidney at low x index: this volume's x axis runs right→left
    labels[17:20, 0:2, 0:2] = 3
    lps = affine_for("LPS", (2.0, 2.0, 3.0))  # index x grows to the patient's left
    out = split_word_adrenals(labels, lps)
    assert (out[2:4, 3:5, 2:4] == 17).all() and (out[15:17, 3:5, 2:4] == 12).all()
    # without kidneys: the body (voxels above -500 HU) gives the midline; here the body is off-centre in the
    # volume, so only the body rule puts both adrenals on their sides
    no_kidneys = np.where(np.isin(labels, (3, 4)), 0, labels)
    no_kidneys[15:17, 3:5, 2:4] = 0
    no_kidneys[9:11, 3:5, 2:4] = 12  # left of the volume centre (index 9.5) -- but right of the body's centre
    image = np.full(labels.shape, -1000.0, np.float32)
    image[10:20] = 40.0                # body spans x index 10..19: its centroid is 14.5
    out = split_word_adrenals(no_kidneys, lps, image)
    assert (out[9:11, 3:5, 2:4] == 17).all() and (out[2:4, 3:5, 2:4] == 17).all()
    already = labels.copy()
    already[15:17, 3:5, 2:4] = 17
    assert split_word_adrenals(already, lps) is already  # 2025-style labels are kept as they are


# --- the two ten-organ modes -----------------------------------------------------------------------------------

SPACING = (1.5, 1.2, 2.5)


def _ten_organ_cases():
    """GT and prediction pairs in the 2025 numbering: boxes shifted, eroded and dilated, a stray voxel, a
    missing prediction, a false positive on an empty GT and an organ absent on both sides."""
    rng = np.random.default_rng(7)
    out = []
    for case in range(3):
        gt = np.zeros((44, 40, 26), np.uint8)
        for label in range(1, 11):
            x, y = 2 + ((label - 1) % 5) * 8, 3 + ((label - 1) // 5) * 18
            z0 = 3 + label % 4 + case
            gt[x:x + 6, y:y + rng.integers(6, 12), z0:z0 + rng.integers(3, 12)] = label
        pred = np.roll(gt, rng.integers(-1, 2, 3), axis=(0, 1, 2))
        if case == 1:
            pred[pred == 9] = 0                   # left adrenal missed
            gt[gt == 4] = 0                        # gallbladder absent in GT but predicted
        if case == 2:
            gt[gt == 8], pred[pred == 8] = 0, 0    # right adrenal absent on both sides
            pred[40, 35, 24] = 5                   # a stray liver voxel
            pred = np.where((pred == 10) & (rng.random(pred.shape) < 0.2), 0, pred)
        out.append((pred, gt))
    return out


@pytest.mark.parametrize("mode,rules", [("aeval10", AEVAL10), ("aeval2025_script", SCRIPT_2025)])
def test_ten_organ_modes_equal_the_deepmind_reference(mode, rules):
    assert [r.organ for r in scoring_rules(mode, "aeval2025")] == [o for o in AEVAL2025 if o in rules]
    for pred, gt in _ten_organ_cases():
        ours = score_case(pred, gt, SPACING, mode=mode, classes="aeval2025")
        reference = reference_scores(pred, gt, SPACING, rules)
        assert list(ours) == list(reference)
        for organ, (dsc, nsd) in reference.items():
            assert ours[organ]["dsc"] == pytest.approx(dsc, abs=1e-12), organ
            assert ours[organ]["nsd"] == pytest.approx(nsd, abs=1e-9), organ


def test_mode_names_classes_and_cards():
    assert unscored_organs("aeval2025_script") == ("adrenal_gland_left", "esophagus")
    assert unscored_organs("aeval10") == ()
    assert [metric_key(*k) for k in (("aeval", "aeval8"), ("aeval", "aeval10"), ("flare22", "aeval8"),
                                     ("aeval10", "aeval2025"), ("aeval2025_script", None))] == \
        ["aeval", "aeval-aeval10", "flare22", "aeval10", "aeval2025_script"]
    assert parse_metric_key("flare22-aeval10") == ("flare22", "aeval10")
    assert parse_metric_key("aeval2025_script") == ("aeval2025_script", "aeval2025")
    with pytest.raises(ValueError, match="metric mode 'aeval10' scores class space aeval2025, not 'aeval8'"):
        scoring_rules("aeval10", "aeval8")
    card = "\n".join(metric_card("aeval2025_script"))
    assert "Not scored: adrenal_gland_left, esophagus" in card and "liver 2 mm + crop" in card
    # aeval10 is FLARE22's rule by name: organ for organ the numbers of flare22 on aeval's ten classes
    pred, gt = _ten_organ_cases()[0]
    lut = L._lookup_table("aeval2025", "aeval10")
    assert score_case(pred, gt, SPACING, "aeval10") == score_case(lut[pred], lut[gt], SPACING, "flare22", "aeval10")


# --- TotalSegmentator v2 / MR converters ----------------------------------------------------------------------

def _totalseg_raw(tmp_path, dataset, **splits):
    counts = {d: dict.fromkeys(s, 0) for d, s in S.DEFAULT_CASES.items()}
    counts[dataset].update(splits)
    raw = tmp_path / "raw"
    S.generate_mini(raw, S.SyntheticConfig.from_mapping({"size_scale": 0.5, "cases": counts, "seed": 4}),
                    progress=False)
    return raw, {"raw_root": str(raw), "root_dir": str(tmp_path)}


@pytest.mark.parametrize("dataset,folder,image", [("totalseg_v2", "TotalSegmentatorV2", "ct.nii.gz"),
                                                   ("totalseg_mr", "TotalSegmentatorMRI", "mri.nii.gz")])
def test_totalseg_v2_and_mr_merge_their_own_structure_names(tmp_path, dataset, folder, image):
    raw, paths = _totalseg_raw(tmp_path, dataset, train=1, test=1)
    spec = DatasetSpec.from_config(load_dataset_config(dataset, paths))
    summary = convert_dataset(spec, tmp_path / "unified")
    assert summary.per_split() == {"train": 1, "test": 1} and not summary.failed
    meta = json.loads((tmp_path / "unified" / dataset / "dataset.json").read_text())
    assert meta["label_system"] == dataset and meta["modality"] == ("MR" if dataset == "totalseg_mr" else "CT")
    case = json.loads((tmp_path / "unified" / dataset / "splits.json").read_text())["train"][0]
    seg = raw / folder / case / "segmentations"
    assert (raw / folder / case / image).is_file()
    merged = np.asanyarray(nib.load(str(tmp_path / "unified" / dataset / f"labelsTr/{case}.nii.gz")).dataobj)
    for organ, native_id in NATIVE[dataset].items():
        mask = np.asanyarray(nib.load(str(seg / f"{organ}.nii.gz")).dataobj) > 0
        assert mask.any() and np.array_equal(merged == native_id, mask), organ


def _meta(tmp_path, header: str, rows: list[str], bom: bool = False):
    folder = tmp_path / "TotalSegmentatorV2"
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join([header, *rows]) + "\n"
    (folder / "meta.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    cfg = load_dataset_config("totalseg_v2", {"raw_root": str(tmp_path), "root_dir": str(tmp_path)})
    return folder / "meta.csv", cfg


def test_meta_csv_with_a_byte_order_mark_reads(tmp_path):
    _, cfg = _meta(tmp_path, "image_id;age;split", ["s0002;40;test", "s0001;50;train", "s0003;60;val"], bom=True)
    cases = DatasetSpec.from_config(cfg).find_cases()
    assert [(c.case, c.split, c.image.name) for c in cases] == [("s0001", "train", "ct.nii.gz"),
                                                                 ("s0002", "test", "ct.nii.gz")]


def test_a_split_column_of_another_name_is_one_line_and_a_failure(tmp_path):
    meta, cfg = _meta(tmp_path, "image_id;age;subset", ["s0001;50;train"])
    with pytest.raises(CaseError) as err:
        DatasetSpec.from_config(cfg).find_cases()
    line = str(err.value)
    assert line.startswith(f"{meta}: no column 'split'") and "columns: image_id, age, subset" in line
    assert len(line.splitlines()) == 1
    _, failures = prepare({"totalseg_v2": cfg}, tmp_path / "unified")
    assert failures.exit_code() == 2 and failures.failures == [line]
    cfg["splits"] = {"train": {"split": "train", "column": "subset"}}  # the documented way out
    assert [c.case for c in DatasetSpec.from_config(cfg).find_cases()] == ["s0001"]


def test_version_is_no_longer_a_silent_key(tmp_path):
    cfg = load_dataset_config("totalseg", {"raw_root": str(tmp_path), "root_dir": str(tmp_path)})
    assert "version" not in cfg and cfg["label_system"] == "totalseg_v1"
    with pytest.raises(ValueError, match="dataset totalseg: 'version' is not a setting; set label_system"):
        DatasetSpec.from_config({**cfg, "version": "v2"})
    _, failures = prepare({"totalseg": {**cfg, "version": "v2"}}, tmp_path / "unified")
    assert failures.exit_code() == 2 and "'version' is not a setting" in failures.failures[0]
    # label_system is the switch: a v2 download read with totalseg_v2 merges the v2 names (pancreas 7, not 10)
    raw, paths = _totalseg_raw(tmp_path, "totalseg_v2", train=1)
    v2_folder = {"raw_dir": str(raw / "TotalSegmentatorV2"), "splits": {"train": {"split": "train"}}}
    spec = DatasetSpec.from_config({**load_dataset_config("totalseg", paths), **v2_folder,
                                    "label_system": "totalseg_v2"})
    summary = convert_dataset(spec, tmp_path / "unified")
    assert summary.label_system == "totalseg_v2" and not summary.failed
    assert 7 in summary.cases[0].labels_present and 15 in summary.cases[0].labels_present  # pancreas, esophagus
    spec_v1 = DatasetSpec.from_config({**load_dataset_config("totalseg", paths), **v2_folder, "name": "v1_names"})
    failed = convert_dataset(spec_v1, tmp_path / "unified").failed  # v1 names are not all v2 files
    assert len(failed) == 1 and "file not found" in failed[0]


# --- the 2025 grid end to end -----------------------------------------------------------------------------------

def _cell_reference(cell, data_root, test, gt_system, model_system="flare22", rules=AEVAL10):
    """Mean DSC of a cell (its folder) recomputed from its predictions and the unified ground truth with the
    reference."""
    values = []
    for pred_path in sorted((cell.parent / "predictions").glob("*.nii.gz")):
        gt_img = nib.load(str(data_root / test / "labelsTs" / pred_path.name))
        gt = L.to_aeval2025(np.asanyarray(gt_img.dataobj), gt_system)
        pred = L.to_aeval2025(np.asanyarray(nib.load(str(pred_path)).dataobj), model_system)
        values += [d for d, _ in reference_scores(pred, gt, gt_img.header.get_zooms()[:3], rules).values()]
    assert values
    return float(np.mean(values))


def test_aeval2025_grid_end_to_end(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from aeval.orchestration.grid import run_grid

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train_sets = ["flare22", "amos_ct", "word2025", "totalseg_v2", "amos_mr", "totalseg_mr"]
    tests = ["flare22", "amos_ct", "word2025", "totalseg_v2", "btcv", "amos_mr", "totalseg_mr"]
    root = tmp_path / "demo2025"

    def config(*extra):
        overrides = ["experiment=aeval2025_demo", f"paths.root_dir={root}", "grid.synthetic.size_scale=0.5",
                     "trainer.max_epochs=1", "data.iterations_per_epoch=1", "data.val_cases=0",
                     "plan.target_spacing_override=[12,12,12]", "logger=none", *extra]
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("grid", overrides=overrides)
        counts = {d: dict.fromkeys(splits, 0) for d, splits in S.DEFAULT_CASES.items()}
        for dataset, split in (("flare22", "val"), ("amos_ct", "val"), ("amos_mr", "val"), ("word", "test"),
                               ("totalseg_v2", "test"), ("totalseg_mr", "test"), ("btcv", "train")):
            counts[dataset][split] = 1
        for dataset in ("flare22", "amos_ct", "amos_mr", "word", "totalseg_v2", "totalseg_mr"):
            counts[dataset]["train"] = 1
        cfg.grid.synthetic.cases = counts
        return cfg

    cfg = config()
    assert list(cfg.grid.train_sets) == train_sets and list(cfg.grid.test_sets) == tests
    assert cfg.metric.name == "aeval10" and cfg.model.size == "tiny"
    outcome = run_grid(cfg)
    assert outcome.missing == [] and outcome.failures.exit_code() == 0, outcome.failures.failures
    (run,) = {key.run for key in outcome.runs}  # the rows share their training settings
    results = root / "outputs/results/individual"
    data_root = root / "data_root/unified"
    systems = {t: json.loads((data_root / t / "dataset.json").read_text())["label_system"] for t in tests}
    assert systems["word2025"] == "word2025" and systems["totalseg_mr"] == "totalseg_mr"
    cells = {(train, test): json.loads((results / train / "stu_tiny" / run / test / "aeval10/summary.json").read_text())
             for train in train_sets for test in tests}
    for cell in cells.values():
        assert list(cell["organs"]) == list(AEVAL2025) and cell["n_cases"] == 1
    for train, test in (("word2025", "word2025"), ("totalseg_mr", "amos_mr")):
        cell = results / train / "stu_tiny" / run / test / "aeval10"
        assert cells[(train, test)]["mean_dsc"] == pytest.approx(_cell_reference(cell, data_root, test, systems[test]),
                                                                abs=1e-12)

    report_dir = root / "outputs/results/reports/aeval2025/individual/stu_tiny/aeval10"
    text = (report_dir / "grid.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Train"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Train \\ Test", "FLARE22", "AMOS CT", "WORD 2025", "TotalSegmentator v2", "BTCV", "CT Mean ± SD", "AMOS MR",
        "TotalSegmentator MR", "MR Mean ± SD", "All Mean ± SD"]
    rows = [line for line in text.split("### Per organ")[0].splitlines() if line.startswith("| ") and "---" not in line]
    labels = [r.strip("|").split("|")[0].strip() for r in rows[1:]]
    assert labels == ["FLARE22", "AMOS CT", "WORD 2025", "TotalSegmentator v2", "AMOS MR", "TotalSegmentator MR",
                      "CT Mean ± SD", "MR Mean ± SD", "All Mean ± SD"]
    mr_row = [c.strip() for c in rows[labels.index("TotalSegmentator MR") + 1].strip("|").split("|")]
    dsc = [100 * cells[("totalseg_mr", t)]["mean_dsc"] for t in tests]
    assert float(mr_row[6].split("±")[0]) == pytest.approx(np.mean(dsc[:5]), abs=0.0051)       # CT mean
    assert float(mr_row[9].split("±")[0]) == pytest.approx(np.mean(dsc[5:]), abs=0.0051)       # MR mean
    assert float(mr_row[10].split("±")[0]) == pytest.approx(np.mean(dsc), abs=0.0051)          # all mean
    bottom_mr = [c.strip() for c in rows[-2].strip("|").split("|")]
    flare_col = [100 * cells[(t, "flare22")]["mean_dsc"] for t in ("amos_mr", "totalseg_mr")]
    assert float(bottom_mr[1].split("±")[0]) == pytest.approx(np.mean(flare_col), abs=0.0051)
    assert "- `aeval10` (mode `aeval10`, classes `aeval2025`)" in text
    box = report_dir / "boxplot_dsc.png"
    assert box.stat().st_size > 20_000
    image = __import__("matplotlib.pyplot").pyplot.imread(str(box))
    assert image.shape[1] > 3 * image.shape[0] and image[..., :3].std() > 0.05  # seven panels side by side

    # The script's view of the same predictions: training and predictions reused, 8 organs scored.
    stamp = (results / f"flare22/stu_tiny/{run}/btcv/predictions").stat().st_mtime_ns
    outcome = run_grid(config("metric=aeval2025_script"))
    assert outcome.missing == [] and outcome.failures.exit_code() == 0
    script = json.loads((results / f"word2025/stu_tiny/{run}/word2025/aeval2025_script/summary.json").read_text())
    assert list(script["organs"]) == [o for o in AEVAL2025 if o in SCRIPT_2025]
    cell = results / f"word2025/stu_tiny/{run}/word2025/aeval2025_script"
    assert script["mean_dsc"] == pytest.approx(_cell_reference(cell, data_root, "word2025", "word2025",
                                                               rules=SCRIPT_2025), abs=1e-12)
    assert (results / f"flare22/stu_tiny/{run}/btcv/predictions").stat().st_mtime_ns == stamp
    text = (root / "outputs/results/reports/aeval2025/individual/stu_tiny/aeval2025_script/grid.md").read_text()
    assert "Not scored: adrenal_gland_left, esophagus" in text
    with open(results / f"word2025/stu_tiny/{run}/word2025/aeval2025_script/cases.csv") as handle:
        assert {r["organ"] for r in csv.DictReader(handle)} == set(SCRIPT_2025)


def test_demo_sized_variant_composes_like_the_demo():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        full = compose("grid", overrides=["experiment=aeval2025"])
        demo = compose("grid", overrides=["experiment=aeval2025_demo"])
    assert full.grid.train_sets == demo.grid.train_sets and full.metric == demo.metric
    assert full.model.size == "l" and demo.model.size == "tiny" and demo.trainer.accelerator == "cpu"
    assert demo.grid.synthetic.cases.totalseg_mr.test == 3
