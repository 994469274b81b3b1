"""The three shift operations of the papers, as differentiable PyTorch custom operators.

Conventions (design.md section 1): ``x`` is (N, C, H, W), any memory format (the output keeps it);
``shifts`` is (C, 2) holding (dy, dx) per channel: ``shifts[:, 0]`` moves along rows, ``shifts[:, 1]``
along columns, and a positive dy reads from the row below (content moves up). Outside the image the
input is zero. ``stride`` (1 or 2) samples the output on the strided grid: output pixel (i, j) reads
input position (i * stride + dy, j * stride + dx), as in AS-ResNet's stride-2 shift layers.

Real shifts are rounded to the nearest integer with ties to even (``torch.round``: 0.5 -> 0,
1.5 -> 2, -0.5 -> 0).

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation and a registered autograd
formula, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque node per shift.
Shape and type checks run in the Python wrappers (static under tracing); value checks (finite,
integral) run inside the ops on real data. Once the C++ kernels are loaded, the functional ops also have
C++ CPU and AutogradCPU kernels (``register_ops`` in csrc/ops_cpu.cpp: the same checks, clamping and
formulas), which the dispatcher prefers for CPU tensors, so a CPU call runs no Python past ``torch.ops``;
they call back into the Python bodies here (:func:`python_body`) for ``FEWSHIFTS_BACKEND`` values other
than auto and cpp, and to raise the error for invalid shifts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

from fewshifts.ops import reference
from fewshifts.ops.backend import kernels_for

__all__ = ["shift2d", "active_shift2d", "sparse_shift2d", "relu_sparse_shift2d", "round_shifts"]


# ----------------------------------------------------------------------------------------------
# operator definition

_BODIES: dict[str, Callable] = {}


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    """``torch.library.custom_op("fewshifts::<name>")``, the Python body also kept for :func:`python_body`."""

    def define(body: Callable):
        _BODIES[name] = body
        return torch.library.custom_op(f"fewshifts::{name}", mutates_args=mutates_args)(body)

    return define


def python_body(name: str, *args):
    """Op ``name``'s Python body. Once the C++ kernels are loaded they are registered for CPU tensors (the
    dispatcher calls them instead, see ``register_ops`` in csrc/ops_cpu.cpp); they call this for
    ``FEWSHIFTS_BACKEND`` values other than auto and cpp, and for shifts that fail a value check."""
    return _BODIES[name](*args)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_input(x: Tensor, shifts: Tensor, stride: int, name: str) -> int:
    """Raises on bad arguments; returns ``stride`` as an int (check_stride)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x should be a torch.Tensor instead of {type(x).__name__}")
    if not isinstance(shifts, Tensor):
        raise TypeError(f"{name}: shifts should be a torch.Tensor instead of {type(shifts).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x should be 4-D (N, C, H, W) instead of {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x should be a floating point tensor instead of {x.dtype}")
    if shifts.dim() != 2 or shifts.shape[1] != 2:
        raise ValueError(f"{name}: shifts should have shape (C, 2) instead of {tuple(shifts.shape)}")
    if shifts.shape[0] != x.shape[1]:
        raise ValueError(
            f"{name}: shifts has {shifts.shape[0]} rows but x has {x.shape[1]} channels; "
            "expected one (dy, dx) per channel"
        )
    if shifts.device != x.device:
        raise ValueError(f"{name}: shifts are on {shifts.device} but x is on {x.device}")
    stride = check_stride(stride, name)
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: x has an empty spatial size {tuple(x.shape[2:])}")
    return stride


def check_stride(stride: int, name: str) -> int:
    """``stride`` as an int, 1 or 2 (any integer type: a numpy or 0-d tensor one too); raises otherwise."""
    if isinstance(stride, bool):
        raise ValueError(f"{name}: stride should be 1 or 2 instead of {stride!r}")
    try:
        value = operator.index(stride)
    except TypeError:
        raise TypeError(f"{name}: stride should be an integer (1 or 2) instead of {stride!r}") from None
    if value not in (1, 2):
        raise ValueError(f"{name}: stride should be 1 or 2 instead of {stride!r}")
    return value


