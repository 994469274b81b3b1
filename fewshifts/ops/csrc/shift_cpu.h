// The CPU shift kernels of shift_cpu.cpp, for ops_cpu.cpp (the Python module and the operators' registration).
// Same functions, arguments and results as fewshifts/ops/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace fewshifts {

using at::Tensor;

// Whether x is stored channels_last (and not also contiguous): the kernels then work in that layout.
inline bool is_channels_last(const Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Width of the kernels' vectors in bytes: 64 where compiled for AVX-512, else 32 (FEWSHIFTS_VECTOR_BYTES).
int64_t vector_bytes();
// Integer shift (SSL Eq. 1/5) and its adjoint (SSL Eq. 7); shifts (C, 2) integers.
Tensor shift_forward(const Tensor& x, const Tensor& shifts, int64_t stride);
Tensor shift_backward(const Tensor& g, const Tensor& shifts, int64_t stride, int64_t height, int64_t width);
// In-place stride-1 integer shift, touching only the channels with a nonzero shift.
void shift_inplace(Tensor& x, const Tensor& shifts);
// Bilinear shift (ASL Eq. 8-10) and its gradients (SSL Eq. 6 for the shifts).
Tensor bilinear_forward(const Tensor& x, const Tensor& shifts, int64_t stride);
Tensor bilinear_backward_input(const Tensor& g, const Tensor& shifts, int64_t stride, int64_t height, int64_t width);
Tensor bilinear_backward_shifts(const Tensor& g, const Tensor& x, const Tensor& shifts, int64_t stride);
std::tuple<Tensor, Tensor> bilinear_backward(const Tensor& g, const Tensor& x, const Tensor& shifts, int64_t stride);
// Quantization-aware shift's gradients: integer adjoint for x (SSL Eq. 7), bilinear for the shifts (Eq. 6).
std::tuple<Tensor, Tensor> sparse_backward(const Tensor& g, const Tensor& x, const Tensor& rounded,
                                           const Tensor& real, int64_t stride);
// The same two for shift(relu(z)), one pass each way.
Tensor relu_shift_forward(const Tensor& z, const Tensor& shifts, int64_t stride);
std::tuple<Tensor, Tensor> relu_sparse_backward(const Tensor& g, const Tensor& z, const Tensor& rounded,
                                                const Tensor& real, int64_t stride);

}  // namespace fewshifts
