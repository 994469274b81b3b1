"""Speed of the shift ops against memcpy and the 3x3 depthwise conv they replace; writes docs/benchmarks/ops.md.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 FEWSHIFTS_BACKEND=cpp python benchmarks/ops.py

One process, ``torch.set_num_threads(2)``, float32. Within a (shape, layout) the candidates are timed round-robin
(one call of each per round, in a new order each round: ``fewshifts.deploy.bench.interleaved_times``) so that load
from other processes hits them alike; medians after warm-up.
Forward runs under ``torch.no_grad()``; forward+backward is ``op(x).backward(g)`` with grads for x (and for the
shifts / the conv weight). Ratios to memcpy always divide by the forward ``x.clone()`` time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fewshifts as fs
from fewshifts import ops
from fewshifts.deploy.bench import interleaved_times
from fewshifts.ops import backend

SHAPES = [(32, 96, 32, 32), (32, 576, 32, 32), (32, 1152, 16, 16), (1, 576, 112, 112)]
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
SPARSE_RANGE = 1.5  # sparse_shift2d: shifts ~ U[-1.5, 1.5] (rounds to -1/0/1 in even shares with ties at +-0.5/1.5)
ACTIVE_RANGE = 1.0  # active_shift2d: shifts ~ U[-1, 1], ASL's initialisation
INPLACE_SHIFTED = 0.1  # shift2d_: 10% of the channels shifted, 90% (0, 0)


def _candidates(shape, fmt):
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    grad = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    grouped = fs.grouped_shifts(C)
    sparse = (torch.rand(C, 2, generator=g) * 2 - 1) * SPARSE_RANGE
    active = (torch.rand(C, 2, generator=g) * 2 - 1) * ACTIVE_RANGE
    conv = nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).to(memory_format=fmt)
    inplace_shifts = torch.zeros(C, 2, dtype=torch.long)
    k = max(1, round(C * INPLACE_SHIFTED))
    inplace_shifts[:k] = fs.grouped_shifts(k) if k >= 9 else torch.tensor([1, 0])
    buf = x.clone()

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(x)
        return run

    def fwd_bwd(fn, *params):
        xr = x.detach().requires_grad_()

        def run():
            xr.grad = None
            for p in params:
                p.grad = None
            fn(xr).backward(grad)
        return run

    sp, ac = sparse.requires_grad_(), active.requires_grad_()
    return {
        "memcpy": (lambda: x.clone(), None),
        "shift2d": (fwd(lambda t: fs.shift2d(t, grouped)), fwd_bwd(lambda t: fs.shift2d(t, grouped))),
        "sparse_shift2d": (fwd(lambda t: fs.sparse_shift2d(t, sp)), fwd_bwd(lambda t: fs.sparse_shift2d(t, sp), sp)),
        "active_shift2d": (fwd(lambda t: fs.active_shift2d(t, ac)), fwd_bwd(lambda t: fs.active_shift2d(t, ac), ac)),
        "depthwise3x3": (fwd(conv), fwd_bwd(conv, conv.weight)),
        "shift2d_ (in place)": (lambda: ops.shift2d_(buf, inplace_shifts), None),
    }


def _measure(fns: dict, warmup: int, repeats: int) -> dict:
    """(median, best) milliseconds of each no-argument callable, timed round-robin in a new order each round."""
    times = interleaved_times({name: lambda _, fn=fn: fn() for name, fn in fns.items()}, None, repeats, warmup)
    return {name: (statistics.median(ts) * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def _vector_width() -> str:
    from fewshifts.ops import cpp

    module = cpp.load() if backend.name_for(torch.zeros(1)) == "cpp" else None
    return f", {module.vector_bytes()}-byte vectors" if module is not None else ""


def _machine() -> list[str]:
    from fewshifts.deploy.bench import allocator, cpu_name

    model = cpu_name()
    alloc = allocator()
    return [
        f"- Machine: {model}, {os.cpu_count()} logical CPUs visible, shared with other jobs while measuring "
        "(expect noise; ratios within one shape and layout are the meaningful numbers)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}",
        f"- Allocator: {alloc}",
        f"- Shift kernels: `{backend.name_for(torch.zeros(1))}` path (FEWSHIFTS_BACKEND="
        f"{os.environ.get('FEWSHIFTS_BACKEND', 'auto')}){_vector_width()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "ops.md"))
    parser.add_argument("--shapes", default=None, help="e.g. 32x96x32x32,1x576x112x112 (default: the four below)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]

    rows, checks = [], []
    for shape in shapes:
        for layout, fmt in LAYOUTS.items():
            cands = _candidates(shape, fmt)
            fwd_t = _measure({k: f for k, (f, _) in cands.items()}, args.warmup, args.repeats)
            both_t = _measure({k: b for k, (_, b) in cands.items() if b is not None}, args.warmup, args.repeats)
            fwd, both = ({k: v[0] for k, v in d.items()} for d in (fwd_t, both_t))  # medians
            fmin, bmin = ({k: v[1] for k, v in d.items()} for d in (fwd_t, both_t))  # best of the repeats
            mc, dw, dwb = fwd["memcpy"], fwd["depthwise3x3"], both["depthwise3x3"]
            tag = f"{'x'.join(map(str, shape))} {layout}"
            for name in cands:
                f, b = fwd[name], both.get(name)
                rows.append([tag, name, _fmt(f), _fmt(f / mc), _fmt(f / dw),
                             _fmt(b) if b else "", _fmt(b / mc) if b else "", _fmt(b / dwb) if b else ""])

            def check(what, num, den, limit, strict=False, tag=tag, d=(fwd, both), m=(fmin, bmin)):
                med = d[num[0]][num[1]] / d[den[0]][den[1]]
                best = m[num[0]][num[1]] / m[den[0]][den[1]]
                ok = med < limit if strict else med <= limit
                checks.append((tag, what, f"{med:.2f}x", f"{best:.2f}x", ok))

            check("shift2d fwd <= 1.3x memcpy", (0, "shift2d"), (0, "memcpy"), 1.3)
            check("active fwd+bwd <= 1.5x shift2d fwd+bwd", (1, "active_shift2d"), (1, "shift2d"), 1.5)
            for op in ("shift2d", "sparse_shift2d"):
                check(f"{op} fwd < depthwise fwd", (0, op), (0, "depthwise3x3"), 1.0, strict=True)
                check(f"{op} fwd+bwd < depthwise fwd+bwd", (1, op), (1, "depthwise3x3"), 1.0, strict=True)
            print(f"{tag}: " + ", ".join(f"{k} {v:.2f}ms" for k, v in fwd.items()), flush=True)

    cmd = "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 FEWSHIFTS_BACKEND=cpp python benchmarks/ops.py"
    lines = [
        "# Shift op benchmark (CPU)",
        "",
        *_machine(),
        f"- Command: `{cmd}`" + (f" (this run: `{' '.join(sys.argv[1:])}`)" if sys.argv[1:] else ""),
        f"- Medians of {args.repeats} round-robin repeats (a new order each round) after {args.warmup} warm-up calls, "
        "float32, wall clock.",
        f"- Inputs: `shift2d` uses `grouped_shifts(C)` (ShiftNet, 3x3, 8-connected); `sparse_shift2d` real shifts "
        f"U[-{SPARSE_RANGE}, {SPARSE_RANGE}]; `active_shift2d` real shifts U[-{ACTIVE_RANGE}, {ACTIVE_RANGE}] (ASL "
        f"init); depthwise = `nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False)` in the same memory format; "
        f"`shift2d_` shifts {INPLACE_SHIFTED:.0%} of the channels in place (90% unshifted).",
        "- `/memcpy` divides by the forward `x.clone()` time; `/dw` by the depthwise conv in the same mode.",
        "",
        "## Targets (issue 2)",
        "",
        "Result from the medians; the best-of-repeats ratio is shown as a load-robust cross-check.",
        "",
        "| shape layout | target | median ratio | best ratio | result |",
        "|---|---|---|---|---|",
        *[f"| {t} | {what} | {val} | {best} | {'pass' if ok else '**FAIL**'} |" for t, what, val, best, ok in checks],
        "",
        f"{sum(ok for *_, ok in checks)} of {len(checks)} checks pass.",
        "",
        "## Timings",
        "",
        "| shape layout | op | fwd ms | fwd /memcpy | fwd /dw | fwd+bwd ms | fwd+bwd /memcpy | fwd+bwd /dw |",
        "|---|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = out.with_name("ops_notes.md")
    if notes.exists():  # hand-written analysis kept next to the generated table
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
