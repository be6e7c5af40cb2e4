"""Where the windows of a sliding-window pass go, and how their logits are blended into a volume.

Window starts are nnU-Net's (as few windows as the step allows, spread evenly) or MONAI's (a fixed interval,
the last window moved back to the border). Weighted logits and weight sums accumulate in a :class:`BlendBand`:
the whole volume, or a band one patch deep along one axis. Windows are visited in order of their start along
that axis, so once the windows starting at row ``s`` are done, the rows before the next start are final: they
are divided by their weight sums and handed over, and the band moves on. A native-resolution CT's logits then
never exist at once: the band holds one patch depth of them, whatever the volume's length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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


class BlendBand:
    """Weighted logit sums and weight sums of the rows ``[start, start + depth)`` of a volume along ``axis``.

    Args:
        num_classes: logit channels.
        shape: the volume's spatial shape.
        axis: the spatial axis the band moves along.
        depth: rows held at once (at least the patch's extent along ``axis``); the whole volume when larger.
        dtype: dtype of the logit sums (fp32, or fp16 for half the memory).
        weight_dtype: dtype of the weight sums.
        device: where the sums live.
    """

    def __init__(self, num_classes: int, shape: Sequence[int], axis: int, depth: int, dtype: torch.dtype,
                 weight_dtype: torch.dtype, device: torch.device):
        band = [int(n) for n in shape]
        band[axis] = min(int(depth), band[axis])
        self.axis = axis
        self.start = 0
        self.logits = torch.zeros((num_classes, *band), dtype=dtype, device=device)
        self.weights = torch.zeros(band, dtype=weight_dtype, device=device)

    @property
    def depth(self) -> int:
        return int(self.weights.shape[self.axis])

    def nbytes(self) -> int:
        return self.logits.numel() * self.logits.element_size() + self.weights.numel() * self.weights.element_size()

    def add(self, window: Sequence[slice], logits: torch.Tensor, weight: torch.Tensor,
            weight_sum: torch.Tensor) -> None:
        """``logits * weight`` (in place on ``logits``) into the window's voxels, ``weight_sum`` into their
        weight sums (nnU-Net's order: ``prediction *= gaussian; logits[sl] += prediction; n[sl] += gaussian``)."""
        local = list(window)
        rows = local[self.axis]
        if rows.start < self.start or rows.stop > self.start + self.depth:
            raise ValueError(f"window rows {rows.start}:{rows.stop} outside the band "
                             f"{self.start}:{self.start + self.depth}")
        local[self.axis] = slice(rows.start - self.start, rows.stop - self.start)
        self.logits[(slice(None), *local)] += logits.mul_(weight)
        self.weights[tuple(local)] += weight_sum

    def finish(self, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` divided by their weight sums, in place and a channel at a time (no volume-sized
        temporary when the dtypes differ): a view of the band, valid until :meth:`advance`."""
        count = stop - self.start
        rows = self.logits.narrow(1 + self.axis, 0, count)
        weights = self.weights.narrow(self.axis, 0, count)
        for channel in rows:
            torch.div(channel, weights, out=channel)
        return rows

    def advance(self, start: int) -> None:
        """Move the band to begin at row ``start``: the rows kept move down one at a time (source and target
        never overlap, so no band-sized copy), the rows freed are zeroed."""
        shift = start - self.start
        keep = self.depth - shift
        for row in range(max(keep, 0)):
            self.logits.select(1 + self.axis, row).copy_(self.logits.select(1 + self.axis, row + shift))
            self.weights.select(self.axis, row).copy_(self.weights.select(self.axis, row + shift))
        freed = max(keep, 0)
        self.logits.narrow(1 + self.axis, freed, self.depth - freed).zero_()
        self.weights.narrow(self.axis, freed, self.depth - freed).zero_()
        self.start = start
