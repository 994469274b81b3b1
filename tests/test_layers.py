"""Shift layers and the helpers that learn them (penalty, sparsity, freezing, normalized gradient, groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewshifts as fs
from fewshifts.layers import (
    ActiveShift2d,
    GroupedShift2d,
    SparseShift2d,
    freeze_shifts,
    normalize_shift_grads_,
    param_groups,
    shift_layers,
    shift_penalty,
    shift_sparsity,
)


def test_grouped_layer_is_fixed_eq2():
    layer = GroupedShift2d(18, kernel_size=3, connectivity=4, stride=2)
    assert torch.equal(layer.integer_shifts(), fs.grouped_shifts(18, 3, 4))
    assert list(layer.parameters()) == [] and "shifts" in layer.state_dict()
    x = torch.randn(2, 18, 8, 8)
    torch.testing.assert_close(layer(x), fs.shift2d(x, layer.shifts, 2))
    assert "connectivity=4" in repr(layer) and "stride=2" in repr(layer)
    assert not layer.learnable and layer.frozen


@pytest.mark.parametrize("cls, op", [(ActiveShift2d, fs.active_shift2d), (SparseShift2d, fs.sparse_shift2d)])
def test_learned_layers(cls, op):
    torch.manual_seed(0)
    layer = cls(64, init_range=1.5)
    assert isinstance(layer.shifts, nn.Parameter) and layer.shifts.shape == (64, 2)
    assert layer.shifts.abs().max() <= 1.5 and layer.shifts.abs().max() > 1.0  # U[-r, r]
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(layer(x), op(x, layer.shifts))
    assert torch.equal(layer.integer_shifts(), torch.round(layer.shifts.detach()).long())
    layer(x).sum().backward()
    assert layer.shifts.grad is not None and layer.shifts.grad.abs().sum() > 0

    clone = cls(64)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone(x), layer(x))


def test_sparsity_and_penalty_eq4():
    layer = SparseShift2d(4)
    with torch.no_grad():
        layer.shifts.copy_(torch.tensor([[0.2, -0.4], [0.6, 0.0], [-1.2, 2.0], [0.0, 0.49]]))
    assert layer.unshifted() == 2 and layer.sparsity() == 0.5
    torch.testing.assert_close(layer.penalty(1), torch.tensor(0.2 + 0.4 + 0.6 + 1.2 + 2.0 + 0.49))
    torch.testing.assert_close(layer.penalty(2), layer.shifts.detach().pow(2).sum())
    layer.penalty(2).backward()
    torch.testing.assert_close(layer.shifts.grad, 2 * layer.shifts.detach())
    with pytest.raises(ValueError, match="p should be 1 or 2"):
        layer.penalty(3)


def test_freeze_stops_shift_learning_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SparseShift2d(8), ActiveShift2d(8), GroupedShift2d(8))
    freeze_shifts(model)
    assert all(m.frozen for _, m in shift_layers(model))
    model(torch.randn(1, 3, 5, 5)).sum().backward()
    assert model[1].shifts.grad is None and model[2].shifts.grad is None and model[0].weight.grad is not None
    assert "frozen" in repr(model[1])
    freeze_shifts(model, frozen=False)
    assert not model[1].frozen


def test_model_level_penalty_and_sparsity():
    model = nn.Sequential(SparseShift2d(4), nn.ReLU(), GroupedShift2d(9), ActiveShift2d(2))
    with torch.no_grad():
        model[0].shifts.zero_()
        model[3].shifts.fill_(1.0)
    assert [name for name, _ in shift_layers(model)] == ["0", "2", "3"]
    torch.testing.assert_close(shift_penalty(model, 2), torch.tensor(4.0))  # grouped shifts are not learnable
    assert shift_sparsity(model) == pytest.approx((4 + 1 + 0) / (4 + 9 + 2))
    assert torch.isnan(torch.tensor(shift_sparsity(nn.Conv2d(1, 1, 1))))


def test_normalized_shift_gradient():
    layer = ActiveShift2d(3)
    layer.shifts.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1e-3, 0.0]])
    normalize_shift_grads_(layer)
    torch.testing.assert_close(layer.shifts.grad, torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))


def test_param_groups_no_decay_on_shifts_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), SparseShift2d(8), nn.Linear(8, 2))
    freeze_shifts(model)  # frozen shifts still belong to the shift group (they may be unfrozen later)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=5e-4, shift_lr=1e-2)}
    assert groups["shifts"]["params"] == [model[2].shifts]
    assert groups["shifts"]["weight_decay"] == 0.0 and groups["shifts"]["lr"] == 1e-2
    assert {id(p) for p in groups["decay"]["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and len(groups["no_decay"]["params"]) == 4
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len(list(model.parameters()))
    torch.optim.SGD(list(groups.values()), lr=0.1)  # accepted by an optimizer


@pytest.mark.parametrize("make, match", [
    (lambda: SparseShift2d(0), "channels should be a positive integer"),
    (lambda: ActiveShift2d(4, stride=3), "stride should be 1 or 2"),
    (lambda: SparseShift2d(4, init_range=-1.0), "init_range"),
    (lambda: SparseShift2d(4, init_range=float("inf")), "init_range should be a finite non-negative number"),
    (lambda: GroupedShift2d(4, kernel_size=2), "odd"),
])
def test_layer_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_grouped_shift_refuses_non_integral_shifts():
    grouped, sparse = GroupedShift2d(4), SparseShift2d(4)
    before = grouped.shifts.clone()
    sparse.shifts.data.fill_(0.9)
    with pytest.raises(RuntimeError, match="shifts: GroupedShift2d holds integer shifts"):
        grouped.load_state_dict(sparse.state_dict())
    assert torch.equal(grouped.shifts, before)
    sparse.shifts.data.fill_(-1.0)  # integral float values load
    grouped.load_state_dict(sparse.state_dict())
    assert grouped.shifts.dtype == torch.int64 and bool((grouped.shifts == -1).all())


def test_layer_stride_must_be_an_integer():
    """A float stride fails where the layer is built, as for the ops, not at its first forward."""
    with pytest.raises(TypeError, match="GroupedShift2d: stride should be an integer"):
        GroupedShift2d(4, stride=2.0)
    assert SparseShift2d(4, stride=torch.tensor(2)).stride == 2
