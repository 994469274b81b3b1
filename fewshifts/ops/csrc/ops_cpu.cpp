// The fewshifts operators on CPU tensors, registered with the dispatcher (register_ops), and the Python module of
// the kernels (shift_cpu.cpp). A separate translation unit: the torch headers it needs (pybind11, autograd, the
// library API) would add a third to the kernels' build time, and the two build in parallel.

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <torch/python.h>  // pybind11 and the Tensor type caster (lighter than torch/extension.h)

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>

#include "shift_cpu.h"

namespace fewshifts {
namespace {

// The operators are registered for the CPU and AutogradCPU keys, where they take precedence over the Python bodies
// and autograd formulas of fewshifts/ops/shift.py (which torch.library registers for CompositeExplicitAutograd and
// Autograd): a call goes from torch.ops straight to C++. The Python path costs 120-250 us per call when the previous
// kernel has evicted the interpreter's data from the caches (measured after a 12.6 MB copy, against 26 us for
// `x.clone()` of a small tensor): 0.1-0.25x the copy time of a 32x96x32x32 tensor. The CPU kernels below do what
// those Python bodies do (value checks, clamping and rounding of the shifts, the gradient's memory format); the
// Python body runs instead when FEWSHIFTS_BACKEND is set to anything but auto or cpp (fewshifts/ops/backend.py
// decides then), and for shifts that fail a value check (it raises the error).

py::object* python_body = nullptr;  // fewshifts.ops.shift.python_body(name, *args); set by register_ops

bool fast_backend() {
  const char* v = std::getenv("FEWSHIFTS_BACKEND");
  return v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0 || std::strcmp(v, "cpp") == 0;
}

template <typename R, typename... Args>
R call_python_body(const char* name, const Args&... args) {
  py::gil_scoped_acquire gil;
  return (*python_body)(name, args...).template cast<R>();
}

enum class ShiftsAs { Integral, Rounded, Real };

// The shifts as the kernels take them, clamped to the image as shift.py's _clamp_to_image clamps them (shifts
// beyond the image give all-zero channels; clamped they stay small and exact), in one pass over the (C, 2) values
// (a clamp op cost as much again as the rest of a call to a small shift): int64 for Integral (whole numbers) and
// Rounded (shift.py's round_shifts: nearest, ties to even, SSL Eq. 5), else the shifts' own type. Nothing when the
// op's Python body is to run instead: FEWSHIFTS_BACKEND is not auto or cpp, or a shift is not finite (for Integral
// not a whole number), for which the Python body raises the error.
std::optional<Tensor> kernel_shifts(const Tensor& shifts, int64_t height, int64_t width, int64_t stride,
                                    ShiftsAs as) {
  if (!fast_backend()) return std::nullopt;
  const double limit = static_cast<double>(stride * std::max(height, width) + 1);
  const Tensor s = shifts.contiguous();
  Tensor out = as == ShiftsAs::Real ? at::empty_like(s) : at::empty(s.sizes(), s.options().dtype(at::kLong));
  bool ok = true;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "kernel_shifts", [&] {
    const scalar_t* p = s.const_data_ptr<scalar_t>();
    scalar_t* real = as == ShiftsAs::Real ? out.data_ptr<scalar_t>() : nullptr;
    int64_t* whole = as == ShiftsAs::Real ? nullptr : out.data_ptr<int64_t>();
    for (int64_t i = 0; i < s.numel(); ++i) {
      const double v = static_cast<double>(p[i]);
      ok = std::isfinite(v) && (as != ShiftsAs::Integral || v == std::nearbyint(v));
      if (!ok) break;
      const double c = std::clamp(as == ShiftsAs::Rounded ? std::nearbyint(v) : v, -limit, limit);
      if (real) {
        real[i] = static_cast<scalar_t>(c);
      } else {
        whole[i] = static_cast<int64_t>(c);
      }
    }
  });
  if (!ok) return std::nullopt;
  return out;
}

Tensor in_format_of(const Tensor& g, const Tensor& like) { return g.contiguous(format_of(is_channels_last(like))); }

Tensor shift2d_cpu(const Tensor& x, const Tensor& shifts, int64_t stride) {
  const auto s = kernel_shifts(shifts, x.size(2), x.size(3), stride, ShiftsAs::Integral);
  if (!s) return call_python_body<Tensor>("shift2d", x, shifts, stride);
  return shift_forward(x, *s, stride);
}

Tensor shift2d_backward_cpu(const Tensor& g, const Tensor& shifts, int64_t stride, int64_t height, int64_t width) {
  const auto s = kernel_shifts(shifts, height, width, stride, ShiftsAs::Rounded);
  if (!s) return call_python_body<Tensor>("shift2d_backward", g, shifts, stride, height, width);
  return shift_backward(g, *s, stride, height, width);
}

Tensor active_shift2d_cpu(const Tensor& x, const Tensor& shifts, int64_t stride) {
  const auto s = kernel_shifts(shifts, x.size(2), x.size(3), stride, ShiftsAs::Real);
  if (!s) return call_python_body<Tensor>("active_shift2d", x, shifts, stride);
  return bilinear_forward(x, *s, stride);
}

std::tuple<Tensor, Tensor> active_shift2d_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& shifts,
                                                       int64_t stride) {
  const auto s = kernel_shifts(shifts, x.size(2), x.size(3), stride, ShiftsAs::Real);
  if (!s) {
    return call_python_body<std::tuple<Tensor, Tensor>>("active_shift2d_backward", g, x, shifts, stride);
  }
  return bilinear_backward(in_format_of(g, x), x, *s, stride);
}

