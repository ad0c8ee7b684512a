// masked_layer_norm on CUDA (semantics: cofi_kernels/reference.py).
//
// One warp per row. Two paths:
// - register path (hidden size <= 1024 and divisible by the 16-byte pack):
//   each lane holds its slice of the row in registers, so the row is read
//   from memory once; the backward keeps its per-column sums of
//   dweight/dbias/dhidden_gate in registers across the rows the warp visits;
// - generic path (any other hidden size): passes re-read the row (L1/L2 hits)
//   and the backward keeps the column sums in shared memory.
// Either way each block writes one row of float32 partial column sums and a
// second kernel adds them up in a fixed order: deterministic, no atomics.

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

// Error messages name the registered op that was called.
constexpr const char* kFwd = "cofi::masked_layer_norm_fwd";
constexpr const char* kBwd = "cofi::masked_layer_norm_bwd";
constexpr int kWarpsFwd = 4;
constexpr int kWarpsBwd = 8;
constexpr int kMaxRegisterDims = 1024;

struct Params {
  ParamPtr weight, bias, layer_gate, hidden_gate;  // gates may be absent (= 1, all kept)
  int dims;
};

template <typename T>
__device__ __forceinline__ float hidden_at(const Params& p, int k) {
  return p.hidden_gate.present() ? p.hidden_gate.at<T>(k) : 1.0f;
}

template <typename T>
__device__ __forceinline__ float layer_gate_value(const Params& p) {
  return p.layer_gate.present() ? p.layer_gate.at<T>(0) : 1.0f;
}

// residual + x * (layer_gate * hidden_gate), rounded the same way in every
// kernel, so that the backward recomputes exactly the forward's values.
__device__ __forceinline__ float pre_norm(float r, float x, float scale) { return __fmaf_rn(x, scale, r); }

// d loss / d norm(y) = g * weight * hidden_gate, rounded the same way in both
// backward passes (no FMA contraction), so that with a single kept dim
// dn - mean(dn) is exactly 0 rather than one rounding times rstd = eps^-1/2.
__device__ __forceinline__ float grad_nhat(float g, float w, float h) { return __fmul_rn(__fmul_rn(g, w), h); }

// 1 / max(#kept, 1), computed by the first warp of the block; also a barrier.
template <typename T>
__device__ float inverse_kept(const Params& p) {
  __shared__ float inv;
  if (threadIdx.x < 32) {
    float count = 0.0f;
    for (int k = threadIdx.x; k < p.dims; k += 32) count += hidden_at<T>(p, k) != 0.0f ? 1.0f : 0.0f;
    count = warp_sum(count);
    if (threadIdx.x == 0) inv = 1.0f / fmaxf(count, 1.0f);
  }
  __syncthreads();
  return inv;
}

struct BackwardOut {
  void* dx;         // or nullptr
  void* dres;       // or nullptr
  float* partials;  // [gridDim.x, 3 * dims + 1]: weight, bias, hidden_gate sums, then layer_gate
  bool want_dhg;
};

// ---------------------------------------------------------------- register path

