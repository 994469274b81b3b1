"""The C++ CPU kernels against the reference kernels, and the choice between them (FEWSHIFTS_BACKEND, fallback).

Integer kernels only move data, so they must agree exactly; bilinear kernels agree within rounding. The semantic
oracles (depthwise conv, gradcheck, opcheck) live in test_ops.py and run on whichever path is active.
"""

from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

import fewshifts as fs
from fewshifts import ops
from fewshifts.ops import backend, cpp, reference

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last", "strided")


@pytest.fixture(scope="module")
def kernels():
    try:
        return cpp.load(required=True)
    except RuntimeError as exc:
        pytest.skip(f"C++ kernels cannot be built here: {exc}")


@pytest.fixture(params=["rows", "flat"])
def plane_form(request, monkeypatch):
    """The NCHW stride-1 kernels in their row-based or their flat form (FEWSHIFTS_FLAT_MAX: 0, or every plane),
    whichever the plane size would choose by default."""
    monkeypatch.setenv("FEWSHIFTS_FLAT_MAX", "0" if request.param == "rows" else str(1 << 40))
    return request.param


@pytest.fixture(params=["regular", "stream"])
def stores(request, monkeypatch):
    """Kernels with ordinary or non-temporal stores (FEWSHIFTS_STREAM: 0 or 1; by default they stream only when the
    output exceeds the last-level cache, and only where NCHW planes or channels_last pixels are whole vectors: 32
    bytes, or 64 where the kernels were built for AVX-512)."""
    monkeypatch.setenv("FEWSHIFTS_STREAM", "0" if request.param == "regular" else "1")
    return request.param


