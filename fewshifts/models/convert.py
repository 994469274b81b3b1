"""``convert``: ASL's deconstruction of a spatial convolution into a shift followed by a 1x1 convolution.

ASL section 3 / 5: a K x K convolution is replaced by a shift layer (each input channel moved by its
own displacement) and a pointwise convolution, which does the channel mixing the K x K kernel did.
This is how the 4-connected shift ResNets of Brown et al. are built from ResNet-101.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from fewshifts.models.common import check_choice, make_spatial

__all__ = ["convert", "ConvertReport", "Replacement"]

SHIFT_KINDS = ("sparse", "active", "grouped")


@dataclass
class Replacement:
    """One convolution replaced by :func:`convert`."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        k, s = "x".join(map(str, self.kernel_size)), "x".join(map(str, self.stride))
        text = (f"{self.name}: {k} conv {self.in_channels}->{self.out_channels} (stride {s}, groups {self.groups})"
                f" -> shift + 1x1 conv; params {self.params_before} -> {self.params_after}")
        return text + "".join(f"; note: {n}" for n in self.notes)


@dataclass
class ConvertReport:
    """What :func:`convert` replaced (``replaced`` empty: the model had no spatial convolution)."""

    shift: str
    connectivity: int
    replaced: list[Replacement]
    excluded: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        if not self.replaced:
            return ("convert: nothing replaced: the model has no convolution with a kernel larger than 1x1"
                    + (f" outside {self.excluded}" if self.excluded else "") + "; it is returned unchanged")
        saved = sum(r.params_before - r.params_after for r in self.replaced)
        lines = [f"convert: replaced {len(self.replaced)} convolution(s) by {self.shift} shift + 1x1 conv"
                 f" ({saved} parameters fewer)"]
        lines += [f"  {r}" for r in self.replaced]
        if self.excluded:
            lines.append(f"  left unchanged (excluded): {', '.join(self.excluded)}")
        return "\n".join(lines)


def _is_excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def _deconstruct(conv: nn.Conv2d, shift: str, connectivity: int) -> tuple[nn.Sequential, list[str]]:
    """shift layer (stride 1 or 2 goes on the shift) + 1x1 conv keeping ``groups``, bias, device and dtype."""
    notes = []
    kh, kw = conv.kernel_size
    stride = conv.stride[0] if conv.stride[0] == conv.stride[1] and conv.stride[0] in (1, 2) else 1
    conv_stride = 1 if stride == conv.stride[0] else conv.stride
    if conv_stride != 1:
        notes.append(f"stride {conv.stride} kept on the 1x1 conv")
    if conv.padding != (kh // 2, kw // 2) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        notes.append(f"padding {conv.padding} / dilation {conv.dilation} / {conv.padding_mode!r} padding not kept: "
                     "the output has the 'same' size for its stride")
    kernel = max(kh, kw) | 1  # odd
    spatial = make_spatial(shift, conv.in_channels, stride, kernel, connectivity)
    pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv_stride, groups=conv.groups,
                          bias=conv.bias is not None)
    factory = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    return nn.Sequential(spatial.to(**factory), pointwise.to(**factory)), notes


def convert(model: nn.Module, shift: str = "sparse", connectivity: int = 8, exclude: Iterable[str] = (),
            inplace: bool = False) -> tuple[nn.Module, ConvertReport]:
    """Replace every K x K ``nn.Conv2d`` (K > 1; dense, grouped or depthwise; any stride) by shift + 1x1 conv.

    ASL's deconstruction (section 3): the shift layer (``'sparse'`` SSL, ``'active'`` ASL, ``'grouped'``
    ShiftNet with the conv's kernel size and ``connectivity`` 8 or 4) moves each input channel; the 1x1
    conv keeps the conv's channels, ``groups`` and bias, so a depthwise conv becomes shift + a per-channel
    1x1 conv (the pointwise conv that follows it in a separable block already mixes channels). A stride of
    1 or 2 goes on the shift layer (same output grid as the padded conv), other strides on the 1x1 conv.
    The new 1x1 convs are freshly initialised. ``exclude`` names submodules left alone (e.g. ``('stem',)``).

    Returns ``(converted_model, report)``; the input model is copied unless ``inplace=True``. The copy
    no longer records a ``create_model`` spec (``save_model`` needs one), as it is no registered model.
    """
    check_choice("shift", shift, SHIFT_KINDS)
    if connectivity not in (4, 8) or isinstance(connectivity, bool):
        raise ValueError(f"connectivity should be 4 or 8 instead of {connectivity!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model should be an nn.Module instead of {type(model).__name__}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    names = dict(model.named_modules())
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"exclude names no submodule of the model: {unknown}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and not _is_excluded(name, exclude)]
    report = ConvertReport(shift, connectivity, [], list(exclude))
    if not targets:
        return model, report
    if not inplace:
        model = copy.deepcopy(model)
        names = dict(model.named_modules())
    if hasattr(model, "model_spec"):
        del model.model_spec
    for name, old in targets:
        old = names[name]
        new, notes = _deconstruct(old, shift, connectivity)
        if not name:  # the model is itself a convolution
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(names[parent_name] if parent_name else model, child, new)
        report.replaced.append(Replacement(
            name, old.in_channels, old.out_channels, tuple(old.kernel_size), tuple(old.stride), old.groups,
            sum(p.numel() for p in old.parameters()), sum(p.numel() for p in new.parameters()), notes))
    return model, report
