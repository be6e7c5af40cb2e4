"""The synthetic A-Eval-mini: raw layouts, label systems, geometry, domain shift, determinism."""

from __future__ import annotations

import csv
import gzip
import json
import time
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CONF_DIR
from omegaconf import OmegaConf

from aeval.data import synthetic as S
from aeval.labels import get_system

# Independent reference: the orientation, dtype and label system each dataset is designed to have
# (module docstring of aeval.data.synthetic).
DESIGN = {
    "flare22": ("LPS", "int16", "uint8", "flare22"),
    "amos_ct": ("LAS", "float32", "uint16", "amos"),
    "amos_mr": ("LAS", "float32", "uint16", "amos"),
    "word": ("RAS", "uint16", "int16", "word"),
    "totalseg": ("RAS", "int32", "uint8", "totalseg_v1"),
    "btcv": ("LPS", "int16", "float32", "btcv"),
}
FLARE22_ORGANS = ("liver", "kidney_right", "spleen", "pancreas", "aorta", "inferior_vena_cava",
                  "adrenal_gland_right", "adrenal_gland_left", "gallbladder", "esophagus", "stomach",
                  "duodenum", "kidney_left")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("raw")
    start = time.perf_counter()
    summary = S.generate_mini(root, S.SyntheticConfig(), progress=False)
    print(f"\ndefault synthetic A-Eval-mini: {summary['files']} files, {len(summary['case_details'])} cases "
          f"in {time.perf_counter() - start:.1f} s")
    return root, summary


def _paired(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """(image, label) of every labelled paired case, found by the official file names."""
    flare = root / "FLARE22"
    amos = root / "AMOS/amos22"
    word = root / "WORD/WORD-V0.1.0"
    btcv = root / "BTCV/RawData/Training"

    def amos_pairs(mr: bool) -> list[tuple[Path, Path]]:
        out = []
        for images, labels in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
            for image in sorted((amos / images).glob("amos_*.nii.gz")):
                if (int(image.name[5:9]) > 500) == mr:
                    out.append((image, amos / labels / image.name))
        return out

    return {
        "flare22": [(i, i.parents[1] / "labels" / i.name.replace("_0000", "")) for i in
                    sorted(flare.glob("Training/FLARE22_LabeledCase50/images/*.nii.gz"))
                    + sorted(flare.glob("Validation/images/*.nii.gz"))],
        "amos_ct": amos_pairs(mr=False),
        "amos_mr": amos_pairs(mr=True),
        "word": [(word / f"images{s}" / f.name, f) for s in ("Tr", "Val")
                 for f in sorted((word / f"labels{s}").glob("*.nii.gz"))],
        "btcv": [(btcv / "img" / f.name.replace("label", "img"), f)
                 for f in sorted((btcv / "label").glob("*"))],
    }


def _totalseg(root: Path) -> list[dict[str, str]]:
    with (root / "TotalSegmentator/meta.csv").open() as handle:
        return list(csv.DictReader(handle, delimiter=";"))


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_yaml_mirrors_the_config_defaults():
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "mini/default.yaml"))
    assert yaml == asdict(S.SyntheticConfig())


def test_config_rejects_unknown_keys():
    assert S.SyntheticConfig.from_mapping({"cases": {"btcv": {"train": 2}}}).cases["btcv"]["train"] == 2
    for bad in ({"seeds": 1}, {"cases": {"msd": {"train": 1}}}, {"cases": {"btcv": {"val": 1}}},
                {"size_scale": 0}):
        with pytest.raises(ValueError):
            S.SyntheticConfig.from_mapping(bad)


