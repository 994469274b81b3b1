"""fewshifts.deploy: the inference form keeps the eval-mode outputs on every model (SSL section 4.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewshifts as fs
import fewshifts.models as fm
from fewshifts.deploy import IntegerShift, deploy
from fewshifts.deploy.modules import write_back
from fewshifts.deploy.synthetic import random_shift_pattern_, randomize_batchnorm_
from fewshifts.layers import ShiftLayer, SparseShift2d
from fewshifts.models import create_model, list_models

torch.set_num_threads(min(2, torch.get_num_threads()))


def _prepared(name: str, seed: int = 0, unshifted: float = 0.7, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, **kwargs)
    random_shift_pattern_(model, unshifted=unshifted, radius=2, seed=seed)
    return randomize_batchnorm_(model, seed=seed).eval()


def _small_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    c, h, w = model.default_cfg["input_size"]
    return torch.randn(batch, c, min(h, 64), min(w, 64), generator=torch.Generator().manual_seed(seed))


def _assert_same(model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> None:
    x_before = x.clone()
    with torch.no_grad():
        expected = model(x)
        got = deployed(x)
    assert torch.equal(x, x_before), "deployed model modified its input"
    scale = expected.abs().max().clamp_min(1e-6)
    err = ((got - expected).abs().max() / scale).item()
    assert err <= 1e-4, f"max abs error {err:.2e} of the output scale"


def _spatial_kwargs(name: str) -> list[dict]:
    """The shift variants a model offers (``shift=`` for ShiftResNets, FE-Net's ``spatial=``)."""
    if name.startswith("shiftresnet"):
        return [dict(shift=s) for s in ("sparse", "grouped", "active", "none", "dw")]
    return [{}]


# one small model of each family runs by default; the deeper / wider siblings are marked slow (CI runs them)
FAST = {"shiftresnet20", "resnet20", "fenet_100", "mobilenetv2_100", "asnet20", "as_resnet_w32"}
BOTH_LAYOUTS = {"shiftresnet20", "fenet_100"}


def _cases() -> list:
    cases = []
    for name in list_models():
        for kw in _spatial_kwargs(name):
            for fmt in ("channels_last", "contiguous"):
                if fmt == "contiguous" and name not in BOTH_LAYOUTS:
                    continue
                marks = () if name in FAST else (pytest.mark.slow,)
                cases.append(pytest.param(name, kw, fmt, marks=marks,
                                          id=f"{name}-{'-'.join(map(str, kw.values()))}-{fmt}"))
    return cases


@pytest.mark.parametrize(("name", "kwargs", "memory_format"), _cases())
def test_deploy_matches_eval(name, kwargs, memory_format):
    model = _prepared(name, **kwargs)
    x = _small_input(model)
    _assert_same(model, deploy(model, example_input=x[:1], memory_format=memory_format), x)


def test_deploy_folds_bn_and_bakes_shifts():
    model = _prepared("shiftresnet20", shift="sparse")
    deployed = deploy(model, example_input=torch.randn(1, 3, 32, 32))
    kinds = {type(m) for m in deployed.modules()}
    assert nn.BatchNorm2d not in kinds and not any(issubclass(k, ShiftLayer) for k in kinds)
    shifts = [m for m in deployed.modules() if isinstance(m, IntegerShift)]
    assert len(shifts) == 9 and all(m.inplace for m in shifts)


def test_permutation_groups_displacements_unshifted_first():
    model = _prepared("shiftresnet20", shift="sparse", unshifted=0.6)
    deployed = deploy(model, example_input=torch.randn(1, 3, 32, 32))
    for m in deployed.modules():
        if isinstance(m, IntegerShift):
            displacements = [(dy, dx) for _, _, dy, dx in m.runs]
            assert displacements[0] == (0, 0), "the unshifted group should come first"
            assert len(set(displacements)) == len(displacements), "each displacement should be one contiguous run"




@pytest.mark.parametrize("groups", [(1, 1), (2, 1), (1, 2)], ids=["dense", "grouped-producer", "grouped-consumer"])
def test_permutation_keeps_grouped_convolutions(groups):
    """A grouped 1x1 conv's channels belong to its groups: the pass must not reorder them (it did for a producer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 1, groups=groups[0]), nn.BatchNorm2d(8), nn.ReLU(),
                          SparseShift2d(8, init_range=1.5), nn.Conv2d(8, 8, 1, groups=groups[1]))
    model = randomize_batchnorm_(model, seed=0).eval()
    x = torch.randn(2, 8, 9, 9)
    _assert_same(model, deploy(model, example_input=x[:1]), x)

@pytest.mark.parametrize("lowered", [False, True])
def test_permutation_passes_squeeze_excite(lowered):
    """FE-Net SE v2 (SSL Fig. 7b): the shift feeds the SE mean and the gate product; channels are still sorted
    (the gate's fc2 rows reordered too), so each displacement is one run as without SE."""
    model = _prepared("fenet_100", se="v2", small_input=True)
    x = torch.randn(2, 3, 28, 28)
    deployed = deploy(model, example_input=x[:1], lowered=lowered)
    shifts = [m for m in deployed.modules() if isinstance(m, IntegerShift)]
    assert len(shifts) == 17
    for m in shifts:
        displacements = [(dy, dx) for _, _, dy, dx in m.runs]
        assert displacements[0] == (0, 0) and len(set(displacements)) == len(displacements)
    _assert_same(model, deployed, x)

def test_all_zero_shifts_deploy_to_pure_1x1_convs():
    model = _prepared("shiftresnet20", shift="sparse", unshifted=1.0)
    deployed = deploy(model, example_input=torch.randn(1, 3, 32, 32))
    assert not [m for m in deployed.modules() if isinstance(m, (IntegerShift, ShiftLayer))]
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (1, 1) for m in convs[1:]), "only the stem should keep a spatial kernel"
    _assert_same(model, deployed, torch.randn(2, 3, 32, 32))


def test_deployed_model_runs_in_inference_mode_and_batch_sizes():
    model = _prepared("shiftresnet20")
    deployed = deploy(model, example_input=torch.randn(1, 3, 32, 32))
    with torch.inference_mode():
        assert deployed(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    _assert_same(model, deployed, torch.randn(3, 3, 40, 24))  # another spatial size than the example


@pytest.mark.parametrize("options", [{}, dict(inplace=False), dict(lowered=True)])
def test_deployed_model_saves_and_loads(options, tmp_path):
    """fx keeps string annotations (``from __future__ import annotations``) as globals torch.save cannot pickle."""
    model = _prepared("fenet_100", small_input=True)
    x = torch.randn(2, 3, 28, 28)
    deployed = deploy(model, example_input=x[:1], **options)
    torch.save(deployed, tmp_path / "deployed.pt")
    loaded = torch.load(tmp_path / "deployed.pt", weights_only=False)
    _assert_same(model, loaded, x)


@pytest.mark.parametrize("shift", ["sparse", "active"])
def test_deploy_keeps_the_model_dtype(shift):
    model = _prepared("shiftresnet20", shift=shift).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deployed = deploy(model, example_input=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-10, atol=1e-10)


def test_deploy_rejects_unknown_memory_format():
    with pytest.raises(ValueError, match="memory_format should be one of"):
        deploy(create_model("shiftresnet20"), memory_format="nhwc")


# ------------------------------------------------------------------------------------------------------
# FE-Block write-back (SSL section 4.3) on a small stand-in with the same slicing pattern as FE-Net


class _Unit(nn.Module):
    def __init__(self, c: int, residual: bool) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU(inplace=True))
        self.shift = SparseShift2d(4 * c)
        self.project = nn.Sequential(nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.residual = residual

    def forward(self, x):
        y = self.project(self.shift(self.expand(x)))
        return x + y if self.residual else y


class _FEBlock(nn.Module):
    """Units on the last G, 2G, ... channels, each output concatenated after the untouched channels."""

    def __init__(self, c: int = 16, n: int = 3, split: bool = False) -> None:
        super().__init__()
        self.g = c // 2 ** (n - 1)
        self.units = nn.ModuleList(_Unit(self.g * 2**i, residual=i % 2 == 0) for i in range(n))
        self.split = split

    def forward(self, x):
        for i, unit in enumerate(self.units):
            k = x.shape[1] - self.g * 2**i
            if self.split:
                keep, work = torch.split(x, [k, x.shape[1] - k], dim=1)
                x = torch.cat([keep, unit(work)], dim=1) if k else unit(work)
            else:
                x = torch.cat([x[:, :k], unit(x[:, k:])], dim=1) if k else unit(x)
        return x


class _FENetLike(nn.Module):
    def __init__(self, split: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.block = _FEBlock(16, 3, split)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("split", [False, True])
def test_fe_block_writes_back_in_place(split):
    torch.manual_seed(0)
    model = _FENetLike(split)
    random_shift_pattern_(model, unshifted=0.5, radius=1)
    randomize_batchnorm_(model).eval()
    x = torch.randn(2, 3, 16, 16)
    deployed = deploy(model, example_input=x[:1])
    calls = [n for n in deployed.model.graph.nodes if n.target is write_back]
    assert len(calls) == 2, "both concatenations should become write-backs"
    assert not [n for n in deployed.model.graph.nodes if n.target is torch.cat]
    _assert_same(model, deployed, x)


def test_fenet_writes_back():
    if "fenet_100" not in list_models():
        pytest.skip("fenet_100 is not registered yet (models branch)")
    model = _prepared("fenet_100")
    deployed = deploy(model, example_input=torch.randn(1, 3, 64, 64))
    graphs = [m.graph for m in deployed.modules() if isinstance(m, torch.fx.GraphModule)]
    assert any(n.target is write_back for g in graphs for n in g.nodes)


def test_converted_resnet_deploys():
    convert = getattr(fm, "convert", None)
    if convert is None:
        pytest.skip("fewshifts.models.convert is not available yet (models branch)")
    torch.manual_seed(0)
    model = convert(create_model("resnet20", num_classes=10), shift="sparse")
    model = model[0] if isinstance(model, tuple) else model  # (model, report)
    random_shift_pattern_(model, unshifted=0.7, radius=1)
    randomize_batchnorm_(model).eval()
    x = torch.randn(2, 3, 32, 32)
    _assert_same(model, deploy(model, example_input=x[:1]), x)


def test_relu_fused_into_conv():
    from fewshifts.deploy.modules import ConvAct

    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not available")
    deployed = deploy(_prepared("shiftresnet20"), example_input=torch.randn(1, 3, 32, 32))
    assert any(isinstance(m, ConvAct) for m in deployed.modules())
    lowered = deploy(_prepared("shiftresnet20"), example_input=torch.randn(1, 3, 32, 32), lowered=True)
    assert not any(isinstance(m, ConvAct) for m in lowered.modules()), "the export form keeps standard modules"


def test_bench_smoke(tmp_path):
    from fewshifts.deploy.bench import OP_TYPES, BenchCase, run_benchmark, to_markdown

    cases = [BenchCase("ShiftResNet-20 90%", "shiftresnet20", {"num_classes": 10}, 0.9),
             BenchCase("ShiftResNet-20 DW", "shiftresnet20", {"num_classes": 10, "shift": "dw"})]
    results = run_benchmark(cases, batches=(2,), size=32, repeats=1, onnx=False, breakdown_batch=2, log=lambda s: None)
    assert len(results["rows"]) == 2 and all(r["deployed_ms"] > 0 for r in results["rows"])
    shares = results["breakdown"]["ShiftResNet-20 90%"]
    assert set(shares) <= set(OP_TYPES) and shares["shift"] > 0 and shares["1x1 conv"] > 0
    text = to_markdown(results, "test")
    assert "| ShiftResNet-20 90% | 2 |" in text and "## Targets" in text
    with pytest.raises(ValueError, match="not registered"):
        run_benchmark([BenchCase("x", "no_such_model")], log=lambda s: None)


def test_bench_cli_rejects_non_positive_options(tmp_path, capsys, monkeypatch):
    from fewshifts.cli import main
    from fewshifts.deploy import bench

    monkeypatch.setattr(bench, "run_benchmark", lambda **kwargs: pytest.fail("benchmark ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--batch", "1", "0", "--out", str(tmp_path / "b.md")])
    assert exit_.value.code == 2 and "--batch: should be a positive integer instead of '0'" in capsys.readouterr().err
    assert not (tmp_path / "b.md").exists()


def test_interleaved_times_runs_every_form_once_per_round_in_changing_orders():
    from fewshifts.deploy.bench import interleaved_times

    calls = []
    forms = {name: (lambda x, name=name: calls.append(name)) for name in "abcd"}
    samples = interleaved_times(forms, None, repeats=12, warmup=2)
    assert {k: len(v) for k, v in samples.items()} == dict.fromkeys("abcd", 12)
    rounds = [tuple(calls[8 + 4 * r : 12 + 4 * r]) for r in range(12)]  # after 2 warm-up calls of each
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 1  # a fixed order would give every form the same predecessor
    assert len({r[0] for r in rounds}) > 1
    calls.clear()
    interleaved_times(forms, None, repeats=12, warmup=2)
    assert [tuple(calls[8 + 4 * r : 12 + 4 * r]) for r in range(12)] == rounds  # seeded: the same orders each time


def test_bench_dw_ratio_bounds_arithmetic():
    """The bound on deployed FE-Net (90%) / FE-Net (DW): shared 1x1 convs at matrix-product speed (t1), then
    everything else as measured, or (floor) only FE-Net (DW)'s depthwise convs (its spatial convs less the stem)."""
    from fewshifts.deploy.bench import DW, SSL90, conv1x1_madds, dw_ratio_bounds, to_markdown

    ssl, dw = SSL90, DW
    results = dict(breakdown_batch=32, sgemm_gflops=150.0, conv1x1_madds={ssl: 300e6, dw: 300e6},
                   breakdown={ssl: {"1x1 conv": 0.16, "spatial conv": 0.004, "shift": 0.008, "pool": 0.012},
                              dw: {"1x1 conv": 0.16, "spatial conv": 0.034, "pool": 0.012}})
    b = dw_ratio_bounds(results)
    t1 = 32 * 300e6 * 2 / 150e9  # 0.128 s
    assert b["t1"] == pytest.approx(t1)
    assert b["with_rest"] == pytest.approx((t1 + 0.024) / (t1 + 0.046))
    assert b["floor"] == pytest.approx(t1 / (t1 + 0.030))
    results.update(rows=[], date="d", machine="m", threads=2, allocator="a", torch="t", shift_backend="cpp", size=224,
                   repeats=1)
    text = to_markdown(results, "test")
    assert "| everything else in FE-Net SSL free (floor) | 0.81x |" in text
    assert dw_ratio_bounds({**results, "breakdown": {}}) is None
    # a 1x1 conv of 4 -> 6 channels on 5x5 pixels, and one of 6 -> 2 (grouped in 2): 4*6*25 + 3*2*25 MAdds
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1, groups=2))
    assert conv1x1_madds(net, 5) == 4 * 6 * 25 + 3 * 2 * 25


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("pattern", ["sparse", "all shifted", "far", "none"])
def test_integer_shift_direct_kernel_call_matches_op(pattern, layout):
    """In eager inference IntegerShift calls the C++ kernel directly (no custom-op dispatch); the result must
    be the op's, shifts beyond the image included, and other modes must still go through the op."""
    g = torch.Generator().manual_seed(0)
    shifts = torch.randint(-1, 2, (12, 2), generator=g)
    if pattern == "sparse":
        shifts[:9] = 0
    elif pattern == "far":
        shifts[::2] = torch.tensor([7, -30])
    elif pattern == "none":
        shifts.zero_()
    module = IntegerShift(shifts, inplace=True)
    x = torch.randn(2, 12, 5, 6, generator=g).contiguous(memory_format=layout)
    expected = fs.shift2d(x, shifts)
    with torch.inference_mode():
        got = module(x.clone())
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=layout)
    with torch.no_grad():  # plain no_grad, and the cached clamped shifts reused on another size
        assert torch.equal(module(x.clone()), expected)
        y = torch.randn(1, 12, 3, 40, generator=g)
        assert torch.equal(module(y.clone()), fs.shift2d(y, shifts))
    with pytest.raises(ValueError, match="in-place shift is for inference"):
        module(x.clone().requires_grad_())  # autograd: through shift2d_, which refuses


