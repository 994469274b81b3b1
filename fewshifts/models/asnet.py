"""Active Shift Layer networks (Jeon & Kim 2018): ASNet for CIFAR (ASL Tab. 3) and AS-ResNet for ImageNet
(ASL Tab. 5/6; design.md section 2).

Both are pre-activation residual networks of one block, BN-ReLU-1x1 conv-BN-ReLU-ASL-1x1 conv
(section 4.1), whose only spatial convolution is the stem; a block that downsamples puts the stride
on its shift layer (Fig. 3: "stage2/shift1") and has a strided 1x1 projection shortcut.
"""

from __future__ import annotations

from torch import Tensor, nn

from fewshifts.models.common import (
    CIFAR_MEAN,
    CIFAR_STD,
    Classifier,
    cfg,
    check_positive,
    init_weights,
    make_spatial,
)
from fewshifts.models.registry import register_model

__all__ = ["PreActShiftNet", "PreActShiftBlock"]


class PreActShiftBlock(nn.Module):
    """BN-ReLU-1x1 conv (in -> mid)-BN-ReLU-shift (stride)-1x1 conv (mid -> out), + shortcut (ASL section 4.1).

    The shortcut is the identity, or a strided 1x1 conv of the pre-activated input when the shape changes.
    """

    def __init__(self, cin: int, cout: int, stride: int, mid: int, shift: str = "active",
                 act_layer: type[nn.Module] = nn.ReLU, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.norm1 = norm_layer(cin)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = norm_layer(mid)
        self.act2 = act_layer(inplace=True)
        self.shift = make_spatial(shift, mid, stride)
        self.conv2 = nn.Conv2d(mid, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.shift(self.act2(self.norm2(self.conv1(x))))) + shortcut


class PreActShiftNet(Classifier):
    """Stem conv (the only spatial conv), stages of :class:`PreActShiftBlock`, BN-ReLU, GAP, fc.

    ``stages`` lists (output width, blocks, stride); a block's middle width is ``expansion`` x its output width.
    """

    def __init__(self, stages: list[tuple[int, int, int]], stem_width: int, stem_stride: int = 1,
                 expansion: int = 1, shift: str = "active", num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        check_positive("expansion", expansion)
        self.stem = nn.Conv2d(in_chans, stem_width, 3, stem_stride, 1, bias=False)
        stage_list, cin = [], stem_width
        for width, n, stride in stages:
            blocks = []
            for j in range(n):
                blocks.append(PreActShiftBlock(cin, width, stride if j == 0 else 1, width * expansion, shift))
                cin = width
            stage_list.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stage_list)
        self.norm = nn.BatchNorm2d(cin)
        self.act = nn.ReLU(inplace=True)
        self.init_head(cin, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.stages(self.stem(x))))


# ASL Tab. 3: (depth, base width, expansion) -> params
_ASNET_PAPER = {(20, 16, 1): 0.035e6, (20, 16, 3): 0.1e6, (20, 16, 6): 0.19e6, (20, 16, 9): 0.28e6,
                (20, 46, 1): 0.28e6, (110, 16, 6): 1.2e6, (20, 88, 1): 0.99e6}


def _create_asnet(depth: int, base_width: int = 16, expansion: int = 6, shift: str = "active",
                  **kwargs) -> PreActShiftNet:
    """ASNet-depth (ASL Tab. 3): widths w/2w/4w, (depth - 2) / 6 blocks a stage, depth counted without shifts."""
    check_positive("base_width", base_width)
    n = (depth - 2) // 6
    stages = [(base_width, n, 1), (2 * base_width, n, 2), (4 * base_width, n, 2)]
    model = PreActShiftNet(stages, base_width, 1, expansion, shift, **kwargs)
    params = _ASNET_PAPER.get((depth, base_width, expansion))
    paper = dict(paper_params=params, paper_table="ASL Tab. 3") if params and shift == "active" else {}
    model.default_cfg = cfg((3, 32, 32), "Jeon & Kim 2018 (ASL) Tab. 3", CIFAR_MEAN, CIFAR_STD, num_classes=10,
                            **paper)
    return model


@register_model
def asnet20(**kwargs) -> PreActShiftNet:
    """ASNet-20 (ASL Tab. 3); default (w, e) = (16, 6): 0.19M params. Other rows: ``base_width``, ``expansion``."""
    return _create_asnet(20, **kwargs)


@register_model
def asnet56(**kwargs) -> PreActShiftNet:
    return _create_asnet(56, **kwargs)


@register_model
def asnet110(**kwargs) -> PreActShiftNet:
    """ASNet-110 (ASL Tab. 3): (w, e) = (16, 6), 1.2M params."""
    return _create_asnet(110, **kwargs)


def _create_as_resnet(w: int, paper: dict, shift: str = "active", **kwargs) -> PreActShiftNet:
    """AS-ResNet-w (ASL Tab. 6): 3x3 conv s2 (w); basic blocks x1 (w), x3 (w, s2), x4 (2w, s2), x6 (4w, s2),
    x3 (8w, s2); middle width = output width."""
    stages = [(w, 1, 1), (w, 3, 2), (2 * w, 4, 2), (4 * w, 6, 2), (8 * w, 3, 2)]
    model = PreActShiftNet(stages, w, 2, 1, shift, **kwargs)
    model.default_cfg = cfg(paper="Jeon & Kim 2018 (ASL) Tab. 5/6", num_classes=1000,
                            **(dict(paper, paper_table="ASL Tab. 5") if shift == "active" else {}))
    return model


@register_model
def as_resnet_w32(**kwargs) -> PreActShiftNet:
    """AS-ResNet-w32 (ASL Tab. 5): 0.9M params, 171M MAdds."""
    return _create_as_resnet(32, dict(paper_params=0.9e6, paper_madds=171e6), **kwargs)


@register_model
def as_resnet_w50(**kwargs) -> PreActShiftNet:
    """AS-ResNet-w50 (ASL Tab. 5): 1.96M params, 404M MAdds."""
    return _create_as_resnet(50, dict(paper_params=1.96e6, paper_madds=404e6), **kwargs)


@register_model
def as_resnet_w68(**kwargs) -> PreActShiftNet:
    """AS-ResNet-w68 (ASL Tab. 5): 3.42M params, 729M MAdds."""
    return _create_as_resnet(68, dict(paper_params=3.42e6, paper_madds=729e6), **kwargs)