// sparse_shift2d and relu_sparse_shift2d (Relu): the rounded shift (SSL Eq. 5) and the fused gradients (Eq. 6-7).
template <bool Relu>
Tensor sparse_cpu(const Tensor& x, const Tensor& shifts, int64_t stride) {
  const auto s = kernel_shifts(shifts, x.size(2), x.size(3), stride, ShiftsAs::Rounded);
  if (!s) {
    return call_python_body<Tensor>(Relu ? "relu_sparse_shift2d" : "sparse_shift2d", x, shifts, stride);
  }
  return Relu ? relu_shift_forward(x, *s, stride) : shift_forward(x, *s, stride);
}

template <bool Relu>
std::tuple<Tensor, Tensor> sparse_backward_cpu(const Tensor& g, const Tensor& x, const Tensor& shifts,
                                               int64_t stride) {
  const int64_t H = x.size(2), W = x.size(3);
  const auto round = kernel_shifts(shifts, H, W, stride, ShiftsAs::Rounded);
  const auto real = kernel_shifts(shifts, H, W, stride, ShiftsAs::Real);
  if (!round || !real) {
    return call_python_body<std::tuple<Tensor, Tensor>>(
        Relu ? "relu_sparse_shift2d_backward" : "sparse_shift2d_backward", g, x, shifts, stride);
  }
  return Relu ? relu_sparse_backward(in_format_of(g, x), x, *round, *real, stride)
              : sparse_backward(in_format_of(g, x), x, *round, *real, stride);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using ShiftOp = Tensor(const Tensor&, const Tensor&, int64_t);
using RealBackwardOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t);

// Autograd of shift2d (SSL Eq. 7: the gradient for x is the inverse shift; none for the shifts), as the
// formula registered in shift.py.
struct Shift2dFunction : torch::autograd::Function<Shift2dFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& shifts,
                        int64_t stride) {
    ctx->save_for_backward({shifts});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["height"] = x.sym_size(2);  // symbolic under tracing (x.size would specialise every dim)
    ctx->saved_data["width"] = x.sym_size(3);
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<ShiftOp>("fewshifts::shift2d");
    return op.call(x, shifts, stride);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, int64_t, c10::SymInt, c10::SymInt)>(
        "fewshifts::shift2d_backward");
    const auto& d = ctx->saved_data;
    return {op.call(grads[0], ctx->get_saved_variables()[0], d.at("stride").toInt(), d.at("height").toSymInt(),
                    d.at("width").toSymInt()),
            Tensor(), Tensor()};
  }
};

// Autograd of a real-shift op (active_shift2d, sparse_shift2d, relu_sparse_shift2d: Names = {op, backward op})
// whose backward op returns (grad_x, grad_shifts), as shift.py's _register_real_shift_op.
template <const char* const* Names>  // {op, backward op}
struct RealShiftFunction : torch::autograd::Function<RealShiftFunction<Names>> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& shifts,
                        int64_t stride) {
    ctx->save_for_backward({x, shifts});
    ctx->saved_data["stride"] = stride;
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = find_op<ShiftOp>(Names[0]);
    return op.call(x, shifts, stride);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find_op<RealBackwardOp>(Names[1]);
    const auto saved = ctx->get_saved_variables();
    auto [gx, gs] = op.call(grads[0], saved[0], saved[1], ctx->saved_data.at("stride").toInt());
    return {gx, gs, Tensor()};
  }
};

constexpr const char* kActiveNames[] = {"fewshifts::active_shift2d", "fewshifts::active_shift2d_backward"};
constexpr const char* kSparseNames[] = {"fewshifts::sparse_shift2d", "fewshifts::sparse_shift2d_backward"};
constexpr const char* kReluSparseNames[] = {"fewshifts::relu_sparse_shift2d",
                                            "fewshifts::relu_sparse_shift2d_backward"};

