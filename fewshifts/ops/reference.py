"""Pure-PyTorch shift kernels: the always-available path, and the reference the C++ path is tested against.

Every function here works on any device and takes already-validated arguments: ``x`` is (N, C, H, W),
integer shifts are an int64 (C, 2) tensor of (dy, dx) and real shifts a floating (C, 2) tensor.
The output keeps the input's memory format.

An integer shift is done as one zero-filled output plus one strided slice copy per distinct
displacement (channels sharing a displacement are copied together), never through autograd:
the backward of a shift is the adjoint shift below (SSL Eq. 7), written by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor


def output_size(size: int, stride: int) -> int:
    """Length of the strided output grid (positions 0, s, 2s, ... < size)."""
    return (size - 1) // stride + 1


def _valid_range(shift: int, size_in: int, size_out: int, stride: int) -> tuple[int, int]:
    """Output indices [lo, hi) whose source ``i * stride + shift`` lies inside [0, size_in)."""
    lo = max(0, -(shift // stride))  # ceil(-shift / stride)
    hi = min(size_out, (size_in - 1 - shift) // stride + 1) if size_in - 1 - shift >= 0 else 0
    return lo, max(lo, hi)


def _channel_groups(shifts: Tensor) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for c, (dy, dx) in enumerate(shifts.tolist()):
        groups.setdefault((int(dy), int(dx)), []).append(c)
    return groups


def _channel_index(channels: list[int], device: torch.device) -> slice | Tensor:
    """A slice when the channels are contiguous (a view, no gather), else an index tensor."""
    if channels[-1] - channels[0] + 1 == len(channels):
        return slice(channels[0], channels[-1] + 1)
    return torch.tensor(channels, device=device)


def _move(src: Tensor, dst: Tensor, shifts: Tensor, stride: int, adjoint: bool) -> Tensor:
    """Copy the shifted pixels between ``src`` and the zero-filled ``dst``.

    Forward (adjoint=False): dst[n, c, i, j] = src[n, c, i*s + dy_c, j*s + dx_c]   (src is the input).
    Adjoint (adjoint=True):  dst[n, c, i*s + dy_c, j*s + dx_c] = src[n, c, i, j]   (src is grad_out).
    """
    full, small = (src, dst) if not adjoint else (dst, src)
    H, W = full.shape[-2:]
    Ho, Wo = small.shape[-2:]
    for (dy, dx), channels in _channel_groups(shifts).items():
        i0, i1 = _valid_range(dy, H, Ho, stride)
        j0, j1 = _valid_range(dx, W, Wo, stride)
        if i0 == i1 or j0 == j1:
            continue  # shifted entirely outside the image: the channel stays zero
        rows = slice(i0 * stride + dy, (i1 - 1) * stride + dy + 1, stride)
        cols = slice(j0 * stride + dx, (j1 - 1) * stride + dx + 1, stride)
        c = _channel_index(channels, src.device)
        if adjoint:
            dst[:, c, rows, cols] = src[:, c, i0:i1, j0:j1]
        else:
            dst[:, c, i0:i1, j0:j1] = src[:, c, rows, cols]
    return dst


def _zeros(like: Tensor, h: int, w: int) -> Tensor:
    fmt = torch.channels_last if _is_channels_last(like) else torch.contiguous_format
    return torch.zeros((like.shape[0], like.shape[1], h, w), dtype=like.dtype, device=like.device).contiguous(
        memory_format=fmt
    )


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def shift_forward(x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    """Integer shift (SSL Eq. 1/5): out[n,c,i,j] = x[n,c,i*s+dy_c,j*s+dx_c], zero outside."""
    H, W = x.shape[-2:]
    out = _zeros(x, output_size(H, stride), output_size(W, stride))
    return _move(x, out, shifts, stride, adjoint=False)


def shift_backward(grad_out: Tensor, shifts: Tensor, stride: int, height: int, width: int) -> Tensor:
    """Adjoint of :func:`shift_forward` (SSL Eq. 7): the inverse memory movement of grad_out."""
    grad_x = _zeros(grad_out, height, width)
    return _move(grad_out, grad_x, shifts, stride, adjoint=True)


def _bilinear_parts(shifts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """floor(shift) as int64 and the fractional parts (a, b) of (dy, dx), ASL Eq. 9; in float32 at least (16-bit
    shifts would round the weights to 16 bits, where the C++ kernels compute them in float64)."""
    shifts = shifts.to(torch.promote_types(shifts.dtype, torch.float32))
    floor = torch.floor(shifts)
    frac = shifts - floor
    return floor.long(), frac[:, 0], frac[:, 1]


_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # Z1, Z2, Z3, Z4 of ASL Eq. 10


def _corner_weights(a: Tensor, b: Tensor) -> list[Tensor]:
    return [(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b]


def _per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(1, -1, 1, 1)


def bilinear_forward(x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    """Bilinear shift (ASL Eq. 8-10): sum of the four integer shifts around the real position."""
    floor, a, b = _bilinear_parts(shifts)
    out = None
    for (oy, ox), w in zip(_CORNERS, _corner_weights(a, b)):
        term = shift_forward(x, floor + floor.new_tensor([oy, ox]), stride) * _per_channel(w, x)
        out = term if out is None else out.add_(term)
    return out


def bilinear_backward_input(grad_out: Tensor, shifts: Tensor, stride: int, height: int, width: int) -> Tensor:
    """Gradient of :func:`bilinear_forward` with respect to its input."""
    floor, a, b = _bilinear_parts(shifts)
    grad_x = None
    for (oy, ox), w in zip(_CORNERS, _corner_weights(a, b)):
        term = shift_backward(grad_out * _per_channel(w, grad_out), floor + floor.new_tensor([oy, ox]), stride,
                              height, width)
        grad_x = term if grad_x is None else grad_x.add_(term)
    return grad_x


def bilinear_backward_shifts(grad_out: Tensor, x: Tensor, shifts: Tensor, stride: int) -> Tensor:
    """Gradient with respect to the real-valued shifts (ASL Eq. 8 differentiated; SSL Eq. 6).

    d out / d dy = (1 - b) (Z3 - Z1) + b (Z4 - Z2),  d out / d dx = (1 - a) (Z2 - Z1) + a (Z4 - Z3),
    evaluated at the real-valued shift; returned in float64 for float64 input, float32 otherwise,
    then cast to the dtype of ``shifts``.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    floor, a, b = _bilinear_parts(shifts.to(acc))
    g = grad_out.to(acc)
    z1, z2, z3, z4 = (shift_forward(x, floor + floor.new_tensor([oy, ox]), stride).to(acc) for oy, ox in _CORNERS)
    gy = (g * (z3 - z1)).sum((0, 2, 3)) * (1 - b) + (g * (z4 - z2)).sum((0, 2, 3)) * b
    gx = (g * (z2 - z1)).sum((0, 2, 3)) * (1 - a) + (g * (z4 - z3)).sum((0, 2, 3)) * a
    return torch.stack([gy, gx], dim=1).to(shifts.dtype)


