// Single-pass CPU kernels for the shift operators (fewshifts/ops/reference.py holds the semantics they match).
//
// Integer shift (SSL Eq. 1/5):  out[n,c,i,j] = x[n,c,i*s+dy_c, j*s+dx_c], zero outside; its gradient is the
// adjoint movement (SSL Eq. 7). Integer shifts only move bits, so those kernels are dispatched on the element
// size. Bilinear shift (ASL Eq. 8-10): the four integer shifts around floor(shift) weighted by the fractional
// parts (a, b); its gradient for the shifts is ASL Eq. 8 differentiated (SSL Eq. 6).
//
// Layouts: the input is made contiguous in its own memory format (channels_last when it is channels_last and
// not also contiguous, else NCHW); the output has the same format. NCHW kernels work plane by plane, row by
// row (memcpy / vectorisable loops over padded rows); channels_last kernels work pixel by pixel, over runs of
// channels that share a displacement or channel by channel (integer), or over per-block lists of the corner
// displacements in use (bilinear). All are parallel over planes or rows (at::parallel_for). Integer kernels whose
// output exceeds the last-level cache (at most 16 MiB of it) write it with non-temporal stores (stream_output).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "shift_cpu.h"

// The width of the kernels' vectors (GCC vector types): 64 bytes (16 floats) where the compiler targets AVX-512,
// else 32 (8 floats, AVX2). -DFEWSHIFTS_VECTOR_BYTES=32 selects 32 on an AVX-512 CPU (FEWSHIFTS_VECTOR_BYTES=32 in
// the environment of the build: fewshifts/ops/cpp.py). On the Zen 5 of the fourteenth session, 64-byte vectors
// halved the instructions of the compute-bound bilinear kernels (docs/benchmarks/ops_notes.md).
#ifndef FEWSHIFTS_VECTOR_BYTES
#ifdef __AVX512F__
#define FEWSHIFTS_VECTOR_BYTES 64
#else
#define FEWSHIFTS_VECTOR_BYTES 32
#endif
#endif
#if FEWSHIFTS_VECTOR_BYTES == 64 && !defined(__AVX512F__)
#error "FEWSHIFTS_VECTOR_BYTES=64 needs AVX-512 (-mavx512f)"
#endif
#if FEWSHIFTS_VECTOR_BYTES != 32 && FEWSHIFTS_VECTOR_BYTES != 64
#error "FEWSHIFTS_VECTOR_BYTES should be 32 or 64"
#endif

namespace fewshifts {

int64_t vector_bytes() { return FEWSHIFTS_VECTOR_BYTES; }

namespace {

constexpr int64_t kVecBytes = FEWSHIFTS_VECTOR_BYTES;
constexpr int64_t kVectorsPerLine = 64 / kVecBytes;  // of a 64-byte cache line
#ifdef __AVX512F__
constexpr int kVectorRegisters = 32;  // zmm0-31 (and ymm0-31 with AVX-512VL)
#else
constexpr int kVectorRegisters = 16;
#endif

using at::Tensor;

int64_t floordiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int64_t output_size(int64_t size, int64_t stride) { return (size - 1) / stride + 1; }

Tensor new_output(const Tensor& like, int64_t h, int64_t w, bool channels_last) {
  return at::empty({like.size(0), like.size(1), h, w}, like.options().memory_format(format_of(channels_last)));
}

// An NCHW output of like's type for a kernel that writes it with non-temporal stores while reading `inputs` at the
// same element positions. Large tensors' data start at the same offset within a 4 KB page, so out[t] and in[t] share
// their address bits 0-11, and a load waits for an in-flight streamed store with the same bits (4K aliasing). The
// output's data therefore start as far as possible (about half a page) from every input's, mod 4 KB, in a storage one
// page longer. A stand-alone loop of the NCHW backward's pattern, 75 MB, 2 threads: streamed 1.11-1.24x the time of
// ordinary stores at the inputs' page offset, 0.78-0.86x half a page apart (docs/benchmarks/ops_notes.md).
Tensor output_apart(const Tensor& like, int64_t h, int64_t w, std::initializer_list<const void*> inputs) {
  constexpr int64_t kPage = 4096, kStep = 64;
  const int64_t n = like.size(0) * like.size(1) * h * w, es = like.element_size();
  Tensor storage = at::empty({n + kPage / es}, like.options());
  const int64_t base = reinterpret_cast<int64_t>(storage.data_ptr());
  int64_t best = 0, best_gap = -1;
  for (int64_t k = 0; k < kPage; k += kStep) {  // k: the output's offset in the page
    int64_t gap = kPage;
    for (const void* in : inputs) {
      const int64_t d = ((k - reinterpret_cast<int64_t>(in)) % kPage + kPage) % kPage;
      gap = std::min(gap, std::min(d, kPage - d));
    }
    if (gap > best_gap) best = k, best_gap = gap;
  }
  const int64_t skip = ((best - base) % kPage + kPage) % kPage / es;
  return storage.narrow(0, skip, n).view({like.size(0), like.size(1), h, w});
}

// Parallel loop over [0, n) items of about `cost` elements each; small problems stay on one thread.
template <typename F>
void parallel(int64_t n, int64_t cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, cost));
  at::parallel_for(0, n, grain, f);
}

void check_args(const Tensor& x, const Tensor& shifts, int64_t stride, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": x should be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), name, ": x should be a CPU tensor");
  TORCH_CHECK(shifts.dim() == 2 && shifts.size(0) == x.size(1) && shifts.size(1) == 2, name,
              ": shifts should have shape (C, 2) = (", x.size(1), ", 2), got ", shifts.sizes());
  TORCH_CHECK(stride == 1 || stride == 2, name, ": stride should be 1 or 2, got ", stride);
}

// Copies of a few bytes (a run of channels, a short row) without a library call: fixed-size blocks whose last
// one may overlap the previous ones.
inline void copy_bytes(char* __restrict__ d, const char* __restrict__ s, size_t n) {
  if (n >= 512) {
    std::memcpy(d, s, n);
  } else if (n >= 32) {
    size_t k = 0;
    for (; k + 32 <= n; k += 32) std::memcpy(d + k, s + k, 32);
    if (k < n) std::memcpy(d + n - 32, s + n - 32, 32);
  } else if (n >= 16) {
    std::memcpy(d, s, 16);
    std::memcpy(d + n - 16, s + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + n - 8, s + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(d, s, 4);
    std::memcpy(d + n - 4, s + n - 4, 4);
  } else {
    for (size_t k = 0; k < n; ++k) d[k] = s[k];
  }
}

inline void zero_bytes(char* d, size_t n) {  // all-zero bits are 0.0 in every floating type
  if (n >= 512) {
    std::memset(d, 0, n);
  } else if (n >= 32) {
    size_t k = 0;
    for (; k + 32 <= n; k += 32) std::memset(d + k, 0, 32);
    if (k < n) std::memset(d + n - 32, 0, 32);
  } else if (n >= 16) {
    std::memset(d, 0, 16);
    std::memset(d + n - 16, 0, 16);
  } else if (n >= 8) {
    std::memset(d, 0, 8);
    std::memset(d + n - 8, 0, 8);
  } else {
    for (size_t k = 0; k < n; ++k) d[k] = 0;
  }
}

// Copies of any length in 32-byte moves, four per iteration (the last move may overlap the previous ones). Used
// instead of memcpy for the spans of the integer kernels: glibc's memcpy uses `rep movsb` from 2 KB on, which on
// this Zen 3 is slow when source and destination are not equally aligned (a shifted copy): 1.5x slower per plane.
inline void copy_long(char* __restrict__ d, const char* __restrict__ s, size_t n) {
  if (n < 64) return copy_bytes(d, s, n);
  size_t k = 0;
  for (; k + 128 <= n; k += 128) {
    std::memcpy(d + k, s + k, 32);
    std::memcpy(d + k + 32, s + k + 32, 32);
    std::memcpy(d + k + 64, s + k + 64, 32);
    std::memcpy(d + k + 96, s + k + 96, 32);
  }
  for (; k + 32 <= n; k += 32) std::memcpy(d + k, s + k, 32);
  if (k < n) std::memcpy(d + n - 32, s + n - 32, 32);
}

template <typename T>
void copy_long_n(T* dst, const T* src, int64_t n) {
  copy_long(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n * sizeof(T));
}

// A store of B bytes (32, or 64 with AVX-512); with Stream a non-temporal one (d B-byte aligned), which writes the
// line without first reading it into the caches. For outputs too large to stay cached: a memory-bound kernel then
// moves 2 bytes per byte of output instead of 3 (read source, read for ownership, write back). Needs a store fence
// before the data is used (stream_fence, at the end of each parallel work item). put_vec stores one of the kernels'
// vectors (kVecBytes bytes).
template <int64_t B, bool Stream>
inline void put(char* d, const void* v) {
  static_assert(B == 32 || B == 64, "put: 32 or 64 bytes");
#ifdef __AVX2__
  if constexpr (Stream && B == 32) {
    __m256i w;
    std::memcpy(&w, v, 32);
    return _mm256_stream_si256(reinterpret_cast<__m256i*>(d), w);
  }
#endif
#ifdef __AVX512F__
  if constexpr (Stream && B == 64) {
    __m512i w;
    std::memcpy(&w, v, 64);
    return _mm512_stream_si512(reinterpret_cast<__m512i*>(d), w);
  }
#endif
  std::memcpy(d, v, B);
}

template <bool Stream>
inline void put_vec(char* d, const void* v) {
  put<kVecBytes, Stream>(d, v);
}

template <bool Stream>
inline void stream_fence() {
#ifdef __AVX2__
  if constexpr (Stream) _mm_sfence();
#endif
}

// copy_long with non-temporal stores where d and n are multiples of 32 bytes (else copy_long).
template <bool Stream, typename T>
void copy_long_put(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const size_t bytes = n * sizeof(T);
  if (!Stream || ((reinterpret_cast<uintptr_t>(d) | bytes) & 31) != 0) return copy_long(d, s, bytes);
  for (size_t k = 0; k < bytes; k += 32) put<32, Stream>(d + k, s + k);
}

// Size of cpu0's largest cache of `level` (Linux's sysfs, what lscpu shows); 0 where sysfs does not say. (glibc's
// sysconf(_SC_LEVEL3_CACHE_SIZE) can report much more than a core sees: 256 MiB on this project's 16 MiB Zen 2.)
inline int64_t cache_bytes(int level) {
  int64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream lv(dir + "level"), size(dir + "size");
    int l = 0;
    int64_t kb = 0;
    if (!(lv >> l) || !(size >> kb)) continue;  // "16384K"
    if (l == level) best = std::max(best, kb << 10);
  }
  return best;
}

// Size of the last-level cache that this CPU's cores share, else 16 MiB.
inline int64_t last_level_cache_bytes() {
  const int64_t best = std::max(cache_bytes(3), cache_bytes(2));
  return best > 0 ? best : int64_t{16} << 20;
}

// The data size above which a kernel's input is taken to come from memory and its output to go there: the last-level
// cache, at most 16 MiB. The L3 is shared with the other cores of its complex (and, on a cloud host, with other
// machines' processes): on the 32 MiB Zen 5 of the fourteenth session, outputs of 18.9 and 28.9 MB ran 0.68-0.91x
// the time streamed against ordinary stores and their inputs 0.78-0.92x with prefetch (most kernels; a 12.6 MB one
// was neutral either way), while on the 16 MiB Zen 2 a 12.6 MB output ran faster with ordinary stores (below).
constexpr int64_t kCacheBudgetCap = int64_t{16} << 20;

inline int64_t cache_budget() {
  static const int64_t budget = std::min(last_level_cache_bytes(), kCacheBudgetCap);
  return budget;
}

// The environment variable `name` where it says 0 or 1 (never / always: the kernels' switches), else `otherwise`.
inline bool env_switch(const char* name, bool otherwise) {
  const char* e = std::getenv(name);
  return e != nullptr && (e[0] == '0' || e[0] == '1') ? e[0] == '1' : otherwise;
}

// Whether `bytes` exceeds that budget, unless the environment variable `name` says 0 or 1 (env_switch).
inline bool above_cache_budget(int64_t bytes, const char* name) { return env_switch(name, bytes > cache_budget()); }

// Whether a kernel writing `bytes` of output should stream its stores: when the output alone exceeds the cache
// budget (above_cache_budget), so it would not stay cached for its consumer anyway. (With input and output together
// above it, a 12.6 MB NCHW shift on the 16 MiB L3 ran 0.92x `x.clone()` streamed against 0.66x with ordinary stores:
// its input stayed cached between calls.) FEWSHIFTS_STREAM=0 / =1 overrides (never / always; the tests cover both).
inline bool stream_output(int64_t bytes) { return above_cache_budget(bytes, "FEWSHIFTS_STREAM"); }

// stream_output for `count` blocks of `len` elements at dst (NCHW planes, or channels_last pixels) written as whole
// vectors of the kernels (kVecBytes): every block must start on a vector boundary.
template <typename T>
bool stream_blocks(const T* dst, int64_t count, int64_t len) {
  return (reinterpret_cast<uintptr_t>(dst) | (len * sizeof(T))) % kVecBytes == 0 &&
         stream_output(count * len * static_cast<int64_t>(sizeof(T)));
}

// Whether the flat loops stream an output of like's type with planes of h x w (stream_blocks): stride-1 NCHW, planes
// of whole vectors, output above the cache budget (the bilinear loops also need T == A: with_flat_stream).
inline bool streams_planes(const Tensor& like, int64_t h, int64_t w, bool channels_last, int64_t stride) {
  const int64_t es = like.element_size();
  return !channels_last && stride == 1 && h * w * es % kVecBytes == 0 &&
         stream_output(like.size(0) * like.size(1) * h * w * es);
}

// A kernel's output: from output_apart where its flat loops stream it (stream, from streams_planes), else new_output.
Tensor flat_output(const Tensor& like, int64_t h, int64_t w, bool channels_last, bool stream,
                   std::initializer_list<const void*> inputs) {
  return stream ? output_apart(like, h, w, inputs) : new_output(like, h, w, channels_last);
}

// Software prefetch kPrefetchBytes ahead of a kernel's input streams. The hardware prefetchers stop at 4 KB page
// boundaries and take a while to follow a stream into the next page; a 32x32 float plane is one page, and a
// channels_last row is a stream among cached ones. Measured in one process, prefetch on / off: the NCHW flat
// bilinear forward 0.85-0.95, the channels_last separable forward 0.88-0.93 and per-channel integer shift
// 0.77-0.89 (inputs of 29-75 MB; docs/benchmarks/ops_notes.md, ninth session).
constexpr int64_t kPrefetchBytes = 8192;

template <typename T>
inline void prefetch_ahead_of(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// The software prefetch of the channels_last bilinear kernels and of the ring-based selection (ring_strip users):
// into L2 (prefetcht1), not L1. These kernels compute about as long as they wait for memory, and a prefetch into L1
// likely holds one of the core's few L1 miss buffers until its line arrives, which their own loads then wait for;
// the L1's hardware prefetcher takes the lines on from L2. On a Zen 4 (AMD EPYC family 25 model 17, where T1 fills
// L2 only; eighteenth session, ops_notes.md) against prefetcht0, one process, shuffled rounds, inputs of 29-75 MB,
// one thread: separable forward 0.82-0.91x the time, fused backward 0.83-0.90x, quantization-aware backward
// 0.86-0.94x (two threads: 0.71-1.03x, noisier), the ring selection (per-channel integer shifts at 576 channels)
// 0.72-0.89x. The other integer kernels and the NCHW ones did not change (0.96-1.05x on one thread), and they keep
// prefetcht0. L2-only fills for T1 are new in Zen 4, so on Zen 2 and Zen 3 it should act as T0 (not measured). On a
// Zen 5 (family 26 model 2, twentieth session) T0 / T1, two threads, from memory: separable forward 0.90-0.98x,
// fused backward 0.95-1.01x, shift gradient 0.85-0.99x, ring selection 0.86-1.00x, quantization-aware backward
// 0.96-1.15x: mixed, and T1 kept.
template <typename T>
inline void prefetch_to_l2(const T* p) {
  __builtin_prefetch(p, 0, 2);
}


// Whether a kernel prefetches an input of `bytes`: where it exceeds the cache budget and so comes from memory
// (for an input that stays cached, 32x96x32x32, prefetching gained or lost a few percent by kernel: on / off
// 1.01-1.05 for the NCHW integer shift, 0.94-0.99 for the NCHW bilinear). The channels_last row kernels prefetch
// from a lower size on (rows_prefetched). FEWSHIFTS_PREFETCH=0 / =1 overrides (never / always).
inline bool prefetch_input(int64_t bytes) { return above_cache_budget(bytes, "FEWSHIFTS_PREFETCH"); }

// Whether the channels_last row kernels (below: the selection, PickRows, and the separable and fused bilinear
// kernels) prefetch a source of `bytes`: where it exceeds the private caches of the threads that run them (L2 per
// core x threads), not only the cache budget (prefetch_input). Rows of such a source come from L3 or memory, and the
// three or four rows that a kernel reads at once are streams among cached ones; the selection's first pass over a
// row, moreover, reads only the lines that its lanes take (a third to a half of each pixel at ShiftNet's groups).
// Zen 5 (twenty-first session, ops_notes.md), one build, this rule against prefetching above the cache budget only,
// shuffled rounds of the three ops' forward and forward + backward, one and two threads: 32x96x32x32 and
// 32x192x16x16 0.68-1.00x the time (active forward + backward 0.70-0.98x), 8x96x32x32 and 8x32x56x56 0.56-1.40x
// (most 0.8-1.0x), 2x576x28x28 0.68-1.22x; calls of one op repeated on the same tensors: 0.79-0.82x at 32x96x32x32,
// 0.92-1.21x at 6.3 MB, 1.06-1.10x at 8x96x32x32; ShiftResNet-20, ASNet-20 and FE-Net 1.0 training steps and
// inference (channels_last, batch 8-128): 0.99-1.02x, no change. Always prefetching cost 1-7% on inputs that stay in
// L2 (0.8-1.5 MB), hence the bound. FEWSHIFTS_PREFETCH=0 / =1 overrides (never / always).
inline bool rows_prefetched(int64_t bytes) {
  static const int64_t l2 = cache_bytes(2);
  const int64_t bound = l2 > 0 ? std::min(cache_budget(), l2 * at::get_num_threads()) : cache_budget();
  return env_switch("FEWSHIFTS_PREFETCH", bytes > bound);
}

// How far ahead (elements: whole pixels of C elements, at least kPrefetchBytes) the channels_last row kernels
// prefetch their newest source row, for a source of `bytes`; 0: no prefetch (rows_prefetched).
template <typename T>
int64_t prefetch_ahead(int64_t bytes, int64_t C) {
  if (C <= 0 || !rows_prefetched(bytes)) return 0;
  const int64_t pixel = C * static_cast<int64_t>(sizeof(T));
  return (kPrefetchBytes + pixel - 1) / pixel * C;
}

// Whether the channels_last two-pixel kernels at R = 3 (sep_row_pairs and backward_row_pairs, not their register
// forms) take two output rows per pass, where their input is not prefetched (ahead == 0 from prefetch_ahead: within
// the threads' L2, rows_prefetched): the two rows share the loads of the two middle source rows and of each vector's
// weights (or plan and sums). One build, either setting, shuffled rounds, two threads (Zen 5, twentieth session,
// ops_notes.md): cached (4-13 MB), the fused backward 0.81-1.03x the time of one row at a time (0.78-0.88x on one
// thread), the separable forward and input gradient 0.81-0.94x; from memory, with the software prefetch (of two new
// rows), the fused backward 1.01-1.22x at 1x576x112x112 and 32x576x32x32 (0.92-1.05x at 32x1152x16x16; no prefetch
// distance better), the separable kernels 0.85-1.11x. Since the twenty-first session inputs of 4-13 MB take one row
// with the prefetch: active_shift2d forward + backward 0.78-0.88x the time of two rows without it at 32x96x32x32
// (shuffled rounds with other calls). FEWSHIFTS_ROW_PAIRS=0 / =1 overrides (never / always; the tests cover both).
inline bool two_rows_per_pass(int64_t ahead) { return env_switch("FEWSHIFTS_ROW_PAIRS", ahead == 0); }

template <typename T>
void copy_n(T* dst, const T* src, int64_t n) {
  copy_bytes(reinterpret_cast<char*>(dst), reinterpret_cast<const char*>(src), n * sizeof(T));
}

template <typename T>
void zero_n(T* dst, int64_t n) {
  zero_bytes(reinterpret_cast<char*>(dst), n * sizeof(T));
}

// ------------------------------------------------------------------------------------------------------------
// Integer movement along one axis: output positions o0 + k*ostep read source positions s0 + k*sstep,
// k in [0, count); every other output position is zero.

struct Seg {
  int64_t o0, ostep, s0, sstep, count;

  int64_t source(int64_t o) const {  // source index of output position o, or -1
    int64_t t = o - o0;
    if (t < 0 || t % ostep != 0) return -1;
    t /= ostep;
    return t < count ? s0 + t * sstep : -1;
  }
  bool operator==(const Seg& o) const {
    return o0 == o.o0 && ostep == o.ostep && s0 == o.s0 && sstep == o.sstep && count == o.count;
  }
};

// Forward: output i (of n_out) reads source i*stride + d (of n_in).
Seg forward_seg(int64_t d, int64_t n_in, int64_t n_out, int64_t stride) {
  const int64_t lo = std::max<int64_t>(0, -floordiv(d, stride));
  const int64_t hi = n_in - 1 - d >= 0 ? std::min(n_out, floordiv(n_in - 1 - d, stride) + 1) : 0;
  return {lo, 1, lo * stride + d, stride, std::max<int64_t>(0, hi - lo)};
}

// Adjoint of forward_seg: full-size output position i*stride + d reads the small source at i.
Seg adjoint_seg(int64_t d, int64_t n_full, int64_t n_small, int64_t stride) {
  const Seg f = forward_seg(d, n_full, n_small, stride);
  return {f.s0, f.sstep, f.o0, f.ostep, f.count};
}

template <typename T>
void move_row(T* dst, int64_t n_dst, const T* src, const Seg& s) {
  if (src == nullptr || s.count == 0) {
    zero_n(dst, n_dst);
    return;
  }
  if (s.ostep == 1) {
    zero_n(dst, s.o0);
    if (s.sstep == 1) {
      copy_long_n(dst + s.o0, src + s.s0, s.count);
    } else {
      T* d = dst + s.o0;
      const T* p = src + s.s0;
      for (int64_t k = 0; k < s.count; ++k) d[k] = p[k * s.sstep];
    }
    zero_n(dst + s.o0 + s.count, n_dst - s.o0 - s.count);
  } else {
    zero_n(dst, n_dst);
    for (int64_t k = 0; k < s.count; ++k) dst[s.o0 + k * s.ostep] = src[s.s0 + k * s.sstep];
  }
}

struct Move {  // per channel row/column segments between a source (Hs, Ws) and a destination (Hd, Wd)
  int64_t N, C, Hs, Ws, Hd, Wd;
  std::vector<Seg> rows, cols;
};

// The integer shifts s (C x 2, (dy, dx) per channel) between an (H, W) input and its strided (Ho, Wo) output:
// forward (input -> output) or adjoint (output gradient -> input gradient, the inverse shift).
Move integer_move(const int64_t* s, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                  int64_t stride, bool adjoint) {
  Move m = adjoint ? Move{N, C, Ho, Wo, H, W, {}, {}} : Move{N, C, H, W, Ho, Wo, {}, {}};
  for (int64_t c = 0; c < C; ++c) {
    m.rows.push_back(adjoint ? adjoint_seg(s[2 * c], H, Ho, stride) : forward_seg(s[2 * c], H, Ho, stride));
    m.cols.push_back(adjoint ? adjoint_seg(s[2 * c + 1], W, Wo, stride) : forward_seg(s[2 * c + 1], W, Wo, stride));
  }
  return m;
}

template <typename U>
struct UVec;
template <>
struct UVec<uint16_t> {
  typedef uint16_t V __attribute__((vector_size(kVecBytes)));
};
template <>
struct UVec<uint32_t> {
  typedef uint32_t V __attribute__((vector_size(kVecBytes)));
};
template <>
struct UVec<uint64_t> {
  typedef uint64_t V __attribute__((vector_size(kVecBytes)));
};

struct Disp {
  int64_t dy, dx;
  bool operator<(const Disp& o) const { return dy < o.dy || (dy == o.dy && dx < o.dx); }
  bool operator==(const Disp& o) const { return dy == o.dy && dx == o.dx; }
};

// Stride-1 NCHW planes as flat arrays: destination pixel t = i*W + j of a channel shifted by (dy, dx) reads element
// t + dy*W + dx of its source plane, kept where (i + dy, j + dx) lies inside the image, else 0 (a per-displacement
// byte mask, widened to the vector's lanes on load: a few KB, cache resident). A plane then costs one vectorised
// loop with no per-row work or edge corrections. A masked-out read may reach into a neighbouring plane (its value
// is never used); the first and last planes, whose reads could leave the tensor, are copied into a zero-padded
// scratch first (flat_plane).
//
// Each kernel takes the flat form for planes up to the size where it was measured faster than its row-based form
// on this project's CPU (Zen 3, AVX2; same-process A/B at 7x7 to 112x112): the backward kernels and the integer
// shifts up to 112x112, where they are as fast or faster (the sparse backward 1.4x at 112x112, 2.1x at 16x16; the
// bilinear backward 1.1x at 112x112, 2.0x at 16x16); the bilinear forward up to 32x32 (1.0-1.7x; slower from
// 56x56 on, where its four masked loads cost more than the row form's per-row work), and up to 112x112 where it
// streams its output (streams_planes; measured with the ninth session's lagged stores): 0.77-0.86x the row
// form's time at 56x56 to 160x160 on the Zen 2, one process, 30 alternating calls, against 1.0-1.08x for outputs
// that stay cached.
// FEWSHIFTS_FLAT_MAX=P overrides both (0: row-based everywhere; the tests use it to cover both forms).
constexpr int64_t kFlatLargest = 112 * 112, kFlatBilinearForward = 32 * 32;

constexpr int64_t kFlatMaskBytes = int64_t{4} << 20;  // masks beyond this (shifts spread over many pixels): rows

inline bool use_flat(int64_t pixels, int64_t largest) {
  const char* v = std::getenv("FEWSHIFTS_FLAT_MAX");
  return pixels <= (v != nullptr ? std::atol(v) : largest);
}

struct FlatTaps {
  static constexpr int64_t kPad = kVecBytes / 2;  // mask bytes past the plane (a whole vector of any lane type)
  int64_t n = 0, taps = 0;                        // pixels per plane, taps per channel
  std::vector<std::vector<int8_t>> masks;         // one per distinct displacement: -1 inside, 0 outside
  std::vector<int64_t> off;                       // [c * taps + k]: flat offset of channel c's tap k
  std::vector<const int8_t*> mask;                // [c * taps + k]
  std::vector<int64_t> reach;                     // [c]: largest |offset| of the channel's taps
  int64_t H = 0, W = 0;                           // plane size
  std::vector<int64_t> dy;                        // [c * taps + k]: the tap's row displacement (H: reads nothing)
  std::vector<std::vector<int8_t>> columns;       // one per distinct column displacement dx: W bytes, -1 where
                                                  // column j + dx lies inside the plane, 0 elsewhere
  std::vector<const int8_t*> column;              // [c * taps + k]: the tap's column mask, in `columns`
  std::vector<int8_t> no_columns;                 // W zero bytes: the column mask of a row outside the plane
  int8_t ends[2 * kPad];                          // kPad times -1 then 0: tail(len) masks lanes [0, len)

  bool ok = true;                                 // false: the masks would exceed kFlatMaskBytes (none built)
  bool prefetch = false;                          // prefetch the loops' inputs (prefetch_input)

  // disp(c, k) gives channel c's tap k as (dy, dx); displacements of |dy| >= H or |dx| >= W read nothing.
  template <typename F>
  FlatTaps(int64_t C, int64_t H_, int64_t W_, int64_t taps_, const F& disp)
      : n(H_ * W_), taps(taps_), H(H_), W(W_) {
    // displacement (dy, dx), |dy| <= H, |dx| < W -> its mask, -1 before it is seen: a table rather than a map, whose
    // node per lookup cost 40 ns per channel and tap, serially (0.3 ms per call at 1152 channels, 8 taps)
    std::vector<int32_t> index((2 * H + 1) * (2 * W + 1), -1);
    std::vector<Disp> seen;
    std::vector<int64_t> which(C * taps);
    off.resize(C * taps);
    dy.resize(C * taps);
    reach.assign(C, 0);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < taps; ++k) {
        Disp d = disp(c, k);
        if (std::abs(d.dy) >= H || std::abs(d.dx) >= W) d = {H, 0};  // nothing inside: an all-zero mask
        int32_t& i = index[(d.dy + H) * (2 * W + 1) + d.dx + W];
        if (i < 0) i = static_cast<int32_t>(seen.size()), seen.push_back(d);
        which[c * taps + k] = i;
        off[c * taps + k] = d.dy == H ? 0 : d.dy * W + d.dx;
        dy[c * taps + k] = d.dy;
        reach[c] = std::max(reach[c], std::abs(off[c * taps + k]));
      }
    ok = static_cast<int64_t>(seen.size()) * (n + kPad) <= kFlatMaskBytes;
    if (!ok) return;
    for (const Disp& d : seen) {
      std::vector<int8_t> m(n + kPad, 0);
      for (int64_t r = std::max<int64_t>(0, -d.dy); r < std::min(H, H - d.dy); ++r)
        std::fill_n(m.begin() + r * W + std::max<int64_t>(0, -d.dx), W - std::abs(d.dx), int8_t(-1));
      masks.push_back(std::move(m));
    }
    for (int64_t i : which) mask.push_back(masks[i].data());
    std::vector<int32_t> column_of(2 * W + 1, -1);  // dx + W -> its mask in `columns`
    for (const Disp& d : seen) {
      int32_t& i = column_of[d.dx + W];
      if (i >= 0) continue;
      i = static_cast<int32_t>(columns.size());
      std::vector<int8_t> m(W, 0);
      for (int64_t j = std::max<int64_t>(0, -d.dx); j < std::min(W, W - d.dx); ++j) m[j] = -1;
      columns.push_back(std::move(m));
    }
    for (int64_t i : which) column.push_back(columns[column_of[seen[i].dx + W]].data());
    no_columns.assign(W, 0);
    std::fill_n(ends, kPad, int8_t(-1));
    std::fill_n(ends + kPad, kPad, int8_t(0));
  }
  FlatTaps(const FlatTaps&) = delete;  // `mask` points into `masks`
  FlatTaps(FlatTaps&&) = default;
  const int8_t* tail(int64_t len) const { return ends + kPad - len; }
};

