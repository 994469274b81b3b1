"""CPU latency of the inference form (SSL Fig. 2, ASL Tab. 1 style): FE-Net with sparse shifts against its
depthwise version and MobileNetV2, each eager / deployed / onnxruntime, plus a per-operator-type breakdown."""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import Tensor, nn

from fewshifts.deploy.core import deploy
from fewshifts.deploy.modules import ConvAct, IntegerShift, Subsample, write_back
from fewshifts.deploy.synthetic import random_shift_pattern_, randomize_batchnorm_
from fewshifts.layers import ShiftLayer

__all__ = ["BenchCase", "default_cases", "dw_ratio_bounds", "interleaved_times", "operator_breakdown", "run_benchmark",
           "OP_TYPES"]

OP_TYPES = ("1x1 conv", "spatial conv", "shift", "BN/ReLU", "add", "pool", "concat/split", "fc/other")
SSL90, DW, MBV2 = "FE-Net 1.0x SSL, 90% unshifted", "FE-Net 1.0x DW", "MobileNetV2 1.0x"  # the targets' cases


@dataclass
class BenchCase:
    """A model to time: a label, how to build it (registry name + kwargs) and its shift sparsity."""

    label: str
    name: str
    kwargs: dict = field(default_factory=dict)
    unshifted: float | None = None  # random sparse shift pattern with this fraction of (0, 0) channels

    def build(self, seed: int = 0) -> nn.Module:
        from fewshifts.models import create_model

        model = create_model(self.name, **self.kwargs)
        if self.unshifted is not None:
            random_shift_pattern_(model, self.unshifted, radius=1, seed=seed)
        return randomize_batchnorm_(model, seed).eval()


def default_cases() -> list[BenchCase]:
    """Issue 5's set: FE-Net 1.0x SSL at 60% and 90% unshifted, FE-Net 1.0x DW (SSL Tab. 6), MobileNetV2 1.0x."""
    return [
        BenchCase("FE-Net 1.0x SSL, 60% unshifted", "fenet_100", {}, 0.6),
        BenchCase(SSL90, "fenet_100", {}, 0.9),
        BenchCase(DW, "fenet_100", {"spatial": "dw"}),
        BenchCase(MBV2, "mobilenetv2_100"),
    ]


def _op_type(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        m = m.conv if isinstance(m, ConvAct) else m  # conv with its ReLU fused: counted as the conv
        if isinstance(m, nn.Conv2d):
            return "1x1 conv" if m.kernel_size == (1, 1) else "spatial conv"
        if isinstance(m, (IntegerShift, Subsample, ShiftLayer)):
            return "shift"
        if isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid)):
            return "BN/ReLU"
        if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            return "pool"
        return "fc/other"
    if node.target is write_back:
        return "add"
    name = getattr(node.target, "__name__", str(node.target))
    if name in ("add", "iadd", "add_"):
        return "add"
    if name in ("cat", "concat", "split", "getitem", "narrow", "chunk"):
        return "concat/split"
    if name in ("relu", "relu_", "sigmoid", "hardswish"):
        return "BN/ReLU"
    if name in ("mean", "adaptive_avg_pool2d", "avg_pool2d"):
        return "pool"
    return "fc/other"


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, totals: dict[str, float]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.totals = totals

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        start = time.perf_counter()
        out = super().run_node(n)
        kind = _op_type(self.module, n)
        self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - start
        return out


@torch.inference_mode()
def operator_breakdown(model: nn.Module, x: Tensor, repeats: int = 3) -> dict[str, float]:
    """Seconds per operator type (:data:`OP_TYPES`) of one forward pass, the fastest of ``repeats`` per type.

    ``model`` is traced with the deployment tracer (a deployed model already is a graph); each node is
    timed as it runs, so the sum is a little above the plain forward time (interpreter overhead).
    """
    from fewshifts.deploy.core import DeployedModel
    from fewshifts.deploy.tracing import trace

    fmt = torch.contiguous_format
    if isinstance(model, DeployedModel):
        fmt = torch.channels_last if model.memory_format == "channels_last" else fmt
        model = model.model
    gm = model if isinstance(model, fx.GraphModule) else trace(model, (x[:1],))
    if gm is None:
        raise ValueError(f"{type(model).__name__} cannot be traced for a per-operator breakdown")
    x = x.contiguous(memory_format=fmt)
    _TimingInterpreter(gm, {}).run(x.clone())  # warm-up
    runs = []
    for _ in range(repeats):
        runs.append({})
        _TimingInterpreter(gm, runs[-1]).run(x.clone())
    return {k: min(r.get(k, 0.0) for r in runs) for k in runs[0]}


