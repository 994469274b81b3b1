"""``fewshifts`` command line: ``fewshifts COMMAND [options]``; each command lives with its concern."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# command -> (module defining ``configure_<command>(parser)`` and ``run_<command>(args) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("fewshifts.train.cli", "train a model (default: ShiftResNet-20 with SSL on Fashion-MNIST)"),
    "eval": ("fewshifts.train.cli", "evaluate a checkpoint or run directory on a test set"),
    "zoo": ("fewshifts.models.zoo", "params and MAdds of every model against the papers' numbers"),
    "analyze": ("fewshifts.analysis.cli", "per-layer shift sparsity tables and plots of a checkpoint"),
    "prune": ("fewshifts.analysis.cli", "remove the k least important shift layers and evaluate"),
    "export": ("fewshifts.deploy.cli", "deploy a checkpoint and export it to ONNX / torch.export"),
    "bench": ("fewshifts.deploy.cli", "CPU latency of deployed FE-Net vs depthwise and MobileNetV2"),
}

_TCMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def reexec_with_tcmalloc(command: list[str]) -> None:
    """Re-run ``command`` (``[python, ...]``) under tcmalloc when it is installed and not loaded (design.md
    section 4: glibc malloc page-faults every fresh large tensor, costing 1.6-2x in CPU training); returns
    without doing anything otherwise. FEWSHIFTS_TCMALLOC=0 disables it (the restarted process gets it too)."""
    if os.environ.get("FEWSHIFTS_TCMALLOC", "1") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in _TCMALLOC if Path(p).exists()), None)
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [lib, os.environ.get("LD_PRELOAD", "")])))
    env["FEWSHIFTS_TCMALLOC"] = "0"  # never loop
    os.execve(command[0], command, env)


def positive_int(text: str) -> int:
    """argparse ``type`` of the commands' counts and sizes: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be a positive integer instead of {text!r}")
    return value


def _usage() -> str:
    lines = ["usage: fewshifts COMMAND [options]   (fewshifts COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fewshifts: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fewshifts {name}", description=COMMANDS[name][1])
    getattr(module, f"configure_{name}")(parser)
    return int(getattr(module, f"run_{name}")(parser.parse_args(rest)) or 0)


def console() -> int:
    """Entry point of the installed ``fewshifts`` script and ``python -m fewshifts``.

    A worker of a multi-process run (torchrun, WORLD_SIZE > 1) leaves with ``os._exit`` once the command has returned
    and its output is flushed: with gloo, a worker tore down at interpreter exit aborted now and then ("terminate
    called without an active exception", SIGABRT, no Python frame left: a C++ thread still joinable when the
    process's static objects were destroyed; 3 of 12 two-process runs on a loaded 2-core machine). Everything the run
    writes is closed by then (records, checkpoints, the process group)."""
    argv = sys.argv[1:]
    if argv and argv[0] in COMMANDS:
        reexec_with_tcmalloc([sys.executable, "-m", "fewshifts", *argv])
    code = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