// The flat form's taps for planes of H x W, or nothing (the row-based form) when the planes are larger than
// `largest` (use_flat) or the shifts spread over so many displacements that their masks would not stay small.
// input_bytes: the size of the loops' input (prefetch_input).
template <typename F>
std::optional<FlatTaps> flat_taps(int64_t C, int64_t H, int64_t W, int64_t taps, int64_t largest, int64_t input_bytes,
                                  const F& disp) {
  if (!use_flat(H * W, largest)) return std::nullopt;
  FlatTaps f(C, H, W, taps, disp);
  if (!f.ok) return std::nullopt;
  f.prefetch = prefetch_input(input_bytes);
  return std::optional<FlatTaps>(std::move(f));
}

// Bytes m[0, L) widened to a lane mask of the vector of U lanes (all ones where the byte is -1).
template <typename U>
inline typename UVec<U>::V lane_mask(const int8_t* m) {
#if FEWSHIFTS_VECTOR_BYTES == 64  // one sign-extending load, as below
  __m512i w;
  if constexpr (sizeof(U) == 2) {
    w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m)));
  } else if constexpr (sizeof(U) == 4) {
    w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  } else {
    w = _mm512_cvtepi8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  }
  return reinterpret_cast<typename UVec<U>::V>(w);
#elif defined(__AVX2__)  // one sign-extending load (GCC lowers the generic conversion below to scalar code)
  __m256i w;
  if constexpr (sizeof(U) == 2) {
    w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  } else if constexpr (sizeof(U) == 4) {
    w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  } else {
    int32_t b;
    std::memcpy(&b, m, sizeof(b));
    w = _mm256_cvtepi8_epi64(_mm_cvtsi32_si128(b));
  }
  return reinterpret_cast<typename UVec<U>::V>(w);
#else
  typedef int8_t B __attribute__((vector_size(kVecBytes / sizeof(U))));
  typedef std::make_signed_t<U> S;
  typedef S W __attribute__((vector_size(kVecBytes)));
  B b;
  std::memcpy(&b, m, sizeof(b));
  return reinterpret_cast<typename UVec<U>::V>(__builtin_convertvector(b, W));
#endif
}

// Source planes for the flat loops, which read whole vectors (up to `pad` elements past the plane's end): plane p
// itself, or (when its reads could leave the tensor) a copy in the middle of a zero-padded scratch of 3 planes (every
// offset is below one plane).
template <typename T>
const T* flat_plane(const T* base, int64_t p, int64_t planes, int64_t n, int64_t reach, std::vector<T>& scratch) {
  constexpr int64_t pad = kVecBytes / sizeof(T);
  const T* plane = base + p * n;
  if (p * n - reach >= 0 && (p + 1) * n + reach + pad <= planes * n) return plane;
  scratch.assign(3 * n + pad, T(0));
  std::copy(plane, plane + n, scratch.begin() + n);
  return scratch.data() + n;
}

// The flat loops go over whole vectors, body(t, full) for t = 0, L, ... below n: reads are whole vectors (the masks
// are zero past the plane's end); the last vector, full false where n is not a multiple of L, writes only up to the
// plane's end. It is peeled off the loop: with its short store inside, the compiler kept the loop's vectors
// in memory (a plane of 32x32 shifted 1.2-1.4x slower).
template <int L, typename F>
inline void for_vectors(int64_t n, const F& body) {
  int64_t t = 0;
  for (; t + L <= n; t += L) body(t, std::true_type{});
  if (t < n) body(t, std::false_type{});
}

// One NCHW plane. Stride 1 (forward or adjoint: the source and destination planes have one size): the valid rows
// are one contiguous span of the source (whole rows when dx = 0), copied with one memcpy; with dx != 0 each row's
// |dx| columns that received a neighbouring row's pixels are zeroed afterwards (the span is still in cache). Short
// rows (64-128 bytes) thus cost no per-row copy. Stride 2 goes row by row.
template <typename T>
void move_plane(const T* src, T* dst, const Move& m, int64_t c) {
  const Seg &rs = m.rows[c], &cs = m.cols[c];
  if (rs.ostep == 1 && rs.sstep == 1 && cs.ostep == 1 && cs.sstep == 1 && m.Hs == m.Hd && m.Ws == m.Wd) {
    const int64_t W = m.Wd;
    if (rs.count == 0 || cs.count == 0) return zero_n(dst, m.Hd * W);  // (o0 is arbitrary when count is 0)
    const int64_t y0 = rs.o0, y1 = rs.o0 + rs.count, a = cs.o0, b = cs.o0 + cs.count;  // valid rows, columns
    zero_n(dst, y0 * W + a);
    copy_long_n(dst + y0 * W + a, src + rs.s0 * W + cs.s0, (y1 - y0 - 1) * W + (b - a));
    for (int64_t y = y0; y < y1; ++y) {
      T* row = dst + y * W;
      for (int64_t x = b; x < W + (y + 1 < y1 ? a : 0); ++x) row[x] = T(0);  // this row's tail, next row's head
    }
    zero_n(dst + y1 * W, (m.Hd - y1) * W);
    return;
  }
  for (int64_t y = 0; y < m.Hd; ++y) {
    const int64_t r = m.rows[c].source(y);
    move_row(dst + y * m.Wd, m.Wd, r >= 0 ? src + r * m.Ws : nullptr, m.cols[c]);
  }
}

// Stride-1 integer shift of one plane as a flat masked copy (the bits move exactly; zero outside the mask); with
// Stream, whole vectors go out as non-temporal stores (out vector-aligned).
template <bool Stream, typename U>
void move_flat(U* out, const U* src, const FlatTaps& f, int64_t c) {
  using V = typename UVec<U>::V;
  constexpr int64_t L = kVecBytes / sizeof(U);
  const U* s = src + f.off[c];
  const int8_t* m = f.mask[c];
  const int64_t n = f.n;
  const bool pf = f.prefetch;
  for_vectors<L>(n, [&](int64_t t, auto full) {
    if (pf) prefetch_ahead_of(src + t);
    V v;
    std::memcpy(&v, s + t, sizeof(v));
    v &= lane_mask<U>(m + t);
    if constexpr (decltype(full)::value) {
      put_vec<Stream>(reinterpret_cast<char*>(out + t), &v);
    } else {
      copy_bytes(reinterpret_cast<char*>(out + t), reinterpret_cast<const char*>(&v), (n - t) * sizeof(U));
    }
  });
}

template <typename T>
void move_nchw(const T* src, T* dst, const Move& m) {
  const int64_t n = m.Hd * m.Wd;
  bool stride1 = m.Hs == m.Hd && m.Ws == m.Wd;
  for (int64_t c = 0; stride1 && c < m.C; ++c)
    stride1 = m.rows[c].ostep == 1 && m.rows[c].sstep == 1 && m.cols[c].ostep == 1 && m.cols[c].sstep == 1;
  const int64_t bytes = m.N * m.C * n * static_cast<int64_t>(sizeof(T));
  const auto f = stride1 ? flat_taps(m.C, m.Hd, m.Wd, 1, kFlatLargest, bytes, [&](int64_t c, int64_t) {
    const Seg &r = m.rows[c], &k = m.cols[c];
    return r.count > 0 && k.count > 0 ? Disp{r.s0 - r.o0, k.s0 - k.o0} : Disp{m.Hd, 0};
  }) : std::nullopt;
  if (f) {
    const bool stream = stream_blocks(dst, m.N * m.C, n);
    parallel(m.N * m.C, n, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch;
      for (int64_t p = begin, c = begin % m.C; p < end; ++p, c = c + 1 < m.C ? c + 1 : 0) {
        const T* plane = flat_plane(src, p, m.N * m.C, n, f->reach[c], scratch);
        stream ? move_flat<true>(dst + p * n, plane, *f, c) : move_flat<false>(dst + p * n, plane, *f, c);
      }
      if (stream) stream_fence<true>();
    });
    return;
  }
  parallel(m.N * m.C, m.Hd * m.Wd, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) move_plane(src + p * m.Hs * m.Ws, dst + p * m.Hd * m.Wd, m, p % m.C);
  });
}

struct Run {  // channels [c0, c0 + len) share one displacement
  int64_t c0, len;
};

std::vector<Run> runs_of(const Move& m) {
  std::vector<Run> runs;
  for (int64_t c = 0; c < m.C; ++c) {
    if (!runs.empty() && m.rows[c] == m.rows[c - 1] && m.cols[c] == m.cols[c - 1]) {
      ++runs.back().len;
    } else {
      runs.push_back({c, 1});
    }
  }
  return runs;
}

// channels_last with per-channel shifts (rounded learned shifts: many displacements per vector of channels): one
// element per channel, each from its own offset (measured faster here than blending whole vectors from 3-8 source
// pixels, move_nhwc_vec). Needs every axis map to be affine (o -> o*step + base on [lo, hi)): the forward movement
// and the stride-1 adjoint. Pixels where every channel reads inside the image skip the per-channel checks; there
// the loads of 16 channels go before their stores: a load-store-load loop ran 1.3-1.5x slower or not depending only
// on where the code landed in memory (identical instructions in two builds).
template <bool Stream, typename T>
bool move_nhwc_channels_as(const T* src, T* dst, const Move& m) {
  const int64_t C = m.C, step = m.rows[0].sstep;
  std::vector<int64_t> rlo(C), rhi(C), rb(C), clo(C), chi(C), cb(C), off(C);
  int64_t y0 = 0, y1 = m.Hd, x0 = 0, x1 = m.Wd;
  for (int64_t c = 0; c < C; ++c) {
    const Seg &r = m.rows[c], &k = m.cols[c];
    if (r.ostep != 1 || k.ostep != 1 || r.sstep != step || k.sstep != step) return false;
    rlo[c] = r.o0, rhi[c] = r.o0 + r.count, rb[c] = r.s0 - r.o0 * step;
    clo[c] = k.o0, chi[c] = k.o0 + k.count, cb[c] = k.s0 - k.o0 * step;
    off[c] = (rb[c] * m.Ws + cb[c]) * C + c;
    y0 = std::max(y0, rlo[c]), y1 = std::min(y1, rhi[c]), x0 = std::max(x0, clo[c]), x1 = std::min(x1, chi[c]);
  }
  parallel(m.N * m.Hd, m.Wd * C, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / m.Hd, y = q % m.Hd;
      const T* sn = src + n * m.Hs * m.Ws * C;
      T* d = dst + q * m.Wd * C;
      for (int64_t x = 0; x < m.Wd; ++x, d += C) {
        const T* anchor = sn + (y * step * m.Ws + x * step) * C;
        if (y >= y0 && y < y1 && x >= x0 && x < x1) {
          int64_t c = 0;
          for (; c + 16 <= C; c += 16) {  // 16 loads, then the stores (below)
            T v[16];
            for (int k = 0; k < 16; ++k) v[k] = anchor[off[c + k]];
            for (size_t b = 0; b < sizeof(v); b += 32)
              put<32, Stream>(reinterpret_cast<char*>(d + c) + b, reinterpret_cast<const char*>(v) + b);
          }
          for (; c < C; ++c) d[c] = anchor[off[c]];
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const bool in = y >= rlo[c] && y < rhi[c] && x >= clo[c] && x < chi[c];
            d[c] = in ? anchor[off[c]] : T(0);
          }
        }
      }
    }
    stream_fence<Stream>();
  });
  return true;
}

template <typename T>
bool move_nhwc_channels(const T* src, T* dst, const Move& m) {
  if (stream_blocks(dst, m.N * m.Hd * m.Wd, m.C)) return move_nhwc_channels_as<true>(src, dst, m);
  return move_nhwc_channels_as<false>(src, dst, m);
}

// channels_last: each output pixel is a sequence of runs, each copied from its own source pixel or zero-filled (the
// stride-2 adjoint, whose axis maps are not affine; per-channel shifts go channel by channel).
template <typename T>
void move_nhwc(const T* src, T* dst, const Move& m) {
  const std::vector<Run> runs = runs_of(m);
  const int64_t R = static_cast<int64_t>(runs.size()), C = m.C;
  if (C < 32 * R && move_nhwc_channels(src, dst, m)) return;  // runs shorter than 32 channels on average
  std::vector<int64_t> col_src(m.Wd * R);  // source column of each (output column, run), -1 for zero
  for (int64_t x = 0; x < m.Wd; ++x)
    for (int64_t r = 0; r < R; ++r) col_src[x * R + r] = m.cols[runs[r].c0].source(x);
  parallel(m.N * m.Hd, m.Wd * C, [&](int64_t begin, int64_t end) {
    std::vector<const T*> row_src(R);  // source row of each run for this output row, nullptr for zero
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / m.Hd, y = q % m.Hd;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t sr = m.rows[runs[r].c0].source(y);
        row_src[r] = sr >= 0 ? src + ((n * m.Hs + sr) * m.Ws * C + runs[r].c0) : nullptr;
      }
      T* d = dst + q * m.Wd * C;
      const int64_t* cs = col_src.data();
      for (int64_t x = 0; x < m.Wd; ++x, d += C, cs += R) {
        for (int64_t r = 0; r < R; ++r) {
          if (row_src[r] != nullptr && cs[r] >= 0) {
            copy_n(d + runs[r].c0, row_src[r] + cs[r] * C, runs[r].len);
          } else {
            zero_n(d + runs[r].c0, runs[r].len);
          }
        }
      }
    }
  });
}

// channels_last integer movement on whole vectors of channels, for movements whose axis maps are affine,
// o -> o*S + d (the forward movement, any stride, and the stride-1 adjoint), with at most two displacements per
// vector on average (grouped shifts). Per vector the distinct displacements (dy, dx) of its lanes are listed once
// with a lane mask; an output vector is the OR over them of (source pixel at d) AND mask, so the bits are moved
// exactly. Vectors of a single displacement are merged into runs of channels copied as a whole; the other vectors
// are taken in classes of equal displacement count K, one fixed-length loop per class (no branch per vector).
// Output pixels are written in memory order; a source row outside the image reads a zero row, and only the few
// columns where some displacement leaves the image take a checked path. Every source row in use is prefetched a
// few output pixels (at least 4 KB) ahead: the reads alternate between rows and neighbouring pixels, which the
// hardware prefetcher does not follow (without it, 1.5-2x slower). Returns false (nothing done) for the stride-2
// adjoint and for per-channel shifts (move_nhwc_channels).
// acc |= (lanes of the K sources at column offset jo) & mask, for n vectors of K displacements each.
template <int K, bool Stream, typename U, typename VU>
inline void blend_vectors(const U* const* ptr, const VU* mask, const int64_t* c0, int64_t n, int64_t jo, U* o) {
  for (int64_t v = 0; v < n; ++v, ptr += K, mask += K) {
    VU acc{};
    for (int t = 0; t < K; ++t) {
      VU a;
      std::memcpy(&a, ptr[t] + jo, sizeof(a));
      acc |= a & mask[t];
    }
    put_vec<Stream>(reinterpret_cast<char*>(o + c0[v]), &acc);
  }
}

// Stream: non-temporal stores for the interior pixels (put_vec; dst and the pixel stride vector-aligned).
template <bool Stream, typename U>
bool move_nhwc_vec_as(const U* src, U* dst, const Move& m) {
  using VU = typename UVec<U>::V;
  constexpr int64_t L = kVecBytes / sizeof(U);
  const int64_t C = m.C, S = m.rows[0].sstep;
  for (int64_t c = 0; c < C; ++c) {
    const Seg &r = m.rows[c], &k = m.cols[c];
    if (r.ostep != 1 || k.ostep != 1 || r.sstep != S || k.sstep != S) return false;
  }
  // Items: a run of channels of one displacement (K = 1, any length), or one vector of K >= 2 displacements (len L,
  // or a shorter last vector); ordered runs first, then full vectors by K, then the short vector. Entries (one per
  // displacement of an item, contiguous per item) in the same order.
  struct Item {
    int64_t c0, len, K, e0;
  };
  struct Entry {
    int64_t dy, dx;
    VU mask;
  };
  std::vector<Item> runs, vecs, tail;
  std::vector<Entry> ent_runs, ent_vecs, ent_tail;
  int64_t dx0 = std::numeric_limits<int64_t>::max(), dx1 = std::numeric_limits<int64_t>::min();
  std::vector<int64_t> dys;
  int64_t listed = 0;  // displacements listed over all vectors
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int64_t len = std::min(L, C - c0);
    std::vector<Entry> es;
    for (int64_t k = 0; k < len; ++k) {
      const Seg &r = m.rows[c0 + k], &s = m.cols[c0 + k];
      const int64_t dy = r.s0 - r.o0 * S, dx = s.s0 - s.o0 * S;
      size_t e = 0;
      while (e < es.size() && (es[e].dy != dy || es[e].dx != dx)) ++e;
      if (e == es.size()) es.push_back({dy, dx, VU{}});
      es[e].mask[k] = ~U(0);
      dx0 = std::min(dx0, dx), dx1 = std::max(dx1, dx);
      if (std::find(dys.begin(), dys.end(), dy) == dys.end()) dys.push_back(dy);
    }
    const int64_t K = static_cast<int64_t>(es.size());
    listed += K;
    if (K == 1) {
      if (!runs.empty() && runs.back().c0 + runs.back().len == c0 && ent_runs.back().dy == es[0].dy &&
          ent_runs.back().dx == es[0].dx) {
        runs.back().len += len;
      } else {
        runs.push_back({c0, len, 1, static_cast<int64_t>(ent_runs.size())});
        ent_runs.push_back(es[0]);
      }
      continue;
    }
    std::vector<Item>& items = len == L ? vecs : tail;
    std::vector<Entry>& ents = len == L ? ent_vecs : ent_tail;
    items.push_back({c0, len, K, static_cast<int64_t>(ents.size())});
    ents.insert(ents.end(), es.begin(), es.end());
  }
  if (listed > 2 * ((C + L - 1) / L)) return false;  // per-channel shifts: move_nhwc_channels is faster
  {  // full vectors by K (stable: channel order within a class)
    std::vector<Item> sorted(vecs);
    std::stable_sort(sorted.begin(), sorted.end(), [](const Item& a, const Item& b) { return a.K < b.K; });
    std::vector<Entry> ents;
    for (Item& it : sorted) {
      const int64_t e0 = static_cast<int64_t>(ents.size());
      ents.insert(ents.end(), ent_vecs.begin() + it.e0, ent_vecs.begin() + it.e0 + it.K);
      it.e0 = e0;
    }
    vecs.swap(sorted);
    ent_vecs.swap(ents);
  }
  std::vector<Item> items(runs);  // all items, entries renumbered into one table
  std::vector<Entry> ents(ent_runs);
  for (const auto* group : {&vecs, &tail}) {
    const std::vector<Entry>& from = group == &vecs ? ent_vecs : ent_tail;
    for (Item it : *group) {
      const int64_t e0 = static_cast<int64_t>(ents.size());
      ents.insert(ents.end(), from.begin() + it.e0, from.begin() + it.e0 + it.K);
      it.e0 = e0;
      items.push_back(it);
    }
  }
  const int64_t nruns = static_cast<int64_t>(runs.size()), nvecs = static_cast<int64_t>(vecs.size());
  const int64_t ne = static_cast<int64_t>(ents.size());
  // per class K of full vectors: first item and count, and the vectors' first channels
  std::vector<int64_t> class_begin(L + 2, nruns + nvecs), vec_c0(nvecs);
  for (int64_t v = nvecs - 1; v >= 0; --v) class_begin[vecs[v].K] = nruns + v;
  for (int64_t k = L; k >= 2; --k) class_begin[k] = std::min(class_begin[k], class_begin[k + 1]);
  for (int64_t v = 0; v < nvecs; ++v) vec_c0[v] = vecs[v].c0;
  std::vector<VU> masks(ne);
  for (int64_t e = 0; e < ne; ++e) masks[e] = ents[e].mask;
  // output columns where every displacement reads inside the image: [jlo, jhi)
  const int64_t jlo = std::max<int64_t>(0, -floordiv(dx0, S));
  const int64_t jhi = m.Ws - 1 - dx1 >= 0 ? std::min(m.Wd, floordiv(m.Ws - 1 - dx1, S) + 1) : 0;
  const bool prefetch = dys.size() <= 8 && dx1 - dx0 <= 4;
  const int64_t ahead = std::max<int64_t>(2, 4096 / static_cast<int64_t>(S * C * sizeof(U)));  // pixels, >= 4 KB
  const std::vector<U> zero(m.Ws * C, U(0));

  parallel(m.N * m.Hd, m.Wd * C, [&](int64_t begin, int64_t end) {
    std::vector<const U*> ptr(ne), pf(dys.size());  // per output row: source of each entry (at column 0), rows
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / m.Hd, i = q % m.Hd;
      auto row = [&](int64_t dy) {
        const int64_t r = i * S + dy;
        return r >= 0 && r < m.Hs ? src + (n * m.Hs + r) * m.Ws * C : zero.data();
      };
      for (const Item& it : items)
        for (int64_t e = it.e0; e < it.e0 + it.K; ++e) ptr[e] = row(ents[e].dy) + ents[e].dx * C + it.c0;
      for (size_t r = 0; r < dys.size(); ++r) pf[r] = row(dys[r]) + (ahead * S + dx1 - S + 1) * C;
      U* orow = dst + q * m.Wd * C;
      auto checked = [&](int64_t j, const Item& it) {  // any column: displacements outside the image read zero
        if (it.K == 1) {
          const int64_t col = j * S + ents[it.e0].dx;
          if (col < 0 || col >= m.Ws) return zero_n(orow + j * C + it.c0, it.len);
          return copy_long_n(orow + j * C + it.c0, ptr[it.e0] + j * S * C, it.len);
        }
        for (int64_t c = 0; c < it.len; c += L) {
          const int64_t len = std::min(L, it.len - c);
          VU acc{};
          for (int64_t e = it.e0; e < it.e0 + it.K; ++e) {
            const int64_t col = j * S + ents[e].dx;
            if (col < 0 || col >= m.Ws) continue;
            VU a{};
            copy_n(reinterpret_cast<U*>(&a), ptr[e] + j * S * C + c, len);
            acc |= a & masks[e];
          }
          copy_n(orow + j * C + it.c0 + c, reinterpret_cast<const U*>(&acc), len);
        }
      };
      for (int64_t j = 0; j < m.Wd; ++j) {
        if (j < jlo || j >= jhi) {
          for (const Item& it : items) checked(j, it);
          continue;
        }
        if (prefetch)
          for (const U* p : pf) {
            const char* b = reinterpret_cast<const char*>(p + j * S * C);
            for (int64_t k = 0; k < static_cast<int64_t>(S * C * sizeof(U)); k += 64) __builtin_prefetch(b + k);
          }
        const int64_t jo = j * S * C;
        U* o = orow + j * C;
        for (int64_t r = 0; r < nruns; ++r)
          copy_long_put<Stream>(o + items[r].c0, ptr[items[r].e0] + jo, items[r].len);
        for (int64_t k = 2; k <= L; ++k) {
          const int64_t b = class_begin[k], n = class_begin[k + 1] - b;
          if (n == 0) continue;
          const U* const* p = ptr.data() + items[b].e0;
          const VU* mk = masks.data() + items[b].e0;
          const int64_t* c0 = vec_c0.data() + (b - nruns);
          switch (k) {
            case 2: blend_vectors<2, Stream>(p, mk, c0, n, jo, o); break;
            case 3: blend_vectors<3, Stream>(p, mk, c0, n, jo, o); break;
            case 4: blend_vectors<4, Stream>(p, mk, c0, n, jo, o); break;
            case 5: blend_vectors<5, Stream>(p, mk, c0, n, jo, o); break;
            case 6: blend_vectors<6, Stream>(p, mk, c0, n, jo, o); break;
            case 7: blend_vectors<7, Stream>(p, mk, c0, n, jo, o); break;
            case 8: blend_vectors<8, Stream>(p, mk, c0, n, jo, o); break;
            default:  // more than 8 displacements per vector (16-bit lanes only)
              for (int64_t v = b; v < b + n; ++v) checked(j, items[v]);
          }
        }
        for (size_t v = nruns + nvecs; v < items.size(); ++v) checked(j, items[v]);
      }
    }
    stream_fence<Stream>();
  });
  return true;
}

template <typename U>
bool move_nhwc_vec(const U* src, U* dst, const Move& m) {
  if (stream_blocks(dst, m.N * m.Hd * m.Wd, m.C)) return move_nhwc_vec_as<true>(src, dst, m);
  return move_nhwc_vec_as<false>(src, dst, m);
}

// channels_last, stride 1 (forward or adjoint), runs of channels that are whole cache lines (grouped shifts with
// 16k float channels per group: 576 or 1152 channels), output too large to stay cached (stream_output): the
// movement in source order. Each work item reads one source row in memory order, a single stream the hardware
// prefetcher follows, and writes every run of each pixel to its output pixel with non-temporal stores, whole lines
// that need no read for ownership; the output pixels that read outside the image are zeroed by the item that owns
// their row. Each output line is written once, by one item. (In output order, move_nhwc_vec, the reads alternate
// between three source rows and neighbouring pixels: 1.37-1.46x `x.clone()` at 576 and 1152 channels, 0.93-1.02x
// here; docs/benchmarks/ops_notes.md.)
// Returns false (nothing done) when these conditions do not hold.
template <typename U>
bool move_nhwc_lines(const U* src, U* dst, const Move& m) {
  constexpr int64_t kLine = 64;
  const int64_t C = m.C, H = m.Hd, W = m.Wd;
  if (m.Hs != H || m.Ws != W || reinterpret_cast<uintptr_t>(dst) % kLine != 0 ||
      !stream_output(m.N * H * W * C * static_cast<int64_t>(sizeof(U))))
    return false;
  for (int64_t c = 0; c < C; ++c) {
    const Seg &r = m.rows[c], &k = m.cols[c];
    if (r.ostep != 1 || r.sstep != 1 || k.ostep != 1 || k.sstep != 1) return false;
  }
  const std::vector<Run> runs = runs_of(m);
  for (const Run& r : runs)
    if ((r.c0 * sizeof(U)) % kLine != 0 || (r.len * sizeof(U)) % kLine != 0) return false;
  const int64_t R = static_cast<int64_t>(runs.size());
  std::vector<Seg> rows(R), cols(R);  // per run
  std::vector<int64_t> to(R);         // output offset of a run's pixel from its source pixel
  for (int64_t r = 0; r < R; ++r) {
    rows[r] = m.rows[runs[r].c0], cols[r] = m.cols[runs[r].c0];
    to[r] = ((rows[r].o0 - rows[r].s0) * W + (cols[r].o0 - cols[r].s0)) * C + runs[r].c0;
  }
  parallel(m.N * H, W * C, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t i = q % H;
      U* orow = dst + q * W * C;
      for (int64_t r = 0; r < R; ++r) {  // zeros of output row i
        const Seg &rs = rows[r], &cs = cols[r];
        const bool inside = i >= rs.o0 && i < rs.o0 + rs.count;
        for (int64_t j = 0; j < W; ++j)
          if (!inside || j < cs.o0 || j >= cs.o0 + cs.count) zero_n(orow + j * C + runs[r].c0, runs[r].len);
      }
      const U* srow = src + q * W * C;  // source row i, scattered
      for (int64_t j = 0; j < W; ++j) {
        const U* s = srow + j * C;
        U* d = orow + j * C;
        for (int64_t r = 0; r < R; ++r) {
          const Seg &rs = rows[r], &cs = cols[r];
          if (i < rs.s0 || i >= rs.s0 + rs.count || j < cs.s0 || j >= cs.s0 + cs.count) continue;
          copy_long_put<true>(d + to[r], s + runs[r].c0, runs[r].len);
        }
      }
    }
    stream_fence<true>();
  });
  return true;
}

