"""Plots of learned shifts: SSL Fig. 5 (integer displacements, area ~ channels) and ASL Fig. 3 (real values)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from fewshifts.analysis.report import ShiftReport

__all__ = ["plot_displacements", "plot_real_shifts"]


def _grid(n: int, title: str, panel: float = 2.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows + 0.5), squeeze=False)
    fig.suptitle(title)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, list(axes.flat[:n])


def _save(plt, fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_displacements(report: ShiftReport, path: str | os.PathLike) -> Path:
    """SSL Fig. 5 for every layer: one point per integer displacement (dx right, dy down), area ~ channel count."""
    plt, fig, axes = _grid(len(report.layers), f"{report.model}: integer shifts (area ~ channels)")
    radius = max([1] + [max(abs(int(v)) for v in key.split(",")) for s in report.layers for key in s.displacements])
    for ax, s in zip(axes, report.layers):
        keys = [tuple(int(v) for v in key.split(",")) for key in s.displacements]
        counts = list(s.displacements.values())
        scale = 900.0 / s.channels
        colors = ["tab:gray" if k == (0, 0) else "tab:blue" for k in keys]
        ax.scatter([dx for _, dx in keys], [dy for dy, _ in keys], s=[c * scale for c in counts], c=colors, alpha=0.7)
        ax.set_xlim(-radius - 0.8, radius + 0.8)
        ax.set_ylim(radius + 0.8, -radius - 0.8)  # dy > 0 reads from below: drawn downwards
        ax.set_aspect("equal")
        ax.grid(True, lw=0.3)
        ax.set_title(f"{s.name}\n{s.unshifted}/{s.channels} unshifted", fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, path)


def plot_real_shifts(report: ShiftReport, path: str | os.PathLike) -> Path:
    """ASL Fig. 3: the real-valued (dx, dy) of every channel of every layer."""
    plt, fig, axes = _grid(len(report.layers), f"{report.model}: real-valued shifts")
    for ax, s in zip(axes, report.layers):
        ax.scatter([dx for _, dx in s.shifts], [dy for dy, _ in s.shifts], s=4, alpha=0.5)
        lim = max(1.0, s.max_abs_shift) + 0.3
        ax.set_xlim(-lim, lim)
        ax.set_ylim(lim, -lim)
        ax.set_aspect("equal")
        ax.grid(True, lw=0.3)
        ax.set_title(f"{s.name}" + (f" (stride {s.stride})" if s.stride != 1 else ""), fontsize=8)
        ax.tick_params(labelsize=7)
    return _save(plt, fig, path)
