// Argument checks shared by the CPU and CUDA implementations. The Python
// wrappers check the same things first with friendlier messages; these guard
// direct callers of torch.ops.cofi.* and name the offending argument.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <optional>

#include <vector>

namespace cofi {

inline bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The activation tensor that fixes the dtype and device of an op.
inline void check_activation(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension");
  TORCH_CHECK(
      is_supported_float(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
      t.scalar_type());
}

inline void check_same_as(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like,
                          const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              like_name, " has dtype ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", like_name,
              " has shape ", like.sizes());
}

// A per-feature parameter or gate: shape [n], same device as `like`, dtype of
// `like` or float32.
inline void check_feature_vector(const char* op, const at::Tensor& t, const char* name, int64_t n,
                                 const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but x is on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
              " must have dtype ", like.scalar_type(), " (as x) or float32, got ", t.scalar_type());
}

inline void check_scalar_gate(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but x is on ", like.device());
  TORCH_CHECK(t.numel() == 1 && t.dim() <= 1, op, ": ", name, " must be a scalar (shape [] or [1]), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
              " must have dtype ", like.scalar_type(), " (as x) or float32, got ", t.scalar_type());
}

// The arguments of cofi::gelu_gate_fwd / _bwd, for the kernel of `device` (CPU or CUDA).
inline void check_gelu_gate_args(const char* op, const at::Tensor& x, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& gate, c10::DeviceType device) {
  check_activation(op, x, "x");
  TORCH_CHECK(x.device().type() == device, op, ": the ", c10::DeviceTypeName(device), " kernel got x on ",
              x.device());
  const int64_t n = x.size(-1);
  check_feature_vector(op, bias, "bias", n, x);
  if (gate) check_feature_vector(op, *gate, "gate", n, x);
}

// The arguments of cofi::masked_layer_norm_fwd / _bwd, for the kernel of `device` (CPU or CUDA).
inline void check_masked_layer_norm_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                                         const at::Tensor& weight, const at::Tensor& bias,
                                         const std::optional<at::Tensor>& layer_gate,
                                         const std::optional<at::Tensor>& hidden_gate, c10::DeviceType device) {
  check_activation(op, x, "x");
  TORCH_CHECK(x.device().type() == device, op, ": the ", c10::DeviceTypeName(device), " kernel got x on ",
              x.device());
  check_same_as(op, residual, "residual", x, "x");
  const int64_t dims = x.size(-1);
  check_feature_vector(op, weight, "weight", dims, x);
  check_feature_vector(op, bias, "bias", dims, x);
  if (layer_gate) check_scalar_gate(op, *layer_gate, "layer_gate", x);
  if (hidden_gate) check_feature_vector(op, *hidden_gate, "hidden_gate", dims, x);
}

// Float32 contiguous copy (or the tensor itself) of a small parameter.
inline at::Tensor as_float_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A gradient the caller did not ask for.
inline at::Tensor not_requested(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace cofi
