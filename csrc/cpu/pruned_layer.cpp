// One call per pruned encoder layer on the CPU (DESIGN §7, forward only):
// fused QKV GEMM, varlen attention, output projection + bias + residual +
// LayerNorm, FFN GEMM + bias + activation, GEMM + bias + residual +
// LayerNorm; removed sublayers skipped, 0 heads / 0 units handled, and with
// first_only only each sequence's first row computed from the attention's
// output projection on. GEMMs through ATen (MKL / oneDNN, AMX for bfloat16)
// without bias; bias + activation and bias + residual + LayerNorm are one row
// pass each, in place on the GEMM's output (the end-to-end serving benchmark
// measures the layer against eager's composition).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>
#include <optional>

#include "varlen_attention.h"
#include "vec_rows.h"

namespace cofi::cpu {
namespace {

constexpr const char* kLayer = "cofi::pruned_layer";

// Activation codes of cofi::pruned_layer (cofi_kernels/ops/pruned_layer.py holds the names).
enum Activation : int64_t { kGeluErf = 0, kGeluTanh = 1, kRelu = 2 };

// A parameter of the layer: defined, on the CPU, of h's dtype and of the given shape.
void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& h,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.has_value(), kLayer, ": ", name, " is required here");
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == h.scalar_type(), kLayer, ": ", name, " must be a ",
              h.scalar_type(), " CPU tensor (as h), got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), kLayer, ": ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t->sizes());
}

// The GEMM epilogues, one pass over the rows each, in place on the GEMM's output, float32
// arithmetic (at::vec: AVX2 in this build); they replace addmm's broadcast copy of the bias
// and eager's separate add / layer_norm / gelu passes.

// y <- LayerNorm(y + bias + residual) * w + b over each row.
template <typename T>
void bias_residual_norm_(T* y, const T* res, const T* bias, const T* w, const T* b, int64_t rows, int64_t d,
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
      Vec acc(0.0f);
      for_each_vec(d, [&](int64_t j, int64_t n) {
        const Vec x = load(fy + j, n) + load(fbias + j, n) + load(fr + j, n);
        store(x, v + j, n);
        acc = acc + x;
      });
      const Vec mean(reduce_sum(acc) / static_cast<float>(d));
      Vec sq(0.0f);
      for_each_vec(d, [&](int64_t j, int64_t n) {
        Vec c = load(v + j, n) - mean;
        if (n < Vec::size()) c = Vec::set(Vec(0.0f), c, n);
        sq = at::vec::fmadd(c, c, sq);
      });
      const Vec rstd(1.0f / std::sqrt(reduce_sum(sq) / static_cast<float>(d) + eps));
      float* out = row_out_float(y + r * d, v);
      for_each_vec(d, [&](int64_t j, int64_t n) {
        store(at::vec::fmadd((load(v + j, n) - mean) * rstd, load(fw + j, n), load(fb + j, n)), out + j, n);
      });
      store_row(out, y + r * d, d);
    }
  });
}

// y <- act(y + bias) over each row.
template <typename T>
void bias_activation_(T* y, const T* bias, int64_t rows, int64_t d, int64_t activation) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * d);
    float* v = scratch.data();
    const float* fbias = row_as_float(bias, v + d, d);
    const Vec half(0.5f), one(1.0f), zero(0.0f), inv_sqrt2(static_cast<float>(M_SQRT1_2)),
        k0(static_cast<float>(M_2_SQRTPI * M_SQRT1_2)), k1(0.044715f);
    for (int64_t r = r0; r < r1; ++r) {
      const float* fy = row_as_float(y + r * d, v, d);
      float* out = row_out_float(y + r * d, v);
      for_each_vec(d, [&](int64_t j, int64_t n) {
        const Vec x = load(fy + j, n) + load(fbias + j, n);
        Vec a;
        if (activation == kRelu) {
          a = at::vec::maximum(x, zero);
        } else if (activation == kGeluTanh) {
          a = half * x * (one + (k0 * at::vec::fmadd(k1 * x * x, x, x)).tanh());
        } else {
          a = half * x * (one + (x * inv_sqrt2).erf());
        }
        store(a, out + j, n);
      });
      store_row(out, y + r * d, d);
    }
  });
}

