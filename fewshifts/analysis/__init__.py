"""Analysis of learned shifts: per-layer sparsity tables and plots (SSL Tab. 2, Fig. 5; ASL Fig. 3), shift-layer
pruning (SSL Tab. 3)."""

from fewshifts.analysis.plots import plot_displacements, plot_real_shifts
from fewshifts.analysis.prune import accuracy, prune_markdown, prune_table, rank_shift_layers, remove_shift_layers_
from fewshifts.analysis.report import LayerStats, ShiftReport, load_for_analysis, shift_report

__all__ = [
    "LayerStats", "ShiftReport", "shift_report", "load_for_analysis", "plot_displacements", "plot_real_shifts",
    "rank_shift_layers", "remove_shift_layers_", "prune_table", "prune_markdown", "accuracy",
]