def test_official_file_names(mini):
    root, summary = mini
    flare = root / "FLARE22"
    for i in range(1, 7):
        assert (flare / f"Training/FLARE22_LabeledCase50/images/FLARE22_Tr_{i:04d}_0000.nii.gz").is_file()
        assert (flare / f"Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_{i:04d}.nii.gz").is_file()
    for i in range(1, 5):
        assert (flare / f"Validation/images/FLARE22_Ts_{i:04d}_0000.nii.gz").is_file()
        assert (flare / f"Validation/labels/FLARE22_Ts_{i:04d}.nii.gz").is_file()
        assert (flare / f"Training/FLARE22_UnlabeledCase1-1000/Case_{i:05d}_0000.nii.gz").is_file()
    assert len(list(flare.glob("Training/FLARE22_UnlabeledCase1-1000/*"))) == 4  # images only

    amos = root / "AMOS/amos22"
    for images, labels, n_ct, n_mr in (("imagesTr", "labelsTr", 6, 4), ("imagesVa", "labelsVa", 4, 3)):
        names = sorted(p.name for p in (amos / images).glob("*.nii.gz"))
        assert names == sorted(p.name for p in (amos / labels).glob("*.nii.gz"))
        numbers = [int(n.removeprefix("amos_").removesuffix(".nii.gz")) for n in names]
        assert all(n == f"amos_{k:04d}.nii.gz" for n, k in zip(names, numbers, strict=True))
        assert sum(k <= 500 for k in numbers) == n_ct and sum(k > 500 for k in numbers) == n_mr
    dataset = json.loads((amos / "dataset.json").read_text())
    assert dataset["labels"]["0"] == "background" and dataset["labels"]["1"] == "spleen"
    assert len(dataset["labels"]) == 16 and dataset["numTraining"] == 10 and dataset["numValidation"] == 7
    for entry in dataset["training"] + dataset["validation"]:
        assert (amos / entry["image"]).is_file() and (amos / entry["label"]).is_file()
        assert entry["image"].startswith(("./imagesTr/", "./imagesVa/"))

    word = root / "WORD/WORD-V0.1.0"
    for folder, numbers in (("imagesTr", range(1, 7)), ("labelsTr", range(1, 7)), ("imagesVal", range(7, 11)),
                            ("labelsVal", range(7, 11)), ("imagesTs", range(11, 14)), ("labelsTs", range(11, 14))):
        assert sorted(p.name for p in (word / folder).iterdir()) == [f"word_{i:04d}.nii.gz" for i in numbers]

    btcv = root / "BTCV/RawData/Training"
    assert sorted(p.name for p in (btcv / "img").iterdir()) == [f"img{i:04d}.nii.gz" for i in range(1, 5)]
    assert sorted(p.name for p in (btcv / "label").iterdir()) == [f"label{i:04d}.nii.gz" for i in range(1, 5)]

    rows = _totalseg(root)
    header = (root / "TotalSegmentator/meta.csv").read_text().splitlines()[0]
    assert header == "image_id;age;gender;institute;study_type;split"
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [8, 4, 2]
    v1_names = set(get_system("totalseg_v1").names.values())
    assert len(v1_names) == 104
    for row in rows:
        folder = root / "TotalSegmentator" / row["image_id"]
        assert (folder / "ct.nii.gz").is_file()
        assert {p.name.removesuffix(".nii.gz") for p in (folder / "segmentations").iterdir()} == v1_names
    assert summary["cases"] == {"flare22": {"train": 6, "val": 4, "unlabeled": 4},
                                "amos_ct": {"train": 6, "val": 4}, "amos_mr": {"train": 4, "val": 3},
                                "word": {"train": 6, "val": 4, "test": 3},
                                "totalseg": {"train": 8, "val": 4, "test": 2}, "btcv": {"train": 4},
                                "totalseg_v2": {"train": 6, "test": 3}, "totalseg_mr": {"train": 4, "test": 3}}
    for folder, image, system, counts in (("TotalSegmentatorV2", "ct.nii.gz", "totalseg_v2", (6, 3)),
                                          ("TotalSegmentatorMRI", "mri.nii.gz", "totalseg_mr", (4, 3))):
        with (root / folder / "meta.csv").open() as handle:
            rows = list(csv.DictReader(handle, delimiter=";"))
        assert [sum(r["split"] == s for r in rows) for s in ("train", "test")] == list(counts)
        names = set(get_system(system).names.values())
        for row in rows:
            assert (root / folder / row["image_id"] / image).is_file()
            assert {p.name.removesuffix(".nii.gz") for p in (root / folder / row["image_id"] / "segmentations")
                    .iterdir()} == names


