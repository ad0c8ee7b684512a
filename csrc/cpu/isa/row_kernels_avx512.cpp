// The row passes of row_kernels_impl.h compiled for AVX-512 (F, BW, VL, DQ:
// ATen's AVX512 capability). setup.py builds this file on its own with those
// flags (and links it last, so that any inline function of a shared header
// that the linker keeps once is the copy built with the extension's flags);
// row_kernels() calls it only where ATen runs AVX-512. Without an AVX-512
// build it is a null table (base/row_kernels_base.cpp's flags are used then).

#include "../row_kernels.h"

#if defined(COFI_BUILD_AVX512)
// at::vec's AVX-512 classes in a namespace of their own (the extension's other
// files use the AVX2 ones), and our helpers in cofi::cpu::isa_avx512.
#define CPU_CAPABILITY cofi_avx512
#define COFI_ISA isa_avx512
#include "../row_kernels_impl.h"
#endif

namespace cofi::cpu::avx512 {

const RowKernels* row_kernels_table() {
#if defined(COFI_BUILD_AVX512)
  static const RowKernels table{"avx512", kernels_of<float>(), kernels_of<c10::BFloat16>()};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace cofi::cpu::avx512
