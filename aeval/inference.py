"""Sliding-window prediction with mirror test-time augmentation, as nnU-Net/STU-Net infer.

The window loop, Gaussian blending and padding of small volumes are MONAI's ``sliding_window_inference``;
what this module adds is that the mirror flips of each window travel through the network as ONE batch
(so one sliding-window pass does all 2^n flips), bf16 autocast where the hardware runs it natively, and a
choice of where the full-volume logits are stitched (the compute GPU, or host memory for large volumes).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from torch import nn

from aeval.cpu import cpu_has_native_bf16, inference_allocator, release_free_heap

PRECISIONS = ("auto", "bf16", "fp32")
TILINGS = ("monai", "nnunet")
STITCH_DEVICES = ("auto", "cpu", "cuda")
# Dtype of the full-volume logits and weight sums: fp32, fp16 (half the memory; nnU-Net 2.8 accumulates so,
# also on CPU), or auto = fp16 with nnU-Net's tiling (its published behaviour), else fp32.
ACCUMULATORS = ("auto", "fp32", "fp16")
# tuned: glibc keeps activation-sized blocks for reuse while predicting on a CPU (aeval.cpu.inference_allocator)
CPU_ALLOCATORS = ("tuned", "system")
# Stitch on the GPU only while the output and count map take at most this share of the free GPU memory.
GPU_STITCH_SHARE = 0.5
# accumulate=auto with MONAI's tiling: fp16 logits once fp32 ones would take more than this (native-resolution CTs)
FP32_LOGITS_LIMIT = 2 << 30
CPU_VOXELS_PER_FORWARD = 128 ** 3
# CPU, tuned allocator: free heap memory is returned after every window once the logits take more than this
TRIM_LOGITS_ABOVE = 1 << 30


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes ``bf16`` on CUDA GPUs with bf16 and on CPUs with native bf16 units, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and device.type == "cpu" and not native:
        warnings.warn("bf16 requested on a CPU without AMX/AVX-512-BF16: convolutions will be far slower "
                      "than fp32", stacklevel=3)
    return precision


def mirror_flips(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial ``mirror_axes`` as tensor dims of a (N, C, X, Y, Z) batch, identity first."""
    axes = tuple(int(a) for a in mirror_axes)
    if len(set(axes)) != len(axes) or any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2, got {tuple(mirror_axes)}")
    dims = [a + 2 for a in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def _first_output(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of a network that may return its deep-supervision heads."""
    return out if isinstance(out, torch.Tensor) else out[0]


class MirroredNetwork:
    """The window predictor handed to MONAI: runs a window batch together with its flipped copies through
    the network (at most ``network_batch_size`` samples per forward), un-flips and averages the logits in
    fp32. Averaging per window before blending equals averaging 2^n separately blended passes."""

    def __init__(self, model: nn.Module, flips: Sequence[tuple[int, ...]], precision: str,
                 network_batch_size: int | None = None):
        self.model = model
        self.flips = list(flips)
        self.precision = precision
        self.network_batch_size = network_batch_size

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return _first_output(self.model(batch))

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        n = windows.shape[0]
        flips_per_forward = len(self.flips)
        if self.network_batch_size is not None:
            flips_per_forward = max(1, min(len(self.flips), self.network_batch_size // n))
        summed: torch.Tensor | None = None
        for start in range(0, len(self.flips), flips_per_forward):
            group = self.flips[start:start + flips_per_forward]
            logits = self.run(torch.cat([windows.flip(f) if f else windows for f in group]))
            for i, f in enumerate(group):
                part = logits[i * n:(i + 1) * n]
                part = (part.flip(f) if f else part).float()
                summed = part.clone() if summed is None else summed.add_(part)
            del logits
        assert summed is not None
        return summed.div_(len(self.flips))


def nnunet_steps(image_size: Sequence[int], patch_size: Sequence[int], step: float) -> list[list[int]]:
    """nnU-Net's window starts per axis: as few windows as a step of ``step`` x patch allows, spread evenly
    (MONAI instead steps by the full interval and clamps the last window to the border)."""
    steps = []
    for size, patch in zip(image_size, patch_size, strict=True):
        count = int(math.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (count - 1) if count > 1 else 0
        steps.append([int(round(stride * i)) for i in range(count)])
    return steps


def monai_steps(image_size: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[list[int]]:
    """MONAI's window starts per axis (``sliding_window_inference``): every ``int(patch x (1 - overlap))``
    voxels, the last window moved back to end at the border."""
    steps = []
    for size, patch in zip(image_size, patch_size, strict=True):
        interval = patch if patch == size else max(1, int(patch * (1 - overlap)))
        count = next(i for i in range(int(math.ceil(size / interval))) if i * interval + patch >= size) + 1
        steps.append([i * interval - max(i * interval + patch - size, 0) for i in range(count)])
    return steps


def cpu_network_batch(patch_size: Sequence[int]) -> int:
    """Samples per forward on a CPU when not set: all flips of small windows (a larger batch uses the cores
    better), one 128^3 window at a time (STU-Net-S: ~0.9 GB of activations per 128^3 sample)."""
    return max(1, CPU_VOXELS_PER_FORWARD // math.prod(int(p) for p in patch_size))


def infer_in_channels(model: nn.Module) -> int | None:
    """The channel count the network expects: its ``in_channels`` attribute or that of its first conv."""
    value = getattr(model, "in_channels", None)
    if isinstance(value, int):
        return value
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


class SlidingWindowPredictor:
    """TTA-averaged logits of a 3-D segmentation network on a preprocessed volume.

    ``predictor(image)`` takes a ``(C, X, Y, Z)`` tensor and returns ``(K, X, Y, Z)`` logits (float32, or
    float16 where :meth:`accumulator_for` says so: ``accumulate``) on the stitching device (CPU, or the GPU
    when the output fits; ``stitch_device`` forces one). Windows of ``patch_size`` overlap by ``overlap`` and
    are blended with a Gaussian (sigma = patch/8, as nnU-Net);
    volumes smaller than the patch are zero-padded and cropped back. ``importance_map`` replaces MONAI's
    Gaussian and ``tiling="nnunet"`` places the windows where nnU-Net does (:func:`nnunet_steps`), so official
    nnU-Net models blend exactly the windows nnU-Net blends. The model is moved to ``device``
    (default: CUDA if available) and run in eval mode with deep supervision off; both are restored after.
    """

    def __init__(self, model: nn.Module, patch_size: Sequence[int], overlap: float = 0.5,
                 mirror_axes: Sequence[int] = (0, 1, 2), precision: str = "auto",
                 device: torch.device | str | None = None, sw_batch_size: int = 1,
                 stitch_device: str = "auto", network_batch_size: int | None = None,
                 in_channels: int | None = None, importance_map: torch.Tensor | None = None,
                 tiling: str = "monai", accumulate: str = "auto", cpu_allocator: str = "tuned"):
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {tuple(patch_size)}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if stitch_device not in STITCH_DEVICES:
            raise ValueError(f"stitch_device must be one of {STITCH_DEVICES}, got {stitch_device!r}")
        if tiling not in TILINGS:
            raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
        if cpu_allocator not in CPU_ALLOCATORS:
            raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {cpu_allocator!r}")
        if accumulate not in ACCUMULATORS:
            raise ValueError(f"accumulate must be one of {ACCUMULATORS}, got {accumulate!r}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if stitch_device == "cuda" and self.device.type != "cuda":
            raise ValueError("stitch_device='cuda' needs the network on a CUDA device")
        self.model = model.to(self.device)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.overlap = float(overlap)
        self.flips = mirror_flips(mirror_axes)
        self.precision = resolve_precision(precision, self.device)
        self.sw_batch_size = int(sw_batch_size)
        self.stitch_device = stitch_device
        self.tiling = tiling
        self.accumulate = accumulate
        self.cpu_allocator = cpu_allocator
        self.in_channels = in_channels if in_channels is not None else infer_in_channels(model)
        if network_batch_size is None and self.device.type == "cpu":
            network_batch_size = cpu_network_batch(self.patch_size)
        self.window_predictor = MirroredNetwork(self.model, self.flips, self.precision, network_batch_size)
        if importance_map is not None and tuple(importance_map.shape) != self.patch_size:
            raise ValueError(f"importance_map has shape {tuple(importance_map.shape)}, the patch is {self.patch_size}")
        self.importance_map = (importance_map.to(self.device, torch.float32) if importance_map is not None else
                               compute_importance_map(self.patch_size, mode="gaussian", sigma_scale=0.125,
                                                      device=self.device, dtype=torch.float32))
        self._num_classes: int | None = None

    def _check_image(self, image: torch.Tensor) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor of shape (C, X, Y, Z), got {type(image).__name__}")
        if image.ndim != 4:
            raise ValueError(f"expected a (C, X, Y, Z) image, got shape {tuple(image.shape)}")
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise ValueError(f"the network expects {self.in_channels} input channel(s), the image has "
                             f"{image.shape[0]} (shape {tuple(image.shape)})")
        image = image.as_subclass(torch.Tensor).float()
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        return image

    @torch.inference_mode()
    def num_classes(self) -> int:
        """Output channels of the network, from one forward pass on a blank patch (cached)."""
        if self._num_classes is None:
            probe = torch.zeros(1, self.in_channels or 1, *self.patch_size, device=self.device)
            self._num_classes = int(self.window_predictor.run(probe).shape[1])
        return self._num_classes

    def stitch_device_for(self, spatial_shape: Sequence[int]) -> torch.device:
        """Where the logits of a volume are accumulated: the GPU while output + count map take at most half
        of its free memory (fast, no transfers), else host memory; always the host for CPU inference."""
        if self.device.type != "cuda" or self.stitch_device == "cpu":
            return torch.device("cpu")
        if self.stitch_device == "cuda":
            return self.device
        voxels = 1
        for size, patch in zip(spatial_shape, self.patch_size, strict=True):
            voxels *= max(size, patch)
        logits_bytes = torch.empty((), dtype=self.accumulator_for(spatial_shape)).element_size()
        needed = (self.num_classes() * logits_bytes + 4) * voxels  # the logits and an fp32 weight map
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return self.device if needed <= GPU_STITCH_SHARE * free else torch.device("cpu")

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self._check_image(image)
        was_training = self.model.training
        had_deep_supervision = hasattr(self.model, "deep_supervision")
        previous = getattr(self.model, "deep_supervision", None)
        self.model.eval()
        if had_deep_supervision:
            self.model.deep_supervision = False
        tuned = self.device.type == "cpu" and self.cpu_allocator == "tuned"
        try:
            with inference_allocator(tuned):
                return self._predict(image)
        finally:
            self.model.train(was_training)
            if had_deep_supervision:
                self.model.deep_supervision = previous

    def accumulator_for(self, spatial_shape: Sequence[int]) -> torch.dtype:
        """The dtype of the full-volume logits: ``accumulate``, where ``auto`` is fp16 with nnU-Net's tiling
        (nnU-Net 2.8 blends in fp16, so its labels are reproduced) and, with MONAI's, fp32 unless fp32 logits
        would exceed ``FP32_LOGITS_LIMIT`` bytes (a native-resolution CT: half the memory)."""
        if self.accumulate != "auto":
            return torch.float16 if self.accumulate == "fp16" else torch.float32
        if self.tiling == "nnunet":
            return torch.float16
        voxels = math.prod(max(int(n), p) for n, p in zip(spatial_shape, self.patch_size, strict=True))
        if 256 * 4 * voxels <= FP32_LOGITS_LIMIT:  # fits whatever the class count (uint8 labels): no probe
            return torch.float32
        return torch.float16 if self.num_classes() * 4 * voxels > FP32_LOGITS_LIMIT else torch.float32

    def _predict(self, image: torch.Tensor) -> torch.Tensor:
        stitch = self.stitch_device_for(image.shape[1:])
        dtype = self.accumulator_for(image.shape[1:])
        if self.tiling == "nnunet" or dtype != torch.float32:
            return self._tiled(image, stitch, dtype)
        # Windows computed on a GPU but stitched in host memory: accumulate one slab of windows on the
        # GPU before each copy to the host (MONAI's buffered mode) instead of one copy per window.
        buffered = stitch.type != self.device.type
        inputs = image.to("cpu" if buffered else stitch)[None]
        logits = sliding_window_inference(
            inputs, self.patch_size, self.sw_batch_size, self.window_predictor, overlap=self.overlap,
            mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=0.0,
            sw_device=self.device, device=stitch, roi_weight_map=self.importance_map,
            buffer_steps=1 if buffered else None,
        )
        return logits[0].contiguous()

    def _tiled(self, image: torch.Tensor, stitch: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Zero-pad to the patch (split below/above as nnU-Net and MONAI do), blend the windows at nnU-Net's
        or MONAI's positions with the importance map into ``dtype`` accumulators, crop the padding off.

        With nnU-Net's tiling the weight sums share the logits' dtype and every operation is nnU-Net 2.8's
        (``prediction *= gaussian; logits[sl] += prediction; n[sl] += gaussian; logits /= n``), so fp16
        rounds as nnU-Net rounds; with MONAI's the weights are clamped to >= 1e-3 and summed in fp32, as MONAI."""
        shape = image.shape[1:]
        pads = [max(p - n, 0) for n, p in zip(shape, self.patch_size, strict=True)]
        below = [d // 2 for d in pads]
        flat = [x for d, lo in zip(reversed(pads), reversed(below), strict=True) for x in (lo, d - lo)]
        padded = (torch.nn.functional.pad(image, flat) if any(pads) else image).to(stitch)
        nnunet = self.tiling == "nnunet"
        steps = (nnunet_steps(padded.shape[1:], self.patch_size, 1 - self.overlap) if nnunet else
                 monai_steps(padded.shape[1:], self.patch_size, self.overlap))
        windows = list(itertools.product(*steps))
        weight = self.importance_map.to(stitch)
        if not nnunet:
            weight = weight.clamp(min=max(float(weight[weight > 0].min()), 1e-3))
        total = torch.zeros(padded.shape[1:], device=stitch, dtype=dtype if nnunet else torch.float32)
        total_weight = weight.to(total.dtype)
        tuned = self.device.type == "cpu" and self.cpu_allocator == "tuned"
        trim = False
        out = None
        for start in range(0, len(windows), self.sw_batch_size):
            group = [tuple(slice(s, s + p) for s, p in zip(pos, self.patch_size, strict=True))
                     for pos in windows[start:start + self.sw_batch_size]]
            batch = torch.stack([padded[(slice(None), *sl)] for sl in group]).to(self.device)
            logits = self.window_predictor(batch).to(stitch)
            if out is None:
                out = torch.zeros((logits.shape[1], *padded.shape[1:]), device=stitch, dtype=dtype)
                # a large volume: the heap's free blocks go back after each window (peak over speed)
                trim = tuned and out.numel() * out.element_size() > TRIM_LOGITS_ABOVE
            for sl, part in zip(group, logits, strict=True):
                out[(slice(None), *sl)] += part.mul_(weight)
                total[sl] += total_weight
            del batch, logits
            if trim:
                release_free_heap()
        del padded
        for channel in out:  # in place, a channel at a time: no full-volume temporary when dtypes differ
            torch.div(channel, total, out=channel)
        return out[(slice(None), *[slice(lo, lo + n) for lo, n in zip(below, shape, strict=True)])].contiguous()
