"""Pieces shared by every model family: the classifier interface, spatial-op factory, conv + BN."""

from __future__ import annotations

from torch import Tensor, nn

from fewshifts.layers import ActiveShift2d, GroupedShift2d, SparseShift2d

SPATIAL_KINDS = ("grouped", "active", "sparse", "none", "dw")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without going more than 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} should be one of {tuple(choices)} instead of {value!r}")


def make_spatial(kind: str, channels: int, stride: int = 1, kernel_size: int = 3, connectivity: int = 8) -> nn.Module:
    """The spatial operator of a block: a shift layer (``grouped``/``active``/``sparse``), a 3x3 depthwise
    conv (``dw``), or nothing (``none``: the block is 1x1 convolutions only)."""
    check_choice("shift", kind, SPATIAL_KINDS)
    if kind == "grouped":
        return GroupedShift2d(channels, kernel_size, connectivity, stride=stride)
    if kind == "active":
        return ActiveShift2d(channels, stride=stride)
    if kind == "sparse":
        return SparseShift2d(channels, stride=stride)
    if kind == "dw":
        return nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels, bias=False)
    return nn.Identity() if stride == 1 else nn.AvgPool2d(1, stride)


class ConvBN(nn.Sequential):
    """Convolution (no bias) + BatchNorm (+ activation)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act_layer: type[nn.Module] | None = None, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
                  norm_layer(cout)]
        if act_layer is not None:
            layers.append(act_layer(inplace=True))
        super().__init__(*layers)


class Classifier(nn.Module):
    """The common model interface (timm): ``forward_features`` -> ``forward_head`` (GAP, dropout, fc).

    Subclasses set ``num_features`` and call :meth:`init_head`, and implement ``forward_features``.
    """

    num_features: int
    default_cfg: dict

    def init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer by a fresh one with ``num_classes`` outputs (0: identity, features only)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes should be a non-negative integer instead of {num_classes!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def cfg(input_size=(3, 224, 224), paper: str = "", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        **extra) -> dict:
    """A model's default configuration: input size, normalisation, paper reference, paper numbers."""
    return dict(input_size=input_size, mean=mean, std=std, paper=paper, **extra)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
