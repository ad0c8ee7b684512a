// Shared by cofi::varlen_attention and cofi::pruned_layer on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace cofi::cpu {

// cu_seqlens read into a vector, checked: 1-d int64 on the CPU, from 0 to `rows`,
// strictly increasing (no empty sequence). `op` names the caller in errors.
std::vector<int64_t> read_offsets(const at::Tensor& cu_seqlens, int64_t rows, const char* op);

// softmax(q k^T * scale) v for every (sequence, head) of packed qkv rows [rows, 3 * heads * head_dim]
// (q heads, then k heads, then v heads); [rows, heads * head_dim], or [batch, ...] for each
// sequence's first query only with first_only.
at::Tensor varlen_attention_impl(const at::Tensor& qkv, const std::vector<int64_t>& cu, int64_t heads,
                                 int64_t head_dim, double scale, bool first_only);

}  // namespace cofi::cpu
