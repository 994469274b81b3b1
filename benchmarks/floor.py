"""The kernels against the memory traffic they cannot avoid, in one process; writes docs/benchmarks/floor.md.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 FEWSHIFTS_BACKEND=cpp python benchmarks/floor.py

A floor is a plain loop with the same reads and writes as a kernel, its stores streamed (non-temporal) as the
kernels' are above the cache budget: ``copy`` (read one tensor, write one) for the integer shift and its adjoint and
the bilinear forward, ``add`` (read two, write one) for the fused bilinear backward, ``dot`` (read two) for its shift
gradient alone. The floors are compiled here with ``torch.utils.cpp_extension.load_inline`` (AVX-512 or AVX2, about
a minute). Candidates are timed round-robin in a new order each round (``interleaved_times``); medians in ms, and
each kernel's ratio to its floor. Shifts as in ``benchmarks/ops.py``: ShiftNet's groups for the integer shift,
U[-1, 1] for the bilinear one. Both memory formats (a floor reads and writes memory in order, whatever the
layout). See docs/benchmarks/ops_notes.md (nineteenth and twentieth sessions).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fewshifts as fs
from fewshifts.deploy.bench import cpu_name, interleaved_times
from fewshifts.ops import cpp

SHAPES = [(32, 576, 32, 32), (32, 1152, 16, 16), (1, 576, 112, 112)]
FLOOR_OF = {  # each kernel's floor: the same reads and writes
    "x.clone()": "copy",
    "shift_forward": "copy",
    "shift_backward": "copy",
    "bilinear_forward": "copy",
    "bilinear_backward": "add",
    "bilinear_backward_shifts": "dot",
}

# One loop over float32 vectors of 16 (AVX-512) or 8 (AVX2) lanes: out = a (+ b), streamed; or sum(a * b) only.
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#ifdef __AVX512F__
typedef __m512 V;
#define LOAD _mm512_loadu_ps
#define STREAM _mm512_stream_ps
#define ADD _mm512_add_ps
#define FMA _mm512_fmadd_ps
#define ZERO _mm512_setzero_ps
#define SUM _mm512_reduce_add_ps
#else
typedef __m256 V;
#define LOAD _mm256_loadu_ps
#define STREAM _mm256_stream_ps
#define ADD _mm256_add_ps
#define FMA _mm256_fmadd_ps
#define ZERO _mm256_setzero_ps
static float SUM(V v) { float s[8]; _mm256_storeu_ps(s, v); return s[0]+s[1]+s[2]+s[3]+s[4]+s[5]+s[6]+s[7]; }
#endif
constexpr int64_t L = sizeof(V) / sizeof(float);

// kind 0: out = a; 1: out = a + b; 2: sum(a * b), no output
torch::Tensor floor_loop(torch::Tensor a, torch::Tensor b, int64_t kind) {
  auto dense = [](const torch::Tensor& t) {
    return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  TORCH_CHECK(dense(a) && dense(b) && a.strides() == b.strides() && a.numel() % L == 0 && a.numel() == b.numel());
  auto out = kind == 2 ? torch::zeros({at::get_num_threads()}) : torch::empty_like(a);
  const float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  float* po = out.data_ptr<float>();
  TORCH_CHECK(kind == 2 || reinterpret_cast<uintptr_t>(po) % sizeof(V) == 0);
  at::parallel_for(0, a.numel() / L, 4096, [&](int64_t v0, int64_t v1) {
    V acc = ZERO();
    for (int64_t i = v0 * L; i < v1 * L; i += L) {
      if (kind == 0) STREAM(po + i, LOAD(pa + i));
      if (kind == 1) STREAM(po + i, ADD(LOAD(pa + i), LOAD(pb + i)));
      if (kind == 2) acc = FMA(LOAD(pa + i), LOAD(pb + i), acc);
    }
    if (kind == 2) po[at::get_thread_num()] += SUM(acc);
    _mm_sfence();
  });
  return out;
}
"""


def _calls(shape: tuple, memory_format: torch.memory_format, floors, ext) -> dict:
    """The floors and the kernels at one shape and memory format, as no-argument callables."""
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(shape, generator=gen).contiguous(memory_format=memory_format) for _ in range(2))
    C, H, W = shape[1:]
    grouped = fs.grouped_shifts(C)
    active = torch.rand(C, 2, generator=gen) * 2 - 1
    return {
        "floor copy": lambda: floors.floor_loop(x, x, 0),
        "floor add": lambda: floors.floor_loop(g, x, 1),
        "floor dot": lambda: floors.floor_loop(g, x, 2),
        "x.clone()": lambda: x.clone(),
        "shift_forward": lambda: ext.shift_forward(x, grouped, 1),
        "shift_backward": lambda: ext.shift_backward(g, grouped, 1, H, W),
        "bilinear_forward": lambda: ext.bilinear_forward(x, active, 1),
        "bilinear_backward": lambda: ext.bilinear_backward(g, x, active, 1),
        "bilinear_backward_shifts": lambda: ext.bilinear_backward_shifts(g, x, active, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/benchmarks/floor.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    floors = load_inline(
        "fewshifts_floor",
        cpp_sources=_SOURCE,
        functions=["floor_loop"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )
    ext = cpp.load(required=True)
    lines = ["# Shift kernels against their memory floors (CPU)", ""]
    lines.append(f"- Machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines.append(
        "- Command: `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 FEWSHIFTS_BACKEND=cpp "
        "python benchmarks/floor.py`"
    )
    lines.append(
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; medians of {args.repeats} round-robin "
        "repeats (a new order each round), float32, ms"
    )
    lines.append(
        "- Floors: copy = read one tensor, stream one out; add = read two, stream one out; dot = read two "
        "(loops over memory in order: one floor for both layouts). Notes: ops_notes.md, nineteenth and twentieth "
        "sessions."
    )
    lines.append("")
    lines.append("| shape layout | kernel | ms | floor | floor ms | kernel / floor |")
    lines.append("|---|---|---|---|---|---|")
    target = [
        "",
        "Issue 2's bilinear target, the kernels' (bilinear forward + backward) / (integer shift forward + backward),",
        "and the same ratio of their floors, (copy + add) / (copy + copy):",
        "",
        "| shape layout | kernels | floors |",
        "|---|---|---|",
    ]
    layouts = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
    for shape, (layout, memory_format) in itertools.product(SHAPES, layouts.items()):
        calls = _calls(shape, memory_format, floors, ext)
        times = interleaved_times({k: lambda _, f=f: f() for k, f in calls.items()}, None, args.repeats, args.warmup)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        tag = "x".join(map(str, shape)) + " " + layout
        for k, f in FLOOR_OF.items():
            fl = ms[f"floor {f}"]
            lines.append(f"| {tag} | {k} | {ms[k]:.2f} | {f} | {fl:.2f} | {ms[k] / fl:.2f}x |")
        kernels = (ms["bilinear_forward"] + ms["bilinear_backward"]) / (ms["shift_forward"] + ms["shift_backward"])
        at_floor = (ms["floor copy"] + ms["floor add"]) / (2 * ms["floor copy"])
        target.append(f"| {tag} | {kernels:.2f}x | {at_floor:.2f}x |")

    text = "\n".join(lines + target) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
