"""Training configuration: defaults, named presets (``presets/*.yaml``), YAML files and ``--key value`` overrides.

Resolution order (later wins): :data:`DEFAULTS`, the preset (``fmnist-cpu`` unless a config file is given),
the YAML config file, command-line overrides. A ``shift`` that only the preset sets is not applied to a model
without a ``shift`` argument (the config then says ``shift: null``). The resolved configuration is saved as
``config.yaml`` in the run directory. Step-valued keys (``milestones``, ``freeze_shifts_at``, ``stop_at``...)
accept a fraction of the total steps when below 1 (``0.75``) or an absolute step count.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
import yaml
from torch import nn

from fewshifts.data import dataset_info
from fewshifts.models import create_model

__all__ = ["DEFAULTS", "HELP", "PRESETS_DIR", "list_presets", "load_preset", "load_yaml", "resolve", "at_step",
           "build_model", "model_arguments", "refuses_shift", "takes_shift"]

PRESETS_DIR = Path(__file__).parent / "presets"

# key -> (default, help). The one place where a training option is declared.
_OPTIONS: dict[str, tuple[object, str]] = {
    "model": ("shiftresnet20", "registered model name (fewshifts.list_models())"),
    "shift": (None, "spatial operator of shift models: sparse | active | grouped | dw | none; null: the model's own "
                    "(a preset's shift is not applied to models without a shift argument, e.g. fenet_100)"),
    "model_kwargs": ({}, "extra create_model keyword arguments, as a YAML mapping"),
    "dataset": ("fashion-mnist", "fashion-mnist | cifar10 | cifar100 | imagenet"),
    "data_dir": (None, "dataset root searched first (then $FEWSHIFTS_DATA, ~/.cache/fewshifts, /usr/share/datasets)"),
    "subset": (None, "train on N training images only: the first N (ImageNet: N spread evenly over the classes)"),
    "eval_subset": (None, "evaluate on N test images only: the first N (ImageNet: N spread evenly over the classes)"),
    "epochs": (None, "training length in epochs (ignored when steps is set)"),
    "steps": (None, "training length in optimizer steps"),
    "batch_size": (128, "global batch size (split evenly across DDP processes)"),
    "eval_batch_size": (500, "evaluation batch size"),
    "lr": (0.1, "peak learning rate"),
    "schedule": ("step", "learning-rate schedule: step | linear | cosine | constant"),
    "milestones": ([0.5, 0.75], "step schedule: steps (or fractions) where lr is multiplied by gamma"),
    "gamma": (0.1, "step schedule factor"),
    "warmup": (0, "linear warm-up length in steps (or fraction)"),
    "momentum": (0.9, "SGD momentum"),
    "nesterov": (False, "Nesterov momentum"),
    "weight_decay": (5e-4, "weight decay on conv/linear weights (never on shifts, BN or biases)"),
    "label_smoothing": (0.0, "cross-entropy label smoothing"),
    "shift_lr": (None, "learning rate of the shift parameters (default: lr); follows the schedule"),
    "shift_penalty": (0.0, "SSL lambda: adds lambda * sum ||shifts||_p^p to the loss"),
    "penalty_p": (2, "p of the shift penalty: 1 or 2"),
    "normalized_shift_grad": (False, "ASL normalized shift gradient (unit vector per channel)"),
    "freeze_shifts_at": (None, "stop learning shifts from this step (or fraction) on"),
    "color_jitter": (0.0, "ImageNet colour distortion strength (0: off)"),
    "color_jitter_until": (1.0, "ImageNet: colour distortion only before this step (or fraction)"),
    "workers": (8, "ImageNet DataLoader workers per process"),
    "precision": ("fp32", "fp32 | bf16 (autocast, CPU or CUDA) | fp16 (CUDA AMP with loss scaling)"),
    "channels_last": (False, "channels-last memory format for model and inputs"),
    "compile": (False, "torch.compile the model"),
    "device": ("auto", "auto | cpu | cuda | cuda:N"),
    "threads": (0, "CPU threads per process (0: PyTorch's default)"),
    "seed": (0, "seed of initialization, data order and augmentation"),
    "eval_every": (1, "evaluate on the test set every N epochs (0: only at the end)"),
    "ckpt_every": (0, "also checkpoint every N steps (0: at epoch ends only)"),
    "keep_checkpoints": (2, "number of checkpoints kept"),
    "log_every": (20, "steps between progress updates"),
    "stop_at": (None, "checkpoint and exit after this step (time-sliced jobs); continue with --resume"),
    "out": (None, "run directory (default: runs/<preset or model>-<time>)"),
    "tensorboard": (True, "write TensorBoard events to <out>/tb"),
}
DEFAULTS: dict[str, object] = {k: v for k, (v, _) in _OPTIONS.items()}
HELP: dict[str, str] = {k: h for k, (_, h) in _OPTIONS.items()}
CHOICES = {"schedule": ("step", "linear", "cosine", "constant"), "penalty_p": (1, 2),
           "precision": ("fp32", "bf16", "fp16")}


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping of config keys; unknown keys are an error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read YAML config ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config should be a YAML mapping instead of {type(data).__name__}")
    check_keys(data, str(path))
    return coerce_numbers(data)


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"preset should be one of {list_presets()} instead of {name!r}")
    return load_yaml(path)


def check_keys(cfg: dict, source: str) -> None:
    for key in cfg:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{source}: unknown config key {key!r}{hint}")


def resolve(preset: str | None = None, config_file: str | None = None, overrides: dict | None = None) -> dict:
    """DEFAULTS <- preset <- config file <- overrides, validated; the preset's ``shift`` is dropped (with a
    printed note) for a model without a ``shift`` argument, unless the config file or the overrides set it."""
    if preset is None and config_file is None:
        preset = "fmnist-cpu"
    preset_cfg = load_preset(preset) if preset is not None else {}
    user_cfg = load_yaml(config_file) if config_file is not None else {}
    overrides = overrides or {}
    check_keys(overrides, "command line")
    user_cfg.update(coerce_numbers(overrides))
    cfg = {**DEFAULTS, **preset_cfg, **user_cfg}
    validate(cfg)
    if preset_cfg.get("shift") and "shift" not in user_cfg and not takes_shift(cfg):
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"preset {preset}: shift {cfg['shift']!r} not applied, model {cfg['model']!r} has no shift argument "
                  "(the run records shift: null)", flush=True)
        cfg["shift"] = None
    cfg["preset"] = preset
    return cfg


def model_arguments(cfg: dict) -> dict:
    """``create_model``'s keyword arguments for a config: ``model_kwargs``, plus ``shift`` when set."""
    return dict(cfg["model_kwargs"], **({"shift": cfg["shift"]} if cfg["shift"] else {}))


