"""FE-Net (Chen et al. 2019, "All you need is a few shifts", SSL paper section 4.3, Tab. 4; design.md section 2).

Inverted-bottleneck units (:class:`~fewshifts.models.common.InvertedResidual`) whose only spatial operator
is a Sparse Shift Layer ("IB-SSL", Fig. 4a/b) or a 2x2 average pool ("IB-Pool", Fig. 4c), arranged in
FE-Blocks (Fig. 3, Eq. 8). Middle width = in_channels x t (design.md: this reproduces Tab. 5's MAdds).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from fewshifts.models.common import (
    SE_PLACES,
    Classifier,
    ConvBN,
    InvertedResidual,
    cfg,
    check_choice,
    check_positive,
    init_weights,
    make_divisible,
)
from fewshifts.models.registry import register_model

__all__ = ["FENet", "FEBlock"]

# (operator, t, n, c, s) of SSL Tab. 4 after the 3x3 stem (16 channels, stride 2); "ib" is a single unit
FENET_ARCH = (
    ("ib", 4, 1, 16, 1),
    ("ib", 5, 1, 32, 2),
    ("fe", 6, 3, 64, 2),
    ("fe", 6, 4, 128, 2),
    ("fe", 6, 4, 128, 1),
    ("fe", 6, 4, 256, 2),
    ("fe", 6, 3, 256, 1),
)
FENET_STEM, FENET_HEAD = 16, 1380


class FEBlock(nn.Module):
    """Fully-Exploited block (SSL Fig. 3, Eq. 8) of n units over an input split into 2^(n-1) parts of G channels.

    Unit l = 1..n-1 is a residual IB-SSL on the *last* G * 2^(l-1) channels; its output replaces them
    (``O = I_2 || f(I_1)``) while the other channels pass untouched. Unit n works on all channels: an
    IB-SSL that changes the width (stride 1) or an IB-Pool (stride 2).

    Each unit is its own module in ``self.units`` and :meth:`mix` is the only place that splits and
    concatenates, so an inference version can replace it by writing ``f(I_1)`` back into ``x[:, -c:]``
    in place (section 4.3).
    """

    def __init__(self, cin: int, cout: int, num_units: int, stride: int, unit: type[nn.Module] | partial) -> None:
        super().__init__()
        parts = 2 ** (num_units - 1)
        if cin % parts:
            raise ValueError(f"FE-Block with {num_units} units needs in_channels divisible by {parts}, got {cin}")
        group = cin // parts
        self.mixed_channels = [group * 2**i for i in range(num_units - 1)]
        units = [unit(c, c, 1) for c in self.mixed_channels]
        units.append(unit(cin, cout, stride))
        self.units = nn.ModuleList(units)

    @staticmethod
    def mix(x: Tensor, unit: nn.Module, channels: int) -> Tensor:
        """``x[:, :-channels] || unit(x[:, -channels:])`` (Eq. 8)."""
        keep, active = x.split([x.shape[1] - channels, channels], dim=1)
        return torch.cat([keep, unit(active)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        for unit, channels in zip(self.units, self.mixed_channels):
            x = self.mix(x, unit, channels)
        return self.units[-1](x)


class FENet(Classifier):
    """FE-Net (SSL Tab. 4): 3x3 conv s2 + BN, IB-SSL, IB-Pool, five FE-Blocks, 1x1 conv 1380 * w + BN + ReLU,
    GAP, dropout 0.2, fc.

    ``spatial='shift'`` uses Sparse Shift Layers, ``'dw'`` 3x3 depthwise conv + BN + ReLU in their place
    (Tab. 6). ``se='v1'|'v2'`` adds SE at the unit output or in the expanded part (Fig. 7, Tab. 7).
    Channel counts are c * width rounded to a multiple of the parts the next FE-Block splits them into
    (1.375x: 22/44/88/176/352, which gives Tab. 5's 563M MAdds; rounding to multiples of 8 gives 595M).
    SE reduction ratio 1/8 reproduces Tab. 7 (1/4 would give 10.7M params for SE v2, not 8.2M).
    ``small_input=True`` (28x28 / 32x32 inputs): stem stride 1 and the first IB-Pool becomes a
    stride-1 IB-SSL, so the total stride is 8 instead of 32 (28x28 -> 4x4 features).
    """

    def __init__(self, width: float = 1.0, spatial: str = "shift", se: str | None = None, num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.2, small_input: bool = False, se_ratio: float = 0.125,
                 arch=FENET_ARCH) -> None:
        super().__init__()
        check_positive("width", width, integer=False)
        check_choice("spatial", spatial, ("shift", "dw"))
        check_choice("se", se, SE_PLACES)
        unit_spatial = "sparse" if spatial == "shift" else "dw"

        def unit(cin: int, cout: int, stride: int, t: float) -> InvertedResidual:
            return InvertedResidual(cin, cout, stride, t, "pool" if stride == 2 else unit_spatial, se, se_ratio)

        # channels: c * width rounded to a multiple of the parts the next FE-Block splits them into (at least 2)
        divisors = [2 ** (n - 1) if op == "fe" else 2 for op, _, n, _, _ in arch[1:]] + [2]
        first_stride = 1 if small_input else 2
        cin = make_divisible(FENET_STEM * width, 2)
        self.stem = ConvBN(in_chans, cin, 3, first_stride)
        blocks = []
        for i, (op, t, n, c, s) in enumerate(arch):
            cout = make_divisible(c * width, max(2, divisors[i]))
            stride = 1 if small_input and i == 1 else s
            if op == "ib":
                blocks.append(unit(cin, cout, stride, t))
            else:
                blocks.append(FEBlock(cin, cout, n, stride, partial(unit, t=t)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        head = round(FENET_HEAD * width)
        self.head = ConvBN(cin, head, 1, act_layer=nn.ReLU)
        self.init_head(head, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


# SSL Tab. 5 / Tab. 7 (MAdds, params) of the paper configurations
_PAPER = {
    (1.0, None): dict(paper_madds=301e6, paper_params=3.7e6, paper_table="SSL Tab. 5"),
    (1.375, None): dict(paper_madds=563e6, paper_params=5.9e6, paper_table="SSL Tab. 5"),
    (1.375, "v1"): dict(paper_madds=564e6, paper_params=6.1e6, paper_table="SSL Tab. 7"),
    (1.375, "v2"): dict(paper_madds=566e6, paper_params=8.2e6, paper_table="SSL Tab. 7"),
}


def _create_fenet(width: float, spatial: str = "shift", se: str | None = None, **kwargs) -> FENet:
    model = FENet(width, spatial, se, **kwargs)
    paper = _PAPER.get((width, se), {}) if spatial == "shift" and not kwargs.get("small_input") else {}
    model.default_cfg = cfg(paper="Chen et al. 2019 (SSL / FE-Net) Tab. 4", num_classes=1000, **paper)
    return model


@register_model
def fenet_100(**kwargs) -> FENet:
    """FE-Net 1.0x (SSL Tab. 4/5): 301M MAdds, 3.7M params in the paper."""
    return _create_fenet(**dict(dict(width=1.0), **kwargs))


@register_model
def fenet_1375(**kwargs) -> FENet:
    """FE-Net 1.375x (SSL Tab. 5): 563M MAdds, 5.9M params; with ``se='v2'`` 566M / 8.2M (Tab. 7)."""
    return _create_fenet(**dict(dict(width=1.375), **kwargs))
