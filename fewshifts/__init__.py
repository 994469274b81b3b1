"""fewshifts: shift-based convolutional networks (ShiftNet, Active Shift Layer, Sparse Shift Layer / FE-Net).

The public API is listed in design.md section 1.
"""

from fewshifts import layers, models, ops
from fewshifts.deploy import deploy  # the function: ``fewshifts.deploy(model)`` (design.md section 1)
from fewshifts.models import convert, create_model, list_models, load_model, register_model, save_model
from fewshifts.ops import active_shift2d, grouped_shifts, shift2d, sparse_shift2d

__version__ = "0.1.0"

__all__ = [
    "active_shift2d",
    "convert",
    "create_model",
    "deploy",
    "grouped_shifts",
    "layers",
    "list_models",
    "load_model",
    "models",
    "ops",
    "register_model",
    "save_model",
    "shift2d",
    "sparse_shift2d",
]