def build_model(cfg: dict) -> nn.Module:
    """The config's model, sized for its dataset (a TypeError when it does not take :func:`model_arguments`)."""
    in_chans, num_classes, _ = dataset_info(cfg["dataset"])
    return create_model(cfg["model"], num_classes=num_classes, in_chans=in_chans, **model_arguments(cfg))


def refuses_shift(exc: TypeError) -> bool:
    """Whether ``create_model``'s TypeError is about a ``shift`` argument the model does not take."""
    return "'shift'" in str(exc)


def takes_shift(cfg: dict) -> bool:
    """Whether the config's model accepts its ``shift``: tried by building it on the meta device (no memory, no
    initialization). Failures other than a refused ``shift`` are left for the run to report."""
    try:
        with torch.device("meta"):
            build_model(cfg)
    except TypeError as exc:
        return not refuses_shift(exc)
    except Exception:
        return True
    return True


_TEXT_KEYS = {"model", "shift", "dataset", "data_dir", "schedule", "precision", "device", "out"}


def coerce_numbers(cfg: dict) -> dict:
    """YAML 1.1 reads ``1e-3`` as a string: turn such strings into floats outside the text-valued keys."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, str) and key not in _TEXT_KEYS:
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _step(v) -> bool:
    return _number(v) and v >= 0


# key -> (test, what it should be); keys whose default is None also accept None. Keys with a float or bool
# default not listed here should be a number or a boolean.
_KINDS = {
    **dict.fromkeys(("steps", "epochs", "batch_size", "eval_batch_size", "subset", "eval_subset", "log_every",
                     "keep_checkpoints"), (lambda v: _int(v) and v >= 1, "a positive integer")),
    **dict.fromkeys(("workers", "threads", "eval_every", "ckpt_every"),
                    (lambda v: _int(v) and v >= 0, "a non-negative integer")),
    **dict.fromkeys(("warmup", "freeze_shifts_at", "color_jitter_until", "stop_at"),
                    (_step, "a step count or a fraction (>= 0)")),
    "milestones": (lambda v: isinstance(v, list) and all(map(_step, v)), "a list of step counts or fractions (>= 0)"),
    **dict.fromkeys(("shift_lr", "shift_penalty"), (lambda v: _number(v) and v >= 0, "a number >= 0")),
    "seed": (_int, "an integer"),
    "model_kwargs": (lambda v: isinstance(v, dict), "a mapping"),
}


def validate(cfg: dict) -> None:
    """Check the choices, numbers and booleans up front: a bad value fails before the run starts, naming the key."""
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ValueError(f"{key} should be one of {choices} instead of {cfg[key]!r}")
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ValueError("set the training length with steps or epochs")
    for key, default in DEFAULTS.items():
        value = cfg[key]
        if key in _KINDS:
            test, what = _KINDS[key]
        elif isinstance(default, bool):
            test, what = (lambda v: isinstance(v, bool)), "true or false"
        elif isinstance(default, float):
            test, what = _number, "a number"
        else:
            continue
        if not (value is None and default is None) and not test(value):
            raise ValueError(f"{key} should be {what} instead of {value!r}")


def at_step(value: float | int | None, total: int) -> int | None:
    """A step given as an absolute count (>= 1) or as a fraction of ``total`` (< 1)."""
    if value is None:
        return None
    if value < 0:
        raise ValueError(f"a step should be >= 0 instead of {value!r}")
    return round(value * total) if value < 1 else int(value)