// rows[t] = row r0 + t of img (rows of `len` elements, h of them), or `zero` outside the image
template <int R, typename T>
void window_rows(const T* img, int64_t r0, int64_t h, int64_t len, const T* zero, const T** rows) {
  for (int t = 0; t < R; ++t) rows[t] = r0 + t >= 0 && r0 + t < h ? img + (r0 + t) * len : zero;
}

// The channels_last row kernels (ring_row's, sep_row_pairs, backward_row_pairs) go through a row once per strip of
// channels, so that the strip's per-channel data (`bytes` per vector of channels: weights, ring, sums) stays within
// kL1Bytes, three quarters of a 32 KB L1, while the row's pixels stream past. At 1152 float channels (the two-pixel
// forward's data 37 KB, the backward's 41 KB) two strips ran 0.79-0.91x the time of one on tensors of 19-38 MB
// (forward and backward; Zen 5, 64-byte vectors, 48 KB L1), 0.86-0.95x with 32-byte vectors, neutral on cached ones
// (9 MB); the shift gradient (grad_row, R = 5, 60 KB) in three strips 0.71x with 64-byte vectors, where it had run
// 1.45x the time of the 32-byte build (unchanged with 32-byte vectors).
constexpr int64_t kL1Bytes = 24 << 10;

inline int64_t strip_vectors(int64_t bytes) { return std::max<int64_t>(1, kL1Bytes / bytes); }

// The traversal shared by the channels_last row kernels that visit pixels in memory order (through ring_row:
// move_nhwc_pick, bilinear_nhwc_sep, shift_grad_nhwc_sep, backward_nhwc_fused): output j reads source columns
// j*S + k0 + u, u < R, whose per-column data (picked rows, vertical sums) sit in a ring of slots, ring_slot(col).
// fill(col) computes column col into its slot (zeros outside the image) and out(j) computes output j from the ring.
// At stride 1 each output brings one new column: fused(j, col) computes it (0 outside the image) and output j in
// one pass over the channels, the ring filled with the first R - 1 columns before the row.
inline int64_t ring_slot(int64_t col, int64_t R) { return ((col % R) + R) % R; }

template <int S, int R, typename Fill, typename Fused, typename Out>
void sweep_columns(int64_t k0, int64_t Ws, int64_t Wo, const Fill& fill, const Fused& fused, const Out& out) {
  if constexpr (S == 1) {
    for (int64_t col = k0; col < k0 + R - 1; ++col) fill(col);
    for (int64_t j = 0; j < Wo; ++j) fused(j, j + k0 + R - 1);
  } else {
    int64_t next = std::numeric_limits<int64_t>::min();  // first source column not yet in the ring
    for (int64_t j = 0; j < Wo; ++j) {
      const int64_t base = j * S + k0;
      for (int64_t col = std::max(next, base); col < base + R; ++col) fill(col);
      next = base + R;
      out(j);
    }
  }
}

// One output row of a pixel-order channels_last kernel on a window of R source rows (rows[t]; a zero row outside
// the image), all channels of a pixel before the next: per source column and vector v of channels, column(k, src, v,
// len, d) computes the vector's E ring vectors d[0 .. E-1] from src[t] = rows[t] + col * C (they are 0 for columns
// outside the image); per output j, output(k, w, j, v, len) uses those of the window's columns, w[u * E + e]. k is
// the vector's plan (K vectors), len its number of channels (of L per vector V). The vectors [v0, v1) of channels
// [0, n) of each pixel (C elements apart) are visited (one strip: ring_row). The ring holds R slots of E * nv vectors
// (sweep_columns); at stride 1, R - 1: the new
// column overwrites the oldest one vector by vector, after reading it (a third less per-channel data to keep in L1:
// 0.93-0.97x the time of R slots single-threaded for the fused backward). With ahead != 0 each new
// column prefetches rows[R-1] `ahead` elements on (prefetch_ahead). Pointers are copied to
// locals per pixel: captured ones are reloaded after every store, which a store through a char* may alias.
template <int S, int R, int E, int K, int L, typename T, typename V, typename Column, typename Output>
void ring_strip(const T* const* rows, const V* plan, int64_t C, int64_t n, int64_t k0, int64_t Ws, int64_t Wo,
                int64_t ahead, V* ring, const Column& column, const Output& output, int64_t v0, int64_t v1) {
  const int64_t nv = (n + L - 1) / L, full = n / L, tail = n - full * L;
  const T* row[R];
  for (int t = 0; t < R; ++t) row[t] = rows[t];
  constexpr int slots = S == 1 ? R - 1 : R;
  auto at = [&](int64_t col) { return ring + ring_slot(col, slots) * E * nv; };
  auto fill = [&](int64_t col) {
    V* d = at(col);
    if (col < 0 || col >= Ws) return std::fill(d + E * v0, d + E * v1, V{});
    const T* src[R];
    for (int t = 0; t < R; ++t) src[t] = row[t] + col * C;
    const V* k = plan;
    for (int64_t v = v0; v < v1; ++v) {
      if (ahead != 0) prefetch_to_l2(src[R - 1] + v * L + ahead);
      column(k + v * K, src, v, v < full ? L : tail, d + E * v);
    }
  };
  auto out = [&](int64_t j) {
    const V* h[R];
    for (int u = 0; u < R; ++u) h[u] = at(j * S + k0 + u);
    const V* k = plan;
    for (int64_t v = v0; v < v1; ++v) {
      V w[R * E];
      for (int u = 0; u < R; ++u)
        for (int e = 0; e < E; ++e) w[u * E + e] = h[u][E * v + e];
      output(k + v * K, w, j, v, v < full ? L : tail);
    }
  };
  auto fused = [&](int64_t j, int64_t col) {
    const V* h[R - 1];
    for (int u = 0; u + 1 < R; ++u) h[u] = at(col - R + 1 + u);
    V* d = at(col);  // the slot of column col - R + 1 (h[0]), whose vector v is read before it is overwritten
    const bool inside = col >= 0 && col < Ws;
    const T* src[R];
    for (int t = 0; t < R; ++t) src[t] = row[t] + (inside ? col : 0) * C;
    const V* k = plan;
    // the loop over the vectors, once per (inside, prefetch): with the tests inside it, GCC kept them there (the
    // integer selection at 96 channels ran 0.90-0.95x the time unswitched, Zen 5)
    auto pass = [&](auto in, auto pf) {
      for (int64_t v = v0; v < v1; ++v) {
        if constexpr (decltype(pf)::value) prefetch_to_l2(src[R - 1] + v * L + ahead);
        const int64_t len = v < full ? L : tail;
        V w[R * E];
        for (int u = 0; u + 1 < R; ++u)
          for (int e = 0; e < E; ++e) w[u * E + e] = h[u][E * v + e];
        if constexpr (decltype(in)::value) {
          column(k + v * K, src, v, len, w + (R - 1) * E);
        } else {
          for (int e = 0; e < E; ++e) w[(R - 1) * E + e] = V{};
        }
        for (int e = 0; e < E; ++e) d[E * v + e] = w[(R - 1) * E + e];
        output(k + v * K, w, j, v, len);
      }
    };
    if (!inside) return pass(std::false_type{}, std::false_type{});
    if (ahead != 0) return pass(std::true_type{}, std::true_type{});
    pass(std::true_type{}, std::false_type{});
  };
  sweep_columns<S, R>(k0, Ws, Wo, fill, fused, out);
}

// ring_strip over strips of channels (strip_vectors; X: the caller's own vectors per vector of channels, such as sums)
template <int S, int R, int E, int K, int X, int L, typename T, typename V, typename Column, typename Output>
void ring_row(const T* const* rows, const V* plan, int64_t C, int64_t n, int64_t k0, int64_t Ws, int64_t Wo,
              int64_t ahead, V* ring, const Column& column, const Output& output) {
  constexpr int slots = S == 1 ? R - 1 : R;
  const int64_t nv = (n + L - 1) / L, strip = strip_vectors((K + E * slots + X) * static_cast<int64_t>(sizeof(V)));
  for (int64_t v0 = 0; v0 < nv; v0 += strip)
    ring_strip<S, R, E, K, L>(rows, plan, C, n, k0, Ws, Wo, ahead, ring, column, output, v0, std::min(nv, v0 + strip));
}

// channels_last integer movement by selection, for affine movements o -> o*S + d (the forward movement, any stride,
// and the stride-1 adjoint) whose displacements all lie within R <= 5 rows and R columns (grouped shifts, and
// per-channel shifts rounded from within two pixels, as SSL's): per source column, each lane's row is picked from the
// R source rows (R-1 blends), kept in a ring of the last R columns; each output lane then picks its column from the
// ring. Pixels in memory order, all channels of one before the next: R sequential streams of source rows, which the
// hardware prefetcher follows (move_nhwc_channels, a copy per channel, and move_nhwc_vec, masked vectors per
// displacement, read rows and neighbouring pixels in turn). The bits are moved exactly; rows outside the image read
// a zero row, columns outside it are zero in the ring (in registers for small pixels at stride 1 and R = 3:
// pick_row_registers). A partial last vector of channels is moved lane by lane.
template <typename U>
inline typename UVec<U>::V pick_bits(const typename UVec<U>::V& m, const typename UVec<U>::V& p,
                                     const typename UVec<U>::V& q) {  // q where m is all ones, else p
#if FEWSHIFTS_VECTOR_BYTES == 32 && defined(__AVX2__)
  return reinterpret_cast<typename UVec<U>::V>(_mm256_blendv_epi8(reinterpret_cast<__m256i>(p),
                                                                  reinterpret_cast<__m256i>(q),
                                                                  reinterpret_cast<__m256i>(m)));
#else
  return (q & m) | (p & ~m);
#endif
}

template <int R, typename U>
struct PickPlan {
  using VU = typename UVec<U>::V;
  static constexpr int L = kVecBytes / sizeof(U);
  static constexpr int kHigherRowBit = 2 * (R - 1);  // of bits: the lane takes the higher of its vector's two rows
  int64_t C, S, full, r0, k0;
  std::vector<int64_t> dy, dx;
  std::vector<VU> mask;  // [vector][2 (R-1)]: all ones where dy - r0 >= t (t = 1 .. R-1), then dx - k0 >= u
  std::vector<VU> bits;  // [vector]: the masks as bits of each lane, t - 1 for row t and R - 2 + u for column u;
                         // and kHigherRowBit (two_rows)
  std::vector<int> low, high;  // [vector]: the lowest and the highest row (0 .. R-1) that its lanes take
  bool two_rows = true;        // no vector's lanes take more than two rows (ShiftNet's groups: the rows change once
                               // or twice per pixel, so most vectors take one row and the others two)
  PickPlan(int64_t C_, int64_t S_, std::vector<int64_t> dy_, std::vector<int64_t> dx_)
      : C(C_), S(S_), full(C_ / L), dy(std::move(dy_)), dx(std::move(dx_)), mask(full * 2 * (R - 1), VU{}),
        bits(full, VU{}), low(full, R), high(full, -1) {
    r0 = *std::min_element(dy.begin(), dy.end());
    k0 = *std::min_element(dx.begin(), dx.end());
    std::vector<unsigned> taken(full, 0);  // [vector]: bit t where a lane takes row t
    for (int64_t c = 0; c < full * L; ++c) {
      U* d = reinterpret_cast<U*>(&mask[c / L * 2 * (R - 1)]) + c % L;
      for (int t = 1; t < R; ++t) {
        d[(t - 1) * L] = dy[c] - r0 >= t ? ~U(0) : U(0);
        d[(R - 2 + t) * L] = dx[c] - k0 >= t ? ~U(0) : U(0);
        if (dy[c] - r0 >= t) bits[c / L][c % L] |= U(1) << (t - 1);
        if (dx[c] - k0 >= t) bits[c / L][c % L] |= U(1) << (R - 2 + t);
      }
      const int t = static_cast<int>(dy[c] - r0);
      taken[c / L] |= 1u << t, low[c / L] = std::min(low[c / L], t), high[c / L] = std::max(high[c / L], t);
    }
    for (int64_t v = 0; v < full; ++v) {
      two_rows = two_rows && __builtin_popcount(taken[v]) <= 2;
      for (int64_t c = v * L; c < (v + 1) * L; ++c)
        if (low[v] < high[v] && dy[c] - r0 == high[v]) bits[v][c % L] |= U(1) << kHigherRowBit;
    }
  }
};

template <int S, int R, bool Stream, typename U>
void pick_row(const U* const* rows, const PickPlan<R, U>& p, int64_t Ws, int64_t Wo, int64_t ahead, U* orow,
              typename UVec<U>::V* ring) {
  using VU = typename UVec<U>::V;
  constexpr int L = PickPlan<R, U>::L, K = 2 * (R - 1);
  const int64_t C = p.C;
  auto load = [](const U* q) {
    VU v;
    std::memcpy(&v, q, sizeof(v));
    return v;
  };
  auto column = [&](const VU* k, const U* const* src, int64_t v, int64_t, VU* d) {  // each lane's own row
    VU s = load(src[0] + v * L);
    for (int t = 1; t < R; ++t) s = pick_bits<U>(k[t - 1], s, load(src[t] + v * L));
    d[0] = s;
  };
  auto output = [&](const VU* k, const VU* w, int64_t j, int64_t v, int64_t) {  // each lane's own column
    VU o = w[0];
    for (int u = 1; u < R; ++u) o = pick_bits<U>(k[R - 2 + u], o, w[u]);
    put_vec<Stream>(reinterpret_cast<char*>(orow + j * C + v * L), &o);
  };
  ring_row<S, R, 1, K, 0, L, U, VU>(rows, p.mask.data(), C, p.full * L, p.k0, Ws, Wo, ahead, ring, column, output);
}

// pick_row at stride 1 and R = 3 (shifts within one pixel: ShiftNet's 3x3 groups, SSL's rounded shifts) for pixels
// of at most kPickRegisterVectors full vectors: the two previous columns' picked rows stay in registers across the row,
// and each vector's four lane masks come from one vector of bits (PickPlan::bits) by shifts. An output vector costs
// its three row loads, the bits and one store, where pick_row's ring and masks make nine loads and two stores. Zen 5,
// shuffled rounds, 1-13 MB, one build with either path: 0.51-0.80x pick_row's time at 32-192 float channels (2-12
// vectors, the most that the 32 AVX-512 registers hold beside the loop's own); with AVX2's 16 registers (a build
// without AVX-512, before flatten) 0.74-0.88x at 32-64 channels (4-8 vectors). Pixels of more vectors keep the ring
// in memory (strips of 8 vectors, each going through the row, ran 1.09-1.28x slower at 576-1152 channels). Extra
// loads of other lines are what slows a loop on this machine (docs/benchmarks/ops_notes.md, fifteenth session).
// Rows = 2 where no vector's lanes take more than two rows (PickPlan::two_rows): each vector loads only its own lowest
// and highest row (the same one twice where its lanes take one), so a source line is read only by the output rows
// that take lanes from it. ShiftNet's groups at 96 float channels (6 vectors): 9 row loads of other lines per pixel,
// where Rows = 3 makes 18. One build, either path, two threads, 1.6-12.6 MB: 0.73-0.96x the time at 32 and 96 float
// channels (at 32x96x32x32 the forward 0.87-0.92x, the adjoint 0.78-0.83x), 0.92-1.01x at 64 and 128-192 (sixteenth
// session). Random per-channel shifts take all three rows in most vectors (Rows = 3); a trained SSL layer's, mostly
// zero, often give no vector three.
constexpr int kPickRegisterVectors = kVectorRegisters == 32 ? 12 : 8;

// f(std::integral_constant<int, nv>) for nv in [1, Max]: the kernels that keep a pixel's vectors in registers are
// instantiated per vector count. They are compiled with every call inlined (flatten): a lambda left out of line
// would take the arrays it captures by reference, and with them the ring, to memory.
template <int Max, int K = 1, typename F>
decltype(auto) with_vector_count(int64_t nv, const F& f) {
  if constexpr (K < Max) {
    if (nv == K) return f(std::integral_constant<int, K>{});
    return with_vector_count<Max, K + 1>(nv, f);
  } else {
    TORCH_CHECK(nv == Max, "fewshifts: ", nv, " vectors for a kernel that holds at most ", Max, " in registers");
    return f(std::integral_constant<int, Max>{});
  }
}

template <typename U>
inline typename UVec<U>::V bit_mask(const typename UVec<U>::V& bits, int k) {  // all ones where bit k is set
  using S = std::make_signed_t<U>;
  typedef S VS __attribute__((vector_size(kVecBytes)));
  constexpr int top = 8 * sizeof(U) - 1;
  return reinterpret_cast<typename UVec<U>::V>(reinterpret_cast<VS>(bits << (top - k)) >> top);
}

template <int NV, int Rows, bool Stream, int R, typename U>
__attribute__((flatten))  // with_vector_count: the lambdas inlined
void pick_row_registers(const U* const* rows, const PickPlan<R, U>& p, int64_t Ws, int64_t Wo, int64_t ahead,
                        U* orow) {
  static_assert(R == 3 && (Rows == 2 || Rows == 3));
  using VU = typename UVec<U>::V;
  constexpr int64_t L = kVecBytes / sizeof(U);
  // Each vector's bits in registers where they fit beside the two columns of picked rows (3 registers per vector),
  // else read from the plan each time. One build, either way: 0.79-0.99x the time at 32-128 float channels (2-8
  // vectors; 1.06x for random shifts at 8x96x32x32), but 1.03-1.18x at 10-12 vectors (sixteenth session).
  constexpr bool kBitsInRegisters = 3 * NV + 4 <= kVectorRegisters;
  const int64_t C = p.C, k0 = p.k0;
  VU held[kBitsInRegisters ? NV : 1];
  const U* pair[2][Rows == 2 ? NV : 1];  // Rows = 2: vector v's lowest and highest row
  for (int v = 0; v < NV; ++v) {
    if constexpr (kBitsInRegisters) held[v] = p.bits[v];
    if constexpr (Rows == 2) pair[0][v] = rows[p.low[v]] + v * L, pair[1][v] = rows[p.high[v]] + v * L;
  }
  const VU* plan = p.bits.data();
  auto bits = [&](int v) -> VU {
    if constexpr (kBitsInRegisters) return held[v];
    return plan[v];
  };
  const U* r0 = rows[0];
  const U* r1 = rows[1];
  const U* r2 = rows[2];
  auto load = [&](const U* q) {
    VU a;
    std::memcpy(&a, q, sizeof(a));
    return a;
  };
  auto column = [&](int64_t col, int v) {  // each lane's own row at column col
    const VU k = bits(v);
    if constexpr (Rows == 2)
      return pick_bits<U>(bit_mask<U>(k, PickPlan<R, U>::kHigherRowBit), load(pair[0][v] + col * C),
                          load(pair[1][v] + col * C));
    const int64_t at = col * C + v * L;
    return pick_bits<U>(bit_mask<U>(k, 1), pick_bits<U>(bit_mask<U>(k, 0), load(r0 + at), load(r1 + at)),
                        load(r2 + at));
  };
  VU w0[NV], w1[NV];  // columns j + k0 and j + k0 + 1
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) {
    w0[v] = k0 >= 0 && k0 < Ws ? column(k0, v) : VU{};
    w1[v] = k0 + 1 >= 0 && k0 + 1 < Ws ? column(k0 + 1, v) : VU{};
  }
  auto pass = [&](int64_t j, auto in) {
    const int64_t col = j + k0 + 2;
    U* o = orow + j * C;
#pragma GCC unroll 12
    for (int v = 0; v < NV; ++v) {
      if constexpr (decltype(in)::value)  // the newest row, once per line
        if (ahead != 0 && v % kVectorsPerLine == 0) __builtin_prefetch(r2 + col * C + v * L + ahead);
      const VU n = decltype(in)::value ? column(col, v) : VU{};
      const VU k = bits(v);
      const VU a = pick_bits<U>(bit_mask<U>(k, 3), pick_bits<U>(bit_mask<U>(k, 2), w0[v], w1[v]), n);
      put_vec<Stream>(reinterpret_cast<char*>(o + v * L), &a);
      w0[v] = w1[v], w1[v] = n;
    }
  };
  for (int64_t j = 0; j < Wo; ++j) {
    const int64_t col = j + k0 + 2;
    col >= 0 && col < Ws ? pass(j, std::true_type{}) : pass(j, std::false_type{});
  }
}

// move_nhwc_pick's plan and its work for one output row (row), which the channels_last quantization-aware backward
// also runs row by row beside its shift gradient (sparse_backward_nhwc). with_pick_rows runs f(PickRows<R, Stream,
// U>) with the window R (3 or 5) that holds every displacement and Stream for streamed stores, and returns false
// (nothing done) where the movement is not one that move_nhwc_pick takes (above) or dst is not aligned to a vector.
template <int R, bool Stream, typename U>
struct PickRows {
  static constexpr bool kStream = Stream;
  const U* src;
  U* dst;
  const Move& m;
  PickPlan<R, U> p;
  std::vector<U> zero_row;
  int64_t ahead;
  PickRows(const U* src_, U* dst_, const Move& m_, std::vector<int64_t> dy, std::vector<int64_t> dx)
      : src(src_), dst(dst_), m(m_), p(m_.C, m_.rows[0].sstep, std::move(dy), std::move(dx)),
        zero_row(m_.Ws * m_.C, U(0)),
        ahead(prefetch_ahead<U>(m_.N * m_.Hs * m_.Ws * m_.C * static_cast<int64_t>(sizeof(U)), m_.C)) {}
  std::vector<typename UVec<U>::V> ring() const { return std::vector<typename UVec<U>::V>(R * p.full); }
  // output row q (image q / Hd, row q % Hd); ring: from ring(), one per thread
  void row(int64_t q, typename UVec<U>::V* ring) const {
    const int64_t n = q / m.Hd, i = q % m.Hd, C = p.C, S = p.S;
    const U* img = src + n * m.Hs * m.Ws * C;
    const U* rows[R];
    window_rows<R>(img, i * S + p.r0, m.Hs, m.Ws * C, zero_row.data(), rows);
    U* orow = dst + q * m.Wd * C;
    if (p.full > 0 && S == 1 && R == 3 && p.full <= kPickRegisterVectors) {
      if constexpr (R == 3)  // (pick_row_registers is compiled for the three-row window only)
        with_vector_count<kPickRegisterVectors>(p.full, [&](auto nv) {
          constexpr int NV = decltype(nv)::value;
          if (p.two_rows) return pick_row_registers<NV, 2, Stream>(rows, p, m.Ws, m.Wd, ahead, orow);
          pick_row_registers<NV, 3, Stream>(rows, p, m.Ws, m.Wd, ahead, orow);
        });
    } else if (p.full > 0 && S == 1) {
      pick_row<1, R, Stream>(rows, p, m.Ws, m.Wd, ahead, orow, ring);
    }
    if (p.full > 0 && S == 2) pick_row<2, R, Stream>(rows, p, m.Ws, m.Wd, ahead, orow, ring);
    for (int64_t c = p.full * p.L; c < C; ++c) {  // the partial last vector
      const int64_t sr = i * S + p.dy[c];
      for (int64_t j = 0; j < m.Wd; ++j) {
        const int64_t sc = j * S + p.dx[c];
        orow[j * C + c] = sr >= 0 && sr < m.Hs && sc >= 0 && sc < m.Ws ? img[(sr * m.Ws + sc) * C + c] : U(0);
      }
    }
  }
};

template <typename U, typename F>
bool with_pick_rows(const U* src, U* dst, const Move& m, const F& f) {
  const int64_t C = m.C, S = C > 0 ? m.rows[0].sstep : 1;
  if (C == 0 || (S != 1 && S != 2) || reinterpret_cast<uintptr_t>(dst) % kVecBytes != 0) return false;
  std::vector<int64_t> dy(C), dx(C);
  for (int64_t c = 0; c < C; ++c) {
    const Seg &r = m.rows[c], &k = m.cols[c];
    if (r.ostep != 1 || k.ostep != 1 || r.sstep != S || k.sstep != S || r.count == 0 || k.count == 0) return false;
    dy[c] = r.s0 - r.o0 * S, dx[c] = k.s0 - k.o0 * S;
  }
  const int64_t span = std::max(*std::max_element(dy.begin(), dy.end()) - *std::min_element(dy.begin(), dy.end()),
                                *std::max_element(dx.begin(), dx.end()) - *std::min_element(dx.begin(), dx.end()));
  if (span >= 5) return false;
  const bool stream = stream_blocks(dst, m.N * m.Hd * m.Wd, C);
  auto run = [&](auto r) {
    constexpr int R = decltype(r)::value;
    if (stream) return f(PickRows<R, true, U>(src, dst, m, std::move(dy), std::move(dx)));
    f(PickRows<R, false, U>(src, dst, m, std::move(dy), std::move(dx)));
  };
  if (span < 3) {
    run(std::integral_constant<int, 3>{});
  } else {
    run(std::integral_constant<int, 5>{});
  }
  return true;
}

// Returns false (nothing done) where the conditions above do not hold.
template <typename U>
bool move_nhwc_pick(const U* src, U* dst, const Move& m) {
  return with_pick_rows(src, dst, m, [&](const auto& rows) {
    parallel(m.N * m.Hd, m.Wd * m.C, [&](int64_t begin, int64_t end) {
      auto ring = rows.ring();
      for (int64_t q = begin; q < end; ++q) rows.row(q, ring.data());
      stream_fence<std::decay_t<decltype(rows)>::kStream>();
    });
  });
}

template <typename F>
void dispatch_by_size(const Tensor& x, const F& f) {
  switch (x.element_size()) {
    case 2: f(uint16_t{}); break;
    case 4: f(uint32_t{}); break;
    case 8: f(uint64_t{}); break;
    default: TORCH_CHECK(false, "fewshifts: unsupported dtype ", x.scalar_type());
  }
}

void run_move(const Tensor& src, Tensor& dst, const Move& m, bool channels_last) {
  if (src.numel() == 0 || dst.numel() == 0) return;
  dispatch_by_size(src, [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src.const_data_ptr());
    T* d = static_cast<T*>(dst.data_ptr());
    if (!channels_last) {
      move_nchw(s, d, m);
    } else if (!move_nhwc_lines(s, d, m) && !move_nhwc_pick(s, d, m) && !move_nhwc_vec(s, d, m)) {
      move_nhwc(s, d, m);
    }
  });
}

const int64_t* int_shifts(const Tensor& shifts, Tensor& holder) {
  holder = shifts.to(at::kLong).contiguous();
  return holder.const_data_ptr<int64_t>();
}

}  // namespace

Tensor shift_forward(const Tensor& x_in, const Tensor& shifts, int64_t stride) {
  check_args(x_in, shifts, stride, "shift_forward");
  const bool cl = is_channels_last(x_in);
  const Tensor x = x_in.contiguous(format_of(cl));
  const int64_t H = x.size(2), W = x.size(3), Ho = output_size(H, stride), Wo = output_size(W, stride);
  Tensor out = flat_output(x, Ho, Wo, cl, streams_planes(x, Ho, Wo, cl, stride), {x.const_data_ptr()});
  Tensor holder;
  const int64_t* s = int_shifts(shifts, holder);
  const Move m = integer_move(s, x.size(0), x.size(1), H, W, Ho, Wo, stride, false);
  run_move(x, out, m, cl);
  return out;
}

Tensor shift_backward(const Tensor& g_in, const Tensor& shifts, int64_t stride, int64_t height, int64_t width) {
  check_args(g_in, shifts, stride, "shift_backward");
  const bool cl = is_channels_last(g_in);
  const Tensor g = g_in.contiguous(format_of(cl));
  const int64_t Ho = g.size(2), Wo = g.size(3);
  Tensor grad_x = flat_output(g, height, width, cl, streams_planes(g, height, width, cl, stride), {g.const_data_ptr()});
  Tensor holder;
  const int64_t* s = int_shifts(shifts, holder);
  const Move m = integer_move(s, g.size(0), g.size(1), height, width, Ho, Wo, stride, true);
  run_move(g, grad_x, m, cl);
  return grad_x;
}

