"""Export of the inference form: ONNX with integer shifts as Slice / Pad / Concat, and ``torch.export``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fewshifts.deploy.core import deploy

__all__ = ["export_onnx", "check_onnx", "export_program", "MIN_OPSET", "MAX_OPSET"]

# the lowered shifts slice and pad by sizes computed from the input shape (opset 11); torch 2.13 writes up to 23
MIN_OPSET, MAX_OPSET = 11, 23


def _example(model: nn.Module, example_input: Tensor | None, batch: int = 1) -> Tensor:
    if example_input is not None:
        return example_input
    cfg = getattr(model, "default_cfg", None) or {}
    return torch.randn(batch, *cfg.get("input_size", (3, 224, 224)))


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Tensor | None = None, opset: int = 17,
                dynamo: bool = False) -> Path:
    """Write ``deploy(model, lowered=True)`` as ONNX (dynamic batch; input ``input``, output ``logits``).

    Integer shifts become Slice / Pad / Concat, active shifts a depthwise Conv, BN is folded. The default
    TorchScript-based exporter is several times faster than ``dynamo=True`` and gives the same operators.
    ``opset``: :data:`MIN_OPSET` to :data:`MAX_OPSET` (at least 18 with ``dynamo=True``).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset should be an integer in [{MIN_OPSET}, {MAX_OPSET}] instead of {opset!r}")
    x = _example(model, example_input)
    lowered = deploy(model, example_input=x[:1], memory_format="contiguous", lowered=True).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(lowered, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=max(opset, 18))
        else:
            torch.onnx.export(lowered, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset)
    return path


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: list[Tensor], threads: int | None = None) -> float:
    """Largest output difference between onnxruntime and the eval-mode ``model``, relative to the output scale."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    model = model.eval()
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    return worst


def export_program(model: nn.Module, example_input: Tensor | None = None, lowered: bool = False,
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference form (shift custom ops kept as single nodes unless ``lowered``)."""
    x = _example(model, example_input, batch=2)
    deployed = deploy(model, example_input=x[:1], inplace=False, lowered=lowered).eval()
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    return torch.export.export(deployed, (x,), dynamic_shapes=dynamic)
