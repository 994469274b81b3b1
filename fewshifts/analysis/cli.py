"""``fewshifts analyze`` (SSL Tab. 2, Fig. 5; ASL Fig. 3) and ``fewshifts prune`` (SSL Tab. 3)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from fewshifts.analysis.plots import plot_displacements, plot_real_shifts
from fewshifts.analysis.prune import accuracy, prune_markdown, prune_table, remove_shift_layers_
from fewshifts.analysis.report import load_for_analysis, recorded_dataset, shift_report
from fewshifts.cli import positive_int
from fewshifts.layers import shift_layers


def _out_dir(args: argparse.Namespace, default_name: str) -> Path:
    if args.out:
        return Path(args.out)
    source = Path(args.checkpoint)
    return (source if source.is_dir() else source.parent) / default_name


def _load(path: str):
    try:
        return load_for_analysis(path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def configure_analyze(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model file (.safetensors) or run directory")
    parser.add_argument("--out", help="output folder (default: <run>/analysis)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


def run_analyze(args: argparse.Namespace) -> int:
    loaded = _load(args.checkpoint)
    if loaded is None:
        return 2
    model, _ = loaded
    try:
        report = shift_report(model, source=str(args.checkpoint))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = _out_dir(args, "analysis")
    out.mkdir(parents=True, exist_ok=True)
    markdown = report.to_markdown()
    (out / "shifts.md").write_text(markdown)
    report.to_json(out / "shifts.json")
    written = [out / "shifts.md", out / "shifts.json"]
    if not args.no_plots:
        written += [plot_displacements(report, out / "displacements.png"),
                    plot_real_shifts(report, out / "real_shifts.png")]
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def configure_prune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model file (.safetensors) or run directory")
    parser.add_argument("--remove", type=int, default=None, metavar="K",
                        help="remove the K least important shift layers (default: table for K = 0..all)")
    parser.add_argument("--dataset", help="evaluation dataset (default: the one recorded with the model)")
    parser.add_argument("--data-dir", help="dataset folder")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate on the first N test examples")
    parser.add_argument("--batch-size", type=positive_int, default=500)
    parser.add_argument("--no-eval", action="store_true", help="sparsity only, no accuracy")
    parser.add_argument("--save", help="with --remove: write the pruned model file here (needs --remove)")
    parser.add_argument("--out", help="output folder for prune.md / prune.json, with --remove K prune-remove-K.md / "
                                      ".json (default: <run>/analysis)")


def dataset_evaluator(dataset: str, data_dir: str | None = None, limit: int | None = None,
                      batch_size: int = 500) -> Callable[[nn.Module], float]:
    """``model -> test accuracy`` on a dataset of :mod:`fewshifts.data` (imported when called)."""
    try:
        from fewshifts.data import build_loader
    except ImportError as exc:
        raise ValueError("evaluation needs the fewshifts.data package (or use --no-eval)") from exc
    loader = build_loader(dataset, train=False, batch_size=batch_size, data_dir=data_dir)
    batches = []
    seen = 0
    for x, y in loader.batches():
        if limit is not None and seen >= limit:
            break
        keep = len(y) if limit is None else min(len(y), limit - seen)
        batches.append((x[:keep], y[:keep]))
        seen += keep
    return lambda model: accuracy(model, batches)


def run_prune(args: argparse.Namespace) -> int:
    if args.save and args.remove is None:
        print("error: --save writes the pruned model: pass --remove K to say how many shift layers to remove",
              file=sys.stderr)
        return 2
    loaded = _load(args.checkpoint)
    if loaded is None:
        return 2
    model, meta = loaded
    n = len(shift_layers(model))
    if n == 0:
        print(f"error: {args.checkpoint} has no shift layers to prune", file=sys.stderr)
        return 2
    if args.remove is not None and not 0 <= args.remove <= n:
        print(f"error: --remove {args.remove}: the model has {n} shift layers (use 0..{n})", file=sys.stderr)
        return 2
    evaluate = None
    if not args.no_eval:
        dataset = args.dataset or recorded_dataset(meta)
        if dataset is None:
            print("error: no dataset recorded with the model; pass --dataset NAME or --no-eval", file=sys.stderr)
            return 2
        try:
            evaluate = dataset_evaluator(dataset, args.data_dir, args.limit, args.batch_size)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    ks = [args.remove] if args.remove is not None else None
    rows = prune_table(model, evaluate, ks)
    markdown = prune_markdown(rows)
    out = _out_dir(args, "analysis")
    out.mkdir(parents=True, exist_ok=True)
    stem = "prune" if args.remove is None else f"prune-remove-{args.remove}"  # the full table stays
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown)
    if args.save:
        from fewshifts.models.io import save_model

        remove_shift_layers_(model, args.remove)
        # the dataset travels with the pruned model (fewshifts eval finds it); the accuracy does not
        dataset = {"dataset": d} if (d := args.dataset or recorded_dataset(meta)) else {}
        print(f"wrote {save_model(model, args.save, extra=dict(dataset, pruned_shift_layers=args.remove))}")
    return 0
