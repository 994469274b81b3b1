"""Model zoo: the common contract of every registered model, paper counts, ``convert``, argument errors.

Run from the repository root: ``FEWSHIFTS_BACKEND=reference python -m pytest tests/test_models.py``.
"""

from __future__ import annotations

import argparse
import copy
import os

import pytest
import torch
from torch import nn

from fewshifts.layers import ShiftLayer, SparseShift2d
from fewshifts.models import common, convert, create_model, list_models, load_model, save_model
from fewshifts.models.common import InvertedResidual, count_params_madds
from fewshifts.models.fenet import FEBlock
from fewshifts.models.zoo import NOTES, TOLERANCE, configure_zoo, measure, row_label, run_zoo, zoo_entries

# ImageNet models whose paper-size counts take seconds on 2 cores
BIG = ("resnet50", "resnet101", "shift_resnet101")


def _test_size(name: str) -> tuple[int, int, int]:
    """Small single-channel test input: 16x16 for CIFAR-size models, 32x32 (1x1 final features) for ImageNet ones."""
    return (1, 16, 16) if create_model(name, in_chans=1).default_cfg["input_size"][-1] <= 32 else (1, 32, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n.startswith((*BIG, "asnet110")) else [])
                                  for n in list_models()])
def test_model_contract(name):
    size = _test_size(name)
    in_chans = size[0]
    model = create_model(name, num_classes=7, in_chans=in_chans)
    cfg = model.default_cfg
    assert {"input_size", "mean", "std", "paper", "num_classes"} <= set(cfg)
    assert model.model_spec == {"name": name, "num_classes": 7, "in_chans": in_chans, "kwargs": {}}

    # train mode: shape, finite, backward reaches every parameter, shift parameters included
    model.train()
    x = torch.randn(2, *size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    (out.square().mean() + out.mean()).backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    for m in model.modules():
        if isinstance(m, ShiftLayer) and m.learnable:
            assert m.shifts.grad is not None and torch.isfinite(m.shifts.grad).all()

    # features / head / eval determinism
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[:2] == (2, model.num_features)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        ref = model(x)
        assert torch.equal(ref, model(x))
    assert not model.training and model.train().training

    # state_dict round trip into a fresh model
    fresh = create_model(name, num_classes=7, in_chans=in_chans).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)

    # reset_classifier
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


# one model of each small-input family: 28x28 single-channel (Fashion-MNIST) input, forward only
FASHION_MNIST = ["resnet20", "shiftresnet20", "asnet20", "resnet50_cifar", "shift_resnet101_cifar"]


@pytest.mark.parametrize("name", FASHION_MNIST)
def test_fashion_mnist_input(name):
    model = create_model(name, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["fenet_100", "mobilenetv2_100"])
def test_small_input_option(name):
    model = create_model(name, num_classes=10, in_chans=1, small_input=True)
    x = torch.randn(2, 1, 28, 28)
    assert model.forward_features(x).shape[2:] == (4, 4)
    assert model(x).shape == (2, 10)
    assert "paper_madds" not in model.default_cfg


# exact values of our reconstructions (design.md section 2), so that an architecture change is noticed
EXPECTED = {
    "as_resnet_w32": (0.901e6, 166.8e6),
    "as_resnet_w68": (3.424e6, 726.9e6),
    "fenet_100": (3.535e6, 299.7e6),
    "fenet_1375": (5.956e6, 563.1e6),
    "fenet_1375(se='v2')": (8.307e6, 565.4e6),
    "mobilenetv2_100": (3.505e6, 300.8e6),
    "mobilenetv2_140": (6.109e6, 582.2e6),
    "resnet101_cifar": (1.078e6, 154.1e6),
    "shift_resnet101_cifar": (0.605e6, 84.9e6),
    "shift_resnet101_cifar(variant='flat')": (0.981e6, 149.4e6),
    "shift_resnet101(variant='flat')": (40.04e6, 7724e6),
}


