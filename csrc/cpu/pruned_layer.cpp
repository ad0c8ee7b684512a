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
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

// The weights of one layer (checked by pruned_layer_cpu) and its settings.
struct LayerArgs {
  const std::optional<at::Tensor>&qkv_weight, &qkv_bias, &attn_out_weight, &attn_out_bias, &attn_ln_weight,
      &attn_ln_bias, &ffn_in_weight, &ffn_in_bias, &ffn_out_weight, &ffn_out_bias, &ffn_ln_weight, &ffn_ln_bias;
  int64_t heads, head_dim, activation;
  double eps;
};

void check_layer(const at::Tensor& h, const LayerArgs& a) {
  const int64_t d = h.size(1);
  if (a.attn_out_bias.has_value()) {
    for (const auto& [t, name] : {std::pair{&a.attn_out_bias, "attn_out_bias"}, {&a.attn_ln_weight, "attn_ln_weight"},
                                  {&a.attn_ln_bias, "attn_ln_bias"}}) {
      check_param(*t, name, h, {d});
    }
    if (a.heads > 0) {
      check_param(a.qkv_weight, "qkv_weight", h, {3 * a.heads * a.head_dim, d});
      check_param(a.qkv_bias, "qkv_bias", h, {3 * a.heads * a.head_dim});
      check_param(a.attn_out_weight, "attn_out_weight", h, {d, a.heads * a.head_dim});
    } else {
      TORCH_CHECK(!a.qkv_weight.has_value() && !a.attn_out_weight.has_value(), kLayer,
                  ": heads is 0 but qkv_weight / attn_out_weight are given");
    }
  }
  if (a.ffn_out_bias.has_value()) {
    for (const auto& [t, name] : {std::pair{&a.ffn_out_bias, "ffn_out_bias"}, {&a.ffn_ln_weight, "ffn_ln_weight"},
                                  {&a.ffn_ln_bias, "ffn_ln_bias"}}) {
      check_param(*t, name, h, {d});
    }
    if (a.ffn_in_weight.has_value()) {
      const int64_t width = a.ffn_in_weight->size(0);
      check_param(a.ffn_in_weight, "ffn_in_weight", h, {width, d});
      check_param(a.ffn_in_bias, "ffn_in_bias", h, {width});
      check_param(a.ffn_out_weight, "ffn_out_weight", h, {d, width});
    }
  }
}

// The layer over packed rows x [cu.back(), d] (offsets cu from 0); [batch, d] with first_only.
at::Tensor layer_rows(const at::Tensor& x_in, const std::vector<int64_t>& cu, bool first_only, const LayerArgs& a) {
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  at::Tensor x = x_in;
  auto first_rows = [&](const at::Tensor& t) {
    const at::Tensor firsts = at::tensor(at::ArrayRef<int64_t>(cu.data(), batch), at::kLong);
    return t.index_select(0, firsts);
  };
  bool reduced = false;
  if (a.attn_out_bias.has_value()) {  // the attention sublayer is there
    at::Tensor ctx;
    if (a.heads > 0) {
      const at::Tensor qkv = at::addmm(*a.qkv_bias, x, a.qkv_weight->t());
      ctx = varlen_attention_impl(qkv, cu, a.heads, a.head_dim, 1.0 / std::sqrt(static_cast<double>(a.head_dim)),
                                  first_only);
    }
    const at::Tensor residual = first_only ? first_rows(x) : x;
    x = project_add_norm(ctx, a.attn_out_weight, *a.attn_out_bias, residual, *a.attn_ln_weight, *a.attn_ln_bias,
                         a.eps);
    reduced = first_only;
  }
  if (first_only && !reduced) x = first_rows(x);
  if (a.ffn_out_bias.has_value()) {  // the FFN sublayer is there
    at::Tensor act;
    if (a.ffn_in_weight.has_value()) act = project_activate(x, *a.ffn_in_weight, *a.ffn_in_bias, a.activation);
    x = project_add_norm(act, a.ffn_out_weight, *a.ffn_out_bias, x, *a.ffn_ln_weight, *a.ffn_ln_bias, a.eps);
  }
  return x;
}