def test_integer_shift_direct_call_follows_backend_and_copies(monkeypatch):
    """The kernels IntegerShift calls directly are looked up once per FEWSHIFTS_BACKEND value (the reference
    path when it says so), are left out of copies, and a changed shift buffer is seen."""
    import copy

    shifts = torch.tensor([[0, 0], [0, 0], [1, -1], [-1, 0]])
    module = IntegerShift(shifts, inplace=True)
    x = torch.randn(1, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(module(x.clone()), fs.shift2d(x, shifts))
        monkeypatch.setenv("FEWSHIFTS_BACKEND", "reference")
        assert module._direct_kernels(x) is None  # the pure-PyTorch path
        assert torch.equal(module(x.clone()), fs.shift2d(x, shifts))
        monkeypatch.undo()
        clone = copy.deepcopy(module)
        assert "_kernels" not in clone.__dict__
        with torch.no_grad():
            module.shifts[2] = torch.tensor([0, 1])
        assert torch.equal(clone(x.clone()), fs.shift2d(x, shifts))
        assert torch.equal(module(x.clone()), fs.shift2d(x, module.shifts))


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_conv_act_prepacked_weights(act, layout, tmp_path):
    """ConvAct (weights reordered once per input shape for oneDNN) equals conv + activation, for several input
    shapes, after the weights change, and survives copy / pickling without its packed weights."""
    import copy

    from fewshifts.deploy.modules import ConvAct

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1).eval().requires_grad_(False)
    module = ConvAct(conv, act)

    def expected(x):
        y = conv(x)
        return y if act is None else torch.relu(y) if act == "relu" else nn.functional.relu6(y)

    with torch.inference_mode():
        for shape in ((1, 8, 9, 9), (3, 8, 16, 10), (1, 8, 9, 9), (8, 8, 96, 96)):
            x = torch.randn(shape).contiguous(memory_format=layout) * 4
            torch.testing.assert_close(module(x), expected(x), rtol=1e-5, atol=1e-5)
        conv.weight.mul_(-1)  # a changed weight is packed again
        torch.testing.assert_close(module(x), expected(x), rtol=1e-5, atol=1e-5)
    assert set(module.plan.values()) <= {"onednn", "aten"} and len(module.plan) >= 2
    assert set(module.state_dict()) == {"conv.weight", "conv.bias"}
    twin = copy.deepcopy(module)
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        for m in (twin, loaded):
            torch.testing.assert_close(m(x), expected(x), rtol=1e-5, atol=1e-5)


