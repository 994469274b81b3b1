"""Pieces shared by every model family: the classifier interface, spatial-op factory, conv + BN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshifts.layers import ActiveShift2d, GroupedShift2d, SparseShift2d
from fewshifts.ops import relu_sparse_shift2d

SPATIAL_KINDS = ("grouped", "active", "sparse", "none", "dw")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without going more than 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} should be one of {tuple(choices)} instead of {value!r}")


def check_positive(name: str, value, integer: bool = True) -> None:
    """torchvision-style check that ``value`` is a positive integer (or, with ``integer=False``, number)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < float("inf"):
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} should be {what} instead of {value!r}")


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


def expand_spatial(expand: nn.Module, spatial: nn.Module, x: Tensor) -> Tensor:
    """``spatial(expand(x))``: a block's expanding conv - BN - ReLU (:class:`ConvBN`) and its spatial operator.

    In training, when ``spatial`` is a :class:`~fewshifts.layers.SparseShift2d`, the ReLU runs inside the
    shift: :func:`~fewshifts.ops.relu_sparse_shift2d` (SSL Eq. 5-7 on ``relu(z)``, one memory pass each way)
    replaces the in-place ReLU plus the shift, which on the expanded tensors is most of what SSL costs over
    a block without a spatial operator. Values, gradients and BN statistics are those of the composition, and
    the modules are untouched (state_dict keys, checkpoints, deploy, export: the ReLU is still
    ``expand[2]``). Eval mode, or forward / backward hooks on ``expand``, its ReLU or ``spatial``, give the
    plain composition.
    """
    if spatial.training and _relu_shift_fusable(expand, spatial):
        conv, norm, _ = expand
        return relu_sparse_shift2d(norm(conv(x)), spatial.shifts, spatial.stride)
    return spatial(expand(x))


def _relu_shift_fusable(expand: nn.Module, spatial: nn.Module) -> bool:
    return (type(spatial) is SparseShift2d and isinstance(expand, ConvBN) and len(expand) == 3
            and type(expand[2]) is nn.ReLU and not any(_hooked(m) for m in (expand, expand[2], spatial)))


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Residual shortcut: identity, or a strided 1x1 conv + BN when the shape changes."""
    return nn.Identity() if cin == cout and stride == 1 else ConvBN(cin, cout, 1, stride)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al.): GAP - 1x1 conv (C -> C * rd_ratio) - ReLU - 1x1 conv - sigmoid gate."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        rd = make_divisible(channels * rd_ratio)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1)
        self.gate = gate_layer()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


SE_PLACES = (None, "v1", "v2")


class InvertedResidual(nn.Module):
    """Inverted bottleneck (MobileNetV2; SSL Fig. 4 "IB"), the unit of MobileNetV2 and FE-Net.

    1x1 conv (in -> in * t) - BN - act - spatial - 1x1 conv (-> out) - BN (linear bottleneck), + input
    when in == out and stride 1. ``spatial``: ``'dw'`` a 3x3 depthwise conv - BN - act (MobileNetV2),
    ``'pool'`` a 2x2 average pool with the stride (SSL Fig. 4c "IB-Pool"), or a :func:`make_spatial` kind
    (``'sparse'`` is SSL's IB-SSL). ``se``: ``'v1'`` SE on the unit output, ``'v2'`` SE in the expanded
    part after the spatial op (SSL Fig. 7). With ``expansion=1`` there is no expanding conv (MobileNetV2).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: float = 6, spatial: str = "dw",
                 se: str | None = None, se_ratio: float = 0.25, act_layer: type[nn.Module] = nn.ReLU,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        check_choice("se", se, SE_PLACES)
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride!r}")
        mid = round(cin * expansion)
        conv_bn = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.expand = ConvBN(cin, mid, 1, **conv_bn) if expansion != 1 else nn.Identity()
        if spatial == "dw":
            self.spatial = ConvBN(mid, mid, 3, stride, groups=mid, **conv_bn)
        elif spatial == "pool":
            if stride != 2:
                raise ValueError(f"an IB-Pool unit downsamples: stride should be 2 instead of {stride!r}")
            self.spatial = nn.AvgPool2d(2, 2, ceil_mode=True)
        else:
            self.spatial = make_spatial(spatial, mid, stride)
        self.se = SqueezeExcite(mid, se_ratio) if se == "v2" else nn.Identity()
        self.project = ConvBN(mid, cout, 1, norm_layer=norm_layer)
        self.se_out = SqueezeExcite(cout, se_ratio) if se == "v1" else nn.Identity()
        self.has_residual = cin == cout and stride == 1

    def forward(self, x: Tensor) -> Tensor:
        y = self.se_out(self.project(self.se(expand_spatial(self.expand, self.spatial, x))))
        return x + y if self.has_residual else y


def init_weights(model: nn.Module) -> None:
    """He init for convolutions, N(0, 0.01) for linear layers, BN to identity, biases to zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class Classifier(nn.Module):
    """The common model interface (timm): ``forward_features`` -> ``forward_head`` (GAP, dropout, fc).

    Subclasses set ``num_features`` and call :meth:`init_head`, and implement ``forward_features``.
    """

    num_features: int
    default_cfg: dict

    def init_head(self, num_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate should be a number in [0, 1) instead of {drop_rate!r}")
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


@torch.no_grad()
def count_params_madds(model: nn.Module, input_size=(3, 224, 224),
                       device: torch.device | str = "cpu") -> tuple[int, float]:
    """(parameters, multiply-adds) of ``model`` on one input of ``input_size``; MAdds = FLOPs / 2 measured by
    ``torch.utils.flop_counter.FlopCounterMode`` (shift layers are custom ops and count zero, as in the papers)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2


def cfg(input_size=(3, 224, 224), paper: str = "", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        **extra) -> dict:
    """A model's default configuration: input size, normalisation, paper reference, paper numbers."""
    return dict(input_size=input_size, mean=mean, std=std, paper=paper, **extra)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
