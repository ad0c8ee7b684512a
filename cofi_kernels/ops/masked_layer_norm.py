"""``cofi::masked_layer_norm_fwd`` / ``_bwd``: gated residual LayerNorm over the kept hidden dims.

Kernels: csrc/cpu/masked_layer_norm.cpp, csrc/cuda/masked_layer_norm.cu. The
forward op returns (out, mean, rstd); mean and rstd (float32, one per row) are
saved for the backward op, which recomputes the pre-norm sum from x and
residual instead of saving it. This file holds the launchers, the fake
kernels, the autograd formula and the op's :class:`~cofi_kernels.ops.backends.OpSpec`.
"""

from __future__ import annotations

import torch

from . import _extension, reference
from .backends import OpSpec, compiled_backend, reference_backend

KERNELS = ("masked_layer_norm_fwd", "masked_layer_norm_bwd")


def _forward_out(x, residual, weight, bias, layer_gate, hidden_gate, eps) -> torch.Tensor:
    out, _, _ = torch.ops.cofi.masked_layer_norm_fwd(x, residual, weight, bias, layer_gate, hidden_gate, float(eps))
    return out


def masked_layer_norm_cpu(x, residual, weight, bias, layer_gate, hidden_gate, eps) -> torch.Tensor:
    """The ``cpu`` backend: the C++ kernel of ``cofi::masked_layer_norm_fwd`` (inputs checked); the output only."""
    return _forward_out(x, residual, weight, bias, layer_gate, hidden_gate, eps)


def masked_layer_norm_cuda(x, residual, weight, bias, layer_gate, hidden_gate, eps) -> torch.Tensor:
    """The ``cuda`` backend: the CUDA kernel of ``cofi::masked_layer_norm_fwd`` (inputs checked); the output only."""
    return _forward_out(x, residual, weight, bias, layer_gate, hidden_gate, eps)


def _fake(x, residual, weight, bias, layer_gate, hidden_gate, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, residual, weight, bias, layer_gate, hidden_gate, mean, rstd, output_mask):
    def grad_like(t, wanted):
        wanted = wanted and t is not None
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty(0)

    return (
        grad_like(x, output_mask[0]),
        grad_like(residual, output_mask[1]),
        grad_like(weight, output_mask[2]),
        grad_like(bias, output_mask[3]),
        grad_like(layer_gate, output_mask[4]),
        grad_like(hidden_gate, output_mask[5]),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, layer_gate, hidden_gate, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, residual, weight, bias, layer_gate, hidden_gate, mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, residual, weight, bias, layer_gate, hidden_gate, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3], layer_gate is not None and need[4],
            hidden_gate is not None and need[5]]
    grads = torch.ops.cofi.masked_layer_norm_bwd(
        grad_out, x, residual, weight, bias, layer_gate, hidden_gate, mean, rstd, mask
    )
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,)


if _extension.available():
    torch.library.register_fake("cofi::masked_layer_norm_fwd")(_fake)
    torch.library.register_fake("cofi::masked_layer_norm_bwd")(_fake_backward)
    torch.library.register_autograd("cofi::masked_layer_norm_fwd", _backward, setup_context=_setup_context)


SPEC = OpSpec(
    "masked_layer_norm",
    backends=(
        reference_backend(reference.masked_layer_norm),
        compiled_backend("cpu", masked_layer_norm_cpu, op="masked_layer_norm", kernels=KERNELS),
        compiled_backend("cuda", masked_layer_norm_cuda, op="masked_layer_norm", kernels=KERNELS),
    ),
    auto_order=("cpu", "cuda"),
)
