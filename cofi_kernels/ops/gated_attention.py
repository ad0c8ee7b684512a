"""``cofi::gated_attention_fwd`` / ``_bwd``: flash-style attention with a per-head gate.

Kernels: :mod:`cofi_kernels.ops.triton.gated_attention`. The forward
saves the log-sum-exp (no T×T matrix reaches global memory) and, when a
backward will follow, the ungated output in float32. The gate gradient of
head h is ``Σ ⟨dOut_h, O_h⟩`` over the ungated output, which cannot be
recovered from the gated output of a head whose gate is 0; and that sum, as
well as ``Delta = rowsum(dO · O)`` of the backward, loses to plain PyTorch's
accuracy when ``O`` is rounded to fp16/bf16 first (sums of B·T·D terms of
both signs; rows with a single live key, where PyTorch's softmax backward is
exactly 0). Per-program
partial sums of it are reduced afterwards in a fixed order (no atomics).
"""

from __future__ import annotations

import math

import torch

from . import reference
from .backends import Inputs, OpSpec, reference_backend, triton_backend
from .triton import support as _triton_support

if _triton_support.INSTALLED:
    # Imported with the package, so the kernels are compiled or interpreted as
    # _triton_support.INTERPRET (read at the same moment) says.
    from .triton import gated_attention as _kernels
else:  # pragma: no cover - torch builds without triton
    _kernels = None

HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.0 / math.log(2.0)


def _blocks(head_dim: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, launch options) for "fwd" and "bwd".

    Small tiles under the interpreter, where each program runs in Python. On
    GPUs the tiles fit the shared memory of sm_80 (163 KB) with the stages
    given; float32 operands are twice as large, so they get smaller tiles.
    """
    if _triton_support.INTERPRET:
        return {"fwd": (16, 16, {}), "bwd": (16, 16, {})}
    warps = 4 if head_dim <= 64 else 8
    if dtype == torch.float32:
        tile = 64 if head_dim <= 64 else 32
        return {"fwd": (tile, tile, {"num_warps": warps, "num_stages": 2}),
                "bwd": (tile, tile, {"num_warps": warps, "num_stages": 2})}
    return {
        "fwd": (128 if head_dim <= 64 else 64, 64, {"num_warps": warps, "num_stages": 3}),
        "bwd": (64, 64, {"num_warps": warps, "num_stages": 2}),
    }


def _precision(dtype: torch.dtype) -> str:
    # float32 must meet the float32 tolerance, so no tf32 for it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mask_bytes(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if key_padding_mask is None:
        return like.new_empty(1, dtype=torch.uint8), False
    return key_padding_mask.contiguous().view(torch.uint8), True


def _require_triton() -> None:
    if _kernels is None:
        raise RuntimeError("gated_attention: the triton backend needs triton, which is not installed")


def _forward_buffers(q, save_ungated):
    """(gated output, float32 ungated output or empty, lse), all contiguous as the kernels write them."""
    B, H, T, D = q.shape
    ungated = q.new_empty((B, H, T, D), dtype=torch.float32) if save_ungated else q.new_empty(0)
    return q.new_empty((B, H, T, D)), ungated, q.new_empty((B, H, T), dtype=torch.float32)


def _grad_buffers(q, k, v):
    """dq, dk, dv: contiguous [B, H, T, D] (not ``empty_like``, which would copy a strided layout)."""
    return tuple(torch.empty(q.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _gate_arg(head_gate: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if head_gate is None:
        return like.new_empty(1), False
    return head_gate.contiguous(), True


@torch.library.custom_op("cofi::gated_attention_fwd", mutates_args=())
def gated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_gate: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    save_ungated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gated output [B,H,T,D], ungated output in float32 or an empty tensor, lse [B,H,T] float32, log2 domain).

    ``save_ungated`` must be True when a backward will follow.
    """
    _require_triton()
    B, H, T, D = q.shape
    out, ungated, lse = _forward_buffers(q, save_ungated)
    if out.numel() == 0:
        return out, ungated, lse
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    mask, has_mask = _mask_bytes(key_padding_mask, q)
    gate, has_gate = _gate_arg(head_gate, q)
    block_m, block_n, opts = _blocks(D, q.dtype)["fwd"]
    grid = (_triton_support.cdiv(T, block_m), B * H)
    with _triton_support.device_guard(q):
        _kernels.gated_attention_fwd_kernel[grid](
            q, k, v, gate, mask, out, ungated if save_ungated else out, lse,
            *_strides(q), *_strides(k), *_strides(v),
            H, T, scale * _LOG2E,
            HAS_GATE=has_gate, HAS_MASK=has_mask, SAVE_UNGATED=save_ungated,
            UPCAST=_triton_support.INTERPRET, PRECISION=_precision(q.dtype),
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, **opts,
        )
    return out, ungated, lse


@gated_attention_fwd.register_fake
def _fwd_fake(q, k, v, head_gate, key_padding_mask, scale, save_ungated):
    return _forward_buffers(q, save_ungated)