// Lane `lane` owns packs k = (i * 32 + lane) * VEC for i < ITERS (k < dims).
template <typename T, int VEC, int ITERS>
__global__ void forward_registers_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                                         float* __restrict__ mean_out, float* __restrict__ rstd_out, Params p,
                                         int64_t rows, float eps) {
  const float inv_kept = inverse_kept<T>(p);
  const float lg = layer_gate_value<T>(p);
  const int lane = threadIdx.x % 32, dims = p.dims;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsFwd + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t base = row * dims;
  Pack<T, VEC> xv[ITERS], rv[ITERS];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int k = (i * 32 + lane) * VEC;
    if (k < dims) {
      xv[i] = load_pack<T, VEC>(x + base + k);
      rv[i] = load_pack<T, VEC>(res + base + k);
    }
  }
  float y[ITERS][VEC], hg[ITERS][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int k = (i * 32 + lane) * VEC;
    if (k < dims) {
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, hg[i]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) hg[i][j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y[i][j] = k < dims ? pre_norm(static_cast<float>(rv[i].v[j]), static_cast<float>(xv[i].v[j]), lg * hg[i][j])
                         : 0.0f;
      sum += hg[i][j] != 0.0f ? y[i][j] : 0.0f;
    }
  }
  const float mean = warp_sum(sum) * inv_kept;
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float c = hg[i][j] != 0.0f ? y[i][j] - mean : 0.0f;
      sq += c * c;
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) * inv_kept + eps);
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int k = (i * 32 + lane) * VEC;
    if (k >= dims) continue;
    float w[VEC], b[VEC];
    p.weight.load<T, VEC>(k, w);
    p.bias.load<T, VEC>(k, b);
    Pack<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float nhat = hg[i][j] != 0.0f ? (y[i][j] - mean) * rstd : 0.0f;
      ov.v[j] = static_cast<T>((nhat * w[j] + b[j]) * hg[i][j]);
    }
    store_pack<T, VEC>(out + base + k, ov);
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Block-wide sum of one per-lane register slot into the block's partial row.
// smem holds [kWarpsBwd, dims] floats.
template <int VEC, int ITERS>
__device__ void reduce_slot_to_partials(const float (&acc)[ITERS][VEC], float* smem, float* partial_row,
                                        int dims) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
    const int k = (i * 32 + lane) * VEC;
    if (k < dims) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) smem[warp * dims + k + j] = acc[i][j];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < dims; c += blockDim.x) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarpsBwd; ++w) total += smem[w * dims + c];
    partial_row[c] = total;
  }
  __syncthreads();
}

template <typename T, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpsBwd * 32)
    backward_registers_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ res,
                              const float* __restrict__ mean_in, const float* __restrict__ rstd_in, Params p,
                              BackwardOut o, int64_t rows) {
  extern __shared__ float smem[];
  __shared__ float lg_sums[kWarpsBwd];
  const float inv_kept = inverse_kept<T>(p);
  const float lg = layer_gate_value<T>(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, dims = p.dims;
  T* dx = static_cast<T*>(o.dx);
  T* dres = static_cast<T*>(o.dres);
  float acc_w[ITERS][VEC], acc_b[ITERS][VEC], acc_h[ITERS][VEC];
#pragma unroll
  for (int i = 0; i < ITERS; ++i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc_w[i][j] = acc_b[i][j] = acc_h[i][j] = 0.0f;
  }
  float acc_lg = 0.0f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsBwd + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsBwd) {
    const int64_t base = row * dims;
    Pack<T, VEC> gv[ITERS], xv[ITERS], rv[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int k = (i * 32 + lane) * VEC;
      if (k < dims) {
        gv[i] = load_pack<T, VEC>(grad + base + k);
        xv[i] = load_pack<T, VEC>(x + base + k);
        rv[i] = load_pack<T, VEC>(res + base + k);
      }
    }
    const float mean = mean_in[row], rstd = rstd_in[row];
    float nhat[ITERS][VEC];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int k = (i * 32 + lane) * VEC;
      if (k >= dims) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) nhat[i][j] = 0.0f;
        continue;
      }
      float h[VEC], w[VEC], b[VEC];
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, h);
      p.weight.load<T, VEC>(k, w);
      if (o.want_dhg) p.bias.load<T, VEC>(k, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = static_cast<float>(gv[i].v[j]);
        const float y = pre_norm(static_cast<float>(rv[i].v[j]), static_cast<float>(xv[i].v[j]), lg * h[j]);
        const float nh = h[j] != 0.0f ? (y - mean) * rstd : 0.0f;
        const float dn = h[j] != 0.0f ? grad_nhat(g, w[j], h[j]) : 0.0f;
        nhat[i][j] = nh;
        s1 += dn;
        s2 += dn * nh;
        acc_w[i][j] += g * h[j] * nh;
        acc_b[i][j] += g * h[j];
        if (o.want_dhg) acc_h[i][j] += g * (nh * w[j] + b[j]);
      }
    }
    const float mean_dn = warp_sum(s1) * inv_kept, mean_dn_nhat = warp_sum(s2) * inv_kept;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
      const int k = (i * 32 + lane) * VEC;
      if (k >= dims) continue;
      float h[VEC], w[VEC];
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, h);
      p.weight.load<T, VEC>(k, w);
      Pack<T, VEC> dyv, dxv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = static_cast<float>(gv[i].v[j]), xj = static_cast<float>(xv[i].v[j]);
        const float dy =
            h[j] != 0.0f ? rstd * (grad_nhat(g, w[j], h[j]) - mean_dn - nhat[i][j] * mean_dn_nhat) : 0.0f;
        dyv.v[j] = static_cast<T>(dy);
        dxv.v[j] = static_cast<T>(dy * lg * h[j]);
        if (o.want_dhg) acc_h[i][j] += dy * xj * lg;
        acc_lg += dy * xj * h[j];
      }
      if (dres != nullptr) store_pack<T, VEC>(dres + base + k, dyv);
      if (dx != nullptr) store_pack<T, VEC>(dx + base + k, dxv);
    }
  }
  float* partial_row = o.partials + static_cast<int64_t>(blockIdx.x) * (3 * dims + 1);
  reduce_slot_to_partials<VEC, ITERS>(acc_w, smem, partial_row, dims);
  reduce_slot_to_partials<VEC, ITERS>(acc_b, smem, partial_row + dims, dims);
  reduce_slot_to_partials<VEC, ITERS>(acc_h, smem, partial_row + 2 * dims, dims);
  acc_lg = warp_sum(acc_lg);
  if (lane == 0) lg_sums[warp] = acc_lg;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarpsBwd; ++w) total += lg_sums[w];
    partial_row[3 * dims] = total;
  }
}