template <typename F>
Tensor autograd_shift(const Tensor& x, const Tensor& shifts, int64_t stride) {
  return F::apply(x, shifts, stride);
}

// The registration, for as long as Python holds it (close() or its deletion removes it again).
struct OpRegistration {
  std::unique_ptr<torch::Library> cpu, autograd;
  void close() { cpu.reset(); autograd.reset(); }
};

std::unique_ptr<OpRegistration> register_ops(py::object body) {
  if (python_body == nullptr) python_body = new py::object();  // kept for the process (called with the GIL held)
  *python_body = std::move(body);
  auto r = std::make_unique<OpRegistration>();
  r->cpu = std::make_unique<torch::Library>(torch::Library::IMPL, "fewshifts", c10::DispatchKey::CPU, __FILE__,
                                            __LINE__);
  r->cpu->impl("shift2d", TORCH_FN(shift2d_cpu));
  r->cpu->impl("shift2d_backward", TORCH_FN(shift2d_backward_cpu));
  r->cpu->impl("active_shift2d", TORCH_FN(active_shift2d_cpu));
  r->cpu->impl("active_shift2d_backward", TORCH_FN(active_shift2d_backward_cpu));
  r->cpu->impl("sparse_shift2d", TORCH_FN(sparse_cpu<false>));
  r->cpu->impl("sparse_shift2d_backward", TORCH_FN(sparse_backward_cpu<false>));
  r->cpu->impl("relu_sparse_shift2d", TORCH_FN(sparse_cpu<true>));
  r->cpu->impl("relu_sparse_shift2d_backward", TORCH_FN(sparse_backward_cpu<true>));
  r->autograd = std::make_unique<torch::Library>(torch::Library::IMPL, "fewshifts", c10::DispatchKey::AutogradCPU,
                                                 __FILE__, __LINE__);
  r->autograd->impl("shift2d", TORCH_FN(autograd_shift<Shift2dFunction>));
  r->autograd->impl("active_shift2d", TORCH_FN(autograd_shift<RealShiftFunction<kActiveNames>>));
  r->autograd->impl("sparse_shift2d", TORCH_FN(autograd_shift<RealShiftFunction<kSparseNames>>));
  r->autograd->impl("relu_sparse_shift2d", TORCH_FN(autograd_shift<RealShiftFunction<kReluSparseNames>>));
  for (const char* name : {"shift2d_backward", "active_shift2d_backward", "sparse_shift2d_backward",
                           "relu_sparse_shift2d_backward"}) {
    r->autograd->impl(name, torch::autograd::autogradNotImplementedFallback());
  }
  return r;
}

}  // namespace
}  // namespace fewshifts

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fewshifts;
  m.doc() = "fewshifts C++ CPU shift kernels (same functions as fewshifts.ops.reference)";
  m.def("vector_bytes", &vector_bytes, "Width of the kernels' vectors in bytes (32: AVX2, 64: AVX-512)");
  m.def("shift_forward", &shift_forward, "Integer shift (SSL Eq. 1/5)");
  m.def("shift_backward", &shift_backward, "Adjoint of the integer shift (SSL Eq. 7)");
  m.def("shift_inplace", &shift_inplace, "In-place stride-1 integer shift of the channels with nonzero shift");
  m.def("bilinear_forward", &bilinear_forward, "Bilinear shift (ASL Eq. 8-10)");
  m.def("bilinear_backward_input", &bilinear_backward_input, "Input gradient of the bilinear shift");
  m.def("bilinear_backward_shifts", &bilinear_backward_shifts, "Shift gradient of the bilinear shift (SSL Eq. 6)");
  m.def("bilinear_backward", &bilinear_backward, "Fused input and shift gradients of the bilinear shift");
  m.def("sparse_backward", &sparse_backward,
        "Fused gradients of the quantization-aware shift: integer adjoint for x (SSL Eq. 7), bilinear for shifts "
        "(SSL Eq. 6)");
  m.def("relu_shift_forward", &relu_shift_forward, "Integer shift of relu(z), one pass (SSL Eq. 5 after a ReLU)");
  m.def("relu_sparse_backward", &relu_sparse_backward,
        "Fused gradients of shift(relu(z)): 1[z > 0] times the integer adjoint for z (SSL Eq. 7), bilinear for the "
        "shifts at relu(z) (SSL Eq. 6)");
  py::class_<OpRegistration>(m, "OpRegistration").def("close", &OpRegistration::close);
  m.def("register_ops", &register_ops, py::arg("python_body"),
        "Register the fewshifts operators' CPU and AutogradCPU kernels; python_body(name, *args) runs an op's "
        "Python body (other FEWSHIFTS_BACKEND values, invalid shifts)");
}
