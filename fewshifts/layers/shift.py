"""Shift layers: ShiftNet's grouped shift, ASL's active shift and SSL's sparse shift."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshifts.ops import active_shift2d, grouped_shifts, round_shifts, shift2d, sparse_shift2d
from fewshifts.ops.shift import check_stride

__all__ = ["ShiftLayer", "GroupedShift2d", "ActiveShift2d", "SparseShift2d"]


class ShiftLayer(nn.Module):
    """What every shift layer shares: ``.shifts`` (C, 2) as (dy, dx), a stride, and its statistics."""

    shifts: Tensor

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels should be a positive integer instead of {channels!r}")
        self.channels = channels
        self.stride = check_stride(stride, type(self).__name__)

    @property
    def learnable(self) -> bool:
        return isinstance(self.shifts, nn.Parameter)

    @torch.no_grad()
    def integer_shifts(self) -> Tensor:
        """(C, 2) int64: the displacements used at inference (nearest integer, ties to even)."""
        return round_shifts(self.shifts.detach()).cpu()

    @torch.no_grad()
    def unshifted(self) -> int:
        """Number of channels whose integer shift is (0, 0)."""
        return int((self.integer_shifts() == 0).all(dim=1).sum())

    def sparsity(self) -> float:
        """Fraction of channels whose integer shift is (0, 0) (SSL's "shift sparsity")."""
        return self.unshifted() / self.channels

    def penalty(self, p: int = 2) -> Tensor:
        """SSL Eq. 4 for this layer: ``||dy||_p^p + ||dx||_p^p`` (p = 1 or 2), differentiable in the shifts."""
        if p not in (1, 2):
            raise ValueError(f"penalty p should be 1 or 2 instead of {p!r}")
        s = self.shifts if self.shifts.is_floating_point() else self.shifts.float()
        return s.abs().sum() if p == 1 else s.pow(2).sum()

    def freeze(self, frozen: bool = True) -> ShiftLayer:
        """Stop (or resume) learning the shifts; the forward pass is unchanged."""
        if self.learnable:
            self.shifts.requires_grad_(not frozen)
        return self

    @property
    def frozen(self) -> bool:
        return not (self.learnable and self.shifts.requires_grad)

    def extra_repr(self) -> str:
        text = f"{self.channels}"
        if self.stride != 1:
            text += f", stride={self.stride}"
        return text


class GroupedShift2d(ShiftLayer):
    """ShiftNet's fixed grouped shift (SSL Eq. 2): channels split evenly over a K x K (or 4-connected) kernel."""

    def __init__(self, channels: int, kernel_size: int = 3, connectivity: int = 8, stride: int = 1) -> None:
        super().__init__(channels, stride)
        self.kernel_size = kernel_size
        self.connectivity = connectivity
        self.register_buffer("shifts", grouped_shifts(channels, kernel_size, connectivity))

    def forward(self, x: Tensor) -> Tensor:
        return shift2d(x, self.shifts, self.stride)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Refuses non-integral shifts (a sparse / active layer's), which the integer buffer would truncate."""
        shifts = state_dict.get(prefix + "shifts")
        if isinstance(shifts, Tensor) and shifts.is_floating_point() and not torch.equal(shifts, shifts.round()):
            error_msgs.append(f"{prefix}shifts: GroupedShift2d holds integer shifts, got non-integral values "
                              "(round them first)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, connectivity={self.connectivity}"


class _LearnedShift2d(ShiftLayer):
    def __init__(self, channels: int, init_range: float = 1.0, stride: int = 1) -> None:
        super().__init__(channels, stride)
        if not (isinstance(init_range, (int, float)) and 0 <= init_range < float("inf")):
            raise ValueError(f"init_range should be a finite non-negative number instead of {init_range!r}")
        self.init_range = float(init_range)
        self.shifts = nn.Parameter(torch.empty(channels, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Shifts drawn from U[-r, r] (ASL section 4: r = 1)."""
        with torch.no_grad():
            self.shifts.uniform_(-self.init_range, self.init_range)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, init_range={self.init_range}"
        return text + (", frozen" if self.frozen else "")


class ActiveShift2d(_LearnedShift2d):
    """Active Shift Layer (ASL Eq. 7-11): learned real-valued shifts applied by bilinear interpolation."""

    def forward(self, x: Tensor) -> Tensor:
        return active_shift2d(x, self.shifts, self.stride)


class SparseShift2d(_LearnedShift2d):
    """Sparse Shift Layer (SSL Eq. 5-7): learned shifts, rounded to integers in the forward pass.

    Trained with the shift penalty :meth:`penalty` (Eq. 4), most channels end at (0, 0) and cost nothing
    at inference. In training, the blocks that put it after a conv - BN - ReLU (ShiftResNet's CSC block, FE-Net's
    IB-SSL units) run that ReLU inside the shift (:func:`~fewshifts.ops.relu_sparse_shift2d`, via
    :func:`fewshifts.models.common.expand_spatial`): same values and gradients, fewer passes over memory.
    """

    def forward(self, x: Tensor) -> Tensor:
        return sparse_shift2d(x, self.shifts, self.stride)
