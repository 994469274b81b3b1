"""fewshifts: shift-based convolutional networks (ShiftNet, Active Shift Layer, Sparse Shift Layer / FE-Net).

The public API is listed in design.md section 1.
"""

from fewshifts import layers, ops
from fewshifts.ops import active_shift2d, grouped_shifts, shift2d, sparse_shift2d

__version__ = "0.1.0"

__all__ = ["shift2d", "active_shift2d", "sparse_shift2d", "grouped_shifts", "layers", "ops"]
