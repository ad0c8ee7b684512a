// One call per pruned encoder layer on the CPU (DESIGN §7, forward only):
// fused QKV GEMM, varlen attention, output projection + bias + residual +
// LayerNorm, FFN GEMM + bias + activation, GEMM + bias + residual +
// LayerNorm; removed sublayers skipped, 0 heads / 0 units handled, and with
// first_only only each sequence's first row computed from the attention's
// output projection on. GEMMs through ATen (MKL / oneDNN, AMX for bfloat16)
// without bias; bias + activation and bias + residual + LayerNorm are one row
// pass each, in place on the GEMM's output, from the instruction set's build
// of row_kernels.h (benchmarks/test_bench_row_ops.py times them against eager).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>
#include <optional>

#include "row_kernels.h"
#include "varlen_attention.h"
#include "vec_rows.h"

namespace cofi::cpu {
namespace {

constexpr const char* kLayer = "cofi::pruned_layer";

// A parameter of op: defined, on the CPU, of the dtype of `like` (named like_name) and of the given shape.
void check_param(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& like,
                 std::initializer_list<int64_t> shape, const char* op = kLayer, const char* like_name = "h") {
  TORCH_CHECK(t.has_value(), op, ": ", name, " is required here");
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == like.scalar_type(), op, ": ", name, " must be a ",
              like.scalar_type(), " CPU tensor (as ", like_name, "), got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t->sizes());
}

template <typename Fn>
void for_dtype(const at::Tensor& t, const Fn& fn) {
  if (t.scalar_type() == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

// y <- LayerNorm(y + bias + residual) in place (y contiguous, of residual's shape and dtype).
void bias_residual_norm_inplace(at::Tensor& y, const at::Tensor& residual, const at::Tensor& bias,
                                const at::Tensor& ln_w, const at::Tensor& ln_b, double eps) {
  const at::Tensor res = residual.contiguous(), bc = bias.contiguous(), wc = ln_w.contiguous(), bb = ln_b.contiguous();
  for_dtype(y, [&](auto tag) {
    using T = decltype(tag);
    row_kernels().of<T>().bias_residual_norm(y.data_ptr<T>(), res.const_data_ptr<T>(), bc.const_data_ptr<T>(),
                                             wc.const_data_ptr<T>(), bb.const_data_ptr<T>(), y.size(0), y.size(1),
                                             static_cast<float>(eps));
  });
}

// y <- act(y + bias) in place (y contiguous).
void bias_activation_inplace(at::Tensor& y, const at::Tensor& bias, int64_t activation) {
  const at::Tensor bc = bias.contiguous();
  for_dtype(y, [&](auto tag) {
    using T = decltype(tag);
    row_kernels().of<T>().bias_activation(y.data_ptr<T>(), bc.const_data_ptr<T>(), y.size(0), y.size(1), activation);
  });
}

// LayerNorm(residual + x W^T + bias); x may be undefined (a sublayer with no head / unit left).
at::Tensor project_add_norm(const at::Tensor& x, const std::optional<at::Tensor>& w, const at::Tensor& bias,
                            const at::Tensor& residual, const at::Tensor& ln_w, const at::Tensor& ln_b, double eps) {
  at::Tensor y = x.defined() ? at::mm(x, w->t()) : at::zeros_like(residual);
  bias_residual_norm_inplace(y, residual, bias, ln_w, ln_b, eps);
  return y;
}

// act(x W^T + bias) for the FFN's first GEMM.
at::Tensor project_activate(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, int64_t activation) {
  at::Tensor y = at::mm(x, w.t());
  bias_activation_inplace(y, bias, activation);
  return y;
}

// The epilogues as ops of their own (cofi::bias_activation_, cofi::bias_residual_layer_norm_), for
// the per-pass benchmarks against eager: y must be a contiguous 2-d CPU tensor, the rest y's dtype.
void check_rows(const at::Tensor& y, const char* op) {
  TORCH_CHECK(y.device().is_cpu() && y.dim() == 2 && y.is_contiguous(), op,
              ": y must be a contiguous 2-d CPU tensor, got shape ", y.sizes(), " on ", y.device());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, op,
              ": y must be float32 or bfloat16, got ", y.scalar_type());
}

void bias_activation_op(at::Tensor y, const at::Tensor& bias, int64_t activation) {
  constexpr const char* op = "cofi::bias_activation_";
  check_rows(y, op);
  check_param(bias, "bias", y, {y.size(1)}, op, "y");
  TORCH_CHECK(activation >= kGeluErf && activation <= kRelu, op, ": unknown activation code ", activation);
  bias_activation_inplace(y, bias, activation);
}

void bias_residual_layer_norm_op(at::Tensor y, const at::Tensor& residual, const at::Tensor& bias,
                                 const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  constexpr const char* op = "cofi::bias_residual_layer_norm_";
  check_rows(y, op);
  check_param(residual, "residual", y, {y.size(0), y.size(1)}, op, "y");
  check_param(bias, "bias", y, {y.size(1)}, op, "y");
  check_param(ln_weight, "ln_weight", y, {y.size(1)}, op, "y");
  check_param(ln_bias, "ln_bias", y, {y.size(1)}, op, "y");
  bias_residual_norm_inplace(y, residual, bias, ln_weight, ln_bias, eps);
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

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("pruned_layer", &pruned_layer_cpu);
  m.impl("bias_activation_", &bias_activation_op);
  m.impl("bias_residual_layer_norm_", &bias_residual_layer_norm_op);
}

}  // namespace cofi::cpu