def _paper_entries():
    """Every zoo row whose configuration has paper numbers (the ImageNet ResNets marked slow)."""
    entries = []
    for name, kwargs in zoo_entries():
        if name.startswith(("resnet110", "shiftresnet110", "asnet56")):
            continue  # no paper numbers
        marks = [pytest.mark.slow] if name.startswith(BIG) else []
        label = name + "".join(f"-{k}={v}" for k, v in kwargs.items())
        entries.append(pytest.param(name, kwargs, marks=marks, id=label))
    return entries


@pytest.mark.parametrize(("name", "kwargs"), _paper_entries())
def test_counts_match_papers(name, kwargs):
    cfg = create_model(name, **kwargs).default_cfg
    if "paper_params" not in cfg and "paper_madds" not in cfg:
        pytest.skip("no paper numbers for this configuration")
    row = measure(name, kwargs)
    if row.mismatch:
        assert row.label in NOTES, f"{row.label}: {row} differs from the paper by > 5% without a note"
    else:
        for diff in (row.params_diff, row.madds_diff):
            assert diff is None or abs(diff) <= TOLERANCE
    if row.label in EXPECTED:
        params, madds = EXPECTED[row.label]
        assert row.params == pytest.approx(params, rel=2e-3)
        assert row.madds == pytest.approx(madds, rel=2e-3)


def test_every_expected_count_is_tested():
    assert set(EXPECTED) <= {row_label(name, kwargs) for name, kwargs in zoo_entries()}


def test_mobilenetv2_140_paper_inconsistency_documented():
    row = measure("mobilenetv2_140")
    assert row.params_diff < -0.1 and abs(row.madds_diff) < 0.01
    assert "6.9M" in NOTES["mobilenetv2_140"] and "6.11M" in NOTES["mobilenetv2_140"]


# ---------------------------------------------------------------------------------------------- convert


def test_convert_resnet101_cifar_reproduces_shift_resnet101_cifar():
    base = create_model("resnet101_cifar", num_classes=100)
    converted, report = convert(base, shift="grouped", exclude=("stem",))
    assert len(report.replaced) == 33 and report.changed
    assert "replaced 33 convolution(s)" in str(report)
    target = create_model("shift_resnet101_cifar", num_classes=100)
    assert count_params_madds(converted, (3, 32, 32)) == count_params_madds(target, (3, 32, 32))
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in target.named_parameters()]
    # the original is untouched (inplace=False) and still records its spec; the copy does not
    assert isinstance(base.stages[0][0].conv2[0], nn.Conv2d) and base.model_spec["name"] == "resnet101_cifar"
    assert not hasattr(converted, "model_spec")


@pytest.mark.slow
def test_convert_resnet101_reproduces_shift_resnet101():
    converted, report = convert(create_model("resnet101"), shift="grouped", exclude="stem")
    assert len(report.replaced) == 33
    params, madds = count_params_madds(converted)
    assert (params, madds) == count_params_madds(create_model("shift_resnet101"))
    assert params == pytest.approx(25.6e6, rel=0.01) and madds == pytest.approx(4.41e9, rel=0.01)


def test_convert_whole_resnet_includes_stem():
    _, report = convert(create_model("resnet50_cifar", num_classes=100), shift="sparse")
    assert len(report.replaced) == 17 and report.replaced[0].name == "stem.0"


@pytest.mark.parametrize("shift", ["sparse", "active", "grouped"])
def test_converted_model_runs_forward_backward(shift):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 5, 1, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    x = torch.randn(2, 3, 17, 17)
    converted, report = convert(model, shift=shift, connectivity=4)
    assert [r.name for r in report.replaced] == ["0", "3", "6"]
    assert report.replaced[1].groups == 8 and converted[3][1].groups == 8
    assert converted[0][0].stride == 2 and converted[0][1].stride == (1, 1)
    if shift == "grouped":
        assert converted[6][0].kernel_size == 5 and converted[6][0].connectivity == 4
    out = converted(x)
    assert out.shape == model(x).shape == (2, 4)
    out.square().sum().backward()
    assert all(p.grad is not None for p in converted.parameters())
    assert sum(isinstance(m, ShiftLayer) for m in converted.modules()) == 3


