"""SlidingWindowPredictor against independent references: 2^n separate MONAI passes (one per flip), whole-volume
flipping, and hand-padded single-window forwards."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.nn import functional as F

from aeval import inference
from aeval.inference import SlidingWindowPredictor

PATCH = (16, 16, 16)
ROOT = Path(__file__).resolve().parents[1]


class SmallNet(nn.Module):
    """Two 3x3x3 convs (not flip-equivariant with random weights) and an optional low-resolution head
    standing in for deep supervision."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, deep_supervision: bool = False):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 6, 3, padding=1)
        self.conv2 = nn.Conv3d(6, num_classes, 3, padding=1)
        self.aux = nn.Conv3d(6, num_classes, 1)
        self.deep_supervision = deep_supervision

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.01)
        out = self.conv2(h)
        if self.deep_supervision:
            return [out, self.aux(F.avg_pool3d(h, 2))]
        return out


class ListNet(nn.Module):
    """A network without a ``deep_supervision`` switch that always returns a list of heads."""

    def __init__(self):
        super().__init__()
        self.net = SmallNet()

    def forward(self, x):
        return [self.net(x), torch.zeros(1)]


def make_net(**kwargs) -> SmallNet:
    torch.manual_seed(0)
    return SmallNet(**kwargs).eval()


