"""Shift-layer pruning (SSL section 5.3, Tab. 3): a layer's sparsity measures its importance.

The most sparse layers are the least important; removing a layer means setting all its shifts to 0 (the
block becomes 1x1 convolutions only), and ``fewshifts.deploy`` then drops it entirely.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from fewshifts.layers import shift_layers, shift_sparsity

__all__ = ["rank_shift_layers", "remove_shift_layers_", "prune_table", "prune_markdown", "accuracy"]


def rank_shift_layers(model: nn.Module) -> list[str]:
    """Shift layer names from least to most important: higher sparsity first, then fewer shifted channels,
    then module order (stable)."""
    layers = shift_layers(model)
    if not layers:
        raise ValueError("model has no shift layers to rank")
    order = sorted(range(len(layers)), key=lambda i: (-layers[i][1].sparsity(),
                                                       layers[i][1].channels - layers[i][1].unshifted(), i))
    return [layers[i][0] for i in order]


@torch.no_grad()
def remove_shift_layers_(model: nn.Module, k: int) -> list[str]:
    """Zero the shifts of the ``k`` least important shift layers of ``model`` (in place); their names."""
    layers = dict(shift_layers(model))
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k should be a non-negative integer instead of {k!r}")
    if k > len(layers):
        raise ValueError(f"cannot remove {k} shift layers: the model has only {len(layers)}")
    removed = rank_shift_layers(model)[:k] if k else []
    for name in removed:
        layers[name].shifts.zero_()
    return removed


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of the eval-mode ``model`` over (images, labels) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: no examples to evaluate")
    return correct / total


def prune_table(model: nn.Module, evaluate: Callable[[nn.Module], float] | None = None,
                ks: Iterable[int] | None = None) -> list[dict]:
    """SSL Tab. 3: for each k (default 0..all layers), the model with its k least important shift layers
    removed: k, the removed layers, overall sparsity and ``evaluate(model)`` (e.g. accuracy) if given."""
    n = len(shift_layers(model))
    ks = list(range(n + 1)) if ks is None else list(ks)
    rows = []
    for k in ks:
        pruned = copy.deepcopy(model)
        removed = remove_shift_layers_(pruned, k)
        row = dict(k=k, removed=removed, sparsity=shift_sparsity(pruned))
        if evaluate is not None:
            with torch.no_grad():
                row["metric"] = float(evaluate(pruned.eval()))
        rows.append(row)
    return rows


def prune_markdown(rows: list[dict], metric: str = "accuracy") -> str:
    """The table of :func:`prune_table` in markdown."""
    has_metric = any("metric" in r for r in rows)
    head = "| removed shift layers | sparsity |" + (f" {metric} |" if has_metric else "") + " last removed layer |"
    lines = [head, "|---:|---:|" + ("---:|" if has_metric else "") + "---|"]
    for r in rows:
        value = f" {r['metric']:.2%} |" if has_metric else ""
        lines.append(f"| {r['k']} | {r['sparsity']:.1%} |{value} {', '.join(r['removed'][-1:]) or '-'} |")
    return "\n".join(lines) + "\n"