namespace {

// In-place stride-1 shift of one NCHW plane: rows are visited so that a source row is read before it is written.
template <typename T>
void shift_plane_inplace(T* p, int64_t H, int64_t W, int64_t dy, int64_t dx) {
  const Seg cols = forward_seg(dx, W, W, 1);
  for (int64_t k = 0; k < H; ++k) {
    const int64_t y = dy >= 0 ? k : H - 1 - k;
    const int64_t r = y + dy;
    T* row = p + y * W;
    if (r < 0 || r >= H || cols.count == 0) {
      zero_n(row, W);
      continue;
    }
    std::memmove(row + cols.o0, p + r * W + cols.s0, cols.count * sizeof(T));
    zero_n(row, cols.o0);
    zero_n(row + cols.o0 + cols.count, W - cols.o0 - cols.count);
  }
}

template <typename T>
void shift_inplace_nchw(T* x, int64_t N, int64_t C, int64_t H, int64_t W, const std::vector<int64_t>& moved,
                        const int64_t* s) {
  const int64_t M = static_cast<int64_t>(moved.size());
  parallel(N * M, H * W, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / M, c = moved[q % M];
      shift_plane_inplace(x + (n * C + c) * H * W, H, W, s[2 * c], s[2 * c + 1]);
    }
  });
}

// channels_last, one pass: rows are written top to bottom. A group of channels with dy <= 0 reads rows at or above
// the current one, which are already overwritten, so each row's moved channels are saved first in a ring of
// (max(-dy) + 1) rows (a few KB, cache resident); a group with dy > 0 reads the not yet written rows below
// directly. Each group is then written with one tight loop over the row's pixels (no temporary of the tensor,
// no divisions per pixel). Parallel over (image, band of rows); the rows just outside a band that a
// neighbouring band overwrites (halos) are saved before the parallel loop.
template <typename T>
void shift_inplace_nhwc(T* x, int64_t N, int64_t C, int64_t H, int64_t W, const std::vector<int64_t>& moved,
                        const int64_t* s) {
  const int64_t M = static_cast<int64_t>(moved.size());
  struct Group {
    int64_t c0, m0, len, dy, dx;
  };
  std::vector<Group> groups;  // channels consecutive in x with one displacement
  std::vector<Group> spans;   // channels consecutive in x (saved with one copy per pixel)
  int64_t up = 0, down = 0;   // how many rows above / below the current one are read
  for (int64_t m = 0; m < M; ++m) {
    const int64_t c = moved[m], dy = s[2 * c], dx = s[2 * c + 1];
    if (!groups.empty() && groups.back().c0 + groups.back().len == c && groups.back().dy == dy &&
        groups.back().dx == dx) {
      ++groups.back().len;
    } else {
      groups.push_back({c, m, 1, dy, dx});
    }
    if (!spans.empty() && spans.back().c0 + spans.back().len == c) {
      ++spans.back().len;
    } else {
      spans.push_back({c, m, 1, 0, 0});
    }
    up = std::max(up, -dy);
    down = std::max(down, dy);
  }
  up = std::min(up, H);
  down = std::min(down, H);
  const int64_t ring_rows = up + 1, row_elems = W * M, plane = H * W * C;
  // bands per image: enough tasks for the threads when the batch is small and the tensor is not tiny
  const int64_t threads = at::get_num_threads();
  int64_t bands = 1;
  if (N < threads && N * H * W * M >= (int64_t{1} << 15)) bands = std::min<int64_t>(H, (threads + N - 1) / N);
  const int64_t tasks = N * bands, per_task = (ring_rows + down) * row_elems;
  std::unique_ptr<T[]> buffer(new T[tasks * per_task]);  // uninitialised: every slot read is written first

  // Moved channels of row r, packed (W, M). Meanwhile the lines holding the moved channels of row r + ahead are
  // prefetched for writing: they are read and rewritten a row or two later, and the producing convolution may
  // have left them in the other core's cache, where a plain read gets a shared copy and the write then waits
  // for another round trip (about 2x the single-thread time of FE-Net's 112x112 shift at 2 threads).
  auto save_row = [&](T* dst, int64_t n, int64_t r, int64_t ahead) {
    const T* src = x + n * plane + r * W * C;
    const char* next = reinterpret_cast<const char*>(x + n * plane + std::min(r + ahead, H - 1) * W * C);
    for (int64_t j = 0; j < W; ++j)
      for (const Group& g : spans) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(next + (j * C + g.c0) * sizeof(T));
        for (uintptr_t l = a & ~uintptr_t(63); l < a + g.len * sizeof(T); l += 64)
          __builtin_prefetch(reinterpret_cast<const void*>(l), 1);
        copy_n(dst + j * M + g.m0, src + j * C + g.c0, g.len);
      }
  };
  auto band = [&](int64_t t, int64_t& n, int64_t& y0, int64_t& y1) {
    n = t / bands;
    const int64_t b = t % bands;
    y0 = H * b / bands;
    y1 = H * (b + 1) / bands;
  };
  if (bands > 1) {  // halos, saved while every row is still the original
    for (int64_t t = 0; t < tasks; ++t) {
      int64_t n, y0, y1;
      band(t, n, y0, y1);
      T* ring = buffer.get() + t * per_task;
      for (int64_t r = std::max<int64_t>(0, y0 - up); r < y0; ++r)
        save_row(ring + (r % ring_rows) * row_elems, n, r, 0);
      for (int64_t r = y1; r < std::min(H, y1 + down); ++r) save_row(ring + (ring_rows + r - y1) * row_elems, n, r, 0);
    }
  }
  auto run_task = [&](int64_t t) {
    int64_t n, y0, y1;
    band(t, n, y0, y1);
    T* ring = buffer.get() + t * per_task;
    T* below = ring + ring_rows * row_elems;
    for (int64_t y = y0; y < y1; ++y) {
      save_row(ring + (y % ring_rows) * row_elems, n, y, down + 1);
      T* drow = x + n * plane + y * W * C;
      for (const Group& g : groups) {
        const int64_t sr = y + g.dy;
        const int64_t xa = std::max<int64_t>(0, -g.dx), xb = std::min(W, W - g.dx);  // columns with a source
        if (sr < 0 || sr >= H || xa >= xb) {
          for (int64_t j = 0; j < W; ++j) zero_n(drow + j * C + g.c0, g.len);
          continue;
        }
        const T* src;
        int64_t step;
        if (g.dy <= 0) {
          src = ring + (sr % ring_rows) * row_elems + g.m0;
          step = M;
        } else if (sr < y1) {
          src = x + n * plane + sr * W * C + g.c0;
          step = C;
        } else {
          src = below + (sr - y1) * row_elems + g.m0;
          step = M;
        }
        for (int64_t j = 0; j < xa; ++j) zero_n(drow + j * C + g.c0, g.len);
        const T* sp = src + (xa + g.dx) * step;
        T* dp = drow + xa * C + g.c0;
        switch (g.len) {  // the common short runs as fixed-size copies
          case 1:
            for (int64_t j = xa; j < xb; ++j, sp += step, dp += C) dp[0] = sp[0];
            break;
          case 2:
            for (int64_t j = xa; j < xb; ++j, sp += step, dp += C) std::memcpy(dp, sp, 2 * sizeof(T));
            break;
          case 3:
            for (int64_t j = xa; j < xb; ++j, sp += step, dp += C) std::memcpy(dp, sp, 3 * sizeof(T));
            break;
          case 4:
            for (int64_t j = xa; j < xb; ++j, sp += step, dp += C) std::memcpy(dp, sp, 4 * sizeof(T));
            break;
          default:
            for (int64_t j = xa; j < xb; ++j, sp += step, dp += C) copy_n(dp, sp, g.len);
        }
        for (int64_t j = xb; j < W; ++j) zero_n(drow + j * C + g.c0, g.len);
      }
    }
  };
  if (tasks == 1 || N * H * W * M < (int64_t{1} << 14)) {
    for (int64_t t = 0; t < tasks; ++t) run_task(t);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run_task(t);
    });
  }
}

}  // namespace

void shift_inplace(Tensor& x, const Tensor& shifts) {
  check_args(x, shifts, 1, "shift_inplace");
  Tensor holder;
  const int64_t* s = int_shifts(shifts, holder);
  std::vector<int64_t> moved;
  for (int64_t c = 0; c < x.size(1); ++c)
    if (s[2 * c] != 0 || s[2 * c + 1] != 0) moved.push_back(c);
  if (moved.empty() || x.numel() == 0) return;
  const bool cl = is_channels_last(x);
  if (!x.is_contiguous(format_of(cl))) {  // a strided view: shift a contiguous copy, write back the moved channels
    Tensor y = x.contiguous();
    shift_inplace(y, shifts);
    Tensor idx = at::tensor(moved, at::kLong);
    x.index_copy_(1, idx, y.index_select(1, idx));
    return;
  }
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  dispatch_by_size(x, [&](auto tag) {
    using T = decltype(tag);
    T* p = static_cast<T*>(x.data_ptr());
    cl ? shift_inplace_nhwc(p, N, C, H, W, moved, s) : shift_inplace_nchw(p, N, C, H, W, moved, s);
  });
}

namespace {

// ------------------------------------------------------------------------------------------------------------
// Bilinear shift (ASL Eq. 8-10). Channel c samples at (i*s + fy + a, j*s + fx + b), fy = floor(dy), a = dy - fy;
// corners Z1..Z4 = (fy, fx), (fy, fx+1), (fy+1, fx), (fy+1, fx+1) with weights (1-a)(1-b), (1-a)b, a(1-b), ab.

template <typename A>
struct Bilinear {
  std::vector<int64_t> fy, fx;
  std::vector<A> a, b, w;  // w[4 c + k]: channel c's weight of corner k

  // corner k = 2 oy + ox of channel c: (fy + oy, fx + ox), weights (1-a)(1-b), (1-a)b, a(1-b), ab
  Disp corner(int64_t c, int64_t k) const { return {fy[c] + k / 2, fx[c] + k % 2}; }
  const A* weights(int64_t c) const { return &w[4 * c]; }
  bool same(const Bilinear& o) const { return fy == o.fy && fx == o.fx && a == o.a && b == o.b; }

  explicit Bilinear(const Tensor& shifts) {
    const Tensor s = shifts.to(at::kDouble).contiguous();
    const double* p = s.const_data_ptr<double>();
    const int64_t C = shifts.size(0);
    for (int64_t c = 0; c < C; ++c) {
      const double y = std::floor(p[2 * c]), x = std::floor(p[2 * c + 1]);
      const double ay = p[2 * c] - y, bx = p[2 * c + 1] - x;
      fy.push_back(static_cast<int64_t>(y));
      fx.push_back(static_cast<int64_t>(x));
      a.push_back(static_cast<A>(ay));
      b.push_back(static_cast<A>(bx));
      w.insert(w.end(), {static_cast<A>((1 - ay) * (1 - bx)), static_cast<A>((1 - ay) * bx),
                         static_cast<A>(ay * (1 - bx)), static_cast<A>(ay * bx)});
    }
  }
};

// Padded rows of one NCHW plane in the accumulation type: row(r) holds source columns k0 .. k0+L-1 of row r, zero
// outside the image (rows outside [0, h) are a shared zero row). Rows are filled on first use into a ring of four
// slots, so they stay in L1; the loops over them need no bounds checks and vectorise, whatever the shift.
template <typename T, typename A>
struct RowCache {
  std::vector<A> buf;
  const T* plane = nullptr;
  int64_t h = 0, w = 0, k0 = 0, L = 0, lo = 0, hi = 0;
  int64_t tag[4] = {-1, -1, -1, -1};

  void reset(const T* plane_, int64_t h_, int64_t w_, int64_t k0_, int64_t L_) {
    plane = plane_;
    h = h_;
    w = w_;
    k0 = k0_;
    if (L_ != L) buf.assign(5 * L_, A(0));  // slot 4 is the zero row
    L = L_;
    lo = std::min(L, std::max<int64_t>(0, -k0));
    hi = std::max(lo, std::min(L, w - k0));
    std::fill(tag, tag + 4, -1);
  }
  const A* row(int64_t r) {
    if (r < 0 || r >= h) return buf.data() + 4 * L;
    A* d = buf.data() + (r & 3) * L;
    if (tag[r & 3] != r) {
      tag[r & 3] = r;
      const T* src = plane + r * w;
      for (int64_t t = 0; t < lo; ++t) d[t] = A(0);
#pragma omp simd
      for (int64_t t = lo; t < hi; ++t) d[t] = static_cast<A>(src[k0 + t]);
      for (int64_t t = hi; t < L; ++t) d[t] = A(0);
    }
    return d;
  }
};

template <int S, typename T, typename A>
void bilinear_forward_plane(const T* x, T* out, int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Bilinear<A>& q,
                            int64_t c, RowCache<T, A>& pad) {
  const int64_t fy = q.fy[c];
  const A w00 = q.weights(c)[0], w01 = q.weights(c)[1], w10 = q.weights(c)[2], w11 = q.weights(c)[3];
  pad.reset(x, H, W, q.fx[c], (Wo - 1) * S + 2);  // columns fx .. (Wo-1)*S + fx + 1
  for (int64_t i = 0; i < Ho; ++i) {
    const A* p0 = pad.row(i * S + fy);
    const A* p1 = pad.row(i * S + fy + 1);
    T* o = out + i * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j)
      o[j] = static_cast<T>(w00 * p0[j * S] + w01 * p0[j * S + 1] + w10 * p1[j * S] + w11 * p1[j * S + 1]);
  }
}

// Input gradient (adjoint of the bilinear shift): gx[y, x] = sum over corners (oy, ox) with y - fy - oy = i*S and
// x - fx - ox = j*S of w[oy][ox] g[i, j].
template <int S, typename T, typename A>
void bilinear_adjoint_plane(const T* g, T* gx, int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Bilinear<A>& q,
                            int64_t c, RowCache<T, A>& pad) {
  const int64_t fy = q.fy[c], fx = q.fx[c];
  const A w[2][2] = {{q.weights(c)[0], q.weights(c)[1]}, {q.weights(c)[2], q.weights(c)[3]}};
  if (S == 1) {
    pad.reset(g, Ho, Wo, -fx - 1, W + 1);  // columns x - fx - 1 .. x - fx for x in [0, W)
    for (int64_t y = 0; y < H; ++y) {
      const A* p0 = pad.row(y - fy);
      const A* p1 = pad.row(y - fy - 1);
      T* o = gx + y * W;
#pragma omp simd
      for (int64_t x = 0; x < W; ++x)
        o[x] = static_cast<T>(w[0][0] * p0[x + 1] + w[0][1] * p0[x] + w[1][0] * p1[x + 1] + w[1][1] * p1[x]);
    }
    return;
  }
  // stride 2: exactly one corner row and one corner column reach each input pixel (by parity)
  const int64_t k0 = floordiv(-fx - 1, S);
  pad.reset(g, Ho, Wo, k0, floordiv(W - 1 - fx, S) - k0 + 1);
  for (int64_t y = 0; y < H; ++y) {
    const int64_t oy = (y - fy) & 1;
    const A* p = pad.row((y - fy - oy) / S);
    const A wy0 = w[oy][0], wy1 = w[oy][1];
    T* o = gx + y * W;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t ox = (x - fx) & 1;
      o[x] = static_cast<T>((ox ? wy1 : wy0) * p[((x - fx - ox) >> 1) - k0]);
    }
  }
}

// Adds this plane's shift gradient (sum over the output pixels, ASL Eq. 8 differentiated) to sy, sx; `col` holds
// per-column partial sums (4 * Wo), so the only horizontal reduction is one per plane.
template <int S, typename T, typename A>
void shift_grad_plane(const T* g, const T* x, int64_t H, int64_t W, int64_t Ho, int64_t Wo, const Bilinear<A>& q,
                      int64_t c, RowCache<T, A>& pad, std::vector<A>& col, double& sy, double& sx) {
  const int64_t fy = q.fy[c];
  const A a = q.a[c], b = q.b[c];
  pad.reset(x, H, W, q.fx[c], (Wo - 1) * S + 2);
  col.assign(4 * Wo, A(0));
  A* __restrict__ d13 = col.data();
  A* __restrict__ d24 = d13 + Wo;
  A* __restrict__ d12 = d24 + Wo;
  A* __restrict__ d34 = d12 + Wo;
  for (int64_t i = 0; i < Ho; ++i) {
    const A* p0 = pad.row(i * S + fy);
    const A* p1 = pad.row(i * S + fy + 1);
    const T* gr = g + i * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) {
      const A gv = static_cast<A>(gr[j]);
      const A z1 = p0[j * S], z2 = p0[j * S + 1], z3 = p1[j * S], z4 = p1[j * S + 1];
      d13[j] += gv * (z3 - z1);
      d24[j] += gv * (z4 - z2);
      d12[j] += gv * (z2 - z1);
      d34[j] += gv * (z4 - z3);
    }
  }
  A s13(0), s24(0), s12(0), s34(0);
  for (int64_t j = 0; j < Wo; ++j) {
    s13 += d13[j];
    s24 += d24[j];
    s12 += d12[j];
    s34 += d34[j];
  }
  sy += static_cast<double>((1 - b) * s13 + b * s24);
  sx += static_cast<double>((1 - a) * s12 + a * s34);
}

// channels_last: channels are taken in blocks of kBlock; for each block, the distinct corner displacements
// (fy + oy, fx + ox) used by its channels are listed with per-lane coefficients and a per-lane mask (lanes whose
// channel does not use the displacement read 0, never 0 * x, so inf/nan stay where the reference puts them).
// A pixel then costs one contiguous, vectorised multiply-add per listed displacement that lies inside the image;
// with shifts in [-1, 1) a block lists at most 9 displacements.
constexpr int64_t kBlock = 16;

template <typename A>
A corner_weight(const Bilinear<A>& q, int64_t c, int oy, int ox) {
  return q.weights(c)[2 * oy + ox];
}

template <typename A>
struct Displacements {
  struct Entry {
    int64_t dy, dx, at;  // displacement, offset of its lanes in coef/mask
  };
  struct Block {
    int64_t c0, len;
    std::vector<Entry> entries;
  };
  std::vector<Block> blocks;
  std::vector<A> coef;  // bilinear weight of each lane's channel at the displacement (0 if unused)
  std::vector<A> mask;  // 1 where the lane's channel uses the displacement

  Displacements(const Bilinear<A>& q, int64_t C) {
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      Block blk{c0, std::min(kBlock, C - c0), {}};
      for (int64_t k = 0; k < blk.len; ++k)
        for (int oy = 0; oy < 2; ++oy)
          for (int ox = 0; ox < 2; ++ox) {
            const int64_t c = c0 + k, dy = q.fy[c] + oy, dx = q.fx[c] + ox;
            auto it = std::find_if(blk.entries.begin(), blk.entries.end(),
                                   [&](const Entry& e) { return e.dy == dy && e.dx == dx; });
            if (it == blk.entries.end()) {
              blk.entries.push_back({dy, dx, static_cast<int64_t>(mask.size())});
              mask.resize(mask.size() + kBlock, A(0));
              coef.resize(mask.size(), A(0));
              it = blk.entries.end() - 1;
            }
            mask[it->at + k] = A(1);
            coef[it->at + k] = corner_weight(q, c, oy, ox);
          }
      blocks.push_back(std::move(blk));
    }
  }
};


// acc[k] += coef[k] * (mask[k] ? z[k] : 0) for the lanes of one block (full blocks unrolled at compile time);
// z is loaded unconditionally (it lies inside the pixel) so that the select vectorises as a blend.
template <typename T, typename A>
inline void madd(A* __restrict__ acc, const A* __restrict__ coef, const A* __restrict__ mask,
                 const T* __restrict__ z, int64_t len) {
  if (len == kBlock) {
#pragma omp simd
    for (int64_t k = 0; k < kBlock; ++k) {
      const A v = static_cast<A>(z[k]);
      acc[k] += coef[k] * (mask[k] != A(0) ? v : A(0));
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const A v = static_cast<A>(z[k]);
      acc[k] += coef[k] * (mask[k] != A(0) ? v : A(0));
    }
  }
}

// Forward (adjoint=false): out pixel (i, j) reads x at (i*S + dy, j*S + dx).
// Adjoint (adjoint=true): gx pixel (y, x) reads g at ((y - dy) / S, (x - dx) / S) when divisible.
template <int S, bool Adjoint, typename T, typename A>
void bilinear_nhwc(const T* src, T* dst, int64_t N, int64_t C, int64_t Hs, int64_t Ws, int64_t Hd, int64_t Wd,
                   const Displacements<A>& d) {
  parallel(N * Hd, Wd * C, [&](int64_t begin, int64_t end) {
    A acc[kBlock];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = p / Hd, y = p % Hd;
      const T* sn = src + n * Hs * Ws * C;
      for (int64_t x = 0; x < Wd; ++x) {
        T* o = dst + (p * Wd + x) * C;
        for (const auto& blk : d.blocks) {
          std::fill(acc, acc + kBlock, A(0));
          for (const auto& e : blk.entries) {
            int64_t r, k;
            if (Adjoint) {
              const int64_t ty = y - e.dy, tx = x - e.dx;
              if (ty < 0 || tx < 0 || ty % S != 0 || tx % S != 0) continue;
              r = ty / S;
              k = tx / S;
            } else {
              r = y * S + e.dy;
              k = x * S + e.dx;
            }
            if (r < 0 || r >= Hs || k < 0 || k >= Ws) continue;
            madd(acc, &d.coef[e.at], &d.mask[e.at], sn + (r * Ws + k) * C + blk.c0, blk.len);
          }
          for (int64_t k = 0; k < blk.len; ++k) o[blk.c0 + k] = static_cast<T>(acc[k]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// channels_last bilinear kernels on whole channel vectors (kVecBytes: 8 float or 4 double lanes with AVX2, 16 or 8
// with AVX-512; GCC vector types).
// For each vector of channels the distinct corner displacements of its lanes are listed once (VecPlan); a pixel
// then costs one unmasked, contiguous multiply-add per listed displacement, for all lanes at once (lanes that do
// not use a displacement have weight 0 there, or their sum is never read).

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef uint32_t U;
  typedef U M __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef uint64_t U;
  typedef U M __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / 8;
};

// Lanes [0, len) of a channel vector converted to A (len == L when Full); missing lanes read 0.
template <bool Full, typename A, typename T>
inline typename Vec<A>::V vload(const T* p, int64_t len) {
  typename Vec<A>::V v;
  if constexpr (Full && std::is_same<A, T>::value) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (Full && std::is_same<T, c10::BFloat16>::value && std::is_same<A, float>::value) {
    typedef uint16_t H __attribute__((vector_size(kVecBytes / 2)));
    typedef uint32_t U __attribute__((vector_size(kVecBytes)));
    H h;
    std::memcpy(&h, p, sizeof(h));
    const U u = __builtin_convertvector(h, U) << 16;  // bfloat16 is the top half of a float
    std::memcpy(&v, &u, sizeof(v));
  } else {
    A t[Vec<A>::L] = {};
    for (int64_t k = 0; k < len; ++k) t[k] = static_cast<A>(p[k]);
    std::memcpy(&v, t, sizeof(v));
  }
  return v;
}

template <bool Full, typename A, typename T>
inline void vstore(T* p, const typename Vec<A>::V& v, int64_t len) {
  if constexpr (Full && std::is_same<A, T>::value) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (Full && std::is_same<T, c10::BFloat16>::value && std::is_same<A, float>::value) {
    // c10's float -> bfloat16 rounding (to nearest even; NaN -> 0x7FC0) on all lanes at once
    typedef uint32_t U __attribute__((vector_size(kVecBytes)));
    U u;
    std::memcpy(&u, &v, sizeof(u));
    const U nan = reinterpret_cast<U>(v != v);
    u = (((u + ((u >> 16) & 1) + 0x7FFF) >> 16) & ~nan) | ((U{} + 0x7FC0) & nan);
#if FEWSHIFTS_VECTOR_BYTES == 64  // values fit 16 bits: truncation keeps them (one vpmovdw)
    const __m256i h = _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(u));
#elif defined(__AVX2__)  // values fit 16 bits: unsigned saturation packs them exactly (generic conversion: scalar)
    const __m256i w = reinterpret_cast<__m256i>(u);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
#else
    typedef uint16_t H __attribute__((vector_size(kVecBytes / 2)));
    const H h = __builtin_convertvector(u, H);
#endif
    std::memcpy(p, &h, sizeof(h));
  } else {
    A t[Vec<A>::L];
    std::memcpy(t, &v, sizeof(v));
    for (int64_t k = 0; k < len; ++k) p[k] = static_cast<T>(t[k]);
  }
}

// A non-temporal store of a whole vector of A (float or double; p vector-aligned), the flat loops' streamed store.
template <typename A>
inline void stream_vector(A* p, const typename Vec<A>::V& v) {
  put_vec<true>(reinterpret_cast<char*>(p), &v);
}

// vload / vstore of a whole vector where len is L, else of its first len lanes
template <typename A, typename T>
inline typename Vec<A>::V vload_n(const T* p, int64_t len) {
  return len == Vec<A>::L ? vload<true, A>(p, len) : vload<false, A>(p, len);
}

template <typename A, typename T>
inline void vstore_n(T* p, const typename Vec<A>::V& v, int64_t len) {
  if (len == Vec<A>::L) return vstore<true, A>(p, v, len);
  vstore<false, A>(p, v, len);
}

// Whether every vector added was finite: the bits of a - a (+0 when a is finite, nan otherwise) or-ed together,
// a one-cycle dependency chain per vector (accumulating a * 0 instead chains a multiply-add, 5 cycles on Zen 2).
template <typename A>
struct FiniteCheck {
  typename Vec<A>::M bits{};
  void add(const typename Vec<A>::V& a) {
    const typename Vec<A>::V d = a - a;
    typename Vec<A>::M b;
    std::memcpy(&b, &d, sizeof(b));
    bits |= b;
  }
  bool finite() const {
    uint64_t w[kVecBytes / 8], any = 0;
    std::memcpy(w, &bits, sizeof(w));
    for (uint64_t b : w) any |= b;
    return any == 0;
  }
};

// One vector of channels [c0, c0 + len): its lanes' corner displacements sign * (fy + oy, fx + ox), distinct and
// sorted; coef/mask hold, per displacement, each lane's corner weight / all-ones where the lane uses it;
// slot[4 k + 2 oy + ox] is the index of lane k's corner (oy, ox).
template <typename A>
struct VecPlan {
  using U = typename Vec<A>::U;
  int64_t c0 = 0, len = 0;
  std::vector<Disp> d;
  std::vector<A> coef;
  std::vector<U> mask;
  std::vector<int64_t> slot;
};

template <typename A>
std::vector<VecPlan<A>> vec_plans(const Bilinear<A>& q, int64_t C, int64_t sign) {
  constexpr int L = Vec<A>::L;
  using U = typename Vec<A>::U;
  std::vector<VecPlan<A>> plans;
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    VecPlan<A> p;
    p.c0 = c0;
    p.len = std::min<int64_t>(L, C - c0);
    for (int64_t k = 0; k < p.len; ++k)
      for (int oy = 0; oy < 2; ++oy)
        for (int ox = 0; ox < 2; ++ox) p.d.push_back({sign * (q.fy[c0 + k] + oy), sign * (q.fx[c0 + k] + ox)});
    std::sort(p.d.begin(), p.d.end());
    p.d.erase(std::unique(p.d.begin(), p.d.end()), p.d.end());
    p.coef.assign(p.d.size() * L, A(0));
    p.mask.assign(p.d.size() * L, U(0));
    p.slot.resize(4 * p.len);
    for (int64_t k = 0; k < p.len; ++k)
      for (int oy = 0; oy < 2; ++oy)
        for (int ox = 0; ox < 2; ++ox) {
          const Disp e{sign * (q.fy[c0 + k] + oy), sign * (q.fx[c0 + k] + ox)};
          const int64_t i = std::lower_bound(p.d.begin(), p.d.end(), e) - p.d.begin();
          p.slot[4 * k + 2 * oy + ox] = i;
          p.coef[i * L + k] = corner_weight(q, c0 + k, oy, ox);
          p.mask[i * L + k] = ~U(0);
        }
    plans.push_back(std::move(p));
  }
  return plans;
}

// Output positions j in [0, n_out) whose source j*S + d lies in [0, n_in): [lo, hi) (empty: lo >= hi).
template <int S>
inline void valid_range(int64_t d, int64_t n_in, int64_t n_out, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, -floordiv(d, S));
  hi = n_in - 1 - d >= 0 ? std::min(n_out, floordiv(n_in - 1 - d, S) + 1) : 0;
}

// acc[k] += sum over j in [j0, j1) of g[j] * x[j*S + k] (pixels of C channels; x points at the first column).
template <int NX, int S, bool Full, typename T, typename A>
inline void grad_run(const T* g, const T* x, int64_t C, int64_t j0, int64_t j1, int64_t len,
                     typename Vec<A>::V* acc) {
  using V = typename Vec<A>::V;
  V a[NX], b[NX];  // two sets of accumulators (even and odd j): independent FMA chains keep both FMA pipes busy
  for (int k = 0; k < NX; ++k) a[k] = b[k] = V{};
  int64_t j = j0;
  for (; j + 1 < j1; j += 2) {
    const V g0 = vload<Full, A>(g + j * C, len), g1 = vload<Full, A>(g + (j + 1) * C, len);
    const T* x0 = x + j * S * C;
    const T* x1 = x0 + S * C;
    for (int k = 0; k < NX; ++k) {
      a[k] += g0 * vload<Full, A>(x0 + k * C, len);
      b[k] += g1 * vload<Full, A>(x1 + k * C, len);
    }
  }
  if (j < j1) {
    const V g0 = vload<Full, A>(g + j * C, len);
    for (int k = 0; k < NX; ++k) a[k] += g0 * vload<Full, A>(x + (j * S + k) * C, len);
  }
  for (int k = 0; k < NX; ++k) acc[k] += a[k] + b[k];
}

template <int S, bool Full, typename T, typename A>
inline void grad_run_n(int64_t nx, const T* g, const T* x, int64_t C, int64_t j0, int64_t j1, int64_t len,
                       typename Vec<A>::V* acc) {
  switch (nx) {
    case 1: grad_run<1, S, Full, T, A>(g, x, C, j0, j1, len, acc); break;
    case 2: grad_run<2, S, Full, T, A>(g, x, C, j0, j1, len, acc); break;
    case 3: grad_run<3, S, Full, T, A>(g, x, C, j0, j1, len, acc); break;
    case 4: grad_run<4, S, Full, T, A>(g, x, C, j0, j1, len, acc); break;
    default: grad_run<5, S, Full, T, A>(g, x, C, j0, j1, len, acc); break;
  }
}

// Whole rows (all C channels) of one NHWC image, packed as A values into a ring of slots, columns [x0, x0 + pw) with
// zeros outside the image, in tiles of TL channels (128 bytes: 4 vectors, 2 with AVX-512): slot [tile][column][TL
// lanes], padding lanes zero. The vector kernels go through a row tile by tile, so what they read of the packed rows
// stays in L1 (the image itself, with pixel stride C, maps a row's pixels onto a few L1 sets and would evict them).
// Rows are packed on first use (contiguous reads of the image) and reused by the next output rows; no bounds checks.
template <typename T, typename A>
struct RowRing {
  static constexpr int64_t TL = 128 / sizeof(A), VT = TL / Vec<A>::L;  // lanes and vectors per tile
  std::vector<A> buf;
  std::vector<int64_t> tag;
  const T* img = nullptr;
  int64_t H = 0, W = 0, C = 0, x0 = 0, pw = 0, tiles = 0;

  void reset(const T* img_, int64_t H_, int64_t W_, int64_t C_, int64_t x0_, int64_t pw_, int64_t slots) {
    img = img_, H = H_, W = W_, C = C_, x0 = x0_, pw = pw_, tiles = (C + TL - 1) / TL;
    buf.resize(slots * tiles * pw * TL);
    tag.assign(slots, -1);
  }
  // packed source row r (in [0, H))
  const A* row(int64_t r) {
    const int64_t slot = r % static_cast<int64_t>(tag.size());
    A* const base = buf.data() + slot * tiles * pw * TL;
    if (tag[slot] != r) {
      tag[slot] = r;
      pack(img + r * W * C, base);
    }
    return base;
  }
  // lanes of channel vector v at packed column col (image column x0 + col); the next column is TL further
  const A* at(const A* base, int64_t v, int64_t col) const {
    return base + (v / VT * pw + col) * TL + v % VT * Vec<A>::L;
  }
  void pack(const T* src, A* d) const {
    for (int64_t t = 0; t < pw; ++t) {
      const int64_t xc = x0 + t;
      A* dt = d + t * TL;
      if (xc < 0 || xc >= W) {
        for (int64_t k = 0; k < tiles; ++k) std::fill(dt + k * pw * TL, dt + k * pw * TL + TL, A(0));
        continue;
      }
      const T* s = src + xc * C;
      for (int64_t k = 0; k < tiles; ++k, s += TL) {
        const int64_t n = std::min(TL, C - k * TL);
        A* o = dt + k * pw * TL;
        if (std::is_same<T, A>::value && n == TL) {
          std::memcpy(o, s, TL * sizeof(A));  // constant size: inlined vector moves
        } else {
#pragma omp simd
          for (int64_t q = 0; q < n; ++q) o[q] = static_cast<A>(s[q]);
        }
        if (n < TL) std::fill(o + n, o + TL, A(0));
      }
    }
  }
};

// Work items of the vector kernels: blocks of output rows of one batch item, sized from the shape only (so the
// shift gradient's summation order does not depend on the number of threads).
struct RowBlocks {
  int64_t per_item, rows, count;  // output rows per block, rows per image, blocks per image
  RowBlocks(int64_t N, int64_t Ho) : rows(Ho) {
    const int64_t split = std::max<int64_t>(1, std::min<int64_t>(Ho / 8, (16 + N - 1) / N));
    per_item = (Ho + split - 1) / split;
    count = (Ho + per_item - 1) / per_item;
  }
};

template <typename A>
void disp_bounds(const std::vector<VecPlan<A>>& plans, int64_t& dy0, int64_t& dy1, int64_t& dx0, int64_t& dx1) {
  dx0 = dy0 = std::numeric_limits<int64_t>::max();
  dx1 = dy1 = std::numeric_limits<int64_t>::min();
  for (const auto& p : plans)
    for (const Disp& e : p.d) {
      dx0 = std::min(dx0, e.dx), dx1 = std::max(dx1, e.dx), dy0 = std::min(dy0, e.dy), dy1 = std::max(dy1, e.dy);
    }
}

// s[0, L) += the lanes of v, in double (whole-vector conversions: no store-to-load forwarding stalls)
inline void add_to_double(double* s, const Vec<float>::V& v) {
  typedef float F __attribute__((vector_size(kVecBytes / 2)));
  typedef double D __attribute__((vector_size(kVecBytes)));
#if FEWSHIFTS_VECTOR_BYTES == 64
  const F lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const F hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const F lo = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
#endif
  constexpr int half = Vec<float>::L / 2;
  D a, b;
  std::memcpy(&a, s, sizeof(a));
  std::memcpy(&b, s + half, sizeof(b));
  a += __builtin_convertvector(lo, D);
  b += __builtin_convertvector(hi, D);
  std::memcpy(s, &a, sizeof(a));
  std::memcpy(s + half, &b, sizeof(b));
}

inline void add_to_double(double* s, const Vec<double>::V& v) {
  Vec<double>::V a;
  std::memcpy(&a, s, sizeof(a));
  a += v;
  std::memcpy(s, &a, sizeof(a));
}

// The shift gradient of the channels in `bad` (whose fast sums were not finite) as the reference computes it, where
// the order of operations decides inf or nan: the sums of g * (z3 - z1), g * (z4 - z2), g * (z2 - z1), g * (z4 -
// z3) over all output pixels (corners outside the image read 0), then (1-b), b and (1-a), a times them. In double.
template <int S, typename T, typename A>
void exact_shift_grad(const T* g, const T* x, const Bilinear<A>& q, int64_t N, int64_t C, int64_t H, int64_t W,
                      int64_t Ho, int64_t Wo, const std::vector<int64_t>& bad, double* out) {
  parallel(static_cast<int64_t>(bad.size()), N * Ho * Wo, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t c = bad[e];
      double d13 = 0, d24 = 0, d12 = 0, d34 = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < Ho; ++i)
          for (int64_t j = 0; j < Wo; ++j) {
            double z[4];
            for (int k = 0; k < 4; ++k) {
              const int64_t r = i * S + q.fy[c] + k / 2, col = j * S + q.fx[c] + k % 2;
              z[k] = r >= 0 && r < H && col >= 0 && col < W
                         ? static_cast<double>(static_cast<A>(x[((n * H + r) * W + col) * C + c])) : 0.0;
            }
            const double gv = static_cast<double>(static_cast<A>(g[((n * Ho + i) * Wo + j) * C + c]));
            d13 += gv * (z[2] - z[0]), d24 += gv * (z[3] - z[1]), d12 += gv * (z[1] - z[0]), d34 += gv * (z[3] - z[2]);
          }
      const double a = static_cast<double>(q.a[c]), b = static_cast<double>(q.b[c]);
      out[2 * c] = d13 * (1 - b) + d24 * b;
      out[2 * c + 1] = d12 * (1 - a) + d34 * a;
    }
  });
}

