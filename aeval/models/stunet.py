"""STU-Net (Huang et al., 2023), the residual nnU-Net family A-Eval uses: sizes S/B/L/H plus a CPU ``tiny``.

Module names and shapes follow the official implementation so that released checkpoints load with
``strict=True``: ``conv_blocks_context.{stage}.{block}``, ``upsample_layers.{u}.conv``,
``conv_blocks_localization.{u}.{block}`` and ``seg_outputs.{u}``.

:func:`summarize` counts parameters, FLOPs and an activation memory estimate on the meta device
(``experiments/benchmarks/stunet_cost.py --size l`` prints them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aeval.keys import model_size

NUM_STAGES = 6
DEFAULT_POOLS: list[list[int]] = [[2, 2, 2]] * (NUM_STAGES - 1)

# size -> (channels per stage, residual blocks per stage); encoder and decoder use the same numbers.
STUNET_SIZES: dict[str, tuple[list[int], list[int]]] = {
    "tiny": ([4 * m for m in (1, 2, 4, 8, 16, 16)], [1] * NUM_STAGES),
    "s": ([16 * m for m in (1, 2, 4, 8, 16, 16)], [1] * NUM_STAGES),
    "b": ([32 * m for m in (1, 2, 4, 8, 16, 16)], [1] * NUM_STAGES),
    "l": ([64 * m for m in (1, 2, 4, 8, 16, 16)], [2] * NUM_STAGES),
    "h": ([96 * m for m in (1, 2, 4, 8, 16, 16)], [3] * NUM_STAGES),
}


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm + shortcut, then act; the 1x1x1 ``conv3`` shortcut exists only when asked."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1),
                 shortcut_conv: bool = False):
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act1 = nn.LeakyReLU(0.01, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True)
        self.act2 = nn.LeakyReLU(0.01, inplace=True)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if shortcut_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        shortcut = x if self.conv3 is None else self.conv3(x)
        return self.act2(y + shortcut)


class NearestUpsample(nn.Module):
    """Nearest-neighbour upsampling by the encoder's stride, then a 1x1x1 conv to the skip's width."""

    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)
        self.scale = tuple(float(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: Sequence[int]) -> nn.Sequential:
    first = ResidualBlock(in_channels, out_channels, stride, shortcut_conv=True)
    rest = [ResidualBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


def _he_init(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2): Kaiming normal for conv weights, zero biases."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class STUNet(nn.Module):
    """The STU-Net encoder-decoder; ``forward`` returns all decoder heads (full resolution first) under
    deep supervision, else the full-resolution logits."""

    def __init__(self, in_channels: int, num_classes: int, dims: Sequence[int], depth: Sequence[int],
                 pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None, deep_supervision: bool = True):
        super().__init__()
        pools = [list(map(int, p)) for p in (pool_op_kernel_sizes or DEFAULT_POOLS)]
        if not (len(dims) == len(depth) == len(pools) + 1):
            raise ValueError(f"need len(dims) == len(depth) == len(pools) + 1, got {len(dims)}, "
                             f"{len(depth)}, {len(pools)}")
        if any(len(p) != 3 or min(p) < 1 for p in pools):
            raise ValueError(f"pool kernel sizes must be 3 positive ints each, got {pools}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dims = list(dims)
        self.depth = list(depth)
        self.pool_op_kernel_sizes = pools
        self.deep_supervision = deep_supervision

        self.conv_blocks_context = nn.ModuleList([_stage(in_channels, dims[0], depth[0], (1, 1, 1))])
        for d in range(1, len(dims)):
            self.conv_blocks_context.append(_stage(dims[d - 1], dims[d], depth[d], pools[d - 1]))

        n_up = len(pools)
        self.upsample_layers = nn.ModuleList(
            NearestUpsample(dims[-1 - u], dims[-2 - u], pools[-1 - u]) for u in range(n_up))
        self.conv_blocks_localization = nn.ModuleList(
            _stage(2 * dims[-2 - u], dims[-2 - u], depth[-2 - u], (1, 1, 1)) for u in range(n_up))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(n_up))
        self.apply(_he_init)

    @property
    def shape_divisor(self) -> tuple[int, int, int]:
        """Each spatial size of the input must be a multiple of this (product of the strides per axis)."""
        return tuple(math.prod(p[a] for p in self.pool_op_kernel_sizes) for a in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        divisor = self.shape_divisor
        if any(s % d for s, d in zip(x.shape[2:], divisor, strict=True)):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} is not divisible by {divisor} "
                             "(the product of the pool kernel sizes)")
        if all(s == d for s, d in zip(x.shape[2:], divisor, strict=True)):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} leaves a 1-voxel bottleneck, which "
                             "instance norm cannot normalise; use a larger patch or fewer pools")
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)

        logits = []
        for up, stage, head, skip in zip(self.upsample_layers, self.conv_blocks_localization,
                                         self.seg_outputs, reversed(skips), strict=True):
            x = stage(torch.cat((up(x), skip), dim=1))
            if self.deep_supervision:
                logits.append(head(x))
        if not self.deep_supervision:
            return self.seg_outputs[-1](x)
        return logits[::-1]


def build_stunet(size: str, in_channels: int, num_classes: int,
                 pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None,
                 deep_supervision: bool = True) -> STUNet:
    """STU-Net of a published size (``s``, ``b``, ``l``, ``h``) or ``tiny``; pools default to [[2,2,2]]*5."""
    key = model_size(size)
    if key not in STUNET_SIZES:
        raise ValueError(f"unknown STU-Net size {size!r}; choose from {sorted(STUNET_SIZES)}")
    dims, depth = STUNET_SIZES[key]
    return STUNet(in_channels, num_classes, dims, depth, pool_op_kernel_sizes, deep_supervision)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of a module (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def forward_cost(model: STUNet, patch: Sequence[int], batch: int = 1) -> dict[str, float]:
    """FLOPs of one forward pass and bytes of tensors kept for backward (fp32), computed on the meta device
    so that even STU-Net H costs no memory. Parameters are excluded from the activation bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    if next(model.parameters()).device.type != "meta":
        model = _meta_copy(model)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_storages:
            saved[key] = max(saved.get(key, 0), t.numel() * t.element_size())
        return t

    x = torch.empty(batch, model.in_channels, *patch, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as fc:
        model(x)
    return {"flops": float(fc.get_total_flops()), "activation_bytes": float(sum(saved.values()))}


def _meta_copy(model: STUNet) -> STUNet:
    with torch.device("meta"):
        return STUNet(model.in_channels, model.num_classes, model.dims, model.depth,
                      model.pool_op_kernel_sizes, model.deep_supervision)


def summarize(size: str, patch: Sequence[int], batch: int = 1, in_channels: int = 1, num_classes: int = 105,
              pool_op_kernel_sizes: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Parameters, forward FLOPs and fp32 activation bytes of one STU-Net for a batch of patches."""
    with torch.device("meta"):
        model = build_stunet(size, in_channels, num_classes, pool_op_kernel_sizes)
    return {"parameters": float(count_parameters(model)), **forward_cost(model, patch, batch)}
