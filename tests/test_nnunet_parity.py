"""Official checkpoints through aeval give what nnU-Net 2.8 itself gives (nnunetv2 is the reference, imported
only here): the preprocessed array (axis order, transposes, crop, resampling incl. separate-z, normalisation),
the window-blended logits, and the written segmentation, for RAS, LPS and permuted synthetic CTs and the real
small CT; v1 (.model + .model.pkl / plans.pkl) and v2 (.pth + plans.json) checkpoints both load and predict."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REAL, affine_for, needs_real

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the reference: pip install -e '.[nnunet]' torch==2.13.0")

from nnunet_reference import (  # noqa: E402
    dataset_json,
    nnunet_predict,
    nnunet_predictor,
    nnunet_preprocess,
    synthetic_ct,
    tiny_net,
    v2_plans,
    write_v1_model,
    write_v2_model,
)

from aeval.data.geometry import from_ras, ras_transform  # noqa: E402
from aeval.data.nnunet_plans import read_nnunet_plan  # noqa: E402
from aeval.data.nnunet_preprocess import preprocess_nnunet  # noqa: E402
from aeval.errors import CaseError  # noqa: E402
from aeval.models.load import LoadedModel, load_model  # noqa: E402
from aeval.models.official import SoftmaxOutput  # noqa: E402
from aeval.prediction import make_predictor, predict_files  # noqa: E402

POOLS = [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
PATCH = (16, 16, 16)
FP32 = {"precision": "fp32"}
# (axcodes, zooms in array order, shape, target spacing (network order), transpose_forward)
CASES = {
    "RAS": ("RAS", (1.0, 1.2, 2.5), (40, 36, 20), (3.0, 2.0, 2.0), (0, 1, 2)),
    "LPS": ("LPS", (1.0, 1.2, 2.5), (40, 36, 20), (3.0, 2.0, 2.0), (0, 1, 2)),
    "permuted": ("SPL", (2.5, 1.2, 1.0), (20, 36, 40), (3.0, 2.0, 2.0), (2, 0, 1)),
    "separate_z": ("LPS", (0.8, 0.8, 4.0), (48, 48, 10), (3.0, 2.0, 2.0), (0, 1, 2)),
    # long enough along the axis restore reads for several rows of windows: 0, and 2 (the 4 mm axis, apart)
    "long": ("LPS", (1.0, 1.0, 1.0), (40, 36, 60), (1.0, 1.0, 1.0), (0, 1, 2)),
    "long_separate_z": ("LPS", (4.0, 1.0, 1.0), (24, 36, 20), (1.0, 1.0, 1.0), (0, 1, 2)),
}


def write_case(tmp_path, name):
    axcodes, zooms, shape, target, transpose = CASES[name]
    path = tmp_path / f"{name}_0000.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_ct(shape), affine_for(axcodes, zooms)), path)
    return path, v2_plans(target, PATCH, POOLS, transpose=transpose)


def our_plan(plans, dataset, reorient="none"):
    return {**read_nnunet_plan(plans, dataset_json=dataset), "reorient": reorient}


@pytest.mark.parametrize("name", list(CASES))
def test_preprocessed_array_equals_nnunets(tmp_path, name):
    path, plans = write_case(tmp_path, name)
    reference, properties = nnunet_preprocess(path, plans, dataset_json())
    mine, ours = preprocess_nnunet(nib.load(path), our_plan(plans, dataset_json()))
    assert mine.shape == reference.shape
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-5)
    assert ours["bbox_used_for_cropping"] == [list(b) for b in properties["bbox_used_for_cropping"]]


def test_crop_to_nonzero_and_masked_zscore_equal_nnunets(tmp_path):
    path = tmp_path / "mr_0000.nii.gz"
    image = synthetic_ct((40, 36, 20), border=4).astype(np.float32) + 1000 * (synthetic_ct((40, 36, 20), border=4) != 0)
    nib.save(nib.Nifti1Image(image, affine_for("LPS", (1.0, 1.2, 2.5))), path)
    plans = v2_plans((3.0, 2.0, 2.0), PATCH, POOLS, scheme="ZScoreNormalization", use_mask=True)
    reference, properties = nnunet_preprocess(path, plans, dataset_json("MR"))
    mine, ours = preprocess_nnunet(nib.load(path), our_plan(plans, dataset_json("MR")))
    assert ours["bbox_used_for_cropping"] == [[4, 16], [4, 32], [4, 36]]
    assert ours["bbox_used_for_cropping"] == [list(b) for b in properties["bbox_used_for_cropping"]]
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("name", ["RAS", "LPS", "permuted"])
def test_segmentation_and_softmax_match_nnunet_predictor(tmp_path, monkeypatch, name, mirror):
    path, plans = write_case(tmp_path, name)
    net = tiny_net(POOLS)
    ckpt = write_v2_model(tmp_path / "model", net, plans)
    inference = {**FP32, "mirror_axes": [0, 1, 2] if mirror else []}
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), mirror), path)
    model = load_model(ckpt)
    written = predict_files(model, [path], tmp_path / "out", inference=inference)
    ours = np.asarray(nib.load(written[0]).dataobj)
    assert ours.shape == seg.shape and len(np.unique(seg)) > 1
    assert (ours == seg).mean() >= 0.9999  # fp16 accumulators as nnU-Net 2.8's (accumulate=auto)

    # the tilings coincide here (<= 2 windows per axis): with nnU-Net's accumulators in fp32 instead of its
    # fp16 and ours too, the blended softmax is the same to float precision
    monkeypatch.setattr(torch, "half", torch.float32)
    data, _ = nnunet_preprocess(path, plans, dataset_json())
    reference = nnunet_predictor(net, plans, dataset_json(), mirror).predict_logits_from_preprocessed_data(
        torch.from_numpy(data))
    fp32 = make_predictor(model, {**inference, "accumulate": "fp32"})
    mine = fp32(torch.from_numpy(preprocess_nnunet(nib.load(path), model.plan)[0]))
    assert (mine.softmax(0) - reference.float().softmax(0)).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["long", "long_separate_z"])
def test_logits_in_slabs_give_nnunets_segmentation(tmp_path, monkeypatch, name):
    """A volume too large to hold its logits is blended in a band one patch deep and restored as the rows
    arrive (``inference.SLAB_LOGITS_ABOVE`` lowered to stream these small ones): along axis 0 (where nnU-Net's
    arrays have their low-resolution axis) exactly the labels of the whole-volume blend, else >= 99.9 % nnU-Net's."""
    from aeval import inference

    path, plans = write_case(tmp_path, name)
    net = tiny_net(POOLS)
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), True), path)
    model = load_model(write_v2_model(tmp_path / "model", net, plans))
    whole = np.asarray(nib.load(predict_files(model, [path], tmp_path / "whole", inference=FP32)[0]).dataobj)
    monkeypatch.setattr(inference, "SLAB_LOGITS_ABOVE", 0)
    banded = np.asarray(nib.load(predict_files(model, [path], tmp_path / "banded", inference=FP32)[0]).dataobj)
    assert banded.shape == seg.shape and len(np.unique(seg)) > 1
    if name == "long":
        assert (banded == seg).mean() >= 0.9999
        np.testing.assert_array_equal(banded, whole)
    else:  # along axis 2 a voxel's windows are summed in another order than nnU-Net's, in fp16 (3 of 17 280 here)
        assert (banded == seg).mean() >= 0.999 and (whole == seg).mean() >= 0.9999


