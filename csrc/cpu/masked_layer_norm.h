// cofi::masked_layer_norm_fwd on the CPU, for the serving layer to call directly (no dispatch):
// LayerNorm(residual + x * layer_gate * hidden_gate) over the kept dims; returns (out, mean, rstd).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace cofi::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate, double eps);

}  // namespace cofi::cpu
