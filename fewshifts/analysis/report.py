"""Per-layer shift statistics (SSL Tab. 2): unshifted / channels, sparsity, mean |shift|, in markdown and JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fewshifts.layers import ShiftLayer, shift_layers

__all__ = ["LayerStats", "ShiftReport", "shift_report", "load_for_analysis", "recorded_dataset"]


@dataclass
class LayerStats:
    """One shift layer: SSL Tab. 2 columns plus the displacement histogram of SSL Fig. 5."""

    name: str
    kind: str
    channels: int
    unshifted: int
    sparsity: float
    mean_abs_shift: float  # mean over channels and both axes of |real-valued shift|
    max_abs_shift: float
    stride: int
    displacements: dict[str, int]  # "dy,dx" -> number of channels with that integer shift
    shifts: list[list[float]]  # (C, 2) real-valued (dy, dx), for the ASL Fig. 3 view


@dataclass
class ShiftReport:
    """All shift layers of a model with totals; ``source`` names the model file or run."""

    model: str
    source: str
    layers: list[LayerStats]

    @property
    def channels(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def unshifted(self) -> int:
        return sum(layer.unshifted for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.unshifted / self.channels if self.channels else float("nan")

    def to_dict(self, with_shifts: bool = True) -> dict:
        layers = [asdict(layer) for layer in self.layers]
        if not with_shifts:
            for layer in layers:
                layer.pop("shifts")
        return dict(model=self.model, source=self.source, channels=self.channels, unshifted=self.unshifted,
                    sparsity=self.sparsity, layers=layers)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        """The SSL Tab. 2 view: layer, unshifted / channels, shift sparsity, mean |shift|, and the total."""
        lines = [f"Shift sparsity of {self.model} ({self.source})", "",
                 "| layer | kind | unshifted / channels | sparsity | mean abs shift | displacements |",
                 "|---|---|---:|---:|---:|---:|"]
        for s in self.layers:
            lines.append(f"| {s.name} | {s.kind} | {s.unshifted} / {s.channels} | {s.sparsity:.1%} | "
                         f"{s.mean_abs_shift:.3f} | {len(s.displacements)} |")
        mean_abs = (sum(s.mean_abs_shift * s.channels for s in self.layers) / self.channels) if self.channels else 0.0
        lines.append(f"| **total** | | {self.unshifted} / {self.channels} | {self.sparsity:.1%} | {mean_abs:.3f} | |")
        return "\n".join(lines) + "\n"


@torch.no_grad()
def _layer_stats(name: str, layer: ShiftLayer) -> LayerStats:
    real = layer.shifts.detach().float().cpu()
    integer = layer.integer_shifts()
    keys, counts = torch.unique(integer, dim=0, return_counts=True)
    displacements = {f"{int(dy)},{int(dx)}": int(n) for (dy, dx), n in zip(keys.tolist(), counts.tolist())}
    return LayerStats(name=name, kind=type(layer).__name__, channels=layer.channels, unshifted=layer.unshifted(),
                      sparsity=layer.sparsity(), mean_abs_shift=float(real.abs().mean()),
                      max_abs_shift=float(real.abs().max()), stride=layer.stride, displacements=displacements,
                      shifts=[[round(v, 5) for v in row] for row in real.tolist()])


def shift_report(model: nn.Module, source: str = "") -> ShiftReport:
    """Statistics of every shift layer of ``model`` in module order; ValueError if it has none."""
    layers = shift_layers(model)
    name = getattr(model, "model_spec", {}).get("name", type(model).__name__)
    if not layers:
        raise ValueError(f"{name} has no shift layers to analyze")
    return ShiftReport(model=name, source=source, layers=[_layer_stats(n, m) for n, m in layers])


def load_for_analysis(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(eval-mode model, metadata) from a model file or a run directory (``model.safetensors`` + ``summary.json``).

    Raises FileNotFoundError for a missing path and ValueError for a file that is not a fewshifts model or
    whose weights do not fit its recorded architecture.
    """
    from fewshifts.models.io import load_model, read_model_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file or run directory: {path}")
    _, spec, extra = read_model_file(path)
    meta = dict(extra, model=spec)
    summary = path / "summary.json" if path.is_dir() else path.with_name("summary.json")
    if summary.is_file():
        try:
            meta["summary"] = json.loads(summary.read_text())
        except json.JSONDecodeError:
            pass
    return load_model(path).eval(), meta


def recorded_dataset(meta: dict) -> str | None:
    """The dataset a model was trained on, from :func:`load_for_analysis`'s metadata (the model file's, its run's
    summary or config), or None."""
    for source in (meta, meta.get("summary", {}), meta.get("summary", {}).get("config", {}), meta.get("config", {})):
        if isinstance(source, dict) and isinstance(source.get("dataset"), str):
            return source["dataset"]
    return None
