"""MobileNetV2 (Sandler et al. 2018), the depthwise baseline of SSL Tab. 5/6 and ASL Tab. 5.

Written here because torchvision is not available with the CPU torch; same architecture as
torchvision/timm ``mobilenet_v2`` (channels through ``make_divisible(c * width, 8)``, last conv
``1280 * max(1, width)``, ReLU6, dropout 0.2).
"""

from __future__ import annotations

from torch import Tensor, nn

from fewshifts.models.common import (
    Classifier,
    ConvBN,
    InvertedResidual,
    cfg,
    check_positive,
    init_weights,
    make_divisible,
)
from fewshifts.models.registry import register_model

__all__ = ["MobileNetV2"]

# (t, c, n, s) of MobileNetV2 Tab. 2
MOBILENETV2_ARCH = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(Classifier):
    """MobileNetV2: 3x3 conv s2 (32), 17 inverted residuals, 1x1 conv 1280, GAP, dropout, fc.

    ``small_input=True`` (28x28 / 32x32 inputs): stem stride 1 and the first stride-2 stage (24 channels)
    stride 1, so the total stride is 8 instead of 32 (28x28 -> 4x4 features).
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2,
                 small_input: bool = False, act_layer: type[nn.Module] = nn.ReLU6, arch=MOBILENETV2_ARCH) -> None:
        super().__init__()
        check_positive("width", width, integer=False)
        cin = make_divisible(32 * width)
        self.stem = ConvBN(in_chans, cin, 3, 1 if small_input else 2, act_layer=act_layer)
        blocks = []
        for i, (t, c, n, s) in enumerate(arch):
            cout = make_divisible(c * width)
            stride = 1 if small_input and i == 1 else s
            for j in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if j == 0 else 1, t, "dw", act_layer=act_layer))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = make_divisible(1280 * max(1.0, width))
        self.head = ConvBN(cin, head, 1, act_layer=act_layer)
        self.init_head(head, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def _create_mobilenetv2(name_width: float, paper: dict, width: float | None = None, **kwargs) -> MobileNetV2:
    width = name_width if width is None else width
    model = MobileNetV2(width, **kwargs)
    paper = paper if width == name_width and not kwargs.get("small_input") else {}
    model.default_cfg = cfg(paper="Sandler et al. 2018 (MobileNetV2); baseline of SSL Tab. 5 / ASL Tab. 5",
                            num_classes=1000, **paper)
    return model


@register_model
def mobilenetv2_100(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.0x: 300M MAdds, 3.4-3.5M params (SSL Tab. 5, ASL Tab. 5)."""
    return _create_mobilenetv2(1.0, dict(paper_madds=300e6, paper_params=3.47e6, paper_table="ASL Tab. 5"),
                               **kwargs)


@register_model
def mobilenetv2_140(**kwargs) -> MobileNetV2:
    """MobileNetV2 1.4x: 585M MAdds, 6.9M params in SSL Tab. 5 (the architecture has 6.1M, see docs/models.md)."""
    return _create_mobilenetv2(1.4, dict(paper_madds=585e6, paper_params=6.9e6, paper_table="SSL Tab. 5"),
                               **kwargs)