// The output pixels whose four corners (fy + oy, fx + ox) all lie outside the H x W image, at stride 1: rows
// [0, top) and [bottom, H), and columns [0, left) and [right, W) of the others. The reference adds g times the zero
// padding there (inf * 0 = nan); the stride-1 kernels that read x at each source pixel and g at its shifted positions
// (backward_flat, backward_nhwc_fused) never read such a g, so a channel with a g there that is not finite is
// recomputed as the reference does.
struct OutsideBand {
  int64_t H, W, top, bottom, left, right;
  OutsideBand(int64_t H_, int64_t W_, int64_t fy, int64_t fx)
      : H(H_), W(W_), top(std::clamp<int64_t>(-fy - 1, 0, H)), bottom(std::clamp<int64_t>(H - fy, top, H)),
        left(std::clamp<int64_t>(-fx - 1, 0, W)), right(std::clamp<int64_t>(W - fx, left, W)) {}
  bool empty() const { return top == 0 && bottom == H && left == 0 && right == W; }
  bool holds(int64_t i, int64_t j) const { return i < top || i >= bottom || j < left || j >= right; }
  // f(j0, j1) for the runs of columns of row i in the band: the whole row, or [0, left) and [right, W)
  template <typename F>
  void runs(int64_t i, const F& f) const {
    if (i < top || i >= bottom) return f(int64_t{0}, W);
    f(int64_t{0}, left);
    f(right, W);
  }
  // the band of both: an output pixel in either's band is in this one's (for one pass over several channels' bands)
  void unite(const OutsideBand& o) {
    top = std::max(top, o.top), bottom = std::min(bottom, o.bottom);
    left = std::max(left, o.left), right = std::min(right, o.right);
  }
};

// Whether one NCHW output plane g (H x W, stride 1) has a g that is not finite in channel c's OutsideBand
template <typename T, typename A>
bool outside_not_finite(const T* g, int64_t H, int64_t W, const Bilinear<A>& q, int64_t c) {
  const OutsideBand o(H, W, q.fy[c], q.fx[c]);
  if (o.empty()) return false;
  int bad = 0;  // or-ed (v - v) != (v - v): true for inf and nan (a loop the compiler vectorises)
  for (int64_t i = 0; i < H; ++i)
    o.runs(i, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const A v = static_cast<A>(g[i * W + j]), d = v - v;
        bad |= d != d;
      }
    });
  return bad != 0;
}

// The channels of channels_last g (H x W pixels of C per image, stride 1) with a g that is not finite in their
// OutsideBand. row(grow, i) tests row i of one image (grow: its first pixel) where the channels' union band covers
// it, all channels of a pixel at a time (a vector test per vector of channels); backward_nhwc_fused calls it for each
// row after the row's pass, which has just read it. Safe to call from several threads.
template <typename A>
struct OutsideScan {
  int64_t C;
  std::vector<OutsideBand> band;
  OutsideBand all;  // the union of the channels' bands
  std::unique_ptr<std::atomic<bool>[]> flag;
  OutsideScan(const Bilinear<A>& q, int64_t H, int64_t W, int64_t C_)
      : C(C_), all(H, W, 0, 0), flag(new std::atomic<bool>[C_]) {
    for (int64_t c = 0; c < C; ++c) {
      band.emplace_back(H, W, q.fy[c], q.fx[c]);
      all.unite(band[c]);
      flag[c].store(false, std::memory_order_relaxed);
    }
  }
  template <typename T>
  void row(const T* grow, int64_t i) {
    if (all.empty()) return;
    constexpr int L = Vec<A>::L;
    const int64_t full = C / L;
    all.runs(i, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const T* px = grow + j * C;
        FiniteCheck<A> chk;
        for (int64_t v = 0; v < full; ++v) chk.add(vload<true, A>(px + v * L, L));
        bool any = !chk.finite();
        for (int64_t c = full * L; c < C; ++c) any |= !std::isfinite(static_cast<double>(px[c]));
        if (any)
          for (int64_t c = 0; c < C; ++c)
            if (!std::isfinite(static_cast<double>(px[c])) && band[c].holds(i, j))
              flag[c].store(true, std::memory_order_relaxed);
      }
    });
  }
  // the flagged channels added to bad (sorted, each once)
  void add_to(std::vector<int64_t>& bad) const {
    for (int64_t c = 0; c < C; ++c)
      if (flag[c].load(std::memory_order_relaxed)) bad.push_back(c);
    std::sort(bad.begin(), bad.end());
    bad.erase(std::unique(bad.begin(), bad.end()), bad.end());
  }
};

// out[2 c], out[2 c + 1] += the items' partial sums (items in order: the same result whatever the number of threads);
// channels whose sums are not finite are recomputed by exact_shift_grad, and with `outside` (backward_nhwc_fused)
// those with a g that is not finite where the kernel does not read it
template <int S, typename T, typename A>
void reduce_shift_grad(const std::vector<double>& partial, const T* g, const T* x,
                       const Bilinear<A>& q, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                       double* out, const OutsideScan<A>* outside = nullptr) {
  std::vector<double> sum(2 * C, 0.0);
  const int64_t items = C > 0 ? static_cast<int64_t>(partial.size()) / (2 * C) : 0;
  for (int64_t item = 0; item < items; ++item)
    for (int64_t k = 0; k < 2 * C; ++k) sum[k] += partial[item * 2 * C + k];
  std::vector<int64_t> bad;
  for (int64_t c = 0; c < C; ++c)
    if (!std::isfinite(sum[2 * c]) || !std::isfinite(sum[2 * c + 1])) bad.push_back(c);
  if (outside != nullptr) outside->add_to(bad);
  if (!bad.empty()) exact_shift_grad<S>(g, x, q, N, C, H, W, Ho, Wo, bad, sum.data());
  for (int64_t k = 0; k < 2 * C; ++k) out[k] += sum[k];
}

// Shift gradient, channels_last. Per vector of channels and per displacement d its lanes use,
// S_d = sum over output pixels p of g[p] * x[p*S + d] (runs of up to 5 consecutive dx share each load of g), on
// packed, zero-padded rows; then each channel combines its four corners' sums: d/d dy = (1-b)(S3 - S1) +
// b(S4 - S2), d/d dx = (1-a)(S2 - S1) + a(S4 - S3). Rows are summed in A, then in double per row block; the
// blocks' sums are added in order (deterministic whatever the number of threads).
template <int S, typename T, typename A>
void shift_grad_nhwc_vec(const T* g, const T* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho,
                         int64_t Wo, const Bilinear<A>& q, double* out) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  const std::vector<VecPlan<A>> plans = vec_plans(q, C, 1);
  const int64_t nv = static_cast<int64_t>(plans.size());
  int64_t kmax = 0, tot = 0;
  for (const auto& p : plans) kmax = std::max<int64_t>(kmax, p.d.size()), tot += p.d.size();
  int64_t dy0, dy1, dx0, dx1;
  disp_bounds(plans, dy0, dy1, dx0, dx1);
  const RowBlocks rb(N, Ho);
  const int64_t items = N * rb.count;
  std::vector<double> partial(items * 2 * C, 0.0);
  parallel(items, int64_t{1} << 20, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(tot * L);
    std::vector<V> row(kmax);
    RowRing<T, A> xr, gr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / rb.count, i0 = item % rb.count * rb.per_item, i1 = std::min(Ho, i0 + rb.per_item);
      xr.reset(x + n * H * W * C, H, W, C, dx0, (Wo - 1) * S + dx1 - dx0 + 1,
               std::min<int64_t>(dy1 - dy0 + 1 + S, 16));
      gr.reset(g + n * Ho * Wo * C, Ho, Wo, C, 0, Wo, 1);
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t i = i0; i < i1; ++i) {
        const A* gbase = gr.row(i);
        double* s = sums.data();
        for (int64_t v = 0; v < nv; ++v) {
          const VecPlan<A>& p = plans[v];
          const int64_t K = static_cast<int64_t>(p.d.size());
          std::fill(row.begin(), row.begin() + K, V{});
          for (int64_t e = 0; e < K;) {
            const int64_t dy = p.d[e].dy, d0 = p.d[e].dx;
            int64_t nx = 1;
            while (nx < 5 && e + nx < K && p.d[e + nx].dy == dy && p.d[e + nx].dx == d0 + nx) ++nx;
            const int64_t r = i * S + dy;
            if (r >= 0 && r < H) {
              const A* xp = xr.at(xr.row(r), v, d0 - dx0);
              grad_run_n<S, true, A, A>(nx, gr.at(gbase, v, 0), xp, xr.TL, 0, Wo, L, row.data() + e);
            }
            e += nx;
          }
          for (int64_t e = 0; e < K; ++e, s += L) add_to_double(s, row[e]);
        }
      }
      const double* s = sums.data();
      for (int64_t v = 0; v < nv; s += plans[v].d.size() * L, ++v) {
        const VecPlan<A>& p = plans[v];
        for (int64_t k = 0; k < p.len; ++k) {
          const int64_t c = p.c0 + k;
          const double s1 = s[p.slot[4 * k] * L + k], s2 = s[p.slot[4 * k + 1] * L + k];
          const double s3 = s[p.slot[4 * k + 2] * L + k], s4 = s[p.slot[4 * k + 3] * L + k];
          const double a = static_cast<double>(q.a[c]), b = static_cast<double>(q.b[c]);
          partial[item * 2 * C + 2 * c] = (1 - b) * (s3 - s1) + b * (s4 - s2);
          partial[item * 2 * C + 2 * c + 1] = (1 - a) * (s2 - s1) + a * (s4 - s3);
        }
      }
    }
  });
  reduce_shift_grad<S>(partial, g, x, q, N, C, H, W, Ho, Wo, out);
}

// Bilinear forward (plans of sign +1 on x) and stride-1 adjoint (sign -1 on g), channels_last, on whole channel
// vectors: out[i, j] = sum over the displacements d of its vector of coef_d * src[i*S + dy, j*S + dx], four output
// pixels at a time (independent FMA chains; each coefficient load serves four pixels), from packed zero-padded
// rows. Unmasked, a lane adds 0 * src for displacements it does not use, which is not 0 for inf/nan: a row of a
// vector whose result is not finite is recomputed with those lanes masked (the reference's semantics).
template <int S, bool Masked, typename T, typename A>
FiniteCheck<A> bilinear_vec_row(const A* const* src, const A* const* coef, const typename Vec<A>::U* const* mask,
                                    int64_t m, int64_t cp, int64_t Wo, int64_t C, T* out, int64_t len) {
  using V = typename Vec<A>::V;
  using M = typename Vec<A>::M;
  constexpr int L = Vec<A>::L;
  FiniteCheck<A> chk;
  auto ld = [&](const A* q, int64_t t) {
    V z = vload<true, A>(q, L);
    if constexpr (Masked) {
      M mk, bits;
      std::memcpy(&mk, mask[t], sizeof(mk));
      std::memcpy(&bits, &z, sizeof(z));
      bits &= mk;
      std::memcpy(&z, &bits, sizeof(z));
    }
    return z;
  };
  auto put = [&](T* o, const V& a) {
    chk.add(a);
    vstore_n<A>(o, a, len);
  };
  int64_t j = 0;
  for (; j + 4 <= Wo; j += 4) {
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t t = 0; t < m; ++t) {
      const V w = vload<true, A>(coef[t], L);
      const A* q = src[t] + j * S * cp;
      a0 += w * ld(q, t);
      a1 += w * ld(q + S * cp, t);
      a2 += w * ld(q + 2 * S * cp, t);
      a3 += w * ld(q + 3 * S * cp, t);
    }
    T* o = out + j * C;
    put(o, a0);
    put(o + C, a1);
    put(o + 2 * C, a2);
    put(o + 3 * C, a3);
  }
  for (; j < Wo; ++j) {
    V a0{};
    for (int64_t t = 0; t < m; ++t) a0 += vload<true, A>(coef[t], L) * ld(src[t] + j * S * cp, t);
    put(out + j * C, a0);
  }
  return chk;
}

// Returns false (nothing done) when the displacements span too many rows or columns for the row ring.
template <int S, typename T, typename A>
bool bilinear_nhwc_vec(const T* src, T* dst, int64_t N, int64_t C, int64_t Hs, int64_t Ws, int64_t Ho, int64_t Wo,
                       const std::vector<VecPlan<A>>& plans) {
  using U = typename Vec<A>::U;
  constexpr int L = Vec<A>::L;
  int64_t dy0, dy1, dx0, dx1;
  disp_bounds(plans, dy0, dy1, dx0, dx1);
  const int64_t slots = dy1 - dy0 + 1 + S, pw = (Wo - 1) * S + dx1 - dx0 + 1;
  if (slots > 16 || pw > 2 * Ws + 16) return false;
  int64_t kmax = 0;
  for (const auto& p : plans) kmax = std::max<int64_t>(kmax, p.d.size());
  const RowBlocks rb(N, Ho);
  parallel(N * rb.count, int64_t{1} << 20, [&](int64_t begin, int64_t end) {
    RowRing<T, A> ring;
    std::vector<const A*> ptr(kmax), cf(kmax);
    std::vector<const U*> mk(kmax);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / rb.count, i0 = item % rb.count * rb.per_item, i1 = std::min(Ho, i0 + rb.per_item);
      ring.reset(src + n * Hs * Ws * C, Hs, Ws, C, dx0, pw, slots);
      for (int64_t i = i0; i < i1; ++i) {
        T* orow = dst + (n * Ho + i) * Wo * C;
        for (int64_t v = 0; v < static_cast<int64_t>(plans.size()); ++v) {
          const VecPlan<A>& p = plans[v];
          int64_t m = 0;
          for (size_t e = 0; e < p.d.size(); ++e) {
            const int64_t r = i * S + p.d[e].dy;
            if (r < 0 || r >= Hs) continue;
            ptr[m] = ring.at(ring.row(r), v, p.d[e].dx - dx0);
            cf[m] = &p.coef[e * L];
            mk[m] = &p.mask[e * L];
            ++m;
          }
          if (!bilinear_vec_row<S, false>(ptr.data(), cf.data(), mk.data(), m, ring.TL, Wo, C, orow + p.c0, p.len)
                   .finite())
            bilinear_vec_row<S, true>(ptr.data(), cf.data(), mk.data(), m, ring.TL, Wo, C, orow + p.c0, p.len);
        }
      }
    }
  });
  return true;
}


// ------------------------------------------------------------------------------------------------------------
// channels_last bilinear kernels on a window of rows and columns. ASL Eq. 8-10 weighs the corners (fy + oy, fx + ox)
// by wy[oy] wx[ox], wy = (1-a, a), wx = (1-b, b). When every channel's corners lie within R rows r0 .. r0+R-1 and
// R columns k0 .. k0+R-1 (R = 3: shifts within a pixel, as ASL initialises them; R = 5: within two), the forward and
// the adjoint are two 1-D interpolations: out[i, j] = sum_u cx_u (sum_t cy_t src[i*S + r0 + t, j*S + k0 + u]) with
// per-channel weights (TapWeights, 0 at taps a channel does not use), the vertical sums of the last R source
// columns in a ring (bilinear_nhwc_sep). The gradient kernels pick each lane's own two rows and columns by blends
// instead (CornerPicks, pick_pair): they need differences of corners as well as interpolations. Pixels
// are visited in memory order, all channels of one before the next: R sequential streams of source rows, which the
// hardware prefetcher follows (visiting a row's pixels per vector of channels instead, with the weights in
// registers, ran 3x `x.clone()`: each load a new line, latency-bound). Rows outside the image read a zero row;
// columns outside it are 0 in the ring. A channel adds 0 * src at taps it does not use, which is not 0 for inf/nan:
// an output row that is not all finite is recomputed from each channel's four corners (the reference's terms). The
// adjoint (input gradient, stride 1) is the forward with the displacements negated. The forward by picks (two blends
// and a multiply-add per interpolation) ran 5% faster on one thread but 7% slower on two with streaming stores,
// which it needed to write through a pixel buffer (stored one vector at a time between the loads, it ran 2x
// slower); not kept.
// At stride 1 and R = 3 (ASL's shifts within a pixel) the forward and the adjoint compute two output pixels per pass
// over the channels (sep_row_pairs): 0.69-0.90x the time of one pixel per pass on outputs of 25-75 MB (close to
// `x.clone()`), 0.76-1.05x on cached ones (twelfth session, ops_notes.md). The fused backward takes two pixels per
// pass only where its per-channel data exceeds L1 (backward_row_pairs, pairs_fit). Two output rows per pass in the
// forward ran 1.33-1.40x slower; tiles of 8 pixels per vector of channels, the weights in registers, 0.77-0.91x at
// 32x1152x16x16 but 1.1-1.6x slower at 1x576x112x112 and 32x96x32x32 (30 pixels read side by side, not 3
// sequential rows).

template <typename A>
struct Window {  // the rows r0 .. r0+rows-1 and columns k0 .. k0+cols-1 that all channels' corners lie in
  int64_t r0 = 0, k0 = 0, rows = 0, cols = 0;
  Window(const Bilinear<A>& q, int64_t C, int64_t sign) {
    int64_t ylo = std::numeric_limits<int64_t>::max(), yhi = std::numeric_limits<int64_t>::min(), xlo = ylo, xhi = yhi;
    for (int64_t c = 0; c < C; ++c)
      for (int o = 0; o < 2; ++o) {
        const int64_t y = sign * (q.fy[c] + o), x = sign * (q.fx[c] + o);
        ylo = std::min(ylo, y), yhi = std::max(yhi, y), xlo = std::min(xlo, x), xhi = std::max(xhi, x);
      }
    if (C > 0) r0 = ylo, k0 = xlo, rows = yhi - ylo + 1, cols = xhi - xlo + 1;
  }
  int64_t span() const { return std::max(rows, cols); }
};

// Runs f with std::integral_constant<int, R> for the window size R (3 or 5) that holds every corner; false where
// none does.
template <typename A, typename F>
bool with_window(const Window<A>& win, const F& f) {
  if (win.rows == 0 || win.span() > 5) return false;
  if (win.span() <= 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 5>{});
  }
  return true;
}

// Channels_last output row i (Wo pixels of C channels) from each channel's four corners sign * (fy + oy, fx + ox)
// (the forward: +1; the input gradient: -1) of the image src, skipping those outside it: the reference's terms, for
// rows whose outputs are not all finite.
template <int S, typename T, typename A>
void bilinear_exact_row(const Bilinear<A>& q, int64_t sign, const T* src, int64_t C, int64_t Hs, int64_t Ws,
                        int64_t i, int64_t Wo, T* orow) {
  for (int64_t j = 0; j < Wo; ++j)
    for (int64_t c = 0; c < C; ++c) {
      A acc(0);
      for (int k = 0; k < 4; ++k) {
        const int64_t r = i * S + sign * (q.fy[c] + k / 2), col = j * S + sign * (q.fx[c] + k % 2);
        if (r >= 0 && r < Hs && col >= 0 && col < Ws)
          acc += q.weights(c)[k] * static_cast<A>(src[(r * Ws + col) * C + c]);
      }
      orow[j * C + c] = static_cast<T>(acc);
    }
}

// Per vector of channels: a, b and the bits of the masks that pick each lane's corners from the R x R window.
template <int R, typename A>
struct CornerPicks {
  static constexpr int L = Vec<A>::L, K = 3;  // vectors per channel vector: a, b, the masks' bits
  using U = typename Vec<A>::U;
  using V = typename Vec<A>::V;
  using M = typename Vec<A>::M;
  int64_t nv = 0;
  Window<A> win;
  // [vector][K]: a, b, then bits: the top bit shifted right by t - 1 is set where the lane's lower corner row (of
  // sign * (fy + oy), oy in {0, 1}) is at least r0 + t, by R - 3 + t where its lower corner column is at least k0 + t
  // (t = 1 .. R-2). Three vectors per vector of channels: the kernels' per-channel data stays small.
  std::vector<V> k;
  CornerPicks(const Bilinear<A>& q, int64_t C, int64_t sign) : nv((C + L - 1) / L), win(q, C, sign), k(nv * K, V{}) {
    constexpr U top = U(1) << (8 * sizeof(U) - 1);
    for (int64_t c = 0; c < C; ++c) {
      A* d = reinterpret_cast<A*>(&k[c / L * K]) + c % L;
      d[0] = q.a[c], d[L] = q.b[c];
      const int64_t y = sign > 0 ? q.fy[c] : -q.fy[c] - 1, x = sign > 0 ? q.fx[c] : -q.fx[c] - 1;
      U bits = 0;
      for (int t = 1; t < R - 1; ++t) {
        if (y - win.r0 >= t) bits |= top >> (t - 1);
        if (x - win.k0 >= t) bits |= top >> (R - 3 + t);
      }
      std::memcpy(d + 2 * L, &bits, sizeof(U));
    }
  }
  // the row and column masks for t (their top bits, as pick reads them) of the vector with data k
  static M row_mask(const V* k, int t) { return reinterpret_cast<M>(k[2]) << (t - 1); }
  static M col_mask(const V* k, int t) { return reinterpret_cast<M>(k[2]) << (R - 3 + t); }
};

