"""Layer 6: serving a pruned model (DESIGN §7).

- :func:`load_for_inference`: a saved :class:`~cofi_kernels.models.pruned_model.PrunedModel`
  in the precision it is served in (fp32, bf16, int8);
- :func:`quantize_int8`: int8 dynamic quantization of the linear layers on the CPU,
  through torch's own quantized ops (``quantized::linear_dynamic``);
- :func:`aligned_copy`: the model padded to aligned hidden and FFN sizes, exactly
  (LayerNorm statistics over the real dims); ``load_for_inference`` applies it on CUDA;
- :class:`GraphedPrunedModel`: CUDA graphs per (batch, length bucket) for small
  batches (``load_for_inference(..., cuda_graphs=True)``).

The fast forward itself (token packing, one compiled call per layer) is
``PrunedModel.forward(..., backend="engine")``, the default in inference.

int8 goes through ``quantized::linear_prepack`` / ``linear_dynamic`` (fbgemm / x86),
whose weights must be ``torch.qint8`` tensors; torch 2.14 warns that creating those
is deprecated, with no replacement for dynamic quantization in torch itself (it
points to torchao). When torch removes them, int8 here must move with it.
"""

from .aligned import aligned_copy
from .cuda_graphs import GraphedPrunedModel
from .precision import PRECISIONS, cpu_bf16_support, int8_sums_saturate, load_for_inference, quantize_int8

__all__ = ["PRECISIONS", "GraphedPrunedModel", "aligned_copy", "cpu_bf16_support", "int8_sums_saturate",
           "load_for_inference", "quantize_int8"]
