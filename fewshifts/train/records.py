"""Run records: progress bar (tqdm on a terminal, plain log lines otherwise), ``metrics.csv``, TensorBoard,
``summary.json`` and the final summary line. Only rank 0 creates one of these."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

__all__ = ["Progress", "MetricsLog", "write_summary", "summary_line", "format_time"]

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "sparsity", "penalty",
                 "img_per_s", "elapsed_s"]


def percent(x: float | None) -> str:
    """``12.3%``; ``n/a`` for a missing (None or NaN) value."""
    return "n/a" if x is None or x != x else f"{100 * x:.1f}%"


def format_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """One bar per epoch on a terminal; ``log_every``-step plain lines (flushed) when not."""

    def __init__(self, total_steps: int, steps_per_epoch: int, enabled: bool = True,
                 tty: bool | None = None) -> None:
        self.total, self.per_epoch, self.enabled = total_steps, steps_per_epoch, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, first_step: int) -> None:
        if not (self.enabled and self.tty):
            return
        from tqdm import tqdm

        done = first_step - epoch * self.per_epoch
        self.bar = tqdm(total=self.per_epoch, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                        dynamic_ncols=True, leave=True)

    def update(self, step: int, stats: dict, eta_s: float) -> None:
        """Show the running statistics after global step ``step`` (1-based count of steps done)."""
        if not self.enabled:
            return
        text = (f"loss {stats['loss']:.4f} acc {100 * stats['acc']:.1f}% {stats['img_per_s']:.0f} img/s "
                f"sparsity {percent(stats['sparsity'])}")
        if self.bar is not None:
            self.bar.set_postfix_str(text + f" eta {format_time(eta_s)}", refresh=False)
            self.bar.update((step - 1) % self.per_epoch + 1 - self.bar.n)
        else:
            print(f"step {step}/{self.total} {text} eta {format_time(eta_s)}", flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()


class MetricsLog:
    """``metrics.csv`` (one row per epoch) and TensorBoard scalars; rows past ``resume_step`` are dropped."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.path = run_dir / "metrics.csv"
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def epoch(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self.scalars(row["step"], {f"epoch/{k}": v for k, v in row.items()
                                   if k not in ("epoch", "step") and isinstance(v, (int, float))})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def summary_line(s: dict) -> str:
    return (f"test accuracy {100 * s['test_acc']:.2f}% | shift sparsity {percent(s['sparsity'])} | "
            f"params {s['params'] / 1e6:.3f}M | MAdds {s['madds'] / 1e6:.1f}M | wall time "
            f"{format_time(s['wall_time_s'])} ({s['wall_time_s']:.0f} s) | {s['run_dir']}")


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
