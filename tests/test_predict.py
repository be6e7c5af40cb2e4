"""aeval.prediction: predictions land in each input's original geometry (orientation, anisotropic spacing, crop),
the inference configs reach the predictor, real CT keeps its geometry, bad inputs are one line each through
the CLI, and both checkpoint kinds (ours, official STU-Net) load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONF_DIR, REAL, affine_for, needs_real
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from aeval.data.geometry import ras_order, ras_transform
from aeval.data.planner import divisible_patch, plan_hash
from aeval.errors import CaseError, FailureLog
from aeval.models.load import LoadedModel, load_model
from aeval.models.stunet import build_stunet
from aeval.module import STUNetModule
from aeval.plan import Plan
from aeval.prediction import predict_files

ROOT = Path(__file__).resolve().parents[1]
RUN_KEY = {"protocol": "individual", "train": "flare22", "model": "stu_tiny", "run": "5eed5eed"}



# --- builders ---------------------------------------------------------------------------------------------


def ellipsoids(shape, blobs) -> np.ndarray:
    """``(label, centre fraction, radius fraction)`` ellipsoids painted in order (uint8)."""
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij"), -1)
    labels = np.zeros(shape, dtype=np.uint8)
    for label, centre, radius in blobs:
        labels[(((grid - np.asarray(centre)) / np.asarray(radius)) ** 2).sum(-1) <= 1] = label
    return labels


# Off-centre and of different sizes, so a flipped or transposed prediction cannot match.
BLOBS = [(1, (0.38, 0.42, 0.5), (0.26, 0.3, 0.34)), (3, (0.72, 0.7, 0.4), (0.14, 0.16, 0.3)),
         (9, (0.3, 0.78, 0.62), (0.12, 0.12, 0.25))]


def hand_plan(modality: str, target_spacing, patch_size, pools=None, normalization=None) -> dict:
    """A plan with the keys preprocessing and the predictor read (RAS axis order)."""
    plan = {"datasets": [{"name": "synthetic", "modality": modality, "label_system": "flare22"}],
            "axis_order": "RAS", "label_space": "flare22", "num_classes": 14,
            "target_spacing": [float(s) for s in target_spacing],
            "normalization": normalization or {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 1.0},
            "crop": {"ct_threshold": -500.0, "other": "nonzero"},
            "patch_size": list(patch_size), "pool_op_kernel_sizes": pools or [[1, 1, 1]] * 5}
    plan["hash"] = plan_hash(plan)
    return plan


class IdentityNet(nn.Module):
    """Logits ``-(x - c)^2`` for the classes ``c`` in ``levels`` (the rest far below): the argmax is the level
    nearest the (normalised) intensity, so an image whose voxels hold those label values is predicted as itself,
    with boundaries at the midpoints between neighbouring labels. Records the batch size of every call."""

    in_channels = 1

    def __init__(self, levels, num_classes: int = 14):
        super().__init__()
        offset = torch.full((num_classes,), -1e6)
        offset[list(levels)] = 0
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("offset", offset.view(1, -1, 1, 1, 1))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        return self.offset - (x - self.classes) ** 2


def identity_model(plan: dict, levels=(0, *(label for label, *_ in BLOBS))) -> LoadedModel:
    return LoadedModel(IdentityNet(levels), plan, "flare22")


def tiny_ct_plan(target_spacing=(6.0, 6.0, 6.0), patch=(32, 32, 32)) -> dict:
    patch, pools = divisible_patch(patch, target_spacing)
    return hand_plan("CT", target_spacing, patch, pools,
                     {"scheme": "ct", "clip": [-160.0, 240.0], "mean": 60.0, "std": 70.0})


def tiny_module(plan: dict, seed: int = 0) -> STUNetModule:
    torch.manual_seed(seed)
    return STUNetModule(model={"size": "tiny", "in_channels": 1, "num_classes": 14}, plan=plan, run_key=RUN_KEY)


def save_tiny_checkpoint(path: Path, plan: dict, seed: int = 0) -> Path:
    """What Lightning's checkpoint holds for inference: ``state_dict`` (``net.`` keys) and ``hyper_parameters``."""
    module = tiny_module(plan, seed)
    torch.save({"state_dict": {"net." + k: v for k, v in module.net.state_dict().items()},
                "hyper_parameters": dict(module.hparams)}, path)
    return path


