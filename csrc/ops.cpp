// The schemas of every compiled cofi operator, in one place. CPU kernels live
// in csrc/cpu/, CUDA kernels in csrc/cuda/; each registers its implementation
// for its dispatch key. Fake (meta) kernels and autograd are registered from
// Python (cofi_kernels/ops/), as extension-cpp does.
//
// Backward ops return an empty tensor for every gradient whose output_mask
// entry is false, so that no optional returns are needed.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import cofi_kernels._C` only has to load this library so that the static
// registrations below run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "cofi_kernels compiled operators (see torch.ops.cofi)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(cofi, m) {
  m.def("gelu_gate_fwd(Tensor x, Tensor bias, Tensor? gate) -> Tensor");
  m.def(
      "gelu_gate_bwd(Tensor grad_out, Tensor x, Tensor bias, Tensor? gate, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_layer_norm_fwd(Tensor x, Tensor residual, Tensor weight, Tensor bias, Tensor? layer_gate,"
      " Tensor? hidden_gate, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_layer_norm_bwd(Tensor grad_out, Tensor x, Tensor residual, Tensor weight,"
      " Tensor bias, Tensor? layer_gate, Tensor? hidden_gate, Tensor mean, Tensor rstd, bool[6] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Serving (forward only): packed tokens, rows of sequence b at cu_seqlens[b] .. cu_seqlens[b+1].
  m.def(
      "varlen_attention(Tensor qkv, Tensor cu_seqlens, int heads, int head_dim, float scale, bool first_only)"
      " -> Tensor");
  m.def(
      "pruned_layer(Tensor h, Tensor cu_seqlens, bool first_only, Tensor? qkv_weight, Tensor? qkv_bias,"
      " Tensor? attn_out_weight, Tensor? attn_out_bias, Tensor? attn_ln_weight, Tensor? attn_ln_bias,"
      " Tensor? ffn_in_weight, Tensor? ffn_in_bias, Tensor? ffn_out_weight, Tensor? ffn_out_bias,"
      " Tensor? ffn_ln_weight, Tensor? ffn_ln_bias, int heads, int head_dim, int activation, float eps) -> Tensor");
  // The pruned layer's row passes on their own, in place on y (a GEMM's output).
  m.def("bias_activation_(Tensor(a!) y, Tensor bias, int activation) -> ()");
  m.def(
      "bias_residual_layer_norm_(Tensor(a!) y, Tensor residual, Tensor bias, Tensor ln_weight, Tensor ln_bias,"
      " float eps) -> ()");
  m.def(
      "packed_embeddings(Tensor ids, Tensor positions, Tensor types, Tensor word, Tensor position_table,"
      " Tensor type_table, Tensor ln_weight, Tensor ln_bias, float eps) -> Tensor");
  // Which build of the serving engine's row passes runs on this CPU: avx512, avx2 or default.
  m.def("serving_cpu_isa() -> str");
}
