"""Model registry in the timm style: ``@register_model`` functions that only set arguments."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted, optionally filtered by a shell-style pattern (``'fenet*'``)."""
    names = sorted(_MODELS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; keyword arguments select its variant (``shift=``, ``width=``, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"model name should be a str instead of {type(name).__name__}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see fewshifts.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes should be a non-negative integer instead of {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans should be a positive integer instead of {in_chans!r}")
    model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    model.model_spec = {"name": name, "num_classes": num_classes, "in_chans": in_chans, "kwargs": kwargs}
    cfg = getattr(model, "default_cfg", None)
    if cfg and "input_size" in cfg:  # the default input has the channels the model was built for
        model.default_cfg = dict(cfg, input_size=(in_chans, *cfg["input_size"][1:]))
    return model