// ---------------------------------------------------------------- generic path

template <typename T, int VEC>
__global__ void forward_generic_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                                       float* __restrict__ mean_out, float* __restrict__ rstd_out, Params p,
                                       int64_t rows, float eps) {
  const float inv_kept = inverse_kept<T>(p);
  const float lg = layer_gate_value<T>(p);
  const int lane = threadIdx.x % 32, dims = p.dims;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsFwd + threadIdx.x / 32; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarpsFwd) {
    const T* xr = x + row * dims;
    const T* rr = res + row * dims;
    float sum = 0.0f;
    for (int k = lane * VEC; k < dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
      float h[VEC];
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float y = pre_norm(static_cast<float>(rv.v[j]), static_cast<float>(xv.v[j]), lg * h[j]);
        sum += h[j] != 0.0f ? y : 0.0f;
      }
    }
    const float mean = warp_sum(sum) * inv_kept;
    float sq = 0.0f;
    for (int k = lane * VEC; k < dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
      float h[VEC];
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = pre_norm(static_cast<float>(rv.v[j]), static_cast<float>(xv.v[j]), lg * h[j]) - mean;
        sq += h[j] != 0.0f ? c * c : 0.0f;
      }
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_kept + eps);
    for (int k = lane * VEC; k < dims; k += 32 * VEC) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + k), rv = load_pack<T, VEC>(rr + k);
      float h[VEC], w[VEC], b[VEC];
      p.hidden_gate.load_or<T, VEC>(k, 1.0f, h);
      p.weight.load<T, VEC>(k, w);
      p.bias.load<T, VEC>(k, b);
      Pack<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float y = pre_norm(static_cast<float>(rv.v[j]), static_cast<float>(xv.v[j]), lg * h[j]);
        const float nhat = h[j] != 0.0f ? (y - mean) * rstd : 0.0f;
        ov.v[j] = static_cast<T>((nhat * w[j] + b[j]) * h[j]);
      }
      store_pack<T, VEC>(out + row * dims + k, ov);
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// Element-wise (lane-strided) accesses, so the shared-memory column sums are
// free of bank conflicts. Shared memory: [warps, 3, dims] then [warps].
template <typename T>
__global__ void backward_generic_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                        const T* __restrict__ res, const float* __restrict__ mean_in,
                                        const float* __restrict__ rstd_in, Params p, BackwardOut o, int64_t rows) {
  extern __shared__ float acc[];
  const int dims = p.dims, warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < warps * (3 * dims + 1); i += blockDim.x) acc[i] = 0.0f;
  const float inv_kept = inverse_kept<T>(p);  // its barrier orders the zeroing before use
  const float lg = layer_gate_value<T>(p);
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
    for (int k = lane; k < dims; k += 32) {
      const float h = hidden_at<T>(p, k), g = static_cast<float>(grad[base + k]);
      const float y = pre_norm(static_cast<float>(res[base + k]), static_cast<float>(x[base + k]), lg * h);
      const float w = p.weight.at<T>(k);
      const float nhat = h != 0.0f ? (y - mean) * rstd : 0.0f;
      const float dn = h != 0.0f ? grad_nhat(g, w, h) : 0.0f;
      s1 += dn;
      s2 += dn * nhat;
      acc_w[k] += g * h * nhat;
      acc_b[k] += g * h;
      if (o.want_dhg) acc_h[k] += g * (nhat * w + p.bias.at<T>(k));
    }
    const float mean_dn = warp_sum(s1) * inv_kept, mean_dn_nhat = warp_sum(s2) * inv_kept;
    for (int k = lane; k < dims; k += 32) {
      const float h = hidden_at<T>(p, k), g = static_cast<float>(grad[base + k]);
      const float xk = static_cast<float>(x[base + k]);
      const float y = pre_norm(static_cast<float>(res[base + k]), xk, lg * h);
      float dy = 0.0f;
      if (h != 0.0f) dy = rstd * (grad_nhat(g, p.weight.at<T>(k), h) - mean_dn - (y - mean) * rstd * mean_dn_nhat);
      if (dres != nullptr) dres[base + k] = static_cast<T>(dy);
      if (dx != nullptr) dx[base + k] = static_cast<T>(dy * lg * h);
      if (o.want_dhg) acc_h[k] += dy * xk * lg;
      acc_lg += dy * xk * h;
    }
  }
  acc_lg = warp_sum(acc_lg);
  if (lane == 0) acc[warps * 3 * dims + warp] = acc_lg;
  __syncthreads();
  float* part = o.partials + static_cast<int64_t>(blockIdx.x) * (3 * dims + 1);
  for (int i = threadIdx.x; i < 3 * dims; i += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += acc[w * 3 * dims + i];
    part[i] = total;
  }
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < warps; ++w) total += acc[warps * 3 * dims + w];
    part[3 * dims] = total;
  }
}