def _check_finite(shifts: Tensor, name: str) -> None:
    if shifts.is_floating_point() and not bool(torch.isfinite(shifts).all()):
        bad = (~torch.isfinite(shifts)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name}: shifts must be finite; non-finite values in channel(s) {bad}")


def _clamp_to_image(shifts: Tensor, height: int, width: int, stride: int) -> Tensor:
    """Shifts beyond the image give all-zero channels; clamping keeps the integers small and exact.

    One bound for both axes (one op: this runs on every call): a shift clamped to it is still beyond the image.
    """
    limit = stride * max(height, width) + 1
    return shifts.clamp(-limit, limit)


def round_shifts(shifts: Tensor) -> Tensor:
    """Nearest-integer (ties to even) int64 shifts, as used by SSL's forward pass (Eq. 5)."""
    if not shifts.is_floating_point():
        return shifts.long()
    return torch.round(shifts).long()


# ----------------------------------------------------------------------------------------------
# shift2d: integer shift


@_op("shift2d")
def _shift2d(x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    if shifts.is_floating_point():
        _check_finite(shifts, "shift2d")
        if not bool((shifts == torch.round(shifts)).all()):
            raise ValueError(
                "shift2d: float shifts must hold integral values; use sparse_shift2d (rounds) or "
                "active_shift2d (bilinear) for real-valued shifts"
            )
    s = _clamp_to_image(shifts.long(), x.shape[2], x.shape[3], stride)
    return kernels_for(x).shift_forward(x, s.cpu(), stride)


@_op("shift2d_backward")
def _shift2d_backward(grad: Tensor, shifts: Tensor, stride: int, height: int, width: int) -> Tensor:
    s = _clamp_to_image(round_shifts(shifts), height, width, stride)
    return kernels_for(grad).shift_backward(grad.contiguous(memory_format=_format_of(grad)), s.cpu(), stride,
                                            height, width)


def _format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if reference._is_channels_last(x) else torch.contiguous_format


def _empty_output(x: Tensor, height: int, width: int) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], height, width)).contiguous(memory_format=_format_of(x))


def _strided_output_fake(x, shifts, stride):
    return _empty_output(x, reference.output_size(x.shape[2], stride), reference.output_size(x.shape[3], stride))


_shift2d.register_fake(_strided_output_fake)


@_shift2d_backward.register_fake
def _(grad, shifts, stride, height, width):
    return _empty_output(grad, height, width)


def _shift2d_setup(ctx, inputs, output):
    x, shifts, stride = inputs
    ctx.save_for_backward(shifts)
    ctx.stride, ctx.size = stride, x.shape[2:]


def _shift2d_grad(ctx, grad):
    (shifts,) = ctx.saved_tensors
    return torch.ops.fewshifts.shift2d_backward(grad, shifts, ctx.stride, *ctx.size), None, None


_shift2d.register_autograd(_shift2d_grad, setup_context=_shift2d_setup)


def shift2d(x: Tensor, shifts: Tensor, stride: int = 1) -> Tensor:
    """Integer per-channel shift (SSL Eq. 1): ``out[n,c,i,j] = x[n,c,i*s+dy_c, j*s+dx_c]``, zero outside.

    ``shifts`` is an integer (C, 2) tensor, or a float one holding integral values. Differentiable
    with respect to ``x`` (the gradient is the inverse shift, SSL Eq. 7).
    """
    stride = _check_input(x, shifts, stride, "shift2d")
    if not shifts.is_floating_point() and shifts.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                                  torch.uint8):
        raise TypeError(f"shift2d: shifts should be an integer or float tensor instead of {shifts.dtype}")
    return torch.ops.fewshifts.shift2d(x, shifts, stride)