def test_dataset_registry_finds_every_case(mini):
    """The conf/dataset contract: the registry's globs find what was written, split by split."""
    from aeval.data.registry import DatasetSpec

    root, _ = mini
    expected = {"flare22": {"train": 6, "test": 4}, "flare22_unlabeled": {"train": 4},
                "amos_ct": {"train": 6, "test": 4}, "amos_mr": {"train": 4, "test": 3},
                "word": {"train": 6, "test": 4}, "totalseg": {"train": 8, "test": 4}, "btcv": {"test": 4},
                "word2025": {"train": 6, "test": 3}, "totalseg_v2": {"train": 6, "test": 3},
                "totalseg_mr": {"train": 4, "test": 3}}
    for name, counts in expected.items():
        dataset_yaml = OmegaConf.load(CONF_DIR / f"dataset/{name}.yaml")
        cfg = OmegaConf.merge({"paths": {"raw_root": str(root)}}, dataset_yaml)
        cfg = OmegaConf.to_container(cfg, resolve=True)
        cases = DatasetSpec.from_config({k: v for k, v in cfg.items() if k != "paths"}).find_cases()
        assert {s: sum(c.split == s for c in cases) for s in counts} == counts, name
        assert all(c.image.is_file() and (c.label is None or c.label.exists()) for c in cases)


def test_labels_belong_to_each_system_and_cover_its_classes(mini):
    root, _ = mini
    expected = {"flare22": range(1, 14), "amos_ct": range(1, 16), "amos_mr": range(1, 14),
                "word": range(1, 17), "btcv": range(1, 14)}
    for dataset, pairs in _paired(root).items():
        system = get_system(DESIGN[dataset][3])
        present = set()
        for _, label in pairs:
            values = _data(label)
            system.check_values(values, what=str(label))  # raises on a value outside the system
            ids, counts = np.unique(values, return_counts=True)
            present |= {int(i) for i in ids if i}
            assert counts[1:].min() >= 8, f"{label}: a structure has fewer than 8 voxels"
        assert set(expected[dataset]) <= present, dataset
    organs_seen = set()
    for row in _totalseg(root):
        seg = root / "TotalSegmentator" / row["image_id"] / "segmentations"
        organs_seen |= {o for o in FLARE22_ORGANS if _data(seg / f"{o}.nii.gz").any()}
        masks = [_data(p) for p in seg.glob("*.nii.gz")]
        assert all(set(np.unique(m)) <= {0, 1} for m in masks)
        assert (np.sum(masks, axis=0) <= 1).all()  # one structure per voxel
    assert organs_seen == set(FLARE22_ORGANS)


def test_image_and_label_share_geometry(mini):
    root, _ = mini
    pairs = [p for group in _paired(root).values() for p in group]
    pairs += [(root / "TotalSegmentator" / r["image_id"] / "ct.nii.gz", mask) for r in _totalseg(root)
              for mask in sorted((root / "TotalSegmentator" / r["image_id"] / "segmentations").glob("*"))[:5]]
    assert len(pairs) > 50
    for image_path, label_path in pairs:
        image, label = nib.load(str(image_path)), nib.load(str(label_path))
        assert image.shape == label.shape and len(image.shape) == 3
        assert np.array_equal(image.affine, label.affine), label_path
        assert (image.header["qform_code"], image.header["sform_code"]) == (1, 1)
        assert (label.header["qform_code"], label.header["sform_code"]) == (1, 1)


def test_orientation_and_dtypes_per_dataset(mini):
    root, _ = mini
    images = {dataset: [p for p in pairs] for dataset, pairs in _paired(root).items()}
    images["totalseg"] = [(root / "TotalSegmentator" / r["image_id"] / "ct.nii.gz",
                           root / "TotalSegmentator" / r["image_id"] / "segmentations/liver.nii.gz")
                          for r in _totalseg(root)]
    for dataset, pairs in images.items():
        codes, image_dtype, label_dtype, _ = DESIGN[dataset]
        for image_path, label_path in pairs:
            image = nib.load(str(image_path))
            assert "".join(nib.aff2axcodes(image.affine)) == codes, image_path
            assert image.get_data_dtype() == np.dtype(image_dtype), image_path
            assert nib.load(str(label_path)).get_data_dtype() == np.dtype(label_dtype), label_path
    assert len({codes for codes, *_ in DESIGN.values()}) == 3
    word = nib.load(str(images["word"][0][0]))
    assert word.dataobj.inter == -1024 and word.dataobj.slope == 1  # DICOM-style rescale: HU = stored - 1024


