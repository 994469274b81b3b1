"""Bottleneck ResNet-50/101 and the 4-connected shift ResNets (Brown et al. 2019, ``four-connected-shift-resnet.md``;
design.md section 2), for ImageNet and, with a ``_cifar`` suffix, CIFAR-100.

- ``resnet50`` / ``resnet101``: He et al. bottleneck ResNets (stride on the 3x3 conv, as torchvision).
  The CIFAR versions have a 3x3 conv 16 stem and 3 stages (bottleneck widths 16/32/64, outputs
  64/128/256) of (depth - 2) / 3 blocks spread evenly, the remainder to the first stages
  (ResNet-101: 11/11/11, ResNet-50: 6/5/5).
- ``shift_resnet101``: ResNet-101 whose 3x3 convs are replaced by shift + 1x1 conv through
  :func:`~fewshifts.models.convert.convert` ("single shift"; the stem stays a convolution), with
  ``variant='multi'`` also a shift before the reducing and expanding 1x1 convs, and ``variant='flat'``
  the bottleneck removed: one shift + 1x1 conv (full width) per residual block, 33 blocks (35 layers).
  ``connectivity=4`` shifts to the centre and up/down/left/right only; ``shift='grouped'`` (default,
  fixed shifts as in the slides), ``'sparse'`` or ``'active'``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from fewshifts.models.common import (
    Classifier,
    ConvBN,
    cfg,
    check_choice,
    init_weights,
    make_spatial,
    shortcut,
)
from fewshifts.models.convert import convert
from fewshifts.models.registry import register_model

__all__ = ["ResNet", "Bottleneck", "FlatShiftBlock"]


class Bottleneck(nn.Module):
    """1x1 conv (reduce) - BN - ReLU - 3x3 conv (stride) - BN - ReLU - 1x1 conv (expand x4) - BN, + shortcut, ReLU.

    ``pre_shift(channels)`` (multi shift) puts a shift layer before the reducing and expanding 1x1 convs.
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, pre_shift: Callable[[int], nn.Module] | None = None):
        super().__init__()
        cout = width * self.expansion
        self.shift1 = pre_shift(cin) if pre_shift else nn.Identity()
        self.conv1 = ConvBN(cin, width, 1, act_layer=nn.ReLU)
        self.conv2 = ConvBN(width, width, 3, stride, act_layer=nn.ReLU)
        self.shift3 = pre_shift(width) if pre_shift else nn.Identity()
        self.conv3 = ConvBN(width, cout, 1)
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.shift3(self.conv2(self.conv1(self.shift1(x)))))
        return self.act(y + self.shortcut(x))


