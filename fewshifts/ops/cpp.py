"""Loader of the C++ CPU kernels (``csrc/shift_cpu.cpp``; ``csrc/ops_cpu.cpp`` holds the Python module and
the operators' registration), JIT-compiled once with torch.utils.cpp_extension.

The compiled module exposes the same kernel functions as :mod:`fewshifts.ops.reference` (``shift_forward``,
``shift_backward``, ``shift_inplace``, ``bilinear_forward``, ``bilinear_backward_input``,
``bilinear_backward_shifts`` and the fused ``bilinear_backward``, ``sparse_backward``, ``relu_shift_forward``,
``relu_sparse_backward``), with the same arguments
and results. Loading it also registers its CPU kernels for the ``fewshifts`` operators (:func:`register_ops`).
If it cannot be built (no compiler, no headers), :func:`load` warns once, in one
line, and returns ``None`` so that callers fall back to the reference kernels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "shift_cpu.cpp", _CSRC / "ops_cpu.cpp")  # compiled
_HEADERS = (_CSRC / "shift_cpu.h",)
_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_registration = None  # the compiled module's OpRegistration while its operator kernels are registered


def extension_name(source: bytes, flags: list[str]) -> str:
    """The compiled module's name, one per source text and compiler flags.

    torch's JIT cache rebuilds a module of an existing name only when ninja finds the source newer than the
    build; pip keeps the times stored in the package, so after an upgrade (or with two checkouts) a changed
    source could load the previous kernels. A name per content never does.
    """
    digest = hashlib.sha256(source + b"\0" + "\0".join(flags).encode()).hexdigest()[:12]
    return f"fewshifts_shift_cpu_{digest}"


def source_text() -> bytes:
    """The sources and headers the module is built from, as one text (what :func:`extension_name` hashes)."""
    return b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)


STALE_BUILD_DAYS = 30
_USED = ".fewshifts_last_used"  # touched in a build's directory each time a process loads that build


def prune_stale_builds(build_dir: Path, days: float = STALE_BUILD_DAYS) -> list[Path]:
    """Mark the build in ``build_dir`` as used now, and remove its sibling builds of these kernels (directories named
    by :func:`extension_name`) that no process has loaded, or written to, in ``days`` days. Every source change or
    upgrade makes a new build of 7-10 MB, and torch never removes one; a build removed too early is rebuilt (about a
    minute). Returns the directories removed."""
    (build_dir / _USED).touch()
    cutoff = time.time() - days * 86400
    removed = []
    for other in build_dir.parent.glob("fewshifts_shift_cpu_*"):
        if other == build_dir or not other.is_dir():
            continue
        used = other / _USED
        last = max(other.stat().st_mtime, used.stat().st_mtime if used.exists() else 0.0)
        if last < cutoff:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    return removed


def compile_flags() -> list[str]:
    # JIT-built on the machine that runs it, so tuning for the host CPU is safe (FEWSHIFTS_NATIVE=0 disables).
    # FEWSHIFTS_VECTOR_BYTES=32 keeps AVX2-width vectors on an AVX-512 CPU (default: 64 there, 32 elsewhere).
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if os.environ.get("FEWSHIFTS_NATIVE", "1") == "1" else [])
    width = os.environ.get("FEWSHIFTS_VECTOR_BYTES")
    if width is not None:
        if width not in ("32", "64"):
            raise ValueError(f"FEWSHIFTS_VECTOR_BYTES should be 32 or 64, got {width!r}")
        flags.append(f"-DFEWSHIFTS_VECTOR_BYTES={width}")
    return flags


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    flags = compile_flags()
    return cpp_extension.load(
        name=extension_name(source_text(), flags),
        sources=[str(path) for path in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=os.environ.get("FEWSHIFTS_VERBOSE_BUILD") == "1",
    )


def register_ops(module: ModuleType) -> None:
    """Register ``module``'s kernels for the ``fewshifts`` operators on CPU tensors (CPU and AutogradCPU keys),
    in place of their Python bodies: a call then runs no Python past ``torch.ops``."""
    global _registration
    from fewshifts.ops import shift

    unregister_ops()
    _registration = module.register_ops(shift.python_body)


def unregister_ops() -> None:
    """Undo :func:`register_ops`: the operators run their Python bodies again."""
    global _registration
    if _registration is not None:
        _registration.close()
        _registration = None


def load(required: bool = False) -> ModuleType | None:
    """The compiled kernels, building them on first use; ``None`` (after one warning) if that fails.

    With ``required=True`` a build failure raises ``RuntimeError`` instead.
    """
    global _module, _error
    if _module is None and _error is None:
        with _lock:
            if _module is None and _error is None:
                try:
                    module = _build()
                    register_ops(module)
                    _module = module
                    try:
                        prune_stale_builds(Path(module.__file__).parent)
                    except OSError:  # a read-only or shared cache: the kernels work all the same
                        pass
                except Exception as exc:  # any build failure means: use the fallback
                    _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    if not required:
                        warnings.warn(
                            f"fewshifts: C++ shift kernels unavailable ({_error}); using the PyTorch reference path",
                            RuntimeWarning,
                            stacklevel=3,
                        )
    if _module is None and required:
        raise RuntimeError(f"fewshifts: FEWSHIFTS_BACKEND=cpp but the C++ kernels could not be built: {_error}")
    return _module