// ---------------------------------------------------------------- launch helpers

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

// Warps per generic backward block: up to 8, as many as the shared memory allows.
int generic_backward_warps(int64_t dims, size_t* smem_bytes) {
  const size_t limit = max_shared_memory_per_block();
  for (int warps = 8; warps >= 1; warps /= 2) {
    const size_t bytes = static_cast<size_t>(warps) * (3 * dims + 1) * sizeof(float);
    if (bytes <= limit) {
      *smem_bytes = bytes;
      return warps;
    }
  }
  TORCH_CHECK(false, kBwd, ": hidden size ", dims, " needs more shared memory than this GPU has (", limit,
              " bytes per block) in the backward");
}

// Packs per lane for the register path: the smallest instantiated count that
// covers the row, or 0 when the row takes the generic path.
template <typename T>
int register_iters(int64_t dims, bool aligned) {
  constexpr int kVec = vec_of<T>();
  if (!aligned || dims > kMaxRegisterDims) return 0;
  const int64_t needed = (dims + 32 * kVec - 1) / (32 * kVec);
  constexpr int kMax = kMaxRegisterDims / (32 * kVec);
  for (int iters : {1, 2, 3, 4, 6, 8}) {
    if (iters >= needed && iters <= kMax) return iters;
  }
  return 0;
}

