"""aeval's planner vs nnU-Net 2.8's own (``DatasetFingerprintExtractor`` + the default ``ExperimentPlanner``,
what ``nnUNetv2_plan_and_preprocess`` plans with) on the same converted datasets, in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/benchmarks/nnunet_planner.py [--samples 1e8] [--repeats 2]

Datasets: the real small CT (``../shared/data/real/example_ct_sm`` + ``example_seg``, one case) and the
synthetic A-Eval-mini FLARE22 (LPS, int16) and WORD (RAS, uint16 with a -1024 rescale) training sets, each
converted by aeval's converter and exported by ``aeval.data.nnunet_export``. Per dataset: target spacing and
CT statistics of both (nnU-Net's mapped to RAS), patch size and stages of both, and the seconds of each
planner (fingerprint + plan; wall and CPU incl. nnU-Net's worker; the last of ``--repeats`` runs, so both read
warm files) with their ratio. nnunetv2 is the reference (pip install -e '.[nnunet]' torch==2.13.0)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from nnunet_planner_reference import cpu_seconds, nnunet_plan, to_ras  # noqa: E402

from aeval.data import synthetic as S  # noqa: E402
from aeval.data.convert import convert_dataset  # noqa: E402
from aeval.data.nnunet_export import export_dataset  # noqa: E402
from aeval.data.planner import fingerprint_datasets, make_plan  # noqa: E402
from aeval.data.registry import DatasetSpec  # noqa: E402

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
CONF_DIR = Path(__file__).resolve().parents[2] / "aeval" / "conf"
STATS = ("mean", "std", "percentile_00_5", "percentile_99_5")
# Patch sizes at A-Eval scale: illustrative CT fingerprints (10 equal cases, stored RAS; spacing mm, shape after
# crop), not measured datasets. Only the planning rules run here; no image is read.
SCALES = {"0.8x0.8x2.5 mm, 512x512x100": ((0.8, 0.8, 2.5), (512, 512, 100)),
          "1.5 mm isotropic, 300^3": ((1.5, 1.5, 1.5), (300, 300, 300)),
          "0.7x0.7x5 mm, 512x512x60": ((0.7, 0.7, 5.0), (512, 512, 60))}


def real_dataset(root: Path) -> Path | None:
    """The real CT and its labels as a one-case unified dataset (symlinks), or None when absent."""
    image, labels = REAL / "example_ct_sm.nii.gz", REAL / "example_seg.nii.gz"
    if not (image.exists() and labels.exists()):
        return None
    folder = root / "real_ct"
    for source, target in [(image, folder / "imagesTr" / "real_000_0000.nii.gz"),
                           (labels, folder / "labelsTr" / "real_000.nii.gz")]:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)
    (folder / "dataset.json").write_text(json.dumps({
        "name": "real_ct", "modality": "CT", "label_system": "totalseg_v2", "channel_names": {"0": "CT"},
        "labels": {"background": 0}, "numTraining": 1, "numTest": 0, "file_ending": ".nii.gz"}))
    (folder / "splits.json").write_text(json.dumps({"train": ["real_000"], "test": []}))
    return folder


def synthetic_datasets(tmp: Path, names=("flare22", "word")) -> list[Path]:
    """A-Eval-mini training cases of ``names`` written in their raw layouts and converted by aeval."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    counts = {d: dict.fromkeys(splits, 0) for d, splits in S.DEFAULT_CASES.items()}
    for name in names:
        counts[name].update(train=S.DEFAULT_CASES[name]["train"], val=1)  # the converter wants a test split
    S.generate_mini(tmp / "raw_mini", S.SyntheticConfig.from_mapping({"cases": counts, "seed": 0}), progress=False)
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = compose("prepare", overrides=[f"paths.raw_root={tmp / 'raw_mini'}", f"paths.root_dir={tmp}"])
    for name in names:
        spec = DatasetSpec.from_config(OmegaConf.to_container(cfg.datasets[name], resolve=True))
        convert_dataset(spec, tmp / "unified")
    return [tmp / "unified" / name for name in names]


def aeval_plan(folder: Path, samples: int) -> tuple[dict, dict, dict]:
    times = [(time.perf_counter(), cpu_seconds())]
    fingerprint = fingerprint_datasets([folder], max_intensity_samples=samples)
    times.append((time.perf_counter(), cpu_seconds()))
    plan = make_plan(fingerprint).to_dict()
    times.append((time.perf_counter(), cpu_seconds()))
    (w0, c0), (w1, c1), (w2, c2) = times
    return fingerprint, plan, {"fingerprint_wall_s": w1 - w0, "fingerprint_cpu_s": c1 - c0,
                               "plan_wall_s": w2 - w1, "plan_cpu_s": c2 - c1}


