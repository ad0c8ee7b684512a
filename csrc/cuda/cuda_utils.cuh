// Small device helpers shared by the CUDA row kernels. Light headers only:
// the kernels need tensors, the CUDA stream and the op registry, not all of torch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace cofi::cuda {

// VEC elements of T loaded or stored as one aligned access (16 bytes when
// VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// out[c] = sum over r of partials[r * row_stride + c], in r order (deterministic).
template <typename Tout>
__global__ void sum_columns_kernel(const float* __restrict__ partials, int64_t n_rows, int64_t row_stride,
                                   int64_t cols, Tout* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.0f;
  for (int64_t r = 0; r < n_rows; ++r) total += partials[r * row_stride + c];
  out[c] = static_cast<Tout>(total);
}

// Sums columns of a float32 partials buffer into `out` (any float dtype).
inline void sum_columns(const float* partials, int64_t n_rows, int64_t row_stride, int64_t cols, at::Tensor& out) {
  if (cols == 0) return;
  const int threads = 256;
  const int blocks = static_cast<int>((cols + threads - 1) / threads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sum_columns", [&] {
    sum_columns_kernel<scalar_t><<<blocks, threads, 0, stream>>>(partials, n_rows, row_stride, cols,
                                                                  out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Attributes of the current device (cudaDeviceGetAttribute is cheap; no need
// for ATen's CUDAContext, whose header pulls in cuBLAS and cuSPARSE).
inline int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int sm_count() { return device_attribute(cudaDevAttrMultiProcessorCount); }

inline size_t max_shared_memory_per_block() {
  return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

// 16-byte accesses when every row starts 16-byte aligned.
inline bool can_vectorize(int64_t cols, int vec, std::initializer_list<const void*> ptrs) {
  if (cols % vec != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

}  // namespace cofi::cuda
