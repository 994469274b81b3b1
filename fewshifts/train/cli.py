"""``fewshifts train`` and ``fewshifts eval``.

``fewshifts train`` with no arguments runs the ``fmnist-cpu`` preset. Every config key is also an option:
``--batch-size 64``, ``--model-kwargs '{expansion: 3}'`` (values are parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from fewshifts.cli import positive_int
from fewshifts.train.config import DEFAULTS, HELP, list_presets, resolve

_SHORT = {"out": "DIR", "shift_penalty": "LAMBDA", "freeze_shifts_at": "STEP", "subset": "N", "penalty_p": "P"}


def _yaml_value(text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"cannot parse {text!r} as a YAML value ({exc})") from exc
    return value


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list_presets(), help="named recipe (default: fmnist-cpu)")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys (applied after the preset)")
    parser.add_argument("--resume", nargs="?", const="", metavar="RUN_OR_CHECKPOINT",
                        help="continue a run (its newest checkpoint) or a checkpoint folder; alone: the run in --out")
    group = parser.add_argument_group("config keys (override the preset and config file; values parsed as YAML)")
    for key, default in DEFAULTS.items():
        # boolean keys also work as bare flags: --compile means --compile true
        flag = dict(nargs="?", const=True) if isinstance(default, bool) else {}
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=_yaml_value, default=argparse.SUPPRESS,
                           metavar=_SHORT.get(key, key.upper()), help=f"{HELP[key]} (default: {default!r})", **flag)


def run_train(args: argparse.Namespace) -> int:
    from fewshifts.train.loop import StopTraining, train

    options = vars(args)
    overrides = {k: options[k] for k in DEFAULTS if k in options}
    try:
        if args.resume is not None:
            target = args.resume or overrides.get("out")
            if not target:
                raise ValueError("--resume needs a run directory, a checkpoint folder, or --out")
            overrides.pop("out", None)
            train(resume=target, overrides=overrides)
        else:
            train(resolve(args.preset, args.config, overrides))
    except StopTraining as stop:
        print(stop, file=sys.stderr if stop.code == 1 else sys.stdout, flush=True)
        return stop.code
    except (ValueError, FileNotFoundError) as exc:
        print(f"fewshifts train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_MODEL_FILE", help="run directory or model.safetensors file")
    parser.add_argument("--dataset", help="dataset to evaluate on (default: the one the model was trained on)")
    parser.add_argument("--data-dir", help="dataset root searched first")
    parser.add_argument("--batch-size", type=positive_int, help="evaluation batch size (default: the training run's)")
    parser.add_argument("--subset", type=positive_int, help="N test images (default: the training run's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast precision")


def run_eval(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from fewshifts.data import build_loader, dataset_info
    from fewshifts.models.io import load_model, read_model_file
    from fewshifts.train.loop import evaluate, setup_distributed

    try:
        _, spec, extra = read_model_file(args.path)
        dataset = args.dataset or extra.get("dataset")
        if dataset is None:
            raise ValueError(f"{args.path}: the model file does not say its dataset; pass --dataset")
        in_chans, num_classes, _ = dataset_info(dataset)
        if (in_chans, num_classes) != (spec["in_chans"], spec["num_classes"]):
            raise ValueError(f"dataset {dataset} does not fit the model {args.path}: {in_chans} channels and "
                             f"{num_classes} classes vs the model's {spec['in_chans']} and {spec['num_classes']}")
        _, _, device = setup_distributed(args.device)
        model = load_model(args.path, map_location=device)
        subset = args.subset if args.subset is not None else extra.get("eval_subset")
        loader = build_loader(dataset, False, args.batch_size or extra.get("eval_batch_size", 500), device,
                              args.data_dir or extra.get("data_dir"), subset=subset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fewshifts eval: error: {exc}", file=sys.stderr)
        return 1
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    loss, acc = evaluate(model, loader, 1, autocast)
    line = f"test accuracy {100 * acc:.2f}% (loss {loss:.4f}) on {dataset} test set ({len(loader.labels)} images)"
    summary = Path(args.path) / "summary.json" if Path(args.path).is_dir() else Path(args.path).with_name(
        "summary.json")
    recorded = json.loads(summary.read_text()).get("test_acc") if summary.is_file() else extra.get("test_acc")
    if recorded is not None and dataset == extra.get("dataset"):
        line += f"; recorded {100 * recorded:.2f}%: " + ("reproduced" if abs(recorded - acc) < 1e-9 else "DIFFERENT")
    print(line)
    return 0