def test_reorient_ras_matches_nnunet_on_the_canonical_file(tmp_path):
    """TotalSegmentator's wrapper: as_closest_canonical, then nnU-Net; aeval's reorient=ras writes the same
    labels in the input's own orientation."""
    path, plans = write_case(tmp_path, "LPS")
    img = nib.load(path)
    canonical = tmp_path / "canonical_0000.nii.gz"
    nib.save(nib.as_closest_canonical(img), canonical)
    net = tiny_net(POOLS)
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), False), canonical)
    expected = from_ras(seg, ras_transform(img.affine))
    model = load_model(write_v2_model(tmp_path / "model", net, plans), reorient="ras")
    ours = np.asarray(nib.load(predict_files(model, [path], tmp_path / "out",
                                             inference={**FP32, "mirror_axes": []})[0]).dataobj)
    assert (ours == expected).mean() >= 0.999


def test_v1_model_and_pickles_load_and_predict_like_v2(tmp_path):
    path, plans = write_case(tmp_path, "LPS")
    net = tiny_net(POOLS)
    v2 = load_model(write_v2_model(tmp_path / "v2", net, plans))
    ckpt = write_v1_model(tmp_path / "v1", net, plans)
    with pytest.raises(CaseError, match="set model_labels="):  # v1 plans name no labels
        load_model(ckpt)
    v1 = load_model(ckpt, label_system="flare22")  # the .model.pkl beside it
    v1_plans = load_model(ckpt, plan=tmp_path / "v1" / "plans.pkl", label_system="flare22")
    assert isinstance(v1.net, SoftmaxOutput) and v1.plan["nnunet_version"] == 1 and v2.plan["nnunet_version"] == 2
    for key in ("spacing", "patch_size", "pool_op_kernel_sizes", "normalization", "transpose_forward"):
        assert v1.plan[key] == v2.plan[key] == v1_plans.plan[key]
    assert v2.label_system == "flare22"  # its dataset.json labels are FLARE22's table
    # v1 averaged and resampled softmax probabilities: the wrapped network's output is one
    probabilities = v1.net(torch.from_numpy(preprocess_nnunet(nib.load(path), v1.plan)[0][None, :, :16, :16, :16]))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 16, 16, 16))
    # the same network under the v1 plan, averaging logits, is exactly the v2 path (nnU-Net v2 the reference)
    reference, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), False), path)
    v1_logits = LoadedModel(v1.net.net, v1.plan, "flare22")
    outputs = {}
    for key, model in (("v1", v1), ("v1_logits", v1_logits), ("v2", v2)):
        written = predict_files(model, [path], tmp_path / key, inference={**FP32, "mirror_axes": []})
        outputs[key] = np.asarray(nib.load(written[0]).dataobj)
    np.testing.assert_array_equal(outputs["v1_logits"], outputs["v2"])
    assert (outputs["v2"] == reference).mean() >= 0.999
    assert (outputs["v1"] == reference).mean() >= 0.9  # softmax vs logit averaging: a v1 model's own behaviour


