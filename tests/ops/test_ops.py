"""Compiled ops (C++ CPU, CUDA C++) against the reference: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import reference

from tests.cases import GATE_KINDS, GELU_NAMES, MLN_NAMES, gelu_gate_inputs, masked_layer_norm_inputs
from tests.compare import check_against_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def _gelu_kernel(backend):
    return lambda x, b, g: cofi_kernels.gelu_gate(x, b, g, backend=backend)


def _mln_kernel(backend, eps):
    return lambda *a: cofi_kernels.masked_layer_norm(*a, eps=eps, backend=backend)


def _mln_reference(eps):
    return lambda *a: reference.masked_layer_norm(*a, eps=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 96), (2, 3, 757), (1, 137), (5, 1), (3, 8, 40)], ids=str)
@pytest.mark.parametrize("gate_kind", GATE_KINDS)
def test_gelu_gate_matches_reference(device, dtype, shape, gate_kind):
    inputs = gelu_gate_inputs(shape, gate_kind, device)
    grad_out = torch.randn(shape, device=device)
    check_against_reference(
        _gelu_kernel(device), reference.gelu_gate, inputs, dtype, grad_out, reduction_args=(1, 2), names=GELU_NAMES
    )


MLN_CASES = [
    ((6, 64), "random_with_zeros", "random"),
    ((2, 3, 757), "random_with_zeros", "random"),
    ((1, 768), "random_with_zeros", "vector1"),
    ((4, 96), "none", "none"),
    ((4, 96), "none", "random"),
    ((5, 48), "one_kept", "random"),
    ((5, 48), "none_kept", "random"),
    ((5, 48), "none_kept", "zero"),
    ((7, 33), "all_ones", "zero"),
    ((3, 2, 1), "all_ones", "random"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,hidden_kind,layer_kind", MLN_CASES, ids=str)
def test_masked_layer_norm_matches_reference(device, dtype, shape, hidden_kind, layer_kind):
    eps = 1e-5
    inputs = masked_layer_norm_inputs(shape, hidden_kind, layer_kind, device)
    grad_out = torch.randn(shape, device=device)
    check_against_reference(
        _mln_kernel(device, eps), _mln_reference(eps), inputs, dtype, grad_out, reduction_args=(2, 3, 4, 5),
        names=MLN_NAMES,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_masked_layer_norm_float32_params_with_bfloat16_activations(device):
    x, res, w, b, lg, hg = masked_layer_norm_inputs((4, 5, 64), "random_with_zeros", "random", device)
    xb, rb = x.detach().bfloat16().requires_grad_(), res.detach().bfloat16().requires_grad_()
    out = cofi_kernels.masked_layer_norm(xb, rb, w, b, lg, hg, backend=device)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    ref = reference.masked_layer_norm(xb.float(), rb.float(), w, b, lg, hg)
    assert (out.float() - ref).abs().max().item() < 0.05
    assert w.grad.dtype == torch.float32 and lg.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_only_where_asked(device):
    x, b, g = gelu_gate_inputs((4, 32), "random", device)
    b.requires_grad_(False)
    out = cofi_kernels.gelu_gate(x, b, g, backend=device)
    out.sum().backward()
    assert b.grad is None and x.grad is not None and g.grad is not None
    x, res, w, bb, lg, hg = masked_layer_norm_inputs((4, 32), "random_with_zeros", "random", device)
    for t in (x, w, hg):
        t.requires_grad_(False)
    cofi_kernels.masked_layer_norm(x, res, w, bb, lg, hg, backend=device).sum().backward()
    assert res.grad is not None and bb.grad is not None and lg.grad is not None
    assert x.grad is None and w.grad is None and hg.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_pruned_dims_come_out_zero_and_stats_ignore_them(device):
    x, res, w, b, lg, hg = masked_layer_norm_inputs((3, 50), "random_with_zeros", "random", device)
    out = cofi_kernels.masked_layer_norm(x, res, w, b, lg, hg, backend=device).detach()
    dropped = hg.detach() == 0
    assert dropped.any() and (out[:, dropped] == 0).all()
    kept = ~dropped
    y = (res + x * lg * hg)[:, kept].detach()
    ln = torch.nn.functional.layer_norm(y, (int(kept.sum()),), w.detach()[kept], b.detach()[kept], eps=1e-12)
    torch.testing.assert_close(out[:, kept], ln * hg.detach()[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    base = torch.randn(6, 2 * 96, device=device)
    x = base[:, ::2]
    b = torch.randn(96, device=device)
    g = torch.rand(2 * 96, device=device)[::2]
    torch.testing.assert_close(cofi_kernels.gelu_gate(x, b, g, backend=device), reference.gelu_gate(x, b, g))
    res = torch.randn(96, 6, device=device).t()
    w, bb = torch.rand(96, device=device), torch.randn(96, device=device)
    torch.testing.assert_close(
        cofi_kernels.masked_layer_norm(x, res, w, bb, backend=device),
        reference.masked_layer_norm(x, res, w, bb),
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    g = torch.rand(16, device=device, requires_grad=True)
    out = cofi_kernels.gelu_gate(x, b, g, backend=device)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert (b.grad == 0).all() and (g.grad == 0).all()
    w = torch.rand(16, device=device, requires_grad=True)
    out = cofi_kernels.masked_layer_norm(x, x.detach().clone(), w, b, backend=device)
    out.sum().backward()
    assert out.shape == (0, 16) and (w.grad == 0).all()
