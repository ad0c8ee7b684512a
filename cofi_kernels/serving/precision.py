"""The precision a pruned model is served in: fp32, bf16 (and fp16 on CUDA), or int8 on the CPU."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ..models.pruned_model import PrunedModel, check_serving_dtype
from .aligned import aligned_copy

__all__ = ["PRECISIONS", "cpu_bf16_support", "int8_sums_saturate", "load_for_inference", "quantize_int8"]

# Precision name → parameter dtype; int8 keeps fp32 activations, embeddings and LayerNorms.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}


def cpu_bf16_support() -> str | None:
    """What makes bfloat16 fast on this CPU (``"AMX"``, ``"AVX512-BF16"``), or None where it has
    neither (bf16 then runs through conversions and is rarely faster than fp32)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def load_for_inference(directory: str | os.PathLike, *, precision: str = "fp32",
                       device: str | torch.device = "cpu", align: bool | None = None,
                       cuda_graphs: bool = False):
    """A saved :class:`PrunedModel` ready to serve in ``precision`` on ``device``.

    ``precision``: ``"fp32"``, ``"bf16"``, ``"fp16"`` (CUDA only) or ``"int8"`` (CPU only:
    :func:`quantize_int8`). ``align``: pad the hidden size and FFN widths to multiples of 8
    (:func:`~cofi_kernels.serving.aligned_copy`, exact; tensor-core GEMMs want aligned
    sizes); None (default) = on CUDA only. The CPU engine runs unpadded models, so
    ``align=True`` on the CPU is refused. ``cuda_graphs``: return a
    :class:`~cofi_kernels.serving.cuda_graphs.GraphedPrunedModel` (CUDA only; one graph per
    (batch, length bucket), for small batches) instead of the model; its ``.model`` is the model.

    On CUDA the weights are read on the CPU in float32, padded there, and moved to the
    device in the target dtype (the unpadded copy never occupies GPU memory).

    Raises ``ValueError`` for an unknown precision or one the device cannot run, for
    ``align=True`` or ``cuda_graphs=True`` on the CPU, and what
    :meth:`PrunedModel.from_pretrained` raises for a bad directory.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU only (torch's quantized linear), got device {device}")
    if align not in (None, True, False):
        raise ValueError(f"align must be None, True or False, got {align!r}")
    if align and device.type == "cpu":
        raise ValueError("align=True pads the model for GPU GEMMs; the CPU engine runs unpadded models "
                         "(use align=None or False on the CPU)")
    if cuda_graphs not in (True, False):
        raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs device='cuda', got device {device}")
    if align is None:
        align = device.type == "cuda"
    if align:
        check_serving_dtype(PRECISIONS[precision], device)
        model = aligned_copy(PrunedModel.from_pretrained(directory, device="cpu", dtype=torch.float32), 8)
        model = model.to(device=device, dtype=PRECISIONS[precision])
    else:
        model = PrunedModel.from_pretrained(directory, device=device, dtype=PRECISIONS[precision])
    if precision == "int8":
        return quantize_int8(model)
    if cuda_graphs:
        from .cuda_graphs import GraphedPrunedModel

        return GraphedPrunedModel(model)
    return model


def _quantized_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` (float32 ``[out, in]``) as a ``torch.qint8`` tensor, symmetric per output channel."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny).double()
    with warnings.catch_warnings():
        # torch 2.14 announces the removal of quantized tensor creation; linear_prepack still takes
        # nothing else (see the note in cofi_kernels/serving/__init__.py).
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        return torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)


@functools.cache
def int8_sums_saturate() -> bool:
    """Whether torch's int8 GEMM (FBGEMM) saturates on this CPU when activations use all 8 bits.

    Without AVX512-VNNI (or AVX-VNNI), FBGEMM multiplies u8 activations by s8 weights with
    ``vpmaddubsw``, which adds pairs of products into 16-bit sums that saturate at 32767
    (255·127·2 = 64770); quantizing the activations to 7 bits (``reduce_range``) keeps every
    pair in range. VNNI instructions sum into 32 bits and need no such loss. Which kernel runs
    depends on the CPU and on ``FBGEMM_ENABLE_INSTRUCTIONS``, so it is measured, once per
    process: a 64-term dot product of full-range values, exactly 63, comes out near 32 where
    the pairs saturate.
    """
    width = 64
    packed = torch.ops.quantized.linear_prepack(_quantized_weight(torch.ones(1, width)), None)
    x = torch.ones(1, width)
    x[0, 0] = 0.0  # the activation range [0, 1]: every other value quantizes to 255
    got = torch.ops.quantized.linear_dynamic(x, packed, False).item()
    return abs(got - (width - 1)) > 1.0


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool):
    """``x ↦ x Wᵀ + b`` with W quantized to int8 per output channel (symmetric), activations
    quantized per call at run time (torch's dynamic quantization, fbgemm / x86 engine), to 7 bits
    with ``reduce_range``."""
    qw = _quantized_weight(weight.detach().float())
    packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.contiguous(), packed, reduce_range)

    return linear


@torch.no_grad()
def quantize_int8(model: PrunedModel, *, reduce_range: bool | None = None) -> PrunedModel:
    """``model`` (fp32, on the CPU) with every encoder and head linear map quantized to int8, in place.

    Weights are quantized once, per output channel; activations per call (dynamic
    quantization), through torch's ``quantized::linear_prepack`` / ``linear_dynamic``
    (no hand-written int8 GEMM). Embeddings, LayerNorms and attention stay fp32. The
    forward then runs the packed-token path of :mod:`cofi_kernels.modules.pruned`
    with these linears. Returns ``model``.

    ``reduce_range``: quantize activations to 7 bits instead of 8. ``None`` (default) chooses
    per CPU: 7 bits where 8 would saturate the GEMM's 16-bit sums (:func:`int8_sums_saturate`:
    x86 CPUs without VNNI), 8 bits elsewhere. The choice is kept as ``model.int8_reduce_range``.
    """
    if not isinstance(model, PrunedModel):
        raise TypeError(f"quantize_int8: model must be a PrunedModel, got {type(model).__name__}")
    if reduce_range not in (None, True, False):
        raise ValueError(f"quantize_int8: reduce_range must be None, True or False, got {reduce_range!r}")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(f"quantize_int8: model must be float32 on the CPU, got {p.dtype} on {p.device}")
    if reduce_range is None:
        reduce_range = int8_sums_saturate()
    for sub in model.linear_sublayers():
        for name in sub.LINEARS:
            weight = getattr(sub, f"{name}_weight", None)
            if weight is not None:
                sub.linear_overrides[name] = _packed_linear(weight, getattr(sub, f"{name}_bias", None), reduce_range)
    model.int8_reduce_range = reduce_range
    return model
