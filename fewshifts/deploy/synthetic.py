"""Synthetic states for checking and timing deployed models: shift patterns of a chosen sparsity, BN statistics."""

from __future__ import annotations

import torch
from torch import nn

from fewshifts.layers import ActiveShift2d, shift_layers

__all__ = ["random_shift_pattern_", "randomize_batchnorm_"]


@torch.no_grad()
def random_shift_pattern_(model: nn.Module, unshifted: float = 0.9, radius: int = 1, seed: int = 0) -> nn.Module:
    """Give every shift layer a random pattern with a fraction ``unshifted`` of (0, 0) channels (SSL's sparsity).

    The other channels get a random nonzero integer displacement in [-radius, radius]^2 (plus a little noise
    below 0.5 for learned shifts, so rounding matters); active (bilinear) layers get real values instead.
    """
    if not 0.0 <= unshifted <= 1.0:
        raise ValueError(f"unshifted should be a fraction in [0, 1] instead of {unshifted!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius should be a positive integer instead of {radius!r}")
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                         if (dy, dx) != (0, 0)], dtype=torch.float32)
    for _, layer in shift_layers(model):
        c = layer.channels
        moved = torch.randperm(c, generator=g)[: c - round(unshifted * c)]
        shifts = torch.zeros(c, 2)
        if isinstance(layer, ActiveShift2d):
            shifts[moved] = (torch.rand(len(moved), 2, generator=g) * 2 - 1) * radius
        else:
            shifts[moved] = grid[torch.randint(len(grid), (len(moved),), generator=g)]
            if layer.shifts.is_floating_point():
                shifts += (torch.rand(c, 2, generator=g) - 0.5) * 0.8
        layer.shifts.copy_(shifts.to(layer.shifts.dtype))
    return model


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (a fresh BN is the identity in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model
