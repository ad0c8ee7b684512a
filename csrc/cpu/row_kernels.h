// The row passes of the CPU serving engine (GEMM epilogues and the packed
// embedding), built once per instruction set and chosen at run time:
// row_kernels_base.cpp is built with the extension's flags (AVX2 or none),
// row_kernels_avx512.cpp for AVX-512 (x86-64 with GCC). ATen picks its own
// kernels the same way, so eager's passes run AVX-512 on such CPUs and ours
// must too to be faster than them.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace cofi::cpu {

// Activation codes of cofi::pruned_layer (cofi_kernels/ops/pruned_layer.py holds the names).
enum Activation : int64_t { kGeluErf = 0, kGeluTanh = 1, kRelu = 2 };

// Each pass reads and writes rows of d contiguous elements, float32 arithmetic, parallel over rows.
template <typename T>
struct RowKernelsOf {
  // y <- LayerNorm(y + bias + residual) * w + b, in place.
  void (*bias_residual_norm)(T* y, const T* residual, const T* bias, const T* w, const T* b, int64_t rows,
                             int64_t d, float eps);
  // y <- act(y + bias), in place.
  void (*bias_activation)(T* y, const T* bias, int64_t rows, int64_t d, int64_t activation);
  // out[r] <- LayerNorm(word[ids[r]] + position[positions[r]] + type[types[r]]) * w + b.
  void (*embed_norm)(T* out, const T* word, const T* position, const T* type, const int64_t* ids,
                     const int64_t* positions, const int64_t* types, const T* w, const T* b, int64_t rows, int64_t d,
                     float eps);
};

struct RowKernels {
  const char* isa;  // "avx512", "avx2" or "default"
  RowKernelsOf<float> f32;
  RowKernelsOf<c10::BFloat16> bf16;

  template <typename T>
  const RowKernelsOf<T>& of() const {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return bf16;
    }
  }
};

// The widest table this CPU runs and ATen's capability allows (ATEN_CPU_CAPABILITY=avx2 or
// default narrows both ATen's choice and ours), chosen once.
const RowKernels& row_kernels();

namespace base {
const RowKernels& row_kernels_table();
}
namespace avx512 {
const RowKernels* row_kernels_table();  // nullptr where not built
}

}  // namespace cofi::cpu
