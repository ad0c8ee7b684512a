// The row passes of row_kernels.h, written once against at::vec and compiled
// per instruction set: the including file sets COFI_ISA (the namespace) and the
// CPU_CAPABILITY macros at::vec reads. Not a public header.

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "row_kernels.h"
#include "vec_rows.h"

namespace cofi::cpu {
inline namespace COFI_ISA {
namespace {

// out <- (v - mean) * rstd * w + b over one pre-norm float32 row v.
inline void normalize_row(const float* v, const float* w, const float* b, float* out, int64_t d, float eps) {
  Vec acc(0.0f);
  for_each_vec(d, [&](int64_t j, int64_t n) { acc = acc + load(v + j, n); });
  const Vec mean(reduce_sum(acc) / static_cast<float>(d));
  Vec sq(0.0f);
  for_each_vec(d, [&](int64_t j, int64_t n) {
    Vec c = load(v + j, n) - mean;
    if (n < Vec::size()) c = Vec::set(Vec(0.0f), c, n);
    sq = at::vec::fmadd(c, c, sq);
  });
  const Vec rstd(1.0f / std::sqrt(reduce_sum(sq) / static_cast<float>(d) + eps));
  for_each_vec(d, [&](int64_t j, int64_t n) {
    store(at::vec::fmadd((load(v + j, n) - mean) * rstd, load(w + j, n), load(b + j, n)), out + j, n);
  });
}

template <typename T>
void bias_residual_norm(T* y, const T* res, const T* bias, const T* w, const T* b, int64_t rows, int64_t d,
                        float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(5 * d);
    float *v = scratch.data(), *cr = v + d;
    const float* fbias = row_as_float(bias, cr + d, d);
    const float* fw = row_as_float(w, cr + 2 * d, d);
    const float* fb = row_as_float(b, cr + 3 * d, d);
    for (int64_t r = r0; r < r1; ++r) {
      const float* fy = row_as_float(y + r * d, v, d);
      const float* fr = row_as_float(res + r * d, cr, d);
      for_each_vec(d, [&](int64_t j, int64_t n) {
        store(load(fy + j, n) + load(fbias + j, n) + load(fr + j, n), v + j, n);
      });
      float* out = row_out_float(y + r * d, v);
      normalize_row(v, fw, fb, out, d, eps);
      store_row(out, y + r * d, d);
    }
  });
}

template <typename T>
void bias_activation(T* y, const T* bias, int64_t rows, int64_t d, int64_t activation) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * d);
    float* v = scratch.data();
    const float* fbias = row_as_float(bias, v + d, d);
    const Vec half(0.5f), one(1.0f), zero(0.0f), inv_sqrt2(static_cast<float>(M_SQRT1_2)),
        k0(static_cast<float>(M_2_SQRTPI * M_SQRT1_2)), k1(0.044715f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* fy = row_as_float(y + r * d, v, d);
      float* out = row_out_float(y + r * d, v);
      // The branch is per row, outside the vector loop's body for the compiler to hoist.
      auto apply = [&](auto act) {
        for_each_vec(d, [&](int64_t j, int64_t n) { store(act(load(fy + j, n) + load(fbias + j, n)), out + j, n); });
      };
      if (activation == kRelu) {
        apply([&](const Vec& x) { return at::vec::maximum(x, zero); });
      } else if (activation == kGeluTanh) {
        apply([&](const Vec& x) { return half * x * (one + (k0 * at::vec::fmadd(k1 * x * x, x, x)).tanh()); });
      } else {
        apply([&](const Vec& x) { return half * x * (one + (x * inv_sqrt2).erf()); });
      }
      store_row(out, y + r * d, d);
    }
  });
}

template <typename T>
void embed_norm(T* out, const T* word, const T* position, const T* type, const int64_t* ids,
                const int64_t* positions, const int64_t* types, const T* w, const T* b, int64_t rows, int64_t d,
                float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(6 * d);
    float *v = scratch.data(), *cw = v + d, *cp = cw + d, *ct = cp + d;
    const float* fw = row_as_float(w, ct + d, d);
    const float* fb = row_as_float(b, ct + 2 * d, d);
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = row_as_float(word + ids[r] * d, cw, d);
      const float* p = row_as_float(position + positions[r] * d, cp, d);
      const float* t = row_as_float(type + types[r] * d, ct, d);
      for_each_vec(d, [&](int64_t j, int64_t n) { store(load(a + j, n) + load(p + j, n) + load(t + j, n), v + j, n); });
      float* dst = row_out_float(out + r * d, cw);
      normalize_row(v, fw, fb, dst, d, eps);
      store_row(dst, out + r * d, d);
    }
  });
}

template <typename T>
constexpr RowKernelsOf<T> kernels_of() {
  return {&bias_residual_norm<T>, &bias_activation<T>, &embed_norm<T>};
}

}  // namespace
}  // namespace COFI_ISA
}  // namespace cofi::cpu