def test_convert_odd_stride_and_padding_are_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.Conv2d(4, 4, 3, padding=0))
    converted, report = convert(model)
    assert converted(torch.randn(1, 3, 16, 16)).shape == (1, 4, 4, 4)
    assert "stride" in report.replaced[0].notes[0] and "padding" in report.replaced[1].notes[0]


def test_convert_model_without_spatial_conv_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, report = convert(model)
    assert converted is model and not report.changed and report.replaced == []
    assert "nothing replaced" in str(report)
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())


def test_convert_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    with pytest.raises(ValueError, match="shift should be one of"):
        convert(model, shift="dw")
    with pytest.raises(ValueError, match="connectivity should be 4 or 8"):
        convert(model, shift="grouped", connectivity=6)
    with pytest.raises(ValueError, match="exclude names no submodule"):
        convert(model, exclude=("stem",))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert(torch.zeros(3))


def test_fenet_block_mixes_only_the_last_channels():
    block = create_model("fenet_100").blocks[3]
    assert isinstance(block, FEBlock) and block.mixed_channels == [8, 16, 32]
    assert isinstance(block.units[0].spatial, SparseShift2d)
    x = torch.randn(1, 64, 8, 8)
    y = FEBlock.mix(x, block.units[0].eval(), 8)
    assert torch.equal(y[:, :56], x[:, :56]) and not torch.equal(y[:, 56:], x[:, 56:])


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("fenet100", {}, "did you mean 'fenet_100'"),
    ("shiftresnet20", dict(shift="bogus"), "shift should be one of"),
    ("fenet_100", dict(width=0), "width should be a positive number"),
    ("fenet_100", dict(width="wide"), "width should be a positive number"),
    ("mobilenetv2_100", dict(width=-1.0), "width should be a positive number"),
    ("fenet_100", dict(se="v3"), "se should be one of"),
    ("fenet_100", dict(spatial="conv"), "spatial should be one of"),
    ("shift_resnet101_cifar", dict(connectivity=6), "connectivity should be one of"),
    ("shift_resnet101_cifar", dict(variant="deep"), "variant should be one of"),
    ("shift_resnet101_cifar", dict(shift="dw"), "shift should be one of"),
    ("asnet20", dict(base_width=0), "base_width should be a positive integer"),
    ("as_resnet_w32", dict(shift="bogus"), "shift should be one of"),
    ("shiftresnet20", dict(expansion=0), "expansion should be a positive integer"),
    ("shiftresnet20", dict(expansion=-1), "expansion should be a positive integer"),
    ("shiftresnet20", dict(expansion=1.5), "expansion should be a positive integer"),
    ("resnet20", dict(drop_rate=-1), r"drop_rate should be a number in \[0, 1\)"),
    ("resnet20", dict(drop_rate=2.0), r"drop_rate should be a number in \[0, 1\)"),
    ("fenet_100", dict(drop_rate="x"), r"drop_rate should be a number in \[0, 1\)"),
])
def test_bad_arguments(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


@pytest.mark.parametrize("name", [None, ["resnet20"]])
def test_model_name_should_be_a_str(name):
    with pytest.raises(TypeError, match="model name should be a str"):
        create_model(name)


@pytest.mark.parametrize("kwargs", [dict(shift="sparse"), dict(expansion=3), dict(foo=1)])
def test_resnet_rejects_unknown_kwargs(kwargs):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(kwargs))}'"):
        create_model("resnet20", **kwargs)


