"""Model-level helpers for learning shifts: penalty, sparsity, freezing, ASL's normalized gradient, param groups."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshifts.layers.shift import ShiftLayer

__all__ = [
    "shift_layers",
    "shift_penalty",
    "shift_sparsity",
    "freeze_shifts",
    "normalize_shift_grads_",
    "param_groups",
]


def shift_layers(model: nn.Module) -> list[tuple[str, ShiftLayer]]:
    """Every shift layer of ``model`` with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ShiftLayer)]


def shift_penalty(model: nn.Module, p: int = 2) -> Tensor:
    """SSL Eq. 4 without lambda: the sum over learnable shift layers of ``||shifts||_p^p``."""
    terms = [m.penalty(p) for _, m in shift_layers(model) if m.learnable]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def shift_sparsity(model: nn.Module) -> float:
    """Fraction of all shift-layer channels whose integer shift is (0, 0); NaN when there is no shift layer."""
    layers = [m for _, m in shift_layers(model)]
    channels = sum(m.channels for m in layers)
    return sum(m.unshifted() for m in layers) / channels if channels else float("nan")


def freeze_shifts(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) learning every shift of ``model`` (SSL: shifts fixed after 48k of 64k iterations)."""
    for _, m in shift_layers(model):
        m.freeze(frozen)


@torch.no_grad()
def normalize_shift_grads_(model: nn.Module, eps: float = 1e-12) -> None:
    """ASL's normalized gradient: each channel's (g_dy, g_dx) becomes its unit vector (zero stays zero).

    Call after ``backward()`` (and after DDP has averaged the gradients), before ``optimizer.step()``.
    """
    for _, m in shift_layers(model):
        g = m.shifts.grad if m.learnable else None
        if g is not None:
            g.div_(g.norm(dim=1, keepdim=True).clamp_min(eps))


def param_groups(
    model: nn.Module, weight_decay: float, shift_lr: float | None = None, shift_weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer groups: decayed weights; undecayed norms and biases; shifts with their own lr, no decay.

    Weight decay applies to parameters with two or more dimensions except shift parameters; 1-D
    parameters (BN/bias) and shifts never decay (design.md section 3). Each group has a ``name``.
    """
    shift_params = {id(m.shifts) for _, m in shift_layers(model) if m.learnable}
    decay, no_decay, shifts = [], [], []
    for p in model.parameters():
        if not p.requires_grad and id(p) not in shift_params:
            continue
        if id(p) in shift_params:
            shifts.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if shifts:
        group = {"name": "shifts", "params": shifts, "weight_decay": shift_weight_decay}
        if shift_lr is not None:
            group["lr"] = shift_lr
        groups.append(group)
    return [g for g in groups if g["params"]]
