"""Export of the inference form: ONNX (checked in onnxruntime) and torch.export."""

from __future__ import annotations

import pytest
import torch

import fewshifts.models as fm
from fewshifts.cli import main
from fewshifts.deploy.export import check_onnx, export_onnx, export_program
from fewshifts.deploy.modules import IntegerShift
from fewshifts.deploy.synthetic import random_shift_pattern_, randomize_batchnorm_
from fewshifts.models import create_model, list_models, save_model
from fewshifts.ops import shift2d

pytest.importorskip("onnxruntime")


def _prepared(model):
    random_shift_pattern_(model, unshifted=0.7, radius=2)
    return randomize_batchnorm_(model).eval()


@pytest.mark.parametrize("stride", [1, 2])
def test_lowered_shift_equals_shift2d(stride):
    g = torch.Generator().manual_seed(0)
    shifts = torch.randint(-3, 4, (24, 2), generator=g)
    shifts[:6] = 0
    shifts[6] = torch.tensor([9, -12])  # beyond the 7 x 9 image: an all-zero channel
    x = torch.randn(2, 24, 7, 9, generator=g)
    lowered = IntegerShift(shifts, stride, lowered=True)
    torch.testing.assert_close(lowered(x), shift2d(x, shifts, stride), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("shift", ["sparse", "active"])
def test_onnx_shiftresnet20_matches_in_onnxruntime(shift, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _prepared(create_model("shiftresnet20", num_classes=10, shift=shift))
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.node), "only standard ONNX operators"
    assert "BatchNormalization" not in ops and ops.isdisjoint({"GridSample", "Resize"}), ops
    if shift == "sparse":
        assert {"Slice", "Pad", "Concat"} <= ops
    err = check_onnx(path, model, [torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    assert err <= 1e-4


@pytest.mark.slow
def test_onnx_fenet(tmp_path):
    if "fenet_100" not in list_models():
        pytest.skip("fenet_100 is not registered yet (models branch)")
    model = _prepared(create_model("fenet_100", num_classes=10))
    path = export_onnx(model, tmp_path / "fenet.onnx", torch.randn(1, 3, 64, 64))
    assert check_onnx(path, model, [torch.randn(2, 3, 64, 64)]) <= 1e-4


@pytest.mark.slow
def test_onnx_converted_resnet(tmp_path):
    convert = getattr(fm, "convert", None)
    if convert is None:
        pytest.skip("fewshifts.models.convert is not available yet (models branch)")
    converted = convert(create_model("resnet20", num_classes=10), shift="sparse")
    model = _prepared(converted[0] if isinstance(converted, tuple) else converted)  # (model, report)
    path = export_onnx(model, tmp_path / "converted.onnx", torch.randn(1, 3, 32, 32))
    assert check_onnx(path, model, [torch.randn(2, 3, 32, 32)]) <= 1e-4


@pytest.mark.parametrize("lowered", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_torch_export_matches(lowered):
    model = _prepared(create_model("shiftresnet20", num_classes=10))
    program = export_program(model, torch.randn(2, 3, 32, 32), lowered=lowered)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.slow
def test_export_cli(tmp_path, capsys):
    model_file = save_model(_prepared(create_model("shiftresnet20", num_classes=10)), tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_file), "--onnx", str(out), "--program", str(tmp_path / "m.pt2")]) == 0
    assert out.stat().st_size > 0 and (tmp_path / "m.pt2").stat().st_size > 0
    assert "onnxruntime vs PyTorch" in capsys.readouterr().out


@pytest.mark.slow
def test_export_cli_takes_the_recorded_dataset_size(tmp_path, capsys):
    """A Fashion-MNIST run's model (a CIFAR family: default_cfg 32x32) exports for the 28x28 images it knows."""
    import onnx

    model = create_model("shiftresnet20", num_classes=10, in_chans=1)
    model_file = save_model(model, tmp_path / "m.safetensors", extra={"dataset": "fashion-mnist"})
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_file), "--onnx", str(out)]) == 0
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.safetensors"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "nothing to do" in capsys.readouterr().err
    model_file = save_model(create_model("resnet20", num_classes=10), tmp_path / "m.safetensors")
    onnx = ["export", str(model_file), "--onnx", str(tmp_path / "x.onnx")]
    with pytest.raises(SystemExit) as exit_:
        main([*onnx, "--input-size", "1", "0", "28"])
    assert exit_.value.code == 2 and "should be a positive integer instead of '0'" in capsys.readouterr().err
    assert main([*onnx, "--opset", "3"]) == 2
    assert "opset should be an integer in [11, 23] instead of 3" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
