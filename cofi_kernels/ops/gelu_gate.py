"""``cofi::gelu_gate_fwd`` / ``_bwd``: GELU_erf(x + bias) * gate over the last dim.

Kernels: csrc/cpu/gelu_gate.cpp, csrc/cuda/gelu_gate.cu. This file holds the
launchers of the backends, registers the fake kernels and the autograd
formula (the backward op recomputes GELU from the saved x instead of saving
activations), and states the op's :class:`~cofi_kernels.ops.backends.OpSpec`.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .backends import OpSpec, compiled_backend, reference_backend

KERNELS = ("gelu_gate_fwd", "gelu_gate_bwd")


def gelu_gate_fwd(x: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The registered op (dispatches on the tensors' device); inputs are assumed checked."""
    return torch.ops.cofi.gelu_gate_fwd(x, bias, gate)


def gelu_gate_cpu(x: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The ``cpu`` backend: the C++ kernel of ``cofi::gelu_gate_fwd`` (inputs checked)."""
    return gelu_gate_fwd(x, bias, gate)


def gelu_gate_cuda(x: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The ``cuda`` backend: the CUDA kernel of ``cofi::gelu_gate_fwd`` (inputs checked)."""
    return gelu_gate_fwd(x, bias, gate)


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


SPEC = OpSpec(
    "gelu_gate",
    backends=(
        reference_backend(reference.gelu_gate),
        compiled_backend("cpu", gelu_gate_cpu, op="gelu_gate", kernels=KERNELS),
        compiled_backend("cuda", gelu_gate_cuda, op="gelu_gate", kernels=KERNELS),
    ),
    auto_order=("cpu", "cuda"),
)
