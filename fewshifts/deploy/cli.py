"""``fewshifts export`` (ONNX / torch.export of the inference form) and ``fewshifts bench`` (CPU latency)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fewshifts.cli import positive_int
from fewshifts.deploy.export import MAX_OPSET, MIN_OPSET


def _trained_input_size(model: torch.nn.Module, meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the dataset the model was trained on (a Fashion-MNIST run: 1 x 28 x 28), else its default_cfg's."""
    from fewshifts.analysis.report import recorded_dataset
    from fewshifts.data import DATASETS

    dataset = recorded_dataset(meta)
    if dataset in DATASETS:
        channels, _, side = DATASETS[dataset]
        return channels, side, side
    return tuple(model.default_cfg["input_size"])


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model file (.safetensors) or run directory")
    parser.add_argument("--onnx", metavar="OUT.onnx", help="write ONNX (integer shifts as Slice/Pad/Concat)")
    parser.add_argument("--program", metavar="OUT.pt2", help="write a torch.export program (torch.export.save)")
    parser.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                        help="example input size (default: the recorded dataset's, else the model's default_cfg)")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset ({MIN_OPSET}..{MAX_OPSET})")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run_export(args: argparse.Namespace) -> int:
    from fewshifts.analysis.report import load_for_analysis
    from fewshifts.deploy.export import check_onnx, export_onnx, export_program

    if not args.onnx and not args.program:
        print("error: nothing to do; pass --onnx OUT.onnx and/or --program OUT.pt2", file=sys.stderr)
        return 2
    try:
        model, meta = load_for_analysis(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = tuple(args.input_size) if args.input_size else _trained_input_size(model, meta)
    x = torch.randn(2, *size)
    if args.onnx:
        try:
            path = export_onnx(model, args.onnx, x, opset=args.opset, dynamo=args.dynamo)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        if not args.no_check:
            err = check_onnx(path, model, [torch.randn(1, *size), torch.randn(3, *size)])
            print(f"onnxruntime vs PyTorch: max abs error {err:.2e} of the output scale")
            if err > 1e-4:
                print("error: ONNX outputs differ from the model", file=sys.stderr)
                return 1
    if args.program:
        program = export_program(model, x)
        Path(args.program).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, args.program)
        print(f"wrote {args.program}")
    return 0


def configure_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="docs/benchmarks/latency.md", help="markdown report path")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=positive_int, default=224)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-operator breakdown")
    parser.add_argument("--json", help="also write the raw results as JSON")


def run_bench(args: argparse.Namespace) -> int:
    import json

    from fewshifts.deploy.bench import run_benchmark, to_markdown

    try:
        results = run_benchmark(batches=tuple(args.batch), size=args.size, threads=args.threads,
                                repeats=args.repeats, onnx=not args.no_onnx,
                                breakdown_batch=0 if args.no_breakdown else max(args.batch))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "fewshifts bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "fewshifts bench"
    text = to_markdown(results, command.strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    print(f"wrote {out}")
    return 0
