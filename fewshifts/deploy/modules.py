"""Modules of the inference form: baked integer shifts, strided subsampling, FE-Block write-back."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshifts.ops import backend, shift2d, shift2d_
from fewshifts.ops.backend import name_for

__all__ = ["IntegerShift", "Subsample", "ConvAct", "bilinear_kernel", "shift_runs", "write_back"]


def shift_runs(shifts: Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive channels with one displacement: (start, stop, dy, dx)."""
    runs: list[tuple[int, int, int, int]] = []
    for c, (dy, dx) in enumerate(shifts.tolist()):
        if runs and runs[-1][1] == c and runs[-1][2:] == (dy, dx):
            runs[-1] = (runs[-1][0], c + 1, dy, dx)
        else:
            runs.append((c, c + 1, dy, dx))
    return runs


def _shift_lowered(x: Tensor, runs: list[tuple[int, int, int, int]], stride: int) -> Tensor:
    """Integer shift written with standard operators only (Slice, Pad, Concat) for ONNX / torch.export."""
    height, width = x.shape[-2:]
    parts = []
    for start, stop, dy, dx in runs:
        part = x[:, start:stop]
        if dy or dx:
            dy, dx = max(-height, min(height, dy)), max(-width, min(width, dx))  # beyond the image: all zero
            part = F.pad(part, (max(-dx, 0), max(dx, 0), max(-dy, 0), max(dy, 0)))
            part = part[:, :, max(dy, 0): max(dy, 0) + height, max(dx, 0): max(dx, 0) + width]
        if stride != 1:
            part = part[:, :, ::stride, ::stride]
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _shift_inplace_runs(x: Tensor, runs: list[tuple[int, int, int, int]]) -> Tensor:
    """In-place stride-1 shift by slicing, one contiguous channel run at a time; unshifted runs are not touched.

    Each moved run goes through one temporary in the tensor's own memory order (no NCHW / NHWC transposes):
    the pure-PyTorch counterpart of :func:`fewshifts.ops.shift2d_` used when the C++ kernels are absent.
    """
    height, width = x.shape[-2:]
    for start, stop, dy, dx in runs:
        if not (dy or dx):
            continue
        # rows / cols as (source, destination) slices of the part that stays inside the image
        rows = (slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height - max(dy, 0)))
        cols = (slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width - max(dx, 0)))
        part = x[:, start:stop]
        if abs(dy) >= height or abs(dx) >= width:
            part.zero_()
            continue
        part[:, :, rows[1], cols[1]] = _clone_in_order(part[:, :, rows[0], cols[0]], x)
        if dy:
            part[:, :, slice(height - dy, None) if dy > 0 else slice(0, -dy)] = 0
        if dx:
            part[:, :, :, slice(width - dx, None) if dx > 0 else slice(0, -dx)] = 0
    return x