def make_image(shape, channels: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(channels, *shape, generator=gen)


def flip_dims(mirror_axes) -> list[tuple[int, ...]]:
    """Each on/off choice per mirrored axis as tensor dims of a (N, C, X, Y, Z) batch."""
    return [tuple(a + 2 for a, on in zip(mirror_axes, choice, strict=True) if on)
            for choice in itertools.product((False, True), repeat=len(mirror_axes))]


@torch.inference_mode()
def per_flip_passes(model, image, mirror_axes=(0, 1, 2), patch=PATCH, overlap=0.5) -> torch.Tensor:
    """The plain baseline: one full MONAI sliding-window pass per flip (each window flipped, run, flipped
    back), the 2^n stitched volumes averaged."""
    total = torch.zeros(())
    flips = flip_dims(mirror_axes)
    for dims in flips:
        def predictor(w, dims=dims):
            return model(w.flip(dims)).flip(dims) if dims else model(w)
        total = total + sliding_window_inference(image[None], patch, 1, predictor, overlap=overlap,
                                                 mode="gaussian", sigma_scale=0.125)[0]
    return total / len(flips)


def test_tta_equals_eight_separate_passes_on_non_divisible_volume():
    model, image = make_net(), make_image((29, 23, 21))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    reference = per_flip_passes(model, image)
    assert ours.shape == (3, 29, 23, 21)
    assert ours.dtype == torch.float32
    assert ours.untyped_storage().nbytes() == ours.numel() * 4  # the one output buffer, nothing behind it
    assert (ours - reference).abs().max().item() <= 1e-4
    no_tta = SlidingWindowPredictor(model, PATCH, mirror_axes=(), precision="fp32", device="cpu")(image)
    assert (ours - no_tta).abs().max().item() > 1e-2  # the flips really change the logits


@pytest.mark.parametrize("mirror_axes", [(), (0,), (2,), (1, 2), (2, 0)])
def test_mirror_axes_subsets(mirror_axes):
    model, image = make_net(), make_image((27, 20, 18))
    ours = SlidingWindowPredictor(model, PATCH, mirror_axes=mirror_axes, precision="fp32", device="cpu")(image)
    assert (ours - per_flip_passes(model, image, mirror_axes)).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_equals_flipping_whole_volume_when_window_grid_is_symmetric():
    # (size - patch) is a multiple of the step (8) on every axis, so a flipped volume gets the same windows.
    model, image = make_net(), make_image((32, 24, 40))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    total = torch.zeros(())
    for dims in flip_dims((0, 1, 2)):
        flipped = image[None].flip(dims) if dims else image[None]
        out = sliding_window_inference(flipped, PATCH, 4, model, overlap=0.5, mode="gaussian", sigma_scale=0.125)
        total = total + (out.flip(dims) if dims else out)[0]
    assert (ours - total / 8).abs().max().item() <= 1e-4


@torch.inference_mode()
def test_volume_smaller_than_patch_is_padded_and_cropped():
    model, image = make_net(), make_image((10, 13, 7))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    # One window: the zero-padded volume (MONAI puts the odd voxel after), so blending weights cancel.
    padded = F.pad(image[None], (4, 5, 1, 2, 3, 3))
    expected = sum((model(padded.flip(d)).flip(d) if d else model(padded)) for d in flip_dims((0, 1, 2))) / 8
    expected = expected[0, :, 3:13, 1:14, 4:11]
    assert ours.shape == (3, 10, 13, 7)
    assert (ours - expected).abs().max().item() <= 1e-5
    assert ours.is_contiguous()
    assert ours.untyped_storage().nbytes() == ours.numel() * 4  # no padded buffer kept alive behind it


def test_mixed_sizes_one_axis_smaller_than_patch():
    model, image = make_net(), make_image((35, 9, 21))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    assert ours.shape == (3, 35, 9, 21)
    assert (ours - per_flip_passes(model, image)).abs().max().item() <= 1e-4


def test_batching_options_do_not_change_the_result():
    model, image = make_net(), make_image((30, 26, 20))
    base = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    for options in ({"sw_batch_size": 3}, {"network_batch_size": 1}, {"sw_batch_size": 2, "network_batch_size": 5}):
        other = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", **options)(image)
        assert (other - base).abs().max().item() <= 1e-5, options


def test_multichannel_and_integer_input():
    torch.manual_seed(0)
    model = SmallNet(in_channels=2, num_classes=4).eval()
    image = (make_image((20, 18, 17), channels=2) * 100).to(torch.int16)
    predictor = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")
    ours = predictor(image)
    assert ours.shape == (4, 20, 18, 17) and ours.dtype == torch.float32
    assert (ours - predictor(image.float())).abs().max().item() == 0
    assert (ours - per_flip_passes(model, image.float())).abs().max().item() <= 1e-3  # logits scale ~100


def test_deep_supervision_switched_off_and_restored():
    model = make_net(deep_supervision=True).train()
    image = make_image((20, 20, 20))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    assert model.deep_supervision is True and model.training
    plain = make_net(deep_supervision=False)
    assert (ours - per_flip_passes(plain, image)).abs().max().item() <= 1e-4


def test_list_output_without_switch_uses_first_head():
    torch.manual_seed(0)
    model = ListNet().eval()
    image = make_image((18, 17, 16))
    ours = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    assert (ours - per_flip_passes(model.net, image)).abs().max().item() <= 1e-4


def test_stunet_tiny_with_deep_supervision_matches_its_plain_forward():
    stunet = pytest.importorskip("aeval.models.stunet")
    torch.manual_seed(0)
    model = stunet.build_stunet("tiny", 1, 3, pool_op_kernel_sizes=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2).eval()
    image = make_image((32, 32, 32))
    ours = SlidingWindowPredictor(model, (32, 32, 32), mirror_axes=(), precision="fp32", device="cpu")(image)
    assert model.deep_supervision is True
    model.deep_supervision = False
    with torch.inference_mode():
        expected = model(image[None])[0]
    assert (ours - expected).abs().max().item() <= 1e-4


def test_bf16_agrees_with_fp32_on_argmax():
    model, image = make_net(), make_image((18, 17, 16))
    fp32 = SlidingWindowPredictor(model, PATCH, mirror_axes=(0,), precision="fp32", device="cpu")(image)
    with pytest.warns(UserWarning, match="AVX-512-BF16") if not inference.cpu_has_native_bf16() else _no_warning():
        bf16 = SlidingWindowPredictor(model, PATCH, mirror_axes=(0,), precision="bf16", device="cpu")(image)
    assert bf16.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().max().item() < 0.1  # bf16 really ran, and only rounding differs
    assert (bf16.argmax(0) == fp32.argmax(0)).float().mean().item() >= 0.99


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_auto_precision_follows_hardware(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert inference.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        inference.resolve_precision("fp16", torch.device("cpu"))


def test_cpu_bf16_detection_reads_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    words = set(cpuinfo.read_text().split())
    expected = bool(words & {"amx_bf16", "avx512_bf16"}) and torch.backends.mkldnn.is_available()
    assert inference.cpu_has_native_bf16() == expected


def test_bad_inputs_raise_clear_errors():
    predictor = SlidingWindowPredictor(make_net(), PATCH, precision="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"expects 1 input channel\(s\), the image has 2"):
        predictor(make_image((20, 20, 20), channels=2))
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        predictor(torch.zeros(20, 20, 20))
    with pytest.raises(ValueError, match="NaN"):
        predictor(torch.full((1, 20, 20, 20), float("nan")))
    with pytest.raises(ValueError, match="mirror_axes"):
        SlidingWindowPredictor(make_net(), PATCH, mirror_axes=(0, 3), device="cpu")
    with pytest.raises(ValueError, match="patch_size"):
        SlidingWindowPredictor(make_net(), (16, 16), device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="stitch_device"):
            SlidingWindowPredictor(make_net(), PATCH, device="cpu", stitch_device="cuda")


def test_gpu_benchmark_smoke_on_cpu(capsys):
    pytest.importorskip("aeval.models.stunet")
    path = ROOT / "experiments/benchmarks/gpu_inference.py"
    spec = importlib.util.spec_from_file_location("gpu_inference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--device", "cpu", "--size", "tiny", "--shape", "64,64,48"])
    assert [row["size"] for row in rows] == ["tiny"]
    assert rows[0]["seconds"] > 0 and rows[0]["windows"] == 1
    assert rows[0]["precision"] == ("bf16" if inference.cpu_has_native_bf16() else "fp32")
    assert f"| TINY | 0.91 | {rows[0]['precision']} |" in capsys.readouterr().out
    assert module.count_windows([512, 512, 300], [128, 128, 128], 0.5) == 7 * 7 * 4

    # The GPU-only checks, run on CPU against fp32 labels: both must find every label unchanged.
    torch.manual_seed(0)
    stunet = module.load_module("stunet_for_test", "aeval/models/stunet.py")
    model = stunet.build_stunet("tiny", 1, 3, pool_op_kernel_sizes=[[2, 2, 2]] * 3 + [[1, 1, 1]] * 2)
    image = make_image((32, 32, 24))
    args = argparse.Namespace(patch=[32, 32, 32], precision="fp32", network_batch_size=None)
    predictor = SlidingWindowPredictor(model, args.patch, precision="fp32", device="cpu")
    labels = module.predict_labels(predictor, image)
    row = {"size": "tiny", "precision": "bf16", "stitch": "cuda"}
    module.run_checks(module.load_module("inference_for_test", "aeval/inference.py"), model, image, labels, row,
                      args, torch.device("cpu"))
    assert row["agreement"] == 1.0 and row["host_agreement"] == 1.0


def test_own_tiler_places_and_weights_windows_as_monai():
    """The fp16-capable tiler with MONAI's tiling is MONAI's sliding_window_inference (the reference) in fp32:
    same window starts (incl. the last one moved back to the border), clamped Gaussian, symmetric padding."""
    model = make_net()
    for shape in ((30, 26, 20), (40, 16, 12), (17, 33, 16)):
        image = make_image(shape)
        predictor = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", mirror_axes=(0,))
        with torch.inference_mode():
            ours = predictor._tiled(image, torch.device("cpu"), torch.float32)
        reference = predictor(image)  # accumulate=auto: fp32 through MONAI for a small volume
        assert ours.dtype == torch.float32 and (ours - reference).abs().max().item() <= 1e-5, shape


def test_fp16_accumulation_keeps_the_labels_of_fp32():
    """Half the memory of the full-volume logits; the argmax of a small STU-Net on a CT-like volume is the
    fp32 path's on every voxel (fp16 keeps ~3 significant digits of the blended logits)."""
    from aeval.models.stunet import build_stunet

    torch.manual_seed(0)
    net = build_stunet("tiny", 1, 4, pool_op_kernel_sizes=[[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (40, 36, 28)], indexing="ij"))
    image = (grid[0] ** 2 + grid[1] ** 2 < 0.7).float() * 2 - 1 + 0.8 * (grid[2] > 0.2) + 0.1 * make_image(
        (40, 36, 28))[0]
    image = image[None]
    results = {}
    for accumulate in ("fp32", "fp16"):
        predictor = SlidingWindowPredictor(net, PATCH, precision="fp32", device="cpu", accumulate=accumulate)
        results[accumulate] = predictor(image)
    assert results["fp16"].dtype == torch.float16 and results["fp32"].dtype == torch.float32
    assert len(results["fp32"].argmax(0).unique()) > 1
    torch.testing.assert_close(results["fp16"].float(), results["fp32"], atol=5e-3, rtol=2e-3)
    assert torch.equal(results["fp16"].argmax(0), results["fp32"].argmax(0))


def test_accumulator_auto_rules(monkeypatch):
    model = make_net()
    monai = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")
    nnunet = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", tiling="nnunet")
    assert nnunet.accumulator_for((30, 26, 20)) == torch.float16  # as nnU-Net 2.8 blends
    assert monai.accumulator_for((30, 26, 20)) == torch.float32
    monkeypatch.setattr(inference, "FP32_LOGITS_LIMIT", 3 * 30 * 26 * 20 * 4 - 1)  # 3 classes just over
    assert monai.accumulator_for((30, 26, 20)) == torch.float16
    monkeypatch.setattr(inference, "FP32_LOGITS_LIMIT", 3 * 30 * 26 * 20 * 4)  # 3 classes just fit
    assert monai.accumulator_for((30, 26, 20)) == torch.float32
    with pytest.raises(ValueError, match="accumulate must be one of"):
        SlidingWindowPredictor(model, PATCH, device="cpu", accumulate="bf16")
    with pytest.raises(ValueError, match="cpu_allocator must be one of"):
        SlidingWindowPredictor(model, PATCH, device="cpu", cpu_allocator="jemalloc")


def test_cpu_network_batch_caps_samples_by_patch_voxels():
    assert inference.cpu_network_batch((64, 64, 64)) == 8
    assert inference.cpu_network_batch((128, 128, 128)) == 1
    assert inference.cpu_network_batch((160, 160, 160)) == 1
    predictor = SlidingWindowPredictor(make_net(), (128, 128, 128), device="cpu")
    assert predictor.window_predictor.network_batch_size == 1


def test_allocator_setting_does_not_change_the_result():
    model, image = make_net(), make_image((30, 26, 20))
    tuned = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu")(image)
    system = SlidingWindowPredictor(model, PATCH, precision="fp32", device="cpu", cpu_allocator="system")(image)
    assert torch.equal(tuned, system)
