"""Random inputs of the row-op benchmarks (shared by the pytest-benchmark file and gpu_row_ops.py).

Each returns the op's tensor arguments, all requiring grad, followed by a
random output gradient; the hidden gate has about 20% exact zeros.
"""

from __future__ import annotations

import torch


def gelu_inputs(rows: int, cols: int, dtype: torch.dtype, device: str):
    x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
    g = torch.rand(cols, device=device, dtype=dtype, requires_grad=True)
    return x, b, g, torch.randn(rows, cols, device=device, dtype=dtype)


def mln_inputs(rows: int, dims: int, dtype: torch.dtype, device: str):
    x = torch.randn(rows, dims, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, dims, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(dims, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(dims, device=device, dtype=dtype, requires_grad=True)
    lg = torch.rand((), device=device, dtype=dtype, requires_grad=True)
    hg = torch.rand(dims, device=device, dtype=dtype)
    hg[torch.rand(dims, device=device) < 0.2] = 0
    hg.requires_grad_()
    return x, r, w, b, lg, hg, torch.randn(rows, dims, device=device, dtype=dtype)
