"""Shift layers (design.md section 1) and the helpers to learn them."""

from fewshifts.layers.learning import (
    freeze_shifts,
    normalize_shift_grads_,
    param_groups,
    shift_layers,
    shift_penalty,
    shift_sparsity,
)
from fewshifts.layers.shift import ActiveShift2d, GroupedShift2d, ShiftLayer, SparseShift2d

__all__ = [
    "ShiftLayer",
    "GroupedShift2d",
    "ActiveShift2d",
    "SparseShift2d",
    "shift_layers",
    "shift_penalty",
    "shift_sparsity",
    "freeze_shifts",
    "normalize_shift_grads_",
    "param_groups",
]
