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

// A per-feature parameter or gate read straight from its own dtype (float32
// or the activation dtype), so that no conversion kernel runs before the op.
struct ParamPtr {
  const void* ptr = nullptr;
  bool is_f32 = true;

  __host__ __device__ bool present() const { return ptr != nullptr; }

  template <typename T>
  __device__ __forceinline__ float at(int64_t k) const {
    return is_f32 ? static_cast<const float*>(ptr)[k] : static_cast<float>(static_cast<const T*>(ptr)[k]);
  }

  // out[j] = this[k + j] for j < VEC with 16-byte loads; k is a multiple of
  // VEC and the pointer 16-byte aligned (the launcher checks).
  template <typename T, int VEC>
  __device__ __forceinline__ void load(int64_t k, float (&out)[VEC]) const {
    if (is_f32) {
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int c = 0; c < VEC; c += 4) {
          const Pack<float, 4> v = load_pack<float, 4>(static_cast<const float*>(ptr) + k + c);
#pragma unroll
          for (int j = 0; j < 4; ++j) out[c + j] = v.v[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = static_cast<const float*>(ptr)[k + j];
      }
    } else {
      const Pack<T, VEC> v = load_pack<T, VEC>(static_cast<const T*>(ptr) + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(v.v[j]);
    }
  }

  // Like load(), or all `fill` when the parameter is absent.
  template <typename T, int VEC>
  __device__ __forceinline__ void load_or(int64_t k, float fill, float (&out)[VEC]) const {
    if (present()) {
      load<T, VEC>(k, out);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = fill;
    }
  }
};

// Keeps a contiguous version of the parameter alive while the kernel runs.
struct ParamRef {
  at::Tensor tensor;
  ParamPtr ptr;
};

inline ParamRef param_ref(const at::Tensor& t) {
  ParamRef ref{t.contiguous(), {}};
  ref.ptr = {ref.tensor.const_data_ptr(), ref.tensor.scalar_type() == at::kFloat};
  return ref;
}

inline ParamRef param_ref(const std::optional<at::Tensor>& t) { return t ? param_ref(*t) : ParamRef{}; }

// Up to four gradients summed from one float32 partials buffer
// [n_rows, row_stride]: output i takes columns [offset, offset + cols).
struct PartialSums {
  static constexpr int kMax = 4;
  void* out[kMax];
  int dtype[kMax];  // 0 float32, 1 float16, 2 bfloat16
  int64_t offset[kMax], cols[kMax];
  int count = 0;
};

inline int dtype_code(c10::ScalarType t) {
  return t == at::kFloat ? 0 : t == at::kHalf ? 1 : 2;
}

inline void add_sum(PartialSums& sums, at::Tensor& out, int64_t offset, int64_t cols) {
  TORCH_INTERNAL_ASSERT(sums.count < PartialSums::kMax && out.is_contiguous() && out.numel() == cols);
  sums.out[sums.count] = out.mutable_data_ptr();
  sums.dtype[sums.count] = dtype_code(out.scalar_type());
  sums.offset[sums.count] = offset;
  sums.cols[sums.count] = cols;
  ++sums.count;
}

// out_i[c] = sum over r of partials[r * row_stride + offset_i + c] for each
// output of `sums`, in r order (deterministic); one launch for all of them.
void sum_partials(const float* partials, int64_t n_rows, int64_t row_stride, const PartialSums& sums);

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

// Elements of T in one 16-byte pack.
template <typename T>
constexpr int vec_of() {
  return 16 / sizeof(T);
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
