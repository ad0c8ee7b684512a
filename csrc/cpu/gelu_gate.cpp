// gelu_gate on the CPU: out = GELU_erf(x + bias) * gate, one pass forward,
// one pass backward (GELU recomputed from x), float32 arithmetic.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../op_checks.h"
#include "vec_rows.h"

namespace cofi::cpu {
namespace {

// Error messages name the registered op that was called.
constexpr const char* kFwd = "cofi::gelu_gate_fwd";
constexpr const char* kBwd = "cofi::gelu_gate_bwd";

// Phi(v) and phi(v) of the standard normal, sharing one exp: erf by
// Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), whose exp(-x^2) at
// x = v/sqrt(2) is exactly the exp(-v^2/2) of the density.
struct NormalParts {
  Vec cdf, pdf;
};

inline NormalParts normal_parts(const Vec& v) {
  const Vec one(1.0f);
  const Vec ax = v.abs() * Vec(static_cast<float>(M_SQRT1_2));
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), ax, one);
  Vec poly = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  const Vec e = (v * v * Vec(-0.5f)).exp();
  const Vec half_erfc_abs = Vec(0.5f) * poly * t * e;  // (1 - erf(|x|)) / 2
  const Vec cdf = Vec::blendv(one - half_erfc_abs, half_erfc_abs, v < Vec(0.0f));
  return {cdf, e * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2))};
}

inline Vec gelu(const Vec& v) { return v * normal_parts(v).cdf; }

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& bias, const std::optional<at::Tensor>& gate) {
  check_cpu_capability();
  check_gelu_gate_args(op, x, bias, gate, c10::DeviceType::CPU);
}

template <typename T>
void forward_rows(const T* x, const float* bias, const float* gate, T* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    std::vector<float> in_buf(cols), out_buf(cols);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = row_as_float(x + r * cols, in_buf.data(), cols);
      float* o = row_out_float(out + r * cols, out_buf.data());
      for_each_vec(cols, [&](int64_t j, int64_t count) {
        Vec h = gelu(load(xr + j, count) + load(bias + j, count));
        if (gate) h = h * load(gate + j, count);
        store(h, o + j, count);
      });
      store_row(o, out + r * cols, cols);
    }
  });
}

// Column sums go to per-chunk partials [chunks, 2, cols] (bias, gate), summed
// in a fixed order afterwards.
template <typename T>
void backward_rows(const T* grad, const T* x, const float* bias, const float* gate, T* dx, float* partials,
                   bool want_dx, bool want_dbias, bool want_dgate, int64_t rows, int64_t cols) {
  const int64_t chunks = reduction_chunks(rows);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> g_buf(cols), x_buf(cols), dx_buf(cols);
    for (int64_t c = c0; c < c1; ++c) {
      float* acc_bias = partials + c * 2 * cols;
      float* acc_gate = acc_bias + cols;
      const int64_t r_begin = rows * c / chunks, r_end = rows * (c + 1) / chunks;
      for (int64_t r = r_begin; r < r_end; ++r) {
        const float* gr = row_as_float(grad + r * cols, g_buf.data(), cols);
        const float* xr = row_as_float(x + r * cols, x_buf.data(), cols);
        float* d = want_dx ? row_out_float(dx + r * cols, dx_buf.data()) : dx_buf.data();
        for_each_vec(cols, [&](int64_t j, int64_t count) {
          const Vec v = load(xr + j, count) + load(bias + j, count);
          const Vec g = load(gr + j, count);
          const NormalParts n = normal_parts(v);
          if (want_dgate) store(load(acc_gate + j, count) + g * v * n.cdf, acc_gate + j, count);
          if (!want_dx && !want_dbias) return;
          const Vec gg = gate ? g * load(gate + j, count) : g;
          const Vec dv = gg * at::vec::fmadd(v, n.pdf, n.cdf);  // GELU' = Phi + v * phi
          if (want_dbias) store(load(acc_bias + j, count) + dv, acc_bias + j, count);
          if (want_dx) store(dv, d + j, count);
        });
        if (want_dx) store_row(d, dx + r * cols, cols);
      }
    }
  });
}

at::Tensor gelu_gate_fwd_cpu(const at::Tensor& x_in, const at::Tensor& bias, const std::optional<at::Tensor>& gate) {
  check_inputs(kFwd, x_in, bias, gate);
  const at::Tensor x = x_in.contiguous();
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const at::Tensor bias_f = as_float_vector(bias);
  const at::Tensor gate_f = gate ? as_float_vector(*gate) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_gate_fwd_cpu", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), bias_f.const_data_ptr<float>(),
                           gate ? gate_f.const_data_ptr<float>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                           rows, cols);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_gate_bwd_cpu(const at::Tensor& grad_in,
                                                                 const at::Tensor& x_in,
                                                                 const at::Tensor& bias,
                                                                 const std::optional<at::Tensor>& gate,
                                                                 std::array<bool, 3> mask) {
  check_inputs(kBwd, x_in, bias, gate);
  check_same_as(kBwd, grad_in, "grad_out", x_in, "x");
  const bool want_dx = mask[0], want_dbias = mask[1], want_dgate = mask[2] && gate.has_value();
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor dx = want_dx ? at::empty_like(x) : not_requested(x);
  const at::Tensor partials = at::zeros({reduction_chunks(rows), 2, cols}, x.options().dtype(at::kFloat));
  if (x.numel() > 0 && (want_dx || want_dbias || want_dgate)) {
    const at::Tensor bias_f = as_float_vector(bias);
    const at::Tensor gate_f = gate ? as_float_vector(*gate) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gelu_gate_bwd_cpu", [&] {
      backward_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              bias_f.const_data_ptr<float>(), gate ? gate_f.const_data_ptr<float>() : nullptr,
                              want_dx ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                              partials.mutable_data_ptr<float>(), want_dx, want_dbias, want_dgate, rows, cols);
    });
  }
  const int64_t chunks = partials.size(0);
  at::Tensor dbias =
      want_dbias ? sum_chunk_partials(partials, chunks, 2 * cols, 0, cols, bias.scalar_type()) : not_requested(x);
  at::Tensor dgate =
      want_dgate ? sum_chunk_partials(partials, chunks, 2 * cols, cols, cols, gate->scalar_type()) : not_requested(x);
  return {dx, dbias, dgate};
}

}  // namespace
}  // namespace cofi::cpu

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("gelu_gate_fwd", &cofi::cpu::gelu_gate_fwd_cpu);
  m.impl("gelu_gate_bwd", &cofi::cpu::gelu_gate_bwd_cpu);
}