def test_deployed_fenet_copies_after_running():
    if "fenet_100" not in list_models():
        pytest.skip("fenet_100 is not registered yet (models branch)")
    import copy

    model = _prepared("fenet_100")
    x = torch.randn(2, 3, 64, 64)
    deployed = deploy(model, example_input=x[:1])
    with torch.inference_mode():
        deployed(x)  # packs weights
    _assert_same(model, copy.deepcopy(deployed), x)


def test_deployed_direct_calls_keep_hooks_and_state():
    """Eager inference runs a copy of the graph calling the modules' forward directly: same outputs, hooks on
    submodules still run, nothing added to the module tree or the state."""
    model = _prepared("shiftresnet20")
    x = torch.randn(2, 3, 32, 32)
    deployed = deploy(model, example_input=x[:1])
    names = {n for n, _ in deployed.named_modules()}
    keys = set(deployed.state_dict())
    _assert_same(model, deployed, x)
    assert "_direct" in deployed.__dict__
    assert {n for n, _ in deployed.named_modules()} == names and set(deployed.state_dict()) == keys
    seen = []
    shift = next(m for m in deployed.modules() if isinstance(m, IntegerShift))
    handle = shift.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.inference_mode():
        deployed(x)
    handle.remove()
    assert len(seen) == 1
    import copy

    _assert_same(model, copy.deepcopy(deployed), x)


def test_deploy_and_run_inside_inference_mode():
    """Buffers made in inference mode have no version counter: the per-shape caches must not need one."""
    model = _prepared("shiftresnet20")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        deployed = deploy(model, example_input=x[:1])
        module = IntegerShift(torch.tensor([[0, 0], [1, -1]]), inplace=True)
        got = deployed(x)
        y = torch.randn(1, 2, 4, 4)
        assert torch.equal(module(y.clone()), fs.shift2d(y, module.shifts))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_cpu_name_says_which_machine():
    """Benchmark reports name the CPU beyond its model name, which is the same ("AMD EPYC") for the Zen 2, 3 and 5
    machines this project ran on: family and model, vector ISA and last-level cache where Linux tells them."""
    from pathlib import Path

    from fewshifts.deploy.bench import cpu_name

    name = cpu_name()
    assert name and "\n" not in name
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "cpu family" in cpuinfo.read_text():
        assert "family" in name and "model" in name and "AVX" in name
