"""Functional shift operators (design.md section 1)."""

from fewshifts.ops.grouped import displacements, grouped_shifts
from fewshifts.ops.shift import active_shift2d, relu_sparse_shift2d, round_shifts, shift2d, shift2d_, sparse_shift2d

__all__ = ["shift2d", "shift2d_", "active_shift2d", "sparse_shift2d", "relu_sparse_shift2d", "grouped_shifts",
           "displacements", "round_shifts"]