def _onnx_session(model: nn.Module, x: Tensor, threads: int, folder: str):
    import onnxruntime as ort

    from fewshifts.deploy.export import export_onnx

    path = export_onnx(model, Path(folder) / f"m{id(model)}.onnx", x[:2] if len(x) > 1 else x)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal CPU
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda inp: session.run(None, {name: inp.numpy()})


def allocator() -> str:
    """The malloc this process runs with: tcmalloc or jemalloc when mapped (preloaded), else glibc's."""
    maps = Path("/proc/self/maps")
    loaded = maps.read_text() if maps.exists() else os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc"):
        if name in loaded:
            return f"{name} (LD_PRELOAD)"
    return "glibc malloc"


def cpu_name() -> str:
    """The CPU as benchmark reports name it: model name, then family/model, widest vector ISA and last-level cache
    where Linux tells them (machines of one cloud kind differ from task to task: "AMD EPYC" was a Zen 2, a Zen 3 and
    a Zen 5), e.g. ``AMD EPYC (family 26 model 2, AVX-512, 32 MiB L3)``."""
    try:
        info = dict(
            (k.strip(), v.strip())
            for k, _, v in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines())
            if v
        )
    except OSError:
        return platform.processor() or "unknown CPU"
    name = info.get("model name", platform.processor() or "unknown CPU")
    flags = info.get("flags", "").split()
    details = []
    if "cpu family" in info and "model" in info:
        details.append(f"family {info['cpu family']} model {info['model']}")
    if flags:
        details.append("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    try:  # the largest cache level of cpu0, e.g. "32768K"
        sizes = [
            (int((d / "level").read_text()), (d / "size").read_text().strip())
            for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")
        ]
        level, size = max(sizes)
        if size.endswith("K") and int(size[:-1]) % 1024 == 0:
            size = f"{int(size[:-1]) // 1024} MiB"
        details.append(f"{size} L{level}")
    except (OSError, ValueError):
        pass
    return f"{name} ({', '.join(details)})" if details else name


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matrix-multiply throughput (GFLOP/s) at the current thread count: the best of ``repeats``
    n x n x n products. What a 1x1 convolution (a matrix product) can reach at most on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def conv1x1_madds(model: nn.Module, size: int) -> int:
    """Multiply-adds of ``model``'s 1x1 convolutions for one ``size`` x ``size`` image."""
    total = 0

    def count(module: nn.Conv2d, inputs, output: Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return total


def run_benchmark(cases: list[BenchCase] | None = None, batches: tuple[int, ...] = (1, 32), size: int = 224,
                  threads: int = 2, repeats: int = 5, onnx: bool = True, breakdown_batch: int = 32,
                  log: Callable[[str], None] = print) -> dict:
    """Time every case eager / deployed / onnxruntime at each batch size; returns results for :func:`to_markdown`."""
    from fewshifts.models import list_models
    from fewshifts.ops.backend import name_for

    torch.set_num_threads(threads)
    cases = default_cases() if cases is None else cases
    missing = sorted({c.name for c in cases} - set(list_models()))
    if missing:
        raise ValueError(f"models not registered: {missing} (FE-Net / MobileNetV2 come with the models branch)")
    results = dict(rows=[], breakdown={}, size=size, threads=threads, repeats=repeats,
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   machine=f"{cpu_name()}, {os.cpu_count()} logical CPUs visible", allocator=allocator(),
                   torch=torch.__version__, shift_backend=name_for(torch.zeros(1)),
                   breakdown_batch=breakdown_batch, sgemm_gflops=sgemm_gflops() if breakdown_batch else None,
                   conv1x1_madds={})
    try:
        import onnxruntime

        results["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        onnx = False
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        forms = {}  # (label, form) -> callable
        for case in cases:
            model = case.build()
            results["conv1x1_madds"][case.label] = conv1x1_madds(model, size)
            with torch.inference_mode(False), torch.no_grad():
                deployed = deploy(model, example_input=torch.randn(1, 3, size, size))
            forms[case.label, "eager"], forms[case.label, "deployed"] = model, deployed
            if onnx:
                forms[case.label, "onnxruntime"] = _onnx_session(model, torch.randn(2, 3, size, size), threads, folder)
            log(f"built {case.label}")
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            samples = interleaved_times(forms, x, repeats if batch > 1 else 4 * repeats)
            for case in cases:
                row = dict(model=case.label, batch=batch)  # fastest run: the least disturbed on a shared machine
                for (label, form), times in samples.items():
                    if label == case.label:
                        row[f"{form}_ms"] = 1e3 * min(times)
                        row[f"{form}_median_ms"] = 1e3 * statistics.median(times)
                results["rows"].append(row)
                log(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                             if "median" not in k))
        if breakdown_batch:
            x = torch.randn(breakdown_batch, 3, size, size)
            for case in cases:
                results["breakdown"][case.label] = operator_breakdown(forms[case.label, "deployed"], x,
                                                                      repeats=max(1, repeats))
    return results


def interleaved_times(forms: dict, x: Tensor | None, repeats: int, warmup: int = 2) -> dict:
    """Run times (seconds) of each callable on ``x``, ``repeats`` each, timed round-robin (one run of each per
    round) so that load changes on a shared machine hit every form alike. Each round runs the forms in a new
    (seeded) order: a run pays for the write-back of the output its predecessor left dirty in the cache, and in a
    fixed order the same form always follows the same one (a kernel timed right after a 12.6-75 MB ``x.clone()``
    ran 5-9% slower than an identical build of it timed later in the round)."""
    for fn in forms.values():
        for _ in range(warmup):
            fn(x)
    samples: dict = {key: [] for key in forms}
    order = list(forms)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for key in order:
            start = time.perf_counter()
            forms[key](x)
            samples[key].append(time.perf_counter() - start)
    return samples


def _row(results: dict, label: str, batch: int) -> dict | None:
    return next((r for r in results["rows"] if r["model"] == label and r["batch"] == batch), None)


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """Issue 5's targets: (description, measured, met)."""
    checks = []
    for batch in sorted({r["batch"] for r in results["rows"]}):
        a, b, c = _row(results, SSL90, batch), _row(results, DW, batch), _row(results, MBV2, batch)
        if a and b:
            ratio = a["deployed_ms"] / b["deployed_ms"]
            checks.append((f"batch {batch}: deployed FE-Net (90%) <= 0.75x deployed FE-Net (DW)", f"{ratio:.2f}x",
                           ratio <= 0.75))
        if a and c:
            ratio = a["deployed_ms"] / c["deployed_ms"]
            checks.append((f"batch {batch}: deployed FE-Net (90%) <= 0.8x deployed MobileNetV2", f"{ratio:.2f}x",
                           ratio <= 0.8))
    share = results["breakdown"].get(SSL90)
    if share:
        fraction = share.get("shift", 0.0) / sum(share.values())
        checks.append(("shift ops <= 5% of deployed FE-Net (90%) time", f"{fraction:.1%}", fraction <= 0.05))
    slower = [f"{r['model']} b{r['batch']}" for r in results["rows"] if r["deployed_ms"] > r["eager_ms"]]
    checks.append(("deployed never slower than eager", "all faster" if not slower else "slower: " + ", ".join(slower),
                   not slower))
    return checks


def dw_ratio_bounds(results: dict) -> dict | None:
    """How low deployed FE-Net (90%) / FE-Net (DW) could go on this CPU (the 0.75x target of :func:`targets`).

    Both nets have the same 1x1 convolutions, which a matrix product's speed (``sgemm_gflops``) bounds from below:
    ``t1`` seconds at the breakdown batch. ``with_rest`` keeps everything else as measured in the breakdown (shifts,
    depthwise convs, pools, adds); ``floor`` also makes everything in FE-Net SSL but its 1x1 convs free and keeps
    only FE-Net (DW)'s depthwise convs (its spatial convs less the stem, which SSL has too) beside its 1x1 convs:
    t1 / (t1 + depthwise). The ratio grows with the shared time, so no faster kernel gets below ``floor``.
    """
    a, b = results["breakdown"].get(SSL90), results["breakdown"].get(DW)
    madds = results.get("conv1x1_madds", {}).get(SSL90)
    if not a or not b or not madds or not results.get("sgemm_gflops"):
        return None
    t1 = results["breakdown_batch"] * madds * 2 / (results["sgemm_gflops"] * 1e9)
    rest_ssl = sum(a.values()) - a.get("1x1 conv", 0.0)
    rest_dw = sum(b.values()) - b.get("1x1 conv", 0.0)
    depthwise = b.get("spatial conv", 0.0) - a.get("spatial conv", 0.0)
    return dict(t1=t1, with_rest=(t1 + rest_ssl) / (t1 + rest_dw), floor=t1 / (t1 + depthwise), madds=madds,
                measured_1x1=a.get("1x1 conv", 0.0), depthwise=depthwise)


def to_markdown(results: dict, command: str) -> str:
    """The latency report (``docs/benchmarks/latency.md``)."""
    has_ort = any("onnxruntime_ms" in r for r in results["rows"])
    lines = ["# Latency of the inference form (CPU)", "",
             f"- date: {results['date']}", f"- machine: {results['machine']}",
             f"- threads: {results['threads']} (torch.set_num_threads, onnxruntime intra-op)",
             f"- allocator: {results['allocator']}",
             f"- torch {results['torch']}, onnxruntime {results.get('onnxruntime', 'not installed')}, "
             f"shift kernels: {results['shift_backend']}",
             f"- input {results['size']}x{results['size']}, float32, fastest of {results['repeats']} runs "
             f"(x4 at batch 1) after 2 warm-up runs, all in one process, timed round-robin over all models and forms",
             f"- command: `{command}`",
             "- eager: the eval-mode model as built (NCHW); deployed: `fewshifts.deploy(model)` (BN folded, shifts "
             "baked, permuted and in place, FE-Block write-back, channels_last, convolutions as oneDNN calls with "
             "prepacked weights or ATen per input shape, direct module calls); onnxruntime: "
             "`export_onnx` (shifts as Slice/Pad/Concat)",
             "- random weights, random BN statistics and random sparse shift patterns (|shift| <= 1)", "",
             "| model | batch | eager ms | deployed ms | " + ("onnxruntime ms | " if has_ort else "")
             + "deployed / eager |",
             "|---|---:|---:|---:|" + ("---:|" if has_ort else "") + "---:|"]
    for r in results["rows"]:
        ort_cell = f" {r['onnxruntime_ms']:.1f} |" if has_ort else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['eager_ms']:.1f} | {r['deployed_ms']:.1f} |{ort_cell} "
                     f"{r['deployed_ms'] / r['eager_ms']:.2f} |")
    lines += ["", "## Targets (issue 5)", "", "| target | measured | met |", "|---|---:|:---:|"]
    lines += [f"| {d} | {m} | {'yes' if ok else '**no**'} |" for d, m, ok in targets(results)]
    if results["breakdown"]:
        lines += ["", f"## Time per operator type, deployed, batch {results['breakdown_batch']} (SSL Fig. 2 style)", "",
                  "Each graph node timed as it runs (fx.Interpreter), fastest run per type; shares of the summed time. "
                  "A ReLU fused "
                  "into its convolution counts as that convolution; `add` includes the FE-Block write-back.", "",
                  "| model | " + " | ".join(OP_TYPES) + " | total ms |", "|---|" + "---:|" * (len(OP_TYPES) + 1)]
        for label, parts in results["breakdown"].items():
            total = sum(parts.values())
            cells = " | ".join(f"{parts.get(k, 0.0) / total:.1%}" for k in OP_TYPES)
            lines.append(f"| {label} | {cells} | {1e3 * total:.1f} |")
    bounds = dw_ratio_bounds(results)
    if bounds:
        batch, gflops = results["breakdown_batch"], results["sgemm_gflops"]
        lines += ["", "## What this CPU allows for FE-Net (90%) / FE-Net (DW)", "",
                  f"float32 matrix product here: {gflops:.0f} GFLOP/s (2048^3, best of 5, same process). FE-Net "
                  f"1.0x's 1x1 convolutions ({bounds['madds'] / 1e6:.1f}M "
                  f"MAdds per image, the same in both nets) take at least {1e3 * bounds['t1']:.1f} ms at batch {batch} "
                  f"at that speed (measured: {1e3 * bounds['measured_1x1']:.1f} ms); FE-Net (DW)'s depthwise convs "
                  f"take {1e3 * bounds['depthwise']:.1f} ms.", "",
                  "| 1x1 convs at matrix-product speed, and | deployed FE-Net (90%) / FE-Net (DW) at best |",
                  "|---|---:|",
                  f"| everything else as measured above | {bounds['with_rest']:.2f}x |",
                  f"| everything else in FE-Net SSL free (floor) | {bounds['floor']:.2f}x |"]
    return "\n".join(lines) + "\n"
