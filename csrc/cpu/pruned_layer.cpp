// One call per pruned encoder layer on the CPU (DESIGN §7, forward only):
// fused QKV GEMM, varlen attention, output projection + bias + residual +
// LayerNorm, FFN GEMM + bias + activation, GEMM + bias + residual +
// LayerNorm; removed sublayers skipped, 0 heads / 0 units handled, and with
// first_only only each sequence's first row computed from the attention's
// output projection on. GEMMs through ATen (MKL / oneDNN, AMX for bfloat16),
// GELU through ATen's kernel (AVX-512 at run time), residual + LayerNorm
// through cofi's fused row kernel (benchmarks/test_bench_row_ops.py holds it
// against eager's add + layer_norm).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "masked_layer_norm.h"
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

// LayerNorm(residual + x W^T + bias); x may be undefined (a sublayer with no head / unit left).
// The bias rides in the GEMM (addmm's broadcast input); residual + LayerNorm is one pass of
// cofi's masked_layer_norm row kernel (float32 statistics), instead of eager's copy, add and
// layer_norm passes over the rows.
at::Tensor project_add_norm(const at::Tensor& x, const std::optional<at::Tensor>& w, const at::Tensor& bias,
                            const at::Tensor& residual, const at::Tensor& ln_w, const at::Tensor& ln_b, double eps) {
  const at::Tensor y = x.defined() ? at::addmm(bias, x, w->t()) : bias.expand_as(residual).contiguous();
  return std::get<0>(masked_layer_norm_fwd_cpu(y, residual, ln_w, ln_b, std::nullopt, std::nullopt, eps));
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
      act = at::addmm(*ffn_in_bias, x, ffn_in_weight->t());
      if (activation == kRelu) {
        act.relu_();
      } else {
        act = at::gelu(act, activation == kGeluTanh ? "tanh" : "none");
      }
    }
    x = project_add_norm(act, ffn_out_weight, *ffn_out_bias, x, *ffn_ln_weight, *ffn_ln_bias, eps);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("pruned_layer", &pruned_layer_cpu); }

}  // namespace cofi::cpu
