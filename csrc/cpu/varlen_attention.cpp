// Attention over packed variable-length sequences on the CPU (forward only).
// Consecutive sequences of one length form a run, viewed in place as
// [run, heads, length, head_dim] (no copy, no padding) and given to ATen's
// fused attention (the flash-attention CPU kernel: blocked GEMMs, float32
// softmax and accumulation, bfloat16 GEMMs on AMX where the CPU has them).
// Many runs (batches of mixed lengths) are spread over the threads, one run
// per task, each task's attention then single-threaded; few runs (a single
// sequence, or a batch of one length) go one after the other, each parallel
// over its (sequence, head, query block) inside ATen.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "varlen_attention.h"
#include "vec_rows.h"

namespace cofi::cpu {
namespace {

constexpr const char* kAttn = "cofi::varlen_attention";

// Consecutive sequences of equal length: [first, first + count) of length len.
struct Run {
  int64_t first, count, len;
};

std::vector<Run> runs_of(const std::vector<int64_t>& cu) {
  std::vector<Run> runs;
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    if (!runs.empty() && runs.back().len == len) {
      ++runs.back().count;
    } else {
      runs.push_back({static_cast<int64_t>(b), 1, len});
    }
  }
  return runs;
}

void attend(const at::Tensor& qkv, const at::Tensor& out, const std::vector<int64_t>& cu, const Run& run,
            int64_t heads, int64_t head_dim, double scale, bool first_only) {
  const at::Tensor rows =
      qkv.narrow(0, cu[run.first], run.count * run.len).view({run.count, run.len, 3, heads, head_dim});
  at::Tensor q = rows.select(2, 0).transpose(1, 2);  // [count, heads, len, head_dim]
  if (first_only) q = q.narrow(2, 0, 1);
  const at::Tensor k = rows.select(2, 1).transpose(1, 2);
  const at::Tensor v = rows.select(2, 2).transpose(1, 2);
  const at::Tensor o = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, scale);
  const int64_t queries = first_only ? 1 : run.len;
  at::Tensor dst = first_only ? out.narrow(0, run.first, run.count) : out.narrow(0, cu[run.first], run.count * run.len);
  dst.view({run.count, queries, heads, head_dim}).copy_(o.transpose(1, 2));
}

}  // namespace

std::vector<int64_t> read_offsets(const at::Tensor& cu_seqlens, int64_t rows, const char* op) {
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 2,
              op, ": cu_seqlens must be a 1-d int64 CPU tensor [batch + 1], got ", cu_seqlens.scalar_type(), " ",
              cu_seqlens.sizes(), " on ", cu_seqlens.device());
  const at::Tensor c = cu_seqlens.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  std::vector<int64_t> cu(p, p + c.numel());
  TORCH_CHECK(cu.front() == 0 && cu.back() == rows, op, ": cu_seqlens must run from 0 to the number of rows ", rows,
              ", got ", cu.front(), " .. ", cu.back());
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    TORCH_CHECK(cu[b + 1] > cu[b], op, ": sequence ", b, " is empty (cu_seqlens must increase strictly)");
  }
  return cu;
}

at::Tensor varlen_attention_impl(const at::Tensor& qkv, const std::vector<int64_t>& cu, int64_t heads,
                                 int64_t head_dim, double scale, bool first_only) {
  const int64_t batch = static_cast<int64_t>(cu.size()) - 1;
  at::Tensor out = at::empty({first_only ? batch : qkv.size(0), heads * head_dim}, qkv.options());
  const std::vector<Run> runs = runs_of(cu);
  const int64_t threads = at::get_num_threads();
  if (static_cast<int64_t>(runs.size()) < 2 * threads) {
    for (const Run& run : runs) attend(qkv, out, cu, run, heads, head_dim, scale, first_only);
    return out;
  }
  // Runs by cost (count * len^2), most costly first, dealt round-robin to the threads: parallel_for
  // hands out contiguous ranges, so it splits the threads' indices, not the runs.
  std::vector<int64_t> order(runs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return runs[a].count * runs[a].len * runs[a].len > runs[b].count * runs[b].len * runs[b].len;
  });
  const int64_t n = static_cast<int64_t>(runs.size());
  // The tasks call ATen ops: they run under the caller's dispatch state (inference mode, grad mode).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = t; i < n; i += threads) attend(qkv, out, cu, runs[order[i]], heads, head_dim, scale, first_only);
    }
  });
  return out;
}

namespace {

void check_attention_args(const char* op, const at::Tensor& qkv, int64_t heads, int64_t head_dim) {
  TORCH_CHECK(qkv.device().is_cpu(), op, ": qkv must be on the CPU, got ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, op,
              ": qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(heads >= 1 && head_dim >= 1, op, ": heads and head_dim must be >= 1, got ", heads, " and ", head_dim);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == 3 * heads * head_dim, op, ": qkv must be [rows, 3 * ", heads, " * ",
              head_dim, "], got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(1) == 1, op, ": qkv's rows must be contiguous");
}

at::Tensor varlen_attention_cpu(const at::Tensor& qkv, const at::Tensor& cu_seqlens, int64_t heads,
                                int64_t head_dim, double scale, bool first_only) {
  check_cpu_capability();
  check_attention_args(kAttn, qkv, heads, head_dim);
  const auto cu = read_offsets(cu_seqlens, qkv.size(0), kAttn);
  return varlen_attention_impl(qkv, cu, heads, head_dim, scale, first_only);
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("varlen_attention", &varlen_attention_cpu); }

}  // namespace cofi::cpu
