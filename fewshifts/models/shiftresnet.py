"""CIFAR ResNets and ShiftResNets (ShiftNet's CSC module; SSL paper Tab. 1, design.md section 2).

ShiftResNet block: 1x1 conv (in -> in*e) - BN - ReLU - shift - 1x1 conv (in*e -> out, stride) - BN,
plus the shortcut (identity, or strided 1x1 conv + BN), ReLU after the add. ResNet block: two 3x3 convs.
"""

from __future__ import annotations

from torch import Tensor, nn

from fewshifts.models.common import (
    CIFAR_MEAN,
    CIFAR_STD,
    Classifier,
    ConvBN,
    cfg,
    check_choice,
    check_positive,
    expand_spatial,
    make_spatial,
    shortcut,
)
from fewshifts.models.registry import register_model

__all__ = ["CifarResNet", "BasicBlock", "CSCBlock"]


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv - BN - ReLU - 3x3 conv - BN, + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride, act_layer=nn.ReLU)
        self.conv2 = ConvBN(cout, cout, 3)
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class CSCBlock(nn.Module):
    """ShiftNet's Conv-Shift-Conv residual block with a configurable spatial operator (``shift``)."""

    def __init__(self, cin: int, cout: int, stride: int, shift: str = "sparse", expansion: int = 6,
                 mid_width: str = "input") -> None:
        super().__init__()
        check_choice("mid_width", mid_width, ("input", "output"))
        check_positive("expansion", expansion)
        mid = (cin if mid_width == "input" else cout) * expansion
        self.expand = ConvBN(cin, mid, 1, act_layer=nn.ReLU)
        self.shift = make_spatial(shift, mid)
        self.project = ConvBN(mid, cout, 1, stride)
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.project(expand_spatial(self.expand, self.shift, x)) + self.shortcut(x))


class CifarResNet(Classifier):
    """3-stage CIFAR ResNet (widths 16/32/64, stride 2 at stages 2 and 3), n = (depth - 2) / 6 blocks a stage."""

    def __init__(self, depth: int = 20, block: str = "csc", num_classes: int = 10, in_chans: int = 3,
                 base_width: int = 16, drop_rate: float = 0.0, **block_kwargs) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth should be 6n + 2 (20, 56, 110, ...) instead of {depth!r}")
        check_positive("base_width", base_width)
        check_choice("block", block, ("basic", "csc"))
        block_cls = BasicBlock if block == "basic" else CSCBlock
        n = (depth - 2) // 6
        widths = [base_width, 2 * base_width, 4 * base_width]
        self.stem = ConvBN(in_chans, widths[0], 3, act_layer=nn.ReLU)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(block_cls(cin, w, 2 if (i > 0 and j == 0) else 1, **block_kwargs))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.init_head(cin, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


def _cifar_cfg(**paper) -> dict:
    return cfg((3, 32, 32), "Wu et al. 2018 (ShiftNet); Chen et al. 2019 (SSL) Tab. 1", CIFAR_MEAN, CIFAR_STD,
               num_classes=10, **(dict(paper, paper_table="SSL Tab. 1") if paper else {}))


def _resnet(depth: int, paper: dict, **kwargs) -> CifarResNet:
    model = CifarResNet(depth, block="basic", **kwargs)
    model.default_cfg = _cifar_cfg(**paper)
    return model


def _shiftresnet(depth: int, paper: dict, shift: str = "sparse", expansion: int = 6, **kwargs) -> CifarResNet:
    model = CifarResNet(depth, block="csc", shift=shift, expansion=expansion, **kwargs)
    model.default_cfg = _cifar_cfg(**(paper if shift != "dw" and expansion == 6 else {}))
    return model


@register_model
def resnet20(**kwargs) -> CifarResNet:
    return _resnet(20, dict(paper_params=0.27e6, paper_madds=40.5e6), **kwargs)


@register_model
def resnet56(**kwargs) -> CifarResNet:
    return _resnet(56, dict(paper_params=0.86e6, paper_madds=125.5e6), **kwargs)


@register_model
def resnet110(**kwargs) -> CifarResNet:
    return _resnet(110, {}, **kwargs)


@register_model
def shiftresnet20(**kwargs) -> CifarResNet:
    return _shiftresnet(20, dict(paper_params=0.16e6, paper_madds=26.5e6), **kwargs)


@register_model
def shiftresnet56(**kwargs) -> CifarResNet:
    return _shiftresnet(56, dict(paper_params=0.55e6, paper_madds=83e6), **kwargs)


@register_model
def shiftresnet110(**kwargs) -> CifarResNet:
    return _shiftresnet(110, {}, **kwargs)