@pytest.fixture(params=["one_row", "two_rows"])
def row_pairs(request, monkeypatch):
    """The channels_last two-pixel kernels (separable forward and input gradient, fused backward) over one output row
    or two at a time (FEWSHIFTS_ROW_PAIRS: 0 or 1; by default two where the input is not prefetched: within the
    threads' L2 caches)."""
    monkeypatch.setenv("FEWSHIFTS_ROW_PAIRS", "0" if request.param == "one_row" else "1")
    return request.param


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither format: every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def _cases(count: int, seed: int) -> list[tuple]:
    """Random (shape, stride, layout, dtype, seed); small shapes incl. 1-pixel sides, and two shapes big enough to
    be split over threads."""
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        shape = (rng.randint(1, 3), rng.randint(1, 11), rng.randint(1, 9), rng.randint(1, 9))
        cases.append((shape, rng.choice((1, 2)), LAYOUTS[k % 3], DTYPES[(k // 3) % 3], rng.randrange(1 << 30)))
    for layout in ("nchw", "channels_last"):
        cases.append(((3, 24, 31, 29), 1, layout, torch.float32, 7))
        cases.append(((2, 20, 30, 33), 2, layout, torch.float32, 8))
    return cases


CASES = _cases(36, seed=0)


def _case_id(case) -> str:
    shape, stride, layout, dtype, _ = case
    return f"{'x'.join(map(str, shape))}-s{stride}-{layout}-{str(dtype).split('.')[-1]}"


def _inputs(case):
    shape, stride, layout, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    x = _layout(torch.randn(shape, generator=g).to(dtype), layout)
    # integer shifts: small, zero, negative, and beyond the image on either side
    shifts = torch.randint(-2, 3, (C, 2), generator=g)
    shifts[0] = torch.tensor([H + 3, -(W + 2)])
    if C > 1:
        shifts[1] = 0
    if C > 2:
        shifts[2] = torch.tensor([-(2 * H + 1), W])
    real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    real = (torch.rand(C, 2, generator=g, dtype=torch.float64) * 5 - 2.5).to(real_dtype)
    if C > 1:
        real[1] = torch.tensor([-(H + 0.25), W + 0.5])
    if C > 2:
        real[2] = torch.tensor([1.0, -2.0])  # integral real shift: fractional parts 0
    Ho, Wo = reference.output_size(H, stride), reference.output_size(W, stride)
    grad = _layout(torch.randn(N, C, Ho, Wo, generator=g).to(dtype), layout)
    return x, shifts, real, grad


def _assert_same_format(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert reference._is_channels_last(a) == reference._is_channels_last(b)
    fmt = torch.channels_last if reference._is_channels_last(b) else torch.contiguous_format
    assert a.is_contiguous(memory_format=fmt)


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
            torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}[dtype]


def _assert_shift_grad_close(gs: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """Shift gradients are sums over N*Ho*Wo products: tolerance relative to the sum of their magnitudes."""
    scale = 4 * grad.double().abs().sum() * x.double().abs().max() / x.shape[1] + 1
    eps = 1e-12 if x.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gs.double(), ref.double(), rtol=0, atol=float(eps * scale))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_integer_kernels_match_reference_exactly(kernels, plane_form, case):
    x, shifts, _, grad = _inputs(case)
    stride = case[1]
    H, W = x.shape[2:]
    for out, ref in [
        (kernels.shift_forward(x, shifts, stride), reference.shift_forward(x, shifts, stride)),
        (kernels.shift_backward(grad, shifts, stride, H, W), reference.shift_backward(grad, shifts, stride, H, W)),
    ]:
        _assert_same_format(out, ref)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bilinear_kernels_match_reference(kernels, plane_form, case):
    x, _, real, grad = _inputs(case)
    stride, dtype = case[1], case[3]
    H, W = x.shape[2:]
    out, ref = kernels.bilinear_forward(x, real, stride), reference.bilinear_forward(x, real, stride)
    _assert_same_format(out, ref)
    torch.testing.assert_close(out, ref, **_tol(dtype))

    gx, ref_gx = kernels.bilinear_backward_input(grad, real, stride, H, W), reference.bilinear_backward_input(
        grad, real, stride, H, W)
    _assert_same_format(gx, ref_gx)
    torch.testing.assert_close(gx, ref_gx, **_tol(dtype))

    gs, ref_gs = kernels.bilinear_backward_shifts(grad, x, real, stride), reference.bilinear_backward_shifts(
        grad, x, real, stride)
    assert gs.dtype == ref_gs.dtype == real.dtype and gs.shape == real.shape
    _assert_shift_grad_close(gs, ref_gs, grad, x)

    fused_gx, fused_gs = kernels.bilinear_backward(grad, x, real, stride)
    assert torch.equal(fused_gx, gx) and torch.equal(fused_gs, gs)


def test_flat_kernels_with_shifts_spread_over_many_displacements(kernels):
    """1100 channels shifted to distinct displacements on 64x64 planes: the flat form's masks (one per displacement)
    would pass their size limit, so the kernels take the row-based form; same results as the reference."""
    g = torch.Generator().manual_seed(5)
    C, H, W = 1100, 64, 64
    grid = torch.tensor([(dy, dx) for dy in range(-20, 21) for dx in range(-20, 21)])
    shifts = grid[torch.randperm(len(grid), generator=g)[:C]]
    x = torch.randn(1, C, H, W, generator=g)
    assert torch.equal(kernels.shift_forward(x, shifts, 1), reference.shift_forward(x, shifts, 1))
    assert torch.equal(kernels.shift_backward(x, shifts, 1, H, W), reference.shift_backward(x, shifts, 1, H, W))
    z = x.clone()
    real = shifts.float() + 0.25
    gz, gs = kernels.relu_sparse_backward(x, z, shifts, real, 1)
    ref_gz, ref_gs = reference.relu_sparse_backward(x, z, shifts, real, 1)
    assert torch.equal(gz, ref_gz)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [320, 20, 96, 100])
def test_integer_kernels_long_and_short_channel_runs(kernels, stores, stride, channels):
    """channels_last copies runs of channels sharing a shift (grouped shifts, 320 channels: runs of 35) or, for
    short runs (20 channels: runs of 2), channel by channel, or for runs of about a vector (96 and 100 channels:
    runs of 10-11, a partial last vector) whole vectors selecting from two source pixels; all against the
    reference."""
    x = torch.randn(2, channels, 5, 6).contiguous(memory_format=torch.channels_last)
    shifts = fs.grouped_shifts(channels)
    out = kernels.shift_forward(x, shifts, stride)
    assert torch.equal(out, reference.shift_forward(x, shifts, stride))
    g = torch.randn_like(out)
    ref = reference.shift_backward(g, shifts, stride, 5, 6)
    assert torch.equal(kernels.shift_backward(g, shifts, stride, 5, 6), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_kernels_nchw_whole_vector_planes(kernels, plane_form, stores, dtype):
    """NCHW planes of 8x8 and 8x12 pixels (whole vectors of 32 or 64 bytes: with streaming stores the flat kernel
    writes them non-temporally), shifts of up to 2 pixels and beyond the image, forward and inverse shift against the
    reference."""
    g = torch.Generator().manual_seed(5)
    for h, w in [(8, 8), (8, 12)]:
        shifts = torch.randint(-2, 3, (40, 2), generator=g)
        shifts[3], shifts[4] = torch.tensor([h + 1, 0]), torch.tensor([0, -(w + 3)])
        x = torch.randn(3, 40, h, w, generator=g).to(dtype)
        out = kernels.shift_forward(x, shifts, 1)
        assert torch.equal(out, reference.shift_forward(x, shifts, 1))
        assert torch.equal(kernels.shift_backward(x, shifts, 1, h, w), reference.shift_backward(x, shifts, 1, h, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_forward_nchw_whole_vector_planes(kernels, plane_form, stores, dtype):
    """NCHW planes of whole vectors (32 or 64 bytes), where the flat bilinear forward can stream its stores (into an
    output placed half a page from the input, output_apart): planes of 16 floats (2x8), shifts within a pixel, up to 3
    rows (3 rows of 112 floats) and beyond the image, against the reference."""
    g = torch.Generator().manual_seed(6)
    for h, w in [(2, 8), (8, 12), (32, 32), (6, 112)]:
        shifts = (torch.rand(40, 2, generator=g) * 2 - 1).to(torch.float64 if dtype == torch.float64 else torch.float32)
        shifts[3], shifts[4] = torch.tensor([h + 0.5, 0.25]), torch.tensor([0.75, -(w + 3.5)])
        shifts[5], shifts[6] = torch.tensor([-2.5, 0.5]), torch.tensor([2.25, -1.75])
        x = torch.randn(3, 40, h, w, generator=g).to(dtype)
        out = kernels.bilinear_forward(x, shifts, 1)
        torch.testing.assert_close(out, reference.bilinear_forward(x, shifts, 1), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_nchw_whole_vector_planes(kernels, plane_form, stores, dtype):
    """NCHW planes of whole vectors (32 or 64 bytes), where the flat backward kernels can stream the input gradient
    (into an output placed half a page from g and x: output_apart): the fused bilinear backward, the input gradient
    alone, the quantization-aware backward and its ReLU-fused form (and that form's forward), against the reference;
    the input gradient is an ordinary contiguous NCHW tensor wherever its storage begins."""
    g = torch.Generator().manual_seed(9)
    for h, w in [(2, 8), (8, 12), (32, 32), (6, 112)]:
        real = (torch.rand(40, 2, generator=g) * 2 - 1).to(torch.float64 if dtype == torch.float64 else torch.float32)
        real[3], real[4] = torch.tensor([h + 0.5, 0.25]), torch.tensor([0.75, -(w + 3.5)])
        real[5], real[6] = torch.tensor([-2.5, 0.5]), torch.tensor([2.25, -1.75])
        rounded = torch.round(real).long()
        x = torch.randn(3, 40, h, w, generator=g).to(dtype)
        grad = torch.randn(3, 40, h, w, generator=g).to(dtype)
        gx, gs = kernels.bilinear_backward(grad, x, real, 1)
        ref_gx, ref_gs = reference.bilinear_backward(grad, x, real, 1)
        assert gx.shape == x.shape and gx.is_contiguous()
        torch.testing.assert_close(gx, ref_gx, **_tol(dtype))
        _assert_shift_grad_close(gs, ref_gs, grad, x)
        torch.testing.assert_close(kernels.bilinear_backward_input(grad, real, 1, h, w), ref_gx, **_tol(dtype))
        sgx, sgs = kernels.sparse_backward(grad, x, rounded, real, 1)
        assert torch.equal(sgx, reference.shift_backward(grad, rounded, 1, h, w))
        _assert_shift_grad_close(sgs, ref_gs, grad, x)
        assert torch.equal(kernels.relu_shift_forward(x, rounded, 1), reference.relu_shift_forward(x, rounded, 1))
        rgx, rgs = kernels.relu_sparse_backward(grad, x, rounded, real, 1)
        ref_rgx, ref_rgs = reference.relu_sparse_backward(grad, x, rounded, real, 1)
        assert torch.equal(rgx, ref_rgx)
        _assert_shift_grad_close(rgs, ref_rgs, grad, x)


def test_streamed_outputs_start_apart_from_their_inputs(kernels, monkeypatch):
    """With streaming stores (FEWSHIFTS_STREAM=1) the stride-1 NCHW outputs (bilinear, integer and ReLU-fused integer
    shift, forward and input gradient) begin about half a 4 KB page from their inputs' data, mod 4 KB (a streamed
    store delays later loads at the same address bits 0-11); with ordinary stores they are ordinary new tensors."""
    g = torch.Generator().manual_seed(10)
    x, grad = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    real = torch.rand(16, 2, generator=g) * 2 - 1

    def gap(a: torch.Tensor, b: torch.Tensor) -> int:
        d = (a.data_ptr() - b.data_ptr()) % 4096
        return min(d, 4096 - d)

    monkeypatch.setenv("FEWSHIFTS_STREAM", "1")
    out = kernels.bilinear_forward(x, real, 1)
    gx = kernels.bilinear_backward(grad, x, real, 1)[0]
    assert gap(out, x) >= 2048 - 64
    assert min(gap(gx, x), gap(gx, grad)) >= 1024 - 64
    rounded = torch.round(real).long()
    assert gap(kernels.shift_forward(x, rounded, 1), x) >= 2048 - 64
    assert gap(kernels.relu_shift_forward(x, rounded, 1), x) >= 2048 - 64
    assert gap(kernels.shift_backward(grad, rounded, 1, 8, 8), grad) >= 2048 - 64
    monkeypatch.setenv("FEWSHIFTS_STREAM", "0")
    assert kernels.bilinear_forward(x, real, 1).storage_offset() == 0
    assert kernels.bilinear_backward(grad, x, real, 1)[0].storage_offset() == 0


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_kernels_whole_line_runs(kernels, stores, dtype, stride):
    """channels_last runs of 16 channels per displacement (whole 64-byte lines in float32 and float64: with streaming
    stores at stride 1 the movement runs in source order), the nine 3x3 displacements, one beyond the image and two
    far enough to empty a border band; forward and inverse shift against the reference."""
    grid = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] + [(9, -1), (2, -3)]
    shifts = torch.tensor(grid).repeat_interleave(16, dim=0)
    x = torch.randn(3, len(shifts), 6, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    out = kernels.shift_forward(x, shifts, stride)
    assert torch.equal(out, reference.shift_forward(x, shifts, stride))
    grad = torch.randn_like(out)
    ref = reference.shift_backward(grad, shifts, stride, 6, 7)
    assert torch.equal(kernels.shift_backward(grad, shifts, stride, 6, 7), ref)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_kernels_per_channel_shifts(kernels, stores, dtype, stride):
    """channels_last with its own shift in [-1, 1]^2 for each channel (rounded learned shifts: moved channel by
    channel), 64 channels (pixels of whole 32- or 64-byte vectors, so the stores can stream); interior and border
    pixels against the reference."""
    g = torch.Generator().manual_seed(3)
    shifts = torch.randint(-1, 2, (64, 2), generator=g)
    x = torch.randn(2, 64, 6, 7, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    out = kernels.shift_forward(x, shifts, stride)
    assert torch.equal(out, reference.shift_forward(x, shifts, stride))
    grad = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = reference.shift_backward(grad, shifts, stride, 6, 7)
    assert torch.equal(kernels.shift_backward(grad, shifts, stride, 6, 7), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_selection_kernel_vector_counts(kernels, stores, dtype):
    """The channels_last selection kernel (move_nhwc_pick) at stride 1 with shifts within one pixel keeps pixels of up
    to 12 whole vectors in registers (8 without AVX-512: pick_row_registers) and its ring of columns in memory beyond
    that: 1 to 13 vectors per pixel, with and without a partial last vector, ShiftNet's grouped and per-channel
    shifts, and shifts that give the lanes of each vector one or two of the three rows (every such set of rows: the
    two-row loads, Rows = 2), forward and adjoint (the input gradient) against the reference, including the border
    rows and columns."""
    lanes = kernels.vector_bytes() // dtype.itemsize
    g = torch.Generator().manual_seed(5)
    row_sets = torch.tensor([[-1, -1], [0, 0], [1, 1], [-1, 0], [0, 1], [-1, 1]])  # one or two rows
    for vectors in range(1, 14):
        for C in (vectors * lanes, vectors * lanes + 3):
            vector_rows = row_sets[torch.randint(len(row_sets), (C // lanes + 1,), generator=g)]
            lane_rows = vector_rows[torch.arange(C) // lanes, torch.randint(2, (C,), generator=g)]
            two_rows = torch.stack([lane_rows, torch.randint(-1, 2, (C,), generator=g)], 1)
            for shifts in (fs.grouped_shifts(C), torch.randint(-1, 2, (C, 2), generator=g), two_rows):
                x = torch.randn(2, C, 4, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
                out = kernels.shift_forward(x, shifts, 1)
                assert torch.equal(out, reference.shift_forward(x, shifts, 1)), (C, shifts[:3])
                ref = reference.shift_backward(x, shifts, 1, 4, 6)
                assert torch.equal(kernels.shift_backward(x, shifts, 1, 4, 6), ref), (C, shifts[:3])


@pytest.mark.parametrize("reach", [2, 3])
@pytest.mark.parametrize("tail", [3, 0])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_vector_kernel_mixed_displacement_counts(kernels, stores, dtype, stride, tail, reach):
    """channels_last integer kernel on whole vectors (16 bf16 / 8 float / 4 double lanes, twice as many where the
    kernels were built for AVX-512): mostly runs of one displacement, plus vectors with 2, 3 and as many displacements
    as lanes (more than 8 for bf16), and a last vector with 3 (short: `tail` channels; else whole, so that pixels are
    whole vectors and the stores can stream); every vector class and the checked border columns, against the
    reference. Displacements up to `reach` pixels: within 5 rows and columns for 2 (the selection kernel,
    move_nhwc_pick, with its 5-row window), over 7 columns for 3 (the vector kernel, move_nhwc_vec)."""
    lanes = kernels.vector_bytes() // dtype.itemsize
    C = 40 * 16 + tail
    shifts = torch.tensor([1, -1]).repeat(C, 1)
    span = range(-reach, reach + 1)
    grid = torch.tensor([(dy, dx) for dy in span for dx in span if (dy, dx) != (1, -1)])
    n = min(lanes, len(grid))
    shifts[:n] = grid[:n]  # vector 0: one displacement per lane (24 for bf16 with AVX-512 at reach 2)
    shifts[lanes : lanes + 3] = grid[:3]  # vector 1: 3 (with the run's)
    shifts[2 * lanes + 1] = torch.tensor([0, 0])  # vector 2: 2
    shifts[C - 3 :] = grid[4:7]  # short last vector: 3
    x = torch.randn(2, C, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    out = kernels.shift_forward(x, shifts, stride)
    assert torch.equal(out, reference.shift_forward(x, shifts, stride))
    g = torch.randn_like(out)
    ref = reference.shift_backward(g, shifts, stride, 5, 7)
    assert torch.equal(kernels.shift_backward(g, shifts, stride, 5, 7), ref)


@pytest.mark.parametrize("reach", [1.0, 1.5, 3.0])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [5, 8, 13, 40])
def test_bilinear_vector_kernels_match_reference(kernels, channels, dtype, stride, reach):
    """channels_last bilinear kernels on whole channel vectors (8 float / 4 double lanes, 16 / 8 with AVX-512, a
    partial last vector): shifts within a few pixels, whose corner displacements the vector kernels list per vector
    (larger spreads take the per-block kernels, covered by the random cases above)."""
    g = torch.Generator().manual_seed(channels)
    N, H, W = (1, 37, 13) if channels == 40 else (3, 11, 13)  # one image split into blocks of rows, or three whole
    x = torch.randn(N, channels, H, W, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    real = ((torch.rand(channels, 2, generator=g, dtype=torch.float64) * 2 - 1) * reach).to(real_dtype)
    real[0] = torch.tensor([0.0, 1.0])  # integral: three corner weights 0
    Ho, Wo = reference.output_size(H, stride), reference.output_size(W, stride)
    grad = torch.randn(N, channels, Ho, Wo, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    out = kernels.bilinear_forward(x, real, stride)
    _assert_same_format(out, reference.bilinear_forward(x, real, stride))
    torch.testing.assert_close(out, reference.bilinear_forward(x, real, stride), **_tol(dtype))
    gx, gs = kernels.bilinear_backward(grad, x, real, stride)
    ref_gx = reference.bilinear_backward_input(grad, real, stride, H, W)
    torch.testing.assert_close(gx, ref_gx, **_tol(dtype))
    # the input gradient alone (x needs no shift gradient) takes another kernel
    torch.testing.assert_close(kernels.bilinear_backward_input(grad, real, stride, H, W), ref_gx, **_tol(dtype))
    ref_gs = reference.bilinear_backward_shifts(grad, x, real, stride)
    _assert_shift_grad_close(gs, ref_gs, grad, x)
    gs_only = kernels.bilinear_backward_shifts(grad, x, real, stride)  # another kernel where x needs no gradient
    _assert_shift_grad_close(gs_only, ref_gs, grad, x)
    # the same gradients whatever the number of threads (fixed summation order)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kernels.bilinear_backward_shifts(grad, x, real, stride), gs_only)
        gx1, gs1 = kernels.bilinear_backward(grad, x, real, stride)
        assert torch.equal(gx1, gx) and torch.equal(gs1, gs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, -2, 3])
def test_channels_last_separable_two_pixel_passes(kernels, stores, row_pairs, dtype, offset):
    """The channels_last bilinear forward and input gradient at stride 1 with every channel's corners in 3 rows and
    3 columns (shifts within a pixel of one integer `offset`) compute two output pixels per pass: odd and even widths,
    a last pixel without a partner, columns outside the image on either side or (offset 3 on narrow images) every
    column of a pass, channel counts with a partial last vector, pixels of whole vectors that the kernel keeps in
    registers (up to 10 vectors, 8 without AVX-512: sep_row_pairs_registers) and beyond, and 1000 channels, which the
    kernel takes in two strips (kL1Bytes: a strip holds 768 floats, or 384 doubles, with 64- or 32-byte vectors
    alike) with the partial vector in the second; ordinary and non-temporal stores; one output row per pass or two
    (not in the register form; heights 1 to 5: an odd last row alone, rows outside the image)."""
    g = torch.Generator().manual_seed(offset + 7)
    shapes = [(8, 3, 1), (13, 4, 2), (24, 2, 3), (5, 3, 4), (40, 3, 7), (16, 2, 8), (9, 5, 9), (1000, 3, 5)]
    shapes += [(32, 3, 6), (96, 2, 5), (160, 3, 4), (176, 2, 3), (64, 1, 6), (80, 5, 7)]
    for channels, height, width in shapes:
        x = torch.randn(2, channels, height, width, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        real = torch.rand(channels, 2, generator=g) * 1.8 - 0.9 + offset
        real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        real = real.to(real_dtype)
        out = kernels.bilinear_forward(x, real, 1)
        assert out.is_contiguous(memory_format=torch.channels_last)
        tol = {"rtol": 2**-7, "atol": 1e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(out, reference.bilinear_forward(x, real, 1), **tol)
        gx = kernels.bilinear_backward_input(x, real, 1, height, width)
        torch.testing.assert_close(gx, reference.bilinear_backward_input(x, real, 1, height, width), **tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bilinear_non_finite_like_reference(kernels, plane_form, layout):
    """inf/nan reach exactly the outputs the reference sends them to (0 * inf = nan only at a channel's own corners,
    zero outside the image)."""
    x = torch.randn(2, 20, 6, 7)
    x[0, :, 2, 3] = float("inf")
    x[1, :, 0, 0] = float("nan")
    x = _layout(x, layout)
    real = torch.rand(20, 2) * 4 - 2
    real[:5] = torch.round(real[:5])  # integral shifts: three corner weights are 0
    grad = _layout(torch.randn(2, 20, 6, 7), layout)
    torch.testing.assert_close(kernels.bilinear_forward(x, real, 1), reference.bilinear_forward(x, real, 1),
                               equal_nan=True)
    gx, gs = kernels.bilinear_backward(grad, x, real, 1)
    ref_gx, ref_gs = reference.bilinear_backward(grad, x, real, 1)
    torch.testing.assert_close(gx, ref_gx, equal_nan=True)
    assert torch.equal(gs.isnan(), ref_gs.isnan())
    # planes with inf/nan are recomputed per pixel (the flat sums meet 0 * inf where the reference has no term)
    torch.testing.assert_close(gs, ref_gs, equal_nan=True, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("channels", [24, 32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("reach", [0.9, 1.0, 2.0])
def test_separable_channels_last_kernels_non_finite_like_reference(kernels, row_pairs, stride, reach, channels):
    """channels_last kernels that weigh all taps of a window per channel (the separable forward and input gradient for
    shifts within a pixel, the separable shift gradient within two): a channel's 0 * inf at taps it does not use is
    recomputed from its own corners, so inf/nan land where the reference puts them. At reach 0.9 every channel's
    corners lie in 3 rows and columns (the two-pixel passes at stride 1; for whole vectors, 32 channels, or 24 with
    32-byte vectors, with the ring in registers: sep_row_pairs_registers; one output row per pass or two, both rows
    recomputed); at 1.0 the integral shifts of +-1 widen the window to 5."""
    g = torch.Generator().manual_seed(int(reach * 10) + stride)
    x = torch.randn(2, channels, 7, 9, generator=g)
    x[0, :, 3, 4] = float("inf")
    x[1, :5, 0, 8] = float("nan")
    x[1, 5:, 6, 0] = -float("inf")
    x = x.contiguous(memory_format=torch.channels_last)
    real = (torch.rand(channels, 2, generator=g) * 2 - 1) * reach
    real[:6] = torch.round(real[:6]) if reach >= 1 else torch.trunc(real[:6])  # integral: corner weights 0
    Ho, Wo = reference.output_size(7, stride), reference.output_size(9, stride)
    grad = torch.randn(2, channels, Ho, Wo, generator=g)
    grad[0, 7, 1, 2] = float("nan")
    grad[1, 3, 2, 3] = float("inf")  # inf - inf in a difference of the fused backward's g: nan, where the input
    grad[1, 9, 0, 0] = -float("inf")  # gradient's sum has inf
    grad = grad.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(kernels.bilinear_forward(x, real, stride), reference.bilinear_forward(x, real, stride),
                               equal_nan=True)
    gx, gs = kernels.bilinear_backward(grad, x, real, stride)
    ref_gx, ref_gs = reference.bilinear_backward(grad, x, real, stride)
    torch.testing.assert_close(gx, ref_gx, equal_nan=True)
    assert torch.equal(gs.isnan(), ref_gs.isnan())
    torch.testing.assert_close(gs, ref_gs, equal_nan=True, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.bilinear_backward_input(grad, real, stride, 7, 9), ref_gx, equal_nan=True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channels_last_kernels_in_channel_strips(kernels, dtype, stride):
    """channels_last row kernels with more channels than one strip holds (strip_vectors: per-channel data within
    kL1Bytes), against the reference: the integer selection (rounded per-channel shifts within a pixel, 1100 channels:
    two strips and a partial vector moved lane by lane), the shift gradient and the separable forward / input gradient
    with corners in 5 rows and columns (460 channels), and the one-pixel fused backward (corners in 3, 700 channels,
    pixels that are no whole number of vectors)."""
    g = torch.Generator().manual_seed(11 + stride)
    real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for channels, reach in [(1100, 0.9), (460, 1.9), (700, 0.9)]:
        x = torch.randn(2, channels, 4, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        real = ((torch.rand(channels, 2, generator=g, dtype=torch.float64) * 2 - 1) * reach).to(real_dtype)
        rounded = torch.round(real).long()
        out = kernels.shift_forward(x, rounded, stride)
        assert torch.equal(out, reference.shift_forward(x, rounded, stride))
        grad = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        assert torch.equal(kernels.shift_backward(grad, rounded, stride, 4, 5),
                           reference.shift_backward(grad, rounded, stride, 4, 5))
        out = kernels.bilinear_forward(x, real, stride)
        torch.testing.assert_close(out, reference.bilinear_forward(x, real, stride), **_tol(dtype))
        gs = kernels.bilinear_backward_shifts(grad, x, real, stride)
        _assert_shift_grad_close(gs, reference.bilinear_backward_shifts(grad, x, real, stride), grad, x)
        gx, gs = kernels.bilinear_backward(grad, x, real, stride)
        ref_gx, ref_gs = reference.bilinear_backward(grad, x, real, stride)
        torch.testing.assert_close(gx, ref_gx, **_tol(dtype))
        _assert_shift_grad_close(gs, ref_gs, grad, x)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_shift_gradient_non_finite_g_where_all_corners_lie_outside(kernels, layout, stride, dtype):
    """An inf in g at an output pixel whose four corners all lie outside the image: the reference multiplies it by the
    zero padding (inf * 0 = nan) in the shift gradient. The stride-1 kernels that read x at each source pixel and g
    at its shifted positions never read that g; they recompute such channels as the reference does."""
    H, W = 6, 7
    for channels in (8, 40, 384):
        for dy, dx in [(1.4, 0.3), (-1.6, 0.2), (0.2, 1.3), (0.3, -1.7), (2.5, 0.5), (1.2, 1.2)]:
            g = torch.Generator().manual_seed(channels)
            x = torch.randn(2, channels, H, W, generator=g).to(dtype)
            Ho, Wo = reference.output_size(H, stride), reference.output_size(W, stride)
            grad = torch.randn(2, channels, Ho, Wo, generator=g).to(dtype)
            jitter = torch.rand(channels, 2, generator=g, dtype=torch.float64) * 0.05
            real = (torch.tensor([dy, dx], dtype=torch.float64) + jitter).to(dtype)
            grad[1, 2, Ho - 1 if dy > 0 else 0, Wo - 1 if dx > 0 else 0] = float("inf")
            x, grad = _layout(x, layout), _layout(grad, layout)
            rounded = torch.round(real).long()
            ref = reference.bilinear_backward(grad, x, real, stride)[1]
            assert bool(ref[2].isnan().all()) and bool(ref[3:].isfinite().all())
            for gs in (kernels.bilinear_backward(grad, x, real, stride)[1],
                       kernels.bilinear_backward_shifts(grad, x, real, stride),
                       kernels.sparse_backward(grad, x, rounded, real, stride)[1],
                       kernels.relu_sparse_backward(grad, x, rounded, real, stride)[1]):
                assert torch.equal(gs.isnan(), ref.isnan()) and torch.equal(gs.isinf(), ref.isinf())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bfloat16_outputs_are_float32_results_rounded(kernels, plane_form, layout):
    """bfloat16 kernels compute in float32 and round on store as torch does (to nearest even; inf kept): the bits
    of the float32 kernels on the widened inputs, rounded by ``.bfloat16()``, with nan at the same places (the
    kernels store c10's 0x7FC0, torch's vectorized cast may keep another nan payload), except for rare elements
    within one bfloat16 unit or float32 rounding: the compiler fuses multiply-adds (-ffp-contract=fast) differently
    in the two instantiations of the channels_last separable kernels, which changes the last float32 bits, and so
    the bfloat16 result where the float32 one lies at a rounding midpoint (8% of these inputs have one such element
    there; none with -ffp-contract=off, which slowed the fused backward 3-9% on cached data). Over 40 inputs."""

    def same(a, b):
        assert torch.equal(a.isnan(), b.isnan())
        differ = a.nan_to_num(0.0).view(torch.int16) != b.nan_to_num(0.0).view(torch.int16)
        assert int(differ.sum()) <= max(1, a.numel() // 1000)
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-4, equal_nan=True)

    g = torch.Generator().manual_seed(5)
    for _ in range(40):
        x = torch.randn(2, 20, 9, 13, generator=g) * 50
        x[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38])
        x = _layout(x, layout).bfloat16()
        grad = _layout(torch.randn(2, 20, 9, 13, generator=g), layout)
        grad[1, 3, 4, 5] = float("nan")
        grad = grad.bfloat16()
        real = torch.rand(20, 2, generator=g) * 4 - 2
        same(kernels.bilinear_forward(x, real, 1), kernels.bilinear_forward(x.float(), real, 1).bfloat16())
        rounded = real.round()
        same(kernels.relu_shift_forward(x, rounded, 1), kernels.relu_shift_forward(x.float(), rounded, 1).bfloat16())
        same(kernels.bilinear_backward_input(grad, real, 1, 9, 13),
             kernels.bilinear_backward_input(grad.float(), real, 1, 9, 13).bfloat16())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stride", [1, 2])
def test_float16_takes_the_float32_kernels(kernels, layout, stride):
    """float16 (no instantiation of its own) runs the float32 kernels on widened tensors and rounds their results
    once: the same bits as widening, the float32 kernel and ``.half()``, in the input's memory format, and within
    float16 rounding of the reference, which computes in float16 tensors."""
    g = torch.Generator().manual_seed(11 + stride)
    x = _layout(torch.randn(2, 20, 9, 13, generator=g), layout).half()
    Ho, Wo = reference.output_size(9, stride), reference.output_size(13, stride)
    grad = _layout(torch.randn(2, 20, Ho, Wo, generator=g), layout).half()
    real = torch.rand(20, 2, generator=g) * 4 - 2
    rounded = real.round().long()
    calls = {
        "shift_forward": lambda k, a, b: k.shift_forward(a, rounded, stride),
        "shift_backward": lambda k, a, b: k.shift_backward(b, rounded, stride, 9, 13),
        "bilinear_forward": lambda k, a, b: k.bilinear_forward(a, real, stride),
        "bilinear_backward_input": lambda k, a, b: k.bilinear_backward_input(b, real, stride, 9, 13),
        "bilinear_backward_shifts": lambda k, a, b: k.bilinear_backward_shifts(b, a, real, stride),
        "bilinear_backward": lambda k, a, b: k.bilinear_backward(b, a, real, stride),
        "sparse_backward": lambda k, a, b: k.sparse_backward(b, a, rounded, real, stride),
        "relu_shift_forward": lambda k, a, b: k.relu_shift_forward(a, rounded, stride),
        "relu_sparse_backward": lambda k, a, b: k.relu_sparse_backward(b, a, rounded, real, stride),
    }
    for name, call in calls.items():
        outs = call(kernels, x, grad)
        wide = call(kernels, x.float(), grad.float())
        refs = call(reference, x, grad)
        outs, wide, refs = ((t,) if isinstance(t, torch.Tensor) else t for t in (outs, wide, refs))
        for out, w, ref in zip(outs, wide, refs):
            if out.dim() == 2:  # a shift gradient: float32, as for float32 inputs
                assert out.dtype == torch.float32 and torch.equal(out, w), name
                _assert_shift_grad_close(out, ref.float(), grad, x)
                continue
            _assert_same_format(out, ref)
            assert torch.equal(out, w.half()), name
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("shift_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_shifts_act_as_their_float32_values(kernels, shift_dtype):
    """Bilinear weights come from the shifts' exact values (not rounded to 16 bits), on both paths."""
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(2, 10, 6, 7, generator=g), torch.randn(2, 10, 6, 7, generator=g)
    real = (torch.rand(10, 2, generator=g) * 4 - 2).to(shift_dtype)
    for k in (kernels, reference):
        assert torch.equal(k.bilinear_forward(x, real, 1), k.bilinear_forward(x, real.float(), 1))
        gx, gs = k.bilinear_backward(grad, x, real, 1)
        wide_gx, wide_gs = k.bilinear_backward(grad, x, real.float(), 1)
        assert torch.equal(gx, wide_gx) and gs.dtype == shift_dtype and torch.equal(gs, wide_gs.to(shift_dtype))


@pytest.mark.parametrize("case", CASES[::3], ids=_case_id)
def test_sparse_backward_matches_its_parts(kernels, plane_form, case):
    x, _, real, grad = _inputs(case)
    stride = case[1]
    rounded = torch.round(real).long()
    gx, gs = kernels.sparse_backward(grad, x, rounded, real, stride)
    assert torch.equal(gx, reference.shift_backward(grad, rounded, stride, *x.shape[2:]))
    assert torch.equal(gs, kernels.bilinear_backward_shifts(grad, x, real, stride))
    ref_gx, _ = reference.sparse_backward(grad, x, rounded, real, stride)
    assert torch.equal(gx, ref_gx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reach", [1.0, 2.0])
@pytest.mark.parametrize("channels", [5, 40, 96, 272])
def test_channels_last_one_pass_backward_matches_reference(kernels, stores, row_pairs, dtype, reach, channels):
    """channels_last, stride 1, corners within 3 or 5 rows and columns: both gradients of active_shift2d come from
    one pass over g and x (one or two output rows at a time, then one for an odd row left); sparse_shift2d's input
    gradient is the inverse rounded shift, moved exactly, row by row beside its shift gradient's rows
    (sparse_backward_nhwc: the selection in registers up to 12 vectors per pixel, else its ring; streamed where pixels
    are whole vectors, 96 and 272 channels)."""
    g = torch.Generator().manual_seed(channels + int(reach))
    N, H, W = (1, 37, 13) if channels == 40 else (3, 11, 13)
    x = torch.randn(N, channels, H, W, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(N, channels, H, W, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    real_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    real = ((torch.rand(channels, 2, generator=g, dtype=torch.float64) * 2 - 1) * reach).to(real_dtype)
    real[0] = torch.tensor([0.0, 1.0 if reach > 1 else -1.0])  # integral (within reach 1: the 3 x 3 window)
    real[1] = torch.tensor([0.5, -1.5 if reach > 1 else -0.5])  # ties, rounded to even: 0, -2 (or -0): either corner
    rounded = torch.round(real)
    scale = 4 * grad.double().abs().sum() * x.double().abs().max() / channels + 1
    atol = float((1e-12 if dtype == torch.float64 else 1e-6) * scale)
    active = kernels.bilinear_backward(grad, x, real, 1)
    sparse = kernels.sparse_backward(grad, x, rounded, real, 1)
    for (gx, gs), (ref_gx, ref_gs) in ((active, reference.bilinear_backward(grad, x, real, 1)),
                                       (sparse, reference.sparse_backward(grad, x, rounded, real, 1))):
        _assert_same_format(gx, ref_gx)
        torch.testing.assert_close(gx, ref_gx, **_tol(dtype))
        torch.testing.assert_close(gs.double(), ref_gs.double(), rtol=0, atol=atol)
    assert torch.equal(sparse[0], reference.shift_backward(grad, rounded.long(), 1, H, W))  # moved exactly
    threads = torch.get_num_threads()  # the same results on one thread (fixed summation order)
    try:
        torch.set_num_threads(1)
        one = kernels.bilinear_backward(grad, x, real, 1), kernels.sparse_backward(grad, x, rounded, real, 1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, (active, sparse)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


TWO_PIXEL_BACKWARD = [(torch.float32, 768), (torch.float64, 384), (torch.float32, 32), (torch.float32, 48),
                      (torch.float32, 64), (torch.float64, 16)]


@pytest.mark.parametrize(("dtype", "channels"), TWO_PIXEL_BACKWARD, ids=str)
@pytest.mark.parametrize("offset", [0, 1, -2])
def test_channels_last_one_pass_backward_two_pixel_passes(kernels, row_pairs, dtype, channels, offset):
    """Where the fused channels_last backward's per-channel data exceeds L1 (768 float or 384 double channels, corners
    in 3 rows and columns) it takes two pixels per pass and streams gx, in strips of channels (kL1Bytes); with
    64-byte vectors it does so at any channel count, and pixels of up to 3 whole vectors (32 and 48 floats, 16
    doubles; not 64 floats) keep the pass's ring and sums in registers (backward_row_pairs_registers). One output row
    per pass or two (an odd last row alone; heights 1 to 5, rows outside the image at both ends), odd and even widths,
    a last pixel without a partner, columns outside the image, inf/nan recomputed as the reference does (both rows of
    a pair); the same results on one thread."""
    g = torch.Generator().manual_seed(channels + offset)
    for n, height, width in [(1, 3, 1), (2, 4, 2), (1, 2, 5), (1, 5, 8), (2, 3, 9), (1, 1, 4)]:
        x = torch.randn(n, channels, height, width, generator=g).to(dtype)
        grad = torch.randn(n, channels, height, width, generator=g).to(dtype)
        if width == 5:
            grad[0, 3, 1, 2] = float("inf")  # an inf - inf in the pass's differences: that row is recomputed
            x[0, 7, 0, 4] = float("nan")
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
        real = ((torch.rand(channels, 2, generator=g, dtype=torch.float64) * 1.8 - 0.9) + offset).to(dtype)
        gx, gs = kernels.bilinear_backward(grad, x, real, 1)
        ref_gx, ref_gs = reference.bilinear_backward(grad, x, real, 1)
        _assert_same_format(gx, ref_gx)
        torch.testing.assert_close(gx, ref_gx, equal_nan=True, **_tol(dtype))
        finite = ref_gs.isfinite().all(dim=1)
        assert torch.equal(gs.isnan(), ref_gs.isnan())
        scale = 4 * grad.double().nan_to_num(0, 0, 0).abs().sum() * x.double().nan_to_num(0, 0, 0).abs().max() + 1
        atol = float((1e-12 if dtype == torch.float64 else 1e-6) * scale / channels)
        torch.testing.assert_close(gs[finite].double(), ref_gs[finite].double(), rtol=0, atol=atol)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = kernels.bilinear_backward(grad, x, real, 1)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one[0].nan_to_num(), gx.nan_to_num()) and torch.equal(one[1].nan_to_num(), gs.nan_to_num())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_relu_sparse_kernels_match_reference(kernels, plane_form, case):
    x, _, real, grad = _inputs(case)
    z = x
    z[:, :, ::3] = 0  # exact zeros: relu(0) = 0 and a zero gradient there (in place: keeps the layout)
    stride, dtype = case[1], case[3]
    rounded = torch.round(real).long()
    out, ref = kernels.relu_shift_forward(z, rounded, stride), reference.relu_shift_forward(z, rounded, stride)
    _assert_same_format(out, ref)
    assert torch.equal(out, ref)
    gz, gs = kernels.relu_sparse_backward(grad, z, rounded, real, stride)
    ref_gz, ref_gs = reference.relu_sparse_backward(grad, z, rounded, real, stride)
    _assert_same_format(gz, ref_gz)
    assert torch.equal(gz, ref_gz)
    assert gs.dtype == ref_gs.dtype == real.dtype and gs.shape == real.shape
    scale = 4 * grad.double().abs().sum() * x.double().abs().max() / x.shape[1] + 1
    eps = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gs.double(), ref_gs.double(), rtol=0, atol=float(eps * scale))


@pytest.mark.parametrize(("layout", "hw", "dtype"), [("nchw", (9, 8), torch.float32), ("nchw", (7, 7), torch.float32),
                                                   ("nchw", (5, 3), torch.float64),
                                                   ("channels_last", (9, 8), torch.float32)])
def test_relu_sparse_non_finite_like_composition(kernels, plane_form, layout, hw, dtype):
    """inf / nan in z and in the gradient: the fused kernels give what the C++ composition (relu, sparse kernels,
    ReLU gradient) gives. The NCHW kernels read whole vectors across plane ends (masked): values in the neighbouring
    planes, at their first and last pixels, must not leak into a channel's results."""
    H, W = hw
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 6, H, W, generator=g, dtype=dtype)
    z[0, 1, H // 2, W // 2], z[1, 2, 0, W - 1], z[0, 3, H - 1, 0], z[1, 4, H - 1, W - 1] = (
        float("inf"), float("nan"), float("-inf"), float("inf"))
    z = _layout(z, layout)
    grad = torch.randn(2, 6, H, W, generator=g, dtype=dtype)
    grad[0, 2, 0, 0], grad[1, 3, H - 1, W - 1] = float("inf"), float("nan")
    grad = _layout(grad, layout)
    real = torch.rand(6, 2, generator=g, dtype=dtype) * 3 - 1.5
    rounded = torch.round(real).long()
    torch.testing.assert_close(kernels.relu_shift_forward(z, rounded, 1),
                               kernels.shift_forward(torch.relu(z), rounded, 1), rtol=0, atol=0, equal_nan=True)
    gz, gs = kernels.relu_sparse_backward(grad, z, rounded, real, 1)
    ref_gx, ref_gs = kernels.sparse_backward(grad, torch.relu(z), rounded, real, 1)
    torch.testing.assert_close(gz, torch.ops.aten.threshold_backward(ref_gx, z, 0), equal_nan=True)
    torch.testing.assert_close(gs, ref_gs, equal_nan=True)


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 1], ids=_case_id)
def test_shift_inplace_matches_reference(kernels, case):
    x, shifts, _, _ = _inputs(case)
    shifts[(torch.arange(len(shifts)) % 3) == 1] = 0  # a share of unshifted channels
    y, ref = x.clone(), x.clone()
    if case[2] == "strided":
        y, ref = _layout(x, "strided"), _layout(x, "strided")
    ptr = y.data_ptr()
    kernels.shift_inplace(y, shifts)
    reference.shift_inplace(ref, shifts)
    assert y.data_ptr() == ptr and torch.equal(y, ref)
    still = (shifts == 0).all(dim=1)
    assert torch.equal(y[:, still], x[:, still])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("shape", "radius", "moved"), [
    ((1, 24, 40, 40), 1, 0.1),    # batch below the threads: bands of rows with saved halos
    ((1, 20, 64, 3), 2, 0.5),     # more rows than columns, |shift| 2
    ((2, 33, 5, 9), 400, 1.0),    # every channel shifted, shifts far beyond the image
    ((3, 16, 1, 1), 1, 1.0),      # one pixel
    ((1, 40, 300, 2), 5, 0.3),    # tall and thin, bands of many rows
    ((4, 64, 24, 24), 1, 0.1),    # FE-Net-like: a few channels per pixel moved
])
def test_shift_inplace_channels_last_rows_and_bands(kernels, threads, shape, radius, moved):
    g = torch.Generator().manual_seed(threads * 100 + shape[1])
    _, c, h, w = shape
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    shifts = torch.randint(-radius, radius + 1, (c, 2), generator=g)
    shifts[torch.rand(c, generator=g) >= moved] = 0
    shifts[:, 0].clamp_(-h - 1, h + 1)  # as shift2d_ clamps them
    shifts[:, 1].clamp_(-w - 1, w + 1)
    order = torch.argsort(shifts[:, 0] * 1000 + shifts[:, 1], stable=True)  # grouped (deploy's order) and not
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in (shifts, shifts[order]):
            y, ref = x.clone(), x.clone()
            kernels.shift_inplace(y, s)
            reference.shift_inplace(ref, s)
            assert torch.equal(y, ref)
    finally:
        torch.set_num_threads(old)


def test_empty_batch(kernels):
    x = torch.randn(0, 3, 5, 4)
    shifts, real = torch.ones(3, 2, dtype=torch.long), torch.full((3, 2), 0.5)
    assert kernels.shift_forward(x, shifts, 2).shape == (0, 3, 3, 2)
    assert kernels.bilinear_forward(x, real, 1).shape == x.shape
    assert torch.equal(kernels.bilinear_backward_shifts(x, x, real, 1), torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------
# public ops: identical under FEWSHIFTS_BACKEND=cpp and =reference


def _run_public(op: str, x: torch.Tensor, shifts: torch.Tensor, stride: int):
    x = x.detach().requires_grad_()
    shifts = shifts.detach().requires_grad_(shifts.is_floating_point())
    out = getattr(fs.ops, op)(x, shifts, stride)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    out.backward(g)
    return out.detach(), x.grad, shifts.grad


@pytest.mark.parametrize("op", ["shift2d", "sparse_shift2d", "relu_sparse_shift2d", "active_shift2d"])
@pytest.mark.parametrize("case", [c for c in CASES if c[3] == torch.float32][:6], ids=_case_id)
def test_public_ops_same_on_both_backends(kernels, monkeypatch, op, case):
    x, shifts, real, _ = _inputs(case)
    s = shifts if op == "shift2d" else real
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "cpp")
    assert backend.name_for(x) == "cpp"
    fast = _run_public(op, x, s, case[1])
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "reference")
    assert backend.name_for(x) == "reference"
    slow = _run_public(op, x, s, case[1])
    for a, b in zip(fast, slow):
        if a is None or b is None:
            assert a is None and b is None
        elif op == "active_shift2d" or a.shape == s.shape:  # bilinear values and shift gradients: rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        else:
            assert torch.equal(a, b)


def test_inplace_public_op_same_on_both_backends(kernels, monkeypatch):
    x = torch.randn(2, 20, 7, 6).contiguous(memory_format=torch.channels_last)
    shifts = fs.grouped_shifts(20)
    results = []
    for mode in ("cpp", "reference"):
        monkeypatch.setenv("FEWSHIFTS_BACKEND", mode)
        results.append(ops.shift2d_(x.clone(), shifts))
    assert torch.equal(*results)
    assert torch.equal(results[0], fs.shift2d(x, shifts))


# ----------------------------------------------------------------------------------------------
# the C++ registration of the operators (register_ops): same results as the ops' Python bodies

OP_NAMES = ("shift2d", "active_shift2d", "sparse_shift2d", "relu_sparse_shift2d")
BACKWARD_OPS = ("shift2d_backward", "active_shift2d_backward", "sparse_shift2d_backward",
                "relu_sparse_shift2d_backward")


def registered(name, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fewshifts::{name}", key)


def test_loading_the_kernels_registers_the_ops_for_cpu(kernels):
    assert all(registered(n, "CPU") and registered(n, "AutogradCPU") for n in OP_NAMES + BACKWARD_OPS)
    cpp.unregister_ops()
    try:
        assert not any(registered(n, "CPU") or registered(n, "AutogradCPU") for n in OP_NAMES + BACKWARD_OPS)
        x, shifts = torch.randn(2, 9, 5, 5), fs.grouped_shifts(9)
        assert torch.equal(fs.shift2d(x, shifts), reference.shift_forward(x, shifts, 1))  # the Python bodies
    finally:
        cpp.register_ops(kernels)
    assert registered("shift2d", "CPU")


def test_opcheck_on_the_registered_kernels(kernels):
    """torch.library's checks (schema, fake tensors, autograd registration, AOT dispatch) with the C++ CPU and
    AutogradCPU kernels in place."""
    assert registered("shift2d", "AutogradCPU")
    g = torch.Generator().manual_seed(3)
    for fmt, strides in ((torch.contiguous_format, (1, 2)), (torch.channels_last, (1,))):
        x = torch.randn(2, 9, 6, 5, dtype=torch.float64, generator=g).contiguous(memory_format=fmt)
        x.requires_grad_()
        real = (torch.rand(9, 2, dtype=torch.float64, generator=g) * 3 - 1.5).requires_grad_()
        for stride in strides:
            torch.library.opcheck(torch.ops.fewshifts.shift2d.default, (x, fs.grouped_shifts(9), stride))
            for name in OP_NAMES[1:]:
                torch.library.opcheck(getattr(torch.ops.fewshifts, name).default, (x, real, stride))


# shifts that the C++ preparation must treat as the Python bodies do: ties (to even), beyond the image (clamped),
# integer and float types
TRICKY_SHIFTS = [0.5, -0.5, 1.5, -1.5, 2.5, 0.49, -2.51, 1e6, -3e9, 7.0, -6.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_registered_ops_match_their_python_bodies(kernels, dtype, stride, layout):
    from fewshifts.ops import shift

    g = torch.Generator().manual_seed(stride)
    C = len(TRICKY_SHIFTS) // 2
    x = _layout(torch.randn(2, C, 7, 6, generator=g).to(dtype), layout)
    real = torch.tensor(TRICKY_SHIFTS).reshape(C, 2).to(dtype)
    integer = torch.tensor([[3, -1], [0, 2], [-9, 1], [1, 1], [-1, 0], [40, -40]], dtype=torch.int32)
    cases = [("shift2d", integer), ("shift2d", torch.round(real.double()).to(dtype))]
    cases += [(name, real) for name in OP_NAMES[1:]]
    for name, shifts in cases:
        out = getattr(torch.ops.fewshifts, name)(x, shifts, stride)
        assert torch.equal(out, shift.python_body(name, x, shifts, stride)), name
        grad = _layout(torch.randn(out.shape, generator=g).to(dtype), layout)
        if name == "shift2d":
            args = (grad, shifts, stride, x.shape[2], x.shape[3])
        else:
            args = (grad, x, shifts, stride)
        backward = f"{name}_backward"
        for a, b in zip(_as_tuple(getattr(torch.ops.fewshifts, backward)(*args)),
                        _as_tuple(shift.python_body(backward, *args))):
            assert torch.equal(a, b), backward


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_registered_ops_raise_the_python_errors(kernels, name, bad):
    x, shifts = torch.randn(1, 3, 4, 4), torch.zeros(3, 2)
    shifts[1, 0] = bad
    with pytest.raises(ValueError, match=r"shifts must be finite; non-finite values in channel\(s\) \[1\]"):
        getattr(torch.ops.fewshifts, name)(x, shifts, 1)


def test_reference_backend_runs_the_python_bodies_while_registered(kernels, monkeypatch):
    calls, original = [], reference.shift_forward

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(reference, "shift_forward", spy)
    x, shifts = torch.randn(2, 9, 5, 5), fs.grouped_shifts(9)
    for mode, expected in (("cpp", 0), ("auto", 0), ("reference", 1), ("Reference ", 2)):
        monkeypatch.setenv("FEWSHIFTS_BACKEND", mode)
        fs.shift2d(x, shifts)
        assert len(calls) == expected, mode


# ----------------------------------------------------------------------------------------------
# backend selection and fallback


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """cpp pointed at a missing source, with its cached module, error and operator registration cleared (restored
    afterwards)."""
    module = cpp._module
    cpp.unregister_ops()
    monkeypatch.setattr(cpp, "_SOURCES", (tmp_path / "missing.cpp",))
    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setattr(cpp, "_error", None)
    yield
    if module is not None:
        cpp.register_ops(module)


def test_fallback_warns_once_and_uses_reference(broken_build, monkeypatch):
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "auto")
    x, shifts = torch.randn(2, 9, 5, 5), fs.grouped_shifts(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fs.shift2d(x, shifts) for _ in range(3)]
        assert backend.name_for(x) == "reference"
    warned = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1, [str(w.message) for w in caught]
    assert "\n" not in str(warned[0].message) and "reference" in str(warned[0].message)
    for out in outs:
        assert torch.equal(out, reference.shift_forward(x, shifts, 1))


def test_forced_cpp_with_failing_build_raises(broken_build, monkeypatch):
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="FEWSHIFTS_BACKEND=cpp"):
        fs.shift2d(torch.randn(1, 9, 4, 4), fs.grouped_shifts(9))


def test_forced_reference_never_builds(broken_build, monkeypatch):
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs.active_shift2d(torch.randn(1, 3, 4, 4), torch.zeros(3, 2))
    assert cpp._module is None and cpp._error is None


def test_extension_name_follows_source_and_flags(kernels):
    """One compiled module per source text and flags: a changed source never loads an older build (the JIT cache
    alone rebuilds only when the source file is newer than the build, and pip keeps packaged file times)."""
    name = cpp.extension_name(b"kernels", ["-O3"])
    assert name.isidentifier() and name.startswith("fewshifts_shift_cpu_")
    assert name == cpp.extension_name(b"kernels", ["-O3"])
    assert name != cpp.extension_name(b"kernels2", ["-O3"])
    assert name != cpp.extension_name(b"kernels", ["-O3", "-march=native"])
    assert kernels.__name__ == cpp.extension_name(cpp.source_text(), cpp.compile_flags())


def test_stale_builds_are_pruned(kernels, tmp_path):
    """Loading the kernels marks their build as used and removes the other builds of them that nothing has used for
    STALE_BUILD_DAYS (torch's cache keeps every build: one per source change); recent builds, builds marked as used
    recently, and other extensions stay."""
    import time
    from pathlib import Path

    assert (Path(kernels.__file__).parent / ".fewshifts_last_used").exists()  # marked by cpp.load
    old = time.time() - (cpp.STALE_BUILD_DAYS + 1) * 86400

    def build(name, used_at=None, built_at=old):
        d = tmp_path / name
        d.mkdir()
        (d / f"{name}.so").write_bytes(b"\0")
        if used_at is not None:
            (d / ".fewshifts_last_used").touch()
            os.utime(d / ".fewshifts_last_used", (used_at, used_at))
        os.utime(d, (built_at, built_at))
        return d

    current = build("fewshifts_shift_cpu_aaaaaaaaaaaa")
    stale = build("fewshifts_shift_cpu_bbbbbbbbbbbb")
    stale_marked = build("fewshifts_shift_cpu_cccccccccccc", used_at=old)
    used = build("fewshifts_shift_cpu_dddddddddddd", used_at=time.time())
    fresh = build("fewshifts_shift_cpu_eeeeeeeeeeee", built_at=time.time())
    other = build("someone_elses_extension")
    assert sorted(cpp.prune_stale_builds(current)) == [stale, stale_marked]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(d.name for d in (current, used, fresh, other))
    assert (current / ".fewshifts_last_used").stat().st_mtime > old
    assert sorted(cpp.prune_stale_builds(current, days=0)) == [used, fresh]
    assert sorted(p.name for p in tmp_path.iterdir()) == [current.name, other.name]


def test_bad_backend_value_raises(monkeypatch):
    monkeypatch.setenv("FEWSHIFTS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FEWSHIFTS_BACKEND"):
        fs.shift2d(torch.randn(1, 9, 4, 4), fs.grouped_shifts(9))


def test_vector_width_follows_the_cpu(kernels, monkeypatch):
    """The kernels' vectors are 64 bytes where they were compiled for an AVX-512 CPU (-march=native), else 32;
    FEWSHIFTS_VECTOR_BYTES picks 32 or 64 for the build, and any other value is refused with the variable named."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = os.environ.get("FEWSHIFTS_NATIVE", "1") == "1"
    default = 64 if native and " avx512f" in cpuinfo else 32
    assert kernels.vector_bytes() == int(os.environ.get("FEWSHIFTS_VECTOR_BYTES", default))
    monkeypatch.setenv("FEWSHIFTS_VECTOR_BYTES", "32")
    assert "-DFEWSHIFTS_VECTOR_BYTES=32" in cpp.compile_flags()
    monkeypatch.setenv("FEWSHIFTS_VECTOR_BYTES", "16")
    with pytest.raises(ValueError, match="FEWSHIFTS_VECTOR_BYTES should be 32 or 64"):
        cpp.compile_flags()


# Builds of the kernels that a machine does not use by default, by the environment that selects them.
OTHER_BUILDS = {
    "32-byte vectors": {"FEWSHIFTS_VECTOR_BYTES": "32"},
    "generic vectors": {"FEWSHIFTS_NATIVE": "0"},
}


@pytest.mark.slow
@pytest.mark.parametrize("build", list(OTHER_BUILDS))
def test_other_builds_pass_this_file(kernels, build):
    """This file's other tests, in a child process, on a build of the kernels that this machine does not run by
    default: 32-byte vectors where the default is 64 (an AVX-512 CPU; the AVX2 code most x86 CPUs run), and the
    generic vector code of a build without -march=native (what a CPU without AVX2 gets). The child builds its own
    module (named by source and flags, cached like the default one: about a minute the first time)."""
    import subprocess
    import sys

    env = OTHER_BUILDS[build]
    if build == "32-byte vectors" and kernels.vector_bytes() != 64:
        pytest.skip("32-byte vectors are this machine's default build")
    child = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FEWSHIFTS_"))}
    child.update(env, OMP_NUM_THREADS="1")  # one thread, as each xdist worker runs
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", __file__],
        env=child,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"{build}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, f"{build}: the child's build failed? {summary}"
