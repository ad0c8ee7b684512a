// The embedding layer of a pruned model over packed tokens on the CPU
// (serving, forward only): for each real token r,
//   out[r] = LayerNorm(word[ids[r]] + position[positions[r]] + type[types[r]]) * w + b,
// one row pass (row_kernels.h) instead of eager's three gathers, two adds and a
// LayerNorm, each a pass over [N, d] of its own.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "row_kernels.h"

namespace cofi::cpu {
namespace {

constexpr const char* kEmbed = "cofi::packed_embeddings";

// A 1-d int64 CPU tensor of `rows` indices, each in [0, limit).
at::Tensor checked_indices(const at::Tensor& t, const char* name, int64_t rows, const char* table, int64_t limit) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == rows, kEmbed,
              ": ", name, " must be a 1-d int64 CPU tensor of ", rows, " indices (as ids), got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
  at::Tensor c = t.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(p[r] >= 0 && p[r] < limit, kEmbed, ": ", name, "[", r, "] = ", p[r], " is outside ", table,
                "'s ", limit, " rows");
  }
  return c;
}

at::Tensor checked_table(const at::Tensor& t, const char* name, const at::Tensor& word) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == word.scalar_type() && t.dim() == 2 &&
                  t.size(1) == word.size(1),
              kEmbed, ": ", name, " must be a 2-d ", word.scalar_type(), " CPU tensor [rows, ", word.size(1),
              "] (as word), got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

at::Tensor packed_embeddings_cpu(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& types,
                                 const at::Tensor& word, const at::Tensor& position_table,
                                 const at::Tensor& type_table, const at::Tensor& ln_weight,
                                 const at::Tensor& ln_bias, double eps) {
  TORCH_CHECK(word.device().is_cpu() && word.dim() == 2, kEmbed, ": word must be a 2-d CPU tensor [vocab, d], got ",
              word.sizes(), " on ", word.device());
  TORCH_CHECK(word.scalar_type() == at::kFloat || word.scalar_type() == at::kBFloat16, kEmbed,
              ": word must be float32 or bfloat16, got ", word.scalar_type());
  const int64_t d = word.size(1);
  TORCH_CHECK(ids.dim() == 1, kEmbed, ": ids must be 1-d [tokens], got shape ", ids.sizes());
  const int64_t rows = ids.size(0);
  const at::Tensor w = word.contiguous(), p = checked_table(position_table, "position_table", word),
                   t = checked_table(type_table, "type_table", word);
  const at::Tensor lw = checked_table(ln_weight.unsqueeze(0), "ln_weight", word),
                   lb = checked_table(ln_bias.unsqueeze(0), "ln_bias", word);
  TORCH_CHECK(lw.size(0) == 1 && lb.size(0) == 1, kEmbed, ": ln_weight and ln_bias must have shape [", d, "]");
  const at::Tensor i = checked_indices(ids, "ids", rows, "word", w.size(0)),
                   pi = checked_indices(positions, "positions", rows, "position_table", p.size(0)),
                   ti = checked_indices(types, "types", rows, "type_table", t.size(0));
  at::Tensor out = at::empty({rows, d}, word.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    row_kernels().of<T>().embed_norm(out.data_ptr<T>(), w.const_data_ptr<T>(), p.const_data_ptr<T>(),
                                     t.const_data_ptr<T>(), i.const_data_ptr<int64_t>(), pi.const_data_ptr<int64_t>(),
                                     ti.const_data_ptr<int64_t>(), lw.const_data_ptr<T>(), lb.const_data_ptr<T>(),
                                     rows, d, static_cast<float>(eps));
  };
  if (word.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(c10::BFloat16{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cofi, CPU, m) { m.impl("packed_embeddings", &packed_embeddings_cpu); }

}  // namespace cofi::cpu
