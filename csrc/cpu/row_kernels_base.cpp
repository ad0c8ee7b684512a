// The row passes built with the extension's own flags (AVX2 + FMA when the
// build enables them, else plain), and the run-time choice between them and
// the AVX-512 build of row_kernels_avx512.cpp.

#include "row_kernels_impl.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace cofi::cpu {
namespace base {

const RowKernels& row_kernels_table() {
#if defined(CPU_CAPABILITY_AVX2)
  static const RowKernels table{"avx2", kernels_of<float>(), kernels_of<c10::BFloat16>()};
#else
  static const RowKernels table{"default", kernels_of<float>(), kernels_of<c10::BFloat16>()};
#endif
  return table;
}

}  // namespace base

const RowKernels& row_kernels() {
  static const RowKernels& chosen = []() -> const RowKernels& {
    check_cpu_capability();
    const RowKernels* wide = avx512::row_kernels_table();
    // ATen's capability already accounts for the CPU's flags and ATEN_CPU_CAPABILITY.
    if (wide != nullptr && at::get_cpu_capability() == "AVX512") return *wide;
    return base::row_kernels_table();
  }();
  return chosen;
}

namespace {
std::string serving_cpu_isa() { return row_kernels().isa; }
}  // namespace

TORCH_LIBRARY_IMPL(cofi, CompositeExplicitAutograd, m) { m.impl("serving_cpu_isa", &serving_cpu_isa); }

}  // namespace cofi::cpu