def report(folder: Path, fingerprint: dict, plan: dict, nnunet: dict) -> None:
    affine = nib.load(next((folder / "imagesTr").glob("*_0000.nii.gz"))).affine
    plans = nnunet["plans"]
    fullres, forward = plans["configurations"]["3d_fullres"], plans["transpose_forward"]
    theirs, ours = plans["foreground_intensity_properties_per_channel"]["0"], fingerprint["intensity"]["CT"]
    print(f"\n## {folder.name}: {len(fingerprint['cases'])} case(s), stored {fingerprint['cases'][0]['orientation']}, "
          f"nnU-Net transpose_forward {forward}")
    print("| | aeval | nnU-Net 2.8 (in RAS) | equal |\n|---|---|---|---|")
    spacing = to_ras(fullres["spacing"], forward, affine)
    print(f"| target spacing | {_fmt(plan['target_spacing'])} | {_fmt(spacing)} | "
          f"{np.allclose(plan['target_spacing'], spacing, rtol=1e-12, atol=0)} |")
    for key in STATS:
        print(f"| {key} | {ours[key]!r} | {theirs[key]!r} | {ours[key] == theirs[key]} |")
    print(f"| samples | {ours['num_samples']} | {fingerprint['intensity_sampling']['max_samples']} in all | |")
    n_stages = fullres["architecture"]["arch_kwargs"]["n_stages"]
    print(f"| patch size | {plan['patch_size']} ({np.prod(plan['patch_size'])} voxels, 6 stages) | "
          f"{[int(n) for n in to_ras(fullres['patch_size'], forward, affine)]} "
          f"({np.prod(fullres['patch_size'])} voxels, {n_stages} stages, batch {fullres['batch_size']}) | |")
    print(f"| median shape after resampling | {_fmt(plan['median_shape_after_resampling'], 1)} | "
          f"{_fmt(to_ras(fullres['median_image_size_in_voxels'], forward, affine), 1)} | |")


def scale_rows(tmp: Path) -> None:
    """aeval's and nnU-Net's patch size for the fingerprints of :data:`SCALES` (nnU-Net: its default 8 GB
    ExperimentPlanner on a fingerprint file it is handed)."""
    import contextlib
    import io

    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    from aeval.data.nnunet_export import nnunet_dataset_json

    stats = {"mean": 60.0, "std": 80.0, "percentile_00_5": -150.0, "percentile_99_5": 300.0, "median": 55.0,
             "min": -1000.0, "max": 1500.0}
    print("\n## Patch size at A-Eval scale (planning rules only, 14 classes)\n"
          "| fingerprint | target spacing aeval / nnU-Net | aeval patch (voxels) | nnU-Net 3d_fullres patch "
          "(voxels, stages, batch) |\n|---|---|---|---|")
    for i, (label, (spacing, shape)) in enumerate(SCALES.items(), start=1):
        name = f"Dataset{800 + i}_scale{i}"
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine),
                 _mkdir(tmp / "raw" / name / "imagesTr") / "case_000_0000.nii.gz")
        meta = nnunet_dataset_json({"name": name, "modality": "CT", "label_system": "flare22"}, 10)
        (tmp / "raw" / name / "dataset.json").write_text(json.dumps(meta))
        fingerprint = {"spacings": [list(spacing[::-1])] * 10, "shapes_after_crop": [list(shape[::-1])] * 10,
                       "foreground_intensity_properties_per_channel": {"0": stats},
                       "median_relative_size_after_cropping": 1.0}
        (_mkdir(tmp / "nnunet_pre" / name) / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
        with contextlib.redirect_stdout(io.StringIO()):
            plans, _ = plan_experiment_dataset(name)
        fullres, forward = plans["configurations"]["3d_fullres"], plans["transpose_forward"]
        ours = make_plan({"sources_digest": "-", "datasets": [{"name": name, "modality": "CT",
                                                                "label_system": "flare22"}],
                          "cases": [{"spacing": list(spacing), "shape": list(shape), "shape_after_crop": list(shape)}]
                          * 10, "intensity": {"CT": stats}}).to_dict()
        patch = [int(n) for n in to_ras(fullres["patch_size"], forward, affine)]
        print(f"| {label} | {_fmt(ours['target_spacing'], 3)} / {_fmt(to_ras(fullres['spacing'], forward, affine), 3)}"
              f" | {ours['patch_size']} ({np.prod(ours['patch_size'])}) | {patch} ({np.prod(patch)}, "
              f"{fullres['architecture']['arch_kwargs']['n_stages']}, {fullres['batch_size']}) |")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(values, digits: int = 4) -> str:
    return "[" + ", ".join(f"{float(v):.{digits}f}" for v in values) + "]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=float, default=1e8, help="foreground voxels in all (nnU-Net's 1e8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--scale-only", action="store_true", help="only the A-Eval-scale patch sizes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(nnUNet_raw=str(tmp / "raw"), nnUNet_preprocessed=str(tmp / "nnunet_pre"),
                          nnUNet_results=str(tmp / "results"))  # before nnunetv2 is first imported
        if args.scale_only:
            scale_rows(tmp)
            return
        folders = [f for f in [real_dataset(tmp / "unified")] if f] + synthetic_datasets(tmp)
        timings = []
        for i, folder in enumerate(folders, start=1):
            raw_name = export_dataset(folder, tmp / "raw", 600 + i).folder.name
            for _ in range(args.repeats):
                fingerprint, plan, ours = aeval_plan(folder, int(args.samples))
                nnunet = nnunet_plan(raw_name, args.samples)
            report(folder, fingerprint, plan, nnunet)
            timings.append((folder.name, ours, nnunet))
        print("\n| dataset | aeval fingerprint + plan s (CPU s) | nnU-Net fingerprint + plan s (CPU s) | "
              "aeval / nnU-Net wall (CPU) |\n|---|---|---|---|")
        for name, ours, theirs in timings:
            wall = [t["fingerprint_wall_s"] + t["plan_wall_s"] for t in (ours, theirs)]
            cpu = [t["fingerprint_cpu_s"] + t["plan_cpu_s"] for t in (ours, theirs)]
            print(f"| {name} | {ours['fingerprint_wall_s']:.2f} + {ours['plan_wall_s']:.2f} ({cpu[0]:.2f}) | "
                  f"{theirs['fingerprint_wall_s']:.2f} + {theirs['plan_wall_s']:.2f} ({cpu[1]:.2f}) | "
                  f"{wall[0] / wall[1]:.2f} ({cpu[0] / cpu[1]:.2f}) |")
        scale_rows(tmp)
        print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
