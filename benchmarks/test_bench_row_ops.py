"""Microbenchmarks: the compiled row ops against the eager PyTorch composition.

BERT-base sizes: 8x128 rows of 3072 for gelu_gate, of 768 for masked_layer_norm.
Run with the README's benchmark command; a summary lands in benchmarks/results/.
"""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels import reference

ROWS = 8 * 128
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _gelu_inputs(device):
    dt = DTYPE[device]
    x = torch.randn(ROWS, 3072, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(3072, device=device, dtype=dt, requires_grad=True)
    g = torch.rand(3072, device=device, dtype=dt, requires_grad=True)
    return (x, b, g), torch.randn(ROWS, 3072, device=device, dtype=dt)


def _mln_inputs(device):
    dt = DTYPE[device]
    x = torch.randn(ROWS, 768, device=device, dtype=dt, requires_grad=True)
    r = torch.randn(ROWS, 768, device=device, dtype=dt, requires_grad=True)
    w = torch.rand(768, device=device, dtype=dt, requires_grad=True)
    b = torch.randn(768, device=device, dtype=dt, requires_grad=True)
    lg = torch.rand((), device=device, dtype=dt, requires_grad=True)
    hg = torch.rand(768, device=device, dtype=dt)
    hg[torch.rand(768, device=device) < 0.2] = 0
    return (x, r, w, b, lg, hg.requires_grad_()), torch.randn(ROWS, 768, device=device, dtype=dt)


OPS = {
    "gelu_gate": (_gelu_inputs, reference.gelu_gate,
                  lambda dev: lambda *a: cofi_kernels.gelu_gate(*a, backend=dev)),
    "masked_layer_norm": (_mln_inputs, reference.masked_layer_norm,
                          lambda dev: lambda *a: cofi_kernels.masked_layer_norm(*a, backend=dev, check_gates=False)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["fused", "eager"])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("op", list(OPS))
def test_row_op(benchmark, op, pass_, variant, device):
    make_inputs, eager_fn, fused_fn = OPS[op]
    inputs, grad_out = make_inputs(device)
    fn = eager_fn if variant == "eager" else fused_fn(device)
    benchmark.group = f"{op} {pass_} {device} {str(DTYPE[device]).removeprefix('torch.')} {tuple(grad_out.shape)}"
    benchmark.extra_info.update(device=device, variant=variant)

    if pass_ == "forward":
        def step():
            with torch.no_grad():
                fn(*inputs)
            _sync(device)
    else:
        def step():
            torch.autograd.grad(fn(*inputs), inputs, grad_out)
            _sync(device)

    benchmark.pedantic(step, warmup_rounds=3, rounds=30 if device == "cpu" else 200, iterations=1)