def inference_config(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("predict", overrides=["ckpt_path=x", "input=x", "output=x", f"inference={name}"])
    return OmegaConf.to_container(cfg.inference, resolve=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# --- geometry --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "PSL"])
def test_prediction_lands_on_the_original_voxels(tmp_path, axcodes):
    """Anisotropic spacing, resampling to the plan's spacing, the MR non-zero crop and the reorientation (PSL
    also permutes the axes) are all undone: the label-valued image comes back as itself, up to the
    interpolation at blob boundaries (shifting the prediction by one voxel along any axis costs ~3-5%)."""
    shape, spacing = (64, 56, 18), (0.9, 1.1, 4.0)
    labels = ellipsoids(shape, BLOBS)
    affine = affine_for(axcodes, spacing)
    path = tmp_path / "in" / "case_0000.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(labels.astype(np.float32), affine), path)
    # coarser in-plane, finer along the 4 mm axis; the plan lists spacings in RAS axis order
    target = ras_order((1.0, 1.25, 3.0), ras_transform(affine))
    model = identity_model(hand_plan("MR", target, (16, 16, 16)))
    failures = FailureLog()

    written = predict_files(model, [path], tmp_path / "out", inference={"mirror_axes": []}, failures=failures)

    assert not failures.failures and written == [tmp_path / "out" / "case.nii.gz"]
    out = nib.load(written[0])
    prediction = np.asarray(out.dataobj)
    assert prediction.shape == shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert "".join(nib.aff2axcodes(out.affine)) == axcodes
    assert (prediction == labels).mean() >= 0.99
    for label, *_ in BLOBS:
        assert dice(prediction == label, labels == label) > 0.9, label


def test_fast_and_default_inference_configs_reach_the_predictor(tmp_path):
    """conf/inference/default.yaml runs every window with its 8 flips in one batch; fast.yaml one pass."""
    shape = (30, 26, 20)
    labels = ellipsoids(shape, BLOBS)
    path = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(labels.astype(np.float32), affine_for("LPS", (1.2, 1.2, 2.0))), path)
    model = identity_model(hand_plan("MR", (1.2, 1.2, 2.0), (16, 16, 16)))  # no resampling: exact
    for name, flips in (("default", 8), ("fast", 1)):
        settings = inference_config(name)
        model.net.batch_sizes.clear()
        written = predict_files(model, [path], tmp_path / name, inference=settings)
        assert set(model.net.batch_sizes) == {flips}, name
        prediction = np.asarray(nib.load(written[0]).dataobj)
        np.testing.assert_array_equal(prediction, labels, err_msg=name)


def test_an_out_of_memory_case_is_one_failure_and_the_others_go_on(tmp_path):
    """A case too large for the device (torch's OutOfMemoryError, a RuntimeError) is a failure line naming the
    file; any other RuntimeError (a bug) still propagates."""
    shape = (30, 26, 20)
    labels = ellipsoids(shape, BLOBS)
    paths = [tmp_path / f"{name}_0000.nii.gz" for name in ("big", "small")]
    for path in paths:
        nib.save(nib.Nifti1Image(labels.astype(np.float32), affine_for("LPS", (1.2, 1.2, 2.0))), path)
    model = identity_model(hand_plan("MR", (1.2, 1.2, 2.0), (16, 16, 16)))
    forward = model.net.forward

    def oom_on_first(x):
        if not model.net.batch_sizes:
            model.net.batch_sizes.append(0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return forward(x)

    model.net.forward = oom_on_first
    failures = FailureLog(quiet=True)
    written = predict_files(model, paths, tmp_path / "out", inference={"mirror_axes": []}, failures=failures)
    assert [p.name for p in written] == ["small.nii.gz"]
    assert [str(f) for f in failures.records] == [f"{paths[0]}: out of memory (try inference.stitch_device=cpu "
                                                  "or fewer mirror_axes)"]
    model.net.forward = lambda x: (_ for _ in ()).throw(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        predict_files(model, paths[1:], tmp_path / "again", inference={"mirror_axes": []}, failures=failures)


# --- checkpoints -----------------------------------------------------------------------------------------

def test_lightning_checkpoint_loads_with_its_plan_and_run_key(tmp_path):
    """A checkpoint written by Lightning itself (not a hand-made dict) rebuilds the same network."""
    plan = tiny_ct_plan()
    module = tiny_module(plan, seed=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "best.ckpt")

    loaded = load_model(tmp_path / "best.ckpt")

    assert loaded.plan == Plan.from_dict(plan) and loaded.run_key == RUN_KEY and loaded.label_system == "flare22"
    mine, theirs = loaded.net.state_dict(), module.net.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def write_ct(path: Path, shape=(40, 36, 20), spacing=(3.0, 3.0, 3.0), axcodes="RAS", seed=0) -> np.ndarray:
    """A small CT-like volume: air around a soft-tissue body with brighter blobs."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[4:-4, 5:-5, :] = 40 + rng.normal(0, 10, (shape[0] - 8, shape[1] - 10, shape[2]))
    image += 30.0 * ellipsoids(shape, BLOBS)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine_for(axcodes, spacing)), path)
    return image


def test_official_stunet_checkpoint_loads_and_predicts_remapped_labels(tmp_path):
    plan = tiny_ct_plan()
    (tmp_path / "plans.json").write_text(json.dumps(plan))
    torch.manual_seed(1)
    net = build_stunet("tiny", 1, 105, pool_op_kernel_sizes=plan["pool_op_kernel_sizes"])
    with torch.no_grad():
        net.seg_outputs[-1].bias[40] = 1e4  # full-resolution head: totalseg_104_alpha 40 = liver wins
    weights = {"module." + k: v for k, v in net.state_dict().items()}  # as saved from a DDP run
    torch.save({"network_weights": weights, "trainer_name": "STUNetTrainer"}, tmp_path / "checkpoint_final.pth")
    with pytest.raises(CaseError, match="needs plan=<nnU-Net plans.json"):  # the aeval plans.json beside it
        load_model(tmp_path / "checkpoint_final.pth")
    with pytest.raises(CaseError, match="aeval plan needs size="):
        load_model(tmp_path / "checkpoint_final.pth", plan=tmp_path / "plans.json")
    (tmp_path / "nnunet_plans.json").write_text(json.dumps({"configurations": {}}))
    with pytest.raises(CaseError, match="no configuration '3d_fullres'"):  # nnU-Net plans: nnU-Net's convention
        load_model(tmp_path / "checkpoint_final.pth", plan=tmp_path / "nnunet_plans.json")
    (tmp_path / "other_plans.json").write_text(json.dumps({"hash": "x"}))
    with pytest.raises(CaseError, match="not an aeval plan"):
        load_model(tmp_path / "checkpoint_final.pth", plan=tmp_path / "other_plans.json", size="tiny")

    loaded = load_model(tmp_path / "checkpoint_final.pth", plan=tmp_path / "plans.json", size="tiny")

    assert loaded.label_system == "totalseg_104_alpha" and loaded.run_key == {}
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    image = write_ct(tmp_path / "in" / "ct_0000.nii.gz")
    raw = predict_files(loaded, [tmp_path / "in" / "ct_0000.nii.gz"], tmp_path / "raw", inference={"mirror_axes": []})
    eight = predict_files(loaded, [tmp_path / "in" / "ct_0000.nii.gz"], tmp_path / "aeval8", to_system="aeval8",
                          inference={"mirror_axes": []})
    raw, eight = np.asarray(nib.load(raw[0]).dataobj), np.asarray(nib.load(eight[0]).dataobj)
    body = np.zeros(image.shape, bool)  # the CT crop: bounding box of the voxels above -500 HU
    body[4:-4, 5:-5, :] = True
    np.testing.assert_array_equal(raw, np.where(body, 40, 0))
    np.testing.assert_array_equal(eight, np.where(body, 1, 0))  # liver is organ 1 of the A-Eval 8


@needs_real
@pytest.mark.parametrize("name, dtype", [("example_ct.nii.gz", np.int32), ("example_ct_sm.nii.gz", np.int16)])
def test_real_ct_keeps_shape_affine_and_gets_uint8_labels(tmp_path, name, dtype):
    source = nib.load(REAL / name)
    assert source.get_data_dtype() == dtype
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", tiny_ct_plan(target_spacing=(7.5, 7.5, 7.5)))
    model = load_model(ckpt)
    failures = FailureLog()

    written = predict_files(model, [REAL / name], tmp_path / "out", inference={"mirror_axes": []},
                            failures=failures)

    assert not failures.failures
    out = nib.load(written[0])
    prediction = np.asarray(out.dataobj)
    assert out.shape == source.shape and out.get_data_dtype() == np.uint8 and prediction.dtype == np.uint8
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
    assert int(out.header["sform_code"]) == (int(source.header["sform_code"]) or 1)
    assert prediction.max() < 14
    # Outside the body's bounding box (> -500 HU, the CT crop) nothing is predicted: the box landed in place.
    body = np.asarray(source.dataobj) > -500
    inside = np.zeros(body.shape, bool)
    inside[tuple(slice(h.min(), h.max() + 1) for h in np.nonzero(body))] = True
    assert not prediction[~inside].any()


# --- the CLI ---------------------------------------------------------------------------------------------

def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "AEVAL_ROOT": str(cwd)}
    return subprocess.run([sys.executable, "-m", module, *args, f"hydra.run.dir={cwd / 'hydra'}"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_bad_inputs_through_the_cli_are_one_line_each(tmp_path):
    inputs = tmp_path / "inputs"
    write_ct(inputs / "good_0000.nii.gz", shape=(30, 28, 16))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), inputs / "flat.nii.gz")
    with_nan = np.zeros((20, 20, 10), np.float32)
    with_nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(with_nan, np.eye(4)), inputs / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 10, 2), np.float32), np.eye(4)), inputs / "twochan.nii.gz")
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", tiny_ct_plan())

    result = run_cli("aeval.predict", f"ckpt_path={ckpt}", f"input={inputs}", f"output={tmp_path / 'out'}",
                     "inference=fast", "to_labels=aeval8", cwd=tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = output.splitlines()
    for bad, problem in (("broken.nii.gz", "unreadable"), ("flat.nii.gz", "3-D"), ("nan.nii.gz", "NaN"),
                         ("twochan.nii.gz", "3-D")):
        errors = [line for line in lines if line.startswith("[error]") and str(inputs / bad) in line]
        assert len(errors) == 1 and problem in errors[0], (bad, output)
    assert "4 failed" in output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]
    good = nib.load(tmp_path / "out" / "good.nii.gz")
    assert good.shape == (30, 28, 16) and np.asarray(good.dataobj).max() <= 8
