"""``cofi::pruned_layer``: one call that runs a whole pruned encoder layer over packed tokens (serving).

Kernel: csrc/cpu/pruned_layer.cpp (fused QKV GEMM, varlen attention, output
projection + bias + residual + LayerNorm, FFN GEMM + bias + activation, GEMM +
bias + residual + LayerNorm; removed sublayers skipped; no Python between
them). Forward only. This file holds the launchers, the fake kernel and the
op's :class:`~cofi_kernels.ops.backends.OpSpec`; its definition is
:func:`cofi_kernels.ops.reference.pruned_layer`.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .backends import OpSpec, reference_backend
from .varlen_attention import serving_backend

KERNELS = ("pruned_layer",)
ROW_KERNELS = ("bias_activation_", "bias_residual_layer_norm_")

# Activation name → the code the C++ op takes (csrc/cpu/pruned_layer.cpp, enum Activation).
ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

_ATTENTION = ("qkv_weight", "qkv_bias", "out_weight", "out_bias", "ln_weight", "ln_bias")
_FFN = ("in_weight", "in_bias", "out_weight", "out_bias", "ln_weight", "ln_bias")


def pruned_layer_cpu(h, cu_seqlens, first_only, attention, ffn, heads, head_dim, activation, eps):
    """The ``cpu`` backend: the C++ op (inputs checked); arguments as the reference."""
    attention, ffn = attention or {}, ffn or {}
    return torch.ops.cofi.pruned_layer(
        h, cu_seqlens, first_only,
        *(attention.get(k) for k in _ATTENTION),
        *(ffn.get(k) for k in _FFN),
        heads, head_dim, ACTIVATION_CODES[activation], eps,
    )


def _fake(h, cu_seqlens, first_only, *rest):
    rows = cu_seqlens.shape[0] - 1 if first_only else h.shape[0]
    return h.new_empty(rows, h.shape[1])


def bias_activation_(y, bias, activation: str) -> None:
    """The layer's FFN epilogue on its own: ``y ← act(y + bias)`` in place (``y`` a contiguous
    ``[rows, d]`` float32 / bfloat16 CPU tensor); the C++ row pass, for benchmarks and tests."""
    torch.ops.cofi.bias_activation_(y, bias, ACTIVATION_CODES[activation])


def bias_residual_layer_norm_(y, residual, bias, ln_weight, ln_bias, eps: float) -> None:
    """The layer's other epilogue on its own: ``y ← LN(y + bias + residual)`` in place."""
    torch.ops.cofi.bias_residual_layer_norm_(y, residual, bias, ln_weight, ln_bias, eps)


if _extension.available():
    torch.library.register_fake("cofi::pruned_layer")(_fake)
    # In place, nothing returned: the fake kernels only have to accept the arguments.
    torch.library.register_fake("cofi::bias_activation_")(lambda y, bias, activation: None)
    torch.library.register_fake("cofi::bias_residual_layer_norm_")(lambda y, residual, bias, w, b, eps: None)


SPEC = OpSpec(
    "pruned_layer",
    backends=(
        reference_backend(reference.pruned_layer),
        serving_backend("cpu", pruned_layer_cpu, op="pruned_layer", kernels=KERNELS, arg="h"),
    ),
    auto_order=("cpu",),
)
