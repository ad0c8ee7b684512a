"""gated_attention (Triton) against SDPA + an eager gate multiply, and against the reference. GPU only.

B=32, H=12, D=64, bf16, T in {128, 512}; without padding SDPA takes its
flash backend, with padding (a boolean mask) its memory-efficient one.
TFLOP/s count the useful matmul work (forward 4·B·H·T²·D, backward 2.5× that)
and are set against the bf16 matmul peak measured in the same run. Inputs
rotate over sets larger than L2.

    python -m pytest benchmarks/test_bench_gated_attention.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cofi_kernels
from cofi_kernels.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")

B, H, D = 32, 12, 64
DTYPE = torch.bfloat16
SETS = 4  # 4 sets of q, k, v at T=128 are 38 MB, at T=512 151 MB


def _inputs(t: int, padded: bool):
    sets = []
    for _ in range(SETS):
        q, k, v = (torch.randn(B, H, t, D, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(3))
        gate = (torch.rand(H, device="cuda") + 0.1).requires_grad_()
        mask = None
        if padded:
            lengths = torch.randint(t // 2, t + 1, (B,), device="cuda")
            mask = torch.arange(t, device="cuda")[None, :] < lengths[:, None]
        sets.append((q, k, v, gate, mask, torch.randn(B, H, t, D, device="cuda", dtype=DTYPE)))
    return sets


def _sdpa_gate(q, k, v, gate, mask):
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out * gate.to(out.dtype)[None, :, None, None]


VARIANTS = {
    "cofi triton": lambda q, k, v, g, m: cofi_kernels.gated_attention(q, k, v, g, m, backend="triton"),
    "sdpa + eager gate": _sdpa_gate,
    "reference": lambda q, k, v, g, m: reference.gated_attention(q, k, v, g, m),
}


@pytest.mark.parametrize("padded", [False, True], ids=["no padding", "padding"])
@pytest.mark.parametrize("t", [128, 512])
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gated_attention(benchmark, cuda_peak_tflops, variant, pass_, t, padded):
    fn = VARIANTS[variant]
    sets = _inputs(t, padded)
    state = {"i": 0}

    def step():
        q, k, v, g, m, grad = sets[state["i"] % SETS]
        state["i"] += 1
        if pass_ == "forward":
            with torch.no_grad():
                fn(q, k, v, g, m)
        else:
            out = fn(q, k, v, g, m)
            torch.autograd.grad(out, (q, k, v, g), grad)
        torch.cuda.synchronize()

    for _ in range(3):
        step()
    fwd_flops = 4 * B * H * t * t * D
    benchmark.group = f"gated_attention {pass_}, B={B} H={H} T={t} D={D} bf16, {'padding' if padded else 'no padding'}"
    benchmark.extra_info.update(
        suite="gated_attention", device="cuda", variant=variant, baseline=variant == "sdpa + eager gate",
        flops=fwd_flops * (1 if pass_ == "forward" else 3.5), peak_tflops=cuda_peak_tflops,
    )
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=2)
