"""The public names of design.md section 1 exist with the agreed meaning."""

import torch

import fewshifts as fs


def test_design_api_names():
    for name in ("shift2d", "active_shift2d", "sparse_shift2d", "grouped_shifts", "create_model", "list_models",
                 "deploy", "convert"):
        assert callable(getattr(fs, name)), name
    for name in ("GroupedShift2d", "ActiveShift2d", "SparseShift2d"):
        assert issubclass(getattr(fs.layers, name), torch.nn.Module)
    assert "shiftresnet20" in fs.list_models() and "fenet_100" in fs.list_models()


def test_deploy_stays_the_function_after_submodule_imports():
    import fewshifts.deploy.export  # noqa: F401  (importing a submodule must not rebind fs.deploy)

    model = fs.create_model("shiftresnet20", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fs.deploy(model)(x), model(x), rtol=1e-4, atol=1e-4)
