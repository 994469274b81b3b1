"""Model files: weights in safetensors, the architecture (registry name + arguments) in its metadata.

A file written by :func:`save_model` rebuilds itself: ``load_model(path)`` calls
``create_model(**spec)`` and loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from fewshifts.models.registry import create_model

MODEL_FILE = "model.safetensors"


def model_spec(model: nn.Module) -> dict:
    """The ``create_model`` arguments a model was built with (set by :func:`create_model`)."""
    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise ValueError("model was not built by fewshifts.create_model, so its architecture cannot be recorded")
    return spec


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write weights and architecture atomically (temp file + ``os.replace``); ``extra`` goes in the metadata."""
    from safetensors.torch import save_file

    spec = model_spec(model)
    for key, value in spec["kwargs"].items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model argument {key}={value!r} cannot be recorded in a model file ({exc})") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"fewshifts_model": json.dumps(spec)}
    if extra:
        metadata["fewshifts_extra"] = json.dumps(extra)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a model file is for sharing, as any file the user makes
    os.replace(tmp, path)
    return path


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(state_dict, spec, extra) of a model file, or of ``model.safetensors`` inside a run directory."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors model file ({exc})") from exc
    if "fewshifts_model" not in metadata:
        raise ValueError(f"{path}: safetensors file has no fewshifts architecture metadata")
    try:
        spec = json.loads(metadata["fewshifts_model"])
        extra = json.loads(metadata.get("fewshifts_extra", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt fewshifts metadata ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("kwargs", {}), dict):
        raise ValueError(f"{path}: corrupt fewshifts metadata (architecture should be a JSON object with a "
                         f"'kwargs' object instead of {spec!r})")
    missing = [k for k in ("name", "num_classes", "in_chans") if k not in spec]
    if missing:
        raise ValueError(f"{path}: corrupt fewshifts metadata (architecture lacks {', '.join(map(repr, missing))})")
    return state, spec, extra


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (file or run directory); weights loaded strictly.

    Raises ValueError, naming the file, when its metadata does not build a model or the weights do not fit it.
    """
    state, spec, _ = read_model_file(path)
    try:
        model = create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                             **spec.get("kwargs", {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: recorded architecture {spec!r} does not build a model ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not fit {spec['name']} ({first})") from exc
    return model.to(map_location)
