"""Training (design: issue 4): ``train(cfg)`` with presets and resume; see :mod:`fewshifts.train.loop`."""

from fewshifts.train.config import DEFAULTS, list_presets, resolve
from fewshifts.train.loop import StopTraining, count_madds, evaluate, train

__all__ = ["DEFAULTS", "StopTraining", "count_madds", "evaluate", "list_presets", "resolve", "train"]
