// gelu_gate on CUDA: out = GELU_erf(x + bias) * gate. Forward is one
// elementwise pass with 16-byte accesses; backward writes dx and per-block
// column partials of dbias/dgate (no atomics), summed by a second kernel.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../op_checks.h"
#include "cuda_utils.cuh"

namespace cofi::cuda {
namespace {

// Error messages name the registered op that was called.
constexpr const char* kFwd = "cofi::gelu_gate_fwd";
constexpr const char* kBwd = "cofi::gelu_gate_bwd";
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Phi(v) and phi(v) of the standard normal sharing one exp: erf by
// Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, the same formula as the
// CPU kernel), whose exp(-x^2) at x = v/sqrt(2) is the density's exp(-v^2/2).
// Cheaper than erff + expf, which made the 16-bit kernels compute-bound.
struct NormalParts {
  float cdf, pdf;
};

__device__ __forceinline__ NormalParts normal_parts(float v) {
  const float t = __fdividef(1.0f, fmaf(0.3275911f, fabsf(v) * kSqrtHalf, 1.0f));  // approximate: 2 ulp
  float poly = fmaf(1.061405429f, t, -1.453152027f);
  poly = fmaf(poly, t, 1.421413741f);
  poly = fmaf(poly, t, -0.284496736f);
  poly = fmaf(poly, t, 0.254829592f);
  const float e = __expf(-0.5f * v * v);
  const float half_erfc = 0.5f * poly * t * e;  // (1 - erf(|v|/sqrt(2))) / 2
  return {v < 0.0f ? half_erfc : 1.0f - half_erfc, e * kInvSqrt2Pi};
}

template <typename T, int VEC>
__global__ void forward_kernel(const T* __restrict__ x, ParamPtr bias, ParamPtr gate, T* __restrict__ out,
                               int64_t n_packs, int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_packs; p += stride) {
    const int64_t i = p * VEC;
    const int64_t c = i % cols;  // VEC divides cols, so a pack never straddles rows
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + i);
    float b[VEC], g[VEC];
    bias.load<T, VEC>(c, b);
    gate.load_or<T, VEC>(c, 1.0f, g);
    Pack<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(xv.v[j]) + b[j];
      ov.v[j] = static_cast<T>(v * normal_parts(v).cdf * g[j]);
    }
    store_pack<T, VEC>(out + i, ov);
  }
}

constexpr int kBwdThreadsX = 32;  // one warp across VEC*32 contiguous columns
constexpr int kBwdThreadsY = 8;   // rows handled side by side

// Block (bx, by) covers columns [bx*32*VEC, ...) and rows by*8 + ty, stepping
// gridDim.y*8. partials: [gridDim.y, 2, cols] float (dbias, dgate).
template <typename T, int VEC>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, ParamPtr bias, ParamPtr gate,
                                T* __restrict__ dx, float* __restrict__ partials, int64_t rows, int64_t cols,
                                bool want_dbias, bool want_dgate) {
  __shared__ float red[2][kBwdThreadsY][kBwdThreadsX * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kBwdThreadsX + tx) * VEC;
  float acc_b[VEC], acc_g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc_b[j] = acc_g[j] = 0.0f;
  if (col < cols) {
    float b[VEC], g8[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      b[j] = bias.at<T>(col + j);
      g8[j] = gate.present() ? gate.at<T>(col + j) : 1.0f;
    }
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kBwdThreadsY + ty; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kBwdThreadsY) {
      const int64_t i = r * cols + col;
      const Pack<T, VEC> gv = load_pack<T, VEC>(grad + i);
      const Pack<T, VEC> xv = load_pack<T, VEC>(x + i);
      Pack<T, VEC> dv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v = static_cast<float>(xv.v[j]) + b[j];
        const float g = static_cast<float>(gv.v[j]);
        const NormalParts n = normal_parts(v);
        if (want_dgate) acc_g[j] += g * v * n.cdf;
        const float d = g * g8[j] * fmaf(v, n.pdf, n.cdf);  // GELU' = Phi + v * phi
        acc_b[j] += d;
        dv.v[j] = static_cast<T>(d);
      }
      if (dx != nullptr) store_pack<T, VEC>(dx + i, dv);
    }
  }
  if (!want_dbias && !want_dgate) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    red[0][ty][tx * VEC + j] = acc_b[j];
    red[1][ty][tx * VEC + j] = acc_g[j];
  }
  __syncthreads();
  // Each of the 256 threads finishes some of the 2 * 32*VEC column sums.
  const int flat = ty * kBwdThreadsX + tx;
  for (int s = flat; s < 2 * kBwdThreadsX * VEC; s += kBwdThreadsX * kBwdThreadsY) {
    const int slot = s / (kBwdThreadsX * VEC), local = s % (kBwdThreadsX * VEC);
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kBwdThreadsX * VEC + local;
    if (c >= cols) continue;
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kBwdThreadsY; ++y) total += red[slot][y][local];
    partials[(static_cast<int64_t>(blockIdx.y) * 2 + slot) * cols + c] = total;
  }
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& gate) {
  check_gelu_gate_args(op, x, bias, gate, c10::DeviceType::CUDA);
}

