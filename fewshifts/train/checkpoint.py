"""Checkpoints: ``<run>/checkpoints/step-NNNNNNNN/`` holding ``model.safetensors`` (weights, via
:func:`fewshifts.models.io.save_model`) and ``state.pt`` (optimizer, RNG, data position, running metrics,
config; plain tensors and containers, read back with ``torch.load(weights_only=True)``).

A checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a
half-written checkpoint under a final name; older ones are pruned only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fewshifts.models.io import MODEL_FILE, read_model_file, save_model

__all__ = ["save_checkpoint", "list_checkpoints", "load_checkpoint", "find_resume", "STATE_FILE"]

STATE_FILE = "state.pt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / MODEL_FILE, extra={"step": step})
    torch.save({**state, "step": step, "model_sha256": _sha256(tmp / MODEL_FILE)}, tmp / STATE_FILE)
    if final.exists():  # same step saved twice (e.g. a signal right at an epoch end): replace
        old = root / f".step-{step:08d}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(run_dir)[max(1, keep):]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model state_dict, state) of a checkpoint folder; a damaged checkpoint raises ValueError naming the file."""
    path = Path(path)
    model_file, state_file = path / MODEL_FILE, path / STATE_FILE
    for f in (model_file, state_file):
        if not f.is_file():
            raise ValueError(f"{f}: checkpoint file missing")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{state_file}: corrupt checkpoint state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{state_file}: not a fewshifts checkpoint state")
    if _sha256(model_file) != state.get("model_sha256"):
        raise ValueError(f"{model_file}: corrupt checkpoint weights (checksum differs from the one in {STATE_FILE})")
    weights, _, _ = read_model_file(model_file)
    return weights, state


def find_resume(target: str | os.PathLike) -> Path:
    """The checkpoint folder to resume from: ``target`` itself, or the newest checkpoint of run directory ``target``."""
    target = Path(target)
    if (target / STATE_FILE).is_file():
        return target
    found = list_checkpoints(target)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {target}")
    return found[0]


def load_for_resume(target: str | os.PathLike) -> tuple[Path, dict, dict]:
    """(checkpoint folder, weights, state); if it is damaged, the error names the previous good checkpoint."""
    path = find_resume(target)
    try:
        return (path, *load_checkpoint(path))
    except ValueError as exc:
        older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        hint = (f"; the previous checkpoint {older[0]} is kept: resume from it with --resume {older[0]}" if older
                else "; no older checkpoint exists")
        raise ValueError(f"cannot resume: {exc}{hint}") from exc