def _clone_in_order(region: Tensor, like: Tensor) -> Tensor:
    """A copy of ``region`` laid out in the memory order of ``like`` (channels-last stays channels-last)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return region.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)
    return region.clone(memory_format=torch.contiguous_format)


def _version(t: Tensor) -> int:
    """In-place modification counter of ``t`` (inference tensors have none: -1)."""
    return -1 if t.is_inference() else t._version


class IntegerShift(nn.Module):
    """A baked integer shift (SSL Eq. 1) in its fastest exact form.

    ``inplace``: shift the input's memory with :func:`fewshifts.ops.shift2d_`, touching only the channels
    whose shift is not (0, 0) (SSL section 4.3; stride 1 only). ``lowered``: standard operators only
    (for ONNX). Otherwise the out-of-place :func:`fewshifts.ops.shift2d`.
    """

    def __init__(self, shifts: Tensor, stride: int = 1, inplace: bool = False, lowered: bool = False) -> None:
        super().__init__()
        if inplace and (stride != 1 or lowered):
            raise ValueError("IntegerShift: inplace needs stride 1 and lowered=False")
        self.register_buffer("shifts", shifts.detach().long().cpu().clone())
        self.stride, self.inplace, self.lowered = stride, inplace, lowered
        self.runs = shift_runs(self.shifts)
        self._clamped: dict[tuple, Tensor] = {}  # (H, W, ...) -> shifts clamped to the image, for the kernel

    def forward(self, x: Tensor) -> Tensor:
        if self.lowered:
            return _shift_lowered(x, self.runs, self.stride)
        if self.inplace:
            kernels = self._direct_kernels(x)
            if kernels is not None and x.shape[1] == self._buffers["shifts"].shape[0]:
                # eager CPU inference: the C++ kernel without the custom-op dispatch
                kernels.shift_inplace(x, self._clamped_shifts(x.shape[2], x.shape[3]))
                return x
            if name_for(x) == "cpp":
                return shift2d_(x, self.shifts)
            return _shift_inplace_runs(x, self.runs)
        return shift2d(x, self.shifts, self.stride)

    def _direct_kernels(self, x: Tensor):
        """The C++ kernels when ``x`` is a plain CPU tensor in eager inference, else None (tracing, export,
        torch.compile, autograd and other backends go through :func:`fewshifts.ops.shift2d_`).

        The dispatch of the custom op costs about 0.1 ms a call, as much as the shift of a 14x14 feature map; the
        checks here are ordered cheapest first and the backend is looked up once per ``FEWSHIFTS_BACKEND`` value.
        """
        if type(x) is not Tensor or not x.is_cpu or x.dim() != 4 or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if not x.is_floating_point() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        mode = os.environ.get("FEWSHIFTS_BACKEND")
        cached = self.__dict__.get("_kernels")
        if cached is None or cached[0] != mode:
            kernels = backend.kernels_for(x)
            cached = self.__dict__["_kernels"] = (mode, None if kernels is backend.reference else kernels)
        return cached[1]

    def _clamped_shifts(self, height: int, width: int) -> Tensor:
        """The shifts clamped to the image (as :func:`fewshifts.ops.shift2d_` clamps them), cached per image size
        and buffer state (a reloaded or modified buffer is seen)."""
        shifts = self._buffers["shifts"]  # not self.shifts: nn.Module.__getattr__ costs about a microsecond
        key = (height, width, _version(shifts), shifts.data_ptr())
        clamped = self._clamped.get(key)
        if clamped is None:  # beyond the image the channel is all zero: same as shift2d_'s clamping
            limit = torch.tensor([height + 1, width + 1])
            clamped = self._clamped[key] = torch.maximum(torch.minimum(shifts, limit), -limit).contiguous()
        return clamped

    def __getstate__(self):  # copies and pickles look the kernels (a Python module) up again
        state = self.__dict__.copy()
        state.pop("_kernels", None)
        return state

    def extra_repr(self) -> str:
        shifted = sum(stop - start for start, stop, dy, dx in self.runs if dy or dx)
        mode = "inplace" if self.inplace else "lowered" if self.lowered else "out-of-place"
        return f"{len(self.shifts)}, shifted={shifted}, runs={len(self.runs)}, stride={self.stride}, {mode}"


class Subsample(nn.Module):
    """What a strided all-zero shift does: keep every ``stride``-th row and column."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride]

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def bilinear_kernel(shifts: Tensor) -> Tensor:
    """(C, 1, K, K) depthwise kernel holding the 4 bilinear weights of each channel's real shift (ASL Eq. 8-10).

    With padding K // 2 (and the layer's stride) the depthwise convolution equals the active shift exactly.
    """
    shifts = shifts.detach().double().cpu()
    floor = torch.floor(shifts)
    frac = shifts - floor
    floor = floor.long()
    radius = int(max(floor.abs().max(), (floor + 1).abs().max())) if len(shifts) else 0
    size = 2 * radius + 1
    kernel = torch.zeros(len(shifts), 1, size, size, dtype=torch.float64)
    a, b = frac[:, 0], frac[:, 1]
    channels = torch.arange(len(shifts))
    for oy, ox, w in ((0, 0, (1 - a) * (1 - b)), (0, 1, (1 - a) * b), (1, 0, a * (1 - b)), (1, 1, a * b)):
        kernel[channels, 0, floor[:, 0] + oy + radius, floor[:, 1] + ox + radius] += w
    return kernel


def write_back(base: Tensor, starts: tuple[int, ...], values: tuple[Tensor, ...],
               accumulate: tuple[bool, ...]) -> Tensor:
    """FE-Block write-back (SSL section 4.3): ``values[i]`` goes into ``base[:, starts[i]:...]`` in place
    (added when ``accumulate[i]``: a residual unit), so the untouched channels are never copied. Returns ``base``.
    """
    for start, value, add in zip(starts, values, accumulate):
        target = base.narrow(1, start, value.shape[1])
        if add:
            target.add_(value)
        elif value.data_ptr() != target.data_ptr() or value.stride() != target.stride():
            target.copy_(value)
    return base


