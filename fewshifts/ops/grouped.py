"""ShiftNet's heuristic grouped shift assignment (SSL paper Eq. 2)."""

from __future__ import annotations

import torch
from torch import Tensor


def displacements(kernel_size: int = 3, connectivity: int = 8) -> list[tuple[int, int]]:
    """The (dy, dx) displacements of a K x K shift kernel in raster order (top-left first).

    ``connectivity=8`` is the full K x K grid; ``connectivity=4`` keeps the centre row and column
    (centre plus up/down/left/right, "4-connected shift" of Brown et al.).
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size should be a positive odd integer instead of {kernel_size!r}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity should be 4 or 8 instead of {connectivity!r}")
    r = kernel_size // 2
    grid = [(g // kernel_size - r, g % kernel_size - r) for g in range(kernel_size * kernel_size)]
    if connectivity == 4:
        grid = [(dy, dx) for dy, dx in grid if dy == 0 or dx == 0]
    return grid


def grouped_shifts(channels: int, kernel_size: int = 3, connectivity: int = 8) -> Tensor:
    """(C, 2) int64 shifts assigning the channels evenly to the displacements of a K x K kernel (Eq. 2).

    Channel c belongs to group ``g = c // n`` with ``n = channels // G`` channels per group and G the
    number of displacements (K^2 for connectivity 8, 2K - 1 for 4); group g takes the g-th displacement
    of :func:`displacements`, so for connectivity 8: dy = g // K - K // 2, dx = g % K - K // 2.
    The ``channels - n * G`` channels that do not divide evenly stay unshifted (as do all channels when
    ``channels < G``).
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels should be a positive integer instead of {channels!r}")
    grid = displacements(kernel_size, connectivity)
    per_group = channels // len(grid)
    shifts = torch.zeros(channels, 2, dtype=torch.int64)
    if per_group:
        shifts[: per_group * len(grid)] = torch.tensor(grid, dtype=torch.int64).repeat_interleave(per_group, dim=0)
    return shifts
