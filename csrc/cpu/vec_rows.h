// Row helpers for the CPU kernels: rows are converted to float32 once, the
// arithmetic runs on at::vec::Vectorized<float> (AVX2 when the build enables
// it, AVX-512 in the translation units built for it), and results are
// converted back to the activation dtype.
//
// The helpers live in an inline namespace named by COFI_ISA, so that a
// translation unit compiled for another instruction set
// (row_kernels_avx512.cpp) gets its own copies rather than an ODR clash.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef COFI_ISA
#define COFI_ISA isa_base
#endif

namespace cofi::cpu {
inline namespace COFI_ISA {

using Vec = at::vec::Vectorized<float>;

// A float32 view of n elements at src: src itself for float, else a converted
// copy in buf (which must hold n floats).
template <typename T>
inline const float* row_as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Where a kernel writes a float32 row destined for dst: dst itself for float,
// else buf, to be passed to store_row afterwards.
template <typename T>
inline float* row_out_float(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    at::vec::convert(src, dst, n);
  }
}

inline Vec load(const float* p, int64_t count) {
  return count == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, count);
}

inline void store(const Vec& v, float* p, int64_t count) {
  if (count == Vec::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// Calls body(j, count) over [0, n) in steps of one vector; the last step may
// be partial. Lanes past `count` hold zeros after load(), so reductions over
// them stay exact.
template <typename Body>
inline void for_each_vec(int64_t n, const Body& body) {
  for (int64_t j = 0; j < n; j += Vec::size()) {
    body(j, std::min<int64_t>(Vec::size(), n - j));
  }
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Rows are split into at most this many fixed chunks for column reductions,
// so that the summation order depends only on the shape, never on the
// number of threads.
constexpr int64_t kMaxReductionChunks = 64;

inline int64_t reduction_chunks(int64_t rows) { return std::max<int64_t>(1, std::min(rows, kMaxReductionChunks)); }

// Sums columns [offset, offset + cols) of a float32 partials buffer laid out
// as [chunks, row_stride] over the chunks, in chunk order; returns them in `dtype`.
inline at::Tensor sum_chunk_partials(const at::Tensor& partials, int64_t chunks, int64_t row_stride, int64_t offset,
                                     int64_t cols, c10::ScalarType dtype) {
  at::Tensor total = at::zeros({cols}, partials.options());
  float* t = total.mutable_data_ptr<float>();
  const float* p = partials.const_data_ptr<float>() + offset;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < cols; ++j) t[j] += p[c * row_stride + j];
  }
  return total.to(dtype);
}

// Rows per parallel_for task: enough elements to amortise the task overhead.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Builds with AVX2 code refuse to run on a processor without it rather than
// dying of an illegal instruction.
inline void check_cpu_capability() {
#if defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
  TORCH_CHECK(ok,
              "cofi_kernels was built with AVX2/FMA/F16C CPU kernels but this processor lacks them; "
              "rebuild with COFI_CPU_AVX2=0");
#endif
}

}  // namespace COFI_ISA
}  // namespace cofi::cpu