def test_official_checkpoint_errors_are_one_line(tmp_path):
    path, plans = write_case(tmp_path, "RAS")
    ckpt = write_v2_model(tmp_path / "model", tiny_net(POOLS), plans)
    with pytest.raises(CaseError, match="size=s does not fit the weights"):
        load_model(ckpt, size="s")
    with pytest.raises(CaseError, match="no configuration '2d'"):
        load_model(ckpt, configuration="2d")
    (tmp_path / "model" / "plans.json").unlink()
    with pytest.raises(CaseError, match="needs plan="):
        load_model(ckpt)
    bad = dict(plans, configurations={"3d_fullres": {**plans["configurations"]["3d_fullres"],
                                                     "normalization_schemes": ["RGBTo01Normalization"]}})
    with pytest.raises(CaseError, match="RGBTo01Normalization"):
        load_model(ckpt, plan=bad)


@needs_real
def test_real_ct_matches_nnunet_predictor(tmp_path):
    """The small TotalSegmentator CT (3 mm, RAS) resampled to 4.5 mm, several windows per axis at nnU-Net's
    positions; both accumulate in fp16 (aeval's accumulate=auto for nnU-Net checkpoints): the labels agree on
    >= 99.99 % of voxels."""
    path = REAL / "example_ct_sm.nii.gz"
    plans = v2_plans((4.5, 4.5, 4.5), (16, 32, 32), [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]])
    net = tiny_net(plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"][1:])
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), False), path)
    model = load_model(write_v2_model(tmp_path / "model", net, plans))
    ours = np.asarray(nib.load(predict_files(model, [path], tmp_path / "out",
                                             inference={**FP32, "mirror_axes": []})[0]).dataobj)
    assert ours.shape == seg.shape and len(np.unique(seg)) > 2
    assert (ours == seg).mean() >= 0.9999


