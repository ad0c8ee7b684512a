// masked_layer_norm on CUDA (semantics: cofi_kernels/reference.py).
// One warp per row. The row is re-read from global memory for each pass
// (the repeats hit L1/L2), so any hidden size works without a shared buffer.
// The backward keeps per-warp column sums of dweight/dbias/dhidden_gate in
// shared memory, writes one partial row per block and sums them in a second
// kernel: deterministic, no atomics.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <map>
#include <mutex>

#include "../op_checks.h"
#include "cuda_utils.cuh"

namespace cofi::cuda {
namespace {

constexpr const char* kOp = "cofi::masked_layer_norm";
constexpr int kWarpsFwd = 4;

struct Params {
  const float* weight;
  const float* bias;
  const float* layer_gate;   // one value, or nullptr (= 1)
  const float* hidden_gate;  // [dims], or nullptr (= all ones, all kept)
  int dims;
};

__device__ __forceinline__ float hidden_at(const Params& p, int k) {
  return p.hidden_gate != nullptr ? p.hidden_gate[k] : 1.0f;
}

// 1 / max(#kept, 1), computed by the first warp of the block.
__device__ float inverse_kept(const Params& p) {
  __shared__ float inv;
  if (threadIdx.x < 32) {
    float count = 0.0f;
    for (int k = threadIdx.x; k < p.dims; k += 32) count += hidden_at(p, k) != 0.0f ? 1.0f : 0.0f;
    count = warp_sum(count);
    if (threadIdx.x == 0) inv = 1.0f / fmaxf(count, 1.0f);
  }
  __syncthreads();
  return inv;
}

template <typename T, int VEC>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                               float* __restrict__ mean_out, float* __restrict__ rstd_out, Params p, int64_t rows,
                               float eps) {
  const float inv_kept = inverse_kept(p);
  const float lg = p.layer_gate != nullptr ? *p.layer_gate : 1.0f;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const T* xr = x + row * p.dims;
    const T* rr = res + row * p.dims;
    float sum = 0.0f;
    for (int k = lane * VEC; k < p.dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = hidden_at(p, k + j);
        const float y = static_cast<float>(rv.v[j]) + static_cast<float>(xv.v[j]) * lg * h;
        sum += h != 0.0f ? y : 0.0f;
      }
    }
    const float mean = warp_sum(sum) * inv_kept;
    float sq = 0.0f;
    for (int k = lane * VEC; k < p.dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = hidden_at(p, k + j);
        const float c = static_cast<float>(rv.v[j]) + static_cast<float>(xv.v[j]) * lg * h - mean;
        sq += h != 0.0f ? c * c : 0.0f;
      }
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_kept + eps);
    for (int k = lane * VEC; k < p.dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = hidden_at(p, k + j);
        const float y = static_cast<float>(rv.v[j]) + static_cast<float>(xv.v[j]) * lg * h;
        const float nhat = h != 0.0f ? (y - mean) * rstd : 0.0f;
        ov.v[j] = static_cast<T>((nhat * p.weight[k + j] + p.bias[k + j]) * h);
      }
      store_pack<T, VEC>(out + row * p.dims + k, ov);
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

struct BackwardOut {
  void* dx;    // or nullptr
  void* dres;  // or nullptr
  float* partials;  // [gridDim.x, 3, dims] (weight, bias, hidden_gate), then [gridDim.x] (layer_gate)
  bool want_dhg, want_dlg;
};

