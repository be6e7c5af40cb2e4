"""Sliding-window prediction with mirror test-time augmentation, as nnU-Net/STU-Net infer.

The window loop, Gaussian blending and padding of small volumes are MONAI's ``sliding_window_inference``;
what this module adds is that the mirror flips of each window travel through the network as ONE batch
(so one sliding-window pass does all 2^n flips), bf16 autocast where the hardware runs it natively, a
choice of where the logits are stitched (the compute GPU, or host memory for large volumes), and, for volumes
too large to hold their logits, blending in a band that hands rows over as they become final
(:meth:`SlidingWindowPredictor.slabs`, ``aeval.stitching``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence

import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference
from torch import nn

from aeval.cpu import (
    BAND_MMAP_THRESHOLD,
    INFERENCE_MMAP_THRESHOLD,
    cpu_has_native_bf16,
    inference_allocator,
    release_free_heap,
)
from aeval.slabs import LogitSlabs
from aeval.stitching import BlendBand, monai_steps, nnunet_steps

PRECISIONS = ("auto", "bf16", "fp32")
TILINGS = ("monai", "nnunet")
STITCH_DEVICES = ("auto", "cpu", "cuda")
# Dtype of the blended logits and weight sums: fp32, fp16 (half the memory; nnU-Net 2.8 accumulates so,
# also on CPU), or auto = fp16 with nnU-Net's tiling (its published behaviour), else fp32.
ACCUMULATORS = ("auto", "fp32", "fp16")
# tuned: glibc keeps activation-sized blocks for reuse while predicting on a CPU (aeval.cpu.inference_allocator)
CPU_ALLOCATORS = ("tuned", "system")
# Stitch on the GPU only while the logit and weight sums take at most this share of the free GPU memory.
GPU_STITCH_SHARE = 0.5
# accumulate=auto with MONAI's tiling: fp16 sums once fp32 ones would take more than this
FP32_LOGITS_LIMIT = 2 << 30
CPU_VOXELS_PER_FORWARD = 128 ** 3
# CPU, tuned allocator: free heap memory is returned after every window once the logits take more than this
# (not for a band: measured with STU-Net-S, it raised the peak, 3729 -> 3946 MiB, and cost 5 % of the time)
TRIM_LOGITS_ABOVE = 1 << 30
# SlidingWindowPredictor.slabs: blend in a band one patch deep once the whole volume's fp32 logits would take more
SLAB_LOGITS_ABOVE = 1 << 30


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
    when the output fits; ``stitch_device`` forces one); :meth:`slabs` hands them over a slab of rows at a
    time, in a third of the memory for a large volume. Windows of ``patch_size`` overlap by ``overlap`` and
    are blended with a Gaussian (sigma = patch/8, as nnU-Net);
    volumes smaller than the patch are zero-padded and cropped back. ``importance_map`` replaces MONAI's
    Gaussian and ``tiling="nnunet"`` places the windows where nnU-Net does (``aeval.stitching.nnunet_steps``),
    so official nnU-Net models blend exactly the windows nnU-Net blends. The model is moved to ``device``
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
        """Where the logits over ``spatial_shape`` (a volume, or a band of it) are accumulated: the GPU while
        the logit and weight sums take at most half of its free memory (fast, no transfers), else host memory;
        always the host for CPU inference."""
        if self.device.type != "cuda" or self.stitch_device == "cpu":
            return torch.device("cpu")
        if self.stitch_device == "cuda":
            return self.device
        voxels = math.prod(self._padded(spatial_shape))
        logits_bytes = torch.empty((), dtype=self.accumulator_for(spatial_shape)).element_size()
        needed = (self.num_classes() * logits_bytes + 4) * voxels  # the logits and an fp32 weight map
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return self.device if needed <= GPU_STITCH_SHARE * free else torch.device("cpu")

    def _padded(self, spatial_shape: Sequence[int]) -> list[int]:
        """The shape windows are blended over: ``spatial_shape`` zero-padded to at least the patch."""
        return [max(int(n), p) for n, p in zip(spatial_shape, self.patch_size, strict=True)]

    def _fp32_logits_exceed(self, spatial_shape: Sequence[int], limit: float) -> bool:
        """Whether fp32 ``(K, *spatial_shape)`` logits (padded to the patch) take more than ``limit`` bytes; the
        class count K is probed only when it matters."""
        voxels = math.prod(self._padded(spatial_shape))
        if 256 * 4 * voxels <= limit:  # small whatever the class count (uint8 labels): no probe
            return False
        return self.num_classes() * 4 * voxels > limit

    def accumulator_for(self, spatial_shape: Sequence[int]) -> torch.dtype:
        """The dtype of the logit sums over ``spatial_shape`` (the volume, or a band of it): ``accumulate``,
        where ``auto`` is fp16 with nnU-Net's tiling (nnU-Net 2.8 blends in fp16, so its labels are reproduced)
        and, with MONAI's, fp32 unless fp32 sums would exceed ``FP32_LOGITS_LIMIT`` bytes (half the memory)."""
        if self.accumulate != "auto":
            return torch.float16 if self.accumulate == "fp16" else torch.float32
        if self.tiling == "nnunet":
            return torch.float16
        return torch.float16 if self._fp32_logits_exceed(spatial_shape, FP32_LOGITS_LIMIT) else torch.float32

    @contextlib.contextmanager
    def _prepared(self, banded: bool = False) -> Iterator[None]:
        """Eval mode, deep supervision off and (CPU) the tuned allocator (``banded``: its lower-peak setting); the
        model's state restored after."""
        was_training = self.model.training
        had_deep_supervision = hasattr(self.model, "deep_supervision")
        previous = getattr(self.model, "deep_supervision", None)
        self.model.eval()
        if had_deep_supervision:
            self.model.deep_supervision = False
        tuned = self.device.type == "cpu" and self.cpu_allocator == "tuned"
        try:
            threshold = BAND_MMAP_THRESHOLD if banded else INFERENCE_MMAP_THRESHOLD
            with torch.inference_mode(), inference_allocator(tuned, threshold):
                yield
        finally:
            self.model.train(was_training)
            if had_deep_supervision:
                self.model.deep_supervision = previous

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self._check_image(image)
        with self._prepared():
            return self._predict(image)

    def slabs(self, image: torch.Tensor, axis: int = 0, stream: bool | None = None) -> LogitSlabs:
        """The logits of ``image`` handed over as final slabs along ``axis``, for a consumer that reads a few rows
        at a time (``aeval.data.restore``). With ``stream`` (default: when the volume's fp32 logits would take
        more than ``SLAB_LOGITS_ABOVE`` bytes) windows are blended in a band one patch deep along ``axis``, so
        memory holds that band instead of the volume; the values are the whole-volume blend's (same windows,
        weights and per-voxel order when ``axis`` is 0). Otherwise the whole volume is predicted and is one slab.
        The image is checked now; the windows run as the slabs are read."""
        image = self._check_image(image)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if stream is None:
            stream = self._fp32_logits_exceed(image.shape[1:], SLAB_LOGITS_ABOVE)
        if not stream:
            with self._prepared():
                return LogitSlabs.whole(self._predict(image), axis)
        band = self._padded(image.shape[1:])
        band[axis] = self.patch_size[axis]
        dtype = self.accumulator_for(band)
        stitch = self.stitch_device_for(band)

        def blended() -> Iterator[tuple[int, torch.Tensor]]:
            slabs = self._blend(image, stitch, dtype, axis, self.patch_size[axis])
            while True:  # the model's state and inference mode only while a slab is computed, not across yields
                with self._prepared(banded=True):
                    slab = next(slabs, None)
                if slab is None:
                    return
                yield slab

        return LogitSlabs((self.num_classes(), *image.shape[1:]), axis, dtype, blended())

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
        """The whole volume blended by :meth:`_blend` into ``dtype`` sums (one band covering the volume)."""
        ((_, logits),) = self._blend(image, stitch, dtype, axis=0, depth=None)
        return logits.contiguous()

    def _blend(self, image: torch.Tensor, stitch: torch.device, dtype: torch.dtype, axis: int,
               depth: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Zero-pad to the patch (split below/above as nnU-Net and MONAI do), blend the windows at nnU-Net's or
        MONAI's positions with the importance map into a :class:`BlendBand` of ``depth`` rows along ``axis``
        (``None``: the whole volume), yield ``(first row, logits rows)`` of the unpadded volume as rows become
        final (views of the band, valid until the next is asked for).

        With nnU-Net's tiling the weight sums share the logits' dtype and every operation is nnU-Net 2.8's
        (``prediction *= gaussian; logits[sl] += prediction; n[sl] += gaussian; logits /= n``), so fp16
        rounds as nnU-Net rounds; with MONAI's the weights are clamped to >= 1e-3 and summed in fp32, as MONAI."""
        shape = image.shape[1:]
        pads = [max(p - n, 0) for n, p in zip(shape, self.patch_size, strict=True)]
        below = [d // 2 for d in pads]
        flat = [x for d, lo in zip(reversed(pads), reversed(below), strict=True) for x in (lo, d - lo)]
        padded = (torch.nn.functional.pad(image, flat) if any(pads) else image).to(stitch)
        size = padded.shape[1 + axis]
        nnunet = self.tiling == "nnunet"
        steps = (nnunet_steps(padded.shape[1:], self.patch_size, 1 - self.overlap) if nnunet else
                 monai_steps(padded.shape[1:], self.patch_size, self.overlap))
        banded = depth is not None and depth < size
        windows = list(itertools.product(*steps))
        levels = [windows]
        if banded:  # by start along ``axis`` (a stable sort: nnU-Net's order within a row of windows)
            windows.sort(key=lambda start: start[axis])
            levels = [list(group) for _, group in itertools.groupby(windows, key=lambda start: start[axis])]
        weight = self.importance_map.to(stitch)
        if not nnunet:
            weight = weight.clamp(min=max(float(weight[weight > 0].min()), 1e-3))
        weight_dtype = dtype if nnunet else torch.float32
        weight_sum = weight.to(weight_dtype)
        crop = [slice(lo, lo + n) for lo, n in zip(below, shape, strict=True)]
        tuned = self.device.type == "cpu" and self.cpu_allocator == "tuned"
        band: BlendBand | None = None
        trim = False

        def final_rows(stop: int) -> Iterator[tuple[int, torch.Tensor]]:
            """Rows [band.start, stop) of the padded volume, divided, cropped to the image's rows."""
            assert band is not None
            rows = band.finish(stop)
            lo, hi = max(band.start, crop[axis].start), min(stop, crop[axis].stop)
            if hi > lo:
                index = [slice(None), *crop]
                index[1 + axis] = slice(lo - band.start, hi - band.start)
                yield lo - crop[axis].start, rows[tuple(index)]

        for level in levels:
            if band is not None and level[0][axis] > band.start:
                yield from final_rows(level[0][axis])
                band.advance(level[0][axis])
            for start in range(0, len(level), self.sw_batch_size):
                group = [tuple(slice(s, s + p) for s, p in zip(pos, self.patch_size, strict=True))
                         for pos in level[start:start + self.sw_batch_size]]
                batch = torch.stack([padded[(slice(None), *sl)] for sl in group]).to(self.device)
                logits = self.window_predictor(batch).to(stitch)
                if band is None:
                    band = BlendBand(logits.shape[1], padded.shape[1:], axis, depth or size, dtype, weight_dtype,
                                     stitch)
                    # a large volume: the heap's free blocks go back after each window (peak over speed)
                    trim = tuned and band.nbytes() > TRIM_LOGITS_ABOVE
                for sl, part in zip(group, logits, strict=True):
                    band.add(sl, part, weight, weight_sum)
                del batch, logits
                if trim:
                    release_free_heap()
        del padded
        yield from final_rows(size)