// Per vector of channels, each lane's weight at the R rows and R columns of the window: cy[t] = wy[oy] where row t
// is the lane's corner row sign * (fy + oy), 0 elsewhere; cx likewise (the separable forward and adjoint).
template <int R, typename A>
struct TapWeights {
  static constexpr int L = Vec<A>::L, K = 2 * R;  // vectors per channel vector: cy[R], cx[R]
  using V = typename Vec<A>::V;
  int64_t nv = 0;
  Window<A> win;
  std::vector<V> k;
  TapWeights(const Bilinear<A>& q, int64_t C, int64_t sign) : nv((C + L - 1) / L), win(q, C, sign), k(nv * K, V{}) {
    for (int64_t c = 0; c < C; ++c) {
      A* d = reinterpret_cast<A*>(&k[c / L * K]) + c % L;
      for (int o = 0; o < 2; ++o) {
        d[(sign * (q.fy[c] + o) - win.r0) * L] = o ? q.a[c] : A(1) - q.a[c];
        d[(R + sign * (q.fx[c] + o) - win.k0) * L] = o ? q.b[c] : A(1) - q.b[c];
      }
    }
  }
};

// lanes of q where the top bit of m is set, of p elsewhere (as AVX's blendv). With AVX-512 the generic form (an
// arithmetic shift and a ternary logic instruction) ran the fused channels_last backward 0.60-0.67x the time of
// _mm512_movepi32_mask and a masked blend (Zen 5, fourteenth session).
template <typename A>
inline typename Vec<A>::V pick(const typename Vec<A>::M& m_, const typename Vec<A>::V& p, const typename Vec<A>::V& q) {
#if FEWSHIFTS_VECTOR_BYTES == 32 && defined(__AVX__)
  if constexpr (std::is_same<A, float>::value) {
    return reinterpret_cast<typename Vec<A>::V>(
        _mm256_blendv_ps(reinterpret_cast<__m256>(p), reinterpret_cast<__m256>(q), reinterpret_cast<__m256>(m_)));
  } else {
    return reinterpret_cast<typename Vec<A>::V>(
        _mm256_blendv_pd(reinterpret_cast<__m256d>(p), reinterpret_cast<__m256d>(q), reinterpret_cast<__m256d>(m_)));
  }
#endif
  using M = typename Vec<A>::M;
  const M m = M{} - (m_ >> (8 * sizeof(typename Vec<A>::U) - 1));  // all ones where the top bit is set
  M pb, qb;
  std::memcpy(&pb, &p, sizeof(pb));
  std::memcpy(&qb, &q, sizeof(qb));
  const M r = (qb & m) | (pb & ~m);
  typename Vec<A>::V v;
  std::memcpy(&v, &r, sizeof(v));
  return v;
}

// Each lane's lower and upper source row (Cols: column) of the window's R, t and t + 1 for the lane's t (from its
// mask bits), out of x[0 .. R-1]
template <int R, bool Cols, typename A>
inline void pick_pair(const typename Vec<A>::V* k, const typename Vec<A>::V* x, typename Vec<A>::V& lo,
                      typename Vec<A>::V& hi) {
  lo = x[0], hi = x[1];
  for (int t = 1; t < R - 1; ++t) {
    const typename Vec<A>::M m = Cols ? CornerPicks<R, A>::col_mask(k, t) : CornerPicks<R, A>::row_mask(k, t);
    lo = pick<A>(m, lo, x[t]);
    hi = pick<A>(m, hi, x[t + 1]);
  }
}

// One output row (pixels [0, Wo), all channels) of bilinear_nhwc_sep; rows[t] is source row i*S + r0 + t (or a zero
// row); ring holds R x nv vectors. Returns whether every output was finite.
template <int S, int R, bool Stream, typename T, typename A>
bool sep_row(const T* const* rows, const TapWeights<R, A>& p, int64_t C, int64_t Ws, int64_t Wo, int64_t ahead,
             T* orow, typename Vec<A>::V* ring) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  auto vertical = [&](const V* k, const T* const* src, int64_t v, int64_t len, V* d) {
    V a = k[0] * vload_n<A>(src[0] + v * L, len);
    for (int t = 1; t < R; ++t) a += k[t] * vload_n<A>(src[t] + v * L, len);
    d[0] = a;
  };
  FiniteCheck<A> chk;
  auto put = [&](const V* k, const V* w, int64_t j, int64_t v, int64_t len) {
    V a = k[R] * w[0];
    for (int u = 1; u < R; ++u) a += k[R + u] * w[u];
    chk.add(a);
    T* o = orow + j * C + v * L;
    if (len == L && std::is_same<T, A>::value) {
      put_vec<Stream>(reinterpret_cast<char*>(o), &a);
    } else {
      vstore_n<A>(o, a, len);
    }
  };
  ring_row<S, R, 1, TapWeights<R, A>::K, 0, Vec<A>::L>(rows, p.k.data(), C, C, p.win.k0, Ws, Wo, ahead, ring,
                                                        vertical, put);
  return chk.finite();
}

// sep_row at stride 1 and R = 3 with two output pixels, j and j + 1, per pass over the channels: the pass computes
// the vertical sums of the new columns c1 = j + k0 + 2 and c2 = c1 + 1 (In1, In2: inside the image, else 0; Two:
// j + 1 is an output), and each vector's six weights and the ring's two old columns serve both outputs: 7 loads per
// output vector, where sep_row's loop makes 13. The ring holds the vertical sums of the last two columns, side by
// side per vector. src[t] is source row t at column c1 (at c2 without In1). Vectors [v0, v1), of len lanes. With
// ahead != 0 the newest row is prefetched for both columns, once per line (prefetching column c1 only, once per
// vector, left every other pixel to the hardware: 0.89-1.0x with both, on outputs of 25-75 MB; twelfth session).
// The separable forward's vertical sum of one vector of channels at offset at of the rows s0-s2 (TapWeights k: its
// row weights), term by term as sep_row
template <typename A>
inline typename Vec<A>::V sep_vertical_of(const typename Vec<A>::V* k, const typename Vec<A>::V* y) {  // loaded rows
  typename Vec<A>::V a = k[0] * y[0];
  a += k[1] * y[1];
  a += k[2] * y[2];
  return a;
}

template <bool Full, typename T, typename A>
inline typename Vec<A>::V sep_vertical(const T* s0, const T* s1, const T* s2, int64_t at, const typename Vec<A>::V* k,
                                       int64_t len) {
  const typename Vec<A>::V y[3] = {vload<Full, A>(s0 + at, len), vload<Full, A>(s1 + at, len),
                                   vload<Full, A>(s2 + at, len)};
  return sep_vertical_of<A>(k, y);
}

// One vector of channels of the separable forward's pass over two pixels of Rows output rows (sep_pair_pass,
// sep_row_pairs_registers): the vertical sums n1, n2 of the new columns (at and at + second of the Rows + 2 source
// rows s; 0 unless In1 / In2; row r's from rows r .. r + 2), output j of row r at o + r * stride and, with Two, j + 1
// from the window's sums w[2 r], w[2 r + 1], n1, n2 (TapWeights k: its column weights), term by term as sep_row; then
// each row's window moves on: w[2 r], w[2 r + 1] = n1, n2.
template <int Rows, bool Stream, bool In1, bool In2, bool Two, bool Full, typename T, typename A>
inline void sep_pair_vector(const T* const* s, int64_t at, int64_t second, int64_t stride,
                            const typename Vec<A>::V* k, int64_t len, int64_t C, T* o, typename Vec<A>::V* w,
                            FiniteCheck<A>& fin) {
  using V = typename Vec<A>::V;
  auto put = [&](T* d, const V& u0, const V& u1, const V& u2) {
    V a = k[3] * u0;
    a += k[4] * u1;
    a += k[5] * u2;
    fin.add(a);
    if (Full && std::is_same<T, A>::value) {
      put_vec<Stream>(reinterpret_cast<char*>(d), &a);
    } else {
      vstore<Full, A>(d, a, len);
    }
  };
  V y1[Rows + 2], y2[Rows + 2];
  for (int t = 0; t < Rows + 2; ++t) {
    if (In1) y1[t] = vload<Full, A>(s[t] + at, len);
    if (In2) y2[t] = vload<Full, A>(s[t] + at + second, len);
  }
  for (int r = 0; r < Rows; ++r) {
    const V n1 = In1 ? sep_vertical_of<A>(k, y1 + r) : V{};
    const V n2 = In2 ? sep_vertical_of<A>(k, y2 + r) : V{};
    put(o + r * stride, w[2 * r], w[2 * r + 1], n1);
    if (Two) put(o + r * stride + C, w[2 * r + 1], n1, n2);
    w[2 * r] = n1, w[2 * r + 1] = n2;
  }
}

template <int Rows, bool Stream, bool In1, bool In2, bool Two, bool Full, typename T, typename A>
inline void sep_pair_pass(const T* const* src, const typename Vec<A>::V* plan, int64_t C, int64_t stride, int64_t v0,
                          int64_t v1, int64_t len, int64_t ahead, typename Vec<A>::V* ring, T* o, FiniteCheck<A>& chk) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L, K = TapWeights<3, A>::K;
  const T* s[Rows + 2];
  for (int t = 0; t < Rows + 2; ++t) s[t] = src[t];
  const int64_t second = In1 ? C : 0;  // column c2's offset from src
  FiniteCheck<A> fin = chk;  // a local (as in backward_pair_pass)
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t e = v * L;
    if (ahead != 0 && v % kVectorsPerLine == 0)  // the newest rows' lines `ahead` on, of both columns (one per line)
      for (int t = 2; t < Rows + 2; ++t) prefetch_to_l2(s[t] + e + ahead), prefetch_to_l2(s[t] + e + C + ahead);
    V* r = ring + 2 * Rows * v;
    V w[2 * Rows];
    for (int u = 0; u < 2 * Rows; ++u) w[u] = r[u];
    sep_pair_vector<Rows, Stream, In1, In2, Two, Full>(s, e, second, stride, plan + v * K, len, C, o + e, w, fin);
    for (int u = 0; u < 2 * Rows; ++u) r[u] = w[u];
  }
  chk = fin;
}

// Rows output rows (i, or i and i + 1) of bilinear_nhwc_sep at stride 1, R = 3, by sep_pair_pass: rows[0 .. Rows + 1]
// are its source rows (or zero rows), orow row i (row i + 1 follows). Returns whether every output was finite.
template <int Rows, bool Stream, typename T, typename A>
bool sep_row_pairs(const T* const* rows, const TapWeights<3, A>& p, int64_t C, int64_t Ws, int64_t Wo,
                   int64_t ahead, T* orow, typename Vec<A>::V* ring) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L, K = TapWeights<3, A>::K;
  const int64_t full = C / L, tail = C % L, nv = full + (tail != 0), k0 = p.win.k0;
  const V* plan = p.k.data();
  FiniteCheck<A> chk;
  const int64_t strip = strip_vectors((K + 2 * Rows) * static_cast<int64_t>(sizeof(V)));  // weights 6, ring 2 a row
  for (int64_t b0 = 0; b0 < nv; b0 += strip) {  // channel strips [b0, b1) of vectors, the row once for each
    const int64_t b1 = std::min(nv, b0 + strip), f1 = std::min(b1, full);
    for (int c = 0; c < 2; ++c) {  // the ring: the vertical sums of columns k0 and k0 + 1 of each row
      const int64_t col = k0 + c;
      for (int64_t v = b0; v < b1; ++v) {
        const int64_t len = v < full ? L : tail;
        const V* k = plan + v * K;
        const int64_t at = col * C + v * L;
        for (int r = 0; r < Rows; ++r) {
          const T* const* y = rows + r;
          ring[2 * Rows * v + 2 * r + c] = col < 0 || col >= Ws ? V{}
                                           : len == L ? sep_vertical<true, T, A>(y[0], y[1], y[2], at, k, len)
                                                      : sep_vertical<false, T, A>(y[0], y[1], y[2], at, k, len);
        }
      }
    }
    for (int64_t j = 0; j < Wo; j += 2) {
      const int64_t c1 = j + k0 + 2, c2 = c1 + 1;
      const bool two = j + 1 < Wo, in1 = c1 >= 0 && c1 < Ws, in2 = two && c2 >= 0 && c2 < Ws;
      const int64_t at = (in1 ? c1 : in2 ? c2 : 0) * C;
      const T* src[Rows + 2];
      for (int t = 0; t < Rows + 2; ++t) src[t] = rows[t] + at;
      T* o = orow + j * C;
      auto pass = [&](auto i1, auto i2, auto tw) {
        constexpr bool I1 = decltype(i1)::value, I2 = decltype(i2)::value, Tw = decltype(tw)::value;
        const int64_t pf = in1 || in2 ? ahead : 0;
        sep_pair_pass<Rows, Stream, I1, I2, Tw, true>(src, plan, C, Wo * C, b0, f1, L, pf, ring, o, chk);
        if (f1 < b1)
          sep_pair_pass<Rows, Stream, I1, I2, Tw, false>(src, plan, C, Wo * C, f1, b1, tail, 0, ring, o, chk);
      };
      using Y = std::true_type;
      using N = std::false_type;
      if (!two) {
        in1 ? pass(Y{}, N{}, N{}) : pass(N{}, N{}, N{});
      } else if (in1) {
        in2 ? pass(Y{}, Y{}, Y{}) : pass(Y{}, N{}, Y{});
      } else {
        in2 ? pass(N{}, Y{}, Y{}) : pass(N{}, N{}, Y{});
      }
    }
  }
  return chk.finite();
}

// The row loop of the two-pixel register kernels: pass(j, In1, In2, Two) for j = 0, 2, ... below Wo, where the pass
// brings the source columns c1 = j + k0 + 2 and c2 = c1 + 1 (In1, In2: inside the image, else their values are 0)
// and Two says that j + 1 is an output too (std::bool_constant arguments: one instantiation of the pass each).
template <typename Pass>
inline void for_pixel_pairs(int64_t k0, int64_t Ws, int64_t Wo, const Pass& pass) {
  using Y = std::true_type;
  using N = std::false_type;
  for (int64_t j = 0; j < Wo; j += 2) {
    const int64_t c1 = j + k0 + 2, c2 = c1 + 1;
    const bool two = j + 1 < Wo, in1 = c1 >= 0 && c1 < Ws, in2 = two && c2 >= 0 && c2 < Ws;
    if (!two) {
      in1 ? pass(j, Y{}, N{}, N{}) : pass(j, N{}, N{}, N{});
    } else if (in1) {
      in2 ? pass(j, Y{}, Y{}, Y{}) : pass(j, Y{}, N{}, Y{});
    } else {
      in2 ? pass(j, N{}, Y{}, Y{}) : pass(j, N{}, N{}, Y{});
    }
  }
}

// sep_row_pairs for pixels of at most kSeparableRegisterVectors whole vectors: the ring's two vertical sums per vector
// stay in registers across the row (as pick_row_registers), where sep_pair_pass loads and stores them for every pair
// of pixels; both take each vector's step from sep_pair_vector. Zen 5, shuffled rounds, one build
// with either path, the forward: 0.50-0.81x sep_row_pairs' time at 16-160 float channels (1-10 vectors); before
// flatten, 0.81-0.96x at 176 and 0.96-1.09x at 192 (11-12 vectors: the vertical sums, weights and temporaries outgrow
// the 32 registers), and built without AVX-512 (16 registers) 0.76-0.91x at 4-8 vectors. One output row per pass:
// two (twice the sums in registers, up to 5 vectors) ran 0.85-1.07x the time of the one-row form at 16-80 float
// channels, nothing consistent (twentieth session).
constexpr int kSeparableRegisterVectors = kVectorRegisters == 32 ? 10 : 8;

template <int NV, bool Stream, typename T, typename A>
__attribute__((flatten))  // with_vector_count: the lambdas inlined
bool sep_row_pairs_registers(const T* const* rows, const TapWeights<3, A>& p, int64_t C, int64_t Ws, int64_t Wo,
                             int64_t ahead, T* orow) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L, K = TapWeights<3, A>::K;
  const int64_t k0 = p.win.k0;
  const V* plan = p.k.data();
  const T* s[3] = {rows[0], rows[1], rows[2]};
  FiniteCheck<A> fin;
  V w[NV][2];  // vertical sums of columns j + k0 and j + k0 + 1
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) {
    const V* k = plan + v * K;
    for (int c = 0; c < 2; ++c)
      w[v][c] = k0 + c >= 0 && k0 + c < Ws ? sep_vertical<true, T, A>(s[0], s[1], s[2], (k0 + c) * C + v * L, k, L)
                                           : V{};
  }
  auto pass = [&](int64_t j, auto i1, auto i2, auto tw) {
    constexpr bool In1 = decltype(i1)::value, In2 = decltype(i2)::value, Two = decltype(tw)::value;
    const int64_t c1 = j + k0 + 2;
    T* o = orow + j * C;
#pragma GCC unroll 12
    for (int v = 0; v < NV; ++v) {
      const int64_t e = c1 * C + v * L;
      if (ahead != 0 && (In1 || In2) && v % kVectorsPerLine == 0)
        prefetch_to_l2(s[2] + e + ahead), prefetch_to_l2(s[2] + e + C + ahead);
      sep_pair_vector<1, Stream, In1, In2, Two, true>(s, e, C, 0, plan + v * K, L, C, o + v * L, w[v], fin);
    }
  };
  for_pixel_pairs(k0, Ws, Wo, pass);
  return fin.finite();
}

// Returns false (nothing done) when the corners span more than 5 rows or columns.
template <int S, typename T, typename A>
bool bilinear_nhwc_sep(const T* src, T* dst, int64_t N, int64_t C, int64_t Hs, int64_t Ws, int64_t Ho, int64_t Wo,
                       const Bilinear<A>& q, int64_t sign) {
  const Window<A> win(q, C, sign);
  const bool stream = stream_blocks(dst, N * Ho * Wo, C);
  const int64_t ahead = prefetch_ahead<T>(N * Hs * Ws * C * static_cast<int64_t>(sizeof(T)), C);
  return with_window(win, [&](auto r) {
    constexpr int R = decltype(r)::value;
    const TapWeights<R, A> p(q, C, sign);
    const bool registers = S == 1 && R == 3 && C % Vec<A>::L == 0 && p.nv <= kSeparableRegisterVectors;
    // two rows per pass in sep_row_pairs only: where the register form takes a pixel (at 96 float channels two rows
    // in sep_row_pairs ran 1.16-1.20x its time), it keeps one row
    const int64_t step = S == 1 && R == 3 && !registers && two_rows_per_pass(ahead) ? 2 : 1;
    const std::vector<T> zero_row(Ws * C, T(0));
    const RowBlocks rb(N, Ho);
    parallel(N * rb.count, int64_t{1} << 20, [&](int64_t begin, int64_t end) {
      using V = typename Vec<A>::V;
      std::vector<V> ring(std::max(R, 4) * p.nv);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / rb.count, i0 = item % rb.count * rb.per_item, i1 = std::min(Ho, i0 + rb.per_item);
        const T* img = src + n * Hs * Ws * C;
        for (int64_t i = i0; i < i1; i += step) {
          const int64_t rows_here = std::min(step, i1 - i);
          T* orow = dst + (n * Ho + i) * Wo * C;
          V* rg = ring.data();
          const T* rows[R + 1];  // the source rows of output row i (R), and of row i + 1 (rows_here == 2)
          window_rows<R + 1>(img, i * S + win.r0, Hs, Ws * C, zero_row.data(), rows);
          bool finite;
          if constexpr (S == 1 && R == 3) {
            auto run = [&](auto two_rows) {
              constexpr int Rows = decltype(two_rows)::value ? 2 : 1;
              if constexpr (Rows == 1) {
                if (registers) {
                  return with_vector_count<kSeparableRegisterVectors>(p.nv, [&](auto nv) {
                    constexpr int NV = decltype(nv)::value;
                    return stream ? sep_row_pairs_registers<NV, true>(rows, p, C, Ws, Wo, ahead, orow)
                                  : sep_row_pairs_registers<NV, false>(rows, p, C, Ws, Wo, ahead, orow);
                  });
                }
              }
              return stream ? sep_row_pairs<Rows, true>(rows, p, C, Ws, Wo, ahead, orow, rg)
                            : sep_row_pairs<Rows, false>(rows, p, C, Ws, Wo, ahead, orow, rg);
            };
            finite = rows_here == 2 ? run(std::true_type{}) : run(std::false_type{});
          } else {
            finite = stream ? sep_row<S, R, true>(rows, p, C, Ws, Wo, ahead, orow, rg)
                            : sep_row<S, R, false>(rows, p, C, Ws, Wo, ahead, orow, rg);
          }
          for (int64_t r = 0; r < rows_here; ++r)
            if (!finite) bilinear_exact_row<S>(q, sign, img, C, Hs, Ws, i + r, Wo, orow + r * Wo * C);
        }
        if (stream) stream_fence<true>();
      }
    });
  });
}


// Shift gradient, channels_last, separable (ASL Eq. 8 differentiated), when every channel's corners lie within R
// rows r0 .. r0+R-1 and R columns k0 .. k0+R-1 (R = 3: shifts within a pixel, as ASL initialises them; R = 5: within
// two, as SSL's real shifts around small integers). With the vertical difference dv = x[fy+1] - x[fy] and
// interpolation iv = x[fy] + a dv of each source column (a channel's own two rows, picked per lane), d out / d dy =
// (1-b)(Z3 - Z1) + b(Z4 - Z2) = dv[fx] + b (dv[fx+1] - dv[fx]) and d out / d dx = (1-a)(Z2 - Z1) + a(Z4 - Z3) =
// iv[fx+1] - iv[fx]; the kernel sums g times each over the output pixels. Pixels in memory order, all channels of one
// before the next (as bilinear_nhwc_sep), dv and iv of the last R columns in a ring. Sums in A over whole output rows
// of at least 64 pixels together, then in double per block of rows (fixed by the shape: the same result whatever the
// number of threads). A channel whose sums are not finite is recomputed as the reference computes it
// (exact_shift_grad).

// Sums over one output row of g * d out/d dy and g * d out/d dx into acc[2 v], acc[2 v + 1] (in A); rows[t] is
// source row i*S + r0 + t (or a zero row); ring holds R slots of nv (dv, iv) pairs. Per-vector data is interleaved
// (plan, ring, sums), so that the loop needs few pointers (with one array each, they spilled to the stack; two
// outputs per pass, sharing the loads and stores of the sums, spilled too and ran 1.3x slower). Compiled with every
// call inlined (flatten): where GCC left ring_row's column sweep out of line (once the fused quantization-aware
// backward added its row work to the caller), the kernel ran 4x slower.
template <int S, int R, typename T, typename A>
__attribute__((flatten)) void grad_row(const T* const* rows, const T* grow, const CornerPicks<R, A>& p, int64_t C,
                                       int64_t Ws, int64_t Wo, int64_t ahead, typename Vec<A>::V* ring,
                                       typename Vec<A>::V* acc) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  auto column = [&](const V* k, const T* const* src, int64_t v, int64_t len, V* d) {  // d: dv, iv
    V x[R], lo, hi;
    for (int t = 0; t < R; ++t) x[t] = vload_n<A>(src[t] + v * L, len);
    pick_pair<R, false, A>(k, x, lo, hi);
    d[0] = hi - lo;
    d[1] = lo + k[0] * d[0];
  };
  // adds g times d out/d dy, d out/d dx of an output (dv, iv at its window positions 0 .. R-1) to the sums
  auto output = [&](const V* k, const V* w, int64_t j, int64_t v, int64_t len) {
    V dvw[R], ivw[R], dlo, dhi, ilo, ihi;
    for (int u = 0; u < R; ++u) dvw[u] = w[2 * u], ivw[u] = w[2 * u + 1];
    pick_pair<R, true, A>(k, dvw, dlo, dhi);
    pick_pair<R, true, A>(k, ivw, ilo, ihi);
    if (ahead != 0 && v % kVectorsPerLine == 0) prefetch_to_l2(grow + j * C + v * L + ahead);  // g, as x's row
    const V gv = vload_n<A>(grow + j * C + v * L, len);
    acc[2 * v] += gv * (dlo + k[1] * (dhi - dlo));
    acc[2 * v + 1] += gv * (ihi - ilo);
  };
  ring_row<S, R, 2, CornerPicks<R, A>::K, 2, Vec<A>::L>(rows, p.k.data(), C, C, p.win.k0, Ws, Wo, ahead, ring,
                                                        column, output);
}

// The work items of the channels_last shift-gradient kernels: blocks of `rows` rows of each image (RowBlocks, fixed
// by the shape: the same sums whatever the number of threads). Each thread makes its per-row work with make();
// row(n, i, count, sums) adds the terms of rows i .. i + count - 1 (count: `step`, 1 or 2, or what is left of the
// block) to sums (two vectors per vector of channels, in A), which are added to double sums after every `flush`
// rows (a multiple of step: up to 64 pixels together where rows are short). Returns the items' sums,
// [item][channel][2].
template <typename A, typename Make>
std::vector<double> row_block_sums(int64_t N, int64_t rows, int64_t width, int64_t C, int64_t step,
                                   const Make& make) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  const int64_t nv = (C + L - 1) / L;
  const RowBlocks rb(N, rows);
  const int64_t items = N * rb.count, flush = std::max<int64_t>(step, 64 / width / step * step);
  std::vector<double> partial(items * 2 * C, 0.0);
  parallel(items, int64_t{1} << 20, [&](int64_t begin, int64_t end) {
    auto row = make();
    std::vector<V> sums(2 * nv);
    std::vector<double> dy(nv * L), dx(nv * L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / rb.count, i0 = item % rb.count * rb.per_item, i1 = std::min(rows, i0 + rb.per_item);
      std::fill(dy.begin(), dy.end(), 0.0);
      std::fill(dx.begin(), dx.end(), 0.0);
      for (int64_t i = i0; i < i1; i += step) {
        if ((i - i0) % flush == 0) std::fill(sums.begin(), sums.end(), V{});
        row(n, i, std::min(step, i1 - i), sums.data());
        if ((i - i0) % flush == flush - step || i + step >= i1)
          for (int64_t v = 0; v < nv; ++v)
            add_to_double(&dy[v * L], sums[2 * v]), add_to_double(&dx[v * L], sums[2 * v + 1]);
      }
      double* part = &partial[item * 2 * C];
      for (int64_t c = 0; c < C; ++c) part[2 * c] = dy[c], part[2 * c + 1] = dx[c];
    }
  });
  return partial;
}

// (The default of shift_grad_nhwc_sep's make_row_work: nothing after each row.)
struct NoRowWork {
  auto operator()() const {
    return [](int64_t, int64_t) {};
  }
};

// make_row_work, called once per thread, makes work(n, i), which runs after output row i of image n.
template <int S, typename T, typename A, typename MakeRowWork = NoRowWork>
bool shift_grad_nhwc_sep(const T* g, const T* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Ho,
                         int64_t Wo, const Bilinear<A>& q, double* out, const MakeRowWork& make_row_work = {}) {
  const Window<A> win(q, C, 1);
  return with_window(win, [&](auto r) {
    constexpr int R = decltype(r)::value;
    using V = typename Vec<A>::V;
    const CornerPicks<R, A> p(q, C, 1);
    const std::vector<T> zero_row(W * C, T(0));
    const int64_t ahead = prefetch_ahead<T>(N * H * W * C * static_cast<int64_t>(sizeof(T)), C);
    const auto partial = row_block_sums<A>(N, Ho, Wo, C, 1, [&] {
      return [&, ring = std::vector<V>(2 * R * p.nv), work = make_row_work()](int64_t n, int64_t i, int64_t,
                                                                               V* sums) mutable {
        const T* rows[R];
        window_rows<R>(x + n * H * W * C, i * S + win.r0, H, W * C, zero_row.data(), rows);
        grad_row<S, R>(rows, g + (n * Ho + i) * Wo * C, p, C, W, Wo, ahead, ring.data(), sums);
        work(n, i);
      };
    });
    reduce_shift_grad<S>(partial, g, x, q, N, C, H, W, Ho, Wo, out);
  });
}