def bilinear_backward(grad_out: Tensor, x: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Both gradients of :func:`bilinear_forward`: (input, shifts). The C++ path computes them in one call."""
    H, W = x.shape[-2:]
    return (bilinear_backward_input(grad_out, shifts, stride, H, W),
            bilinear_backward_shifts(grad_out, x, shifts, stride))


def sparse_backward(grad_out: Tensor, x: Tensor, rounded: Tensor, shifts: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Gradients of the quantization-aware shift (SSL Eq. 6-7): the inverse integer shift by ``rounded`` for the
    input, the bilinear shift-gradient at the real-valued ``shifts`` for the shifts."""
    H, W = x.shape[-2:]
    return shift_backward(grad_out, rounded, stride, H, W), bilinear_backward_shifts(grad_out, x, shifts, stride)


def relu_shift_forward(z: Tensor, shifts: Tensor, stride: int) -> Tensor:
    """Integer shift of ``relu(z)`` (SSL Eq. 5 applied after a ReLU); the C++ path does it in one pass."""
    return shift_forward(torch.relu(z), shifts, stride)


def relu_sparse_backward(grad_out: Tensor, z: Tensor, rounded: Tensor, shifts: Tensor,
                         stride: int) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`relu_shift_forward` with the quantization-aware rule: :func:`sparse_backward` at
    ``x = relu(z)``, then the ReLU's gradient (zero where ``z <= 0``, as autograd's) on the input gradient."""
    grad_x, grad_shifts = sparse_backward(grad_out, torch.relu(z), rounded, shifts, stride)
    return torch.ops.aten.threshold_backward(grad_x, z, 0), grad_shifts


def shift_inplace(x: Tensor, shifts: Tensor) -> None:
    """Integer shift (stride 1) of ``x`` in place, touching only channels whose shift is not (0, 0).

    Inference only: the moved channels go through one temporary (PyTorch refuses overlapping copies).
    """
    moved = (shifts != 0).any(dim=1).nonzero().flatten().tolist()
    if not moved:
        return
    c = _channel_index(moved, x.device)
    x[:, c] = shift_forward(x[:, c], shifts[moved], 1)