@_op("shift2d_", mutates_args=("x",))
def _shift2d_inplace(x: Tensor, shifts: Tensor) -> None:
    s = _clamp_to_image(shifts.long(), x.shape[2], x.shape[3], 1)
    kernels_for(x).shift_inplace(x, s.cpu())


@_shift2d_inplace.register_fake
def _(x, shifts):
    return None


def shift2d_(x: Tensor, shifts: Tensor) -> Tensor:
    """In-place integer shift (stride 1) for inference: channels shifted by (0, 0) are not touched at all,
    so a sparse shift costs in proportion to its shifted channels (SSL section 4.3). Returns ``x``.

    Not differentiable: raises if autograd would need ``x``.
    """
    _check_input(x, shifts, 1, "shift2d_")
    if shifts.is_floating_point():
        raise TypeError("shift2d_: shifts should be an integer tensor (round learned shifts first)")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("shift2d_: in-place shift is for inference; x requires grad (use shift2d, or torch.no_grad())")
    torch.ops.fewshifts.shift2d_(x, shifts)
    return x


# ----------------------------------------------------------------------------------------------
# active_shift2d: bilinear shift (ASL)


def _register_real_shift_op(op, backward) -> None:
    """Fake kernels and autograd of a real-shift op ``op(x, shifts, stride)`` whose backward op
    ``backward(grad, x, shifts, stride)`` returns ``(grad_x, grad_shifts)``."""

    def backward_fake(grad, x, shifts, stride):
        return _empty_output(x, x.shape[2], x.shape[3]), torch.empty_like(shifts)

    def setup_context(ctx, inputs, output):
        x, shifts, stride = inputs
        ctx.save_for_backward(x, shifts)
        ctx.stride = stride

    def gradient(ctx, grad):
        x, shifts = ctx.saved_tensors
        grad_x, grad_shifts = backward(grad, x, shifts, ctx.stride)
        return grad_x, grad_shifts, None

    op.register_fake(_strided_output_fake)
    backward.register_fake(backward_fake)
    op.register_autograd(gradient, setup_context=setup_context)


def _check_real_shifts(shifts: Tensor, name: str) -> None:
    if not shifts.is_floating_point():
        raise TypeError(f"{name}: shifts should be a floating point tensor instead of {shifts.dtype}")