// An operand of the layer's GEMMs at a 64-byte-aligned address (CPU allocations are): itself, or a copy.
// MKL's sgemm sums in an order that depends on its operands' alignment (outside its conditional
// numerical reproducibility mode, which torch does not set), so without this a model's output would
// depend on where its weights happen to lie, e.g. differ between a model and its reloaded copy
// (safetensors hands out tensors at 4- or 8-byte offsets). Copying here keeps the result a function of
// the values and the thread count; models loaded through PrunedModel.from_pretrained are aligned already.
std::optional<at::Tensor> aligned(const std::optional<at::Tensor>& t) {
  constexpr uintptr_t kAlignment = 64;
  if (!t.has_value() || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % kAlignment == 0) return t;
  return t->clone(at::MemoryFormat::Contiguous);
}

// Splits the sequences into `parts` contiguous groups of about equal token counts: the
// sequence index where each group starts, then batch. Empty when the split would be uneven
// (a group over 5/4 of an even share: one long sequence among short ones), where one group
// at a time with every thread inside each op does better.
std::vector<int64_t> sequence_groups(const std::vector<int64_t>& cu, int64_t parts) {
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1, rows = cu.back();
  std::vector<int64_t> starts{0};
  for (int64_t g = 1; g < parts; ++g) {
    const int64_t target = rows * g / parts;
    auto b = std::lower_bound(cu.begin(), cu.end(), target) - cu.begin();  // first sequence starting at or after
    if (b > 0 && target - cu[b - 1] < cu[b] - target) --b;                  // or the boundary just before, if nearer
    if (b > starts.back() && b < batch) starts.push_back(b);
  }
  starts.push_back(batch);
  for (size_t g = 0; g + 1 < starts.size(); ++g) {
    if (4 * (cu[starts[g + 1]] - cu[starts[g]]) * parts > 5 * rows) return {};
  }
  return starts.size() > 2 ? starts : std::vector<int64_t>{};
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
  const LayerArgs given{qkv_weight,   qkv_bias,     attn_out_weight, attn_out_bias, attn_ln_weight, attn_ln_bias,
                        ffn_in_weight, ffn_in_bias, ffn_out_weight,  ffn_out_bias,  ffn_ln_weight,  ffn_ln_bias,
                        heads,         head_dim,    activation,      eps};
  check_layer(h, given);
  const auto cu = read_offsets(cu_seqlens, h.size(0), kLayer);
  const std::optional<at::Tensor> w_qkv = aligned(qkv_weight), w_attn_out = aligned(attn_out_weight),
                                  w_ffn_in = aligned(ffn_in_weight), w_ffn_out = aligned(ffn_out_weight);
  const LayerArgs args{w_qkv,    qkv_bias,    w_attn_out, attn_out_bias, attn_ln_weight, attn_ln_bias,
                       w_ffn_in, ffn_in_bias, w_ffn_out,  ffn_out_bias,  ffn_ln_weight,  ffn_ln_bias,
                       heads,    head_dim,    activation, eps};
  const at::Tensor x = *aligned(h.contiguous());
  const int64_t threads = at::get_num_threads();
  const auto starts = threads > 1 && !at::in_parallel_region() ? sequence_groups(cu, threads) : std::vector<int64_t>{};
  if (starts.empty()) return layer_rows(x, cu, first_only, args);
  // Groups of whole sequences, one thread each, every op inside single-threaded: no
  // synchronisation between threads inside the layer (GEMM blocks, row passes), which for a
  // pruned layer's small GEMMs costs more than it shares.
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  at::Tensor out = at::empty({first_only ? static_cast<int64_t>(cu.size()) - 1 : x.size(0), x.size(1)}, x.options());
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t s0 = starts[g], s1 = starts[g + 1], r0 = cu[s0];
      std::vector<int64_t> local(cu.begin() + s0, cu.begin() + s1 + 1);
      for (auto& o : local) o -= r0;
      const at::Tensor y = layer_rows(x.narrow(0, r0, local.back()), local, first_only, args);
      out.narrow(0, first_only ? s0 : r0, y.size(0)).copy_(y);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("pruned_layer", &pruned_layer_cpu);
  m.impl("bias_activation_", &bias_activation_op);
  m.impl("bias_residual_layer_norm_", &bias_residual_layer_norm_op);
}

}  // namespace cofi::cpu