// Both bilinear gradients, channels_last, stride 1, in one pass over g and x (ASL Eq. 8-10 differentiated). With G =
// g zero outside the image, let, per source row i and column c, vd = G[i-fy-1, c] - G[i-fy, c] and vert =
// G[i-fy, c] + a vd (a channel's own two rows, picked per lane as in grad_row). Then the input gradient is gx[i, j] =
// vh + b (vl - vh), with vl, vh = vert at columns j-fx-1, j-fx, and, substituting r = p + f + o in the sums over
// output pixels p, sum_p g[p] d out[p]/d dy = sum_r x[r] (dh + b (dl - dh)) and sum_p g[p] d out[p]/d dx =
// sum_r x[r] (vl - vh) (dl, dh: vd at those columns): the input gradient's adjoint with the weights differentiated.
// x is read at the pixel being written, the same for every lane, so only g is picked per lane, and its picks serve
// both gradients. Pixels in memory order (as bilinear_nhwc_sep), vert and vd of the last R columns of g in a ring;
// gx with ordinary stores (streamed through a pixel buffer as in sep_row it ran no faster, one vector at a time 1.9x
// slower); sums as in shift_grad_nhwc_sep, over blocks of source rows. A row of gx that is not all finite is
// recomputed from each channel's corners, a channel whose sums are not finite as the reference computes it
// (exact_shift_grad). Per output vector it loads 3 vectors of g and 1 of x, where the separate input-gradient and
// shift-gradient passes loaded 4 and 3: 1.6-1.9x `x.clone()` at 2 threads, where they took 2.5-3.2x.
// vert and vd of one source column of g from its window rows y[0 .. R-1], each lane's own two rows picked
// (backward_row's ring data)
template <int R, typename A>
inline void g_column(const typename Vec<A>::V* k, const typename Vec<A>::V* y, typename Vec<A>::V& vert,
                     typename Vec<A>::V& vd) {
  typename Vec<A>::V lo, hi;
  pick_pair<R, false, A>(k, y, lo, hi);
  vd = lo - hi;
  vert = hi + k[0] * vd;
}

// gx of one output from vert and vd at the window's columns 0 .. R-1 (vw, dw); adds, for x value xv at that pixel,
// its terms of the two shift-gradient sums to sy, sx
template <int R, typename A>
inline typename Vec<A>::V g_output(const typename Vec<A>::V* k, const typename Vec<A>::V* vw,
                                   const typename Vec<A>::V* dw, const typename Vec<A>::V& xv,
                                   typename Vec<A>::V& sy, typename Vec<A>::V& sx) {
  typename Vec<A>::V vl, vh, dl, dh;
  pick_pair<R, true, A>(k, vw, vl, vh);
  pick_pair<R, true, A>(k, dw, dl, dh);
  const typename Vec<A>::V e = vl - vh;
  sy += xv * (dh + k[1] * (dl - dh));
  sx += xv * e;
  return vh + k[1] * e;
}

template <int R, typename T, typename A>
bool backward_row(const T* const* grows, const T* xrow, const CornerPicks<R, A>& p, int64_t C, int64_t W,
                  int64_t ahead, T* gxrow, typename Vec<A>::V* ring, typename Vec<A>::V* acc) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  auto column = [&](const V* k, const T* const* src, int64_t v, int64_t len, V* d) {  // d: vert, vd of g
    V y[R];
    for (int t = 0; t < R; ++t) y[t] = vload_n<A>(src[t] + v * L, len);
    g_column<R, A>(k, y, d[0], d[1]);
  };
  FiniteCheck<A> chk;
  // gx of output j, vector v, and the sums' terms, from vert and vd at the window's columns 0 .. R-1
  auto output = [&](const V* k, const V* w, int64_t j, int64_t v, int64_t len) {
    V vw[R], dw[R];
    for (int u = 0; u < R; ++u) vw[u] = w[2 * u], dw[u] = w[2 * u + 1];
    if (ahead != 0 && v % kVectorsPerLine == 0) prefetch_to_l2(xrow + j * C + v * L + ahead);  // x, as g's row
    const V xv = vload_n<A>(xrow + j * C + v * L, len);
    const V gv = g_output<R, A>(k, vw, dw, xv, acc[2 * v], acc[2 * v + 1]);
    chk.add(gv);
    vstore_n<A>(gxrow + j * C + v * L, gv, len);
  };
  ring_row<1, R, 2, CornerPicks<R, A>::K, 2, Vec<A>::L>(grows, p.k.data(), C, C, p.win.k0, W, W, ahead, ring,
                                                        column, output);
  return chk.finite();
}

// backward_row at R = 3 with two pixels, j and j + 1, per pass over the channels (as sep_row_pairs): each vector's
// plan and the ring's two older columns serve both, and the sums are loaded and stored once for both (copied to
// locals for the pass: as references into acc, GCC 12 reloaded them after the first pixel's streamed store, which
// might alias them, a store-to-load forwarding stall; 0.87x with locals, Zen 5): 17 loads per two output vectors
// where backward_row makes 16 per one. gx goes out as non-temporal stores after both pixels' x are loaded (with
// ordinary stores, or with x loaded after a streamed store to the same address bits, the pass ran 1.0-1.24x slower
// than one pixel per pass). Used where pairs_fit allows (with 32-byte vectors, where the one-pixel pass's per-channel
// data exceeds L1). Vectors [0, C / L), all full. Its row loop repeats sep_row_pairs': one loop for both, the passes
// called through a generic lambda with the row pointers as arguments, ran the forward 1.02-1.14x and this backward
// 1.03-1.11x slower (twelfth session).
// vert and vd of g for one whole vector of channels at offset at of the rows s0-s2 (g_column)
template <typename T, typename A>
inline void g_column_at(const T* s0, const T* s1, const T* s2, int64_t at, const typename Vec<A>::V* k,
                        typename Vec<A>::V& vert, typename Vec<A>::V& vd) {
  const typename Vec<A>::V y[3] = {vload<true, A>(s0 + at, Vec<A>::L), vload<true, A>(s1 + at, Vec<A>::L),
                                   vload<true, A>(s2 + at, Vec<A>::L)};
  g_column<3, A>(k, y, vert, vd);
}

// One vector of channels of the fused backward's pass over two pixels of Rows output rows (backward_pair_pass,
// backward_row_pairs_registers): vert and vd of g's new columns (at and at + second of the Rows + 2 rows s; 0 unless
// In1 / In2), then gx of pixel j of each row r at o + r * stride and, with Two, of j + 1 (streamed), from x at
// xp + r * stride (+ C), adding to the sums sy, sx; each row's window (w[4 r ..]: vert, vd of its two older columns)
// moves on to the new ones. Row r's columns come from rows r .. r + 2 of s, so two output rows load four rows of g
// where one row at a time loads six.
template <int Rows, bool In1, bool In2, bool Two, typename T, typename A>
inline void backward_pair_vector(const T* const* s, int64_t at, int64_t second, const T* xp, int64_t stride,
                                 const typename Vec<A>::V* k, int64_t C, T* o, typename Vec<A>::V* w,
                                 typename Vec<A>::V& sy, typename Vec<A>::V& sx, FiniteCheck<A>& fin) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  V x0[Rows], x1[Rows], y1[Rows + 2], y2[Rows + 2];
  for (int r = 0; r < Rows; ++r) {
    x0[r] = vload<true, A>(xp + r * stride, L);
    x1[r] = Two ? vload<true, A>(xp + r * stride + C, L) : V{};
  }
  for (int t = 0; t < Rows + 2; ++t) {
    if (In1) y1[t] = vload<true, A>(s[t] + at, L);
    if (In2) y2[t] = vload<true, A>(s[t] + at + second, L);
  }
  for (int r = 0; r < Rows; ++r) {
    V* wr = w + 4 * r;
    V vt[4] = {wr[0], wr[2], V{}, V{}}, vd[4] = {wr[1], wr[3], V{}, V{}};
    if (In1) g_column<3, A>(k, y1 + r, vt[2], vd[2]);
    if (In2) g_column<3, A>(k, y2 + r, vt[3], vd[3]);
    V gv = g_output<3, A>(k, vt, vd, x0[r], sy, sx);
    fin.add(gv);
    put_vec<true>(reinterpret_cast<char*>(o + r * stride), &gv);
    if (Two) {
      gv = g_output<3, A>(k, vt + 1, vd + 1, x1[r], sy, sx);
      fin.add(gv);
      put_vec<true>(reinterpret_cast<char*>(o + r * stride + C), &gv);
    }
    wr[0] = vt[2], wr[1] = vd[2], wr[2] = vt[3], wr[3] = vd[3];
  }
}

template <int Rows, bool In1, bool In2, bool Two, typename T, typename A>
inline void backward_pair_pass(const T* const* src, const T* xp, int64_t stride, const CornerPicks<3, A>& p,
                               int64_t C, int64_t v0, int64_t v1, int64_t ahead, typename Vec<A>::V* ring, T* o,
                               typename Vec<A>::V* acc, FiniteCheck<A>& chk) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L, K = CornerPicks<3, A>::K;
  const T* s[Rows + 2];
  for (int t = 0; t < Rows + 2; ++t) s[t] = src[t];
  const int64_t second = In1 ? C : 0;  // column c2's offset from src
  const V* plan = p.k.data();
  FiniteCheck<A> fin = chk;  // a local: in chk, the check's bits were stored and reloaded around every store of gx
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t e = v * L;
    if (ahead != 0 && v % kVectorsPerLine == 0) {  // `ahead` on, one per line: g's newest rows, x (both columns)
      for (int t = 2; t < Rows + 2; ++t) prefetch_to_l2(s[t] + e + ahead), prefetch_to_l2(s[t] + e + C + ahead);
      for (int r = 0; r < Rows; ++r)
        prefetch_to_l2(xp + r * stride + e + ahead), prefetch_to_l2(xp + r * stride + e + C + ahead);
    }
    V* rg = ring + 4 * Rows * v;  // per row: vert, vd of the two older columns
    V w[4 * Rows];
    for (int u = 0; u < 4 * Rows; ++u) w[u] = rg[u];
    V sy = acc[2 * v], sx = acc[2 * v + 1];  // locals: the store of gx below may alias acc, which would be reloaded
    backward_pair_vector<Rows, In1, In2, Two>(s, e, second, xp + e, stride, plan + v * K, C, o + e, w, sy, sx, fin);
    acc[2 * v] = sy, acc[2 * v + 1] = sx;
    for (int u = 0; u < 4 * Rows; ++u) rg[u] = w[u];
  }
  chk = fin;
}

// The fused backward's data per vector of channels and output row, one or two pixels per pass: plan 3 (CornerPicks),
// ring 4 (vert and vd of two columns), sums 2.
constexpr int64_t kFusedVectors = 9;
constexpr int kFusedRegisterVectors = kVecBytes == 64 ? 3 : 0;

// Rows output rows (i, or i and i + 1) of the fused backward at R = 3, two pixels per pass: grows[0 .. Rows + 1] are
// g's rows i + r0 .. i + r0 + Rows + 1 (or zero rows), xrow and gxrow row i of x and gx (row i + 1 follows). Two rows
// share the loads of g's two middle rows and of each vector's plan and sums: 25 loads per four output vectors where
// one row makes 34 (two_rows_per_pass says where).
template <int Rows, typename T, typename A>
bool backward_row_pairs(const T* const* grows, const T* xrow, const CornerPicks<3, A>& p, int64_t C, int64_t W,
                        int64_t ahead, T* gxrow, typename Vec<A>::V* ring, typename Vec<A>::V* acc) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  const int64_t k0 = p.win.k0, stride = W * C;
  FiniteCheck<A> chk;
  const int64_t strip = strip_vectors((kFusedVectors + 4 * (Rows - 1)) * static_cast<int64_t>(sizeof(V)));
  for (int64_t b0 = 0; b0 < p.nv; b0 += strip) {  // channel strips [b0, b1) of vectors, the rows once for each
    const int64_t b1 = std::min(p.nv, b0 + strip);
    for (int c = 0; c < 2; ++c) {  // the ring: vert, vd of columns k0 and k0 + 1 of each row
      const int64_t col = k0 + c;
      for (int64_t v = b0; v < b1; ++v)
        for (int r = 0; r < Rows; ++r) {
          V vert{}, vd{};
          if (col >= 0 && col < W)
            g_column_at<T, A>(grows[r], grows[r + 1], grows[r + 2], col * C + v * L,
                              p.k.data() + v * CornerPicks<3, A>::K, vert, vd);
          ring[4 * Rows * v + 4 * r + 2 * c] = vert, ring[4 * Rows * v + 4 * r + 2 * c + 1] = vd;
        }
    }
    for (int64_t j = 0; j < W; j += 2) {
      const int64_t c1 = j + k0 + 2, c2 = c1 + 1;
      const bool two = j + 1 < W, in1 = c1 >= 0 && c1 < W, in2 = two && c2 >= 0 && c2 < W;
      const int64_t at = (in1 ? c1 : in2 ? c2 : 0) * C;
      const T* src[Rows + 2];
      for (int t = 0; t < Rows + 2; ++t) src[t] = grows[t] + at;
      const T* xp = xrow + j * C;
      T* o = gxrow + j * C;
      const int64_t pf = in1 || in2 ? ahead : 0;
      auto pass = [&](auto i1, auto i2, auto tw) {
        backward_pair_pass<Rows, decltype(i1)::value, decltype(i2)::value, decltype(tw)::value>(
            src, xp, stride, p, C, b0, b1, pf, ring, o, acc, chk);
      };
      using Y = std::true_type;
      using N = std::false_type;
      if (!two) {
        in1 ? pass(Y{}, N{}, N{}) : pass(N{}, N{}, N{});
      } else if (in1) {
        in2 ? pass(Y{}, Y{}, Y{}) : pass(Y{}, N{}, Y{});
      } else {
        in2 ? pass(N{}, Y{}, Y{}) : pass(N{}, N{}, Y{});
      }
    }
  }
  stream_fence<true>();
  return chk.finite();
}

// backward_row_pairs for pixels of at most kFusedRegisterVectors whole vectors: each vector's ring (vert and vd of
// the last two columns) and its two shift-gradient sums stay in registers across the row, where backward_pair_pass
// loads and stores them for every pair of pixels; both take each vector's step from backward_pair_vector.
// Zen 5, shuffled rounds, one build with either path: 0.81-0.85x backward_row_pairs' time at 16-32 float channels
// (1-2 vectors), 0.88x at 48; 0.94-1.01x at 64 (three shapes) and 0.98-1.02x at 80-96 (6 registers per vector of
// channels). Only with 64-byte vectors, where small pixels take the two-pixel pass at all (pairs_fit).
template <int NV, typename T, typename A>
__attribute__((flatten))  // with_vector_count: the lambdas inlined
bool backward_row_pairs_registers(const T* const* grows, const T* xrow, const CornerPicks<3, A>& p, int64_t C,
                                  int64_t W, int64_t ahead, T* gxrow, typename Vec<A>::V* acc) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L, K = CornerPicks<3, A>::K;
  const int64_t k0 = p.win.k0;
  const V* plan = p.k.data();
  const T* s0 = grows[0];
  const T* s1 = grows[1];
  const T* s2 = grows[2];
  FiniteCheck<A> fin;
  V vt0[NV], vt1[NV], vd0[NV], vd1[NV], sy[NV], sx[NV];  // the window: columns j + k0 and j + k0 + 1
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) {
    const V* k = plan + v * K;
    vt0[v] = vd0[v] = vt1[v] = vd1[v] = V{};
    if (k0 >= 0 && k0 < W) g_column_at<T, A>(s0, s1, s2, k0 * C + v * L, k, vt0[v], vd0[v]);
    if (k0 + 1 >= 0 && k0 + 1 < W) g_column_at<T, A>(s0, s1, s2, (k0 + 1) * C + v * L, k, vt1[v], vd1[v]);
    sy[v] = acc[2 * v], sx[v] = acc[2 * v + 1];
  }
  auto pass = [&](int64_t j, auto i1, auto i2, auto tw) {
    constexpr bool In1 = decltype(i1)::value, In2 = decltype(i2)::value, Two = decltype(tw)::value;
    const int64_t c1 = j + k0 + 2;
    const T* xp = xrow + j * C;
    T* o = gxrow + j * C;
#pragma GCC unroll 12
    for (int v = 0; v < NV; ++v) {
      const int64_t e = v * L, at = c1 * C + e;
      if (ahead != 0 && v % kVectorsPerLine == 0) {
        if constexpr (In1 || In2) prefetch_to_l2(s2 + at + ahead), prefetch_to_l2(s2 + at + C + ahead);
        prefetch_to_l2(xp + e + ahead), prefetch_to_l2(xp + e + C + ahead);
      }
      const T* s[3] = {s0, s1, s2};
      V w[4] = {vt0[v], vd0[v], vt1[v], vd1[v]};
      backward_pair_vector<1, In1, In2, Two>(s, at, C, xp + e, 0, plan + v * K, C, o + e, w, sy[v], sx[v], fin);
      vt0[v] = w[0], vd0[v] = w[1], vt1[v] = w[2], vd1[v] = w[3];
    }
  };
  for_pixel_pairs(k0, W, W, pass);
#pragma GCC unroll 12
  for (int v = 0; v < NV; ++v) acc[2 * v] = sy[v], acc[2 * v + 1] = sx[v];
  stream_fence<true>();
  return fin.finite();
}

// Whether the fused backward takes two pixels per pass (backward_row_pairs): at R = 3, where gx can be streamed
// (T == A, whole vectors per pixel, gx aligned) and the one-pixel pass's per-channel data, kFusedVectors per
// vector of channels (36 bytes per float channel), exceeds kPairBytes, three quarters of a
// 32 KB L1: shuffled A/B, kernels alone, two pixels / one: 0.76-0.90x at 768-1280 channels (0.9-38 MB), 0.95-1.03x
// at 576, 1.18x at 384 (Zen 2, 32-byte vectors; twelfth session, ops_notes.md). With 64-byte vectors (AVX-512) always:
// 0.73-0.91x at 96-576 channels, cached or not, on the Zen 5 of the fourteenth session (one shape, 32x96x32x32, 1.04x).
constexpr int64_t kPairBytes = kVecBytes == 64 ? 0 : kL1Bytes;
template <typename T, typename A>
bool pairs_fit(const T* gx, int64_t C) {
  using V = typename Vec<A>::V;
  const int64_t nv = (C + Vec<A>::L - 1) / Vec<A>::L;
  return std::is_same<T, A>::value && (C * sizeof(T)) % kVecBytes == 0 &&
         reinterpret_cast<uintptr_t>(gx) % kVecBytes == 0 &&
         kFusedVectors * nv * static_cast<int64_t>(sizeof(V)) > kPairBytes;
}

// Returns false (nothing done) when the corners span more than 5 rows or columns.
template <typename T, typename A>
bool backward_nhwc_fused(const T* g, const T* x, T* gx, int64_t N, int64_t C, int64_t H, int64_t W,
                         const Bilinear<A>& q, double* out) {
  const Window<A> win(q, C, -1);
  const bool pairs = pairs_fit<T, A>(gx, C);
  const bool registers = pairs && (C + Vec<A>::L - 1) / Vec<A>::L <= kFusedRegisterVectors;
  return with_window(win, [&](auto r) {
    constexpr int R = decltype(r)::value;
    using V = typename Vec<A>::V;
    const CornerPicks<R, A> p(q, C, -1);
    const std::vector<T> zero_row(W * C, T(0));
    const int64_t ahead = prefetch_ahead<T>(N * H * W * C * static_cast<int64_t>(sizeof(T)), C);
    OutsideScan<A> outside(q, H, W, C);
    const int64_t step = R == 3 && pairs && !registers && two_rows_per_pass(ahead) ? 2 : 1;
    const auto partial = row_block_sums<A>(N, H, W, C, step, [&] {
      return [&, ring = std::vector<V>(std::max<int64_t>(2 * R, 8) * p.nv)](int64_t n, int64_t i, int64_t rows_here,
                                                                            V* sums) mutable {
        const T* gimg = g + n * H * W * C;
        T* gxrow = gx + (n * H + i) * W * C;
        const T* xrow = x + (n * H + i) * W * C;
        const T* rows[R + 1];  // g's rows for output row i (R), and for row i + 1 (rows_here == 2)
        window_rows<R + 1>(gimg, i + win.r0, H, W * C, zero_row.data(), rows);
        bool finite;
        if constexpr (R == 3) {
          if (rows_here == 2) {
            finite = backward_row_pairs<2>(rows, xrow, p, C, W, ahead, gxrow, ring.data(), sums);
          } else {
            if constexpr (kFusedRegisterVectors > 0) {
              if (registers) {
                finite = with_vector_count<kFusedRegisterVectors>(p.nv, [&](auto nv) {
                  return backward_row_pairs_registers<decltype(nv)::value>(rows, xrow, p, C, W, ahead, gxrow, sums);
                });
              }
            }
            if (!registers) {
              finite = pairs ? backward_row_pairs<1>(rows, xrow, p, C, W, ahead, gxrow, ring.data(), sums)
                             : backward_row<R>(rows, xrow, p, C, W, ahead, gxrow, ring.data(), sums);
            }
          }
        } else {
          finite = backward_row<R>(rows, xrow, p, C, W, ahead, gxrow, ring.data(), sums);
        }
        for (int64_t r = 0; r < rows_here; ++r) {
          if (!finite) bilinear_exact_row<1>(q, -1, gimg, C, H, W, i + r, W, gxrow + r * W * C);
          outside.row(gimg + (i + r) * W * C, i + r);  // g's row i + r, which the window has just read
        }
      };
    });
    reduce_shift_grad<1>(partial, g, x, q, N, C, H, W, H, W, out, &outside);
  });
}

// ------------------------------------------------------------------------------------------------------------
// Flat stride-1 NCHW kernels (FlatTaps: one vector loop per plane, no per-row work; see use_flat for where).

template <typename T>
inline bool relu_off(T v) {  // relu(v) == 0 and its gradient is 0 (as torch's threshold_backward: v <= 0; NaN passes)
  return v <= T(0);
}

template <typename A, typename T>
inline A relu_as(T v) {  // relu(v) as an A (NaN passes, as in torch.relu)
  return relu_off(v) ? A(0) : static_cast<A>(v);
}

