"""``cofi::varlen_attention``: attention over packed variable-length sequences (serving, forward only).

Kernel: csrc/cpu/varlen_attention.cpp (one parallel task per (sequence, head),
ATen GEMMs on strided views of the packed rows, float32 softmax). This file
holds the launchers, the fake kernel and the op's
:class:`~cofi_kernels.ops.backends.OpSpec`. No autograd: the kernel serves
inference; the reference backend differentiates.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .backends import Backend, Inputs, OpSpec, device_reasons, extension_reasons, reference_backend

KERNELS = ("varlen_attention",)

# The serving kernels take float32 and bfloat16 (a CPU has no fast float16 GEMM).
SERVING_DTYPES = (torch.float32, torch.bfloat16)


def varlen_attention_cpu(qkv, cu_seqlens, heads, head_dim, scale, first_only):
    """The ``cpu`` backend: the C++ kernel (inputs checked)."""
    return torch.ops.cofi.varlen_attention(qkv, cu_seqlens, heads, head_dim, scale, first_only)


def _fake(qkv, cu_seqlens, heads, head_dim, scale, first_only):
    rows = cu_seqlens.shape[0] - 1 if first_only else qkv.shape[0]
    return qkv.new_empty(rows, heads * head_dim)


if _extension.available():
    torch.library.register_fake("cofi::varlen_attention")(_fake)


def serving_backend(name: str, launcher, *, op: str, kernels: tuple[str, ...], arg: str) -> Backend:
    """A forward-only compiled CPU backend of the serving ops: float32 / bfloat16 CPU tensors."""

    def unsupported(inputs: Inputs) -> list[str]:
        reasons = device_reasons(name, "cpu", inputs)
        if inputs.dtype not in SERVING_DTYPES:
            reasons.append(f"{arg} is {str(inputs.dtype).removeprefix('torch.')} but the {name} kernel supports "
                           "float32 and bfloat16")
        return reasons

    return Backend(name, launcher, meant_for="cpu", unsupported=unsupported,
                   unavailable=lambda inputs: extension_reasons(op, kernels, "cpu"))


SPEC = OpSpec(
    "varlen_attention",
    backends=(
        reference_backend(reference.varlen_attention),
        serving_backend("cpu", varlen_attention_cpu, op="varlen_attention", kernels=KERNELS, arg="qkv"),
    ),
    auto_order=("cpu",),
)