// Shared memory: [warps, 3, dims] floats of per-warp column sums, then [warps] for layer_gate.
template <typename T, int VEC>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ res,
                                const float* __restrict__ mean_in, const float* __restrict__ rstd_in, Params p,
                                BackwardOut o, int64_t rows) {
  extern __shared__ float acc[];
  const int dims = p.dims, warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < warps * (3 * dims + 1); i += blockDim.x) acc[i] = 0.0f;
  const float inv_kept = inverse_kept(p);  // also orders the zeroing above before use
  const float lg = p.layer_gate != nullptr ? *p.layer_gate : 1.0f;
  float* acc_w = acc + warp * 3 * dims;
  float* acc_b = acc_w + dims;
  float* acc_h = acc_b + dims;
  float acc_lg = 0.0f;
  T* dx = static_cast<T*>(o.dx);
  T* dres = static_cast<T*>(o.dres);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t base = row * dims;
    const float mean = mean_in[row], rstd = rstd_in[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int k = lane * VEC; k < dims; k += 32 * VEC) {
      const Pack<T, VEC> gv = load_pack<T, VEC>(grad + base + k), xv = load_pack<T, VEC>(x + base + k),
                         rv = load_pack<T, VEC>(res + base + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = hidden_at(p, k + j), g = static_cast<float>(gv.v[j]);
        const float y = static_cast<float>(rv.v[j]) + static_cast<float>(xv.v[j]) * lg * h;
        const float nhat = h != 0.0f ? (y - mean) * rstd : 0.0f;
        const float dn = h != 0.0f ? g * p.weight[k + j] * h : 0.0f;
        s1 += dn;
        s2 += dn * nhat;
        acc_w[k + j] += g * h * nhat;
        acc_b[k + j] += g * h;
        if (o.want_dhg) acc_h[k + j] += g * (nhat * p.weight[k + j] + p.bias[k + j]);
      }
    }
    const float mean_dn = warp_sum(s1) * inv_kept, mean_dn_nhat = warp_sum(s2) * inv_kept;
    for (int k = lane * VEC; k < dims; k += 32 * VEC) {
      const Pack<T, VEC> gv = load_pack<T, VEC>(grad + base + k), xv = load_pack<T, VEC>(x + base + k),
                         rv = load_pack<T, VEC>(res + base + k);
      Pack<T, VEC> dyv, dxv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float h = hidden_at(p, k + j), g = static_cast<float>(gv.v[j]), xj = static_cast<float>(xv.v[j]);
        const float y = static_cast<float>(rv.v[j]) + xj * lg * h;
        float dy = 0.0f;
        if (h != 0.0f) {
          const float nhat = (y - mean) * rstd;
          dy = rstd * (g * p.weight[k + j] * h - mean_dn - nhat * mean_dn_nhat);
        }
        dyv.v[j] = static_cast<T>(dy);
        dxv.v[j] = static_cast<T>(dy * lg * h);
        if (o.want_dhg) acc_h[k + j] += dy * xj * lg;
        acc_lg += dy * xj * h;
      }
      if (dres != nullptr) store_pack<T, VEC>(dres + base + k, dyv);
      if (dx != nullptr) store_pack<T, VEC>(dx + base + k, dxv);
    }
  }
  acc_lg = warp_sum(acc_lg);
  if (lane == 0) acc[warps * 3 * dims + warp] = acc_lg;
  __syncthreads();
  float* part = o.partials + static_cast<int64_t>(blockIdx.x) * 3 * dims;
  for (int i = threadIdx.x; i < 3 * dims; i += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += acc[w * 3 * dims + i];
    part[i] = total;
  }
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += acc[warps * 3 * dims + w];
    o.partials[static_cast<int64_t>(gridDim.x) * 3 * dims + blockIdx.x] = total;
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  const at::Tensor& bias, const std::optional<at::Tensor>& layer_gate,
                  const std::optional<at::Tensor>& hidden_gate) {
  check_activation(kOp, x, "x");
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel got x on ", x.device());
  check_same_as(kOp, residual, "residual", x, "x");
  const int64_t dims = x.size(-1);
  TORCH_CHECK(dims <= (1 << 24), kOp, ": hidden size ", dims, " is too large");
  check_feature_vector(kOp, weight, "weight", dims, x);
  check_feature_vector(kOp, bias, "bias", dims, x);
  if (layer_gate) check_scalar_gate(kOp, *layer_gate, "layer_gate", x);
  if (hidden_gate) check_feature_vector(kOp, *hidden_gate, "hidden_gate", dims, x);
}

// Float32 copies of the small parameters, kept alive by the caller.
struct FloatParams {
  at::Tensor weight, bias, layer_gate, hidden_gate;
  Params view(int dims) const {
    return {weight.const_data_ptr<float>(), bias.const_data_ptr<float>(),
            layer_gate.defined() ? layer_gate.const_data_ptr<float>() : nullptr,
            hidden_gate.defined() ? hidden_gate.const_data_ptr<float>() : nullptr, dims};
  }
};

FloatParams float_params(const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate) {
  return {as_float_vector(weight), as_float_vector(bias),
          layer_gate ? as_float_vector(layer_gate->reshape({1})) : at::Tensor(),
          hidden_gate ? as_float_vector(*hidden_gate) : at::Tensor()};
}

template <typename T>
constexpr int vec_of() {
  return 16 / sizeof(T);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_cuda(
    const at::Tensor& x_in, const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate, double eps) {
  check_inputs(x_in, res_in, weight, bias, layer_gate, hidden_gate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  at::Tensor out = at::empty_like(x);
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  const FloatParams fp = float_params(weight, bias, layer_gate, hidden_gate);
  const Params p = fp.view(static_cast<int>(dims));
  const int64_t blocks = std::min<int64_t>((rows + kWarpsFwd - 1) / kWarpsFwd, sm_count() * 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_cuda", [&] {
    constexpr int kVec = vec_of<scalar_t>();
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      forward_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kWarpsFwd * 32, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), p, rows, static_cast<float>(eps));
    };
    if (can_vectorize(dims, kVec, {x.const_data_ptr(), res.const_data_ptr(), out.const_data_ptr()})) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

// Opting in to more than 48 KB of dynamic shared memory is done once per
// kernel and device (so before any CUDA graph capture, which forbids it).
template <typename Kernel>
void raise_shared_memory_limit(Kernel kernel, size_t smem) {
  if (smem <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> raised;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& current = raised[{device, reinterpret_cast<const void*>(kernel)}];
  if (smem > current) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    current = smem;
  }
}

// Resident blocks per SM as limited by threads and shared memory.
int64_t blocks_per_sm(int warps, size_t smem) {
  const int64_t by_threads = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor) / (warps * 32);
  const int64_t by_smem = static_cast<int64_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor)) /
                          static_cast<int64_t>(smem + 1024);  // the runtime reserves 1 KB per block
  return std::max<int64_t>(1, std::min(by_threads, by_smem));
}