// The lanes of v where the bits of m are set, +0 elsewhere (a select that lets inf/nan through only where kept).
template <typename A>
inline typename Vec<A>::V keep(const typename Vec<A>::V& v, const typename Vec<A>::M& m) {
  typename Vec<A>::M bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= m;
  typename Vec<A>::V r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// All-ones lanes where relu(v) is v (v > 0, or NaN: as relu_off), the vector form of !relu_off(v).
template <typename A>
inline typename Vec<A>::M relu_on(const typename Vec<A>::V& v) {
  return ~reinterpret_cast<typename Vec<A>::M>(v <= typename Vec<A>::V{});
}

// The lane mask of a FlatTaps byte mask at m, for vectors of A.
template <typename A>
inline typename Vec<A>::M mask_at(const int8_t* m) {
  return lane_mask<typename Vec<A>::U>(m);
}

// The lane masks of a flat loop's first Taps taps of channel c, all ones where the tap reads inside the plane, for
// the vectors at t = 0, L, 2L, ... in turn (next() after each). Rows = false: the tap's byte mask over the plane
// (FlatTaps::mask). Rows = true, for planes whose rows are whole vectors (with_row_masks): the tap's column mask at
// the vector's column, or no_columns where the tap's row lies outside the plane (chosen once per row). A bilinear
// loop takes four masks per vector; plane masks come from four of up to nine arrays of a plane's size, which the
// streamed data push out of L1 between the planes that use them, column masks from a few arrays of one row. Zen 4,
// one process, both builds, two threads, column masks against plane masks: the fused backward 0.82-0.94x the time,
// the quantization-aware backward 0.87-1.02x, the forward 0.79-0.97x (32x576x32x32, 1x576x112x112, 32x96x32x32
// float32); float64 0.88-0.98x, bfloat16 0.99-1.06x; on cached data (2x576x32x32, one thread) 1.03-1.09x.
template <bool Rows, int Taps, typename A>
struct TapMasks {
  static constexpr int L = Vec<A>::L;
  const int8_t* mask[Taps];    // Rows: the column masks
  const int8_t* at_row[Taps];  // Rows: for the current row, the column mask where the tap's row is inside, else none
  int64_t dy[Taps];
  const int8_t* none;
  const int64_t H, W;
  int64_t row = 0, col = 0;  // of the vector's first lane (Rows)
  TapMasks(const FlatTaps& f, int64_t c) : none(f.no_columns.data()), H(f.H), W(f.W) {
    for (int k = 0; k < Taps; ++k) {
      const int64_t i = c * f.taps + k;
      mask[k] = Rows ? f.column[i] : f.mask[i], dy[k] = f.dy[i];
    }
    if constexpr (Rows) start_row();
  }
  void start_row() {
    for (int k = 0; k < Taps; ++k)
      at_row[k] = static_cast<uint64_t>(row + dy[k]) < static_cast<uint64_t>(H) ? mask[k] : none;
  }
  typename Vec<A>::M at(int k, int64_t t) const { return mask_at<A>(Rows ? at_row[k] + col : mask[k] + t); }
  void next() {
    if constexpr (Rows)
      if ((col += L) == W) col = 0, ++row, start_row();
  }
};

// The plane masks' size (all displacements) above which TapMasks take the column masks where they can.
constexpr int64_t kRowMasksAbove = 4096;

// f(std::bool_constant<Rows>) for TapMasks: Rows where f's rows are whole vectors of A and its plane masks exceed
// kRowMasksAbove. Smaller plane masks stay in L1 anyway, and with rows of one vector the choice per row is made for
// every vector: with column masks at 16x16 (nine plane masks of 288 bytes) the bilinear kernels took 1.09-1.18x the
// time (32x1152x16x16, 4x1152x16x16, 32x192x16x16; one and two threads).
template <typename A, typename F>
void with_row_masks(const FlatTaps& f, const F& fn) {
  if (f.W % Vec<A>::L == 0 && static_cast<int64_t>(f.masks.size()) * (f.n + FlatTaps::kPad) > kRowMasksAbove)
    return fn(std::true_type{});
  fn(std::false_type{});
}

// A store of a flat loop (for_vectors) over a plane of n elements: with Stream (T == A, out vector-aligned) whole
// vectors go out as non-temporal stores, into an output that output_apart placed half a page from the inputs (the
// ninth to twelfth sessions streamed each vector a fixed number of vectors late instead, through a ring: the NCHW
// bilinear forward took 1.0-1.5x the time it takes now, and the backward did not stream at all); else ordinary
// stores, the last vector cut at the plane's end.
template <bool Stream, bool Full, typename T, typename A>
inline void flat_put(T* out, int64_t t, int64_t n, const typename Vec<A>::V& v) {
  if constexpr (Stream && Full) {
    static_assert(std::is_same<T, A>::value, "streamed flat output needs T == A");
    stream_vector<A>(out + t, v);
  } else {
    vstore<Full, A>(out + t, v, Full ? Vec<A>::L : n - t);
  }
}

// f(std::bool_constant<Stream>) with Stream = stream where T == A (streamed flat output), false otherwise.
template <typename T, typename A, typename F>
void with_flat_stream(bool stream, const F& f) {
  if constexpr (std::is_same<T, A>::value) {
    if (stream) return f(std::true_type{});
  }
  f(std::false_type{});
}

// out = relu of the integer shift of plane z (one tap per channel), SSL Eq. 5 on relu(z).
template <bool Stream, typename T, typename A>
void relu_shift_flat(T* out, const T* z, const FlatTaps& f, int64_t c) {
  const T* src = z + f.off[c];
  const int8_t* m = f.mask[c];
  const int64_t n = f.n;
  const bool pf = f.prefetch;
  for_vectors<Vec<A>::L>(n, [&](int64_t t, auto full) {
    if (pf) prefetch_ahead_of(z + t);
    const typename Vec<A>::V v = vload<true, A>(src + t, Vec<A>::L);
    flat_put<Stream, decltype(full)::value, T, A>(out, t, n, keep<A>(v, mask_at<A>(m + t) & relu_on<A>(v)));
  });
}

// Bilinear shift of one plane (ASL Eq. 8-10): out = sum over the corners k of w_k * x at corner k (taps 0-3: the
// corners (fy, fx), (fy, fx+1), (fy+1, fx), (fy+1, fx+1)). Taps and weights in locals, as in backward_flat_taps.
template <bool Rows, bool Stream, typename T, typename A>
void bilinear_flat_masks(T* out, const T* x, const FlatTaps& f, int64_t c, const A* w) {
  using V = typename Vec<A>::V;
  constexpr int L = Vec<A>::L;
  int64_t o[4];
  for (int k = 0; k < 4; ++k) o[k] = f.off[c * f.taps + k];
  TapMasks<Rows, 4, A> masks(f, c);
  const A wk[4] = {w[0], w[1], w[2], w[3]};
  const int64_t n = f.n;
  const bool pf = f.prefetch;
  for_vectors<L>(n, [&](int64_t t, auto full) {
    if (pf) prefetch_ahead_of(x + t);
    V acc{};
    for (int k = 0; k < 4; ++k) acc += wk[k] * keep<A>(vload<true, A>(x + o[k] + t, L), masks.at(k, t));
    flat_put<Stream, decltype(full)::value, T, A>(out, t, n, acc);
    masks.next();
  });
}

template <bool Stream, typename T, typename A>
void bilinear_flat(T* out, const T* x, const FlatTaps& f, int64_t c, const A* w) {
  with_row_masks<A>(f, [&](auto rows) { bilinear_flat_masks<decltype(rows)::value, Stream>(out, x, f, c, w); });
}

// Backward of one plane. Taps 0-3 (when `corners` is 4): the corners d_k of the real shift, negated. The corner
// sums of the shift gradient (SSL Eq. 6; add_corner_sums), s[k] = sum_p g[p] x[p + d_k] over the pixels p where
// the corner lies inside the plane, are taken with q = p + d_k as s[k] = sum_q x[q] g[q - d_k], over the pixels q
// where tap k reads inside the plane: x is then read once, at q, like the input gradient gx, and when gx is the
// bilinear adjoint (the same taps) the four masked loads of g serve both. The remaining taps give gx: one, the
// inverse rounded shift (SSL Eq. 7), or four, the inverse corners with weights w (the bilinear adjoint); none (gx
// null): no gx. Relu: x = relu(z), and gx is also zero where z <= 0 (the ReLU's gradient).
// Where x is inf/nan and g's tap is masked out, a lane adds 0 * x = nan, which the direct sum has no term for: the
// caller recomputes such planes per pixel, as for any non-finite sum, so only the time differs.
// backward_flat_taps has the tap counts as constants and the taps, masks and weights in locals: the compiler then
// keeps them in registers (through the tables, it reloaded them after every store, which might alias them: 1.3-1.4x
// slower).
template <typename A>
constexpr A kNoWeights[4] = {};

template <bool Rows, bool Relu, int Corners, int Gi, bool Shared, bool Stream, typename T, typename A>
void backward_flat_taps(T* gx, const T* g, const T* x, const FlatTaps& f, int64_t c, const A* w, A (&s)[4]) {
  using V = typename Vec<A>::V;
  using M = typename Vec<A>::M;
  constexpr int L = Vec<A>::L, taps = Corners + (Shared ? 0 : Gi);
  int64_t o[taps];
  for (int k = 0; k < taps; ++k) o[k] = f.off[c * f.taps + k];
  TapMasks<Rows, taps, A> masks(f, c);
  const A wk[4] = {w[0], w[1], w[2], w[3]};
  const int64_t n = f.n;
  V acc0{}, acc1{}, acc2{}, acc3{};  // not an array: with one, GCC kept three of the sums on the stack when streaming
  const bool pf = f.prefetch;
  for_vectors<L>(n, [&](int64_t t, auto full) {
    if (pf) {
      prefetch_ahead_of(g + t);
      if constexpr (Corners == 4 || Relu) prefetch_ahead_of(x + t);
    }
    V xv{}, v{};
    M on{};
    if constexpr (Corners == 4 || Relu) {
      xv = vload<true, A>(x + t, L);
      if constexpr (Corners == 4 && !decltype(full)::value)  // lanes past the plane: 0 * inf is nan
        xv = keep<A>(xv, mask_at<A>(f.tail(n - t)));
      if constexpr (Relu) on = relu_on<A>(xv), xv = keep<A>(xv, on);
    }
    if constexpr (Corners == 4) {
      for (int k = 0; k < 4; ++k) {
        const V gk = keep<A>(vload<true, A>(g + o[k] + t, L), masks.at(k, t));
        (k == 0 ? acc0 : k == 1 ? acc1 : k == 2 ? acc2 : acc3) += xv * gk;
        if constexpr (Shared) v += wk[k] * gk;
      }
    }
    if constexpr (Gi == 1) {
      M m = masks.at(Corners, t);
      if constexpr (Relu) m &= on;
      v = keep<A>(vload<true, A>(g + o[Corners] + t, L), m);
    } else if constexpr (Gi == 4 && !Shared) {
      for (int k = 0; k < 4; ++k)
        v += wk[k] * keep<A>(vload<true, A>(g + o[Corners + k] + t, L), masks.at(Corners + k, t));
    }
    if constexpr (Gi > 0) flat_put<Stream, decltype(full)::value, T, A>(gx, t, n, v);
    masks.next();
  });
  const V acc[4] = {acc0, acc1, acc2, acc3};
  for (int k = 0; k < 4; ++k) {
    s[k] = A(0);
    for (int l = 0; l < L; ++l) s[k] += acc[k][l];
  }
}

template <bool Relu, bool Stream, typename T, typename A>
void backward_flat(T* gx, const T* g, const T* x, const FlatTaps& f, int64_t c, int64_t corners,
                   const A* w, A (&s)[4]) {
  const int64_t gi = gx != nullptr ? f.taps - corners : 0;
  const int64_t* o = &f.off[c * f.taps];
  with_row_masks<A>(f, [&](auto rows) {
    constexpr bool R = decltype(rows)::value;
    if (corners == 4 && gi == 4 && o[4] == o[0] && o[5] == o[1] && o[6] == o[2] && o[7] == o[3])
      return backward_flat_taps<R, Relu, 4, 4, true, Stream>(gx, g, x, f, c, w, s);
    if (corners == 4 && gi == 0) return backward_flat_taps<R, Relu, 4, 0, false, false>(gx, g, x, f, c, w, s);
    if (corners == 4 && gi == 1) return backward_flat_taps<R, Relu, 4, 1, false, Stream>(gx, g, x, f, c, w, s);
    if (corners == 4 && gi == 4) return backward_flat_taps<R, Relu, 4, 4, false, Stream>(gx, g, x, f, c, w, s);
    if (corners == 0 && gi == 1) return backward_flat_taps<R, Relu, 0, 1, false, Stream>(gx, g, x, f, c, w, s);
    if (corners == 0 && gi == 4) return backward_flat_taps<R, Relu, 0, 4, false, Stream>(gx, g, x, f, c, w, s);
    TORCH_CHECK(false, "backward_flat: unsupported taps");
  });
}

// Adds a plane's shift gradient (SSL Eq. 6) from its corner sums S1..S4 (sums of g times the corners Z1..Z4):
// d/d dy = (1-b)(S3 - S1) + b(S4 - S2), d/d dx = (1-a)(S2 - S1) + a(S4 - S3).
template <typename A>
void add_corner_sums(const Bilinear<A>& q, int64_t c, const A (&s)[4], double& sy, double& sx) {
  const double a = static_cast<double>(q.a[c]), b = static_cast<double>(q.b[c]);
  const double d1 = s[0], d2 = s[1], d3 = s[2], d4 = s[3];
  sy += (1 - b) * (d3 - d1) + b * (d4 - d2);
  sx += (1 - a) * (d2 - d1) + a * (d4 - d3);
}

// acc[2 c + i] += the per-plane shift gradients plane_acc[(n C + c) 2 + i], added in order over n (the same sum
// whatever the number of threads).
void add_plane_sums(const std::vector<double>& plane_acc, int64_t C, double* acc) {
  for (size_t n = 0; n < plane_acc.size() / (2 * C); ++n)
    for (int64_t k = 0; k < 2 * C; ++k) acc[k] += plane_acc[n * 2 * C + k];
}

// Rounds a double result to the accumulation type of the reference (float32 unless x is float64).
template <typename A>
Tensor finish_shift_grad(const Tensor& acc, const Tensor& shifts) {
  return acc.to(c10::CppTypeToScalarType<A>::value).to(shifts.scalar_type());
}

// float16 takes the float32 kernels: its tensors widened (exactly), the results rounded back to float16 once, as a
// float16 instantiation of the kernels (computing in float32, rounding on the store) would give them. float16 is
// rare on CPU, and an instantiation of its own would make the build half as long again.
bool is_half(const Tensor& t) { return t.defined() && t.scalar_type() == at::kHalf; }
Tensor widened(const Tensor& t) { return is_half(t) ? t.to(at::kFloat) : t; }
Tensor narrowed(const Tensor& t) { return t.defined() ? t.to(at::kHalf) : t; }

template <typename F>
void with_stride(int64_t stride, const F& f) {
  if (stride == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

}  // namespace

Tensor bilinear_forward(const Tensor& x_in, const Tensor& shifts, int64_t stride) {
  check_args(x_in, shifts, stride, "bilinear_forward");
  if (is_half(x_in)) return narrowed(bilinear_forward(widened(x_in), shifts, stride));
  const bool cl = is_channels_last(x_in);
  const Tensor x = x_in.contiguous(format_of(cl));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = output_size(H, stride), Wo = output_size(W, stride);
  const bool stream = streams_planes(x, Ho, Wo, cl, stride);  // the flat loops' output (flat_put)
  Tensor out = flat_output(x, Ho, Wo, cl, stream, {x.const_data_ptr()});
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bilinear_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    const Bilinear<A> q(shifts);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_stride(stride, [&](auto s) {
      constexpr int S = decltype(s)::value;
      if (cl) {
        if (!bilinear_nhwc_sep<S>(xp, op, N, C, H, W, Ho, Wo, q, 1) &&
            !bilinear_nhwc_vec<S>(xp, op, N, C, H, W, Ho, Wo, vec_plans(q, C, 1)))
          bilinear_nhwc<S, false>(xp, op, N, C, H, W, Ho, Wo, Displacements<A>(q, C));
        return;
      }
      const bool streamed = stream && std::is_same<scalar_t, A>::value;  // with_flat_stream
      const auto f = S == 1 ? flat_taps(C, H, W, 4, streamed ? kFlatLargest : kFlatBilinearForward, x.nbytes(),
                                        [&](int64_t c, int64_t k) { return q.corner(c, k); }) : std::nullopt;
      if (f) {
        with_flat_stream<scalar_t, A>(streamed, [&](auto st) {
          constexpr bool Stream = decltype(st)::value;
          parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
            std::vector<scalar_t> scratch;
            for (int64_t p = begin, c = begin % C; p < end; ++p, c = c + 1 < C ? c + 1 : 0)
              bilinear_flat<Stream>(op + p * H * W, flat_plane(xp, p, N * C, H * W, f->reach[c], scratch), *f, c,
                                    q.weights(c));
            stream_fence<Stream>();
          });
        });
        return;
      }
      parallel(N * C, Ho * Wo, [&](int64_t begin, int64_t end) {
        RowCache<scalar_t, A> pad;
        for (int64_t p = begin; p < end; ++p)
          bilinear_forward_plane<S>(xp + p * H * W, op + p * Ho * Wo, H, W, Ho, Wo, q, p % C, pad);
      });
    });
  });
  return out;
}

namespace {

// Input gradient (bilinear adjoint, or the integer adjoint for `rounded` shifts) and/or shift gradient, NCHW
// planes of one channel at a time (so the shift gradient needs no cross-thread reduction), in one pass.
// The channels_last quantization-aware backward at stride 1 in one pass over g: each thread moves row i of gx (the
// integer adjoint, SSL Eq. 7: PickRows, as move_nhwc_pick) right after row i of the shift gradient (Eq. 6:
// shift_grad_nhwc_sep), so that g's rows come from memory once for both, where the adjoint's own pass read them
// again. Returns false (nothing done) where either kernel does not apply.
template <typename T, typename A>
bool sparse_backward_nhwc(const T* g, const T* x, T* gx, int64_t N, int64_t C, int64_t H, int64_t W, const Move& m,
                          const Bilinear<A>& q, double* out) {
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  bool done = false;
  with_pick_rows(reinterpret_cast<const U*>(g), reinterpret_cast<U*>(gx), m, [&](const auto& adjoint) {
    done = shift_grad_nhwc_sep<1>(g, x, N, C, H, W, H, W, q, out, [&] {
      return [&adjoint, H, ring = adjoint.ring()](int64_t n, int64_t i) mutable {
        adjoint.row(n * H + i, ring.data());
        stream_fence<std::decay_t<decltype(adjoint)>::kStream>();
      };
    });
  });
  return done;
}

struct BackwardArgs {
  Tensor g, x, shifts;       // x and shifts undefined when no shift gradient is wanted
  Tensor input_shifts;       // real shifts for the bilinear adjoint, int64 for the integer one; undefined: none
  bool integer_adjoint;
  int64_t stride, H, W;
};

std::tuple<Tensor, Tensor> backward(const BackwardArgs& args) {
  if (is_half(args.g)) {
    BackwardArgs wide = args;
    wide.g = widened(args.g), wide.x = widened(args.x);
    auto [gx, gs] = backward(wide);
    return {narrowed(gx), gs};
  }
  const bool cl = is_channels_last(args.g);
  const Tensor g = args.g.contiguous(format_of(cl));
  const bool want_gx = args.input_shifts.defined(), want_gs = args.shifts.defined();
  const Tensor x = want_gs ? args.x.contiguous(format_of(cl)) : Tensor();
  const int64_t N = g.size(0), C = g.size(1), Ho = g.size(2), Wo = g.size(3), H = args.H, W = args.W;
  const bool stream = want_gx && streams_planes(g, H, W, cl, args.stride);  // the flat loops' gx
  Tensor gx = want_gx ? flat_output(g, H, W, cl, stream, {g.const_data_ptr(), (want_gs ? x : g).const_data_ptr()})
                      : Tensor();
  Tensor gs_acc = at::zeros({C, 2}, at::kDouble);
  Tensor gs;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "bilinear_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    // the reference computes the shift gradient from shifts cast to its accumulation type
    const Tensor gs_shifts = want_gs ? args.shifts.to(c10::CppTypeToScalarType<A>::value) : Tensor();
    const Bilinear<A> q_gs(want_gs ? gs_shifts : at::zeros({C, 2}, at::kDouble));
    const Bilinear<A> q_gx(want_gx && !args.integer_adjoint ? args.input_shifts : at::zeros({C, 2}, at::kDouble));
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = want_gs ? x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = want_gx ? gx.data_ptr<scalar_t>() : nullptr;
    double* acc = gs_acc.data_ptr<double>();
    if (N * C * H * W == 0) return;
    Move m{N, C, Ho, Wo, H, W, {}, {}};
    Tensor holder;
    const int64_t* si = want_gx && args.integer_adjoint ? int_shifts(args.input_shifts, holder) : nullptr;
    if (si != nullptr) m = integer_move(si, N, C, H, W, Ho, Wo, args.stride, true);
    with_stride(args.stride, [&](auto s) {
      constexpr int S = decltype(s)::value;
      if (cl) {
        const bool bilinear_gx = want_gx && !args.integer_adjoint;
        // both gradients in one pass (the same shifts: bilinear_backward)
        if (bilinear_gx && want_gs && S == 1 && q_gx.same(q_gs) &&
            backward_nhwc_fused(gp, xp, gxp, N, C, H, W, q_gs, acc))
          return;
        if (want_gx && args.integer_adjoint && want_gs && S == 1 &&
            sparse_backward_nhwc(gp, xp, gxp, N, C, H, W, m, q_gs, acc))
          return;
        if (want_gx && args.integer_adjoint) run_move(g, gx, m, true);
        if (bilinear_gx && (S != 1 || (!bilinear_nhwc_sep<1>(gp, gxp, N, C, Ho, Wo, H, W, q_gx, -1) &&
                                       !bilinear_nhwc_vec<1>(gp, gxp, N, C, Ho, Wo, H, W, vec_plans(q_gx, C, -1)))))
          bilinear_nhwc<S, true>(gp, gxp, N, C, Ho, Wo, H, W, Displacements<A>(q_gx, C));
        if (want_gs && !shift_grad_nhwc_sep<S>(gp, xp, N, C, H, W, Ho, Wo, q_gs, acc))
          shift_grad_nhwc_vec<S>(gp, xp, N, C, H, W, Ho, Wo, q_gs, acc);
        return;
      }
      // flat form (stride 1, planes up to kFlatLargest): one pass per plane, the negated corners of q_gs (shift
      // gradient) then the input gradient's taps
      const int64_t corners = want_gs ? 4 : 0, gi = !want_gx ? 0 : si != nullptr ? 1 : 4;
      const auto flat = S != 1 ? std::nullopt : flat_taps(C, H, W, corners + gi, kFlatLargest, g.nbytes(),
                                                          [&](int64_t c, int64_t k) {
        const Disp d = k < corners ? q_gs.corner(c, k)
                       : si != nullptr ? Disp{si[2 * c], si[2 * c + 1]} : q_gx.corner(c, k - corners);
        return Disp{-d.dy, -d.dx};
      });
      // planes in memory order; per-plane shift gradients are summed over n afterwards (deterministic)
      std::vector<double> plane_acc(want_gs ? N * C * 2 : 0, 0.0);
      if (flat) with_flat_stream<scalar_t, A>(stream, [&](auto st) {
        constexpr bool Stream = decltype(st)::value;
        const FlatTaps& f = *flat;
        parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
          RowCache<scalar_t, A> pad;
          std::vector<A> col;
          std::vector<scalar_t> gscratch, xscratch;
          for (int64_t p = begin, c = begin % C; p < end; ++p, c = c + 1 < C ? c + 1 : 0) {
            A c4[4];
            const scalar_t* xpl = want_gs ? flat_plane(xp, p, N * C, H * W, f.reach[c], xscratch) : nullptr;
            const scalar_t* gpl = flat_plane(gp, p, N * C, H * W, f.reach[c], gscratch);
            backward_flat<false, Stream>(gxp + (want_gx ? p * H * W : 0), gpl, xpl, f, c, corners,
                                         gi == 4 ? q_gx.weights(c) : kNoWeights<A>, c4);
            if (!want_gs) continue;
            double &sy = plane_acc[2 * p], &sx = plane_acc[2 * p + 1];
            add_corner_sums(q_gs, c, c4, sy, sx);
            if (std::isfinite(sy) && std::isfinite(sx) && !outside_not_finite(gp + p * H * W, H, W, q_gs, c))
              continue;
            sy = sx = 0;  // inf/nan: the reference's per-pixel differences decide which
            shift_grad_plane<S>(gp + p * H * W, xp + p * H * W, H, W, Ho, Wo, q_gs, c, pad, col, sy, sx);
          }
          stream_fence<Stream>();
        });
      });
      // row form: the input gradient and the shift gradient are two passes (measured faster here than one fused
      // pass over both)
      if (!flat && want_gx) {
        parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
          RowCache<scalar_t, A> pad;
          for (int64_t p = begin; p < end; ++p) {
            const scalar_t* gpl = gp + p * Ho * Wo;
            if (args.integer_adjoint) {
              move_plane(gpl, gxp + p * H * W, m, p % C);
            } else {
              bilinear_adjoint_plane<S>(gpl, gxp + p * H * W, H, W, Ho, Wo, q_gx, p % C, pad);
            }
          }
        });
      }
      if (!flat && want_gs) {
        parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
          RowCache<scalar_t, A> pad;
          std::vector<A> col;
          for (int64_t p = begin; p < end; ++p)
            shift_grad_plane<S>(gp + p * Ho * Wo, xp + p * H * W, H, W, Ho, Wo, q_gs, p % C, pad, col,
                                plane_acc[2 * p], plane_acc[2 * p + 1]);
        });
      }
      add_plane_sums(plane_acc, C, acc);
    });
    if (want_gs) gs = finish_shift_grad<A>(gs_acc, args.shifts);
  });
  if (want_gs && !gs.defined()) gs = at::zeros({C, 2}, args.shifts.options().device(at::kCPU));
  return {gx, gs};
}

}  // namespace

Tensor bilinear_backward_input(const Tensor& g, const Tensor& shifts, int64_t stride, int64_t height, int64_t width) {
  check_args(g, shifts, stride, "bilinear_backward_input");
  return std::get<0>(backward({g, Tensor(), Tensor(), shifts, false, stride, height, width}));
}

Tensor bilinear_backward_shifts(const Tensor& g, const Tensor& x, const Tensor& shifts, int64_t stride) {
  check_args(x, shifts, stride, "bilinear_backward_shifts");
  return std::get<1>(backward({g, x, shifts, Tensor(), false, stride, x.size(2), x.size(3)}));
}

std::tuple<Tensor, Tensor> bilinear_backward(const Tensor& g, const Tensor& x, const Tensor& shifts, int64_t stride) {
  check_args(x, shifts, stride, "bilinear_backward");
  return backward({g, x, shifts, shifts, false, stride, x.size(2), x.size(3)});
}

std::tuple<Tensor, Tensor> sparse_backward(const Tensor& g, const Tensor& x, const Tensor& rounded,
                                           const Tensor& shifts, int64_t stride) {
  check_args(x, shifts, stride, "sparse_backward");
  return backward({g, x, shifts, rounded, true, stride, x.size(2), x.size(3)});
}

namespace {

// ------------------------------------------------------------------------------------------------------------
// ReLU fused into the quantization-aware shift: y = shift(relu(z)) by the rounded shifts (SSL Eq. 5 applied to
// x = relu(z)), so a block's conv - BN - ReLU - SSL costs the memory passes of conv - BN - in-place ReLU. Backward,
// per NCHW plane in one pass over g and z (backward_flat; row by row for stride 2 and large planes):
// g_z = 1[z > 0] * inverse_shift(g) (Eq. 7, then the ReLU's gradient) and the Eq. 6 shift gradient at x = relu(z).
// z, not relu(z), is what autograd saves. channels_last takes the composition (relu, then the kernels above).

// One row of a ReLU fused into a row-based integer movement (stride 2, or planes past the flat form's size): dst =
// the row movement of src (move_row), then rectified (forward, z == nullptr) or zeroed where z <= 0 (backward, z
// the ReLU's input: its gradient).
template <typename T>
void relu_move_row(T* dst, int64_t n_dst, const T* src, const Seg& s, const T* z) {
  move_row(dst, n_dst, src, s);
  const T* m = z != nullptr ? z : dst;
  for (int64_t k = 0; k < n_dst; ++k) dst[k] = relu_off(m[k]) ? T(0) : dst[k];
}

}  // namespace

Tensor relu_shift_forward(const Tensor& z_in, const Tensor& shifts, int64_t stride) {
  check_args(z_in, shifts, stride, "relu_shift_forward");
  if (is_channels_last(z_in)) return shift_forward(at::relu(z_in), shifts, stride);
  if (is_half(z_in)) return narrowed(relu_shift_forward(widened(z_in), shifts, stride));
  const Tensor z = z_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3);
  const int64_t Ho = output_size(H, stride), Wo = output_size(W, stride);
  const bool stream = streams_planes(z, Ho, Wo, false, stride);  // the flat loop's output (flat_put)
  Tensor out = flat_output(z, Ho, Wo, false, stream, {z.const_data_ptr()});
  if (out.numel() == 0) return out;
  Tensor holder;
  const int64_t* s = int_shifts(shifts, holder);
  const Move m = integer_move(s, N, C, H, W, Ho, Wo, stride, false);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "relu_shift_forward", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto flat = stride != 1 ? std::nullopt : flat_taps(C, H, W, 1, kFlatLargest, z.nbytes(),
                                                             [&](int64_t c, int64_t) {
      return Disp{s[2 * c], s[2 * c + 1]};
    });
    if (flat) {
      const FlatTaps& f = *flat;
      with_flat_stream<scalar_t, A>(stream, [&](auto st) {
        constexpr bool Stream = decltype(st)::value;
        parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
          std::vector<scalar_t> scratch;
          for (int64_t p = begin, c = begin % C; p < end; ++p, c = c + 1 < C ? c + 1 : 0)
            relu_shift_flat<Stream, scalar_t, A>(op + p * H * W, flat_plane(zp, p, N * C, H * W, f.reach[c], scratch),
                                                 f, c);
          stream_fence<Stream>();
        });
      });
      return;
    }
    parallel(N * C, Ho * Wo, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        for (int64_t i = 0; i < Ho; ++i) {
          const int64_t c = p % C, r = m.rows[c].source(i);
          relu_move_row(op + (p * Ho + i) * Wo, Wo, r >= 0 ? zp + p * H * W + r * W : nullptr, m.cols[c],
                        static_cast<const scalar_t*>(nullptr));
        }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> relu_sparse_backward(const Tensor& g_in, const Tensor& z_in, const Tensor& rounded,
                                                const Tensor& shifts, int64_t stride) {
  check_args(z_in, shifts, stride, "relu_sparse_backward");
  if (is_channels_last(z_in)) {
    auto [gx, gs] = sparse_backward(g_in, at::relu(z_in), rounded, shifts, stride);
    return {at::threshold_backward(gx, z_in, 0), gs};
  }
  if (is_half(z_in)) {
    auto [gx, gs] = relu_sparse_backward(widened(g_in), widened(z_in), rounded, shifts, stride);
    return {narrowed(gx), gs};
  }
  const Tensor z = z_in.contiguous(), g = g_in.contiguous();
  const int64_t N = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), Ho = g.size(2), Wo = g.size(3);
  const bool stream = streams_planes(z, H, W, false, stride);  // the flat loops' gx (flat_put)
  Tensor gx = flat_output(z, H, W, false, stream, {z.const_data_ptr(), g.const_data_ptr()});
  Tensor gs_acc = at::zeros({C, 2}, at::kDouble);
  Tensor gs;
  Tensor holder;
  const int64_t* s = int_shifts(rounded, holder);
  const Move m = integer_move(s, N, C, H, W, Ho, Wo, stride, true);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, z.scalar_type(), "relu_sparse_backward", [&] {
    using A = at::opmath_type<scalar_t>;
    if (N * C * H * W == 0) return;
    const Bilinear<A> q(shifts.to(c10::CppTypeToScalarType<A>::value));  // as the reference (see backward)
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    std::vector<double> plane_acc(N * C * 2, 0.0);
    const auto flat = stride != 1 ? std::nullopt : flat_taps(C, H, W, 5, kFlatLargest, z.nbytes(),
                                                             [&](int64_t c, int64_t k) {
      const Disp d = k < 4 ? q.corner(c, k) : Disp{s[2 * c], s[2 * c + 1]};
      return Disp{-d.dy, -d.dx};
    });
    with_stride(stride, [&](auto st) {
      constexpr int S = decltype(st)::value;
      with_flat_stream<scalar_t, A>(stream && flat.has_value(), [&](auto sm) {
        constexpr bool Stream = decltype(sm)::value;
        parallel(N * C, H * W, [&](int64_t begin, int64_t end) {
          RowCache<scalar_t, A> pad;
          std::vector<A> col;
          std::vector<scalar_t> x, gscratch, zscratch;  // x: relu(z) of the plane, for shift_grad_plane
          for (int64_t p = begin, c = begin % C; p < end; ++p, c = c + 1 < C ? c + 1 : 0) {
            const scalar_t* zpl = zp + p * H * W;
            const scalar_t* gpl = gp + p * Ho * Wo;
            double& sy = plane_acc[2 * p];
            double& sx = plane_acc[2 * p + 1];
            if (flat) {  // input gradient and the corner sums of the shift gradient in one loop
              A c4[4];
              const int64_t reach = flat->reach[c];
              backward_flat<true, Stream>(gxp + p * H * W, flat_plane(gp, p, N * C, H * W, reach, gscratch),
                                          flat_plane(zp, p, N * C, H * W, reach, zscratch), *flat, c, 4,
                                          kNoWeights<A>, c4);
              add_corner_sums(q, c, c4, sy, sx);
              if (std::isfinite(sy) && std::isfinite(sx) && !outside_not_finite(gpl, H, W, q, c)) continue;
              sy = sx = 0;  // inf/nan: the reference's per-pixel differences (below) decide which
            } else {
              for (int64_t y = 0; y < H; ++y) {  // input gradient: inverse shift and the ReLU's mask
                const int64_t r = m.rows[c].source(y);
                relu_move_row(gxp + (p * H + y) * W, W, r >= 0 ? gpl + r * Wo : nullptr, m.cols[c], zpl + y * W);
              }
            }
            x.resize(H * W);
            for (int64_t k = 0; k < H * W; ++k) x[k] = relu_as<scalar_t>(zpl[k]);
            shift_grad_plane<S>(gpl, x.data(), H, W, Ho, Wo, q, c, pad, col, sy, sx);
          }
          stream_fence<Stream>();
        });
      });
    });
    add_plane_sums(plane_acc, C, gs_acc.data_ptr<double>());
    gs = finish_shift_grad<A>(gs_acc, shifts);
  });
  if (!gs.defined()) gs = at::zeros({C, 2}, shifts.options().device(at::kCPU));
  return {gx, gs};
}

}  // namespace fewshifts
