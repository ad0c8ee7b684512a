"""Fresh random inputs for the row ops, shared by the CPU and CUDA tests."""

from __future__ import annotations

import torch

GATE_KINDS = ("random", "none", "zeros_and_ones", "all_zero")
HIDDEN_KINDS = ("random_with_zeros", "none", "one_kept", "none_kept", "all_ones")


def gate_vector(kind: str, n: int, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(n, device=device) + 0.05
    if kind == "zeros_and_ones":
        return (torch.rand(n, device=device) > 0.4).float()
    if kind == "all_zero":
        return torch.zeros(n, device=device)
    if kind == "all_ones":
        return torch.ones(n, device=device)
    if kind == "random_with_zeros":
        g = torch.rand(n, device=device) + 0.05
        g[torch.rand(n, device=device) < 0.3] = 0.0
        return g
    if kind == "one_kept":
        g = torch.zeros(n, device=device)
        g[torch.randint(n, (1,)).item()] = 0.8
        return g
    if kind == "none_kept":
        return torch.zeros(n, device=device)
    raise ValueError(kind)


def gelu_gate_inputs(shape, gate_kind: str, device="cpu"):
    n = shape[-1]
    x = (torch.randn(shape, device=device) * 2).requires_grad_()
    bias = (torch.randn(n, device=device) * 0.5).requires_grad_()
    gate = gate_vector(gate_kind, n, device)
    if gate is not None:
        gate.requires_grad_()
    return [x, bias, gate]


def masked_layer_norm_inputs(shape, hidden_kind: str, layer_kind: str = "random", device="cpu"):
    d = shape[-1]
    x = torch.randn(shape, device=device).requires_grad_()
    residual = (torch.randn(shape, device=device) * 2 + 0.5).requires_grad_()
    weight = (1 + 0.2 * torch.randn(d, device=device)).requires_grad_()
    bias = (0.2 * torch.randn(d, device=device)).requires_grad_()
    layer_gate = {
        "random": lambda: torch.rand((), device=device) + 0.2,
        "none": lambda: None,
        "zero": lambda: torch.zeros((), device=device),
        "vector1": lambda: torch.rand(1, device=device) + 0.2,
    }[layer_kind]()
    if layer_gate is not None:
        layer_gate.requires_grad_()
    hidden_gate = gate_vector(hidden_kind, d, device)
    if hidden_gate is not None:
        hidden_gate.requires_grad_()
    return [x, residual, weight, bias, layer_gate, hidden_gate]


MLN_NAMES = ["x", "residual", "weight", "bias", "layer_gate", "hidden_gate"]
GELU_NAMES = ["x", "bias", "gate"]