// Warps per backward block: up to 8, as many as the shared memory allows.
int backward_warps(int64_t dims, size_t* smem_bytes) {
  const size_t limit = max_shared_memory_per_block();
  for (int warps = 8; warps >= 1; warps /= 2) {
    const size_t bytes = static_cast<size_t>(warps) * (3 * dims + 1) * sizeof(float);
    if (bytes <= limit) {
      *smem_bytes = bytes;
      return warps;
    }
  }
  TORCH_CHECK(false, kOp, ": hidden size ", dims, " needs more shared memory than this GPU has (",
              limit, " bytes per block) in the backward");
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads6 masked_layer_norm_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                       const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
                                       const std::optional<at::Tensor>& layer_gate,
                                       const std::optional<at::Tensor>& hidden_gate, const at::Tensor& mean_in,
                                       const at::Tensor& rstd_in, std::array<bool, 6> mask) {
  check_inputs(x_in, res_in, weight, bias, layer_gate, hidden_gate);
  check_same_as(kOp, grad_in, "grad_out", x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous(), grad = grad_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  TORCH_CHECK(mean_in.numel() == rows && rstd_in.numel() == rows && mean_in.scalar_type() == at::kFloat &&
                  rstd_in.scalar_type() == at::kFloat && mean_in.is_cuda() && rstd_in.is_cuda(),
              kOp, ": mean and rstd must be the float32 statistics returned by the forward, one per row");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const bool want_dlg = mask[4] && layer_gate.has_value(), want_dhg = mask[5] && hidden_gate.has_value();
  at::Tensor dx = mask[0] ? at::empty_like(x) : not_requested(x);
  at::Tensor dres = mask[1] ? at::empty_like(x) : not_requested(x);
  at::Tensor dw = mask[2] ? at::empty({dims}, weight.options()) : not_requested(x);
  at::Tensor db = mask[3] ? at::empty({dims}, bias.options()) : not_requested(x);
  at::Tensor dlg = want_dlg ? at::empty(layer_gate->sizes(), layer_gate->options()) : not_requested(x);
  at::Tensor dhg = want_dhg ? at::empty({dims}, hidden_gate->options()) : not_requested(x);
  if (dims == 0) return {dx, dres, dw, db, dlg, dhg};
  if (rows == 0) {
    for (at::Tensor* t : {&dw, &db, &dlg, &dhg}) {
      if (t->numel() > 0 || t->dim() == 0) t->zero_();
    }
    return {dx, dres, dw, db, dlg, dhg};
  }
  const FloatParams fp = float_params(weight, bias, layer_gate, hidden_gate);
  const Params p = fp.view(static_cast<int>(dims));
  size_t smem = 0;
  const int warps = backward_warps(dims, &smem);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_backward", [&] {
    constexpr int kVec = vec_of<scalar_t>();
    const bool vec = can_vectorize(dims, kVec, {x.const_data_ptr(), res.const_data_ptr(), grad.const_data_ptr(),
                                                mask[0] ? dx.const_data_ptr() : nullptr,
                                                mask[1] ? dres.const_data_ptr() : nullptr});
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      auto kernel = backward_kernel<scalar_t, V>;
      raise_shared_memory_limit(kernel, smem);
      const int64_t blocks = std::max<int64_t>(
          1, std::min<int64_t>((rows + warps - 1) / warps, static_cast<int64_t>(sm_count()) * blocks_per_sm(warps, smem)));
      const at::Tensor partials = at::empty({blocks * (3 * dims + 1)}, x.options().dtype(at::kFloat));
      const BackwardOut o{mask[0] ? dx.mutable_data_ptr() : nullptr, mask[1] ? dres.mutable_data_ptr() : nullptr,
                          partials.mutable_data_ptr<float>(), want_dhg, want_dlg};
      kernel<<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(
          grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
          mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), p, o, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const float* part = partials.const_data_ptr<float>();
      if (mask[2]) sum_columns(part, blocks, 3 * dims, dims, dw);
      if (mask[3]) sum_columns(part + dims, blocks, 3 * dims, dims, db);
      if (want_dhg) sum_columns(part + 2 * dims, blocks, 3 * dims, dims, dhg);
      if (want_dlg) sum_columns(part + blocks * 3 * dims, blocks, 1, 1, dlg);
    };
    if (vec) {
      launch(std::integral_constant<int, kVec>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {dx, dres, dw, db, dlg, dhg};
}

}  // namespace
}  // namespace cofi::cuda

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("masked_layer_norm", &cofi::cuda::masked_layer_norm_cuda);
  m.impl("masked_layer_norm_backward", &cofi::cuda::masked_layer_norm_backward_cuda);
}
