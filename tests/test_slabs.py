"""Logits handed over in slabs: LogitSlabs reads rows in order from a producer that overwrites its buffer, the
predictor's banded blend equals its whole-volume blend (bit for bit along axis 0, where the per-voxel order is
the same), and predict_file writes the same labels streaming as holding the volume (resampling, separate z)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference import PATCH, SmallNet, make_image
from test_predict import BLOBS, ellipsoids, tiny_ct_plan, tiny_module

from aeval import inference
from aeval.errors import FailureLog
from aeval.inference import SlidingWindowPredictor
from aeval.models.load import LoadedModel
from aeval.prediction import predict_files
from aeval.slabs import LogitSlabs, channel_readers


def reused_buffer_slabs(volume: torch.Tensor, axis: int, size: int):
    """Slabs of ``size`` rows as views of ONE buffer that is overwritten with garbage before each next slab,
    as the predictor's band is."""
    buffer = torch.empty_like(volume.narrow(1 + axis, 0, size))
    rows = volume.shape[1 + axis]
    for first in range(0, rows, size):
        count = min(size, rows - first)
        buffer.fill_(float("nan"))
        view = buffer.narrow(1 + axis, 0, count)
        view.copy_(volume.narrow(1 + axis, first, count))
        yield first, view


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rows_straddling_slabs_come_back_intact(axis):
    volume = torch.randn(3, 21, 22, 23)
    slabs = LogitSlabs(volume.shape, axis, volume.dtype, reused_buffer_slabs(volume, axis, 6))
    # resampled_argmax's pattern: chunks overlapping by a row, one chunk spanning three slabs
    for lo, hi in [(0, 5), (4, 9), (8, 8 + 13), (20, 21)]:
        torch.testing.assert_close(slabs.rows(lo, hi), volume.narrow(1 + axis, lo, hi - lo), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already dropped"):
        slabs.rows(3, 6)


def test_bad_slab_streams_are_clear_errors():
    volume = torch.randn(2, 10, 3, 3)
    short = LogitSlabs(volume.shape, 0, volume.dtype, [(0, volume[:, :4])])
    with pytest.raises(ValueError, match="ended at row 4 of 10"):
        short.rows(2, 6)
    gap = LogitSlabs(volume.shape, 0, volume.dtype, [(0, volume[:, :4]), (5, volume[:, 5:])])
    with pytest.raises(ValueError, match="starts at row 5, expected 4"):
        gap.rows(3, 7)
    with pytest.raises(ValueError, match="outside 0:10"):
        LogitSlabs.whole(volume).rows(8, 11)
    with pytest.raises(ValueError, match="along axis 0, rows are read along axis 2"):
        channel_readers(LogitSlabs.whole(volume), 2)


def streamed(predictor: SlidingWindowPredictor, image: torch.Tensor, axis: int) -> torch.Tensor:
    slabs = predictor.slabs(image, axis, stream=True)
    parts, row = [], 0
    size = image.shape[1 + axis]
    while row < size:  # odd-sized reads, as a consumer would ask
        hi = min(size, row + 7)
        parts.append(slabs.rows(row, hi).clone())
        row = hi
    return torch.cat(parts, 1 + axis)


@pytest.mark.parametrize("tiling", ["nnunet", "monai"])
@pytest.mark.parametrize("accumulate", ["fp32", "fp16"])
@pytest.mark.parametrize("shape, axis", [((70, 26, 20), 0), ((10, 44, 12), 1), ((20, 17, 45), 2)])
def test_banded_blend_equals_the_whole_volume_blend(tiling, accumulate, shape, axis):
    """Long axes (5-8 rows of windows), padding of the short ones; along axis 0 the windows are summed in the
    whole blend's order, so the values are identical; along the others a voxel's windows are summed in another
    order (fp32: a few ulps)."""
    torch.manual_seed(0)
    model, image = SmallNet().eval(), make_image(shape)
    predictor = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", mirror_axes=(0,),
                                       tiling=tiling, accumulate=accumulate)
    dtype = torch.float16 if accumulate == "fp16" else torch.float32
    with torch.inference_mode():
        whole = predictor._tiled(image, torch.device("cpu"), dtype)
    ours = streamed(predictor, image, axis)
    assert ours.dtype == whole.dtype == dtype and ours.shape == whole.shape
    if axis == 0:
        assert torch.equal(ours, whole)
    elif accumulate == "fp32":
        torch.testing.assert_close(ours, whole, rtol=1e-6, atol=1e-6)
        assert torch.equal(ours.argmax(0), whole.argmax(0))
    else:
        torch.testing.assert_close(ours.float(), whole.float(), rtol=2e-3, atol=2e-3)
    assert predictor.model.training is False