def test_spacing_and_field_of_view_differ_between_datasets(mini):
    _, summary = mini
    by_dataset: dict[str, list[dict]] = {}
    for case in summary["case_details"]:
        by_dataset.setdefault(case["dataset"], []).append(case)
    z_spacing = {d: {round(c["spacing"][2], 2) for c in cases} for d, cases in by_dataset.items()}
    assert z_spacing["amos_ct"] == {7.5} and z_spacing["word"] == {6.0} and z_spacing["amos_mr"] == {8.0}
    assert len(z_spacing["flare22"]) > 1  # FLARE22 slice thickness varies per case
    assert all(abs(c["spacing"][2] - c["spacing"][0]) < 1e-3 for c in by_dataset["totalseg"])  # isotropic
    assert {tuple(c["shape"][:2]) for c in by_dataset["amos_mr"]} == {(60, 50)}
    # AMOS CT and WORD reach the pelvis: more slices than the upper-abdomen MR at a similar thickness
    depth = {d: np.mean([c["shape"][2] * c["spacing"][2] for c in cases]) for d, cases in by_dataset.items()}
    assert depth["amos_ct"] > depth["flare22"] > depth["amos_mr"]


def _region_mean(image: np.ndarray, labels: np.ndarray, label_id: int) -> float:
    return float(np.median(image[labels == label_id]))


def test_ct_is_hu_and_mr_is_not(mini):
    root, _ = mini
    pairs = _paired(root)
    amos = get_system("amos")
    liver, gallbladder, spleen = amos.id_of("liver"), amos.id_of("gallbladder"), amos.id_of("spleen")
    for image_path, label_path in pairs["amos_ct"][:3]:
        image, labels = _data(image_path).astype(np.float32), _data(label_path)
        corner = image[:4, :4, :]
        assert np.median(corner) < -900  # air
        assert 40 < _region_mean(image, labels, liver) < 200
        assert _region_mean(image, labels, gallbladder) < _region_mean(image, labels, liver)
    for image_path, label_path in pairs["amos_mr"]:
        image, labels = _data(image_path).astype(np.float32), _data(label_path)
        assert image.min() >= 0  # magnitude image: no negative values, no air at -1000
        assert np.median(image[:4, :4, :]) < 0.2 * np.median(image[labels > 0])
        # T2-like ordering, unlike CT: bile brighter than spleen brighter than liver
        assert _region_mean(image, labels, gallbladder) > _region_mean(image, labels, spleen) > \
            _region_mean(image, labels, liver)
    word_image = nib.load(str(pairs["word"][0][0]))
    hu = np.asanyarray(word_image.dataobj)  # scaled by nibabel
    assert -1030 < hu.min() < -900 and hu.max() > 500  # air and bone in HU after the rescale


def test_missing_classes_follow_the_label_systems(mini):
    """WORD has no aorta/IVC and one adrenal label, BTCV no duodenum: the anatomy is there, unlabelled."""
    root, _ = mini
    config = S.SyntheticConfig()
    cases = {c.case_id: c for c in S.plan_cases(root, config)}
    for dataset, absent, merged in (("word", ("aorta", "inferior_vena_cava"), "adrenal_glands"),
                                    ("btcv", ("duodenum",), None)):
        system = get_system(DESIGN[dataset][3])
        assert all(system.id_of(name) is None for name in absent)
        for _, label_path in _paired(root)[dataset][:2]:
            case = cases[label_path.name.removesuffix(".nii.gz").replace("label", "img")]
            rendered = S.render_case(S.PROFILES[dataset], S.case_rng(config.seed, case), case.region)
            written = _data(label_path).astype(int)
            for name in absent:
                where = rendered.structures == S.STRUCTURE_ID[name]
                assert where.sum() > 20 and (written[where] == 0).all()
            liver = rendered.structures == S.STRUCTURE_ID["liver"]
            assert (written[liver] == system.id_of("liver")).all()
            if merged:
                for side in ("right", "left"):
                    where = rendered.structures == S.STRUCTURE_ID[f"adrenal_gland_{side}"]
                    assert where.any() and (written[where] == system.id_of(merged)).all()


