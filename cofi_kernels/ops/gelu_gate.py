"""``cofi::gelu_gate_fwd`` / ``_bwd``: GELU_erf(x + bias) * gate over the last dim.

Kernels: csrc/cpu/gelu_gate.cpp, csrc/cuda/gelu_gate.cu. This file registers
the fake kernels and the autograd formula (the backward op recomputes GELU
from the saved x instead of saving activations).
"""

from __future__ import annotations

import torch

from . import _extension
from .backends import OpSpec

SPEC = OpSpec("gelu_gate", compiled=("gelu_gate_fwd", "gelu_gate_bwd"))


def gelu_gate_op(x: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The registered op (dispatches on the tensors' device); inputs are assumed checked."""
    return torch.ops.cofi.gelu_gate_fwd(x, bias, gate)


def _fake(x, bias, gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_out, x, bias, gate, output_mask):
    def grad_like(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty(0)

    return (
        grad_like(x, output_mask[0]),
        grad_like(bias, output_mask[1]),
        grad_like(gate, output_mask[2] and gate is not None),
    )


def _setup_context(ctx, inputs, output):
    x, bias, gate = inputs
    ctx.save_for_backward(x, bias, gate)


def _backward(ctx, grad_out):
    x, bias, gate = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], gate is not None and ctx.needs_input_grad[2]]
    dx, dbias, dgate = torch.ops.cofi.gelu_gate_bwd(grad_out, x, bias, gate, mask)
    return (dx if mask[0] else None, dbias if mask[1] else None, dgate if mask[2] else None)


if _extension.available():
    torch.library.register_fake("cofi::gelu_gate_fwd")(_fake)
    torch.library.register_fake("cofi::gelu_gate_bwd")(_fake_backward)
    torch.library.register_autograd("cofi::gelu_gate_fwd", _backward, setup_context=_setup_context)