def test_variant_round_trips_through_model_file(tmp_path):
    model = create_model("fenet_100", num_classes=10, in_chans=1, small_input=True, se="v2")
    path = save_model(model, tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user makes (safetensors writes 0600)
    loaded = load_model(path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.parametrize(("spec", "message"), [
    (dict(name="resnet20", in_chans=3), "architecture lacks 'num_classes'"),
    (["resnet20", 10, 3], "architecture should be a JSON object"),
    (dict(name="resnet20", num_classes=10, in_chans=3, kwargs=dict(shift="sparse")),
     "does not build a model .*unexpected keyword argument 'shift'"),
])
def test_load_model_reports_damaged_metadata(tmp_path, spec, message):
    import json

    from safetensors.torch import save_file

    path = tmp_path / "damaged.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"fewshifts_model": json.dumps(spec)})
    with pytest.raises(ValueError, match=f"damaged.safetensors: .*{message}"):
        load_model(path)


def test_save_model_names_the_argument_it_cannot_record(tmp_path):
    model = create_model("mobilenetv2_100", act_layer=nn.ReLU)
    with pytest.raises(ValueError, match=r"model argument act_layer=.* cannot be recorded"):
        save_model(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_zoo_cli_writes_markdown(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    configure_zoo(parser)
    path = tmp_path / "models.md"
    assert run_zoo(parser.parse_args(["--pattern", "resnet20", "--markdown", str(path)])) == 0
    assert "resnet20" in capsys.readouterr().out
    text = path.read_text()
    assert "| resnet20 |" in text and "FlopCounterMode" in text
    assert run_zoo(parser.parse_args(["--pattern", "nomodel*"])) == 2


@pytest.mark.slow
def test_torch_compile_small_model():
    model = create_model("shiftresnet20", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def _unfused_copy(model: nn.Module) -> nn.Module:
    """A copy that runs ReLU then shift as two ops: a hook on every sparse shift layer disables the fusion."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, SparseShift2d):
            m.register_forward_hook(lambda *args: None)
    return twin


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("build, in_chans", [
    (lambda: create_model("shiftresnet20", num_classes=10, in_chans=1), 1),
    (lambda: InvertedResidual(8, 8, 1, 6, "sparse"), 8),
], ids=["shiftresnet20", "ib-ssl"])
def test_fused_relu_shift_training_matches_composition(build, in_chans, monkeypatch):
    """In training the blocks' ReLU runs inside the sparse shift (relu_sparse_shift2d): same outputs, gradients
    and BN running statistics as ReLU then shift; eval mode and state_dict are unchanged."""
    model = build().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseShift2d):
                m.shifts.uniform_(-1.4, 1.4)
    twin = _unfused_copy(model)
    calls = []
    fused_op = common.relu_sparse_shift2d
    monkeypatch.setattr(common, "relu_sparse_shift2d", lambda *a: calls.append(1) or fused_op(*a))
    x = torch.randn(4, in_chans, 12, 12)
    out, grads = _train_step(model, x)
    n_fused = len(calls)
    ref_out, ref_grads = _train_step(twin, x)
    assert n_fused == sum(isinstance(m, SparseShift2d) for m in model.modules()) and len(calls) == n_fused
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for k, g in grads.items():  # float32 sums in another order (the shift gradients: over N * H * W products)
        ref = ref_grads[k]
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()), msg=k)
    state, ref_state = model.state_dict(), twin.state_dict()
    assert list(state) == list(ref_state)
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=0, msg=k)  # BN running stats included
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin.eval()(x), rtol=0, atol=0)
    assert len(calls) == n_fused  # eval: the plain modules


@pytest.mark.slow
def test_torch_compile_fullgraph_training_with_fused_relu_shift():
    """The fused op compiles in one graph and matches the compiled unfused model (compiled against compiled: inductor
    rounds training-mode BN differently from eager, by about 2e-3 of a gradient's scale at batch 2, fused or not)."""
    model = create_model("shiftresnet20", num_classes=10, in_chans=1).train()
    twin = _unfused_copy(model)
    x = torch.randn(2, 1, 28, 28)
    out, grads = _train_step(torch.compile(model, fullgraph=True), x)
    ref_out, ref_grads = _train_step(torch.compile(twin, fullgraph=True), x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for k, g in grads.items():
        ref = ref_grads[k]
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=k)