def test_auto_streams_only_large_volumes(monkeypatch):
    model = SmallNet().eval()
    predictor = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", mirror_axes=())
    image = make_image((40, 20, 20))
    whole = predictor.slabs(image, 0)
    assert whole.rows(0, 40).shape == (3, 40, 20, 20)  # one slab: the volume's logits (through MONAI)
    assert torch.equal(whole.rows(0, 40), predictor(image))
    monkeypatch.setattr(inference, "SLAB_LOGITS_ABOVE", 3 * 40 * 20 * 20 * 4 - 1)
    banded = predictor.slabs(image, 0)
    first = banded.rows(0, 1)
    assert first.data_ptr() != whole.rows(0, 1).data_ptr()
    torch.testing.assert_close(banded.rows(0, 40), predictor(image), rtol=0, atol=1e-5)  # MONAI vs own tiler


@pytest.mark.parametrize("spacing, axcodes", [((3.0, 3.0, 3.0), "LPS"), ((2.0, 2.2, 7.5), "RAS"),
                                              ((7.5, 2.0, 2.2), "PSL")])
def test_predict_file_streaming_writes_the_labels_of_the_whole_volume(tmp_path, monkeypatch, spacing, axcodes):
    """End to end (read, preprocess, slabs, resample back, argmax, write): the thick-slice cases resample z
    separately, so the slabs run along the plan's z axis, which is the file's first axis for PSL."""
    from conftest import affine_for

    shape = (48, 44, 40) if spacing[0] == 3.0 else ((40, 36, 12) if axcodes == "RAS" else (12, 40, 36))
    image = np.where(ellipsoids(shape, BLOBS) > 0, 80.0, -1000.0).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 20, shape).astype(np.float32)
    path = tmp_path / "in" / "case_0000.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine_for(axcodes, spacing)), path)
    plan = tiny_ct_plan(target_spacing=(3.0, 3.0, 3.0), patch=(16, 16, 16))
    model = LoadedModel(tiny_module(plan).net, plan, "flare22")
    settings = {"mirror_axes": [0, 1], "precision": "fp32", "device": "cpu"}
    whole = predict_files(model, [path], tmp_path / "whole", inference=settings)
    monkeypatch.setattr(inference, "SLAB_LOGITS_ABOVE", 0)
    failures = FailureLog()
    banded = predict_files(model, [path], tmp_path / "banded", inference=settings, failures=failures)
    assert not failures.failures
    reference, ours = (np.asarray(nib.load(p[0]).dataobj) for p in (whole, banded))
    assert ours.shape == shape and len(np.unique(reference)) > 1
    assert (ours == reference).mean() == 1.0


@pytest.mark.parametrize("tiling", ["nnunet", "monai"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.75])
def test_banded_blend_at_other_overlaps(tiling, overlap):
    """No overlap (the band moves a whole patch: nothing kept), and uneven or small steps (three rows of
    windows cover a voxel at 0.75)."""
    torch.manual_seed(0)
    model, image = SmallNet().eval(), make_image((53, 18, 17))
    predictor = SlidingWindowPredictor(model, PATCH, overlap=overlap, precision="fp32", device="cpu",
                                       mirror_axes=(), tiling=tiling, accumulate="fp32")
    with torch.inference_mode():
        whole = predictor._tiled(image, torch.device("cpu"), torch.float32)
    assert torch.equal(streamed(predictor, image, 0), whole)
