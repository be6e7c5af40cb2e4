"""``aeval.evidence`` from a results folder: the per-case table and its flags, bootstrap intervals equal to
scipy's on the same resamples (cells and means over test sets), paired comparisons (scipy's paired bootstrap
and Wilcoxon, Holm), both-empty accounting, rank-then-aggregate, worst-case galleries, and the report CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from aeval import evidence
from aeval.evidence import Bootstrap, EvidenceOptions, build_evidence, compare_runs, load_case_table, parse_selectors
from aeval.keys import CellKey
from aeval.labels import AEVAL8_ORGANS, get_system
from aeval.reporting.tables import grids_of
from aeval.results import CASES_CSV, cell_dir, predictions_dir, read_case_rows, write_cell
from aeval.scoring import score_folder, summarize
from aeval.stats import holm, rng_for

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("stu_s", "stu_l")
TRAINS = ("flare22", "word")
TESTS = ("flare22", "btcv")
N_CASES = 25
B = 2000


def _rows(rng, base, test, n=N_CASES, flags=True):
    rows = []
    for c in range(n):
        for o, organ in enumerate(AEVAL8_ORGANS):
            gt_empty = (c + o) % 11 == 0
            pred_empty = gt_empty and c % 2 == 0
            value = (1.0 if pred_empty else 0.0) if gt_empty else float(np.clip(base + rng.normal(0, 0.06), 0, 1))
            row = {"case": f"{test}_{c:03d}", "organ": organ, "dsc": value, "nsd": min(1.0, value + 0.02)}
            if flags:
                row.update(gt_empty=gt_empty, pred_empty=pred_empty)
            rows.append(row)
    return rows


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    rng = np.random.default_rng(0)
    for model in MODELS:
        for train in TRAINS:
            for test in TESTS:
                rows = _rows(rng, 0.8 + (0.05 if model == "stu_l" else 0) + (0.05 if train == test else 0), test)
                write_cell(root, CellKey("individual", train, model, f"r{model[-1]}", test, "aeval"),
                           summarize(rows, AEVAL8_ORGANS), rows)
    return root


def _key(model, train, test):
    return CellKey("individual", train, model, f"r{model[-1]}", test, "aeval")


def _case_means(root, key, rule="published"):
    rows = read_case_rows(root, key)
    by_case = {}
    for r in rows:
        if rule == "excluded" and r["gt_empty"] and r["pred_empty"]:
            continue
        by_case.setdefault(r["case"], []).append(100 * r["dsc"])
    return np.array([np.mean(by_case[c]) for c in sorted(by_case)])


def test_flags_are_scored_and_old_cells_still_read(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    flare = {name: i for i, name in get_system("flare22").names.items()}
    gt = np.zeros((12, 12, 6), np.uint8)
    gt[2:6, 2:6, 1:4] = flare["liver"]
    pred = gt.copy()
    pred[8:10, 8:10, 2:4] = flare["spleen"]  # spleen predicted, absent from the ground truth
    for folder, data in ((gt_dir, gt), (pred_dir, pred)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(folder / "case_000.nii.gz"))
    out = tmp_path / "out"
    result = score_folder(pred_dir, gt_dir, "flare22", "flare22", out_dir=out, progress=False)
    with open(out / CASES_CSV, newline="") as f:
        rows = {r["organ"]: r for r in csv.DictReader(f)}
    assert (rows["liver"]["gt_empty"], rows["liver"]["pred_empty"], rows["liver"]["dsc"]) == ("0", "0", "1.0")
    assert (rows["spleen"]["gt_empty"], rows["spleen"]["pred_empty"], rows["spleen"]["dsc"]) == ("1", "0", "0.0")
    assert (rows["pancreas"]["gt_empty"], rows["pancreas"]["pred_empty"], rows["pancreas"]["dsc"]) == ("1", "1", "1.0")
    assert result.summary["n_both_empty"] == 6 and result.summary["both_empty_fraction"] == 6 / 8
    # a cell scored before the flags: four columns, flags unknown
    key = CellKey("individual", "flare22", "stu_s", "r0", "btcv", "aeval")
    write_cell(tmp_path / "res", key, {"mean_dsc": 0.5, "mean_nsd": 0.5},
               [{"case": "a", "organ": "liver", "dsc": 0.5, "nsd": 0.5}])
    path = cell_dir(tmp_path / "res", key) / CASES_CSV
    path.write_text("case,organ,dsc,nsd\na,liver,0.5,0.5\n")
    assert read_case_rows(tmp_path / "res", key) == [
        {"case": "a", "organ": "liver", "dsc": 0.5, "nsd": 0.5, "gt_empty": None, "pred_empty": None}]
    table = load_case_table(tmp_path / "res")
    assert np.isnan(table.both_empty).all()


def test_case_table(results, tmp_path):
    build_evidence(results, tmp_path / "out", EvidenceOptions())
    with open(tmp_path / "out" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MODELS) * len(TRAINS) * len(TESTS) * N_CASES * 8
    assert list(rows[0]) == list(evidence.CASE_COLUMNS)
    stored = read_case_rows(results, _key("stu_s", "flare22", "btcv"))
    mine = [r for r in rows if (r["model"], r["train"], r["test"]) == ("stu_s", "flare22", "btcv")]
    assert [float(r["dsc"]) for r in mine] == pytest.approx([100 * r["dsc"] for r in stored], abs=1e-12)
    both = [r["both_empty"] == "1" for r in mine]
    assert both == [bool(r["gt_empty"] and r["pred_empty"]) for r in stored] and any(both)


def test_cell_and_mean_intervals_are_scipys(results):
    table = load_case_table(results)
    boot = Bootstrap(table, n_resamples=B, seed=3)
    index = {k: i for i, k in enumerate(table.keys)}
    key = _key("stu_s", "flare22", "btcv")
    values = _case_means(results, key)
    ref = stats.bootstrap((values,), np.mean, n_resamples=B, method="percentile", rng=rng_for(3, "btcv"))
    mean, low, high = boot.interval([index[key]], "dsc")
    assert mean == pytest.approx(values.mean(), abs=1e-10)
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-9)
    # a row mean over two test sets: each resampled on its own, the replicates averaged
    keys = [_key("stu_s", "flare22", t) for t in TESTS]
    distributions = [stats.bootstrap((_case_means(results, k),), np.mean, n_resamples=B, method="percentile",
                                     rng=rng_for(3, k.test)).bootstrap_distribution for k in keys]
    expected = np.percentile(np.mean(distributions, axis=0), [2.5, 97.5])
    mean, low, high = boot.interval([index[k] for k in keys], "dsc")
    assert mean == pytest.approx(np.mean([_case_means(results, k).mean() for k in keys]), abs=1e-10)
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-9)


def test_excluded_rule_and_both_empty_share(results, tmp_path):
    table = load_case_table(results)
    key = _key("stu_l", "word", "flare22")
    i = table.keys.index(key)
    rows = read_case_rows(results, key)
    kept = [100 * r["dsc"] for r in rows if not (r["gt_empty"] and r["pred_empty"])]
    assert Bootstrap(table, "excluded", 10).point(i, "dsc") == pytest.approx(np.mean(kept), abs=1e-10)
    assert Bootstrap(table, "published", 10).point(i, "dsc") == pytest.approx(
        np.mean([100 * r["dsc"] for r in rows]), abs=1e-10)
    found = build_evidence(results, tmp_path / "out", EvidenceOptions(empty_grid=True))
    share = 100 * np.mean([bool(r["gt_empty"] and r["pred_empty"]) for r in rows])
    with open(tmp_path / "out" / "empty_pairs.csv", newline="") as f:
        record = next(r for r in csv.DictReader(f) if (r["model"], r["train"], r["test"]) == ("stu_l", "word",
                                                                                              "flare22"))
    assert float(record["both_empty_pct"]) == pytest.approx(share)
    assert float(record["dsc_excluded"]) == pytest.approx(np.mean(kept))
    assert "both-empty pairs excluded" in found.text
    assert (tmp_path / "out" / "empty_pairs_aeval_stu_l.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_comparisons_are_scipys_with_holm(results):
    table = load_case_table(results)
    boot = Bootstrap(table, n_resamples=B, seed=1)
    comparisons = compare_runs(boot, parse_selectors(["stu_l", "stu_s"], table.keys))
    assert len(comparisons) == len(TRAINS) * len(TESTS) * 2
    one = next(c for c in comparisons if c.match == "FLARE22" and c.test == "btcv" and c.measure == "dsc")
    a = _case_means(results, _key("stu_l", "flare22", "btcv"))
    b = _case_means(results, _key("stu_s", "flare22", "btcv"))
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                          n_resamples=B, method="percentile", rng=rng_for(1, "btcv"))
    assert one.values["diff"] == pytest.approx((a - b).mean(), abs=1e-10)
    assert (one.values["low"], one.values["high"]) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-9)
    assert one.values["p"] == pytest.approx(stats.wilcoxon(a - b).pvalue, rel=1e-12)
    family = [c for c in comparisons if c.measure == "dsc"]
    assert [c.p_holm for c in family] == pytest.approx(list(holm([c.values["p"] for c in family])))
    assert parse_selectors("model", table.keys) == [{"model": "stu_s"}, {"model": "stu_l"}]
    with pytest.raises(ValueError, match="'nope' is in no run field"):
        parse_selectors(["nope", "stu_s"], table.keys)


def test_ranks(results):
    table = load_case_table(results)
    boot = Bootstrap(table, n_resamples=500)
    grids = grids_of(evidence.grid_cells(table)[0])
    studies = evidence.rank_studies(boot, grids, evidence.grid_cells(table)[1])
    sizes = next(s for s in studies if s.title.startswith("Model sizes"))
    assert sizes.entries == ["STU-Net-S", "STU-Net-L"]
    # hand check of the mean rank: per (block, case, organ) and measure, ties share rank 1
    s_cells = [table.keys.index(_key("stu_s", tr, te)) for tr in TRAINS for te in TESTS]
    l_cells = [table.keys.index(_key("stu_l", tr, te)) for tr in TRAINS for te in TESTS]
    ranks = []
    for si, li in zip(s_cells, l_cells, strict=True):
        for m in ("dsc", "nsd"):
            vs, vl = table.values(m)[table.cell == si], table.values(m)[table.cell == li]
            ranks += [(1 + (x < y), 1 + (y < x)) for x, y in zip(vs, vl, strict=True)]
    assert sizes.mean_rank == pytest.approx(np.mean(ranks, axis=0))
    assert sizes.frequencies[1, 0] == 1.0 and sizes.frequencies.sum(1) == pytest.approx([1, 1])


def _gallery_data(tmp_path, results):
    data_root = tmp_path / "unified"
    (data_root / "btcv" / "imagesTs").mkdir(parents=True)
    (data_root / "btcv" / "labelsTs").mkdir()
    (data_root / "btcv" / "dataset.json").write_text(json.dumps({"label_system": "btcv"}))
    btcv = {n: i for i, n in get_system("btcv").names.items()}
    flare = {n: i for i, n in get_system("flare22").names.items()}
    key = _key("stu_s", "flare22", "btcv")
    table = load_case_table(results)
    worst, organ = evidence.worst_cases(Bootstrap(table, n_resamples=1), table.keys.index(key), 1)[0][:2]
    gt = np.zeros((40, 36, 12), np.uint8)
    gt[8:24, 8:22, 3:9] = btcv[organ]
    pred = np.zeros_like(gt)
    pred[14:30, 10:26, 4:10] = flare[organ]
    image = (np.random.default_rng(0).normal(0, 1, gt.shape) + 3 * (gt > 0)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1])
    nib.save(nib.Nifti1Image(image, affine), str(data_root / "btcv" / "imagesTs" / f"{worst}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(gt, affine), str(data_root / "btcv" / "labelsTs" / f"{worst}.nii.gz"))
    folder = predictions_dir(results, key.run_key, "btcv")
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(pred, affine), str(folder / f"{worst}.nii.gz"))
    return data_root, worst


def test_worst_case_gallery(results, tmp_path):
    data_root, worst = _gallery_data(tmp_path, results)
    found = build_evidence(results, tmp_path / "out", EvidenceOptions(gallery=1), data_root=data_root)
    png = tmp_path / "out" / "gallery" / "individual_flare22_stu_s_rs_btcv_aeval" / f"{worst}.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"gallery/individual_flare22_stu_s_rs_btcv_aeval/{worst}.png" in found.text
    # the other off-diagonal cells have no files: one line each, no crash
    assert found.problems and all("file not found" in p or "no dataset.json" in p for p in found.problems)
    assert not any("flare22_stu_s_rs_flare22" in p for p in found.problems)  # diagonal cells get no gallery


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "aeval.report", *args, f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AEVAL_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)})


def test_cli_intervals_and_comparisons(results, tmp_path):
    out = tmp_path / "o"
    proc = _cli(tmp_path, f"results={results}", f"out={out}", "evidence.ci=true", "evidence.n_resamples=500",
                "compare=[{model:stu_l},{model:stu_s}]", "evidence.ranks=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| Train \\ Test | FLARE22 | BTCV | Mean |" in proc.stdout  # the paper's layout still printed
    assert "STU-Net-S · metric aeval — DSC (%) with 95% bootstrap intervals" in proc.stdout
    table = load_case_table(results)
    boot = Bootstrap(table, n_resamples=500)
    i = table.keys.index(_key("stu_s", "flare22", "btcv"))
    assert evidence.fmt_interval(boot.interval([i], "dsc")) in proc.stdout
    assert "### Paired comparisons" in proc.stdout and "Rank-then-aggregate — Model sizes" in proc.stdout
    for name in ("cases.csv", "intervals.csv", "paired.csv", "paired_forest.png", "ranks.csv", "evidence.md"):
        assert (out / name).exists(), name
    with open(out / "intervals.csv", newline="") as f:
        record = next(r for r in csv.DictReader(f) if r["model"] == "stu_s" and r["row"] == "Mean"
                      and r["column"] == "Mean" and r["measure"] == "dsc")
    assert record["seed"] == "0" and record["n_resamples"] == "500"
    bad = _cli(tmp_path, f"results={results}", f"out={out}", "compare=[nope,stu_s]")
    assert bad.returncode == 2 and "compare: 'nope' is in no run field" in bad.stdout.strip().splitlines()[-1]
    assert "Traceback" not in bad.stdout + bad.stderr