template <typename Fn>
void for_dtype(const at::Tensor& t, const Fn& fn) {
  if (t.scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

// LayerNorm(residual + x W^T + bias); x may be undefined (a sublayer with no head / unit left).
at::Tensor project_add_norm(const at::Tensor& x, const std::optional<at::Tensor>& w, const at::Tensor& bias,
                            const at::Tensor& residual, const at::Tensor& ln_w, const at::Tensor& ln_b, double eps) {
  at::Tensor y = x.defined() ? at::mm(x, w->t()) : at::zeros_like(residual);
  const at::Tensor res = residual.contiguous(), bc = bias.contiguous(), wc = ln_w.contiguous(), bb = ln_b.contiguous();
  for_dtype(y, [&](auto tag) {
    using T = decltype(tag);
    bias_residual_norm_<T>(y.data_ptr<T>(), res.const_data_ptr<T>(), bc.const_data_ptr<T>(), wc.const_data_ptr<T>(),
                           bb.const_data_ptr<T>(), y.size(0), y.size(1), static_cast<float>(eps));
  });
  return y;
}

// act(x W^T + bias) for the FFN's first GEMM.
at::Tensor project_activate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t activation) {
  at::Tensor y = at::mm(x, w.t());
  const at::Tensor bc = bias.contiguous();
  for_dtype(y, [&](auto tag) {
    using T = decltype(tag);
    bias_activation_<T>(y.data_ptr<T>(), bc.const_data_ptr<T>(), y.size(0), y.size(1), activation);
  });
  return y;
}

at::Tensor pruned_layer_cpu(const at::Tensor& h, const at::Tensor& cu_seqlens, bool first_only,
                            const std::optional<at::Tensor>& qkv_weight, const std::optional<at::Tensor>& qkv_bias,
                            const std::optional<at::Tensor>& attn_out_weight,
                            const std::optional<at::Tensor>& attn_out_bias,
                            const std::optional<at::Tensor>& attn_ln_weight,
                            const std::optional<at::Tensor>& attn_ln_bias,
                            const std::optional<at::Tensor>& ffn_in_weight, const std::optional<at::Tensor>& ffn_in_bias,
                            const std::optional<at::Tensor>& ffn_out_weight,
                            const std::optional<at::Tensor>& ffn_out_bias,
                            const std::optional<at::Tensor>& ffn_ln_weight,
                            const std::optional<at::Tensor>& ffn_ln_bias, int64_t heads, int64_t head_dim,
                            int64_t activation, double eps) {
  check_cpu_capability();
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 2, kLayer, ": h must be a 2-d CPU tensor [rows, d], got ",
              h.sizes(), " on ", h.device());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16, kLayer,
              ": h must be float32 or bfloat16, got ", h.scalar_type());
  TORCH_CHECK(activation >= kGeluErf && activation <= kRelu, kLayer, ": unknown activation code ", activation);
  const int64_t d = h.size(1);
  const auto cu = read_offsets(cu_seqlens, h.size(0), kLayer);
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  at::Tensor x = h.contiguous();
  at::Tensor firsts;  // rows of each sequence's first token, once needed
  auto first_rows = [&](const at::Tensor& t) {
    if (!firsts.defined()) firsts = cu_seqlens.narrow(0, 0, batch).contiguous();
    return t.index_select(0, firsts);
  };
  bool reduced = false;
  if (attn_out_bias.has_value()) {  // the attention sublayer is there
    check_param(attn_out_bias, "attn_out_bias", h, {d});
    check_param(attn_ln_weight, "attn_ln_weight", h, {d});
    check_param(attn_ln_bias, "attn_ln_bias", h, {d});
    at::Tensor ctx;
    if (heads > 0) {
      check_param(qkv_weight, "qkv_weight", h, {3 * heads * head_dim, d});
      check_param(qkv_bias, "qkv_bias", h, {3 * heads * head_dim});
      check_param(attn_out_weight, "attn_out_weight", h, {d, heads * head_dim});
      const at::Tensor qkv = at::addmm(*qkv_bias, x, qkv_weight->t());
      ctx = varlen_attention_impl(qkv, cu, heads, head_dim, 1.0 / std::sqrt(static_cast<double>(head_dim)),
                                  first_only);
    } else {
      TORCH_CHECK(!qkv_weight.has_value() && !attn_out_weight.has_value(), kLayer,
                  ": heads is 0 but qkv_weight / attn_out_weight are given");
    }
    const at::Tensor residual = first_only ? first_rows(x) : x;
    x = project_add_norm(ctx, attn_out_weight, *attn_out_bias, residual, *attn_ln_weight, *attn_ln_bias, eps);
    reduced = first_only;
  }
  if (first_only && !reduced) x = first_rows(x);
  if (ffn_out_bias.has_value()) {  // the FFN sublayer is there
    check_param(ffn_out_bias, "ffn_out_bias", h, {d});
    check_param(ffn_ln_weight, "ffn_ln_weight", h, {d});
    check_param(ffn_ln_bias, "ffn_ln_bias", h, {d});
    at::Tensor act;
    if (ffn_in_weight.has_value()) {
      const int64_t width = ffn_in_weight->size(0);
      check_param(ffn_in_weight, "ffn_in_weight", h, {width, d});
      check_param(ffn_in_bias, "ffn_in_bias", h, {width});
      check_param(ffn_out_weight, "ffn_out_weight", h, {d, width});
      act = project_activate(x, *ffn_in_weight, *ffn_in_bias, activation);
    }
    x = project_add_norm(act, ffn_out_weight, *ffn_out_bias, x, *ffn_ln_weight, *ffn_ln_bias, eps);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("pruned_layer", &pruned_layer_cpu); }

}  // namespace cofi::cpu
