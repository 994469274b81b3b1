"""Training throughput (images/s) of ShiftResNet-20 on Fashion-MNIST at batch 128, one process (issue 4).

Variants: SSL (``shift='sparse'``, with the shift penalty), a 3x3 depthwise conv in place of the shift
(``shift='dw'``), and no spatial op (``shift='none'``); fp32 and bf16 autocast. Each timed step is a full
training step as in ``fewshifts train`` (batched augmentation, forward, loss (+ penalty), backward, SGD).
Variants are timed round-robin (``--rounds`` rounds of ``--steps`` steps after ``--warmup`` steps) so that
load from other processes hits them alike; the table reports the median step time over all timed steps.

    python benchmarks/train.py                 # writes docs/benchmarks/train.md
    FEWSHIFTS_BACKEND=cpp python benchmarks/train.py --out docs/benchmarks/train.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewshifts.cli import reexec_with_tcmalloc  # noqa: E402
from fewshifts.data import build_loader  # noqa: E402
from fewshifts.deploy.bench import allocator, cpu_name  # noqa: E402
from fewshifts.layers import param_groups, shift_penalty  # noqa: E402
from fewshifts.models import create_model  # noqa: E402
from fewshifts.ops.backend import name_for, requested  # noqa: E402

VARIANTS = ("sparse", "dw", "none")
PRECISIONS = ("fp32", "bf16")


class Runner:
    """One variant's model, optimizer and batches; :meth:`step` runs and times one training step."""

    def __init__(self, shift: str, precision: str, loader, penalty: float) -> None:
        torch.manual_seed(0)
        self.model = create_model("shiftresnet20", num_classes=10, in_chans=1, shift=shift)
        self.opt = torch.optim.SGD(param_groups(self.model, 5e-4), lr=0.01, momentum=0.9)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        self.penalty = penalty if shift == "sparse" else 0.0
        self.loader, self.epoch, self.batches = loader, 0, iter(())
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t = time.perf_counter()
        batch = next(self.batches, None)
        if batch is None:
            self.epoch += 1
            self.batches = iter(self.loader.batches(self.epoch))
            batch = next(self.batches)
        x, y = batch
        with self.autocast:
            loss = F.cross_entropy(self.model(x), y)
        if self.penalty:
            loss = loss + self.penalty * shift_penalty(self.model, 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if record:
            self.times.append(time.perf_counter() - t)


def machine() -> str:
    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} logical CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} "
            f"threads; load average at the end {load} (machine shared with other jobs)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="precisions to time (all of them take turns in one round-robin)")
    parser.add_argument("--penalty", type=float, default=5e-4, help="SSL shift penalty lambda")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "train.md"))
    args = parser.parse_args()
    reexec_with_tcmalloc([sys.executable, *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = build_loader("fashion-mnist", True, args.batch_size, data_dir=args.data_dir, subset=args.batch_size * 20)
    runners = {(s, p): Runner(s, p, loader, args.penalty) for p in args.precisions for s in VARIANTS}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step(record=False)
    for _ in range(args.rounds):
        for r in runners.values():
            for _ in range(args.steps):
                r.step(record=True)
    rate = {k: args.batch_size / statistics.median(r.times) for k, r in runners.items()}
    backend = f"FEWSHIFTS_BACKEND={requested()} (shift kernels used: {name_for(torch.zeros(1, 1, 1, 1))})"
    lines = [
        "# Training throughput: ShiftResNet-20 on Fashion-MNIST, batch 128, one process",
        "",
        f"- Machine: {machine()}",
        f"- Backend: {backend}; allocator: {allocator()}",
        f"- Command: `{' '.join(['python', *sys.argv])}`",
        f"- Method: full training steps (augmentation, forward, loss, backward, SGD); {args.warmup} warm-up steps, "
        f"then {args.rounds} round-robin rounds of {args.steps} steps per variant; median step time.",
        "",
        "| precision | SSL (sparse) img/s | depthwise 3x3 img/s | no spatial op img/s | SSL / dw (target >= 1.1) "
        "| SSL / none (target >= 0.9) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for p in args.precisions:
        s, d, n = (rate[(v, p)] for v in VARIANTS)
        lines.append(f"| {p} | {s:.1f} | {d:.1f} | {n:.1f} | {s / d:.2f} {'PASS' if s / d >= 1.1 else 'FAIL'} "
                     f"| {s / n:.2f} {'PASS' if s / n >= 0.9 else 'FAIL'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