at::Tensor gelu_gate_fwd_cuda(const at::Tensor& x_in, const at::Tensor& bias, const std::optional<at::Tensor>& gate) {
  check_inputs(kFwd, x_in, bias, gate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t cols = x.size(-1);
  if (x.numel() == 0) return out;
  const ParamRef bias_p = param_ref(bias), gate_p = param_ref(gate);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_gate_fwd_cuda", [&] {
    constexpr int kVec = vec_of<scalar_t>();
    const bool vec = can_vectorize(cols, kVec, {x.const_data_ptr(), out.const_data_ptr(), bias_p.ptr.ptr,
                                                gate_p.ptr.ptr});
    const int64_t packs = x.numel() / (vec ? kVec : 1);
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((packs + threads - 1) / threads, sm_count() * 16));
    if (vec) {
      forward_kernel<scalar_t, kVec><<<blocks, threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), bias_p.ptr, gate_p.ptr, out.mutable_data_ptr<scalar_t>(), packs, cols);
    } else {
      forward_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), bias_p.ptr, gate_p.ptr, out.mutable_data_ptr<scalar_t>(), packs, cols);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_gate_bwd_cuda(const at::Tensor& grad_in,
                                                                  const at::Tensor& x_in,
                                                                  const at::Tensor& bias,
                                                                  const std::optional<at::Tensor>& gate,
                                                                  std::array<bool, 3> mask) {
  check_inputs(kBwd, x_in, bias, gate);
  check_same_as(kBwd, grad_in, "grad_out", x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool want_dx = mask[0], want_dbias = mask[1], want_dgate = mask[2] && gate.has_value();
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor dx = want_dx ? at::empty_like(x) : not_requested(x);
  at::Tensor dbias = want_dbias ? at::empty({cols}, bias.options()) : not_requested(x);
  at::Tensor dgate = want_dgate ? at::empty({cols}, gate->options()) : not_requested(x);
  if (cols == 0 || !(want_dx || want_dbias || want_dgate)) return {dx, dbias, dgate};
  if (rows == 0) {
    if (want_dbias) dbias.zero_();
    if (want_dgate) dgate.zero_();
    return {dx, dbias, dgate};
  }
  const ParamRef bias_p = param_ref(bias), gate_p = param_ref(gate);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_gate_bwd_cuda", [&] {
    constexpr int kVec = vec_of<scalar_t>();
    const bool vec = can_vectorize(cols, kVec, {x.const_data_ptr(), grad.const_data_ptr(),
                                                want_dx ? dx.const_data_ptr() : nullptr});
    const int v = vec ? kVec : 1;
    const int64_t grid_x = (cols + kBwdThreadsX * v - 1) / (kBwdThreadsX * v);
    const int64_t max_y = (rows + kBwdThreadsY - 1) / kBwdThreadsY;
    const int64_t grid_y = std::max<int64_t>(1, std::min<int64_t>(max_y, (sm_count() * 4 + grid_x - 1) / grid_x));
    const at::Tensor partials = at::empty({grid_y, 2, cols}, x.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    const dim3 block(kBwdThreadsX, kBwdThreadsY);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      backward_kernel<scalar_t, V><<<grid, block, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bias_p.ptr, gate_p.ptr,
          want_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
          partials.mutable_data_ptr<float>(), rows, cols, want_dbias, want_dgate);
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    PartialSums sums;
    if (want_dbias) add_sum(sums, dbias, 0, cols);
    if (want_dgate) add_sum(sums, dgate, cols, cols);
    sum_partials(partials.const_data_ptr<float>(), grid_y, 2 * cols, sums);
  });
  return {dx, dbias, dgate};
}

}  // namespace
}  // namespace cofi::cuda

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("gelu_gate_fwd", &cofi::cuda::gelu_gate_fwd_cuda);
  m.impl("gelu_gate_bwd", &cofi::cuda::gelu_gate_bwd_cuda);
}