// Calls f(std::integral_constant<int, ITERS>) for the runtime iteration count.
template <typename T, typename F>
void dispatch_iters(int iters, const F& f) {
  constexpr int kMax = kMaxRegisterDims / (32 * vec_of<T>());  // 4 for 16-bit types, 8 for float
  switch (iters) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (kMax >= 3) f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (kMax >= 4) f(std::integral_constant<int, 4>{}); break;
    case 6: if constexpr (kMax >= 6) f(std::integral_constant<int, 6>{}); break;
    case 8: if constexpr (kMax >= 8) f(std::integral_constant<int, 8>{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected iteration count ", iters);
  }
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  const at::Tensor& bias, const std::optional<at::Tensor>& layer_gate,
                  const std::optional<at::Tensor>& hidden_gate) {
  check_masked_layer_norm_args(op, x, residual, weight, bias, layer_gate, hidden_gate, c10::DeviceType::CUDA);
  TORCH_CHECK(x.size(-1) <= (1 << 24), op, ": hidden size ", x.size(-1), " is too large");
}

// Contiguous parameters kept alive for the launch, and their device view.
struct ParamRefs {
  ParamRef weight, bias, layer_gate, hidden_gate;
  Params view(int dims) const { return {weight.ptr, bias.ptr, layer_gate.ptr, hidden_gate.ptr, dims}; }
};

ParamRefs param_refs(const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& layer_gate,
                     const std::optional<at::Tensor>& hidden_gate) {
  return {param_ref(weight), param_ref(bias), param_ref(layer_gate), param_ref(hidden_gate)};
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate, double eps) {
  check_inputs(kFwd, x_in, res_in, weight, bias, layer_gate, hidden_gate);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  at::Tensor out = at::empty_like(x);
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  const ParamRefs refs = param_refs(weight, bias, layer_gate, hidden_gate);
  const Params p = refs.view(static_cast<int>(dims));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_fwd_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = vec_of<T>();
    const bool aligned = can_vectorize(dims, kVec, {x.const_data_ptr(), res.const_data_ptr(), out.const_data_ptr(),
                                                    p.weight.ptr, p.bias.ptr, p.hidden_gate.ptr});
    const T* xp = x.const_data_ptr<T>();
    const T* rp = res.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    float* mp = mean.mutable_data_ptr<float>();
    float* sp = rstd.mutable_data_ptr<float>();
    const float e = static_cast<float>(eps);
    const int iters = register_iters<T>(dims, aligned);
    const int64_t row_blocks = (rows + kWarpsFwd - 1) / kWarpsFwd;
    if (iters > 0) {
      dispatch_iters<T>(iters, [&](auto it) {
        forward_registers_kernel<T, kVec, decltype(it)::value>
            <<<static_cast<unsigned>(row_blocks), kWarpsFwd * 32, 0, stream>>>(xp, rp, op, mp, sp, p, rows, e);
      });
    } else {
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(row_blocks, sm_count() * 16));
      if (aligned) {
        forward_generic_kernel<T, kVec><<<blocks, kWarpsFwd * 32, 0, stream>>>(xp, rp, op, mp, sp, p, rows, e);
      } else {
        forward_generic_kernel<T, 1><<<blocks, kWarpsFwd * 32, 0, stream>>>(xp, rp, op, mp, sp, p, rows, e);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads6 masked_layer_norm_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                  const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
                                  const std::optional<at::Tensor>& layer_gate,
                                  const std::optional<at::Tensor>& hidden_gate, const at::Tensor& mean_in,
                                  const at::Tensor& rstd_in, std::array<bool, 6> mask) {
  check_inputs(kBwd, x_in, res_in, weight, bias, layer_gate, hidden_gate);
  check_same_as(kBwd, grad_in, "grad_out", x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous(), grad = grad_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  TORCH_CHECK(mean_in.numel() == rows && rstd_in.numel() == rows && mean_in.scalar_type() == at::kFloat &&
                  rstd_in.scalar_type() == at::kFloat && mean_in.is_cuda() && rstd_in.is_cuda(),
              kBwd, ": mean and rstd must be the float32 statistics returned by the forward, one per row");
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
  const ParamRefs refs = param_refs(weight, bias, layer_gate, hidden_gate);
  const Params p = refs.view(static_cast<int>(dims));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_bwd_cuda", [&] {
    using T = scalar_t;
    constexpr int kVec = vec_of<T>();
    const bool aligned = can_vectorize(dims, kVec, {x.const_data_ptr(), res.const_data_ptr(), grad.const_data_ptr(),
                                                    mask[0] ? dx.const_data_ptr() : nullptr,
                                                    mask[1] ? dres.const_data_ptr() : nullptr, p.weight.ptr,
                                                    p.bias.ptr, p.hidden_gate.ptr});
    const int iters = register_iters<T>(dims, aligned);
    int64_t blocks = 0;
    at::Tensor partials;
    auto make_out = [&](int64_t n_blocks) {
      blocks = n_blocks;
      partials = at::empty({blocks * (3 * dims + 1)}, x.options().dtype(at::kFloat));
      return BackwardOut{mask[0] ? dx.mutable_data_ptr() : nullptr, mask[1] ? dres.mutable_data_ptr() : nullptr,
                         partials.mutable_data_ptr<float>(), want_dhg};
    };
    if (iters > 0) {
      // One resident block of kWarpsBwd warps per SM: the register sums are
      // reduced across blocks through the partials, so fewer blocks is cheaper.
      const BackwardOut o = make_out(std::min<int64_t>((rows + kWarpsBwd - 1) / kWarpsBwd, sm_count()));
      const size_t smem = static_cast<size_t>(kWarpsBwd) * dims * sizeof(float);
      dispatch_iters<T>(iters, [&](auto it) {
        backward_registers_kernel<T, kVec, decltype(it)::value><<<static_cast<unsigned>(blocks), kWarpsBwd * 32,
                                                                  smem, stream>>>(
            grad.const_data_ptr<T>(), x.const_data_ptr<T>(), res.const_data_ptr<T>(), mean.const_data_ptr<float>(),
            rstd.const_data_ptr<float>(), p, o, rows);
      });
    } else {
      size_t smem = 0;
      const int warps = generic_backward_warps(dims, &smem);
      auto kernel = backward_generic_kernel<T>;
      raise_shared_memory_limit(kernel, smem);
      const BackwardOut o = make_out(std::max<int64_t>(
          1, std::min<int64_t>((rows + warps - 1) / warps, sm_count() * blocks_per_sm(warps, smem))));
      kernel<<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(
          grad.const_data_ptr<T>(), x.const_data_ptr<T>(), res.const_data_ptr<T>(), mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), p, o, rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    PartialSums sums;
    if (mask[2]) add_sum(sums, dw, 0, dims);
    if (mask[3]) add_sum(sums, db, dims, dims);
    if (want_dhg) add_sum(sums, dhg, 2 * dims, dims);
    if (want_dlg) add_sum(sums, dlg, 3 * dims, 1);
    sum_partials(partials.const_data_ptr<float>(), blocks, 3 * dims + 1, sums);
  });
  return {dx, dres, dw, db, dlg, dhg};
}

}  // namespace
}  // namespace cofi::cuda

TORCH_LIBRARY_IMPL(cofi, CUDA, m) {
  m.impl("masked_layer_norm_fwd", &cofi::cuda::masked_layer_norm_fwd_cuda);
  m.impl("masked_layer_norm_bwd", &cofi::cuda::masked_layer_norm_bwd_cuda);
}
