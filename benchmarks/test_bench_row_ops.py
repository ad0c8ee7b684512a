"""Microbenchmarks: the compiled row ops against the eager PyTorch composition.

BERT-base sizes: 8x128 rows of 3072 for gelu_gate, of 768 for masked_layer_norm.
Run with the README's benchmark command; a summary lands in benchmarks/results/.
"""

from __future__ import annotations

import pytest
import torch

import cofi_kernels
from cofi_kernels.ops import reference
from row_inputs import gelu_inputs, mln_inputs

ROWS = 8 * 128
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}

pytestmark = pytest.mark.skipif(not cofi_kernels.extension_available(), reason="extension not built")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _gelu_inputs(device):
    *args, grad_out = gelu_inputs(ROWS, 3072, DTYPE[device], device)
    return tuple(args), grad_out


def _mln_inputs(device):
    *args, grad_out = mln_inputs(ROWS, 768, DTYPE[device], device)
    return tuple(args), grad_out


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
