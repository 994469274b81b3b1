"""Reproduce the SSL / ASL claims that do not depend on the dataset, on real Fashion-MNIST (issue 6).

Every row is its own training run under ``--runs``; a row whose ``summary.json`` exists is complete and
skipped, a row with a checkpoint is resumed (so the script can be stopped and restarted at any time).
All rows share one schedule and seed (:data:`SCHEDULE`, scaled by ``--epochs``). The tables are written to
``--doc`` (default ``docs/results.md``) from whatever rows are complete; missing rows are listed as such.

    python benchmarks/reproduce.py                      # everything (CPU: hours; see docs/results.md)
    python benchmarks/reproduce.py --only ssl-5e-4      # one row
    python benchmarks/reproduce.py --epochs 1 --subset 1024 --runs /tmp/r --doc /tmp/results.md   # smoke run

Rows: SSL Tab. 1 analog (ResNet-20, ShiftResNet-20 with grouped / active / SSL lambda 0, 1e-4, 5e-4 /
1x1 only), SSL Tab. 2 analog (per-layer sparsity of lambda = 5e-4), SSL Tab. 3 analog (zeroing the k least
important shift layers of the lambda = 0 model, evaluation only), SSL Tab. 6 analog (FE-Net 1.0x SSL vs
FE-Net 1.0x DW vs MobileNetV2 1.0x with the 28x28 stem of ``small_input=True``; deployed CPU latency).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fewshifts as fs
from fewshifts.train.checkpoint import list_checkpoints
from fewshifts.train.config import resolve
from fewshifts.train.loop import train

# One schedule for every row: SSL's CIFAR recipe (design.md section 3) in epochs: SGD 0.9, lr 0.1 / 10 at
# 50% and 75%, shifts frozen at 75%, weight decay 5e-4 (never on shifts/BN), penalty p = 2, batch 128.
SCHEDULE = dict(dataset="fashion-mnist", subset=None, eval_subset=None, batch_size=128, lr=0.1, schedule="step",
                milestones=[0.5, 0.75], gamma=0.1, momentum=0.9, weight_decay=5e-4, penalty_p=2,
                freeze_shifts_at=0.75, seed=0, precision="fp32", eval_every=0, ckpt_every=100, tensorboard=False)


@dataclass
class Row:
    key: str
    label: str
    table: str
    overrides: dict = field(default_factory=dict)


ROWS = [
    Row("resnet20", "ResNet-20 (3x3 convs)", "tab1", dict(model="resnet20", shift=None, shift_penalty=0.0)),
    Row("grouped", "ShiftResNet-20, grouped shift (ShiftNet)", "tab1",
        dict(model="shiftresnet20", shift="grouped", shift_penalty=0.0)),
    Row("active", "ShiftResNet-20, active shift (ASL)", "tab1",
        dict(model="shiftresnet20", shift="active", shift_penalty=0.0, normalized_shift_grad=True, shift_lr=0.01)),
    Row("ssl-0", "ShiftResNet-20, SSL lambda = 0", "tab1", dict(model="shiftresnet20", shift="sparse",
                                                                   shift_penalty=0.0)),
    Row("ssl-1e-4", "ShiftResNet-20, SSL lambda = 1e-4", "tab1", dict(model="shiftresnet20", shift="sparse",
                                                                         shift_penalty=1e-4)),
    Row("ssl-5e-4", "ShiftResNet-20, SSL lambda = 5e-4", "tab1", dict(model="shiftresnet20", shift="sparse",
                                                                         shift_penalty=5e-4)),
    Row("1x1", "ShiftResNet-20, 1x1 only", "tab1", dict(model="shiftresnet20", shift="none", shift_penalty=0.0)),
    Row("fenet-ssl", "FE-Net 1.0x, SSL (lambda = 1e-4)", "tab6",
        dict(model="fenet_100", shift=None, shift_penalty=1e-4, model_kwargs=dict(small_input=True))),
    Row("fenet-dw", "FE-Net 1.0x, depthwise 3x3", "tab6",
        dict(model="fenet_100", shift=None, shift_penalty=0.0, model_kwargs=dict(small_input=True, spatial="dw"))),
    Row("mobilenetv2", "MobileNetV2 1.0x", "tab6",
        dict(model="mobilenetv2_100", shift=None, shift_penalty=0.0, model_kwargs=dict(small_input=True))),
]


def run_row(row: Row, runs: Path, epochs: int, subset: int | None, threads: int,
            data_dir: str | None = None) -> dict | None:
    """Train (or resume, or skip) one row; its summary, or None if it stopped before the end."""
    out = runs / row.key
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    overrides = dict(SCHEDULE, **row.overrides, epochs=epochs, subset=subset, threads=threads, data_dir=data_dir,
                     out=str(out))
    print(f"[reproduce] {row.key}: {row.label}", flush=True)
    if list_checkpoints(out):
        return train(resume=out) or None
    return train(resolve("fmnist-cpu", overrides=overrides)) or None


def _load(runs: Path, key: str) -> dict | None:
    path = runs / key / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def table1(runs: Path) -> list[str]:
    lines = ["| network | test accuracy | params | MAdds | shift sparsity | train wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in (r for r in ROWS if r.table == "tab1"):
        s = _load(runs, row.key)
        if s is None:
            lines.append(f"| {row.label} | not run yet | | | | |")
            continue
        lines.append(f"| {row.label} | {_pct(s['test_acc'])} | {s['params'] / 1e3:.0f}K | {s['madds'] / 1e6:.1f}M "
                     f"| {_pct(s['sparsity'])} | {s['wall_time_s'] / 60:.0f} min |")
    return lines


def table2(runs: Path) -> list[str]:
    s = _load(runs, "ssl-5e-4")
    if s is None:
        return ["(the lambda = 5e-4 row has not run yet)"]
    model = fs.load_model(runs / "ssl-5e-4")
    lines = ["| layer | unshifted / channels | shift sparsity |", "|---|---:|---:|"]
    total_u = total_c = 0
    for name, layer in fs.layers.shift_layers(model):
        u = layer.unshifted()
        total_u, total_c = total_u + u, total_c + layer.channels
        lines.append(f"| {name} | {u} / {layer.channels} | {_pct(u / layer.channels)} |")
    lines.append(f"| total | {total_u} / {total_c} | {_pct(total_u / total_c)} |")
    return lines


def table3(runs: Path, data_dir: str | None) -> list[str]:
    if _load(runs, "ssl-0") is None:
        return ["(the lambda = 0 row has not run yet)"]
    from fewshifts.analysis.cli import dataset_evaluator
    from fewshifts.analysis.prune import prune_markdown, prune_table

    model = fs.load_model(runs / "ssl-0")
    return [prune_markdown(prune_table(model, dataset_evaluator("fashion-mnist", data_dir)))]


@torch.no_grad()
def deployed_latency_ms(model: torch.nn.Module, batch: int, repeats: int = 30) -> float:
    """Median latency of the deployed model on a (batch, 1, 28, 28) input."""
    from fewshifts.deploy.bench import interleaved_times

    times = interleaved_times({"deployed": fs.deploy(model.eval())}, torch.randn(batch, 1, 28, 28), repeats,
                              warmup=3)["deployed"]
    return 1e3 * sorted(times)[len(times) // 2]


def table6(runs: Path) -> list[str]:
    lines = ["| network | test accuracy | params | MAdds | shift sparsity | deployed latency b=1 | b=128 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in ROWS if r.table == "tab6"):
        s = _load(runs, row.key)
        if s is None:
            lines.append(f"| {row.label} | not run yet | | | | | |")
            continue
        model = fs.load_model(runs / row.key)
        lat = [deployed_latency_ms(model, b) for b in (1, 128)]
        lines.append(f"| {row.label} | {_pct(s['test_acc'])} | {s['params'] / 1e6:.2f}M | {s['madds'] / 1e6:.1f}M "
                     f"| {_pct(s['sparsity'])} | {lat[0]:.2f} ms | {lat[1]:.1f} ms |")
    return lines


def write_doc(path: Path, runs: Path, args: argparse.Namespace, data_dir: str | None) -> None:
    torch.set_num_threads(2)
    command = "python benchmarks/reproduce.py " + " ".join(sys.argv[1:])
    parts = [
        "# Results: the papers' claims on Fashion-MNIST",
        "",
        f"Generated by `{command.strip()}` on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}). Schedule for every row: "
        f"{args.epochs} epochs of {'all 60k' if args.subset is None else args.subset} training images, "
        "batch 128, SGD momentum 0.9, lr 0.1 divided by 10 at 50% and 75%, shifts frozen at 75%, weight "
        "decay 5e-4 (not on shifts/BN), shift penalty p = 2, seed 0, fp32; evaluation on the 10k test images.",
        "",
        "## SSL Tab. 1 analog (ShiftResNet-20)", "", *table1(runs), "",
        "## SSL Tab. 2 analog: per-layer sparsity, lambda = 5e-4", "", *table2(runs), "",
        "## SSL Tab. 3 analog: zeroing the k least important shift layers of the lambda = 0 model", "",
        *table3(runs, data_dir), "",
        "## SSL Tab. 6 analog (28x28 stem: `small_input=True`)", "", *table6(runs), "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    print(f"[reproduce] wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(Path.home() / ".cache" / "fewshifts" / "reproduce"),
                        help="directory of the per-row run directories (kept between invocations)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every row (same schedule for all)")
    parser.add_argument("--subset", type=int, default=None, help="first N training images (smoke runs only)")
    parser.add_argument("--only", nargs="*", default=None, help=f"row keys to run: {[r.key for r in ROWS]}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--doc", default="docs/results.md", help="where to write the tables")
    parser.add_argument("--no-train", action="store_true", help="only write the tables from complete rows")
    args = parser.parse_args(argv)
    runs = Path(args.runs) / f"e{args.epochs:g}" / ("full" if args.subset is None else f"s{args.subset}")
    keys = {r.key for r in ROWS}
    unknown = set(args.only or []) - keys
    if unknown:
        raise SystemExit(f"unknown row(s) {sorted(unknown)}; choose from {sorted(keys)}")
    if not args.no_train:
        for row in ROWS:
            if args.only is None or row.key in args.only:
                run_row(row, runs, args.epochs, args.subset, args.threads, args.data_dir)
    write_doc(Path(args.doc), runs, args, args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
