"""Training (design: issue 4): ``train(cfg)`` with presets and resume; see :mod:`fewshifts.train.loop`."""

from fewshifts.train.config import DEFAULTS, list_presets, resolve
from fewshifts.train.loop import StopTraining, evaluate, train

__all__ = ["DEFAULTS", "StopTraining", "evaluate", "list_presets", "resolve", "train"]