def test_predict_cli_with_official_v2_model_folder(tmp_path):
    """``python -m aeval.predict ckpt_path=<fold_0/checkpoint_final.pth> plan=<plans.json> to_labels=aeval8``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from aeval.labels import remap

    path, plans = write_case(tmp_path, "LPS")
    net = tiny_net(POOLS)
    ckpt = write_v2_model(tmp_path / "model", net, plans)
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), True), path)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "aeval.predict", f"ckpt_path={ckpt}",
                           f"plan={tmp_path / 'model' / 'plans.json'}", "configuration=3d_fullres",
                           f"input={path}", f"output={tmp_path / 'out'}", "to_labels=aeval8",
                           "inference.precision=fp32", f"hydra.run.dir={tmp_path / 'hydra'}"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = np.asarray(nib.load(tmp_path / "out" / "LPS.nii.gz").dataobj)
    assert (ours == remap(seg, "flare22", "aeval8")).mean() >= 0.999


@pytest.mark.parametrize("allowed", [(1, 2), (0,), ()])
def test_checkpoint_mirroring_axes_are_applied_as_nnunet_does(tmp_path, allowed):
    """A checkpoint whose trainer allowed mirroring along some axes only (nnU-Net's array axes, which are
    aeval's in nnU-Net's convention): nnU-Net's predictor mirrors only those, and so does aeval with the
    default mirror_axes [0, 1, 2]; the labels are nnU-Net's."""
    path, plans = write_case(tmp_path, "permuted")
    net = tiny_net(POOLS)
    model = load_model(write_v2_model(tmp_path / "model", net, plans, mirror_axes=allowed))
    predictor = make_predictor(model, FP32)
    assert predictor.flips == [(), *[tuple(a + 2 for a in c) for r in range(1, len(allowed) + 1)
                                     for c in itertools.combinations(allowed, r)]]
    assert make_predictor(model, {**FP32, "mirror_axes": [2]}).flips == ([(), (4,)] if 2 in allowed else [()])
    seg, _, _ = nnunet_predict(nnunet_predictor(net, plans, dataset_json(), bool(allowed), allowed), path)
    ours = np.asarray(nib.load(predict_files(model, [path], tmp_path / "out", inference=FP32)[0]).dataobj)
    assert (ours == seg).mean() >= 0.9999
    # mirroring along the axes the checkpoint forbids would give other logits
    if allowed != (0, 1, 2):
        image = torch.from_numpy(preprocess_nnunet(nib.load(path), model.plan)[0])
        unrestricted = LoadedModel(model.net, {**model.plan, "inference_allowed_mirroring_axes": None}, "flare22")
        assert not torch.equal(make_predictor(unrestricted, FP32)(image), predictor(image))


@pytest.mark.slow
def test_gpu_parity_script_dry_run_on_cpu(capsys):
    """experiments/benchmarks/gpu_nnunet_parity.py's CPU smoke (tiny net, a few training steps): it trains,
    saves an nnU-Net model folder, predicts with both pipelines and reports the agreement."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "gpu_nnunet_parity.py"
    spec = importlib.util.spec_from_file_location("gpu_nnunet_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--dry-run", "--steps", "2"])
    assert result["aeval_s"] > 0 and result["nnunet_s"] > 0 and 0 <= result["agreement"] <= 1
    assert "voxel agreement" in capsys.readouterr().out
