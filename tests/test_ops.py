"""Shift operators against independent oracles (depthwise convolutions), gradcheck, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fewshifts as fs
from fewshifts.ops import displacements, round_shifts, shift2d_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = [torch.contiguous_format, torch.channels_last]


# ---------------------------------------------------------------------------------------------
# oracles: a depthwise conv2d (zero padding) whose K x K kernel holds a one-hot or 4 bilinear weights


def _oracle(x: torch.Tensor, shifts: torch.Tensor, stride: int, bilinear: bool) -> torch.Tensor:
    """out[c, i, j] = sum_uv k[c, u, v] x[c, i*s + u - R, j*s + v - R]: put the weights at (dy + R, dx + R)."""
    shifts = shifts.double().cpu()
    radius = int(shifts.abs().max().ceil().item()) + 1
    size = 2 * radius + 1
    C = x.shape[1]
    kernel = torch.zeros(C, 1, size, size, dtype=torch.float64)
    for c, (dy, dx) in enumerate(shifts.tolist()):
        if not bilinear:
            kernel[c, 0, int(dy) + radius, int(dx) + radius] = 1.0
            continue
        fy, fx = math.floor(dy), math.floor(dx)
        a, b = dy - fy, dx - fx
        for oy, ox, w in ((0, 0, (1 - a) * (1 - b)), (0, 1, (1 - a) * b), (1, 0, a * (1 - b)), (1, 1, a * b)):
            kernel[c, 0, fy + oy + radius, fx + ox + radius] += w
    out = F.conv2d(x.double().cpu(), kernel, padding=radius, stride=stride, groups=C)
    return out


def _input(shape, layout, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).to(device).contiguous(memory_format=layout)


def _int_shifts(C, low=-3, high=3, seed=1):
    return torch.randint(low, high + 1, (C, 2), generator=torch.Generator().manual_seed(seed))


def _real_shifts(C, r=2.0, seed=2, dtype=torch.float64):
    """Real shifts in (-r, r) kept away from integers (bilinear derivatives jump there)."""
    s = (torch.rand(C, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1) * r
    frac = s - s.floor()
    return torch.where((frac < 0.1) | (frac > 0.9), s + 0.37, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_shift2d_equals_onehot_depthwise_conv(device, layout, stride):
    x = _input((2, 11, 9, 8), layout, device=device)
    shifts = _int_shifts(11).to(device)
    out = fs.shift2d(x, shifts, stride)
    assert out.shape == (2, 11, (9 - 1) // stride + 1, (8 - 1) // stride + 1)
    torch.testing.assert_close(out.cpu(), _oracle(x, shifts, stride, bilinear=False), rtol=0, atol=0)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_active_shift2d_equals_bilinear_depthwise_conv(device, layout, stride):
    x = _input((2, 10, 9, 7), layout, device=device)
    shifts = _real_shifts(10, r=2.5).to(device)
    out = fs.active_shift2d(x, shifts, stride)
    torch.testing.assert_close(out.cpu(), _oracle(x, shifts, stride, bilinear=True))
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("stride", [1, 2])
def test_sparse_shift2d_forward_is_rounded_integer_shift(stride):
    x = _input((2, 9, 8, 8), torch.contiguous_format)
    shifts = _real_shifts(9, r=2.0)
    rounded = torch.round(shifts)
    torch.testing.assert_close(fs.sparse_shift2d(x, shifts, stride), fs.shift2d(x, rounded.long(), stride), rtol=0,
                               atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_sparse_shift2d_gradients_follow_ssl_eq6_eq7(layout, stride):
    """Input gradient = inverse integer shift (Eq. 7); shift gradient = bilinear derivative (Eq. 6)."""
    x = _input((2, 7, 9, 8), layout)
    shifts = _real_shifts(7, r=1.8)
    grad_out = _input((2, 7, (9 - 1) // stride + 1, (8 - 1) // stride + 1), layout, seed=5)

    xs, ss = x.clone().requires_grad_(), shifts.clone().requires_grad_()
    fs.sparse_shift2d(xs, ss, stride).backward(grad_out)

    xi = x.clone().requires_grad_()
    fs.shift2d(xi, torch.round(shifts).long(), stride).backward(grad_out)
    torch.testing.assert_close(xs.grad, xi.grad, rtol=0, atol=0)

    xa, sa = x.clone().requires_grad_(), shifts.clone().requires_grad_()
    fs.active_shift2d(xa, sa, stride).backward(grad_out)
    torch.testing.assert_close(ss.grad, sa.grad)
    assert ss.grad.abs().sum() > 0


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(stride):
    x = _input((2, 5, 7, 6), torch.contiguous_format).requires_grad_()
    shifts = _real_shifts(5, r=2.2).requires_grad_()
    ints = _int_shifts(5)
    assert torch.autograd.gradcheck(lambda a: fs.shift2d(a, ints, stride), (x,))
    assert torch.autograd.gradcheck(lambda a, s: fs.active_shift2d(a, s, stride), (x, shifts))
    assert torch.autograd.gradcheck(lambda a: fs.sparse_shift2d(a, shifts.detach(), stride), (x,))
    # the shift gradient of sparse_shift2d is, by design (Eq. 6), that of the bilinear relaxation
    assert torch.autograd.gradcheck(lambda a, s: fs.active_shift2d(a, s, stride), (x.detach().clone(), shifts))


def _relu_input(shape, layout, seed=0, zeros=True):
    """z for the fused ReLU: values away from the kink at 0 (|z| >= 0.1), and optionally some exact zeros."""
    z = _input(shape, layout, seed=seed)
    z = torch.where(z.abs() < 0.1, z.sign() * 0.1 + (z == 0) * 0.1, z)
    if zeros:
        z[:, :, ::3, ::2] = 0
    return z


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_sparse_shift2d_equals_relu_then_sparse_shift2d(layout, stride):
    """Oracle: the unfused composition (an in-place ReLU, as in ConvBN, then sparse_shift2d)."""
    z = _relu_input((3, 7, 9, 8), layout)
    shifts = _real_shifts(7, r=1.8)
    grad_out = _input((3, 7, (9 - 1) // stride + 1, (8 - 1) // stride + 1), layout, seed=5)

    zf, sf = z.clone().requires_grad_(), shifts.clone().requires_grad_()
    out = fs.ops.relu_sparse_shift2d(zf, sf, stride)
    out.backward(grad_out)

    zc, sc = z.clone().requires_grad_(), shifts.clone().requires_grad_()
    expected = fs.sparse_shift2d(F.relu(zc * 1, inplace=True), sc, stride)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(zf.grad, zc.grad, rtol=0, atol=0)
    torch.testing.assert_close(sf.grad, sc.grad)
    assert (zf.grad[z <= 0] == 0).all() and zf.grad.abs().sum() > 0 and sf.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_sparse_shift2d_gradcheck_float64(layout, stride):
    """gradcheck for z (away from the ReLU kink); the shift gradient is by design (Eq. 6) that of the bilinear
    relaxation applied to relu(z), whose own gradcheck is in test_gradcheck_float64."""
    z = _relu_input((2, 5, 7, 6), layout, zeros=False).requires_grad_()
    shifts = _real_shifts(5, r=2.2)
    assert torch.autograd.gradcheck(lambda a: fs.ops.relu_sparse_shift2d(a, shifts, stride), (z,))
    s_fused, s_relaxed = shifts.clone().requires_grad_(), shifts.clone().requires_grad_()
    grad_out = _input((2, 5, (7 - 1) // stride + 1, (6 - 1) // stride + 1), layout, seed=3)
    fs.ops.relu_sparse_shift2d(z.detach(), s_fused, stride).backward(grad_out)
    fs.active_shift2d(torch.relu(z.detach()), s_relaxed, stride).backward(grad_out)
    torch.testing.assert_close(s_fused.grad, s_relaxed.grad)


def test_gradcheck_channels_last():
    x = _input((1, 4, 6, 5), torch.channels_last).requires_grad_()
    shifts = _real_shifts(4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, s: fs.active_shift2d(a, s), (x, shifts))
    assert torch.autograd.gradcheck(lambda a: fs.shift2d(a, _int_shifts(4)), (x,))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2), c=st.integers(1, 12), h=st.integers(1, 10), w=st.integers(1, 10),
    stride=st.sampled_from([1, 2]), channels_last=st.booleans(), seed=st.integers(0, 10_000),
    reach=st.integers(0, 12),
)
def test_property_integer_shift_matches_oracle(n, c, h, w, stride, channels_last, seed, reach):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = _input((n, c, h, w), layout, seed=seed)
    shifts = _int_shifts(c, -reach, reach, seed=seed + 1)
    torch.testing.assert_close(fs.shift2d(x, shifts, stride), _oracle(x, shifts, stride, False), rtol=0, atol=0)
    torch.testing.assert_close(fs.sparse_shift2d(x, shifts.double() + 0.2, stride),
                               _oracle(x, shifts, stride, False), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2), c=st.integers(1, 10), h=st.integers(1, 9), w=st.integers(1, 9),
    stride=st.sampled_from([1, 2]), channels_last=st.booleans(), seed=st.integers(0, 10_000),
    reach=st.floats(0.0, 6.0),
)
def test_property_bilinear_shift_matches_oracle(n, c, h, w, stride, channels_last, seed, reach):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = _input((n, c, h, w), layout, seed=seed)
    g = torch.Generator().manual_seed(seed)
    shifts = (torch.rand(c, 2, generator=g, dtype=torch.float64) * 2 - 1) * reach
    torch.testing.assert_close(fs.active_shift2d(x, shifts, stride), _oracle(x, shifts, stride, True))


def test_shift_beyond_image_gives_zero_channels():
    x = _input((1, 3, 5, 5), torch.contiguous_format)
    shifts = torch.tensor([[5, 0], [0, -7], [1000, 1000]])
    assert torch.count_nonzero(fs.shift2d(x, shifts)) == 0
    assert torch.count_nonzero(fs.active_shift2d(x, shifts.double() * 1.01)) == 0
    assert torch.count_nonzero(fs.sparse_shift2d(x, torch.tensor([[1e9, 0.0], [0.0, -1e9], [6.0, 6.0]]))) == 0


def test_direction_convention():
    """Positive dy reads from the row below: content moves up (design.md section 1)."""
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 2, 1] = 1.0
    out = fs.shift2d(x, torch.tensor([[1, 0]]))
    assert out[0, 0, 1, 1] == 1.0 and out.sum() == 1.0
    out = fs.shift2d(x, torch.tensor([[0, -1]]))
    assert out[0, 0, 2, 2] == 1.0


def test_rounding_ties_to_even():
    s = torch.tensor([[0.5, 1.5], [-0.5, 2.5], [-1.5, 0.49]])
    assert round_shifts(s).tolist() == [[0, 2], [0, 2], [-2, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_agrees_with_float32(dtype):
    x = _input((2, 8, 10, 10), torch.contiguous_format, dtype=torch.float32)
    shifts = _real_shifts(8, dtype=torch.float32)
    for op in (fs.active_shift2d, fs.sparse_shift2d):
        ref = op(x, shifts)
        out = op(x.to(dtype), shifts)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    xb = x.to(dtype).requires_grad_()
    sb = shifts.clone().requires_grad_()
    fs.active_shift2d(xb, sb).float().square().sum().backward()
    xf, sf = x.clone().requires_grad_(), shifts.clone().requires_grad_()
    fs.active_shift2d(xf, sf).square().sum().backward()
    assert sb.grad.dtype == torch.float32
    torch.testing.assert_close(sb.grad, sf.grad, rtol=5e-2, atol=5e-1)
    torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_shift_matches_shift2d_and_skips_unshifted(layout):
    x = _input((2, 10, 6, 7), layout, dtype=torch.float32)
    shifts = _int_shifts(10, -2, 2)
    shifts[::3] = 0
    expected = fs.shift2d(x, shifts)
    y = x.clone()
    assert shift2d_(y, shifts) is y
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert y.is_contiguous(memory_format=layout)
    with pytest.raises(ValueError, match="in-place shift is for inference"):
        shift2d_(x.clone().requires_grad_(), shifts)


# ---------------------------------------------------------------------------------------------
# grouped shift assignment (SSL Eq. 2)


def test_grouped_shifts_eq2():
    s = fs.grouped_shifts(18, kernel_size=3)
    groups = torch.arange(18) // 2
    assert s[:, 0].tolist() == (groups // 3 - 1).tolist()
    assert s[:, 1].tolist() == (groups % 3 - 1).tolist()
    assert s.dtype == torch.int64 and s.shape == (18, 2)


def test_grouped_shifts_remainder_unshifted_and_connectivity():
    s = fs.grouped_shifts(12, kernel_size=3, connectivity=8)  # 1 channel a group, 3 left over
    assert (s[9:] == 0).all()
    assert len({tuple(r) for r in s[:9].tolist()}) == 9
    four = fs.grouped_shifts(10, kernel_size=3, connectivity=4)
    assert {tuple(r) for r in four.tolist()} == {(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)}
    assert len(displacements(5, 8)) == 25 and len(displacements(5, 4)) == 9
    assert (fs.grouped_shifts(4, 3) == 0).all()  # fewer channels than displacements


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "x, shifts, stride, error, match",
    [
        (torch.zeros(3, 4, 4), torch.zeros(3, 2, dtype=torch.long), 1, ValueError, "4-D"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(3, 3, dtype=torch.long), 1, ValueError, r"\(C, 2\)"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(4, 2, dtype=torch.long), 1, ValueError, "4 rows but x has 3 channels"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(3, 2, dtype=torch.long), 3, ValueError, "stride should be 1 or 2"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(3, 2, dtype=torch.long), True, ValueError, "stride should be 1 or 2"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(3, 2, dtype=torch.long), 2.0, TypeError, "stride should be an integer"),
        (torch.zeros(1, 3, 4, 4), torch.full((3, 2), 0.5), 1, ValueError, "integral"),
        (torch.zeros(1, 3, 4, 4), torch.tensor([[0.0, 0], [float("nan"), 0], [0, 0]]), 1, ValueError, "finite"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 1, TypeError, "floating"),
        ([[1.0]], torch.zeros(3, 2, dtype=torch.long), 1, TypeError, "torch.Tensor"),
    ],
)
def test_shift2d_bad_input(x, shifts, stride, error, match):
    with pytest.raises(error, match=match):
        fs.shift2d(x, shifts, stride)


@pytest.mark.parametrize("op", [fs.active_shift2d, fs.sparse_shift2d])
def test_real_shift_ops_bad_input(op):
    x = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="finite"):
        op(x, torch.tensor([[0.0, float("inf")], [0.0, 0.0]]))
    with pytest.raises(TypeError, match="floating point"):
        op(x, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="stride"):
        op(x, torch.zeros(2, 2), stride=0)
    with pytest.raises(ValueError, match="channels"):
        op(x, torch.zeros(3, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=8, kernel_size=4), "odd"),
    (dict(channels=8, kernel_size=3, connectivity=6), "connectivity should be 4 or 8"),
    (dict(channels=0), "channels should be a positive integer"),
])
def test_grouped_shifts_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.grouped_shifts(**kwargs)


# ---------------------------------------------------------------------------------------------
# torch.library integration: opcheck, compile, export


def test_opcheck():
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    real = _real_shifts(4).requires_grad_()
    ints = _int_shifts(4)
    for stride in (1, 2):
        torch.library.opcheck(torch.ops.fewshifts.shift2d.default, (x, ints, stride))
        torch.library.opcheck(torch.ops.fewshifts.active_shift2d.default, (x, real, stride))
        torch.library.opcheck(torch.ops.fewshifts.sparse_shift2d.default, (x, real, stride))
        torch.library.opcheck(torch.ops.fewshifts.relu_sparse_shift2d.default, (x, real, stride))
    x_nhwc = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fewshifts.shift2d.default, (x_nhwc, ints, 1))
    torch.library.opcheck(torch.ops.fewshifts.relu_sparse_shift2d.default, (x_nhwc.requires_grad_(), real, 1))
    torch.library.opcheck(torch.ops.fewshifts.shift2d_.default, (x.detach().clone(), ints))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_opcheck_16_bit(dtype, layout):
    """Fake kernels, autograd and the kernels agree on dtype and memory format for the 16-bit types too."""
    x = _input((2, 4, 6, 5), layout, dtype=torch.float32).to(dtype).requires_grad_()
    real = _real_shifts(4).float().requires_grad_()
    for stride in (1, 2):
        torch.library.opcheck(torch.ops.fewshifts.shift2d.default, (x, _int_shifts(4), stride))
        for op in ("active_shift2d", "sparse_shift2d", "relu_sparse_shift2d"):
            torch.library.opcheck(getattr(torch.ops.fewshifts, op).default, (x, real, stride))


class _AllShifts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 6, 1)
        self.grouped = fs.layers.GroupedShift2d(6)
        self.active = fs.layers.ActiveShift2d(6)
        self.sparse = fs.layers.SparseShift2d(6, stride=2)

    def forward(self, x):
        return self.sparse(self.active(self.grouped(self.conv(x))))


@pytest.mark.slow
def test_torch_compile_fullgraph_and_export():
    torch.manual_seed(0)
    model = _AllShifts()
    x = torch.randn(2, 6, 8, 8)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    compiled(x).sum().backward()
    assert model.active.shifts.grad is not None and model.sparse.shifts.grad is not None

    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"fewshifts.shift2d.default", "fewshifts.active_shift2d.default",
            "fewshifts.sparse_shift2d.default"} <= targets
    torch.testing.assert_close(exported.module()(x), expected)
