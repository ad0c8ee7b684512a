"""The cofi ops as torch.library ops: opcheck (schema, fake kernels, autograd
registration) and torch.compile(fullgraph=True) through both ops."""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import reference

from tests.cases import gelu_gate_inputs, masked_layer_norm_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate_kind", ["random", "none"])
def test_opcheck_gelu_gate(device, gate_kind):
    x, b, g = gelu_gate_inputs((3, 5, 24), gate_kind, device)
    torch.library.opcheck(torch.ops.cofi.gelu_gate_fwd.default, (x, b, g))
    grad = torch.randn_like(x)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.cofi.gelu_gate_bwd.default, (grad, x.detach(), b.detach(),
                                                                     None if g is None else g.detach(), mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden_kind,layer_kind", [("random_with_zeros", "random"), ("none", "none")])
def test_opcheck_masked_layer_norm(device, hidden_kind, layer_kind):
    args = masked_layer_norm_inputs((2, 7, 40), hidden_kind, layer_kind, device)
    torch.library.opcheck(torch.ops.cofi.masked_layer_norm_fwd.default, (*args, 1e-5))
    detached = [None if a is None else a.detach() for a in args]
    _, mean, rstd = torch.ops.cofi.masked_layer_norm_fwd(*detached, 1e-5)
    grad = torch.randn_like(detached[0])
    for mask in ([True] * 6, [False, True, False, True, False, False]):
        torch.library.opcheck(torch.ops.cofi.masked_layer_norm_bwd.default,
                              (grad, *detached, mean, rstd, mask))


def _block(x, b, g, residual, w, bb, lg, hg):
    h = cofi_kernels.gelu_gate(x, b, g)
    return cofi_kernels.masked_layer_norm(h, residual, w, bb, lg, hg, eps=1e-5)


def _reference_block(x, b, g, residual, w, bb, lg, hg):
    return reference.masked_layer_norm(reference.gelu_gate(x, b, g), residual, w, bb, lg, hg, eps=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_through_both_ops(device):
    torch._dynamo.reset()
    x, b, g = gelu_gate_inputs((2, 6, 32), "random", device)
    residual, _, w, bb, lg, hg = masked_layer_norm_inputs((2, 6, 32), "random_with_zeros", "random", device)[:6]
    inputs = [x, b, g, residual, w, bb, lg, hg]
    compiled = torch.compile(_block, fullgraph=True)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = _reference_block(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
