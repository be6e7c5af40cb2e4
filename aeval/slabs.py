"""Logits read a slab of rows at a time along one axis: from a whole array, or as the predictor hands them over.

The restore stage resamples and argmaxes logits a few rows at a time (``aeval.data.geometry.resampled_argmax``),
so it never needs the whole volume's logits at once. :class:`LogitSlabs` lets the predictor's banded blending
(``aeval.stitching.BlendBand``) feed it directly: the rows arrive final, in order, and are dropped once read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch


class LogitSlabs:
    """The ``(K, X, Y, Z)`` logits of one volume, delivered as ``(first row, rows)`` slabs along ``axis``, in
    order and covering the axis. A slab may be a view its producer overwrites once the next one is asked for, so
    :meth:`rows` copies the few rows it still needs before asking. Rows must be read with a non-decreasing first
    row; rows before it are dropped.

    Args:
        shape: ``(K, X, Y, Z)`` of the whole volume's logits.
        axis: the spatial axis (0, 1 or 2) the slabs run along.
        dtype: the logits' dtype.
        slabs: the ``(first row, rows)`` pairs, ``rows`` shaped ``(K, n, ...)`` along ``axis``.
    """

    def __init__(self, shape: Sequence[int], axis: int, dtype: torch.dtype,
                 slabs: Iterable[tuple[int, torch.Tensor]]):
        self.shape = tuple(int(n) for n in shape)
        self.axis = int(axis)
        self.dtype = dtype
        self._slabs = iter(slabs)
        self._held: list[tuple[int, torch.Tensor]] = []  # (first row, rows), contiguous and in order
        self._end = 0  # one past the last row received

    @classmethod
    def whole(cls, logits: torch.Tensor, axis: int = 0) -> LogitSlabs:
        """Logits already in memory, as one slab."""
        return cls(logits.shape, axis, logits.dtype, [(0, logits)])

    def _keep_from(self, lo: int) -> None:
        """Own copies of the held rows from ``lo`` on (the producer may overwrite its views), the rest dropped."""
        kept = []
        for first, rows in self._held:
            count = rows.shape[1 + self.axis]
            if first + count > lo:
                skip = max(lo - first, 0)
                kept.append((first + skip, rows.narrow(1 + self.axis, skip, count - skip).clone()))
        self._held = kept

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of every channel, shaped ``(K, hi - lo, ...)`` along ``axis``."""
        size = self.shape[1 + self.axis]
        if not 0 <= lo < hi <= size:
            raise ValueError(f"rows {lo}:{hi} outside 0:{size}")
        if self._held and lo < self._held[0][0]:
            raise ValueError(f"rows from {lo} were already dropped (held from {self._held[0][0]})")
        while self._end < hi:
            self._keep_from(lo)
            try:
                first, rows = next(self._slabs)
            except StopIteration:
                raise ValueError(f"the slabs ended at row {self._end} of {size}") from None
            if first != self._end:
                raise ValueError(f"a slab starts at row {first}, expected {self._end}")
            self._held.append((first, rows))
            self._end = first + rows.shape[1 + self.axis]
        self._held = [(first, rows) for first, rows in self._held if first + rows.shape[1 + self.axis] > lo]
        parts = []
        for first, rows in self._held:
            count = rows.shape[1 + self.axis]
            start, stop = max(lo, first), min(hi, first + count)
            if stop > start:
                parts.append(rows.narrow(1 + self.axis, start - first, stop - start))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 + self.axis)


def channel_readers(logits: torch.Tensor | np.ndarray | LogitSlabs, axis: int,
                    keep_half: bool = False) -> list[Callable[[int, int], torch.Tensor]]:
    """One reader per channel: ``reader(lo, hi)`` is rows ``[lo, hi)`` along ``axis`` moved to the front, float32
    (fp16 stays fp16 with ``keep_half``: nnU-Net resamples fp16 logits). The readers of one ``lo, hi`` are asked
    channel after channel, so slabs are fetched once per row range."""
    if isinstance(logits, LogitSlabs) and logits.axis != axis:
        raise ValueError(f"logits arrive along axis {logits.axis}, rows are read along axis {axis}")
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def all_channels(lo: int, hi: int) -> torch.Tensor:
        if (lo, hi) not in cache:
            cache.clear()
            if isinstance(logits, LogitSlabs):
                part = logits.rows(lo, hi)
            else:
                index = [slice(None)] * 4
                index[1 + axis] = slice(lo, hi)
                part = logits[tuple(index)]
                part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.asarray(part, np.float32))
            cache[(lo, hi)] = part.detach()
        return cache[(lo, hi)]

    def reader(c: int) -> Callable[[int, int], torch.Tensor]:
        def rows(lo: int, hi: int) -> torch.Tensor:
            part = all_channels(lo, hi)[c].movedim(axis, 0)
            return part if keep_half and part.dtype == torch.float16 else part.float()
        return rows

    return [reader(c) for c in range(logits.shape[0])]
