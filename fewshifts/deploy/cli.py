"""``fewshifts export`` (ONNX / torch.export of the inference form) and ``fewshifts bench`` (CPU latency)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model file (.safetensors) or run directory")
    parser.add_argument("--onnx", metavar="OUT.onnx", help="write ONNX (integer shifts as Slice/Pad/Concat)")
    parser.add_argument("--program", metavar="OUT.pt2", help="write a torch.export program (torch.export.save)")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="example input size (default: the model's default_cfg)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run_export(args: argparse.Namespace) -> int:
    from fewshifts.analysis.report import load_for_analysis
    from fewshifts.deploy.export import check_onnx, export_onnx, export_program

    if not args.onnx and not args.program:
        print("error: nothing to do; pass --onnx OUT.onnx and/or --program OUT.pt2", file=sys.stderr)
        return 2
    try:
        model, _ = load_for_analysis(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = tuple(args.input_size) if args.input_size else tuple(model.default_cfg["input_size"])
    x = torch.randn(2, *size)
    if args.onnx:
        path = export_onnx(model, args.onnx, x, opset=args.opset, dynamo=args.dynamo)
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