@torch.library.custom_op("cofi::gated_attention_bwd", mutates_args=())
def gated_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ungated: torch.Tensor,
    lse: torch.Tensor,
    head_gate: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    gate_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d head_gate or an empty tensor); ``ungated`` and ``lse`` come from the forward."""
    _require_triton()
    B, H, T, D = q.shape
    dq, dk, dv = _grad_buffers(q, k, v)
    if dq.numel() == 0:
        dgate = torch.zeros_like(head_gate) if gate_grad else q.new_empty(0)
        return dq, dk, dv, dgate
    q, k, v, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    mask, has_mask = _mask_bytes(key_padding_mask, q)
    gate, has_gate = _gate_arg(head_gate, q)
    block_m, block_n, opts = _blocks(D, q.dtype)["bwd"]
    n_mblocks = _triton_support.cdiv(T, block_m)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    partial = torch.empty((B, H, n_mblocks), dtype=torch.float32, device=q.device) if gate_grad else delta
    with _triton_support.device_guard(q):
        _kernels.gated_attention_bwd_pre_kernel[(n_mblocks, B * H)](
            grad_out, *_strides(grad_out), ungated.contiguous(), gate, delta, partial, H, T,
            HAS_GATE=has_gate, GATE_GRAD=gate_grad,
            HEAD_DIM=D, BLOCK_M=block_m,
        )
        common = dict(
            HAS_GATE=has_gate, HAS_MASK=has_mask, UPCAST=_triton_support.INTERPRET,
            PRECISION=_precision(q.dtype), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, **opts,
        )
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
        _kernels.gated_attention_bwd_dkdv_kernel[(_triton_support.cdiv(T, block_n), B * H)](
            q, k, v, grad_out, mask, gate, lse, delta, dk, dv, *strides, H, T, scale * _LOG2E, scale, **common,
        )
        _kernels.gated_attention_bwd_dq_kernel[(n_mblocks, B * H)](
            q, k, v, grad_out, mask, gate, lse, delta, dq, *strides, H, T, scale * _LOG2E, scale, **common,
        )
    if gate_grad:
        # Fixed-order reduction of the per-program partials over batch and query blocks.
        dgate = partial.sum(dim=(0, 2)).to(head_gate.dtype)
    else:
        dgate = q.new_empty(0)
    return dq, dk, dv, dgate


@gated_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, ungated, lse, head_gate, key_padding_mask, scale, gate_grad):
    dgate = torch.empty_like(head_gate) if gate_grad else q.new_empty(0)
    return (*_grad_buffers(q, k, v), dgate)


def _setup_context(ctx, inputs, output):
    q, k, v, head_gate, key_padding_mask, scale, save_ungated = inputs
    _, ungated, lse = output
    ctx.mark_non_differentiable(ungated, lse)
    ctx.save_for_backward(q, k, v, ungated, lse, head_gate, key_padding_mask)
    ctx.scale = scale
    ctx.saved_ungated = save_ungated


def _backward(ctx, grad_out, _grad_ungated, _grad_lse):
    q, k, v, ungated, lse, head_gate, key_padding_mask = ctx.saved_tensors
    if not ctx.saved_ungated:
        raise RuntimeError(
            "cofi::gated_attention_fwd ran with save_ungated=False, so it cannot be differentiated; "
            "call cofi_kernels.gated_attention, which sets it when a gradient is needed"
        )
    gate_grad = head_gate is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dgate = gated_attention_bwd(
        grad_out, q, k, v, ungated, lse, head_gate, key_padding_mask, ctx.scale, gate_grad
    )
    return dq, dk, dv, (dgate if gate_grad else None), None, None, None


gated_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_attention_triton(q, k, v, head_gate, key_padding_mask, scale: float) -> torch.Tensor:
    """The ``triton`` backend (inputs checked); saves the float32 ungated output only when a backward can follow."""
    inputs = (q, k, v) if head_gate is None else (q, k, v, head_gate)
    save_ungated = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    out, _, _ = gated_attention_fwd(q, k, v, head_gate, key_padding_mask, float(scale), save_ungated)
    return out


def head_dim_reasons(inputs: Inputs) -> list[str]:
    """A whole head row is one ``tl.arange`` tile (a power of two, at least 16 for ``tl.dot``);
    the tiles of ``_blocks`` fit shared memory up to 128."""
    if inputs.head_dim is None:
        return ["the head size is not given (Inputs.head_dim is None)"]
    if inputs.head_dim not in HEAD_DIMS:
        return [f"head size {inputs.head_dim} not in {', '.join(map(str, HEAD_DIMS))}"]
    return []


SPEC = OpSpec(
    "gated_attention",
    backends=(
        reference_backend(reference.gated_attention),
        triton_backend(gated_attention_triton, arg="q", limits=head_dim_reasons),
    ),
    auto_order=("triton",),
    usual_inputs=lambda device: Inputs(device, torch.float32, head_dim=64),  # BERT-base heads
)