class FlatShiftBlock(nn.Module):
    """Flattened shift block (Brown et al., "removing the bottleneck"): shift - 1x1 conv (in -> 4 x width) - BN,
    + shortcut, ReLU.

    A downsampling block runs its 1x1 conv at the input resolution and moves its output with a stride-2
    shift (shifts on both sides of the conv, as in multi shift): this reproduces the slides' 7.72G
    MAdds; a stride-2 shift before the conv would give 6.8G.
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, shift: str = "grouped", connectivity: int = 8):
        super().__init__()
        cout = width * self.expansion
        self.shift = make_spatial(shift, cin, connectivity=connectivity)
        self.conv = ConvBN(cin, cout, 1)
        self.down = make_spatial(shift, cout, stride, connectivity=connectivity) if stride != 1 else nn.Identity()
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU(inplace=True)
        self.out_channels = cout

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.down(self.conv(self.shift(x))) + self.shortcut(x))


class ResNet(Classifier):
    """ResNet of residual ``block(cin, width, stride)`` stages; ``stem='imagenet'`` (7x7 conv s2 64 + max pool,
    4 stages of widths 64..512) or ``'cifar'`` (3x3 conv 16, 3 stages of widths 16/32/64)."""

    def __init__(self, block: Callable[..., nn.Module], layers: tuple[int, ...], stem: str = "imagenet",
                 num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        check_choice("stem", stem, ("imagenet", "cifar"))
        if stem == "imagenet":
            cin, widths = 64, (64, 128, 256, 512)
            self.stem = nn.Sequential(ConvBN(in_chans, cin, 7, 2, act_layer=nn.ReLU), nn.MaxPool2d(3, 2, 1))
        else:
            cin, widths = 16, (16, 32, 64)
            self.stem = ConvBN(in_chans, cin, 3, act_layer=nn.ReLU)
        if len(layers) != len(widths):
            raise ValueError(f"layers should have {len(widths)} entries for the {stem} stem instead of {layers!r}")
        stages = []
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.init_head(cin, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


IMAGENET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def cifar_layers(depth: int) -> tuple[int, int, int]:
    """(depth - 2) / 3 bottleneck blocks over 3 stages, the remainder to the first: 101 -> 11/11/11, 50 -> 6/5/5."""
    blocks = (depth - 2) // 3
    return tuple(blocks // 3 + (1 if i < blocks % 3 else 0) for i in range(3))


# paper (params, MAdds) from the slides' tables ("FLOPs" there are MAdds: ResNet-101 7.80G)
_PAPER = {
    ("resnet", 50, False): (25.6e6, 4.09e9), ("resnet", 101, False): (44.6e6, 7.80e9),
    ("resnet", 50, True): (540e3, 78e6), ("resnet", 101, True): (1078e3, 154e6),
    ("single", 101, False): (25.6e6, 4.41e9), ("single", 101, True): (605e3, 85e6),
    ("multi", 101, False): (25.6e6, 4.41e9), ("multi", 101, True): (605e3, 85e6),
    ("flat", 101, False): (40.8e6, 7.72e9), ("flat", 101, True): (1068e3, 162e6),
}


def _set_cfg(model: ResNet, key: tuple[str, int, bool]) -> ResNet:
    params, madds = _PAPER[key]
    paper = "Brown et al. 2019 (4-connected shift ResNets), slides' tables; He et al. 2016"
    common = dict(paper=paper, paper_params=params, paper_madds=madds, paper_table="4-connected shift slides")
    if key[2]:
        model.default_cfg = cfg((3, 32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                                num_classes=100, **common)
    else:
        model.default_cfg = cfg(num_classes=1000, **common)
    return model


def _layers(depth: int, cifar: bool) -> tuple[int, ...]:
    return cifar_layers(depth) if cifar else IMAGENET_LAYERS[depth]


def _create_resnet(depth: int, cifar: bool, **kwargs) -> ResNet:
    model = ResNet(Bottleneck, _layers(depth, cifar), "cifar" if cifar else "imagenet", **kwargs)
    return _set_cfg(model, ("resnet", depth, cifar))


def _create_shift_resnet(depth: int, cifar: bool, variant: str = "single", connectivity: int = 8,
                         shift: str = "grouped", **kwargs) -> ResNet:
    check_choice("variant", variant, ("single", "multi", "flat"))
    check_choice("connectivity", connectivity, (4, 8))
    check_choice("shift", shift, ("grouped", "sparse", "active"))
    stem = "cifar" if cifar else "imagenet"
    if variant == "flat":
        model = ResNet(partial(FlatShiftBlock, shift=shift, connectivity=connectivity), _layers(depth, cifar), stem,
                       **kwargs)
    else:
        pre_shift = partial(make_spatial, shift, connectivity=connectivity) if variant == "multi" else None
        model = ResNet(partial(Bottleneck, pre_shift=pre_shift), _layers(depth, cifar), stem, **kwargs)
        model, _ = convert(model, shift, connectivity, exclude=("stem",), inplace=True)
    return _set_cfg(model, (variant, depth, cifar))


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (ImageNet): 25.6M params, 4.09G MAdds."""
    return _create_resnet(50, False, **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (ImageNet): 44.6M params, 7.80G MAdds."""
    return _create_resnet(101, False, **kwargs)


@register_model
def resnet50_cifar(**kwargs) -> ResNet:
    """ResNet-50 for CIFAR-100 (slides: 540K params, 78M MAdds)."""
    return _create_resnet(50, True, **kwargs)


@register_model
def resnet101_cifar(**kwargs) -> ResNet:
    """ResNet-101 for CIFAR-100 (slides: 1078K params, 154M MAdds)."""
    return _create_resnet(101, True, **kwargs)


@register_model
def shift_resnet101(**kwargs) -> ResNet:
    """Shift ResNet-101 (ImageNet; ``variant``, ``connectivity``, ``shift``): single/multi 25.6M / 4.41G,
    flat 40.8M / 7.72G."""
    return _create_shift_resnet(101, False, **kwargs)


@register_model
def shift_resnet101_cifar(**kwargs) -> ResNet:
    """Shift ResNet-101 for CIFAR-100: single/multi 605K / 85M, flat 1068K / 162M."""
    return _create_shift_resnet(101, True, **kwargs)