_ONEDNN_ACTS = {"relu": ("relu", (None,)), "relu6": ("hardtanh", (0.0, 6.0)), None: ("none", ())}  # post-op, scalars
_MAX_PLANS = 4  # input shapes a ConvAct keeps a plan (and packed weights) for
_SLOW_CALL_S = 2e-3  # a call this long is dominated by arithmetic: the oneDNN form is kept without more timing
_ATEN_MARGIN = 0.85  # ATen's form is chosen when it takes at most this fraction of oneDNN's time


class ConvAct(nn.Module):
    """Convolution (+ ReLU / ReLU6 when ``act`` is given) in its fastest form for each input shape, on CPU.

    Two candidates: one oneDNN call with the activation as a post-op and the weights reordered once into
    oneDNN's blocked layout (given plain weights, oneDNN reorders them on every call: about a fifth of FE-Net's
    convolution time at batch 1), or ATen's ``conv2d`` followed by an in-place activation, whose fixed cost
    per call is several times lower (tens of microseconds against about 0.1 ms: it wins on small maps, 7x7 at
    batch 1). The first call with a new input shape times both (only when a call is short enough for that
    to matter) and keeps ATen's form only when it is clearly faster (near ties go to oneDNN); the plan and packed
    weights live beside the module, not in its state.

    Falls back to ``act(conv(x))`` off CPU, when oneDNN is not available, and under tracing / compilation.
    """

    def __init__(self, conv: nn.Conv2d, act: str | None = None) -> None:
        super().__init__()
        if act not in _ONEDNN_ACTS:
            raise ValueError(f"act should be one of {tuple(_ONEDNN_ACTS)} instead of {act!r}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ConvAct: the convolution should have zero padding given as numbers")
        self.conv, self.act = conv, act
        attr, scalars = _ONEDNN_ACTS[act]
        self._args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, attr, list(scalars))
        self._plans: dict[tuple, object] = {}

    def forward(self, x: Tensor) -> Tensor:
        if type(x) is Tensor and not (x.requires_grad and torch.is_grad_enabled()) and x.dtype == torch.float32 \
                and not x.is_cuda and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            w = self.conv.weight
            key = (x.shape, x.is_contiguous(), _version(w), w.data_ptr())
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plan(x, key)
            if plan is not False:
                return plan(x)
        return self._aten(x)

    def _aten(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.act is None:
            return y
        return F.relu(y) if self.act == "relu" else F.relu6(y)

    def _aten_inplace(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.act is None:
            return y
        return y.relu_() if self.act == "relu" else y.clamp_(0.0, 6.0)

    def _plan(self, x: Tensor, key: tuple):
        """The faster form for inputs like ``x`` (False: use ``conv`` + act as in eager mode)."""
        import time

        w = self.conv.weight
        plan = False
        if x.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            padding, stride, dilation, groups, attr, scalars = self._args
            try:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().to_mkldnn(), padding, stride,
                                                                  dilation, groups, list(x.shape))
            except (RuntimeError, NotImplementedError):  # a build without the reorder: plain weights
                packed = w.detach()
            bias = self.conv.bias

            def onednn(x: Tensor) -> Tensor:
                return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups,
                                                               attr, scalars, None)

            plan = onednn
            start = time.perf_counter()
            onednn(x)
            if time.perf_counter() - start < _SLOW_CALL_S:  # short calls: fixed costs matter, time both
                best = {}
                for _ in range(5):
                    for name, fn in (("onednn", onednn), ("aten", self._aten_inplace)):
                        start = time.perf_counter()
                        fn(x)
                        best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
                # ATen only when clearly faster: near ties went either way with the machine's load, so that the
                # same convolution got different forms in different models of one benchmark run
                plan = self._aten_inplace if best["aten"] < _ATEN_MARGIN * best["onednn"] else onednn
        if len(self._plans) >= _MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    @property
    def plan(self) -> dict[tuple, str]:
        """{input key: 'onednn' | 'aten'} chosen so far (for inspection)."""
        return {k: "aten" if v is False or getattr(v, "__name__", "") == "_aten_inplace" else "onednn"
                for k, v in self._plans.items()}

    def __getstate__(self):  # copies and pickles leave the plans behind (closures over opaque oneDNN tensors)
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    def extra_repr(self) -> str:
        return f"act={self.act}"