def test_off_centre_totalsegmentator_cases(mini):
    root, _ = mini
    rows = _totalseg(root)
    studies = {r["study_type"] for r in rows}
    assert {"ct thorax", "ct pelvis", "ct abdomen"} <= studies
    names = ("liver", "kidney_left", "kidney_right", "urinary_bladder", "lung_lower_lobe_left",
             "heart_myocardium")
    counts = {}
    for row in rows:
        seg = root / "TotalSegmentator" / row["image_id"] / "segmentations"
        counts[row["image_id"]] = {name: int(_data(seg / f"{name}.nii.gz").sum()) for name in names}
    kidneys = {case: c["kidney_left"] + c["kidney_right"] for case, c in counts.items()}
    abdomen_kidneys = np.median([kidneys[r["image_id"]] for r in rows if r["study_type"] == "ct abdomen"])
    for row in rows:
        voxels = counts[row["image_id"]]
        if row["study_type"] == "ct thorax":  # at most the tip of an upper pole
            assert kidneys[row["image_id"]] < 0.05 * abdomen_kidneys
            assert voxels["lung_lower_lobe_left"] > 0 and voxels["heart_myocardium"] > 0
        elif row["study_type"] == "ct pelvis":
            assert voxels["liver"] == 0 and voxels["urinary_bladder"] > 0
        else:
            assert voxels["liver"] > 0 and voxels["kidney_left"] > 0 and voxels["kidney_right"] > 0


def _tiny(**cases) -> S.SyntheticConfig:
    counts = {dataset: dict.fromkeys(splits, 0) for dataset, splits in S.DEFAULT_CASES.items()}
    for dataset, splits in cases.items():
        counts[dataset].update(splits)
    return S.SyntheticConfig.from_mapping({"size_scale": 0.5, "cases": counts, "seed": 5})


def test_deterministic_by_seed(tmp_path):
    config = _tiny(flare22={"train": 1}, amos_mr={"val": 1}, totalseg={"train": 1}, btcv={"train": 1})
    first = S.generate_mini(tmp_path / "a", config, progress=False)
    second = S.generate_mini(tmp_path / "b", config, progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    metadata = 2  # meta.csv and AMOS's dataset.json
    assert files_a == files_b and len(files_a) == first["files"] + metadata == second["files"] + metadata
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    config.seed = 6
    S.generate_mini(tmp_path / "c", config, progress=False)
    image = "FLARE22/Training/FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz"
    assert gzip.decompress((tmp_path / "a" / image).read_bytes()) != \
        gzip.decompress((tmp_path / "c" / image).read_bytes())


def test_a_case_does_not_depend_on_the_other_counts(tmp_path):
    one = _tiny(word={"train": 1})
    more = _tiny(word={"train": 2, "val": 1}, btcv={"train": 1})
    S.generate_mini(tmp_path / "one", one, progress=False)
    S.generate_mini(tmp_path / "more", more, progress=False)
    rel = "WORD/WORD-V0.1.0/labelsTr/word_0001.nii.gz"
    assert np.array_equal(_data(tmp_path / "one" / rel), _data(tmp_path / "more" / rel))


def test_size_scale_changes_resolution_not_anatomy(tmp_path):
    config = _tiny(btcv={"train": 1})
    S.generate_mini(tmp_path / "small", config, progress=False)
    config.size_scale = 1.0
    S.generate_mini(tmp_path / "full", config, progress=False)
    small = nib.load(str(tmp_path / "small/BTCV/RawData/Training/label/label0001.nii.gz"))
    full = nib.load(str(tmp_path / "full/BTCV/RawData/Training/label/label0001.nii.gz"))
    assert all(f == 2 * s for f, s in zip(full.shape[:2], small.shape[:2], strict=True))
    liver_id = get_system("btcv").id_of("liver")
    volumes = [float((np.asanyarray(img.dataobj) == liver_id).sum() * np.prod(img.header.get_zooms()))
               for img in (small, full)]
    assert volumes[0] == pytest.approx(volumes[1], rel=0.2)  # same liver in mm^3 at either resolution


def test_small_mini_and_its_overview(tmp_path):
    out = tmp_path / "raw"
    cases = {d: {s: 0 for s in splits} for d, splits in S.DEFAULT_CASES.items()}
    cases["flare22"]["train"] = cases["amos_mr"]["train"] = 1
    cases["totalseg"]["train"] = 3
    summary = S.generate_mini(out, {"seed": 2, "size_scale": 0.5, "cases": cases})
    assert summary["cases"]["flare22"] == {"train": 1}
    assert (out / "FLARE22/Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_0001.nii.gz").is_file()
    import matplotlib.image

    png = matplotlib.image.imread(S.render_overview(out, tmp_path / "overview.png"))
    assert png.shape[1] > png.shape[0] > 200 and png[..., :3].std() > 0.05
    with pytest.raises(ValueError):
        S.generate_mini(out, {"cases": {"msd": {"train": 1}}})
