"""``cofi::varlen_attention``: attention over packed variable-length sequences (serving, forward only).

Kernels: csrc/cpu/varlen_attention.cpp (the ``cpu`` backend: one parallel task
per (sequence, head), ATen GEMMs on strided views of the packed rows, float32
softmax) and :mod:`cofi_kernels.ops.triton.varlen_attention` (the ``triton``
backend, meant for CUDA: flash-style, one program per (row block, head), a
launch grid that needs no device-to-host copy, so it runs inside CUDA graphs).
This file holds the launchers, the fake kernel and the op's
:class:`~cofi_kernels.ops.backends.OpSpec`. No autograd: the kernels serve
inference; the reference backend differentiates.

``auto`` on CUDA takes ``triton``. The issue asks for Triton or SDPA "chosen by
measurements"; no GPU has measured this kernel yet (written and tested under
the Triton interpreter only), so that choice is unmeasured:
``benchmarks/test_bench_serving_gpu.py`` (run by ``benchmarks/gpu_check.py``)
times it against the reference and against padded SDPA so a GPU run can settle it.
"""

from __future__ import annotations

import math

import torch

from . import _extension, reference
from .backends import (Backend, Inputs, OpSpec, device_reasons, extension_reasons, reference_backend,
                       triton_backend)
from .triton import support as _triton_support

if _triton_support.INSTALLED:
    # Imported with the package, so the kernels are compiled or interpreted as
    # _triton_support.INTERPRET (read at the same moment) says.
    from .triton import varlen_attention as _kernels
else:  # pragma: no cover - torch builds without triton
    _kernels = None

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


# The Triton kernel keeps a whole head row in one tile (BLOCK_D, a power of two >= 16):
# beyond 256 the tiles no longer fit the registers of one program.
MAX_TRITON_HEAD_DIM = 256


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _triton_blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the two kernels.

    Small tiles under the interpreter (each program runs in Python). Compiled:
    64 x 64 tiles for head sizes up to 64 (the pruned BERT heads), smaller key
    tiles beyond; float32 operands are twice as large, so 32-row query tiles.
    Not tuned on a GPU yet.
    """
    block_d = max(16, _next_pow2(head_dim))
    if _triton_support.INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d, "BLOCK_B": 16, "opts": {}, "first_n": 16}
    block_m = 32 if dtype == torch.float32 else 64
    block_n = 64 if block_d <= 64 else 32
    warps = 4 if block_d <= 64 else 8
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_B": 128,
            "opts": {"num_warps": warps, "num_stages": 2}, "first_n": 64 if block_d <= 64 else 32}


def varlen_attention_triton(qkv, cu_seqlens, heads, head_dim, scale, first_only):
    """The ``triton`` backend (inputs checked by :func:`cofi_kernels.functional.varlen_attention`).

    No device-to-host copy: the grid is ``(ceil(N / BLOCK_M), heads)`` (``(B, heads)`` with
    ``first_only``), so a call can be captured in a CUDA graph. Softmax in float32; float32
    inputs use IEEE float32 products (no tf32), fp16 / bf16 tensor-core products.
    """
    if _kernels is None:
        raise RuntimeError("varlen_attention: the triton backend needs triton, which is not installed")
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    cu = cu_seqlens.contiguous()
    n, batch = qkv.shape[0], cu.shape[0] - 1
    out = qkv.new_empty(batch if first_only else n, heads * head_dim)
    if out.numel() == 0:
        return out
    cfg = _triton_blocks(head_dim, qkv.dtype)
    qk_scale = float(scale) * _LOG2E
    with _triton_support.device_guard(qkv):
        if first_only:
            _kernels.varlen_attention_first_kernel[(batch, heads)](
                qkv, cu, out, heads, qkv.stride(0), out.stride(0), qk_scale,
                HEAD_DIM=head_dim, BLOCK_N=cfg["first_n"], BLOCK_D=cfg["BLOCK_D"], **cfg["opts"],
            )
        else:
            grid = (_triton_support.cdiv(n, cfg["BLOCK_M"]), heads)
            _kernels.varlen_attention_fwd_kernel[grid](
                qkv, cu, out, n, batch, heads, qkv.stride(0), out.stride(0), qk_scale,
                HEAD_DIM=head_dim, UPCAST=_triton_support.INTERPRET,
                PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], BLOCK_B=cfg["BLOCK_B"],
                **cfg["opts"],
            )
    return out


_LOG2E = 1.0 / math.log(2.0)


def triton_head_dim_reasons(inputs: Inputs) -> list[str]:
    """Head sizes 1..:data:`MAX_TRITON_HEAD_DIM` (padded to a power of two inside the kernel);
    an unknown head size (``Inputs.head_dim`` None) states no reason."""
    if inputs.head_dim is not None and not 1 <= inputs.head_dim <= MAX_TRITON_HEAD_DIM:
        return [f"head size {inputs.head_dim} is not in 1..{MAX_TRITON_HEAD_DIM}"]
    return []


SPEC = OpSpec(
    "varlen_attention",
    backends=(
        reference_backend(reference.varlen_attention),
        serving_backend("cpu", varlen_attention_cpu, op="varlen_attention", kernels=KERNELS, arg="qkv"),
        triton_backend(varlen_attention_triton, arg="qkv", limits=triton_head_dim_reasons),
    ),
    # Per device type: cpu -> the C++ kernel; cuda -> Triton (unmeasured against SDPA, see above).
    auto_order=("cpu", "triton"),
    usual_inputs=lambda device: Inputs(device, torch.float32, head_dim=64),
)