@_op("active_shift2d")
def _active_shift2d(x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    _check_finite(shifts, "active_shift2d")
    s = _clamp_to_image(shifts, x.shape[2], x.shape[3], stride)
    return kernels_for(x).bilinear_forward(x, s.detach().cpu(), stride)


@_op("active_shift2d_backward")
def _active_shift2d_backward(grad: Tensor, x: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    kernels = kernels_for(x)
    s = _clamp_to_image(shifts, x.shape[2], x.shape[3], stride).detach().cpu()
    grad = grad.contiguous(memory_format=_format_of(x))
    grad_x, grad_shifts = kernels.bilinear_backward(grad, x, s, stride)
    return grad_x, grad_shifts.to(shifts.device)


_register_real_shift_op(_active_shift2d, _active_shift2d_backward)


def active_shift2d(x: Tensor, shifts: Tensor, stride: int = 1) -> Tensor:
    """Real-valued per-channel shift by bilinear interpolation (ASL Eq. 8-10; SSL Eq. 3), zero outside.

    Differentiable with respect to ``x`` and ``shifts``.
    """
    stride = _check_input(x, shifts, stride, "active_shift2d")
    _check_real_shifts(shifts, "active_shift2d")
    return torch.ops.fewshifts.active_shift2d(x, shifts, stride)


# ----------------------------------------------------------------------------------------------
# sparse_shift2d: quantization-aware shift (SSL)


def _sparse_forward(kernel: str, x: Tensor, shifts: Tensor, stride: int, name: str) -> Tensor:
    """SSL Eq. 5 by the kernel ``kernel`` (``shift_forward``, or ``relu_shift_forward`` for the fused ReLU)."""
    _check_finite(shifts, name)
    s = _clamp_to_image(round_shifts(shifts), x.shape[2], x.shape[3], stride)
    return getattr(kernels_for(x), kernel)(x, s.cpu(), stride)


def _sparse_backward(kernel: str, grad: Tensor, x: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """SSL Eq. 6-7 by the kernel ``kernel`` (``sparse_backward``, or ``relu_sparse_backward``)."""
    kernels = kernels_for(x)
    grad = grad.contiguous(memory_format=_format_of(x))
    rounded = _clamp_to_image(round_shifts(shifts), x.shape[2], x.shape[3], stride).cpu()
    real = _clamp_to_image(shifts, x.shape[2], x.shape[3], stride).detach().cpu()
    grad_x, grad_shifts = getattr(kernels, kernel)(grad, x, rounded, real, stride)
    return grad_x, grad_shifts.to(shifts.device)


@_op("sparse_shift2d")
def _sparse_shift2d(x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    return _sparse_forward("shift_forward", x, shifts, stride, "sparse_shift2d")


@_op("sparse_shift2d_backward")
def _sparse_shift2d_backward(grad: Tensor, x: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    return _sparse_backward("sparse_backward", grad, x, shifts, stride)


_register_real_shift_op(_sparse_shift2d, _sparse_shift2d_backward)


@_op("relu_sparse_shift2d")
def _relu_sparse_shift2d(z: Tensor, shifts: Tensor, stride: int) -> Tensor:
    return _sparse_forward("relu_shift_forward", z, shifts, stride, "relu_sparse_shift2d")


@_op("relu_sparse_shift2d_backward")
def _relu_sparse_shift2d_backward(grad: Tensor, z: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    return _sparse_backward("relu_sparse_backward", grad, z, shifts, stride)


_register_real_shift_op(_relu_sparse_shift2d, _relu_sparse_shift2d_backward)  # saves z, not relu(z)


def sparse_shift2d(x: Tensor, shifts: Tensor, stride: int = 1) -> Tensor:
    """Quantization-aware shift (SSL Eq. 5-7).

    Forward: ``shift2d(x, round(shifts))`` (Eq. 5). Gradient for ``x``: the inverse integer shift
    (Eq. 7). Gradient for ``shifts``: the bilinear derivative at the real-valued shift (Eq. 6), the
    same as :func:`active_shift2d`'s shift gradient for the same upstream gradient.
    """
    stride = _check_input(x, shifts, stride, "sparse_shift2d")
    _check_real_shifts(shifts, "sparse_shift2d")
    return torch.ops.fewshifts.sparse_shift2d(x, shifts, stride)


def relu_sparse_shift2d(z: Tensor, shifts: Tensor, stride: int = 1) -> Tensor:
    """``sparse_shift2d(relu(z), shifts, stride)`` as one operator (SSL Eq. 5-7 on ``x = relu(z)``).

    Same values and gradients as the composition; what changes is memory traffic. Forward (Eq. 5): the
    rounded shift of ``relu(z)`` in one pass over ``z``, the cost of an in-place ReLU, so a block's
    conv - BN - ReLU - SSL pays no extra pass for its shift. Backward, in one pass over the upstream gradient
    and ``z`` (the tensor saved, instead of ``relu(z)``): the gradient for ``z`` is ``1[z > 0]`` times the
    inverse integer shift (Eq. 7), and the gradient for ``shifts`` is the bilinear derivative at the real-valued
    shift (Eq. 6) of ``relu(z)``, evaluated on the fly. The C++ kernels fuse NCHW tensors; channels_last
    tensors (and the reference path: other devices, ``FEWSHIFTS_BACKEND=reference``) run the composition.
    """
    stride = _check_input(z, shifts, stride, "relu_sparse_shift2d")
    _check_real_shifts(shifts, "relu_sparse_shift2d")
    return torch.ops.fewshifts.relu_sparse_shift2d(z, shifts, stride)
