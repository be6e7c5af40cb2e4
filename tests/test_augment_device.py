"""``data.augment_on=gpu``: the loader workers only cut regions and the augmentation runs after the batch
transfer. With the same seeds it must give exactly the batches of the in-worker path (same draws, same
resampling), its torch blur must be scipy's filter, and a training run must take its steps with it. The
augmentation itself must be what it was before the split into cut + resample (the old extract_patch's
formulas, restated here as the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation
from test_datamodule import _module, blobs  # noqa: F401  (the fixture)
from test_train import compose_train, data_root  # noqa: F401  (the fixture)

from aeval.data.augment import augmentation_config, cut_region, extract_patch, gaussian_blur, resample_region
from aeval.data.datamodule import AEvalDataModule
from aeval.fit import train


def _reference_patch(image, labels, lower, patch, matrix):
    """The patch grid about the patch centre mapped by ``matrix``, sampled from the whole (padded) volume with
    grid_sample (trilinear) and scipy's map_coordinates (order 0): no region cut, no gather."""
    half = (np.asarray(patch, dtype=float) - 1) / 2
    centre = np.asarray(lower, dtype=float) + half
    offsets = np.stack(np.meshgrid(*[np.arange(n) - h for n, h in zip(patch, half, strict=True)], indexing="ij"))
    coords = np.einsum("ij,j...->i...", matrix, offsets) + centre[:, None, None, None]
    shape = np.asarray(image.shape[1:], dtype=float)
    grid = torch.from_numpy((coords / (shape - 1)[:, None, None, None] * 2 - 1)[::-1].copy()).float()
    grid = grid.permute(1, 2, 3, 0)[None]
    sampled = F.grid_sample(torch.from_numpy(image)[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0]
    nearest = ndimage.map_coordinates(labels[0], np.round(coords), order=0, mode="constant", cval=0)
    return sampled, nearest[None]


def test_cut_and_resample_is_the_direct_resampling():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 40, 36, 30)).astype(np.float32)
    labels = rng.integers(0, 14, size=(1, 40, 36, 30)).astype(np.uint8)
    for k in range(6):
        rotation = Rotation.from_euler("xyz", rng.uniform(-0.5, 0.5, 3)).as_matrix() * rng.uniform(0.7, 1.4)
        lower = rng.integers(-6, 20, 3)
        ours_image, ours_labels = extract_patch(image, labels, lower, (16, 12, 10), rotation)
        ref_image, ref_labels = _reference_patch(image, labels, lower, (16, 12, 10), rotation)
        np.testing.assert_allclose(ours_image.numpy(), ref_image.numpy(), atol=1e-4)
        assert (ours_labels.numpy() == ref_labels).mean() > 0.999, k  # rounding ties at .5 may differ
        region = cut_region(image, labels, lower, (16, 12, 10), rotation)
        again = resample_region(*region, (16, 12, 10), torch.from_numpy(rotation))
        assert torch.equal(again[0], ours_image) and torch.equal(again[1], ours_labels)


def test_torch_blur_is_scipys_gaussian_filter():
    volume = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 20, 17, 9)).astype(np.float32))
    for sigma in ((0.5, 1.0, 0.7), (1.0, 1.0, 1.0), (0.6, 0.9, 0.5)):
        expected = np.stack([ndimage.gaussian_filter(c, sigma, output=np.float32) for c in volume.numpy()])
        np.testing.assert_allclose(gaussian_blur(volume, sigma).numpy(), expected, atol=2e-6)


def _everything() -> dict:
    """Every transform on, each with a high probability (elastic included), so a few batches draw them all."""
    return {name: {"p": 1.0 if name in ("rotation", "scaling", "blur", "mirror") else 0.5}
            for name in augmentation_config(True)}


def test_gpu_path_gives_the_cpu_paths_batches(blobs):  # noqa: F811
    """Same module seed: the deferred batch, augmented after the 'transfer' (here on the CPU), equals the
    in-worker batch: same case, place, rotation/scaling, intensity draws and deep-supervision targets."""
    cpu = _module(blobs, augment=_everything(), iterations_per_epoch=6)
    gpu = _module(blobs, augment=_everything(), iterations_per_epoch=6, augment_on="gpu")
    drawn_spatial = 0
    for a, deferred in zip(cpu.train_dataloader(), gpu.train_dataloader(), strict=True):
        assert "region_image" in deferred and "image" not in deferred  # the worker only cut regions
        drawn_spatial += int(deferred["spatial"].sum())
        b = gpu.on_after_batch_transfer(deferred, 0)
        assert b["image"].shape == a["image"].shape == (2, 1, 24, 24, 16)
        torch.testing.assert_close(b["image"], a["image"], atol=1e-5, rtol=1e-5)
        assert torch.equal(b["target"], a["target"]) and torch.equal(b["annotated"], a["annotated"])
        assert all(torch.equal(x, y) for x, y in zip(b["targets_ds"], a["targets_ds"], strict=True))
        assert b["case"] == a["case"]
    assert drawn_spatial == 12  # p = 1: every patch rotated and scaled, through resample_region


def test_augment_on_is_checked():
    with pytest.raises(ValueError, match="data.augment_on must be 'cpu' or 'gpu'"):
        AEvalDataModule([], {"pool_op_kernel_sizes": [[2, 2, 2]], "patch_size": [8, 8, 8]}, augment_on="tpu")


def test_training_takes_its_steps_with_gpu_augmentation(data_root, tmp_path):  # noqa: F811
    cfg = compose_train(data_root, tmp_path, "data.augment_on=gpu", "trainer.max_epochs=1",
                        "trainer.deterministic=false")
    result = train(cfg)
    assert result.last_checkpoint is not None
    checkpoint = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2 and all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
