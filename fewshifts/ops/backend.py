"""Choice between the C++ CPU kernels and the pure-PyTorch reference kernels.

``FEWSHIFTS_BACKEND`` forces a path: ``cpp`` (error if the extension cannot be built), ``reference``
(never build it), or ``auto`` (default: C++ on CPU when it builds, else one warning and the reference).
Non-CPU tensors always take the reference path, which is device-generic.
"""

from __future__ import annotations

import os
from types import ModuleType

from torch import Tensor

from fewshifts.ops import reference

_CHOICES = ("auto", "cpp", "reference")


def requested() -> str:
    mode = os.environ.get("FEWSHIFTS_BACKEND", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"FEWSHIFTS_BACKEND should be one of {_CHOICES} instead of {mode!r}")
    return mode


def kernels_for(x: Tensor) -> ModuleType:
    """The module of kernels (same function names as :mod:`fewshifts.ops.reference`) to run ``x`` with."""
    mode = requested()
    if mode == "reference" or x.device.type != "cpu":
        return reference
    from fewshifts.ops import cpp

    kernels = cpp.load(required=mode == "cpp")
    return kernels if kernels is not None else reference


def name_for(x: Tensor) -> str:
    """'cpp' or 'reference': which path :func:`kernels_for` picks for ``x``."""
    return "reference" if kernels_for(x) is reference else "cpp"
